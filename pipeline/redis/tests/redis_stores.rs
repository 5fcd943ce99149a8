//! The Redis stores against a real Redis (`IOTPIPE_TEST_REDIS`, default `redis://127.0.0.1:6379`;
//! `scripts/services.sh up` starts one). Every test uses its own key prefix, so runs can share a
//! server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use iotpipe_pipeline::change::{merge, LatestState, MergeOutcome};
use iotpipe_pipeline::dead_letter::{DeadLetter, Stage};
use iotpipe_pipeline::kv::{KeyValue, KvWrite};
use iotpipe_pipeline::record::{parse_record, Limits, Record, RejectReason, Rejection, SourceRef};
use iotpipe_pipeline::store::{DeadLetterStore, LatestStore};
use iotpipe_redis::{RedisConfig, RedisDeadLetters, RedisKv, RedisLatest};
use proptest::prelude::*;
use serde_json::{json, Value};

fn config() -> RedisConfig {
    static N: AtomicU64 = AtomicU64::new(0);
    let url =
        std::env::var("IOTPIPE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!(
        "iotpipe-test:{}:{}:{}:",
        std::process::id(),
        iotpipe_pipeline::time::now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    RedisConfig {
        url,
        key_prefix: prefix,
        dead_letters_keep: 5,
    }
}

async fn latest() -> RedisLatest {
    RedisLatest::connect(&config())
        .await
        .unwrap_or_else(|e| panic!("Redis not reachable ({e}); run scripts/services.sh up"))
}

const NOW: i64 = 1_750_000_000_000;

fn rec(device: &str, ts: i64, arrival: u64, metrics: Value) -> Record {
    let mut r = parse_record(
        device,
        metrics.to_string().as_bytes(),
        NOW + ts,
        SourceRef::Internal,
        &Limits::default(),
    )
    .unwrap();
    r.ts = ts;
    r.received_at = NOW + ts;
    r.arrival = arrival;
    r
}

#[tokio::test]
async fn merge_emits_only_changes_and_guards_order() {
    let s = latest().await;
    let out = s
        .merge(&[
            rec("d1", 20, 1, json!({"t": 2, "h": 50})),
            rec("d1", 10, 2, json!({"t": 1, "x": "late"})),
            rec("d1", 30, 3, json!({"t": 2, "h": 51.5})),
            rec("d2", 5, 4, json!({"nested": {"a": [1, 2]}})),
        ])
        .await
        .unwrap();
    let got: Vec<Option<(u64, Value)>> = out
        .iter()
        .map(|o| {
            o.change()
                .map(|c| (c.seq, Value::Object(c.changes.clone())))
        })
        .collect();
    assert_eq!(
        got,
        vec![
            Some((1, json!({"t": 2, "h": 50}))),
            Some((2, json!({"x": "late"}))),
            Some((3, json!({"h": 51.5}))),
            Some((1, json!({"nested": {"a": [1, 2]}}))),
        ]
    );
    let d1 = s.get("d1").await.unwrap().unwrap();
    assert_eq!(
        Value::Object(d1.values()),
        json!({"t": 2, "h": 51.5, "x": "late"})
    );
    assert_eq!((d1.seq, d1.ts), (3, 30));
    assert!(s.get("nope").await.unwrap().is_none());
    let devices = s.devices(10).await.unwrap();
    assert_eq!(
        devices
            .iter()
            .map(|d| d.device.as_str())
            .collect::<Vec<_>>(),
        vec!["d1", "d2"],
        "most recently seen first"
    );
    assert_eq!(devices[0].seq, 3);
}

#[tokio::test]
async fn dead_letters_are_capped_newest_first() {
    let s = RedisDeadLetters::connect(&config()).await.unwrap();
    let mk = |i: usize| {
        DeadLetter::from_rejection(
            Stage::Ingest,
            &Rejection::new(RejectReason::InvalidJson, format!("n{i}")),
            None,
            SourceRef::Internal,
            b"x",
            0,
        )
    };
    s.push(&(0..4).map(mk).collect::<Vec<_>>()).await.unwrap();
    s.push(&(4..8).map(mk).collect::<Vec<_>>()).await.unwrap();
    let got: Vec<String> = s
        .recent(100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.detail)
        .collect();
    assert_eq!(got, vec!["n7", "n6", "n5", "n4", "n3"]);
}

#[test]
fn debug_hides_the_password() {
    let cfg = RedisConfig {
        url: "redis://user:hunter2@redis.internal:6379/0".into(),
        ..RedisConfig::default()
    };
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("redis.internal"));
}

fn arb_batches() -> impl Strategy<Value = Vec<Vec<Record>>> {
    let record = (
        0usize..2,
        0i64..20,
        prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]), 0i64..3, 0..3),
    );
    (
        prop::collection::vec(record, 1..30),
        prop::collection::vec(1usize..6, 1..10),
        0usize..6,
    )
        .prop_map(|(raw, splits, dups)| {
            let mut records: Vec<Record> = raw
                .into_iter()
                .enumerate()
                .map(|(i, (d, ts, m))| {
                    rec(
                        ["d1", "d2"][d],
                        ts,
                        i as u64,
                        Value::Object(
                            m.into_iter()
                                .map(|(k, v)| (k.to_owned(), json!(v)))
                                .collect(),
                        ),
                    )
                })
                .collect();
            // Replays: some records come again later.
            for i in 0..dups.min(records.len()) {
                records.push(records[i * 3 % records.len()].clone());
            }
            let mut batches = Vec::new();
            let mut it = records.into_iter().peekable();
            let mut s = splits.into_iter().cycle();
            while it.peek().is_some() {
                let n = s.next().unwrap_or(1);
                batches.push(it.by_ref().take(n).collect());
            }
            batches
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The Lua merge in Redis and the Rust merge agree on every outcome and on the final states.
    #[test]
    fn redis_merge_matches_the_model(batches in arb_batches()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = latest().await;
            let mut model: HashMap<String, LatestState> = HashMap::new();
            for batch in &batches {
                let got = store.merge(batch).await.unwrap();
                let expected: Vec<MergeOutcome> = batch
                    .iter()
                    .map(|r| merge(model.entry(r.device.clone()).or_insert_with(|| LatestState::new(&r.device)), r))
                    .collect();
                assert_eq!(got, expected);
            }
            for (device, m) in &model {
                let s = store.get(device).await.unwrap().unwrap();
                assert_eq!(&s, m, "final state of {device}");
            }
        });
    }
}

#[tokio::test]
async fn kv_namespaces_batches_and_prefix_scans() {
    let kv = RedisKv::connect(&config()).await.unwrap();
    kv.apply(vec![
        KvWrite::Put("rule-state/r1/d1".into(), b"a".to_vec()),
        KvWrite::Put("rule-state/r1/d2".into(), b"b".to_vec()),
        KvWrite::Put("rule-state/r2/d1".into(), b"c".to_vec()),
        KvWrite::Put("alarm/r1/d1".into(), b"x".to_vec()),
    ])
    .await
    .unwrap();
    kv.apply(vec![KvWrite::Delete("rule-state/r1/d2".into())])
        .await
        .unwrap();
    assert_eq!(kv.get("rule-state/r1/d2").await.unwrap(), None);
    assert_eq!(
        kv.get_many(&[
            "rule-state/r2/d1".into(),
            "alarm/r1/d1".into(),
            "alarm/none".into()
        ])
        .await
        .unwrap(),
        vec![Some(b"c".to_vec()), Some(b"x".to_vec()), None]
    );
    assert_eq!(
        kv.scan_prefix("rule-state/r1/").await.unwrap(),
        vec![("rule-state/r1/d1".to_owned(), b"a".to_vec())]
    );
    assert_eq!(kv.scan_prefix("alarm/").await.unwrap().len(), 1);
}

#[tokio::test]
async fn limiter_shares_one_budget_between_instances() {
    use iotpipe_pipeline::ratelimit::{Decision, Quota, RateLimiter};
    use iotpipe_redis::RedisLimiter;
    let cfg = config();
    // Two fanout instances: two connections, one budget.
    let a = RedisLimiter::connect(&cfg).await.unwrap();
    let b = RedisLimiter::connect(&cfg).await.unwrap();
    let q = Quota::per_minute(60, 4);
    let mut allowed = 0;
    for i in 0..10 {
        let l = if i % 2 == 0 { &a } else { &b };
        if l.check("rest:alice", &q).await.unwrap() == Decision::Allow {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 4, "the burst is shared, not per instance");
    match a.check("rest:alice", &q).await.unwrap() {
        Decision::Deny { retry_after } => assert!(
            retry_after > std::time::Duration::from_millis(500)
                && retry_after <= std::time::Duration::from_secs(1),
            "{retry_after:?}"
        ),
        Decision::Allow => panic!("over the limit"),
    }
    // Another user has their own budget.
    assert_eq!(b.check("rest:bob", &q).await.unwrap(), Decision::Allow);
    // At 60/min one more is allowed a second later.
    tokio::time::sleep(std::time::Duration::from_millis(1050)).await;
    assert_eq!(a.check("rest:alice", &q).await.unwrap(), Decision::Allow);
    assert!(matches!(
        b.check("rest:alice", &q).await.unwrap(),
        Decision::Deny { .. }
    ));
}
