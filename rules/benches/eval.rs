//! Rule evaluation cost per record: one threshold rule in the sandbox (record values converted and
//! scope set up included), and the whole engine with 1, 10 and 100 rules per record (ownership,
//! selectors, state, alarm lifecycle included), each beside the same predicates in plain Rust.
//!
//! `cargo bench -p iotpipe-rules --bench eval`; figures in `docs/BENCHMARKS.md`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iotpipe_pipeline::record::{parse_record, Limits, Record, SourceRef};
use iotpipe_rules::engine::{Rule, RuleEngine, StaticOwners};
use iotpipe_rules::sandbox::{Input, Limits as RuleLimits, Sandbox};
use iotpipe_rules::Evaluator;
use serde_json::{json, Value};

const T0: i64 = 1_750_000_000_000;

fn metrics(temp: f64) -> serde_json::Map<String, Value> {
    json!({"temp": temp, "hum": 41, "bat": 3.71, "status": "ok"})
        .as_object()
        .cloned()
        .unwrap()
}

fn plain_threshold(m: &serde_json::Map<String, Value>, limit: f64) -> bool {
    m.get("temp")
        .and_then(Value::as_f64)
        .is_some_and(|t| t > limit)
}

fn sandbox(c: &mut Criterion) {
    let mut g = c.benchmark_group("rule_per_record");
    let sb = Sandbox::new(RuleLimits::default());
    let rule = sb
        .compile(r#"if metrics.temp > 30.0 { alert("warning", "hot") }"#)
        .unwrap();
    for (name, temp) in [("below", 29.5), ("above", 31.5)] {
        let m = metrics(temp);
        g.bench_function(format!("plain_rust_{name}"), |b| {
            b.iter(|| black_box(plain_threshold(black_box(&m), 30.0)))
        });
        g.bench_function(format!("rhai_threshold_{name}"), |b| {
            let mut state = rhai::Map::new();
            b.iter(|| {
                let input = Input {
                    device: "dev-1",
                    ts: T0,
                    now: T0,
                    metrics: black_box(&m),
                    prev: None,
                    tick: false,
                };
                // As the engine does for the last (here: only) rule of a record.
                let mut prepared = Sandbox::prepare_for(&input, rule.metric_keys());
                black_box(sb.evaluate_last(&rule, &mut prepared, &mut state).unwrap())
            })
        });
    }
    g.finish();
}

fn engine(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("engine_per_record");
    const DEVICES: usize = 100;
    let records: Vec<Record> = (0..DEVICES)
        .map(|i| {
            // Mostly below every threshold, as most records are.
            let temp = 20.0 + (i % 10) as f64;
            let mut m = metrics(temp);
            m.insert("ts".into(), json!(T0 + i as i64));
            parse_record(
                &format!("dev-{i}"),
                Value::Object(m).to_string().as_bytes(),
                T0,
                SourceRef::Internal,
                &Limits::default(),
            )
            .unwrap()
        })
        .collect();
    let owners: HashMap<String, String> = (0..DEVICES)
        .map(|i| (format!("dev-{i}"), "alice".to_owned()))
        .collect();
    for n in [1usize, 10, 100] {
        let e = RuleEngine::new(
            Sandbox::new(RuleLimits::default()),
            Arc::new(StaticOwners(owners.clone())),
            3,
        );
        for i in 0..n {
            e.upsert(Rule {
                id: format!("r{i}"),
                owner: "alice".into(),
                script: format!(
                    r#"if metrics.temp > {}.0 {{ alert("warning", "hot") }} else {{ clear() }}"#,
                    30 + i
                ),
                ..Rule::default()
            })
            .unwrap();
        }
        g.throughput(Throughput::Elements(DEVICES as u64));
        g.bench_with_input(BenchmarkId::new("rhai_rules", n), &n, |b, _| {
            b.iter(|| black_box(rt.block_on(e.evaluate(&records)).unwrap()))
        });
        let limits: Vec<f64> = (0..n).map(|i| 30.0 + i as f64).collect();
        g.bench_with_input(BenchmarkId::new("plain_rust", n), &n, |b, _| {
            b.iter(|| {
                let mut hits = 0usize;
                for r in &records {
                    for l in &limits {
                        hits += usize::from(plain_threshold(&r.metrics, *l));
                    }
                }
                black_box(hits)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, sandbox, engine);
criterion_main!(benches);
