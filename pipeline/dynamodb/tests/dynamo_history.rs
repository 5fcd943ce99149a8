//! The DynamoDB history store against DynamoDB Local (`IOTPIPE_TEST_DYNAMODB`, default
//! `http://127.0.0.1:8000`; `scripts/services.sh up` starts it). Every test uses its own table.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use iotpipe_dynamodb::{Bucket, DynamoConfig, DynamoHistory};
use iotpipe_pipeline::record::{parse_record, Limits, Record, SourceRef};
use iotpipe_pipeline::store::{HistoryQuery, HistoryStore, Order, StoreError};

const HOUR: i64 = 3_600_000;

async fn store(hot: &[(&str, u32)]) -> DynamoHistory {
    static N: AtomicU64 = AtomicU64::new(0);
    // DynamoDB Local accepts any credentials; the SDK still wants some.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    let cfg = DynamoConfig {
        table: format!(
            "iotpipe_test_{}_{}_{}",
            std::process::id(),
            iotpipe_pipeline::time::now_ms(),
            N.fetch_add(1, Ordering::Relaxed)
        ),
        endpoint: Some(
            std::env::var("IOTPIPE_TEST_DYNAMODB")
                .unwrap_or_else(|_| "http://127.0.0.1:8000".into()),
        ),
        bucket: Bucket::Hour,
        hot_devices: hot
            .iter()
            .map(|(d, n)| ((*d).to_owned(), *n))
            .collect::<BTreeMap<_, _>>(),
        retention: Some(std::time::Duration::from_secs(86_400)),
        ..DynamoConfig::default()
    };
    let s = DynamoHistory::connect(&cfg).await;
    s.init_table().await.unwrap_or_else(|e| {
        panic!("DynamoDB Local not reachable ({e}); run scripts/services.sh up")
    });
    // Idempotent.
    s.init_table().await.unwrap();
    s
}

fn rec(device: &str, ts: i64, n: i64) -> Record {
    parse_record(
        device,
        format!(r#"{{"ts":{ts},"n":{n},"deep":{{"x":[1,2.5,"s"]}}}}"#).as_bytes(),
        ts,
        SourceRef::Internal,
        &Limits::default(),
    )
    .unwrap()
}

async fn all_pages(
    s: &DynamoHistory,
    device: &str,
    from: i64,
    to: i64,
    order: Order,
    limit: usize,
) -> Vec<i64> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let q = HistoryQuery {
            device: device.into(),
            from,
            to,
            limit,
            order,
            cursor: cursor.clone(),
        };
        let page = s.query(&q).await.unwrap();
        assert!(page.items.len() <= limit);
        out.extend(page.items.iter().map(|i| i.metrics["n"].as_i64().unwrap()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

#[tokio::test]
async fn writes_are_idempotent_and_pages_cross_buckets() {
    let s = store(&[]).await;
    let base = (iotpipe_pipeline::time::now_ms() / HOUR - 5) * HOUR;
    // 60 records over three hours (more than 25: several BatchWriteItem requests).
    let recs: Vec<Record> = (0..60)
        .map(|i| rec("d1", base + i * (3 * HOUR / 60), i))
        .collect();
    let mut with_dups = recs.clone();
    with_dups.extend(recs[..10].iter().cloned()); // a replay inside the same batch
    s.write(&with_dups).await.unwrap();
    s.write(&recs[20..40]).await.unwrap(); // and a replay later
    s.write(&[rec("d10", base + 10, 999)]).await.unwrap(); // a device whose id extends d1's

    let expected: Vec<i64> = (0..60).collect();
    assert_eq!(
        all_pages(&s, "d1", base, base + 3 * HOUR, Order::Asc, 7).await,
        expected
    );
    let mut rev = expected.clone();
    rev.reverse();
    assert_eq!(
        all_pages(&s, "d1", base, base + 3 * HOUR, Order::Desc, 7).await,
        rev
    );
    // Open-ended queries (within max_lookback) see the same rows.
    assert_eq!(
        all_pages(&s, "d1", i64::MIN, i64::MAX, Order::Asc, 25).await,
        expected
    );
    // Inclusive bounds inside one bucket.
    let step = 3 * HOUR / 60;
    assert_eq!(
        all_pages(&s, "d1", base + 2 * step, base + 4 * step, Order::Asc, 10).await,
        vec![2, 3, 4]
    );
    // Metrics come back exactly.
    let q = HistoryQuery {
        device: "d1".into(),
        from: base,
        to: base,
        limit: 1,
        order: Order::Asc,
        cursor: None,
    };
    let first = s.query(&q).await.unwrap();
    assert_eq!(
        serde_json::Value::Object(first.items[0].metrics.clone()),
        serde_json::json!({"n": 0, "deep": {"x": [1, 2.5, "s"]}})
    );
    let bad = HistoryQuery {
        cursor: Some("nope".into()),
        ..q
    };
    assert!(matches!(
        s.query(&bad).await,
        Err(StoreError::InvalidQuery(_))
    ));
}

#[tokio::test]
async fn hot_devices_spread_over_shards_and_read_back_in_order() {
    let s = store(&[("hot-1", 4)]).await;
    let base = (iotpipe_pipeline::time::now_ms() / HOUR - 2) * HOUR;
    let recs: Vec<Record> = (0..50).map(|i| rec("hot-1", base + i * 1000, i)).collect();
    s.write(&recs).await.unwrap();
    assert_eq!(
        all_pages(&s, "hot-1", base, base + HOUR, Order::Asc, 9).await,
        (0..50).collect::<Vec<_>>()
    );
    assert_eq!(
        all_pages(&s, "hot-1", base, base + HOUR, Order::Desc, 50).await,
        (0..50).rev().collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn registry_put_get_list_by_owner_remove() {
    use iotpipe_dynamodb::DynamoRegistry;
    use iotpipe_pipeline::registry::{DeviceEntry, RegistryStore};
    let h = store(&[]).await;
    let cfg = DynamoConfig {
        devices_table: format!("{}_devices", h.table()),
        endpoint: Some(
            std::env::var("IOTPIPE_TEST_DYNAMODB")
                .unwrap_or_else(|_| "http://127.0.0.1:8000".into()),
        ),
        ..DynamoConfig::default()
    };
    let reg = DynamoRegistry::connect(&cfg).await;
    reg.init_table().await.unwrap();
    reg.init_table().await.unwrap();
    let e = |d: &str, o: &str, g: &[&str]| DeviceEntry {
        device: d.into(),
        owner: o.into(),
        groups: g.iter().map(|s| (*s).to_owned()).collect(),
        updated_at: 7,
    };
    reg.put(&e("d2", "alice", &["plant"])).await.unwrap();
    reg.put(&e("d1", "alice", &[])).await.unwrap();
    reg.put(&e("d3", "bob", &[])).await.unwrap();
    assert_eq!(
        reg.get("d2").await.unwrap(),
        Some(e("d2", "alice", &["plant"]))
    );
    assert_eq!(reg.get("nope").await.unwrap(), None);
    let alice: Vec<String> = reg
        .list(Some("alice"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.device)
        .collect();
    assert_eq!(alice, ["d1", "d2"]);
    assert_eq!(reg.list(None).await.unwrap().len(), 3);
    // Re-registering moves the device to its new owner.
    reg.put(&e("d1", "bob", &[])).await.unwrap();
    assert_eq!(reg.list(Some("bob")).await.unwrap().len(), 2);
    assert!(reg.remove("d3").await.unwrap());
    assert!(!reg.remove("d3").await.unwrap());
    assert_eq!(reg.get("d3").await.unwrap(), None);
    // Bulk: more than one BatchWriteItem request (25 items each), groups kept.
    let many: Vec<DeviceEntry> = (0..60)
        .map(|i| {
            e(
                &format!("bulk-{i:02}"),
                "carol",
                if i % 2 == 0 { &["lab"] } else { &[] },
            )
        })
        .collect();
    reg.put_many(&many).await.unwrap();
    let carol = reg.list(Some("carol")).await.unwrap();
    assert_eq!(carol, many);
}
