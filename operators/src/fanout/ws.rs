//! One WebSocket connection: the client's subscribe/unsubscribe requests, snapshots, and the updates
//! and alerts the hub queues for it. Protocol: `docs/PROTOCOL.md`.
//!
//! The snapshot race: on subscribe the connection registers with the hub *first* and reads the
//! snapshot *second*. The materializer writes a device's state before it emits the change, so any
//! change newer than the snapshot is published after the registration and reaches this connection;
//! updates with a seq not above what the client already has (from the snapshot or an earlier
//! update) are dropped here. Reading first and registering second would lose the updates in between.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use iotpipe_pipeline::change::LatestState;
use iotpipe_pipeline::record::validate_device_id;
use iotpipe_pipeline::time::now_ms;
use serde::Deserialize;
use serde_json::json;
use tracing::{debug, info_span, warn, Instrument};

use super::hub::{update_frame, Outbound};
use super::AppState;

/// Close code sent when the server shuts down ("going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum ClientOp {
    Subscribe { devices: Vec<String> },
    Unsubscribe { devices: Vec<String> },
    Ping,
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

struct Conn {
    id: u64,
    sink: Sink,
    /// Newest seq the client has per device (from a snapshot or an update).
    last_seq: HashMap<Arc<str>, u64>,
    state: AppState,
}

/// Serves one upgraded connection until the client leaves or the server shuts down.
pub async fn serve(socket: WebSocket, state: AppState) {
    let mut rx = state.hub.connect();
    let span = info_span!("ws", conn = rx.id);
    async move {
        state.metrics.ws_connections.inc();
        let (sink, mut stream) = socket.split();
        let mut conn = Conn { id: rx.id, sink, last_seq: HashMap::new(), state: state.clone() };
        debug!("WebSocket connected.");
        loop {
            let ok = tokio::select! {
                biased;
                () = state.shutdown.cancelled() => {
                    let _ = conn.sink.send(Message::Close(Some(CloseFrame { code: CLOSE_GOING_AWAY, reason: Utf8Bytes::from_static("server shutting down") }))).await;
                    break;
                }
                Some(alert) = rx.alerts.recv() => conn.send(alert, "alert").await,
                msg = stream.next() => match msg {
                    Some(Ok(Message::Text(text))) => conn.handle_text(&text).await,
                    Some(Ok(Message::Binary(_))) => conn.error("bad_request", "binary frames are not supported; send JSON text").await,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => true,
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        debug!(error = %e, "WebSocket read failed.");
                        break;
                    }
                },
                Some(Outbound::Update(first)) = rx.rx.recv() => {
                    // Send what is queued in one go and flush once.
                    let mut ok = conn.feed_update(&first).await;
                    while ok {
                        match rx.rx.try_recv() {
                            Ok(Outbound::Update(d)) => ok = conn.feed_update(&d).await,
                            Err(_) => break,
                        }
                    }
                    ok = ok && conn.sink.flush().await.is_ok();
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
        state.hub.disconnect(conn.id);
        state.metrics.ws_connections.dec();
        debug!("WebSocket closed.");
    }
    .instrument(span)
    .await;
}

impl Conn {
    async fn send(&mut self, frame: Utf8Bytes, kind: &'static str) -> bool {
        self.state
            .metrics
            .ws_messages
            .with_label_values(&[kind])
            .inc();
        self.sink.send(Message::Text(frame)).await.is_ok()
    }

    async fn error(&mut self, code: &str, message: &str) -> bool {
        let frame = json!({"type": "error", "code": code, "message": message}).to_string();
        self.send(frame.into(), "error").await
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
    async fn feed(&mut self, device: &Arc<str>, seq: u64, ts: i64, frame: Utf8Bytes) -> bool {
        if !self.is_new(device, seq) {
            return true;
        }
        let m = &self.state.metrics;
        m.ws_messages.with_label_values(&["update"]).inc();
        m.push_latency
            .observe((now_ms() - ts).max(0) as f64 / 1000.0);
        self.sink.feed(Message::Text(frame)).await.is_ok()
    }

    async fn feed_update(&mut self, d: &super::hub::Delivery) -> bool {
        self.feed(&d.device, d.seq, d.ts, d.frame.clone()).await
    }

    async fn flush_pending(&mut self, handle: &super::hub::ConnHandle) -> bool {
        let pending = std::mem::take(&mut *handle.pending.lock());
        for (device, p) in pending {
            let frame = update_frame(&device, p.ts, p.seq, &p.changes);
            if !self.feed(&device, p.seq, p.ts, frame.into()).await {
                return false;
            }
        }
        self.sink.flush().await.is_ok()
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
            ClientOp::Subscribe { devices } => self.subscribe(devices).await,
            ClientOp::Unsubscribe { devices } => {
                let (wildcard, ids) = match self.check_devices(&devices) {
                    Ok(v) => v,
                    Err(msg) => return self.error("bad_request", &msg).await,
                };
                self.state.hub.unsubscribe(self.id, &ids, wildcard);
                for d in &ids {
                    self.last_seq.remove(d.as_str());
                }
                let frame = json!({"type": "unsubscribed", "devices": devices}).to_string();
                self.send(frame.into(), "unsubscribed").await
            }
        }
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
        Ok((wildcard, ids))
    }

    async fn subscribe(&mut self, devices: Vec<String>) -> bool {
        let (wildcard, ids) = match self.check_devices(&devices) {
            Ok(v) => v,
            Err(msg) => return self.error("bad_request", &msg).await,
        };
        // Register first, then read the snapshots (see the module docs).
        self.state.hub.subscribe(self.id, &ids, wildcard);
        let mut targets = ids;
        if wildcard {
            match self
                .state
                .latest
                .devices(self.state.config.max_list_limit)
                .await
            {
                Ok(all) => targets.extend(all.into_iter().map(|d| d.device)),
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
        for device in targets {
            match self.state.latest.get(&device).await {
                Ok(Some(s)) => {
                    if !self.snapshot(&s).await {
                        return false;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(device = %device, error = %e, "Cannot read a snapshot.");
                    if !self
                        .error(
                            "unavailable",
                            &format!("snapshot of `{device}` unavailable; retry"),
                        )
                        .await
                    {
                        return false;
                    }
                }
            }
        }
        let frame = json!({"type": "subscribed", "devices": devices}).to_string();
        self.send(frame.into(), "subscribed").await
    }

    async fn snapshot(&mut self, s: &LatestState) -> bool {
        let device: Arc<str> = Arc::from(s.device.as_str());
        let last = self.last_seq.entry(device).or_insert(0);
        *last = (*last).max(s.seq);
        let frame = json!({"type": "snapshot", "device": s.device, "ts": s.ts, "seq": s.seq, "state": s.values()}).to_string();
        self.send(frame.into(), "snapshot").await
    }
}
