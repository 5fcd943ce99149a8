//! The control plane in `iotpipe dev`: the device registry (CLI and admin API), rules through the
//! API (422 with line:column), ownership enforced whatever a selector names, alarms per owner, and
//! webhooks signed, retried and dead-lettered without holding up evaluation.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{http, metric, Dev, Publisher};
use serde_json::{json, Value};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iotpipe"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_rules_api_and_ownership() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(&dir.path().join("data"), 0, &[]);
    let api = format!("http://{}", dev.http);

    for (d, owner, group) in [("a-1", "alice", None), ("b-1", "bob", Some("plant"))] {
        let mut args = vec!["devices", "register", d, "--owner", owner, "--api", &api];
        if let Some(g) = group {
            args.extend(["--group", g]);
        }
        let (ok, out) = cli(&args);
        assert!(ok, "{out}");
    }
    let (ok, out) = cli(&["devices", "list", "--owner", "bob", "--api", &api]);
    assert!(ok, "{out}");
    assert!(
        out.contains("b-1\tbob\tplant") && !out.contains("a-1"),
        "{out}"
    );
    let (s, v) = http(dev.http, "GET", "/v1/admin/devices/a-1", None).await;
    assert_eq!((s, v["owner"].as_str()), (200, Some("alice")));

    // A script that does not compile: 422 with where.
    let (s, v) = http(
        dev.http,
        "PUT",
        "/v1/rules/broken",
        Some(json!({"owner": "alice", "script": "let x = 1;\nif metrics.t > { }"})),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["code"], "compile_error");
    assert_eq!(v["error"]["line"], 2, "{v}");
    assert!(v["error"]["column"].as_u64().is_some(), "{v}");
    let (s, v) = http(
        dev.http,
        "PUT",
        "/v1/rules/x",
        Some(json!({"owner": "alice", "script": "clear()", "colour": "red"})),
    )
    .await;
    assert_eq!(s, 400, "unknown fields are refused: {v}");

    // Alice's rule names bob's device and an unregistered one: it sees only hers.
    let (s, v) = http(
        dev.http,
        "PUT",
        "/v1/rules/alice-hot",
        Some(json!({
            "owner": "alice",
            "selector": {"devices": ["a-1", "b-1", "z-1"]},
            "script": "if (metrics.t ?? 0) > 30 { alert(`hot ${device}`) } else { clear() }",
            "notify": [{"url": "http://127.0.0.1:9/never", "secret": "s3cret"}]
        })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["version"].as_i64().unwrap() > 0);
    assert_eq!(
        v["notify"][0]["secret"], "********",
        "secrets are never shown"
    );
    let (_, list) = http(dev.http, "GET", "/v1/rules?owner=alice", None).await;
    assert_eq!(list["rules"].as_array().unwrap().len(), 1);
    let (_, list) = http(dev.http, "GET", "/v1/rules?owner=bob", None).await;
    assert_eq!(list["rules"], json!([]));

    let mut ws = dev.ws().await;
    ws.send(json!({"op": "subscribe", "devices": ["*"]})).await;
    assert_eq!(ws.next_of("subscribed").await["type"], "subscribed");
    let mut p = Publisher::new(dev.mqtt, "control-pub");
    let t0 = iotpipe_pipeline::time::now_ms() - 10_000;
    for (d, t) in [("b-1", 99), ("z-1", 99), ("a-1", 99)] {
        p.publish(
            &format!("devices/{d}/telemetry"),
            json!({"ts": t0, "t": t}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
    }
    let a = ws.next_of("alert").await;
    assert_eq!(
        (a["device"].as_str(), a["kind"].as_str()),
        (Some("a-1"), Some("raised"))
    );
    // Every record has been through the rules operator, and the rule ran on one of them.
    common::poll_until(dev.http, "/metrics", Duration::from_secs(10), |_, v| {
        v.as_str().unwrap_or_default().lines().any(|l| {
            l.starts_with("iotpipe_operator_records_total{operator=\"rules\"}")
                && l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) >= Some(3.0)
        })
    })
    .await;
    assert_eq!(
        metric(
            dev.http,
            "iotpipe_rule_evaluations_total{rule=\"alice-hot\"}"
        )
        .await,
        1.0
    );
    let alarms = dev
        .wait_for("/v1/alarms?owner=alice", |_, v| {
            v["alarms"].as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
    assert_eq!(alarms["alarms"][0]["device"], "a-1");
    let (_, bob) = http(dev.http, "GET", "/v1/alarms?owner=bob", None).await;
    assert_eq!(bob["alarms"], json!([]));

    // Re-registering b-1 to alice reaches the cached registry through the registry topic.
    let (ok, out) = cli(&[
        "devices", "register", "b-1", "--owner", "alice", "--api", &api,
    ]);
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.publish(
        "devices/b-1/telemetry",
        json!({"ts": t0 + 1000, "t": 99}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    let a = ws.next_of("alert").await;
    assert_eq!(a["device"], "b-1", "{a}");

    // Deleted: gone from the API and its alarms are forgotten.
    let (s, _) = http(dev.http, "DELETE", "/v1/rules/alice-hot", None).await;
    assert_eq!(s, 204);
    let (s, _) = http(dev.http, "GET", "/v1/rules/alice-hot", None).await;
    assert_eq!(s, 404);
    dev.wait_for("/v1/alarms", |_, v| v["alarms"] == json!([]))
        .await;
    let (ok, out) = cli(&["devices", "remove", "a-1", "--api", &api]);
    assert!(ok, "{out}");
    let (s, _) = http(dev.http, "GET", "/v1/admin/devices/a-1", None).await;
    assert_eq!(s, 404);
    dev.stop();
}

/// A webhook receiver: answers each request with the next status of `script` (the last one
/// repeats), or never answers when the status is 0; records what it received.
type Request = (std::collections::HashMap<String, String>, String);

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    async fn start(script: Vec<u16>) -> (Self, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = Self::default();
        let got = me.got.clone();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let status = script[n.min(script.len() - 1)];
                n += 1;
                let got = got.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read the head, then Content-Length bytes of body.
                    let (head, body) = loop {
                        let Ok(k) = s.read(&mut chunk).await else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..k]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len = head
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if body.len() >= len {
                                break (head.to_owned(), body.to_owned());
                            }
                        }
                    };
                    let headers = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect();
                    got.lock().unwrap().push((headers, body));
                    if status == 0 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .as_bytes(),
                        )
                        .await;
                });
            }
        });
        (me, addr)
    }

    fn requests(&self) -> Vec<Request> {
        self.got.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_dead_lettered_and_never_hold_up_rules() {
    let (flaky, flaky_addr) = Receiver::start(vec![500, 503, 200]).await;
    let (hung, hung_addr) = Receiver::start(vec![0]).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("hot.rhai"),
        format!(
            "// @webhook http://{flaky_addr}/hook s3cret\n// @webhook http://{hung_addr}/hook other\nif (metrics.t ?? 0) > 30 {{ alert(\"critical\", `hot ${{metrics.t}}`) }}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        rules.join("cold.rhai"),
        "if (metrics.t ?? 100) < 0 { alert(\"info\", \"cold\") }\n",
    )
    .unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[rules.webhooks]\ntimeout = \"1s\"\nmax_attempts = 3\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\n",
    )
    .unwrap();
    let dev = Dev::start(
        &dir.path().join("data"),
        0,
        &[
            "--rules-dir",
            rules.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let mut ws = dev.ws().await;
    ws.send(json!({"op": "subscribe", "devices": ["*"]})).await;
    ws.next_of("subscribed").await;
    let mut p = Publisher::new(dev.mqtt, "hook-pub");
    let t0 = iotpipe_pipeline::time::now_ms() - 10_000;
    p.publish(
        "devices/w-1/telemetry",
        json!({"ts": t0, "t": 40}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(ws.next_of("alert").await["text"], "hot 40");
    // While the hung webhook is still being retried, another rule raises and is pushed at once.
    let sent = std::time::Instant::now();
    p.publish(
        "devices/w-2/telemetry",
        json!({"ts": t0, "t": -5}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(ws.next_of("alert").await["text"], "cold");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );

    // The flaky target: 500, 503, then 200 — three signed attempts of the same event.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while flaky.requests().len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reqs = flaky.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    let now_s = iotpipe_pipeline::time::now_ms() / 1000;
    for (headers, body) in &reqs {
        let sig = &headers["x-iotpipe-signature"];
        assert!(
            iotpipe_operators::webhooks::verify("s3cret", sig, body.as_bytes(), now_s, 300),
            "bad signature {sig} for {body}"
        );
        assert!(!iotpipe_operators::webhooks::verify(
            "other",
            sig,
            body.as_bytes(),
            now_s,
            300
        ));
        assert_eq!(headers["x-iotpipe-event"], reqs[0].0["x-iotpipe-event"]);
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            (v["rule"].as_str(), v["kind"].as_str()),
            (Some("hot"), Some("raised"))
        );
    }
    // The hung target: three timed-out attempts, then a dead letter naming it.
    let letters = dev
        .wait_for("/v1/dead-letters", |_, v| {
            v["dead_letters"]
                .as_array()
                .is_some_and(|a| a.iter().any(|d| d["stage"] == "webhook"))
        })
        .await;
    let dl = letters["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["stage"] == "webhook")
        .unwrap()
        .clone();
    assert_eq!(dl["reason"], "webhook_failed");
    assert!(
        dl["detail"]
            .as_str()
            .unwrap()
            .contains(&hung_addr.to_string()),
        "{dl}"
    );
    assert_eq!(hung.requests().len(), 3);
    // Delivered once to the flaky one (after retries); no more attempts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(flaky.requests().len(), 3);
    dev.stop();
}
