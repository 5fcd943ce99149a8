//! The push hub: who watches which device, and the per-connection queues updates go into.
//!
//! Each change is serialized once and the same bytes are shared by every receiver. Delivery to a
//! connection never blocks the hub: it is a `try_send` into the connection's bounded queue. When the
//! queue is full the change is *conflated* — merged into a per-device pending update that the
//! connection sends once its queue has drained — so a slow client costs at most
//! (devices watched x state size) of memory and never delays anyone else. Once a device has a
//! pending update, its later changes are merged there too (not queued), which keeps each device's
//! updates in seq order. Alerts use a separate queue and are never conflated.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use iotpipe_pipeline::change::Change;
use iotpipe_pipeline::metrics::Metrics;
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};

/// One update, serialized once, shared by every connection that receives it.
#[derive(Debug)]
pub struct Delivery {
    /// Device id.
    pub device: Arc<str>,
    /// Per-device seq.
    pub seq: u64,
    /// Device ts of the change.
    pub ts: i64,
    /// The `update` frame, ready to send (cheap to clone: shared bytes).
    pub frame: Utf8Bytes,
}

/// What a connection's queue carries.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A device update.
    Update(Arc<Delivery>),
}

/// A merged update waiting for a slow connection.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Newest seq merged in.
    pub seq: u64,
    /// Newest ts merged in.
    pub ts: i64,
    /// Union of the changes, newest value per field.
    pub changes: Map<String, Value>,
}

/// The hub's side of one connection.
pub struct ConnHandle {
    tx: mpsc::Sender<Outbound>,
    alerts: mpsc::UnboundedSender<Utf8Bytes>,
    /// Conflated updates per device.
    pub pending: Mutex<HashMap<Arc<str>, Pending>>,
    /// Woken when something was added to `pending`.
    pub pending_notify: Notify,
}

/// The connection's side: its receivers.
pub struct ConnRx {
    /// Connection id in the hub.
    pub id: u64,
    /// Queued updates.
    pub rx: mpsc::Receiver<Outbound>,
    /// Queued alerts (never conflated).
    pub alerts: mpsc::UnboundedReceiver<Utf8Bytes>,
    /// Shared with the hub: conflated updates.
    pub handle: Arc<ConnHandle>,
}

#[derive(Default)]
struct Inner {
    conns: HashMap<u64, Arc<ConnHandle>>,
    by_device: HashMap<Arc<str>, HashSet<u64>>,
    wildcard: HashSet<u64>,
}

impl Inner {
    /// The connections watching `device`: by name, then by `*`, each once.
    fn watchers<'a>(&'a self, device: &str) -> impl Iterator<Item = &'a Arc<ConnHandle>> + 'a {
        let direct = self.by_device.get(device);
        direct
            .into_iter()
            .flatten()
            .chain(
                self.wildcard
                    .iter()
                    .filter(move |id| direct.is_none_or(|d| !d.contains(id))),
            )
            .filter_map(|id| self.conns.get(id))
    }
}

/// The registry of connections and subscriptions.
pub struct Hub {
    inner: RwLock<Inner>,
    next_id: AtomicU64,
    queue_capacity: usize,
    metrics: Arc<Metrics>,
}

/// The `update` frame for a change.
pub fn update_frame(device: &str, ts: i64, seq: u64, changes: &Map<String, Value>) -> String {
    serde_json::json!({"type": "update", "device": device, "ts": ts, "seq": seq, "changes": changes}).to_string()
}

impl Hub {
    /// A hub whose connections queue up to `queue_capacity` frames each.
    pub fn new(queue_capacity: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            next_id: AtomicU64::new(1),
            queue_capacity: queue_capacity.max(1),
            metrics,
        }
    }

    /// Registers a new connection.
    pub fn connect(&self) -> ConnRx {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let (atx, arx) = mpsc::unbounded_channel();
        let handle = Arc::new(ConnHandle {
            tx,
            alerts: atx,
            pending: Mutex::new(HashMap::new()),
            pending_notify: Notify::new(),
        });
        self.inner.write().conns.insert(id, Arc::clone(&handle));
        ConnRx {
            id,
            rx,
            alerts: arx,
            handle,
        }
    }

    /// Removes a connection and all its subscriptions.
    pub fn disconnect(&self, id: u64) {
        let mut inner = self.inner.write();
        inner.conns.remove(&id);
        inner.wildcard.remove(&id);
        inner.by_device.retain(|_, ids| {
            ids.remove(&id);
            !ids.is_empty()
        });
    }

    /// Subscribes `id` to `devices` (or to every device with `wildcard`).
    pub fn subscribe(&self, id: u64, devices: &[String], wildcard: bool) {
        let mut inner = self.inner.write();
        if wildcard {
            inner.wildcard.insert(id);
        }
        for d in devices {
            inner
                .by_device
                .entry(Arc::from(d.as_str()))
                .or_default()
                .insert(id);
        }
    }

    /// Unsubscribes `id` from `devices` (and from the wildcard with `wildcard`).
    pub fn unsubscribe(&self, id: u64, devices: &[String], wildcard: bool) {
        let mut inner = self.inner.write();
        if wildcard {
            inner.wildcard.remove(&id);
        }
        for d in devices {
            if let Some(ids) = inner.by_device.get_mut(d.as_str()) {
                ids.remove(&id);
                if ids.is_empty() {
                    inner.by_device.remove(d.as_str());
                }
            }
        }
    }

    /// After shutdown was signalled: waits up to `limit` for the connections to send their close
    /// frames and leave.
    pub async fn wait_closed(&self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.connections() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.inner.read().conns.len()
    }

    /// Pushes a change to every connection watching its device.
    pub fn publish(&self, change: &Change) {
        let delivery = Arc::new(Delivery {
            device: Arc::from(change.device.as_str()),
            seq: change.seq,
            ts: change.ts,
            frame: Utf8Bytes::from(update_frame(
                &change.device,
                change.ts,
                change.seq,
                &change.changes,
            )),
        });
        let inner = self.inner.read();
        for conn in inner.watchers(change.device.as_str()) {
            let mut pending = conn.pending.lock();
            if let Some(p) = pending.get_mut(change.device.as_str()) {
                merge_pending(p, change);
                self.metrics.ws_conflated.inc();
                continue;
            }
            match conn.tx.try_send(Outbound::Update(Arc::clone(&delivery))) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    pending.insert(
                        Arc::clone(&delivery.device),
                        Pending {
                            seq: change.seq,
                            ts: change.ts,
                            changes: change.changes.clone(),
                        },
                    );
                    drop(pending);
                    conn.pending_notify.notify_one();
                    self.metrics.ws_conflated.inc();
                }
                // The connection is closing; its task removes it from the hub.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Pushes an alert frame to every connection watching `device`.
    pub fn publish_alert(&self, device: &str, frame: &Utf8Bytes) {
        let inner = self.inner.read();
        for conn in inner.watchers(device) {
            let _ = conn.alerts.send(frame.clone());
        }
    }
}

fn merge_pending(p: &mut Pending, change: &Change) {
    if change.seq <= p.seq {
        return;
    }
    p.seq = change.seq;
    p.ts = p.ts.max(change.ts);
    for (k, v) in &change.changes {
        p.changes.insert(k.clone(), v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotpipe_pipeline::record::RecordId;
    use serde_json::json;

    fn change(device: &str, seq: u64, changes: Value) -> Change {
        Change {
            device: device.into(),
            ts: seq as i64,
            seq,
            record_id: RecordId(String::new()),
            received_at: 0,
            changes: changes.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn routes_by_device_and_wildcard_without_duplicates() {
        let hub = Hub::new(16, Arc::new(Metrics::new()));
        let mut a = hub.connect();
        let mut b = hub.connect();
        hub.subscribe(a.id, &["d1".into()], false);
        hub.subscribe(b.id, &["d1".into()], true);
        hub.publish(&change("d1", 1, json!({"t": 1})));
        hub.publish(&change("d2", 1, json!({"t": 1})));
        assert!(a.rx.try_recv().is_ok());
        assert!(a.rx.try_recv().is_err(), "a does not watch d2");
        let got: Vec<_> = std::iter::from_fn(|| b.rx.try_recv().ok())
            .map(|Outbound::Update(d)| (d.device.to_string(), d.seq))
            .collect();
        assert_eq!(
            got,
            vec![("d1".into(), 1), ("d2".into(), 1)],
            "b gets d1 once, and d2 via the wildcard"
        );
        hub.disconnect(a.id);
        hub.unsubscribe(b.id, &["d1".into()], true);
        hub.publish(&change("d1", 2, json!({"t": 2})));
        assert!(b.rx.try_recv().is_err());
        assert_eq!(hub.connections(), 1);
    }

    #[test]
    fn full_queue_conflates_per_device_keeping_newest_values() {
        let hub = Hub::new(2, Arc::new(Metrics::new()));
        let mut c = hub.connect();
        hub.subscribe(c.id, &[], true);
        for seq in 1..=10 {
            hub.publish(&change(
                "d1",
                seq,
                json!({ "t": seq, format!("f{}", seq % 3): seq }),
            ));
        }
        // Two queued, the other eight merged into one pending update.
        assert_eq!(std::iter::from_fn(|| c.rx.try_recv().ok()).count(), 2);
        let pending = c.handle.pending.lock().clone();
        let p = &pending[&Arc::<str>::from("d1")];
        assert_eq!(p.seq, 10);
        assert_eq!(
            Value::Object(p.changes.clone()),
            json!({"t": 10, "f0": 9, "f1": 10, "f2": 8})
        );
        // While d1 is pending, its changes keep going to pending even if the queue has room.
        hub.publish(&change("d1", 11, json!({"t": 11})));
        assert!(c.rx.try_recv().is_err());
        assert_eq!(c.handle.pending.lock()[&Arc::<str>::from("d1")].seq, 11);
    }
}
