//! Shared helpers of the integration tests: start the real `iotpipe` binary on free ports, and
//! talk to it with real clients (MQTT, HTTP, WebSocket). No mocks.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A running `iotpipe dev`.
pub struct Dev {
    proc: Proc,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Dev {
    /// Starts `iotpipe dev` with its data in `data_dir`, MQTT on `mqtt_port` (0 = any).
    pub fn start(data_dir: &Path, mqtt_port: u16, extra: &[&str]) -> Self {
        let mqtt = format!("127.0.0.1:{mqtt_port}");
        let mut args = vec!["--http-listen", "127.0.0.1:0", "--mqtt-listen", &mqtt];
        args.extend_from_slice(extra);
        Self::spawn(data_dir, &args)
    }

    /// Starts `iotpipe dev` with exactly `args` after `--data-dir`.
    pub fn spawn(data_dir: &Path, args: &[&str]) -> Self {
        let dir = data_dir.to_str().unwrap();
        let mut all = vec!["dev", "--data-dir", dir];
        all.extend_from_slice(args);
        let mut proc = Proc::spawn(&all, &data_dir.with_extension("log"));
        // Printed in this order: the broker line, then the dashboard line.
        let mqtt = proc.wait_for_addr("MQTT broker:");
        let http = proc.wait_for_addr("Dashboard:");
        Self {
            proc,
            mqtt,
            http,
            data_dir: data_dir.to_owned(),
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(self) {
        self.proc.stop();
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        http_get(self.http, path).await
    }

    /// Polls `GET path` until `pred` holds or 10 s pass.
    pub async fn wait_for(&self, path: &str, pred: impl Fn(u16, &Value) -> bool) -> Value {
        poll_until(self.http, path, Duration::from_secs(10), pred).await
    }

    pub async fn ws(&self) -> Ws {
        ws_connect(self.http).await
    }
}

/// A minimal HTTP/1.1 GET (the API answers with Content-Length bodies): status, lowercase
/// headers, JSON body (or the body as a JSON string); `None` when nothing answers.
pub async fn try_get(
    addr: SocketAddr,
    path: &str,
) -> Option<(u16, std::collections::HashMap<String, String>, Value)> {
    try_request(addr, "GET", path, None).await
}

/// A minimal HTTP/1.1 request with an optional JSON body; as [`try_get`].
pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Option<(u16, std::collections::HashMap<String, String>, Value)> {
    try_request_with(addr, method, path, body, "").await
}

/// As [`try_request`], with extra header lines (each ending in `\r\n`).
pub async fn try_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &str,
) -> Option<(u16, std::collections::HashMap<String, String>, Value)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let body = body.map(Value::to_string).unwrap_or_default();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((
        status,
        headers,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    ))
}

/// `method path` with a JSON body: status and JSON body; panics when nothing answers.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, _, v) = try_request(addr, method, path, body.as_ref())
        .await
        .unwrap_or_else(|| panic!("nothing answers {method} {path} on {addr}"));
    (status, v)
}

/// `GET path`: status and JSON body; panics when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, _, body) = http_get_full(addr, path).await;
    (status, body)
}

/// `GET path`: status, lowercase header map, JSON body; panics when nothing answers.
pub async fn http_get_full(
    addr: SocketAddr,
    path: &str,
) -> (u16, std::collections::HashMap<String, String>, Value) {
    try_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("nothing answers GET {path} on {addr}"))
}

/// The status of `GET path`, or `None` when nothing answers.
pub async fn http_get_opt(addr: SocketAddr, path: &str) -> Option<u16> {
    try_get(addr, path).await.map(|(status, _, _)| status)
}

/// Polls `GET path` every 25 ms until `pred` holds; fails after `patience`.
pub async fn poll_until(
    addr: SocketAddr,
    path: &str,
    patience: Duration,
    pred: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + patience;
    loop {
        let (status, body) = try_get(addr, path)
            .await
            .map_or((0, Value::Null), |(s, _, b)| (s, b));
        if pred(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never satisfied the condition; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub struct Ws {
    stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Ws {
    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(Message::text(v.to_string()))
            .await
            .unwrap();
    }

    /// The next JSON frame (15 s timeout: generous for a loaded 2-core CI machine); `Err(code)` when the server closed the connection.
    pub async fn next(&mut self) -> Result<Value, Option<u16>> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(15), self.stream.next())
                .await
                .expect("no frame within 15 s");
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    eprintln!("WebSocket read failed: {e}");
                    return Err(None);
                }
                None => return Err(None),
            }
        }
    }

    /// The next frame of `type` within `wait`, skipping others; `Err(())` on timeout.
    pub async fn try_next_of(&mut self, kind: &str, wait: Duration) -> Result<Value, ()> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.next()).await {
                Err(_) => return Err(()),
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == kind {
                        return Ok(v);
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(_) => panic!("connection closed"),
            }
        }
    }

    /// The next frame of `type`, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let v = self.next().await.expect("connection closed");
            if v["type"] == kind {
                return v;
            }
        }
    }
}

/// An MQTT client that publishes one QoS 1 message at a time and waits for its PUBACK,
/// reconnecting (and republishing the unacknowledged message) after failures.
pub struct Publisher {
    client: AsyncClient,
    eventloop: EventLoop,
}

impl Publisher {
    pub fn new(addr: SocketAddr, id: &str) -> Self {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, eventloop) = AsyncClient::new(opts, 100);
        Self { client, eventloop }
    }

    /// Publishes and waits for the PUBACK; retries through disconnects for up to `patience`.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], patience: Duration) {
        let deadline = Instant::now() + patience;
        'attempt: loop {
            assert!(
                Instant::now() < deadline,
                "message to {topic} never acknowledged"
            );
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                .await
                .unwrap();
            loop {
                let ev = tokio::time::timeout(Duration::from_secs(5), self.eventloop.poll()).await;
                match ev {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return,
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => {
                        // Disconnected (or stuck): the broker did not acknowledge, so it is ours to
                        // send again once connected. Drop what rumqttc kept for the old session.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        self.eventloop.clean();
                        self.eventloop.pending.clear();
                        continue 'attempt;
                    }
                }
            }
        }
    }
}

/// A running `iotpipe` process of any command, with its stdout lines and log file.
pub struct Proc {
    child: Option<Child>,
    pub log_path: PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Proc {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Starts `iotpipe args...`, logging to `log_path`.
    pub fn spawn(args: &[&str], log_path: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_iotpipe"))
            .args(args)
            .env("RUST_LOG", "info,rumqttd=off,librdkafka=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start iotpipe");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child: Some(child),
            log_path: log_path.to_owned(),
            lines,
        }
    }

    /// Waits for a stdout line containing `marker` and returns the first address in it.
    pub fn wait_for_addr(&mut self, marker: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{marker}` line; log:\n{}", self.log()));
            if line.contains(marker) {
                if let Some(a) = line.split_whitespace().find_map(|w| {
                    w.trim_start_matches("http://")
                        .trim_end_matches(['/', '.', ','])
                        .trim_end_matches('/')
                        .parse()
                        .ok()
                }) {
                    return a;
                }
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, then waits for a successful exit.
    pub fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        assert!(Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                assert!(s.success(), "iotpipe exited with {s}; log:\n{}", self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "iotpipe did not stop in time; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `GET path` on `addr` until `pred` holds (30 s).
pub async fn wait_until(addr: SocketAddr, path: &str, pred: impl Fn(u16, &Value) -> bool) -> Value {
    poll_until(addr, path, Duration::from_secs(30), pred).await
}

/// Connects a WebSocket client to `addr`.
pub async fn ws_connect(addr: SocketAddr) -> Ws {
    let (stream, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
        .await
        .unwrap();
    Ws { stream }
}

/// An HS256 JWT of `claims`, signed with `secret`.
pub fn jwt(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// Epoch seconds `from_now` seconds from now.
pub fn exp_in(from_now: i64) -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + from_now
}

/// A request with `Authorization: Bearer <token>`: status, lowercase headers, JSON body.
pub async fn request_as(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, std::collections::HashMap<String, String>, Value) {
    try_request_with(
        addr,
        method,
        path,
        body,
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await
    .unwrap_or_else(|| panic!("nothing answers {method} {path} on {addr}"))
}

/// The value of the first `/metrics` line starting with `line_prefix` (`name{labels}`), 0 when
/// absent.
pub async fn metric(addr: SocketAddr, line_prefix: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.as_str()
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Connects a WebSocket client with `?token=`; `Err(status)` when the upgrade is refused.
pub async fn ws_with_token(addr: SocketAddr, token: &str) -> Result<Ws, u16> {
    match tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws?token={token}")).await {
        Ok((stream, _)) => Ok(Ws { stream }),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("WebSocket connect to {addr}: {e}"),
    }
}

impl Ws {
    /// Reads updates until one with `seq` at least `seq` arrived.
    pub async fn until_seq(&mut self, seq: u64) {
        while self.next_of("update").await["seq"].as_u64().unwrap() < seq {}
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: String) -> bool {
        self.stream.send(Message::text(text)).await.is_ok()
    }

    /// Every frame that arrives within `wait` (closing stops the collection).
    pub async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => out.push(serde_json::from_str(&t).unwrap()),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                    return out
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

impl Dev {
    /// Process id of the server.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Polls a metric line (`name{labels}`) on `/metrics` until it is non-zero or `wait` passes;
/// returns its last value.
pub async fn poll_metric(addr: SocketAddr, line_prefix: &str, wait: Duration) -> f64 {
    let deadline = Instant::now() + wait;
    loop {
        let v = metric(addr, line_prefix).await;
        if v != 0.0 || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
