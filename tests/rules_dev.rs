//! Rules in `iotpipe dev`: rule files in a directory raise alerts that reach WebSocket clients, and
//! a rule added while running takes effect without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::time::Duration;

use common::{Dev, Publisher, Ws};
use serde_json::json;

/// A rules directory holding `rules` (name, script).
fn rules_dir(dir: &std::path::Path, rules: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join("rules");
    std::fs::create_dir_all(&path).unwrap();
    for (name, script) in rules {
        std::fs::write(path.join(format!("{name}.rhai")), script).unwrap();
    }
    path
}

/// `iotpipe dev --rules-dir` on `data`, with a WebSocket client subscribed to every device.
async fn start(data: &std::path::Path, rules: &std::path::Path) -> (Dev, Ws) {
    let dev = Dev::start(data, 0, &["--rules-dir", rules.to_str().unwrap()]);
    let mut ws = dev.ws().await;
    ws.send(json!({"op": "subscribe", "devices": ["*"]})).await;
    assert_eq!(ws.next_of("subscribed").await["type"], "subscribed");
    (dev, ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_files_raise_alerts_and_reload_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_dir(
        dir.path(),
        &[(
            "hot",
            r#"if (metrics.t ?? 0) > 30 { alert("warning", `hot ${metrics.t}`) } else { clear() }"#,
        )],
    );
    let (dev, mut ws) = start(&dir.path().join("data"), &rules).await;

    let mut p = Publisher::new(dev.mqtt, "rules-pub");
    let t0 = iotpipe_pipeline::time::now_ms() - 10_000;
    p.publish(
        "devices/r-1/telemetry",
        json!({"ts": t0, "t": 35}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    let a = ws.next_of("alert").await;
    assert_eq!(
        (
            a["kind"].as_str(),
            a["rule"].as_str(),
            a["device"].as_str(),
            a["text"].as_str()
        ),
        (Some("raised"), Some("hot"), Some("r-1"), Some("hot 35"))
    );

    // A new rule file, and a broken one, while running.
    std::fs::write(
        rules.join("cold.rhai"),
        r#"if (metrics.t ?? 100) < 10 { alert("critical", "cold") }"#,
    )
    .unwrap();
    std::fs::write(rules.join("broken.rhai"), "if metrics.t > { }").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    p.publish(
        "devices/r-1/telemetry",
        json!({"ts": t0 + 1000, "t": 5}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let a = ws.next_of("alert").await;
        got.push((
            a["rule"].as_str().unwrap().to_owned(),
            a["kind"].as_str().unwrap().to_owned(),
        ));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("cold".to_owned(), "raised".to_owned()),
            ("hot".to_owned(), "cleared".to_owned())
        ]
    );
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_neither_re_raises_nor_forgets_an_active_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_dir(
        dir.path(),
        &[(
            "hot",
            r#"if (metrics.t ?? 0) > 30 { alert("warning", "hot") } else { clear() }"#,
        )],
    );
    let data = dir.path().join("data");
    let t0 = iotpipe_pipeline::time::now_ms() - 10_000;
    {
        let (dev, mut ws) = start(&data, &rules).await;
        let mut p = Publisher::new(dev.mqtt, "restart-pub");
        p.publish(
            "devices/r-2/telemetry",
            json!({"ts": t0, "t": 35}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(ws.next_of("alert").await["kind"], "raised");
        dev.stop();
    }
    let dev = Dev::start(&data, 0, &["--rules-dir", rules.to_str().unwrap()]);
    // Known as active right after the restart, before the device reports again.
    let (status, alarms) = dev.get("/v1/alarms").await;
    assert_eq!(status, 200);
    assert_eq!(
        alarms["alarms"].as_array().map(Vec::len),
        Some(1),
        "{alarms}"
    );
    assert_eq!(
        (
            alarms["alarms"][0]["rule"].as_str(),
            alarms["alarms"][0]["device"].as_str(),
            alarms["alarms"][0]["text"].as_str()
        ),
        (Some("hot"), Some("r-2"), Some("hot"))
    );
    let mut ws = dev.ws().await;
    ws.send(json!({"op": "subscribe", "devices": ["*"]})).await;
    assert_eq!(ws.next_of("subscribed").await["type"], "subscribed");
    let mut p = Publisher::new(dev.mqtt, "restart-pub2");
    p.publish(
        "devices/r-2/telemetry",
        json!({"ts": t0 + 1000, "t": 36}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    p.publish(
        "devices/r-2/telemetry",
        json!({"ts": t0 + 2000, "t": 20}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    // The first alert after the restart is the clear: the active alarm was neither raised again
    // nor forgotten.
    assert_eq!(ws.next_of("alert").await["kind"], "cleared");
    dev.wait_for("/v1/alarms", |_, v| {
        v["alarms"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_rule_fires_on_the_timer_when_a_device_stops_sending() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules_dir(
        dir.path(),
        &[(
            "silent",
            r#"if tick { if state.last != () && now - state.last > 2000 { alert("warning", "no data") } } else { state.last = ts; clear() }"#,
        )],
    );
    let (dev, mut ws) = start(&dir.path().join("data"), &rules).await;
    let mut p = Publisher::new(dev.mqtt, "silent-pub");
    let sent = std::time::Instant::now();
    p.publish(
        "devices/quiet-1/telemetry",
        json!({"t": 1}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    let a = ws
        .try_next_of("alert", Duration::from_secs(10))
        .await
        .expect("the silence alert");
    assert_eq!(
        (a["kind"].as_str(), a["text"].as_str(), a["device"].as_str()),
        (Some("raised"), Some("no data"), Some("quiet-1"))
    );
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "not before the device was silent for 2 s"
    );
    dev.stop();
}

/// Rewriting a rule file many times while records flow loses no record: the rule counts records
/// in its state and alerts exactly at the 300th, whichever version sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_loses_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let version = |v: u32| {
        format!("state.n = (state.n ?? 0) + 1;\nif state.n == 300 {{ alert(\"info\", `v{v} saw ${{state.n}}`) }}\n")
    };
    let rules = rules_dir(dir.path(), &[("count", &version(0))]);
    let (dev, mut ws) = start(&dir.path().join("data"), &rules).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rewriter = {
        let (rules, stop) = (rules.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut v = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Atomic replace, as editors do.
                let tmp = rules.join("count.tmp");
                std::fs::write(&tmp, version(v)).unwrap();
                std::fs::rename(&tmp, rules.join("count.rhai")).unwrap();
                v += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            v
        })
    };
    let mut p = Publisher::new(dev.mqtt, "reload-pub");
    let t0 = iotpipe_pipeline::time::now_ms() - 60_000;
    for i in 0..300 {
        p.publish(
            "devices/c-1/telemetry",
            json!({"ts": t0 + i, "i": i}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
        // Spread over about 4.5 s, so the directory is re-read several times mid-stream.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let a = ws.next_of("alert").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let versions = rewriter.join().unwrap();
    assert!(versions > 10, "the file was rewritten {versions} times");
    let text = a["text"].as_str().unwrap();
    assert!(text.ends_with(" saw 300"), "{a}");
    assert_ne!(text, "v0 saw 300", "no reload happened mid-stream");
    let reloads = dev
        .log()
        .lines()
        .filter(|l| l.contains("Rule file loaded") && l.contains("count"))
        .count();
    assert!(reloads >= 4, "only {reloads} reloads");
    dev.stop();
}
