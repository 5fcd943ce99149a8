//! Distributed mode end to end, against the real services `scripts/services.sh up` starts: tansu
//! (Kafka protocol), Redis, Mosquitto and DynamoDB Local. Endpoints come from `IOTPIPE_TEST_*`
//! variables with loopback defaults; every test uses its own topics, key prefix, table, MQTT topic
//! prefix and client ids, so runs can share the services.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{http_get_full, wait_until, ws_connect, Proc, Publisher};
use serde_json::json;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A config file whose every name is unique to this test run.
fn write_config(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let u = format!(
        "{name}{}x{}",
        std::process::id(),
        iotpipe_pipeline::time::now_ms()
    );
    let mqtt = env("IOTPIPE_TEST_MQTT", "127.0.0.1:1883");
    let prefix = format!("it{u}");
    let text = format!(
        r#"
[topics]
telemetry = "{u}.telemetry"
changes = "{u}.changes"
alerts = "{u}.alerts"
dead_letters = "{u}.dlq"
rules = "{u}.rules"
registry = "{u}.registry"

[ingest]
broker = "{mqtt}"
topic_template = "{prefix}/{{device_id}}/telemetry"
client_id = "ingest-{u}"

[server]
http_listen = "127.0.0.1:0"
history_cache_ttl = "30s"

[kafka]
brokers = "{kafka}"
group_prefix = "{u}."
client_id = "c{u}"
session_timeout = "6s"
max_poll_interval = "6s"
partitions = 3

[redis]
url = "{redis}"
key_prefix = "{u}:"

[dynamodb]
table = "t{u}"
devices_table = "d{u}"
endpoint = "{dynamo}"
region = "us-east-1"
"#,
        kafka = env("IOTPIPE_TEST_KAFKA", "127.0.0.1:9092"),
        redis = env("IOTPIPE_TEST_REDIS", "redis://127.0.0.1:6379"),
        dynamo = env("IOTPIPE_TEST_DYNAMODB", "http://127.0.0.1:8000"),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    (path, prefix)
}

fn aws_test_credentials() {
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
}

fn history_init(config: &Path, dir: &Path) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iotpipe"))
        .args(["history", "init", "--config", config.to_str().unwrap()])
        .stderr(std::fs::File::create(dir.join("init.log")).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "history init failed: {}",
        std::fs::read_to_string(dir.join("init.log")).unwrap_or_default()
    );
}

fn mqtt_addr() -> std::net::SocketAddr {
    env("IOTPIPE_TEST_MQTT", "127.0.0.1:1883").parse().unwrap()
}

/// The whole flow through `iotpipe all`, then through one process per operator.
async fn flow(fanout_http: std::net::SocketAddr, prefix: &str, device: &str) {
    let mut ws = ws_connect(fanout_http).await;
    ws.send(json!({"op": "subscribe", "devices": ["*"]})).await;
    assert_eq!(ws.next().await.unwrap()["type"], "subscribed");

    let mut p = Publisher::new(mqtt_addr(), &format!("pub-{prefix}"));
    let t0 = iotpipe_pipeline::time::now_ms() - 5_000;
    let topic = format!("{prefix}/{device}/telemetry");
    p.publish(
        &topic,
        json!({"ts": t0, "t": 1, "h": 50}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    let u1 = ws.next_of("update").await;
    assert_eq!(
        u1,
        json!({"type": "update", "device": device, "ts": t0, "seq": 1, "changes": {"t": 1, "h": 50}})
    );
    p.publish(
        &topic,
        json!({"ts": t0 + 1000, "t": 2, "h": 50})
            .to_string()
            .as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    let u2 = ws.next_of("update").await;
    assert_eq!(
        (u2["seq"].clone(), u2["changes"].clone()),
        (json!(2), json!({"t": 2}))
    );

    // Latest state from Redis.
    let latest = wait_until(
        fanout_http,
        &format!("/v1/devices/{device}/latest"),
        |s, v| s == 200 && v["seq"] == 2,
    )
    .await;
    assert_eq!(latest["state"], json!({"t": 2, "h": 50}));
    // History from DynamoDB, then from the Redis cache.
    let path = format!("/v1/devices/{device}/history?from={t0}&to={}", t0 + 1000);
    wait_until(fanout_http, &path, |_, v| {
        v["items"].as_array().map_or(0, Vec::len) == 2
    })
    .await;
    let path2 = format!(
        "/v1/devices/{device}/history?from={t0}&to={}&order=desc",
        t0 + 1000
    );
    let (s1, h1, b1) = http_get_full(fanout_http, &path2).await;
    let (s2, h2, b2) = http_get_full(fanout_http, &path2).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(h1.get("x-cache").map(String::as_str), Some("MISS"));
    assert_eq!(h2.get("x-cache").map(String::as_str), Some("HIT"));
    assert_eq!(b1, b2);
    assert_eq!(b1["items"][0]["metrics"], json!({"t": 2, "h": 50}));

    // Bad input becomes a dead letter with its reason.
    p.publish(&topic, b"{not json", Duration::from_secs(10))
        .await;
    let letters = wait_until(fanout_http, "/v1/dead-letters", |_, v| {
        v["dead_letters"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(letters["dead_letters"][0]["reason"], "invalid_json");
    assert_eq!(letters["dead_letters"][0]["device"], device);

    // A snapshot for a late subscriber comes from Redis.
    let mut ws2 = ws_connect(fanout_http).await;
    ws2.send(json!({"op": "subscribe", "devices": [device]}))
        .await;
    let snap = ws2.next().await.unwrap();
    assert_eq!(snap["state"], json!({"t": 2, "h": 50}));
    assert_eq!(snap["seq"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_in_one_process_on_kafka_redis_dynamodb() {
    aws_test_credentials();
    let dir = tempfile::tempdir().unwrap();
    let (config, prefix) = write_config(dir.path(), "all");
    history_init(&config, dir.path());
    let mut all = Proc::spawn(
        &["all", "--config", config.to_str().unwrap()],
        &dir.path().join("all.log"),
    );
    let http = all.wait_for_addr("HTTP on");
    wait_until(http, "/readyz", |s, _| s == 200).await;
    flow(http, &prefix, "dist-1").await;
    let (_, metrics) = common::http_get(http, "/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains("iotpipe_ingest_appended_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("iotpipe_history_rows_written_total 2"),
        "{metrics}"
    );
    all.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_per_operator() {
    aws_test_credentials();
    let dir = tempfile::tempdir().unwrap();
    let (config, prefix) = write_config(dir.path(), "split");
    history_init(&config, dir.path());
    let c = config.to_str().unwrap();
    let mut procs = Vec::new();
    let mut fanout_http = None;
    for role in ["fanout", "materialize", "history", "ingest"] {
        let mut p = Proc::spawn(
            &[role, "--config", c, "--http-listen", "127.0.0.1:0"],
            &dir.path().join(format!("{role}.log")),
        );
        let http = p.wait_for_addr("HTTP on");
        wait_until(http, "/readyz", |s, _| s == 200).await;
        let (status, _) = common::http_get(http, "/healthz").await;
        assert_eq!(status, 200);
        if role == "fanout" {
            fanout_http = Some(http);
        }
        procs.push(p);
    }
    flow(fanout_http.unwrap(), &prefix, "split-1").await;
    // Stop in pipeline order: ingest first, fanout last.
    while let Some(p) = procs.pop() {
        p.stop();
    }
}

/// While Redis is down nothing is committed and nothing is lost: records published during the
/// outage reach latest state and dashboards once Redis is back (the merge script is reloaded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_loses_nothing() {
    aws_test_credentials();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let redis_dir = dir.path().join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    let start_redis = || {
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&redis_dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/services.sh installs it)")
    };
    let mut redis = start_redis();
    let (config, prefix) = write_config(dir.path(), "outage");
    let text = std::fs::read_to_string(&config).unwrap();
    let redis_url = env("IOTPIPE_TEST_REDIS", "redis://127.0.0.1:6379");
    std::fs::write(
        &config,
        text.replace(
            &format!("url = \"{redis_url}\""),
            &format!("url = \"redis://127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    // Wait until the private Redis answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "private redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    history_init(&config, dir.path());
    let mut all = Proc::spawn(
        &["all", "--config", config.to_str().unwrap()],
        &dir.path().join("all.log"),
    );
    let http = all.wait_for_addr("HTTP on");
    wait_until(http, "/readyz", |s, _| s == 200).await;

    let mut ws = ws_connect(http).await;
    ws.send(json!({"op": "subscribe", "devices": ["out-1"]}))
        .await;
    assert_eq!(ws.next().await.unwrap()["type"], "subscribed");
    let mut p = Publisher::new(mqtt_addr(), &format!("pub-{prefix}"));
    let topic = format!("{prefix}/out-1/telemetry");
    let t0 = iotpipe_pipeline::time::now_ms() - 5_000;
    p.publish(
        &topic,
        json!({"ts": t0, "n": 1}).to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(ws.next_of("update").await["seq"], 1);

    // Redis goes away; ingest keeps appending to Kafka, materialize cannot write and retries.
    redis.kill().unwrap();
    redis.wait().unwrap();
    for n in 2..=4 {
        p.publish(
            &topic,
            json!({"ts": t0 + n, "n": n}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
    }
    wait_until(http, "/readyz", |s, v| {
        s == 503 && v.as_str().is_some_and(|t| t.contains("redis"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Redis is back (same data, empty script cache): every change arrives, in order, once.
    redis = start_redis();
    let mut seqs = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seqs.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "updates after the outage: {seqs:?}; log:\n{}",
            all.log()
        );
        // Retries back off up to 5 s and Kafka may rebalance: allow for it, frame by frame.
        if let Ok(u) = ws.try_next_of("update", Duration::from_secs(10)).await {
            seqs.push((
                u["seq"].as_u64().unwrap(),
                u["changes"]["n"].as_i64().unwrap(),
            ));
        }
    }
    assert_eq!(seqs, vec![(2, 2), (3, 3), (4, 4)]);
    let latest = wait_until(http, "/v1/devices/out-1/latest", |s, v| {
        s == 200 && v["seq"] == 4
    })
    .await;
    assert_eq!(latest["state"], json!({"n": 4}));
    wait_until(http, "/readyz", |s, _| s == 200).await;
    all.stop();
    let _ = redis.kill();
    let _ = redis.wait();
}

/// Two materialize processes share the telemetry partitions through their consumer group: both
/// do work, and every device's final state is right. Two fanout instances each consume every
/// change: a client on either gets all updates. Two fanout instances each see every change:
/// a client on either one gets all updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_materializers_share_the_partitions() {
    aws_test_credentials();
    let dir = tempfile::tempdir().unwrap();
    let (config, prefix) = write_config(dir.path(), "scale");
    history_init(&config, dir.path());
    let c = config.to_str().unwrap();
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for (i, role) in ["fanout", "materialize", "materialize", "ingest", "fanout"]
        .iter()
        .enumerate()
    {
        let mut p = Proc::spawn(
            &[role, "--config", c, "--http-listen", "127.0.0.1:0"],
            &dir.path().join(format!("{role}{i}.log")),
        );
        let http = p.wait_for_addr("HTTP on");
        addrs.push(http);
        procs.push(p);
    }
    for a in &addrs {
        wait_until(*a, "/readyz", |s, _| s == 200).await;
    }
    let mut clients = Vec::new();
    for fanout in [addrs[0], addrs[4]] {
        let mut ws = ws_connect(fanout).await;
        ws.send(json!({"op": "subscribe", "devices": ["*"]})).await;
        assert_eq!(ws.next().await.unwrap()["type"], "subscribed");
        clients.push(ws);
    }
    let mut p = Publisher::new(mqtt_addr(), &format!("pub-{prefix}"));
    let t0 = iotpipe_pipeline::time::now_ms() - 5_000;
    for d in 0..30 {
        let topic = format!("{prefix}/sc-{d}/telemetry");
        p.publish(
            &topic,
            json!({"ts": t0, "v": d}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
    }
    for d in 0..30 {
        let latest = wait_until(addrs[0], &format!("/v1/devices/sc-{d}/latest"), |s, _| {
            s == 200
        })
        .await;
        assert_eq!(latest["state"], json!({"v": d}));
    }
    // Both fanout instances pushed every device's change.
    for ws in &mut clients {
        let mut devices = std::collections::BTreeSet::new();
        while devices.len() < 30 {
            let u = ws.next_of("update").await;
            devices.insert(u["device"].as_str().unwrap().to_owned());
        }
    }
    let records = |m: &serde_json::Value| -> u64 {
        m.as_str()
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("iotpipe_operator_records_total{operator=\"materialize\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (_, m1) = common::http_get(addrs[1], "/metrics").await;
    let (_, m2) = common::http_get(addrs[2], "/metrics").await;
    let (a, b) = (records(&m1), records(&m2));
    // At least once: a rebalance may hand a batch to the other member before its commit.
    assert!(a + b >= 30, "every record merged: {a} + {b}");
    assert!(a > 0 && b > 0, "both members did work: {a} and {b}");
    while let Some(p) = procs.pop() {
        p.stop();
    }
}

/// Rules managed through the API reach the rules worker without a restart; ownership comes from
/// the registry; the alarm lives in Redis, so a restarted worker neither re-raises nor forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_from_the_api_reach_the_worker_and_alarms_survive_a_restart() {
    use common::http;
    aws_test_credentials();
    let dir = tempfile::tempdir().unwrap();
    let (config, prefix) = write_config(dir.path(), "rules");
    history_init(&config, dir.path());
    let start = |n: usize| {
        let mut p = Proc::spawn(
            &["all", "--config", config.to_str().unwrap()],
            &dir.path().join(format!("all{n}.log")),
        );
        let addr = p.wait_for_addr("HTTP on http://");
        (p, addr)
    };
    let (all, api) = start(1);
    wait_until(api, "/readyz", |s, _| s == 200).await;
    let (dev_a, dev_b) = (format!("{prefix}-a"), format!("{prefix}-b"));
    for (d, owner) in [(&dev_a, "alice"), (&dev_b, "bob")] {
        let (s, v) = http(
            api,
            "PUT",
            &format!("/v1/admin/devices/{d}"),
            Some(json!({"owner": owner})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = http(
        api,
        "PUT",
        "/v1/rules/hot",
        Some(json!({"owner": "alice", "script": "if (metrics.t ?? 0) > 30 { alert(`hot ${device}`) } else { clear() }"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = http(
        api,
        "PUT",
        "/v1/rules/broken",
        Some(json!({"owner": "alice", "script": "if metrics.t > { }"})),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["error"]["line"].as_u64() == Some(1), "{v}");
    // The rule reaches the running worker through the rules topic (no restart).
    wait_until(api, "/metrics", |_, m| {
        m.as_str()
            .is_some_and(|t| t.lines().any(|l| l == "iotpipe_rules_loaded 1"))
    })
    .await;

    let mut ws = ws_connect(api).await;
    ws.send(json!({"op": "subscribe", "devices": ["*"]})).await;
    assert_eq!(ws.next().await.unwrap()["type"], "subscribed");
    let mut p = Publisher::new(mqtt_addr(), &format!("pub-rules-{prefix}"));
    let t0 = iotpipe_pipeline::time::now_ms() - 5_000;
    let send = |d: &str, ts: i64, t: i64| {
        (
            format!("{prefix}/{d}/telemetry"),
            json!({"ts": ts, "t": t}).to_string(),
        )
    };
    // Bob's device first: alice's rule must never see it.
    for (topic, body) in [send(&dev_b, t0, 99), send(&dev_a, t0, 99)] {
        p.publish(&topic, body.as_bytes(), Duration::from_secs(10))
            .await;
    }
    let a = ws.next_of("alert").await;
    assert_eq!(
        (a["kind"].as_str(), a["device"].as_str(), a["rule"].as_str()),
        (Some("raised"), Some(dev_a.as_str()), Some("hot"))
    );
    let alarms = wait_until(api, "/v1/alarms?owner=alice", |_, v| {
        v["alarms"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    assert_eq!(alarms["alarms"][0]["device"], dev_a.as_str());
    let (_, bob) = http(api, "GET", "/v1/alarms?owner=bob", None).await;
    assert_eq!(bob["alarms"], json!([]));
    all.stop();

    // Restarted: the rule is loaded from Redis, the alarm is still active.
    let (all, api) = start(2);
    wait_until(api, "/readyz", |s, _| s == 200).await;
    let mut ws = ws_connect(api).await;
    ws.send(json!({"op": "subscribe", "devices": ["*"]})).await;
    ws.next_of("subscribed").await;
    let (topic, body) = send(&dev_a, t0 + 1000, 98);
    p.publish(&topic, body.as_bytes(), Duration::from_secs(10))
        .await;
    let (topic, body) = send(&dev_a, t0 + 2000, 1);
    p.publish(&topic, body.as_bytes(), Duration::from_secs(10))
        .await;
    // Not raised again at 98; cleared at 1.
    let a = ws.next_of("alert").await;
    assert_eq!(a["kind"], "cleared", "{a}");
    wait_until(api, "/v1/alarms?owner=alice", |_, v| {
        v["alarms"] == json!([])
    })
    .await;

    // Removed through the API: the worker stops running it, without a restart.
    let (s, _) = http(api, "DELETE", "/v1/rules/hot", None).await;
    assert_eq!(s, 204);
    let (s, _) = http(api, "GET", "/v1/rules/hot", None).await;
    assert_eq!(s, 404);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (topic, body) = send(&dev_a, t0 + 3000, 99);
    p.publish(&topic, body.as_bytes(), Duration::from_secs(10))
        .await;
    assert!(
        ws.try_next_of("alert", Duration::from_secs(4))
            .await
            .is_err(),
        "a removed rule raised an alert"
    );
    all.stop();
}

/// A dashboard that reconnects to *another* fanout instance with `since` gets exactly the updates
/// it missed from that instance's resume buffer; when the gap is older than the buffer, a fresh
/// snapshot. Authentication and the ACL hold on both instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_since_on_another_fanout_instance() {
    use common::{exp_in, jwt, ws_with_token};
    const SECRET: &str = "distributed-test-secret-0123456789abcdef";
    aws_test_credentials();
    let dir = tempfile::tempdir().unwrap();
    let (config, prefix) = write_config(dir.path(), "resume");
    history_init(&config, dir.path());
    let base = std::fs::read_to_string(&config).unwrap();
    let auth = format!(
        "\n[fanout]\nresume_buffer = 8\n\n[fanout.auth]\nmode = \"hs256\"\nsecret = \"{SECRET}\"\n"
    );
    let mut procs = Vec::new();
    let mut fanouts = Vec::new();
    for (role, instance) in [
        ("fanout", "f1"),
        ("fanout", "f2"),
        ("materialize", "m"),
        ("ingest", "i"),
    ] {
        let cfg = dir.path().join(format!("{instance}.toml"));
        let text = base.replace(
            "[server]\n",
            &format!("[server]\ninstance_id = \"{prefix}-{instance}\"\n"),
        );
        std::fs::write(&cfg, format!("{text}{auth}")).unwrap();
        let mut p = Proc::spawn(
            &[
                role,
                "--config",
                cfg.to_str().unwrap(),
                "--http-listen",
                "127.0.0.1:0",
            ],
            &dir.path().join(format!("{instance}.log")),
        );
        let http = p.wait_for_addr("HTTP on");
        wait_until(http, "/readyz", |s, _| s == 200).await;
        if role == "fanout" {
            fanouts.push(http);
        }
        procs.push(p);
    }
    let (f1, f2) = (fanouts[0], fanouts[1]);
    let admin = jwt(
        SECRET,
        &json!({"sub": "ops", "admin": true, "exp": exp_in(600)}),
    );
    let rita = jwt(SECRET, &json!({"sub": "rita", "exp": exp_in(600)}));
    let bob = jwt(SECRET, &json!({"sub": "bob", "exp": exp_in(600)}));
    let device = format!("{prefix}-r");
    let warm = format!("{prefix}-w");
    let body = json!({"devices": [{"device": device, "owner": "rita"}, {"device": warm, "owner": "rita"}]});
    let (s, _, v) = common::request_as(f1, &admin, "POST", "/v1/admin/devices", Some(&body)).await;
    assert_eq!(s, 200, "{v}");

    // Both instances consume the change stream: each delivers a warm-up update.
    let mut p = Publisher::new(mqtt_addr(), &format!("pub-{prefix}"));
    let t0 = iotpipe_pipeline::time::now_ms() - 60_000;
    let mut n = 0i64;
    let mut publish = |d: String| {
        n += 1;
        (
            format!("{prefix}/{d}/telemetry"),
            json!({"ts": t0 + n, "n": n}).to_string(),
        )
    };
    let mut watchers = Vec::new();
    for f in [f1, f2] {
        let mut ws = ws_with_token(f, &rita).await.unwrap();
        ws.send(json!({"op": "subscribe", "devices": [warm]})).await;
        ws.next_of("subscribed").await;
        watchers.push(ws);
    }
    let (topic, payload) = publish(warm.clone());
    p.publish(&topic, payload.as_bytes(), Duration::from_secs(10))
        .await;
    for ws in &mut watchers {
        assert_eq!(ws.next_of("update").await["device"], json!(warm));
    }

    for w in &mut watchers {
        w.send(json!({"op": "subscribe", "devices": [device]}))
            .await;
        w.next_of("subscribed").await;
    }
    // On f1: seqs 1..=3, then the dashboard goes away.
    let mut ws = ws_with_token(f1, &rita).await.unwrap();
    ws.send(json!({"op": "subscribe", "devices": [device]}))
        .await;
    ws.next_of("subscribed").await;
    for _ in 0..3 {
        let (topic, payload) = publish(device.clone());
        p.publish(&topic, payload.as_bytes(), Duration::from_secs(10))
            .await;
    }
    ws.until_seq(3).await;
    drop(ws);
    // Missed while away: 4..=7.
    for _ in 0..4 {
        let (topic, payload) = publish(device.clone());
        p.publish(&topic, payload.as_bytes(), Duration::from_secs(10))
            .await;
    }
    // f2 has published seq 7 (so its buffer holds it): its watcher saw it.
    watchers[1].until_seq(7).await;

    // Reconnect to f2 with since=3: exactly 4, 5, 6, 7, replayed.
    let mut ws = ws_with_token(f2, &rita).await.unwrap();
    ws.send(json!({"op": "subscribe", "devices": [device], "since": {device.clone(): 3}}))
        .await;
    let mut seqs = Vec::new();
    let subscribed = loop {
        let f = ws.next().await.unwrap();
        match f["type"].as_str() {
            Some("update") => seqs.push(f["seq"].as_u64().unwrap()),
            Some("subscribed") => break f,
            other => panic!("unexpected {other:?}: {f}"),
        }
    };
    while seqs.last() != Some(&7) {
        seqs.push(ws.next_of("update").await["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, [4, 5, 6, 7]);
    assert_eq!(subscribed["resumed"][&device], "replayed", "{subscribed}");
    drop(ws);

    // Away for longer than the buffer holds (8): a snapshot with the newest state instead.
    for _ in 0..12 {
        let (topic, payload) = publish(device.clone());
        p.publish(&topic, payload.as_bytes(), Duration::from_secs(10))
            .await;
    }
    // f1 has published seq 19 (an instance that has not yet consumed a change answers "current"
    // and delivers it live, which is no gap either, but not what this step tests).
    watchers[0].until_seq(19).await;
    let mut ws = ws_with_token(f1, &rita).await.unwrap();
    ws.send(json!({"op": "subscribe", "devices": [device], "since": {device.clone(): 7}}))
        .await;
    let snap = ws.next().await.unwrap();
    assert_eq!(
        (snap["type"].as_str(), snap["seq"].as_u64()),
        (Some("snapshot"), Some(19)),
        "{snap}"
    );
    let subscribed = ws.next_of("subscribed").await;
    assert_eq!(subscribed["resumed"][&device], "snapshot");

    // Someone else cannot resume it, on either instance.
    for f in [f1, f2] {
        let mut ws = ws_with_token(f, &bob).await.unwrap();
        ws.send(json!({"op": "subscribe", "devices": [device], "since": {device.clone(): 0}}))
            .await;
        let e = ws.next().await.unwrap();
        assert_eq!(e["code"], "forbidden", "{e}");
    }
    while let Some(p) = procs.pop() {
        p.stop();
    }
}
