//! Bad input through a real `iotpipe dev`: every kind becomes a dead letter with its reason, and a
//! good message sent right after it is delivered (nothing stalls).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::time::Duration;

use common::{Dev, Publisher};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_message_is_dead_lettered_and_the_next_good_one_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), 0, &[]);
    let mut p = Publisher::new(dev.mqtt, "bad-pub");
    let far_future = iotpipe_pipeline::time::now_ms() + 86_400_000;
    let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(40), "]".repeat(40));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "devices/bd-1/telemetry",
            b"not json at all".to_vec(),
            "invalid_json",
        ),
        (
            "devices/bd-1/telemetry",
            b"[1,2,3]".to_vec(),
            "not_an_object",
        ),
        (
            "devices/bd-1/telemetry",
            br#""just a string""#.to_vec(),
            "not_an_object",
        ),
        (
            "devices/bd-1/telemetry",
            format!(r#"{{"t":"{}"}}"#, "x".repeat(70_000)).into_bytes(),
            "payload_too_large",
        ),
        ("devices/bd-1/telemetry", deep.into_bytes(), "too_deep"),
        (
            "devices/bd-1/telemetry",
            br#"{"t":NaN}"#.to_vec(),
            "invalid_json",
        ),
        (
            "devices/bd-1/telemetry",
            br#"{"t":1e999}"#.to_vec(),
            "non_finite_number",
        ),
        (
            "devices/bad id!/telemetry",
            br#"{"t":1}"#.to_vec(),
            "invalid_device_id",
        ),
        (
            "devices/bd-1/wrong",
            br#"{"t":1}"#.to_vec(),
            "topic_mismatch",
        ),
        (
            "devices/bd-1/telemetry",
            json!({"ts": far_future, "t": 1}).to_string().into_bytes(),
            "timestamp_in_future",
        ),
        (
            "devices/bd-1/telemetry",
            br#"{"ts":"not a time","t":1}"#.to_vec(),
            "invalid_timestamp",
        ),
        (
            "devices/bd-1/telemetry",
            vec![0xff, 0xfe, 0x00],
            "invalid_json",
        ),
    ];
    for (i, (topic, payload, reason)) in cases.iter().enumerate() {
        p.publish(topic, payload, Duration::from_secs(10)).await;
        let good = format!("good-{i}");
        p.publish(
            &format!("devices/{good}/telemetry"),
            json!({"i": i}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
        dev.wait_for(&format!("/v1/devices/{good}/latest"), |s, v| {
            s == 200 && v["state"]["i"] == i
        })
        .await;
        let letters = dev
            .wait_for("/v1/dead-letters?limit=100", |_, v| {
                v["dead_letters"].as_array().map_or(0, Vec::len) > i
            })
            .await;
        let newest = &letters["dead_letters"][0];
        assert_eq!(newest["reason"], *reason, "case {i} ({topic}): {newest}");
        assert_eq!(newest["stage"], "ingest");
        assert!(newest["detail"].as_str().is_some_and(|d| !d.is_empty()));
        assert!(
            newest["payload_excerpt"].as_str().unwrap().len() <= 1024,
            "excerpt is bounded"
        );
        assert_eq!(newest["payload_bytes"], payload.len());
    }
    // The bad device never got state from any of it.
    assert_eq!(dev.get("/v1/devices/bd-1/latest").await.0, 404);
    let (_, metrics) = dev.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains(r#"iotpipe_dead_letters_total{reason="too_deep",stage="ingest"} 1"#),
        "{metrics}"
    );
    dev.stop();
}
