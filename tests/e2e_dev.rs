//! End to end through a real `iotpipe dev` process: MQTT in, WebSocket and REST out, restarts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::time::Duration;

use common::{Dev, Publisher};
use serde_json::{json, Value};

fn now_ms() -> i64 {
    iotpipe_pipeline::time::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_to_websocket_and_rest_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let dev = Dev::start(&data, 0, &[]);
    let mut ws = dev.ws().await;
    ws.send(json!({"op": "subscribe", "devices": ["e2e-1"]}))
        .await;
    // Unknown device: no snapshot, just the confirmation.
    assert_eq!(ws.next().await.unwrap()["type"], "subscribed");

    let mut publisher = Publisher::new(dev.mqtt, "e2e-pub");
    let t0 = now_ms() - 1000;
    publisher
        .publish(
            "devices/e2e-1/telemetry",
            json!({"ts": t0, "t": 1, "h": 50}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
    let u1 = ws.next_of("update").await;
    assert_eq!(
        u1,
        json!({"type": "update", "device": "e2e-1", "ts": t0, "seq": 1, "changes": {"t": 1, "h": 50}})
    );

    publisher
        .publish(
            "devices/e2e-1/telemetry",
            json!({"ts": t0 + 500, "t": 2, "h": 50})
                .to_string()
                .as_bytes(),
            Duration::from_secs(10),
        )
        .await;
    let u2 = ws.next_of("update").await;
    assert_eq!(u2["seq"], 2);
    assert_eq!(
        u2["changes"],
        json!({"t": 2}),
        "only the changed field is pushed"
    );

    // A second client gets the snapshot first.
    let mut ws2 = dev.ws().await;
    ws2.send(json!({"op": "subscribe", "devices": ["e2e-1"]}))
        .await;
    let snap = ws2.next().await.unwrap();
    assert_eq!(
        snap,
        json!({"type": "snapshot", "device": "e2e-1", "ts": t0 + 500, "seq": 2, "state": {"t": 2, "h": 50}})
    );
    assert_eq!(ws2.next().await.unwrap()["type"], "subscribed");

    let (status, latest) = dev.get("/v1/devices/e2e-1/latest").await;
    assert_eq!(status, 200);
    assert_eq!(latest["state"], json!({"t": 2, "h": 50}));
    assert_eq!(latest["seq"], 2);
    // History is written by its own consumer: wait for it rather than race it.
    let hist = dev
        .wait_for("/v1/devices/e2e-1/history?order=asc", |_, v| {
            v["items"].as_array().map_or(0, Vec::len) == 2
        })
        .await;
    assert_eq!(
        hist["items"],
        json!([{"ts": t0, "metrics": {"t": 1, "h": 50}}, {"ts": t0 + 500, "metrics": {"t": 2, "h": 50}}])
    );
    let (_, devices) = dev.get("/v1/devices").await;
    assert_eq!(devices["devices"][0]["device"], "e2e-1");
    assert_eq!(dev.get("/v1/devices/nope/latest").await.0, 404);
    assert_eq!(dev.get("/readyz").await.0, 200);
    assert_eq!(dev.get("/healthz").await.0, 200);
    // The dashboard is served at / and subscribes over the same WebSocket endpoint.
    let (status, page) = dev.get("/").await;
    assert_eq!(status, 200);
    assert!(page
        .as_str()
        .is_some_and(|p| p.contains("/v1/ws") && p.contains("devices: ['*']")));
    let (_, metrics) = dev.get("/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    for line in [
        "iotpipe_ingest_received_total 2",
        "iotpipe_ingest_appended_total 2",
        "iotpipe_changes_emitted_total 2",
        "iotpipe_history_rows_written_total 2",
        "iotpipe_ws_connections 2",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
    }
    assert!(metrics.contains("iotpipe_push_latency_seconds_count"));

    // Shutdown closes WebSockets with 1001.
    let http_before = dev.http;
    let stopper = tokio::task::spawn_blocking(move || dev.stop());
    assert_eq!(ws.next().await, Err(Some(1001)));
    stopper.await.unwrap();

    // Restart on the same data directory: latest state and history are still there, seq goes on.
    let dev = Dev::start(&data, 0, &[]);
    let _ = http_before;
    let (_, latest) = dev.get("/v1/devices/e2e-1/latest").await;
    assert_eq!(latest["state"], json!({"t": 2, "h": 50}));
    let (_, hist) = dev.get("/v1/devices/e2e-1/history").await;
    assert_eq!(hist["items"].as_array().map(Vec::len), Some(2));
    let mut publisher = Publisher::new(dev.mqtt, "e2e-pub");
    publisher
        .publish(
            "devices/e2e-1/telemetry",
            json!({"ts": t0 + 900, "t": 3}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
    dev.wait_for("/v1/devices/e2e-1/latest", |_, v| {
        v["seq"] == 3 && v["state"]["t"] == 3
    })
    .await;
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_sees_devices_that_appear_later_and_history_pages() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), 0, &[]);
    let mut ws = dev.ws().await;
    ws.send(json!({"op": "subscribe", "devices": ["*"]})).await;
    assert_eq!(ws.next().await.unwrap()["type"], "subscribed");
    let mut p = Publisher::new(dev.mqtt, "wild-pub");
    let t0 = now_ms() - 10_000;
    for i in 0..7 {
        p.publish(
            "devices/late-1/telemetry",
            json!({"ts": t0 + i * 100, "n": i}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
    }
    let first = ws.next_of("update").await;
    assert_eq!(first["device"], "late-1");
    assert_eq!(first["seq"], 1);

    dev.wait_for("/v1/devices/late-1/latest", |_, v| v["seq"] == 7)
        .await;
    dev.wait_for("/v1/devices/late-1/history?limit=100", |_, v| {
        v["items"].as_array().map_or(0, Vec::len) == 7
    })
    .await;
    // Page through history, newest first, 3 at a time; the range bounds are inclusive.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!(
            "/v1/devices/late-1/history?order=desc&limit=3&from={}&to={}",
            t0 + 100,
            t0 + 500
        );
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = dev.get(&path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["metrics"]["n"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, vec![5, 4, 3, 2, 1]);
    // RFC 3339 bounds work too.
    let from = iotpipe_pipeline::time::to_rfc3339(t0 + 600);
    let (_, page) = dev
        .get(&format!("/v1/devices/late-1/history?from={from}"))
        .await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));

    // Bad parameters are 400 with a JSON error, never 500.
    for bad in [
        "/v1/devices/late-1/history?limit=0",
        "/v1/devices/late-1/history?order=sideways",
        "/v1/devices/late-1/history?from=yesterday",
        "/v1/devices/late-1/history?from=10&to=5",
        "/v1/devices/late-1/history?cursor=xyz",
        "/v1/devices/bad%20id/latest",
        "/v1/dead-letters?limit=-1",
    ] {
        let (status, body) = dev.get(bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{bad}");
    }
    // Bad WebSocket requests get an error frame and the connection stays usable.
    ws.send(json!({"op": "explode"})).await;
    assert_eq!(ws.next_of("error").await["code"], "bad_request");
    ws.send(json!({"op": "subscribe", "devices": ["no spaces allowed"]}))
        .await;
    assert_eq!(ws.next_of("error").await["code"], "bad_request");
    ws.send(json!({"op": "ping"})).await;
    assert_eq!(ws.next_of("pong").await["type"], "pong");
    dev.stop();
}

/// Subscribe-then-snapshot: while a device changes continuously, clients that subscribe at random
/// moments must see a snapshot and then every later change, with no seq skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_update_is_lost_between_snapshot_and_first_update() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), 0, &[]);
    let mqtt = dev.mqtt;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = tokio::spawn(async move {
        let mut p = Publisher::new(mqtt, "race-pub");
        let mut n = 0i64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            p.publish(
                "devices/race-1/telemetry",
                json!({"n": n}).to_string().as_bytes(),
                Duration::from_secs(10),
            )
            .await;
            n += 1;
        }
        n
    });
    dev.wait_for("/v1/devices/race-1/latest", |s, _| s == 200)
        .await;
    for _ in 0..20 {
        let mut ws = dev.ws().await;
        ws.send(json!({"op": "subscribe", "devices": ["race-1"]}))
            .await;
        let snap = ws.next_of("snapshot").await;
        let first = snap["seq"].as_u64().unwrap();
        let mut n = snap["state"]["n"].as_i64().unwrap();
        for seq in first..first + 5 {
            let u = ws.next_of("update").await;
            assert_eq!(
                u["seq"].as_u64().unwrap(),
                seq + 1,
                "gap after seq {seq}: {u}"
            );
            let next_n = u["changes"]["n"].as_i64().unwrap();
            assert_eq!(next_n, n + 1, "every publish changes n by one");
            n = next_n;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = writer.await.unwrap();
    assert!(published > 100, "the device kept publishing: {published}");
    let _: Value = dev
        .wait_for("/v1/devices/race-1/latest", |_, v| {
            v["state"]["n"] == published - 1
        })
        .await;
    dev.stop();
}
