//! One WebSocket connection: the client's subscribe/unsubscribe requests, snapshots and resumes,
//! and the updates and alerts the hub queues for it. Protocol: `docs/PROTOCOL.md`.
//!
//! The snapshot race: on subscribe the connection registers with the hub *first* and reads the
//! snapshot (or the resume buffer) *second*. The materializer writes a device's state before it
//! emits the change, and the hub fills the resume buffer before it looks at subscriptions, so any
//! change newer than what was read is published after the registration and reaches this
//! connection; updates with a seq not above what the client already has are dropped here.
//! Reading first and registering second would lose the updates in between.
//!
//! The server closes a connection with a code from [`close`] when its token expires, when it stays
//! behind (conflating) past the slow-client deadline or its socket accepts nothing for that long,
//! or when it sends nothing (not even a pong) for the idle timeout.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use iotpipe_pipeline::change::LatestState;
use iotpipe_pipeline::ratelimit::Quota;
use iotpipe_pipeline::record::validate_device_id;
use iotpipe_pipeline::time::now_ms;
use serde::Deserialize;
use serde_json::json;
use tracing::{debug, info_span, warn, Instrument};

use super::auth::Caller;
use super::hub::{update_frame, ConnHandle, ConnRx, Delivery, Hub, Outbound, Replay};
use super::AppState;

/// Close codes the server sends (`docs/PROTOCOL.md`).
pub mod close {
    /// The server is shutting down ("going away"); reconnect elsewhere or later.
    pub const GOING_AWAY: u16 = 1001;
    /// The client sent a message larger than `fanout.max_message_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// The token expired: reconnect with a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client stayed behind past `fanout.slow_client_deadline`: reconnect (with `since`).
    pub const TOO_SLOW: u16 = 4002;
    /// The client sent nothing, not even a pong, for `fanout.idle_timeout`.
    pub const IDLE: u16 = 4003;
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum ClientOp {
    Subscribe {
        devices: Vec<String>,
        #[serde(default)]
        since: HashMap<String, u64>,
    },
    Unsubscribe {
        devices: Vec<String>,
    },
    Ping,
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// A connection the hub admitted; leaving the hub when dropped, whether or not the upgrade
/// completed.
pub struct Admitted {
    rx: ConnRx,
    hub: Arc<Hub>,
}

impl Admitted {
    /// Wraps an admitted connection.
    pub fn new(rx: ConnRx, hub: Arc<Hub>) -> Self {
        Self { rx, hub }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.hub.disconnect(self.rx.id);
        // What was still waiting for this connection is gone with it.
        self.rx.rx.close();
        let mut left = 0;
        while self.rx.rx.try_recv().is_ok() {
            left += 1;
        }
        self.hub.dequeued(left);
        self.hub.take_pending(&self.rx.handle);
    }
}

struct Conn {
    id: u64,
    sink: Sink,
    caller: Arc<Caller>,
    /// Newest seq the client has per device (from a snapshot, a replay or an update).
    last_seq: HashMap<Arc<str>, u64>,
    /// Devices this connection is subscribed to by name.
    subs: HashSet<Arc<str>>,
    wildcard: bool,
    state: AppState,
    /// Why the connection ended, when the server ended it (for the metric).
    closed_by_server: Option<&'static str>,
}

/// Serves one upgraded connection until the client leaves, the server closes it or shuts down.
pub async fn serve(socket: WebSocket, state: AppState, admitted: Admitted) {
    let span = info_span!("ws", conn = admitted.rx.id, user = %admitted.rx.handle.caller.user);
    async move {
        let mut admitted = admitted;
        let rx = &mut admitted.rx;
        state.metrics.ws_connections.inc();
        let (sink, mut stream) = socket.split();
        let mut conn = Conn {
            id: rx.id,
            sink,
            caller: Arc::clone(&rx.handle.caller),
            last_seq: HashMap::new(),
            subs: HashSet::new(),
            wildcard: false,
            state: state.clone(),
            closed_by_server: None,
        };
        debug!("WebSocket connected.");
        let cfg = &state.config;
        // Wake often enough to notice a slow or idle client well within its deadline.
        let period = (cfg.ping_interval.min(cfg.slow_client_deadline) / 4)
            .max(Duration::from_millis(100));
        let mut housekeeping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let expires = conn.caller.expires_at.map(|exp| {
            let left = exp.saturating_mul(1000).saturating_sub(now_ms()).max(0);
            tokio::time::Instant::now() + Duration::from_millis(left as u64)
        });
        let expiry = tokio::time::sleep_until(expires.unwrap_or_else(|| {
            tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
        }));
        tokio::pin!(expiry);
        let mut last_inbound = Instant::now();
        let mut last_ping = Instant::now();
        loop {
            let ok = tokio::select! {
                biased;
                () = state.shutdown.cancelled() => {
                    conn.close(close::GOING_AWAY, "server shutting down", "shutdown").await;
                    break;
                }
                () = &mut expiry => {
                    conn.close(close::TOKEN_EXPIRED, "token expired", "token_expired").await;
                    break;
                }
                Some(alert) = rx.alerts.recv() => conn.send(alert, "alert").await,
                msg = stream.next() => {
                    last_inbound = Instant::now();
                    match msg {
                        // Boxed: a subscribe's future is large and rare; kept inline it would
                        // size every idle connection's task for it.
                        Some(Ok(Message::Text(text))) => Box::pin(conn.handle_text(&text)).await,
                        Some(Ok(Message::Binary(_))) => conn.error("bad_request", "binary frames are not supported; send JSON text").await,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => true,
                        Some(Ok(Message::Close(_))) => {
                            // Complete the closing handshake (the library queued the reply).
                            let _ = tokio::time::timeout(Duration::from_secs(1), conn.sink.close()).await;
                            break;
                        }
                        None => break,
                        Some(Err(e)) => {
                            let e = e.to_string();
                            debug!(error = %e, "WebSocket read failed.");
                            if e.contains("Space limit exceeded") {
                                conn.close(close::TOO_BIG, "message too big", "too_big").await;
                            }
                            break;
                        }
                    }
                }
                _ = housekeeping.tick() => {
                    let behind = rx.handle.behind_since.load(Ordering::Relaxed);
                    if behind > 0 && now_ms() - behind > cfg.slow_client_deadline.as_millis() as i64 {
                        conn.close(close::TOO_SLOW, "too slow: reconnect with since", "slow").await;
                        break;
                    }
                    if last_inbound.elapsed() > cfg.idle_timeout {
                        conn.close(close::IDLE, "idle", "idle").await;
                        break;
                    }
                    if last_ping.elapsed() >= cfg.ping_interval {
                        last_ping = Instant::now();
                        conn.io(|s| s.send(Message::Ping(bytes::Bytes::new()))).await
                    } else {
                        true
                    }
                }
                Some(Outbound::Update(first)) = rx.rx.recv() => {
                    // Send what is queued in one go and flush once.
                    state.hub.dequeued(1);
                    let mut ok = conn.feed_update(&first, true).await;
                    while ok {
                        match rx.rx.try_recv() {
                            Ok(Outbound::Update(d)) => {
                                state.hub.dequeued(1);
                                ok = conn.feed_update(&d, true).await;
                            }
                            Err(_) => break,
                        }
                    }
                    ok = ok && conn.io(|s| s.flush()).await;
                    if ok && rx.rx.is_empty() {
                        ok = conn.flush_pending(&rx.handle).await;
                    }
                    ok
                }
                () = rx.handle.pending_notify.notified() => {
                    if rx.rx.is_empty() { conn.flush_pending(&rx.handle).await } else { true }
                }
            };
            if !ok {
                break;
            }
        }
        if let Some(reason) = conn.closed_by_server {
            state.metrics.ws_closes.with_label_values(&[reason]).inc();
        }
        state.metrics.ws_connections.dec();
        debug!(reason = conn.closed_by_server.unwrap_or("client"), "WebSocket closed.");
        drop(admitted);
    }
    .instrument(span)
    .await;
}

impl Conn {
    /// Runs one write on the socket, giving up (and ending the connection) when the socket
    /// accepts nothing for the slow-client deadline.
    async fn io<'s, F, Fut>(&'s mut self, op: F) -> bool
    where
        F: FnOnce(&'s mut Sink) -> Fut,
        Fut: Future<Output = Result<(), axum::Error>> + 's,
    {
        let deadline = self.state.config.slow_client_deadline;
        match tokio::time::timeout(deadline, op(&mut self.sink)).await {
            Ok(r) => r.is_ok(),
            Err(_) => {
                self.closed_by_server = Some("slow");
                false
            }
        }
    }

    /// Sends a close frame (best effort: a stuck socket gets a second) and records why.
    async fn close(&mut self, code: u16, reason: &'static str, metric: &'static str) {
        self.closed_by_server = Some(metric);
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.send(frame)).await;
    }

    async fn send(&mut self, frame: Utf8Bytes, kind: &'static str) -> bool {
        self.state
            .metrics
            .ws_messages
            .with_label_values(&[kind])
            .inc();
        self.io(|s| s.send(Message::Text(frame))).await
    }

    async fn error(&mut self, code: &str, message: &str) -> bool {
        let frame = json!({"type": "error", "code": code, "message": message}).to_string();
        self.send(frame.into(), "error").await
    }

    /// The connection's one copy of a device id (shared by its maps).
    fn key(&self, device: &str) -> Arc<str> {
        self.subs
            .get(device)
            .cloned()
            .unwrap_or_else(|| Arc::from(device))
    }

    fn is_new(&mut self, device: &Arc<str>, seq: u64) -> bool {
        match self.last_seq.get_mut(device) {
            Some(last) if *last >= seq => false,
            Some(last) => {
                *last = seq;
                true
            }
            None => {
                self.last_seq.insert(Arc::clone(device), seq);
                true
            }
        }
    }

    /// Queues an update frame (flushed by the caller) unless the client already has its seq.
    /// `live`: a fresh update, whose device-to-push latency is observed (replays are not).
    async fn feed(
        &mut self,
        device: &Arc<str>,
        seq: u64,
        ts: i64,
        frame: Utf8Bytes,
        live: bool,
    ) -> bool {
        if !self.is_new(device, seq) {
            return true;
        }
        let m = &self.state.metrics;
        m.ws_messages.with_label_values(&["update"]).inc();
        if live {
            m.push_latency
                .observe((now_ms() - ts).max(0) as f64 / 1000.0);
        }
        self.io(|s| s.feed(Message::Text(frame))).await
    }

    async fn feed_update(&mut self, d: &Delivery, live: bool) -> bool {
        self.feed(&d.device, d.seq, d.ts, d.frame.clone(), live)
            .await
    }

    async fn flush_pending(&mut self, handle: &ConnHandle) -> bool {
        let pending = self.state.hub.take_pending(handle);
        for (device, p) in pending {
            let frame = update_frame(&device, p.ts, p.seq, &p.changes);
            if !self.feed(&device, p.seq, p.ts, frame.into(), true).await {
                return false;
            }
        }
        let ok = self.io(|s| s.flush()).await;
        // Caught up: nothing conflated is waiting any more.
        if ok && handle.pending.lock().is_empty() {
            handle.behind_since.store(0, Ordering::Relaxed);
        }
        ok
    }

    async fn handle_text(&mut self, text: &str) -> bool {
        let op: ClientOp = match serde_json::from_str(text) {
            Ok(op) => op,
            Err(e) => {
                return self
                    .error("bad_request", &format!("cannot read request: {e}"))
                    .await
            }
        };
        match op {
            ClientOp::Ping => {
                self.send(Utf8Bytes::from_static(r#"{"type":"pong"}"#), "pong")
                    .await
            }
            ClientOp::Subscribe { devices, since } => {
                if let Some(retry) = self.rate_limited().await {
                    return self.rate_limited_error(retry).await;
                }
                self.subscribe(devices, since).await
            }
            ClientOp::Unsubscribe { devices } => {
                if let Some(retry) = self.rate_limited().await {
                    return self.rate_limited_error(retry).await;
                }
                let (wildcard, ids) = match self.check_devices(&devices) {
                    Ok(v) => v,
                    Err(msg) => return self.error("bad_request", &msg).await,
                };
                self.state.hub.unsubscribe(self.id, &ids, wildcard);
                if wildcard {
                    self.wildcard = false;
                }
                for d in &ids {
                    self.last_seq.remove(d.as_str());
                    self.subs.remove(d.as_str());
                }
                let frame = json!({"type": "unsubscribed", "devices": devices}).to_string();
                self.send(frame.into(), "unsubscribed").await
            }
        }
    }

    /// Counts a subscribe/unsubscribe request against the caller's tier; `Some(wait)` when over.
    async fn rate_limited(&self) -> Option<Duration> {
        let tier = self.state.config.tier(self.caller.tier.as_deref());
        let quota = Quota::per_minute(tier.subscribes_per_minute, tier.subscribe_burst());
        self.state
            .over_limit(&self.caller, "subscribe", &quota)
            .await
    }

    async fn rate_limited_error(&mut self, retry: Duration) -> bool {
        let ms = retry.as_millis().max(1) as u64;
        let frame = json!({
            "type": "error", "code": "rate_limited",
            "message": format!("too many subscribe requests; retry in {ms} ms"),
            "retry_after_ms": ms,
        })
        .to_string();
        self.send(frame.into(), "error").await
    }

    /// Splits `["*", "d1", ...]` into (wildcard, device ids), validating each id.
    fn check_devices(&self, devices: &[String]) -> Result<(bool, Vec<String>), String> {
        if devices.is_empty() {
            return Err("`devices` must name at least one device, or \"*\"".into());
        }
        let max = self.state.config.max_devices_per_subscribe;
        if devices.len() > max {
            return Err(format!("at most {max} devices per request"));
        }
        let mut wildcard = false;
        let mut ids = Vec::with_capacity(devices.len());
        for d in devices {
            if d == "*" {
                wildcard = true;
            } else {
                validate_device_id(d).map_err(|e| format!("`{d}`: {}", e.detail))?;
                ids.push(d.clone());
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok((wildcard, ids))
    }

    /// Splits device ids into those the caller may see and the rest (unknown or foreign alike).
    async fn authorize(&self, ids: Vec<String>) -> Result<(Vec<String>, Vec<String>), String> {
        let mut allowed = Vec::with_capacity(ids.len());
        let mut refused = Vec::new();
        for d in ids {
            if self
                .state
                .may_see(&self.caller, &d)
                .await
                .map_err(|e| e.to_string())?
            {
                allowed.push(d);
            } else {
                refused.push(d);
            }
        }
        Ok((allowed, refused))
    }

    async fn subscribe(&mut self, devices: Vec<String>, since: HashMap<String, u64>) -> bool {
        let (wildcard, ids) = match self.check_devices(&devices) {
            Ok(v) => v,
            Err(msg) => return self.error("bad_request", &msg).await,
        };
        let (ids, refused) = match self.authorize(ids).await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "Cannot read the device registry.");
                return self
                    .error("unavailable", "device registry unavailable; retry")
                    .await;
            }
        };
        if !refused.is_empty() {
            self.state.metrics.ws_forbidden.inc_by(refused.len() as u64);
            // The same answer whether a device does not exist or belongs to someone else.
            let frame = json!({
                "type": "error", "code": "forbidden",
                "message": "no such device, or not yours",
                "devices": refused,
            })
            .to_string();
            if !self.send(frame.into(), "error").await {
                return false;
            }
            if ids.is_empty() && !wildcard {
                return true;
            }
        }
        let new = ids
            .iter()
            .filter(|d| !self.subs.contains(d.as_str()))
            .count()
            + usize::from(wildcard && !self.wildcard);
        let max = self.state.config.max_subscriptions_per_connection;
        if self.subs.len() + usize::from(self.wildcard) + new > max {
            return self
                .error(
                    "too_many_subscriptions",
                    &format!("at most {max} subscriptions per connection (\"*\" counts as one)"),
                )
                .await;
        }
        // Register first, then read the snapshots and resume buffers (see the module docs).
        self.state.hub.subscribe(self.id, &ids, wildcard);
        for d in &ids {
            if !self.subs.contains(d.as_str()) {
                self.subs.insert(Arc::from(d.as_str()));
            }
        }
        self.wildcard |= wildcard;
        let mut targets = ids;
        if wildcard {
            let limit = self.state.config.max_list_limit;
            match self.state.visible_devices(&self.caller, limit).await {
                Ok(all) => targets.extend(all),
                Err(e) => {
                    warn!(error = %e, "Cannot list devices for a snapshot.");
                    return self
                        .error("unavailable", "device list unavailable; retry")
                        .await;
                }
            }
            targets.sort_unstable();
            targets.dedup();
        }
        let mut resumed = serde_json::Map::new();
        for device in targets {
            let outcome = match since.get(&device) {
                Some(&seq) => match self.resume(&device, seq).await {
                    Ok(o) => o,
                    Err(()) => return false,
                },
                None => match self.snapshot_of(&device, None).await {
                    Ok(_) => continue,
                    Err(()) => return false,
                },
            };
            self.state
                .metrics
                .ws_resumes
                .with_label_values(&[outcome])
                .inc();
            resumed.insert(device, json!(outcome));
        }
        let mut accepted: Vec<&str> = Vec::new();
        if wildcard {
            accepted.push("*");
        }
        accepted.extend(
            devices
                .iter()
                .map(String::as_str)
                .filter(|d| *d != "*" && self.subs.contains(*d)),
        );
        let mut frame = json!({"type": "subscribed", "devices": accepted});
        if !since.is_empty() {
            frame["resumed"] = serde_json::Value::Object(resumed);
        }
        self.send(frame.to_string().into(), "subscribed").await
    }

    /// Brings a resuming client of `device` (which has everything up to `since`) up to date:
    /// the missed updates from the resume buffer, else a snapshot. Returns the outcome
    /// (`replayed`, `snapshot`, `current`, or `unavailable` when the snapshot could not be
    /// read and the client was told so); `Err` when the socket failed.
    async fn resume(&mut self, device: &str, since: u64) -> Result<&'static str, ()> {
        let key = self.key(device);
        // Whatever the client has needs no resending, from the buffer or the queue.
        let last = self.last_seq.entry(Arc::clone(&key)).or_insert(0);
        *last = (*last).max(since);
        match self.state.hub.replay(device, since) {
            Replay::Covered(missed) if missed.is_empty() => Ok("current"),
            Replay::Covered(missed) => {
                for d in &missed {
                    if !self.feed_update(d, false).await {
                        return Err(());
                    }
                }
                if self.io(|s| s.flush()).await {
                    Ok("replayed")
                } else {
                    Err(())
                }
            }
            Replay::Gap => Ok(match self.snapshot_of(device, Some(since)).await? {
                Some(true) => "snapshot",
                Some(false) => "current",
                None => "unavailable",
            }),
        }
    }

    /// Sends `device`'s snapshot when its seq is above `since`: `Some(sent)`, or `None` when the
    /// store failed (the client was told `unavailable`); `Err` when the socket failed.
    async fn snapshot_of(&mut self, device: &str, since: Option<u64>) -> Result<Option<bool>, ()> {
        match self.state.latest.get(device).await {
            Ok(Some(s)) if since.is_none_or(|n| s.seq > n) => {
                if self.snapshot(&s).await {
                    Ok(Some(true))
                } else {
                    Err(())
                }
            }
            Ok(_) => Ok(Some(false)),
            Err(e) => {
                warn!(device = %device, error = %e, "Cannot read a snapshot.");
                let msg = format!("snapshot of `{device}` unavailable; retry");
                if self.error("unavailable", &msg).await {
                    Ok(None)
                } else {
                    Err(())
                }
            }
        }
    }

    async fn snapshot(&mut self, s: &LatestState) -> bool {
        let device = self.key(&s.device);
        let last = self.last_seq.entry(device).or_insert(0);
        *last = (*last).max(s.seq);
        let frame = json!({"type": "snapshot", "device": s.device, "ts": s.ts, "seq": s.seq, "state": s.values()}).to_string();
        self.send(frame.into(), "snapshot").await
    }
}
