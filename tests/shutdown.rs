//! Graceful shutdown loses no acknowledged message: publish N with QoS 1, SIGTERM in the middle,
//! restart, and every one of the N is in history exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{free_port, Dev, Publisher};
use serde_json::json;

const N: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let dev = Dev::start(&data, port, &[]);
    let mqtt = dev.mqtt;
    let acked = Arc::new(AtomicUsize::new(0));
    let acked2 = acked.clone();
    let t0 = iotpipe_pipeline::time::now_ms() - 60_000;
    // The publisher keeps going through the shutdown and the restart: a message counts as sent
    // only once the broker acknowledged it; until then it is republished.
    let publisher = tokio::spawn(async move {
        let mut p = Publisher::new(mqtt, "shutdown-pub");
        for n in 0..N {
            let payload = json!({"ts": t0 + n as i64, "n": n}).to_string();
            p.publish(
                "devices/sd-1/telemetry",
                payload.as_bytes(),
                Duration::from_secs(60),
            )
            .await;
            acked2.store(n + 1, Ordering::SeqCst);
        }
    });
    while acked.load(Ordering::SeqCst) < N / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = acked.load(Ordering::SeqCst);
    tokio::task::spawn_blocking(move || dev.stop())
        .await
        .unwrap();
    let during = acked.load(Ordering::SeqCst);
    assert!(during < N, "the shutdown must happen mid-stream");

    let dev = Dev::start(&data, port, &[]);
    // Everything acknowledged before the restart is already there.
    let (_, hist) = dev
        .get(&format!(
            "/v1/devices/sd-1/history?limit=1000&to={}",
            t0 + before as i64 - 1
        ))
        .await;
    assert_eq!(
        hist["items"].as_array().map(Vec::len),
        Some(before),
        "acknowledged before shutdown"
    );
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .unwrap()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let hist = loop {
        let (_, hist) = dev.get("/v1/devices/sd-1/history?limit=1000").await;
        let len = hist["items"].as_array().map_or(0, Vec::len);
        if len >= N {
            break hist;
        }
        if std::time::Instant::now() > deadline {
            let have: BTreeSet<u64> = hist["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["metrics"]["n"].as_u64().unwrap())
                .collect();
            let missing: Vec<u64> = (0..N as u64).filter(|n| !have.contains(n)).collect();
            panic!("{len} of {N} in history; missing {missing:?} (acked before shutdown: {before}, at stop: {during})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let items = hist["items"].as_array().unwrap();
    let ns: BTreeSet<u64> = items
        .iter()
        .map(|i| i["metrics"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(items.len(), N, "exactly once: no duplicates");
    assert_eq!(
        ns,
        (0..N as u64).collect::<BTreeSet<_>>(),
        "no message lost"
    );
    dev.stop();
}
