//! Fanout-scale load generator: many authenticated WebSocket dashboards, each watching its own
//! devices, fed by MQTT publishers; reports delivery rate, device->client latency and what the
//! connections cost the server (RSS per connection, CPU).
//!
//! The clients and publishers live in this process; the server in its own: a child `iotpipe dev`
//! (started with a generated `[fanout.auth]` HS256 secret) or, with `--http/--mqtt/--secret`, any
//! running deployment (add `--server-pid` to also read its CPU and RSS from /proc).
//!
//! Scenarios (every size can be changed by a flag):
//! - `a`: 10,000 users `u00000..`, each owning 10 devices `d<user>-<k>` (100,000 devices), one
//!   connection per user subscribed to its own devices; each device reports every `--interval`
//!   seconds, spread evenly: 10,000 records/s in, 10,000 deliveries/s out.
//! - `b`: 1,000 hot devices `h00000..` (groups `g0..g99` of 10), 1 msg/s each; client `i` holds
//!   a token with `groups: ["g{i%100}"]` and subscribes to that group: 100 watchers per device,
//!   100,000 deliveries/s offered.
//! - `c`: `b`'s topology, the per-device rate raised by `--step-factor` every `--step-duration`
//!   seconds until p99 > `--max-p99-ms` or deliveries fall below 90 % of offered; reports every
//!   step and the highest one that held.
//!
//! `--publish-only` registers scenario A's devices and publishes its traffic without opening any
//! WebSocket, for an external client such as `benches/k6/scenario_a.js`. `--no-auth` skips the
//! registration and the tokens (for a server without `[fanout.auth]`).
//!
//! Latency is measured from the `sent_us` stamp the publisher puts in each payload to the moment
//! the client task has the `update` frame; both clocks are this process's.
//!
//! ```text
//! scripts/loadtest.sh --scenario a                        # 10k clients, 600 s
//! cargo bench --bench fanout_load -- --scenario b --duration 60
//! cargo bench --bench fanout_load -- --scenario c --json-out c.json
//! cargo bench --bench fanout_load -- --scenario a --clients 500 --duration 20 --no-auth
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use common::{now_us, proc_stats, start_server};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    A,
    B,
    C,
}

#[derive(Debug, Parser)]
#[command(about = "iotpipe fanout-scale load generator (WebSocket clients x MQTT devices)")]
struct Args {
    /// a: 10k users x 10 own devices; b: 1k hot devices x 100 watchers; c: b with a rate ramp.
    #[arg(long, value_enum, default_value = "a")]
    scenario: Scenario,
    /// HTTP address of a running target (with --mqtt); omitted: start a child `iotpipe dev`.
    #[arg(long, requires = "mqtt")]
    http: Option<SocketAddr>,
    /// MQTT address of a running target (with --http).
    #[arg(long, requires = "http")]
    mqtt: Option<SocketAddr>,
    /// HS256 secret of a running target's `[fanout.auth]` (generated for a child server).
    #[arg(long, env = "IOTPIPE_LOAD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// PID of a running target, to read its CPU and RSS from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The iotpipe binary to start [default: the one cargo built with this bench].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// WebSocket clients [default: 10000].
    #[arg(long)]
    clients: Option<u64>,
    /// Devices each client subscribes to (a: devices each user owns; b/c: devices per group).
    #[arg(long, default_value_t = 10)]
    devices_per_client: u64,
    /// Hot devices (b/c); the groups are `devices / devices-per-client`.
    #[arg(long, default_value_t = 1000)]
    devices: u64,
    /// Seconds between two reports of one device (a).
    #[arg(long, default_value_t = 10.0)]
    interval: f64,
    /// Messages per second of each device (b).
    #[arg(long, default_value_t = 1.0)]
    rate_per_device: f64,
    /// Seconds of measurement [default: a 600, b 60].
    #[arg(long)]
    duration: Option<u64>,
    /// Seconds of publishing before the clients connect, not measured [default: a one interval, b/c 5].
    #[arg(long)]
    warmup: Option<u64>,
    /// Seconds between the last client settling and the start of the measurement.
    #[arg(long, default_value_t = 2)]
    settle: u64,
    /// Per-device rate of the first step (c).
    #[arg(long, default_value_t = 0.2)]
    start_rate: f64,
    /// Rate factor from one step to the next (c).
    #[arg(long, default_value_t = 1.5)]
    step_factor: f64,
    /// Measured seconds of each step (c).
    #[arg(long, default_value_t = 20)]
    step_duration: u64,
    /// Unmeasured seconds at the start of each step, for queues to reach the new rate (c).
    #[arg(long, default_value_t = 3)]
    step_settle: u64,
    /// Steps at most (c).
    #[arg(long, default_value_t = 30)]
    max_steps: u32,
    /// A step holds while its p99 stays at or below this (c).
    #[arg(long, default_value_t = 1000.0)]
    max_p99_ms: f64,
    /// New WebSocket connections per second.
    #[arg(long, default_value_t = 2000)]
    connect_rate: u64,
    /// Connections between TCP connect and their `subscribed` reply, at most.
    #[arg(long, default_value_t = 200)]
    connect_inflight: usize,
    /// MQTT publisher connections.
    #[arg(long, default_value_t = 8)]
    publishers: u64,
    /// MQTT QoS of the published messages (0 or 1).
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Topic template of the target.
    #[arg(long, default_value = "devices/{device_id}/telemetry")]
    topic_template: String,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Register no devices and send no token (a server without `[fanout.auth]`).
    #[arg(long)]
    no_auth: bool,
    /// Register scenario A's devices and publish its traffic; open no WebSocket (for k6).
    #[arg(long)]
    publish_only: bool,
    /// Write `BASE_URL=..`, `SECRET=..` and `MQTT=..` lines here once the devices are registered.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Who owns and watches what. Device and user names are shared with `benches/k6/scenario_a.js`.
struct Topology {
    scenario: Scenario,
    clients: u64,
    per_client: u64,
    devices: u64,
}

impl Topology {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let clients = args.clients.unwrap_or(10_000);
        let per_client = args.devices_per_client;
        if per_client == 0 || clients == 0 {
            bail!("--clients and --devices-per-client must be at least 1");
        }
        let scenario = if args.publish_only {
            Scenario::A
        } else {
            args.scenario
        };
        let devices = match scenario {
            Scenario::A => clients * per_client,
            Scenario::B | Scenario::C => {
                if !args.devices.is_multiple_of(per_client) {
                    bail!("--devices must be a multiple of --devices-per-client (whole groups)");
                }
                args.devices
            }
        };
        Ok(Self {
            scenario,
            clients,
            per_client,
            devices,
        })
    }

    fn groups(&self) -> u64 {
        self.devices / self.per_client
    }

    fn user(i: u64) -> String {
        format!("u{i:05}")
    }

    /// Device `j` of `0..devices`.
    fn device(&self, j: u64) -> String {
        match self.scenario {
            Scenario::A => format!("d{:05}-{}", j / self.per_client, j % self.per_client),
            Scenario::B | Scenario::C => format!("h{j:05}"),
        }
    }

    /// The indices of the devices client `i` subscribes to.
    fn client_devices(&self, i: u64) -> std::ops::Range<u64> {
        let first = match self.scenario {
            Scenario::A => i * self.per_client,
            Scenario::B | Scenario::C => (i % self.groups()) * self.per_client,
        };
        first..first + self.per_client
    }

    fn client_groups(&self, i: u64) -> Vec<String> {
        match self.scenario {
            Scenario::A => Vec::new(),
            Scenario::B | Scenario::C => vec![format!("g{}", i % self.groups())],
        }
    }

    /// The registry entry of device `j`: in A its user owns it; in B/C an owner no client is, so
    /// every subscription goes through a group.
    fn registration(&self, j: u64) -> Value {
        match self.scenario {
            Scenario::A => {
                json!({"device": self.device(j), "owner": Self::user(j / self.per_client), "groups": []})
            }
            Scenario::B | Scenario::C => json!({
                "device": self.device(j),
                "owner": "loadgen-owner",
                "groups": [format!("g{}", j / self.per_client)],
            }),
        }
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    tier: &'static str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
    admin: bool,
}

/// Mints the HS256 tokens: the key is built once, every client's token from it.
struct Signer {
    key: jsonwebtoken::EncodingKey,
    header: jsonwebtoken::Header,
}

impl Signer {
    fn new(secret: &str) -> anyhow::Result<Self> {
        Ok(Self {
            key: jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?,
            header: jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        })
    }

    fn token(&self, sub: &str, groups: &[String], admin: bool) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 2 * 3600;
        let claims = Claims {
            sub,
            exp,
            tier: "enterprise",
            groups,
            admin,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).expect("encode a JWT")
    }
}

fn random_secret() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 48)
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`): status and body. Enough
/// for registration and `/metrics`; avoids pulling an HTTP client into the benches.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Registers every device of the topology, 10,000 per request (the API's limit).
async fn register(http_addr: SocketAddr, topo: &Topology, admin: &str) -> anyhow::Result<u64> {
    let mut registered = 0;
    let mut j = 0;
    while j < topo.devices {
        let end = (j + 10_000).min(topo.devices);
        let devices: Vec<Value> = (j..end).map(|d| topo.registration(d)).collect();
        let body = json!({ "devices": devices }).to_string();
        let (status, reply) = http(
            http_addr,
            "POST",
            "/v1/admin/devices",
            Some(admin),
            Some(&body),
        )
        .await?;
        if status != 200 {
            bail!("POST /v1/admin/devices: {status} {reply}");
        }
        registered += serde_json::from_str::<Value>(&reply)
            .ok()
            .and_then(|v| v["registered"].as_u64())
            .unwrap_or(end - j);
        j = end;
    }
    Ok(registered)
}

/// The `iotpipe_ws_*` and `iotpipe_push_*` lines of `/metrics`, without histogram buckets.
async fn scrape_metrics(addr: SocketAddr, bearer: Option<&str>) -> Vec<String> {
    match http(addr, "GET", "/metrics", bearer, None).await {
        Ok((200, text)) => text
            .lines()
            .filter(|l| l.starts_with("iotpipe_ws_") || l.starts_with("iotpipe_push_"))
            .filter(|l| !l.contains("_bucket{"))
            .map(str::to_owned)
            .collect(),
        Ok((status, _)) => vec![format!("# GET /metrics answered {status}")],
        Err(e) => vec![format!("# GET /metrics failed: {e}")],
    }
}

const SHARDS: usize = 64;

/// What the clients of one shard received. Client `i` writes to shard `i % SHARDS`, so at 100k
/// deliveries/s each lock sees a few thousand short, mostly uncontended acquisitions per second;
/// a std Mutex is right because it is never held across an await.
struct Shard {
    hist: Histogram<u64>,
    /// Updates received while `measuring`.
    measured: u64,
    /// Updates received since the start.
    updates: u64,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()
}

#[derive(Default)]
struct Counts(Mutex<BTreeMap<String, u64>>);

impl Counts {
    fn bump(&self, key: impl Into<String>) {
        *self.0.lock().unwrap().entry(key.into()).or_default() += 1;
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap().clone()
    }
}

struct Stats {
    shards: Vec<Mutex<Shard>>,
    measuring: AtomicBool,
    /// Set before the clients are told to stop: closes after it are ours, not disconnects.
    stopping: AtomicBool,
    connected: AtomicU64,
    subscribed: AtomicU64,
    /// Open connections whose subscription was acknowledged: the watchers deliveries go to.
    subscribed_open: AtomicU64,
    open: AtomicU64,
    /// Clients done connecting (subscribed, failed, or timed out waiting for `subscribed`).
    settled: AtomicU64,
    partial_subscriptions: AtomicU64,
    snapshots: AtomicU64,
    connect_failures: Counts,
    errors: Counts,
    disconnects: Counts,
}

impl Stats {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        hist: new_hist(),
                        measured: 0,
                        updates: 0,
                    })
                })
                .collect(),
            measuring: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            connected: AtomicU64::new(0),
            subscribed: AtomicU64::new(0),
            subscribed_open: AtomicU64::new(0),
            open: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            partial_subscriptions: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            connect_failures: Counts::default(),
            errors: Counts::default(),
            disconnects: Counts::default(),
        }
    }

    fn record_update(&self, client: u64, sent_us: Option<u64>) {
        let now = now_us();
        let measuring = self.measuring.load(Ordering::Relaxed);
        let mut s = self.shards[client as usize % SHARDS].lock().unwrap();
        s.updates += 1;
        if measuring {
            s.measured += 1;
            if let Some(sent) = sent_us {
                s.hist.saturating_record(now.saturating_sub(sent).max(1));
            }
        }
    }

    /// Merges and resets the shards' window: (latency histogram, updates measured).
    fn take_window(&self) -> (Histogram<u64>, u64) {
        let mut hist = new_hist();
        let mut measured = 0;
        for shard in &self.shards {
            let mut s = shard.lock().unwrap();
            hist.add(&s.hist).unwrap();
            s.hist.reset();
            measured += std::mem::take(&mut s.measured);
        }
        (hist, measured)
    }

    fn updates(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().unwrap().updates).sum()
    }
}

/// `sent_us` of an `update` frame, found without parsing the frame: the server writes compact
/// JSON, so `"type":"update"` can only be the frame's type (quotes inside strings are escaped).
/// `Err(())` for any other frame.
#[allow(clippy::result_unit_err)]
fn update_sent_us(text: &str) -> Result<Option<u64>, ()> {
    if !text.contains(r#""type":"update""#) {
        return Err(());
    }
    let Some(at) = text.find(r#""sent_us":"#) else {
        return Ok(None);
    };
    let rest = &text[at + r#""sent_us":"#.len()..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    let num = rest[..end].trim();
    Ok(num
        .parse::<u64>()
        .ok()
        .or_else(|| num.parse::<f64>().ok().map(|f| f as u64)))
}

/// The fields of the rare frames (snapshot, subscribed, error) a client looks at.
#[derive(Deserialize)]
struct OtherFrame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    devices: Option<Vec<serde::de::IgnoredAny>>,
}

fn ws_error_kind(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(resp) => format!("http_{}", resp.status().as_u16()),
        tungstenite::Error::Io(e) => format!("io_{:?}", e.kind()),
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            "connection_closed".into()
        }
        tungstenite::Error::Protocol(p) => format!("protocol: {p}"),
        other => format!("other: {other}"),
    }
}

/// Small buffers: a client receives a few hundred bytes every few seconds, and 10,000 clients
/// with tungstenite's default 128 KiB read buffer would measure the generator, not the server.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

struct ClientCtx {
    http: SocketAddr,
    stats: Arc<Stats>,
    signer: Option<Signer>,
    topo: Topology,
}

/// One dashboard: connect, subscribe, then read until told to stop. The permit bounds the
/// handshakes in flight and is released once the server acknowledged the subscription.
async fn client(
    i: u64,
    ctx: Arc<ClientCtx>,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let stats = &ctx.stats;
    let mut permit = Some(permit);
    let settle = |permit: &mut Option<OwnedSemaphorePermit>| {
        if permit.take().is_some() {
            stats.settled.fetch_add(1, Ordering::Relaxed);
        }
    };
    let url = match &ctx.signer {
        Some(signer) => format!(
            "ws://{}/v1/ws?token={}",
            ctx.http,
            signer.token(&Topology::user(i), &ctx.topo.client_groups(i), false)
        ),
        None => format!("ws://{}/v1/ws", ctx.http),
    };
    let connect = async {
        let tcp = TcpStream::connect(ctx.http).await?;
        tcp.set_nodelay(true)?;
        tokio_tungstenite::client_async_with_config(url, tcp, Some(ws_config())).await
    };
    let mut ws = match tokio::time::timeout(Duration::from_secs(30), connect).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            stats.connect_failures.bump(ws_error_kind(&e));
            settle(&mut permit);
            return;
        }
        Err(_) => {
            stats.connect_failures.bump("timeout");
            settle(&mut permit);
            return;
        }
    };
    stats.connected.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    let devices: Vec<String> = ctx
        .topo
        .client_devices(i)
        .map(|d| ctx.topo.device(d))
        .collect();
    let requested = devices.len();
    let sub = json!({"op": "subscribe", "devices": devices}).to_string();
    drop(devices);
    let mut subscribed = false;
    if let Err(e) = ws.send(Message::text(sub)).await {
        stats
            .connect_failures
            .bump(format!("subscribe_send: {}", ws_error_kind(&e)));
        settle(&mut permit);
        stats.open.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let ack_deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(ack_deadline);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                break;
            }
            () = &mut ack_deadline, if permit.is_some() => {
                stats.errors.bump("subscribed_timeout");
                settle(&mut permit);
            }
            msg = ws.next() => {
                let gone = match msg {
                    Some(Ok(Message::Text(t))) => {
                        match update_sent_us(&t) {
                            Ok(sent) => stats.record_update(i, sent),
                            Err(()) => match serde_json::from_str::<OtherFrame>(&t) {
                                Ok(f) if f.kind == "snapshot" => {
                                    stats.snapshots.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(f) if f.kind == "subscribed" => {
                                    if f.devices.is_some_and(|d| d.len() < requested) {
                                        stats.partial_subscriptions.fetch_add(1, Ordering::Relaxed);
                                    }
                                    if !subscribed {
                                        subscribed = true;
                                        stats.subscribed.fetch_add(1, Ordering::Relaxed);
                                        stats.subscribed_open.fetch_add(1, Ordering::Relaxed);
                                    }
                                    settle(&mut permit);
                                }
                                Ok(f) if f.kind == "error" => {
                                    stats.errors.bump(f.code.unwrap_or_else(|| "no_code".into()));
                                }
                                Ok(f) => stats.errors.bump(format!("unexpected_frame_{}", f.kind)),
                                Err(_) => stats.errors.bump("unparsable_frame"),
                            },
                        }
                        None
                    }
                    Some(Ok(Message::Close(frame))) => Some(
                        frame.map_or_else(|| "close_without_code".to_owned(), |f| u16::from(f.code).to_string()),
                    ),
                    Some(Ok(_)) => None, // pings are answered by the library on the next read
                    Some(Err(e)) => Some(ws_error_kind(&e)),
                    None => Some("eof".to_owned()),
                };
                if let Some(why) = gone {
                    if !stats.stopping.load(Ordering::Relaxed) {
                        stats.disconnects.bump(why);
                    }
                    break;
                }
            }
        }
    }
    settle(&mut permit);
    stats.open.fetch_sub(1, Ordering::Relaxed);
    if subscribed {
        stats.subscribed_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts the clients at `rate` per second with at most `inflight` unsettled at once.
async fn connect_clients(
    ctx: Arc<ClientCtx>,
    rate: u64,
    inflight: usize,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let sem = Arc::new(Semaphore::new(inflight.max(1)));
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(ctx.topo.clients as usize);
    for i in 0..ctx.topo.clients {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate.max(1) as f64))
            .await;
        let permit = sem.clone().acquire_owned().await.unwrap();
        handles.push(tokio::spawn(client(i, ctx.clone(), permit, stop.clone())));
    }
    handles
}

/// Per-device publish rate (msg/s) as f64 bits, changed by scenario C between steps.
struct Rate(AtomicU64);

impl Rate {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
}

struct PubCtx {
    mqtt: SocketAddr,
    qos: QoS,
    rate: Rate,
    stop: AtomicBool,
    sent: AtomicU64,
    /// Messages not sent because the publisher fell more than a second behind.
    dropped: AtomicU64,
    mqtt_errors: AtomicU64,
}

/// Publishes to `topics` round robin, so each device reports every `1 / rate` seconds.
async fn publisher(idx: u64, topics: Vec<String>, ctx: Arc<PubCtx>) {
    let mut opts = MqttOptions::new(
        format!("fanout-load-pub-{idx}-{}", std::process::id()),
        ctx.mqtt.ip().to_string(),
        ctx.mqtt.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let poll_ctx = ctx.clone();
    // Runs until aborted: cancelling `poll` only at the very end keeps it out of the hot path.
    let poller = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                // After `stop` the error is our own disconnect.
                if !poll_ctx.stop.load(Ordering::Relaxed) {
                    poll_ctx.mqtt_errors.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    if topics.is_empty() {
        poller.abort();
        return;
    }
    let mut next = 0usize;
    let mut credit = 0.0f64;
    let mut last = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !ctx.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let now = Instant::now();
        let per_s = topics.len() as f64 * ctx.rate.get();
        credit += per_s * now.duration_since(last).as_secs_f64();
        last = now;
        // More than a second behind: drop the backlog rather than burst it.
        if credit > per_s + 1.0 {
            ctx.dropped
                .fetch_add((credit - per_s) as u64, Ordering::Relaxed);
            credit = per_s;
        }
        while credit >= 1.0 {
            let us = now_us();
            let payload = format!(
                r#"{{"ts":{},"sent_us":{us},"v":{}}}"#,
                us / 1000,
                next % 1000
            );
            if client
                .publish(topics[next].clone(), ctx.qos, false, payload)
                .await
                .is_err()
            {
                break;
            }
            next = (next + 1) % topics.len();
            credit -= 1.0;
            ctx.sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    poller.abort();
}

fn start_publishers(
    args: &Args,
    topo: &Topology,
    ctx: &Arc<PubCtx>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let n = args.publishers.max(1);
    (0..n)
        .map(|p| {
            let topics = (p..topo.devices)
                .step_by(n as usize)
                .map(|j| args.topic_template.replace("{device_id}", &topo.device(j)))
                .collect();
            tokio::spawn(publisher(p, topics, ctx.clone()))
        })
        .collect()
}

/// The soft `Max open files` of this process, from /proc.
fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// One measured window.
struct Window {
    elapsed: f64,
    sent: u64,
    measured: u64,
    hist: Histogram<u64>,
    server_cpu_percent: Option<f64>,
    loadgen_cpu_percent: Option<f64>,
    rss_samples_kib: Vec<u64>,
}

impl Window {
    fn latency_json(&self) -> Value {
        let ms = |v: u64| (v as f64 / 10.0).round() / 100.0;
        json!({
            "p50": ms(self.hist.value_at_quantile(0.5)),
            "p95": ms(self.hist.value_at_quantile(0.95)),
            "p99": ms(self.hist.value_at_quantile(0.99)),
            "p999": ms(self.hist.value_at_quantile(0.999)),
            "max": ms(self.hist.max()),
            "samples": self.hist.len(),
        })
    }

    fn p99_ms(&self) -> f64 {
        self.hist.value_at_quantile(0.99) as f64 / 1000.0
    }
}

struct Run {
    stats: Arc<Stats>,
    pubs: Arc<PubCtx>,
    server_pid: Option<u32>,
}

impl Run {
    fn rss(&self) -> Option<u64> {
        self.server_pid.and_then(proc_stats).map(|(_, rss)| rss)
    }

    /// Measures for `secs`, printing progress to stderr every 10 s.
    async fn measure(&self, secs: u64, label: &str) -> Window {
        let me = std::process::id();
        let sent0 = self.pubs.sent.load(Ordering::Relaxed);
        let cpu0 = self.server_pid.and_then(proc_stats);
        let gen0 = proc_stats(me);
        self.stats.take_window();
        self.stats.measuring.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let total = Duration::from_secs(secs);
        let mut rss_samples = Vec::new();
        let (mut last_t, mut last_sent, mut last_upd) = (t0, sent0, self.stats.updates());
        while t0.elapsed() < total {
            tokio::time::sleep(
                total
                    .saturating_sub(t0.elapsed())
                    .min(Duration::from_secs(10)),
            )
            .await;
            let (now, sent, upd) = (
                Instant::now(),
                self.pubs.sent.load(Ordering::Relaxed),
                self.stats.updates(),
            );
            let dt = now.duration_since(last_t).as_secs_f64().max(1e-3);
            let rss = self.rss();
            if let Some(rss) = rss {
                rss_samples.push(rss);
            }
            eprintln!(
                "[{label} t={:>4.0}s] open={} sent/s={:.0} deliveries/s={:.0} server_rss={}",
                t0.elapsed().as_secs_f64(),
                self.stats.open.load(Ordering::Relaxed),
                (sent - last_sent) as f64 / dt,
                (upd - last_upd) as f64 / dt,
                rss.map_or("?".into(), |r| format!("{} MiB", r / 1024)),
            );
            (last_t, last_sent, last_upd) = (now, sent, upd);
        }
        self.stats.measuring.store(false, Ordering::Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        let (hist, measured) = self.stats.take_window();
        let cpu = |before: Option<(f64, u64)>, after: Option<(f64, u64)>| {
            before
                .zip(after)
                .map(|((c0, _), (c1, _))| ((c1 - c0) / elapsed * 1000.0).round() / 10.0)
        };
        Window {
            elapsed,
            sent: self.pubs.sent.load(Ordering::Relaxed) - sent0,
            measured,
            hist,
            server_cpu_percent: cpu(cpu0, self.server_pid.and_then(proc_stats)),
            loadgen_cpu_percent: cpu(gen0, proc_stats(me)),
            rss_samples_kib: rss_samples,
        }
    }

    /// Deliveries per second the subscribed clients should get for `sent_per_s` records/s: each
    /// device reports at the same rate and each open subscribed client watches `per_client` of
    /// the `devices`, so deliveries = records x watches / devices.
    fn expected(&self, topo: &Topology, sent_per_s: f64) -> f64 {
        let watches = self.stats.subscribed_open.load(Ordering::Relaxed) * topo.per_client;
        sent_per_s * watches as f64 / topo.devices as f64
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

async fn run(
    args: &Args,
    topo: Topology,
    http_addr: SocketAddr,
    mqtt_addr: SocketAddr,
    secret: Option<String>,
    server_pid: Option<u32>,
) -> anyhow::Result<Value> {
    let signer = secret.as_deref().map(Signer::new).transpose()?;
    let admin = signer.as_ref().map(|s| s.token("loadgen-admin", &[], true));
    let rss_start = server_pid.and_then(proc_stats).map(|(_, r)| r);
    let mut report = json!({
        "scenario": format!("{:?}", topo.scenario).to_lowercase(),
        "target": {"http": http_addr.to_string(), "mqtt": mqtt_addr.to_string(),
                   "server_pid": server_pid, "auth": secret.is_some()},
    });

    let registration = if let Some(admin) = &admin {
        let t = Instant::now();
        let n = register(http_addr, &topo, admin).await?;
        eprintln!(
            "registered {n} devices in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        json!({"devices": n, "seconds": round1(t.elapsed().as_secs_f64())})
    } else {
        Value::Null
    };
    report["registration"] = registration;
    if let Some(path) = &args.ready_file {
        std::fs::write(
            path,
            format!(
                "BASE_URL=http://{http_addr}\nSECRET={}\nMQTT={mqtt_addr}\n",
                secret.as_deref().unwrap_or("")
            ),
        )?;
    }

    let per_device = match topo.scenario {
        Scenario::A => 1.0 / args.interval,
        Scenario::B => args.rate_per_device,
        Scenario::C => args.start_rate,
    };
    let pubs = Arc::new(PubCtx {
        mqtt: mqtt_addr,
        qos: if args.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        rate: Rate(AtomicU64::new(per_device.to_bits())),
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        mqtt_errors: AtomicU64::new(0),
    });
    let stats = Arc::new(Stats::new());
    let run = Run {
        stats: stats.clone(),
        pubs: pubs.clone(),
        server_pid,
    };
    let publishers = start_publishers(args, &topo, &pubs);
    let duration = args.duration.unwrap_or(if topo.scenario == Scenario::A {
        600
    } else {
        60
    });
    let warmup = args.warmup.unwrap_or(match topo.scenario {
        Scenario::A => args.interval.ceil() as u64,
        Scenario::B | Scenario::C => 5,
    });
    report["config"] = json!({
        "clients": topo.clients, "devices_per_client": topo.per_client, "devices": topo.devices,
        "groups": if topo.scenario == Scenario::A { Value::Null } else { json!(topo.groups()) },
        "per_device_rate": per_device, "duration_s": duration, "warmup_s": warmup,
        "connect_rate": args.connect_rate, "connect_inflight": args.connect_inflight,
        "publishers": args.publishers, "qos": args.qos, "publish_only": args.publish_only,
    });
    let records_offered = topo.devices as f64 * per_device;
    eprintln!(
        "publishing {records_offered:.0} records/s to {} devices; warm-up {warmup} s",
        topo.devices
    );
    tokio::time::sleep(Duration::from_secs(warmup)).await;

    if args.publish_only {
        let w = run.measure(duration, "publish-only").await;
        pubs.stop.store(true, Ordering::Relaxed);
        for p in publishers {
            let _ = p.await;
        }
        report["records_per_s_offered"] = json!(records_offered);
        report["records_per_s_sent"] = json!(round1(w.sent as f64 / w.elapsed));
        report["publish_dropped"] = json!(pubs.dropped.load(Ordering::Relaxed));
        report["mqtt_errors"] = json!(pubs.mqtt_errors.load(Ordering::Relaxed));
        report["server"] = json!({
            "cpu_percent": w.server_cpu_percent, "rss_kib_start": rss_start,
            "rss_kib_end": run.rss(), "rss_kib_samples": w.rss_samples_kib,
        });
        report["loadgen_cpu_percent"] = json!(w.loadgen_cpu_percent);
        report["server_metrics"] = json!(scrape_metrics(http_addr, admin.as_deref()).await);
        return Ok(report);
    }

    // Clients.
    if let Some(limit) = fd_limit() {
        if limit < topo.clients + 200 {
            eprintln!(
                "warning: the open-files limit is {limit}, below {} clients + 200; run through scripts/loadtest.sh or raise `ulimit -n`",
                topo.clients
            );
        }
    }
    let rss_before = run.rss();
    let ctx = Arc::new(ClientCtx {
        http: http_addr,
        stats: stats.clone(),
        signer,
        topo,
    });
    let topo = &ctx.topo;
    let (stop_tx, stop_rx) = watch::channel(false);
    let t_connect = Instant::now();
    let spawner = tokio::spawn(connect_clients(
        ctx.clone(),
        args.connect_rate,
        args.connect_inflight,
        stop_rx,
    ));
    let patience = Duration::from_secs(60 + topo.clients / args.connect_rate.max(1));
    let mut last_print = Instant::now();
    while stats.settled.load(Ordering::Relaxed) < topo.clients && t_connect.elapsed() < patience {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "connecting: {} connected, {} subscribed, {} failed",
                stats.connected.load(Ordering::Relaxed),
                stats.subscribed.load(Ordering::Relaxed),
                stats.connect_failures.snapshot().values().sum::<u64>()
            );
        }
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let handles = spawner.await?;
    let connected = stats.connected.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let rss_after_connect = run.rss();
    eprintln!(
        "{connected} of {} connected, {} subscribed in {connect_secs:.1} s",
        topo.clients,
        stats.subscribed.load(Ordering::Relaxed)
    );

    let mut windows = Vec::new();
    match topo.scenario {
        Scenario::A | Scenario::B => {
            let w = run.measure(duration, "measure").await;
            let sent_ps = w.sent as f64 / w.elapsed;
            report["records_per_s_offered"] = json!(round1(records_offered));
            report["records_per_s_sent"] = json!(round1(sent_ps));
            report["deliveries_per_s"] = json!(round1(w.measured as f64 / w.elapsed));
            report["deliveries_per_s_expected"] = json!(round1(run.expected(topo, sent_ps)));
            report["latency_ms"] = w.latency_json();
            windows.push(w);
        }
        Scenario::C => {
            let mut rate = args.start_rate;
            let mut steps = Vec::new();
            let mut best = Value::Null;
            let mut stop_reason = format!("reached --max-steps {}", args.max_steps);
            for step in 0..args.max_steps {
                pubs.rate.set(rate);
                tokio::time::sleep(Duration::from_secs(args.step_settle)).await;
                let w = run
                    .measure(args.step_duration, &format!("step {step}"))
                    .await;
                let offered_records = topo.devices as f64 * rate;
                let sent_ps = w.sent as f64 / w.elapsed;
                let offered = run.expected(topo, offered_records);
                let delivered = w.measured as f64 / w.elapsed;
                let p99 = w.p99_ms();
                let entry = json!({
                    "step": step, "per_device_rate": rate,
                    "records_per_s_offered": round1(offered_records),
                    "records_per_s_sent": round1(sent_ps),
                    "deliveries_per_s_offered": round1(offered),
                    "deliveries_per_s": round1(delivered),
                    "latency_ms": w.latency_json(),
                    "server_cpu_percent": w.server_cpu_percent,
                    "loadgen_cpu_percent": w.loadgen_cpu_percent,
                    "open_clients": stats.open.load(Ordering::Relaxed),
                });
                eprintln!("step {step}: {entry}");
                steps.push(entry.clone());
                windows.push(w);
                if p99 > args.max_p99_ms {
                    stop_reason = format!("step {step}: p99 {p99:.1} ms > {} ms", args.max_p99_ms);
                    break;
                }
                if delivered < 0.9 * offered {
                    stop_reason = format!(
                        "step {step}: {delivered:.0} deliveries/s < 90 % of {offered:.0} offered"
                    );
                    break;
                }
                best = entry;
                if sent_ps < 0.9 * offered_records {
                    stop_reason = format!(
                        "step {step}: the generator published {sent_ps:.0} of {offered_records:.0} records/s"
                    );
                    break;
                }
                rate *= args.step_factor;
            }
            report["steps"] = json!(steps);
            report["best_step"] = best;
            report["stop_reason"] = json!(stop_reason);
        }
    }

    let open_at_end = stats.open.load(Ordering::Relaxed);
    let rss_end = run.rss();
    let metrics = scrape_metrics(http_addr, admin.as_deref()).await;
    stats.stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    pubs.stop.store(true, Ordering::Relaxed);
    // One deadline for all: each client closes within 2 s of `stop`, and a stuck one must not
    // hold up the report (the runtime's shutdown drops what is left).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for h in handles {
        let _ = tokio::time::timeout_at(deadline, h).await;
    }
    for p in publishers {
        let _ = p.await;
    }

    let disconnects = stats.disconnects.snapshot();
    report["clients"] = json!({
        "requested": topo.clients,
        "connected": connected,
        "subscribed": stats.subscribed.load(Ordering::Relaxed),
        "open_at_end": open_at_end,
        "connect_seconds": round1(connect_secs),
        "connect_failures": stats.connect_failures.snapshot(),
        "partial_subscriptions": stats.partial_subscriptions.load(Ordering::Relaxed),
        "snapshots_received": stats.snapshots.load(Ordering::Relaxed),
    });
    report["disconnects_during_run"] = json!({
        "total": disconnects.values().sum::<u64>(),
        "by_code": disconnects,
    });
    report["errors_by_code"] = json!(stats.errors.snapshot());
    report["publish_dropped"] = json!(pubs.dropped.load(Ordering::Relaxed));
    report["mqtt_errors"] = json!(pubs.mqtt_errors.load(Ordering::Relaxed));
    let per_conn = rss_before
        .zip(rss_after_connect)
        .filter(|_| connected > 0)
        .map(|(b, a)| round1((a as f64 - b as f64) / connected as f64));
    let cpu: Vec<f64> = windows
        .iter()
        .filter_map(|w| w.server_cpu_percent)
        .collect();
    let gen_cpu: Vec<f64> = windows
        .iter()
        .filter_map(|w| w.loadgen_cpu_percent)
        .collect();
    report["server"] = json!({
        "rss_kib_start": rss_start,
        "rss_kib_before_clients": rss_before,
        "rss_kib_after_connect": rss_after_connect,
        "rss_kib_end": rss_end,
        "rss_per_connection_kib": per_conn,
        // Scenario C: one figure per step.
        "cpu_percent": if cpu.len() == 1 { json!(cpu[0]) } else { json!(cpu) },
        "rss_kib_samples": windows.iter().flat_map(|w| w.rss_samples_kib.iter().copied()).collect::<Vec<_>>(),
    });
    report["loadgen"] = json!({
        "cpu_percent": if gen_cpu.len() == 1 { json!(gen_cpu[0]) } else { json!(gen_cpu) },
        "rss_kib": proc_stats(std::process::id()).map(|(_, r)| r),
    });
    report["server_metrics"] = json!(metrics);
    Ok(report)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let topo = Topology::new(&args)?;
    let external = args.http.zip(args.mqtt);
    if external.is_some() && !args.no_auth && args.secret.is_none() {
        bail!("--http/--mqtt need --secret (the target's [fanout.auth] secret), or --no-auth");
    }
    let secret = (!args.no_auth).then(|| args.secret.clone().unwrap_or_else(random_secret));
    let server = match external {
        Some(_) => None,
        None => {
            let dir = tempfile::tempdir()?;
            let mut extra: Vec<&OsStr> = Vec::new();
            let config = dir.path().join("fanout-load.toml");
            if let Some(secret) = &secret {
                std::fs::write(
                    &config,
                    format!("[fanout.auth]\nmode = \"hs256\"\nsecret = \"{secret}\"\n"),
                )?;
                extra.extend([OsStr::new("--config"), config.as_os_str()]);
            }
            let bin = args
                .server_bin
                .clone()
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_iotpipe")));
            eprintln!("starting {} dev", bin.display());
            Some(start_server(Path::new(&bin), dir, &extra))
        }
    };
    let (http_addr, mqtt_addr) = external
        .or(server.as_ref().map(|s| (s.http, s.mqtt)))
        .context("no target")?;
    let server_pid = args.server_pid.or(server.as_ref().map(|s| s.child.id()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run(&args, topo, http_addr, mqtt_addr, secret, server_pid));
    // Let aborted tasks and closing sockets go before the server does.
    rt.shutdown_timeout(Duration::from_secs(2));
    if let Some(s) = server {
        s.stop();
    }
    let report = result?;
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, text)?;
    }
    Ok(())
}
