//! Fanout at scale, on `iotpipe dev` with authentication on: tokens (expired, forged, `alg=none`,
//! expiring while connected), the admin claim, the per-device ACL (randomized multi-user run:
//! every delivered frame belongs to its receiver), rate limits (429 + Retry-After, WS
//! `rate_limited`), the connection cap, the frame-size limit, and slow clients (bounded memory,
//! latest state after catching up, the deadline close).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{exp_in, jwt, metric, request_as, ws_with_token, Dev, Publisher};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const SECRET: &str = "fanout-test-secret-0123456789abcdef";

fn start(dir: &Path, extra_toml: &str) -> Dev {
    let cfg = dir.join("iotpipe.toml");
    std::fs::write(
        &cfg,
        format!(
            "[fanout.auth]\nmode = \"hs256\"\nsecret = \"{SECRET}\"\n{extra_toml}\n[rules]\nenabled = false\n"
        ),
    )
    .unwrap();
    Dev::start(&dir.join("data"), 0, &["--config", cfg.to_str().unwrap()])
}

fn token(user: &str, extra: Value) -> String {
    let mut claims = json!({"sub": user, "exp": exp_in(3600)});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    jwt(SECRET, &claims)
}

fn admin() -> String {
    token("root", json!({"admin": true, "tier": "enterprise"}))
}

async fn register(addr: SocketAddr, devices: &[(&str, &str, &[&str])]) {
    let body = json!({"devices": devices.iter().map(|(d, o, g)| json!({"device": d, "owner": o, "groups": g})).collect::<Vec<_>>()});
    let (status, _, v) = request_as(addr, &admin(), "POST", "/v1/admin/devices", Some(&body)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["registered"], devices.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_admin_claim_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start(dir.path(), "");
    let addr = dev.http;
    register(addr, &[("a-1", "alice", &[])]).await;

    // No token, expired, forged, alg=none, wrong algorithm: 401 on REST and on the WebSocket.
    let (status, v) = common::http(addr, "GET", "/v1/devices", None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{v}"
    );
    let expired = jwt(SECRET, &json!({"sub": "alice", "exp": exp_in(-120)}));
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "exp": exp_in(60), "admin": true}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-server-secret-0123456789abc").unwrap(),
    )
    .unwrap();
    let b64 = |v: Value| {
        use std::fmt::Write;
        // base64url without padding, enough for a test.
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = v.to_string().into_bytes();
        let mut out = String::new();
        for c in bytes.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..=c.len() {
                write!(out, "{}", T[((n >> (18 - 6 * i)) & 63) as usize] as char).unwrap();
            }
        }
        out
    };
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": "alice", "exp": exp_in(60), "admin": true}))
    );
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"sub": "alice", "exp": exp_in(60)}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    for (name, bad) in [
        ("expired", &expired),
        ("forged", &forged),
        ("alg=none", &none),
        ("HS512", &hs512),
    ] {
        let (status, _, v) = request_as(addr, bad, "GET", "/v1/devices", None).await;
        assert_eq!(status, 401, "{name}: {v}");
        assert_eq!(ws_with_token(addr, bad).await.err(), Some(401), "{name}");
    }
    assert_eq!(ws_with_token(addr, "").await.err(), Some(401));

    // The admin claim gates the registry and dead letters; a user sees their own devices.
    let alice = token("alice", json!({}));
    for path in ["/v1/admin/devices", "/v1/dead-letters"] {
        let (status, _, v) = request_as(addr, &alice, "GET", path, None).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{path}"
        );
        assert_eq!(
            request_as(addr, &admin(), "GET", path, None).await.0,
            200,
            "{path}"
        );
    }
    let (status, _, v) = request_as(
        addr,
        &alice,
        "PUT",
        "/v1/admin/devices/x-1",
        Some(&json!({"owner": "alice"})),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    // Info stays public (the dashboard reads it before it has a token).
    assert_eq!(common::http(addr, "GET", "/v1/info", None).await.0, 200);

    // A connection whose token expires is closed with 4001.
    let short = jwt(SECRET, &json!({"sub": "alice", "exp": exp_in(2)}));
    let mut ws = ws_with_token(addr, &short).await.unwrap();
    ws.send(json!({"op": "subscribe", "devices": ["a-1"]}))
        .await;
    ws.next_of("subscribed").await;
    let code = loop {
        match ws.next().await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(4001));
    assert_eq!(
        metric(addr, "iotpipe_ws_closes_total{reason=\"token_expired\"}").await,
        1.0
    );
    dev.stop();
}

/// Many users, devices and groups, clients subscribing to their own, foreign, unknown and `*`;
/// random traffic; every frame any client receives must be about a device it may see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_multi_user_acl() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start(dir.path(), "");
    let addr = dev.http;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let users: Vec<String> = (0..5).map(|u| format!("user{u}")).collect();
    let groups = ["g-red", "g-blue"];
    // device -> (owner, groups)
    let mut acl: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for (u, user) in users.iter().enumerate() {
        for k in 0..3 {
            let g: Vec<String> = if rng.gen_bool(0.3) {
                vec![groups[rng.gen_range(0..2)].to_owned()]
            } else {
                vec![]
            };
            acl.insert(format!("u{u}-d{k}"), (user.clone(), g));
        }
    }
    let entries: Vec<(String, String, Vec<String>)> = acl
        .iter()
        .map(|(d, (o, g))| (d.clone(), o.clone(), g.clone()))
        .collect();
    let body = json!({"devices": entries.iter().map(|(d, o, g)| json!({"device": d, "owner": o, "groups": g})).collect::<Vec<_>>()});
    assert_eq!(
        request_as(addr, &admin(), "POST", "/v1/admin/devices", Some(&body))
            .await
            .0,
        200
    );
    let all_devices: Vec<String> = acl.keys().cloned().chain(["stray-1".to_owned()]).collect();

    struct Client {
        user: String,
        groups: Vec<String>,
        ws: common::Ws,
    }
    let may_see =
        |acl: &HashMap<String, (String, Vec<String>)>, user: &str, ugroups: &[String], d: &str| {
            acl.get(d)
                .is_some_and(|(o, g)| o == user || g.iter().any(|x| ugroups.contains(x)))
        };
    let mut clients = Vec::new();
    for (i, u) in users.iter().enumerate() {
        for c in 0..2 {
            let ugroups: Vec<String> = if (i + c) % 3 == 0 {
                vec![groups[c % 2].to_owned()]
            } else {
                vec![]
            };
            let mut ws = ws_with_token(addr, &token(u, json!({"groups": ugroups})))
                .await
                .unwrap();
            // Half subscribe to `*`, half name random devices (their own, foreign, unknown).
            let named: Vec<String> = if c == 0 {
                vec!["*".to_owned()]
            } else {
                let mut v: Vec<String> = (0..5)
                    .map(|_| all_devices[rng.gen_range(0..all_devices.len())].clone())
                    .chain([format!("u{i}-d0"), "no-such-device".to_owned()])
                    .collect();
                v.sort();
                v.dedup();
                v
            };
            ws.send(json!({"op": "subscribe", "devices": named})).await;
            // A refusal names exactly the devices the caller may not see, unknown or foreign alike.
            if c == 1 {
                let expected: BTreeSet<String> = named
                    .iter()
                    .filter(|d| !may_see(&acl, u, &ugroups, d))
                    .cloned()
                    .collect();
                let err = ws.next_of("error").await;
                assert_eq!(err["code"], "forbidden");
                assert_eq!(err["message"], "no such device, or not yours");
                let got: BTreeSet<String> = err["devices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_str().unwrap().to_owned())
                    .collect();
                assert_eq!(got, expected, "{u} {ugroups:?}");
            }
            let sub = ws.next_of("subscribed").await;
            assert!(sub["devices"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d == "*" || may_see(&acl, u, &ugroups, d.as_str().unwrap())));
            clients.push(Client {
                user: u.clone(),
                groups: ugroups,
                ws,
            });
        }
    }

    // Traffic to every device, the unregistered one included; one device registered mid-run.
    let mut p = Publisher::new(dev.mqtt, "acl-pub");
    let t0 = iotpipe_pipeline::time::now_ms();
    for n in 0..120 {
        if n == 60 {
            register(addr, &[("u0-late", "user0", &[])]).await;
            acl.insert("u0-late".into(), ("user0".into(), vec![]));
        }
        let d = if n >= 60 && n % 10 == 0 {
            "u0-late".to_owned()
        } else {
            all_devices[rng.gen_range(0..all_devices.len())].clone()
        };
        p.publish(
            &format!("devices/{d}/telemetry"),
            json!({"ts": t0 + n, "n": n}).to_string().as_bytes(),
            Duration::from_secs(10),
        )
        .await;
    }
    // Receive for a while; check every frame.
    let mut delivered = 0;
    let mut late_seen = false;
    for c in &mut clients {
        for f in c.ws.drain(Duration::from_millis(1500)).await {
            if let Some(d) = f["device"].as_str() {
                assert!(
                    may_see(&acl, &c.user, &c.groups, d),
                    "{} {:?} received a frame of {d}: {f}",
                    c.user,
                    c.groups
                );
                delivered += 1;
                late_seen |= d == "u0-late";
            }
        }
    }
    assert!(
        delivered > 50,
        "the run delivered too little to mean anything: {delivered}"
    );
    assert!(
        late_seen,
        "`*` covers a device registered after the subscription"
    );

    // REST answers the same way: unknown and foreign devices look alike.
    let u1 = token("user1", json!({}));
    let (s_foreign, _, foreign) =
        request_as(addr, &u1, "GET", "/v1/devices/u0-d0/latest", None).await;
    let (s_unknown, _, unknown) =
        request_as(addr, &u1, "GET", "/v1/devices/nope/latest", None).await;
    assert_eq!((s_foreign, &foreign), (s_unknown, &unknown));
    assert_eq!(s_foreign, 403);
    let (_, _, list) = request_as(addr, &u1, "GET", "/v1/devices", None).await;
    for d in list["devices"].as_array().unwrap() {
        assert!(
            may_see(&acl, "user1", &[], d["device"].as_str().unwrap()),
            "{d}"
        );
    }
    let (s, _, _) = request_as(addr, &u1, "GET", "/v1/devices/u0-d0/history", None).await;
    assert_eq!(s, 403);
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_connection_cap_and_frame_size() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start(
        dir.path(),
        "[fanout]\nmax_message_bytes = 2048\nmax_subscriptions_per_connection = 3\n[fanout.tiers]\nfree = { requests_per_minute = 60, burst = 3, subscribes_per_minute = 60, connections = 2 }\nenterprise = { requests_per_minute = 10000, burst = 1000, subscribes_per_minute = 6000, connections = 200 }\n",
    );
    let addr = dev.http;
    register(
        addr,
        &[
            ("a-1", "alice", &[]),
            ("a-2", "alice", &[]),
            ("a-3", "alice", &[]),
            ("a-4", "alice", &[]),
        ],
    )
    .await;
    let alice = token("alice", json!({}));

    // REST: a burst of 3, then 429 with Retry-After (60/min: one per second).
    for _ in 0..3 {
        assert_eq!(
            request_as(addr, &alice, "GET", "/v1/devices", None).await.0,
            200
        );
    }
    let (status, headers, v) = request_as(addr, &alice, "GET", "/v1/devices", None).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limited");
    assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"));
    // Another user (and another tier) is not affected.
    let bob = token("bob", json!({"tier": "enterprise"}));
    assert_eq!(
        request_as(addr, &bob, "GET", "/v1/devices", None).await.0,
        200
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        request_as(addr, &alice, "GET", "/v1/devices", None).await.0,
        200
    );

    // Connections: two per free user; the third upgrade is refused with 429.
    let mut ws1 = ws_with_token(addr, &alice).await.unwrap();
    let _ws2 = ws_with_token(addr, &alice).await.unwrap();
    assert_eq!(ws_with_token(addr, &alice).await.err(), Some(429));
    assert!(ws_with_token(addr, &bob).await.is_ok());

    // Subscriptions per connection: at most 3.
    ws1.send(json!({"op": "subscribe", "devices": ["a-1", "a-2", "a-3", "a-4"]}))
        .await;
    assert_eq!(ws1.next_of("error").await["code"], "too_many_subscriptions");
    // Subscribe requests: 60/min with a burst of 6; the one after the burst is rate limited.
    let mut limited = None;
    for _ in 0..7 {
        ws1.send(json!({"op": "subscribe", "devices": ["a-1"]}))
            .await;
        let f = ws1.next().await.unwrap();
        if f["type"] == "error" {
            limited = Some(f);
            break;
        }
    }
    let limited = limited.expect("the subscribe burst was never limited");
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    assert!(limited["retry_after_ms"].as_u64().unwrap() > 0);

    // A frame over max_message_bytes closes the connection with 1009.
    let big = json!({"op": "subscribe", "devices": ["x".repeat(3000)]}).to_string();
    ws1.send_text(big).await;
    let code = loop {
        match ws1.next().await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(1009));
    // The slot it held is free again.
    let _ws3 = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(ws) = ws_with_token(addr, &alice).await {
                break ws;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the closed connection's slot was not freed");
    assert!(metric(addr, "iotpipe_rate_limited_total{scope=\"rest\"}").await >= 1.0);
    assert!(
        metric(
            addr,
            "iotpipe_ws_rejected_total{reason=\"too_many_connections\"}"
        )
        .await
            >= 1.0
    );
    dev.stop();
}

/// A client that stops reading for 10 s: the server conflates instead of queueing (what it holds
/// for the client stays within the queue and one update per device), a reading client is not
/// delayed, and once the slow client reads again it gets the latest state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_costs_bounded_memory_and_then_gets_the_latest_state() {
    let dir = tempfile::tempdir().unwrap();

    let dev = start(dir.path(), "[fanout]\nqueue_capacity = 16\n");
    let addr = dev.http;
    register(addr, &[("s-1", "sam", &[]), ("s-2", "sam", &[])]).await;
    let sam = token("sam", json!({"tier": "enterprise"}));
    let mut slow = ws_with_token(addr, &sam).await.unwrap();
    slow.send(json!({"op": "subscribe", "devices": ["s-1", "s-2"]}))
        .await;
    slow.next_of("subscribed").await;
    let mut fast = ws_with_token(addr, &sam).await.unwrap();
    fast.send(json!({"op": "subscribe", "devices": ["s-1", "s-2"]}))
        .await;
    fast.next_of("subscribed").await;
    let blob = "x".repeat(32 * 1024);
    let mut p = Publisher::new(dev.mqtt, "slow-pub");
    let t0 = iotpipe_pipeline::time::now_ms();
    // Updates of 32 KiB over the two devices, `n` of them from index `from`.
    const N: i64 = 2000;
    async fn publish(p: &mut Publisher, blob: &str, t0: i64, from: i64, n: i64) {
        for i in from..from + n {
            p.publish(
                &format!("devices/s-{}/telemetry", 1 + i % 2),
                json!({"ts": t0 + i, "i": i, "blob": format!("{i}{blob}")})
                    .to_string()
                    .as_bytes(),
                Duration::from_secs(10),
            )
            .await;
        }
    }
    // Reads until the last update of both devices (up to seq-order index `last`) arrived.
    let reader = |mut ws: common::Ws, last: i64| {
        tokio::spawn(async move {
            let mut newest = [-1i64; 2];
            while newest[0] < last - 1 || newest[1] < last {
                let f = ws.next_of("update").await;
                let k = usize::from(f["device"] == "s-2");
                newest[k] = newest[k].max(f["changes"]["i"].as_i64().unwrap());
            }
            ws
        })
    };

    // The slow client stops reading for 10 s while 2,000 updates go out; the fast one keeps
    // reading and is not held up.
    let conflated_before = metric(addr, "iotpipe_ws_conflated_total").await;
    let (from, to) = (0, N);
    let stall_started = std::time::Instant::now();
    let fast_reader = reader(fast, to - 1);
    let mut peak = (0.0f64, 0.0f64);
    for chunk in 0..10 {
        publish(&mut p, &blob, t0, from + chunk * N / 10, N / 10).await;
        // What the server holds for its connections, sampled while the client stalls.
        peak.0 = peak.0.max(metric(addr, "iotpipe_ws_queued_updates").await);
        peak.1 = peak.1.max(metric(addr, "iotpipe_ws_pending_updates").await);
    }
    // The reading client has the last update of both devices within seconds of the last publish.
    tokio::time::timeout(Duration::from_secs(10), fast_reader)
        .await
        .expect("the fast client was held up by the slow one")
        .unwrap();
    let conflated = metric(addr, "iotpipe_ws_conflated_total").await - conflated_before;
    assert!(
        conflated > 1000.0,
        "updates were queued, not conflated: {conflated}"
    );
    // 64 MiB were offered to a client that read nothing: the server held at most a queue of 16
    // per connection and one merged update per device (the kernel's socket buffers took a few
    // MiB), not the backlog.
    assert!(peak.0 <= 32.0, "queued updates peaked at {}", peak.0);
    assert!(peak.1 <= 4.0, "pending updates peaked at {}", peak.1);
    let left = Duration::from_secs(10).saturating_sub(stall_started.elapsed());
    tokio::time::sleep(left).await;

    // Reading again: the latest state of both devices arrives, and the connection is still open.
    let frames = slow.drain(Duration::from_secs(3)).await;
    let mut newest: HashMap<String, i64> = HashMap::new();
    for f in &frames {
        if f["type"] == "update" {
            let i = f["changes"]["i"].as_i64().unwrap_or(-1);
            let e = newest
                .entry(f["device"].as_str().unwrap().to_owned())
                .or_insert(-1);
            *e = (*e).max(i);
        }
    }
    assert_eq!(
        newest.get("s-1"),
        Some(&(to - 2)),
        "{} frames",
        frames.len()
    );
    assert_eq!(newest.get("s-2"), Some(&(to - 1)));
    assert!(frames.len() < 500, "{} frames: not conflated", frames.len());
    assert_eq!(
        metric(addr, "iotpipe_ws_closes_total{reason=\"slow\"}").await,
        0.0
    );
    slow.send(json!({"op": "ping"})).await;
    assert_eq!(slow.next_of("pong").await["type"], "pong");
    // Caught up: nothing is held for anyone any more.
    assert_eq!(metric(addr, "iotpipe_ws_queued_updates").await, 0.0);
    assert_eq!(metric(addr, "iotpipe_ws_pending_updates").await, 0.0);
    dev.stop();
}

/// Past the slow-client deadline a client that is still behind is closed with 4002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_past_the_deadline_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start(dir.path(), "[fanout]\nqueue_capacity = 4\nslow_client_deadline = \"2s\"\nping_interval = \"1s\"\nidle_timeout = \"30s\"\n");
    let addr = dev.http;
    register(addr, &[("s-1", "sam", &[])]).await;
    let sam = token("sam", json!({}));
    let mut slow = ws_with_token(addr, &sam).await.unwrap();
    slow.send(json!({"op": "subscribe", "devices": ["s-1"]}))
        .await;
    slow.next_of("subscribed").await;
    let blob = "x".repeat(32 * 1024);
    let mut p = Publisher::new(dev.mqtt, "deadline-pub");
    let t0 = iotpipe_pipeline::time::now_ms();
    // Enough to fill the socket buffers and the queue, then keep the client behind.
    let started = std::time::Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(6) {
        p.publish(
            "devices/s-1/telemetry",
            json!({"ts": t0 + i, "i": i, "blob": format!("{i}{blob}")})
                .to_string()
                .as_bytes(),
            Duration::from_secs(10),
        )
        .await;
        i += 1;
    }
    let closed = common::poll_metric(
        addr,
        "iotpipe_ws_closes_total{reason=\"slow\"}",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(closed, 1.0, "published {i}");
    dev.stop();
}

/// The server pings; a client that answers (its library does, as long as it reads) stays, one
/// that sends nothing is closed after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_are_closed_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start(
        dir.path(),
        "[fanout]\nping_interval = \"500ms\"\nidle_timeout = \"2s\"\n",
    );
    let addr = dev.http;
    let t = token("ida", json!({}));
    let mut live = ws_with_token(addr, &t).await.unwrap();
    let _silent = ws_with_token(addr, &t).await.unwrap();
    // The live client keeps reading (and so answers pings) for 4 s: twice the idle timeout.
    let frames = live.drain(Duration::from_secs(4)).await;
    assert!(frames.is_empty(), "{frames:?}");
    live.send(json!({"op": "ping"})).await;
    assert_eq!(live.next_of("pong").await["type"], "pong");
    // The silent one (never read, so never answered a ping) was closed as idle.
    assert_eq!(
        metric(addr, "iotpipe_ws_closes_total{reason=\"idle\"}").await,
        1.0
    );
    assert_eq!(metric(addr, "iotpipe_ws_connections").await, 1.0);
    dev.stop();
}
