//! Criterion micro-benchmarks of the hot paths: payload parse + validate, the latest-state merge
//! (pure, and through the embedded store), and embedded history writes — the latter against fjall
//! too, the alternative we measured before choosing redb (figures in docs/BENCHMARKS.md).
//!
//! Run: `cargo bench --bench pipeline`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use iotpipe_pipeline::change::{merge, LatestState};
use iotpipe_pipeline::embedded::{RedbHistory, RedbLatest};
use iotpipe_pipeline::record::{parse_record, Limits, Record, SourceRef};
use iotpipe_pipeline::store::{HistoryStore, LatestStore};

const PAYLOAD: &str = r#"{"ts":1750000000123,"temperature":21.43,"humidity":48.2,"battery":97.1,"rssi":-61,"status":"ok","fw":"1.4.2"}"#;
const NOW: i64 = 1_750_000_000_500;

fn record(device: &str, ts: i64, t: f64) -> Record {
    let payload = format!(
        r#"{{"ts":{ts},"temperature":{t},"humidity":48.2,"battery":97.1,"rssi":-61,"status":"ok"}}"#
    );
    parse_record(
        device,
        payload.as_bytes(),
        ts,
        SourceRef::Internal,
        &Limits::default(),
    )
    .unwrap()
}

fn batch(n: usize, start_ts: i64) -> Vec<Record> {
    (0..n)
        .map(|i| {
            record(
                &format!("dev-{:04}", i % 100),
                start_ts + i as i64,
                20.0 + (i % 7) as f64,
            )
        })
        .collect()
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_validate");
    g.throughput(Throughput::Elements(1));
    let limits = Limits::default();
    let source = SourceRef::Mqtt {
        topic: "devices/dev-0001/telemetry".into(),
    };
    g.bench_function("typical_7_fields", |b| {
        b.iter(|| {
            parse_record("dev-0001", PAYLOAD.as_bytes(), NOW, source.clone(), &limits).unwrap()
        })
    });
    g.finish();
}

fn merge_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("latest_merge");
    g.throughput(Throughput::Elements(1));
    let mut state = LatestState::new("dev-0001");
    let records: Vec<Record> = (0..1000)
        .map(|i| record("dev-0001", NOW - 100_000 + i, 20.0 + (i % 5) as f64))
        .collect();
    for r in &records[..10] {
        merge(&mut state, r);
    }
    g.bench_function("pure_one_record", |b| {
        let mut i = 0;
        b.iter_batched(
            || state.clone(),
            |mut s| {
                i = (i + 1) % records.len();
                merge(&mut s, &records[i])
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbLatest::open(&dir.path().join("latest.redb")).unwrap());
    let mut g = c.benchmark_group("latest_store");
    g.throughput(Throughput::Elements(500));
    g.sample_size(20);
    let mut ts = NOW - 10_000_000;
    g.bench_function("redb_batch_500_fsync", |b| {
        b.iter(|| {
            ts += 1000;
            rt.block_on(store.merge(&batch(500, ts))).unwrap()
        })
    });
    g.finish();
}

fn history(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut g = c.benchmark_group("history_write");
    g.throughput(Throughput::Elements(500));
    g.sample_size(20);

    let dir = tempfile::tempdir().unwrap();
    let redb = RedbHistory::open(&dir.path().join("history.redb")).unwrap();
    let mut ts = NOW - 20_000_000;
    g.bench_function("redb_batch_500_fsync", |b| {
        b.iter(|| {
            ts += 1000;
            rt.block_on(redb.write(&batch(500, ts))).unwrap()
        })
    });

    // The same rows, keys and durability (fsync per batch) in fjall, for the store choice.
    let fdir = tempfile::tempdir().unwrap();
    let keyspace = fjall::Config::new(fdir.path()).open().unwrap();
    let part = keyspace
        .open_partition("history", fjall::PartitionCreateOptions::default())
        .unwrap();
    let mut ts = NOW - 20_000_000;
    g.bench_function("fjall_batch_500_fsync", |b| {
        b.iter(|| {
            ts += 1000;
            let mut wb = keyspace
                .batch()
                .durability(Some(fjall::PersistMode::SyncAll));
            for r in batch(500, ts) {
                let mut key = r.device.as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(&(r.ts as u64 ^ (1 << 63)).to_be_bytes());
                key.extend_from_slice(r.id.0.as_bytes());
                wb.insert(&part, key, serde_json::to_vec(&r.metrics).unwrap());
            }
            wb.commit().unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, parse, merge_bench, history);
criterion_main!(benches);
