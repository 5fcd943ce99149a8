//! End-to-end load generator: MQTT publishers -> iotpipe -> WebSocket receivers.
//!
//! Publishes telemetry at a fixed rate over MQTT, receives the pushed updates on WebSocket clients
//! subscribed to `*`, and reports throughput and device->client latency (from a `sent_us` stamp
//! inside each payload to the moment the update frame is parsed) as JSON.
//!
//! Without `--mqtt/--http` it starts its own `iotpipe dev` (release build, fresh data dir) as a
//! separate process and also reports that process's CPU time and RSS. One generator, several
//! targets: point `--mqtt` and `--http` at any deployment.
//!
//! ```text
//! cargo bench --bench loadgen -- --rate 20000 --duration 60 --devices 1000 --receivers 4
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::{now_us, proc_stats, start_server};

#[derive(Debug, Parser)]
#[command(about = "iotpipe end-to-end load generator")]
struct Args {
    /// MQTT address of the target; omitted: start a local `iotpipe dev`.
    #[arg(long)]
    mqtt: Option<SocketAddr>,
    /// HTTP address of the target (WebSocket at /v1/ws).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Messages per second, all publishers together.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Seconds of measurement (after the warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of warm-up, not measured.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Distinct devices.
    #[arg(long, default_value_t = 1000)]
    devices: u64,
    /// MQTT publisher connections.
    #[arg(long, default_value_t = 4)]
    publishers: u64,
    /// WebSocket receivers, each subscribed to every device.
    #[arg(long, default_value_t = 2)]
    receivers: u64,
    /// MQTT QoS of the published messages (0 or 1).
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Topic template of the target.
    #[arg(long, default_value = "devices/{device_id}/telemetry")]
    topic_template: String,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

async fn publisher(
    mqtt: SocketAddr,
    idx: u64,
    args: Arc<Args>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    let mut opts = MqttOptions::new(
        format!("loadgen-pub-{idx}-{}", std::process::id()),
        mqtt.ip().to_string(),
        mqtt.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 20_000);
    let stop_poll = stop.clone();
    let poller = tokio::spawn(async move {
        while !stop_poll.load(Ordering::Relaxed) {
            if tokio::time::timeout(Duration::from_millis(200), eventloop.poll())
                .await
                .is_ok_and(|r| r.is_err())
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let per_sec = args.rate as f64 / args.publishers as f64;
    let devices: Vec<String> = (0..args.devices)
        .filter(|d| d % args.publishers == idx)
        .map(|d| {
            args.topic_template
                .replace("{device_id}", &format!("lg-{d:06}"))
        })
        .collect();
    let started = Instant::now();
    let mut done: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * per_sec) as u64;
        while done < due {
            let topic = &devices[(done % devices.len() as u64) as usize];
            let payload =
                json!({"ts": now_us() / 1000, "sent_us": now_us(), "v": done % 1000}).to_string();
            if client
                .publish(topic.clone(), qos, false, payload)
                .await
                .is_err()
            {
                break;
            }
            done += 1;
            sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
}

async fn receiver(
    http: SocketAddr,
    measure_from: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> (Histogram<u64>, u64, u64) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/v1/ws"))
        .await
        .expect("connect WebSocket");
    ws.send(Message::text(
        json!({"op": "subscribe", "devices": ["*"]}).to_string(),
    ))
    .await
    .unwrap();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut total, mut measured) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(200), ws.next()).await
        else {
            continue;
        };
        let Message::Text(t) = msg else { continue };
        let v: Value = match serde_json::from_str(&t) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["type"] != "update" {
            continue;
        }
        total += 1;
        if let Some(sent) = v["changes"]["sent_us"].as_u64() {
            if sent >= measure_from.load(Ordering::Relaxed) {
                let _ = hist.record(now_us().saturating_sub(sent).max(1));
                measured += 1;
            }
        }
    }
    (hist, total, measured)
}

fn main() {
    let args = Arc::new(Args::parse());
    let server = if args.mqtt.is_none() || args.http.is_none() {
        Some(start_server(
            Path::new(env!("CARGO_BIN_EXE_iotpipe")),
            tempfile::tempdir().unwrap(),
            &[],
        ))
    } else {
        None
    };
    let mqtt = args.mqtt.or(server.as_ref().map(|s| s.mqtt)).unwrap();
    let http = args.http.or(server.as_ref().map(|s| s.http)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(async {
        let stop_rx = Arc::new(AtomicBool::new(false));
        let stop_tx = Arc::new(AtomicBool::new(false));
        let measure_from = Arc::new(AtomicU64::new(u64::MAX));
        let receivers: Vec<_> =
            (0..args.receivers).map(|_| tokio::spawn(receiver(http, measure_from.clone(), stop_rx.clone()))).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent = Arc::new(AtomicU64::new(0));
        let pubs: Vec<_> = (0..args.publishers)
            .map(|i| tokio::spawn(publisher(mqtt, i, args.clone(), stop_tx.clone(), sent.clone())))
            .collect();
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
        measure_from.store(now_us(), Ordering::Relaxed);
        let sent_before = sent.load(Ordering::Relaxed);
        let cpu_before = server.as_ref().and_then(|s| proc_stats(s.child.id()));
        let t0 = Instant::now();
        // Sample the server's RSS every 5 s: growth over a long run shows up here.
        let mut rss_samples = Vec::new();
        while t0.elapsed() < Duration::from_secs(args.duration) {
            let left = Duration::from_secs(args.duration).saturating_sub(t0.elapsed());
            tokio::time::sleep(left.min(Duration::from_secs(5))).await;
            if let Some((_, rss)) = server.as_ref().and_then(|s| proc_stats(s.child.id())) {
                rss_samples.push(rss / 1024);
            }
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let sent_measured = sent.load(Ordering::Relaxed) - sent_before;
        let cpu_after = server.as_ref().and_then(|s| proc_stats(s.child.id()));
        stop_tx.store(true, Ordering::Relaxed);
        for p in pubs {
            let _ = p.await;
        }
        // Let the last messages arrive before the receivers stop.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop_rx.store(true, Ordering::Relaxed);
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        let (mut total, mut measured) = (0, 0);
        for r in receivers {
            let (h, t, m) = r.await.unwrap();
            hist.add(h).unwrap();
            total += t;
            measured += m;
        }
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let mut report = json!({
            "target": {"mqtt": mqtt.to_string(), "http": http.to_string(), "spawned": server.is_some()},
            "config": {"rate": args.rate, "devices": args.devices, "publishers": args.publishers,
                       "receivers": args.receivers, "qos": args.qos, "duration_s": args.duration},
            "sent_msgs": sent.load(Ordering::Relaxed),
            "sent_per_s": (sent_measured as f64 / elapsed).round(),
            "delivered_updates": total,
            "delivered_per_s_per_receiver": (measured as f64 / elapsed / args.receivers.max(1) as f64).round(),
            "delivered_per_s_total": (measured as f64 / elapsed).round(),
            "latency_ms": {"p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99), "max": hist.max() as f64 / 1000.0, "samples": hist.len()},
        });
        if let (Some((c0, _)), Some((c1, rss))) = (cpu_before, cpu_after) {
            report["server"] = json!({
                "cpu_cores_used": ((c1 - c0) / elapsed * 100.0).round() / 100.0,
                "rss_mib": rss / 1024,
                "rss_mib_every_5s": rss_samples,
            });
        }
        report
    });
    if let Some(s) = server {
        s.stop();
    }
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, text).unwrap();
    }
}
