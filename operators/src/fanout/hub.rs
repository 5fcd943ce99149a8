//! The push hub: who watches which device, and the per-connection queues updates go into.
//!
//! Each change is serialized once and the same bytes are shared by every receiver. Delivery to a
//! connection never blocks the hub: it is a `try_send` into the connection's bounded queue. When the
//! queue is full the change is *conflated* — merged into a per-device pending update that the
//! connection sends once its queue has drained — so a slow client costs at most
//! (devices watched x state size) of memory and never delays anyone else. Once a device has a
//! pending update, its later changes are merged there too (not queued), which keeps each device's
//! updates in seq order. Alerts use a separate queue and are never conflated.
//!
//! Access is checked at delivery too, not only at subscribe: each change comes with its device's
//! registry entry, and a connection receives it only if its caller may see the device. So a
//! wildcard (`*`) subscription follows the caller's devices as they are registered, and a device
//! given to another owner stops reaching the old one within one registry event.
//!
//! The hub also keeps the last few updates of every device (the resume buffer) so a client that
//! reconnects — to this instance or any other, since every instance consumes every change — can
//! ask for what it missed after the seq it has.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use iotpipe_pipeline::change::Change;
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::registry::DeviceEntry;
use iotpipe_pipeline::time::now_ms;
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};

use super::auth::Caller;

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
    /// Who is connected: what they may see.
    pub caller: Arc<Caller>,
    /// Epoch ms since which this connection's updates are being conflated (0: it keeps up).
    pub behind_since: AtomicI64,
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
    per_user: HashMap<Arc<str>, usize>,
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
    resume: Mutex<HashMap<Arc<str>, VecDeque<Arc<Delivery>>>>,
    resume_capacity: usize,
}

/// What a resuming client gets for one device.
#[derive(Debug)]
pub enum Replay {
    /// The buffer holds every update after the client's seq (possibly none): send these, in order.
    Covered(Vec<Arc<Delivery>>),
    /// The buffer does not reach back to the client's seq: a snapshot is needed.
    Gap,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyConnections;

/// The `update` frame for a change.
pub fn update_frame(device: &str, ts: i64, seq: u64, changes: &Map<String, Value>) -> String {
    serde_json::json!({"type": "update", "device": device, "ts": ts, "seq": seq, "changes": changes}).to_string()
}

impl Hub {
    /// A hub whose connections queue up to `queue_capacity` frames each, keeping the last
    /// `resume_capacity` updates of each device for resuming clients.
    pub fn new(queue_capacity: usize, resume_capacity: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            next_id: AtomicU64::new(1),
            queue_capacity: queue_capacity.max(1),
            metrics,
            resume: Mutex::new(HashMap::new()),
            resume_capacity,
        }
    }

    /// Registers a new connection of `caller`, unless the caller already has `max_per_user`
    /// connections here.
    ///
    /// # Errors
    /// [`TooManyConnections`].
    pub fn connect(
        &self,
        caller: Arc<Caller>,
        max_per_user: usize,
    ) -> Result<ConnRx, TooManyConnections> {
        let mut inner = self.inner.write();
        let count = inner.per_user.entry(Arc::clone(&caller.user)).or_insert(0);
        if *count >= max_per_user {
            return Err(TooManyConnections);
        }
        *count += 1;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let (atx, arx) = mpsc::unbounded_channel();
        let handle = Arc::new(ConnHandle {
            tx,
            alerts: atx,
            caller,
            behind_since: AtomicI64::new(0),
            pending: Mutex::new(HashMap::new()),
            pending_notify: Notify::new(),
        });
        inner.conns.insert(id, Arc::clone(&handle));
        Ok(ConnRx {
            id,
            rx,
            alerts: arx,
            handle,
        })
    }

    /// Counts `n` queued updates as taken off a connection's queue.
    pub fn dequeued(&self, n: usize) {
        self.metrics.ws_queued.sub(n as i64);
    }

    /// Takes a connection's conflated updates (to send them).
    pub fn take_pending(&self, conn: &ConnHandle) -> HashMap<Arc<str>, Pending> {
        let pending = std::mem::take(&mut *conn.pending.lock());
        self.metrics.ws_pending.sub(pending.len() as i64);
        pending
    }

    /// Removes a connection and all its subscriptions.
    pub fn disconnect(&self, id: u64) {
        let mut inner = self.inner.write();
        if let Some(conn) = inner.conns.remove(&id) {
            if let Some(n) = inner.per_user.get_mut(&conn.caller.user) {
                *n -= 1;
                if *n == 0 {
                    inner.per_user.remove(&conn.caller.user);
                }
            }
        }
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

    /// Pushes a change to every connection watching its device that may see it (`entry`: the
    /// device's registry entry), and keeps it for resuming clients.
    pub fn publish(&self, change: &Change, entry: Option<&DeviceEntry>) {
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
        // Into the resume buffer *before* the connections (see `replay`).
        self.remember(&delivery);
        let inner = self.inner.read();
        for conn in inner.watchers(change.device.as_str()) {
            if !conn.caller.may_see(entry) {
                continue;
            }
            let mut pending = conn.pending.lock();
            if let Some(p) = pending.get_mut(change.device.as_str()) {
                merge_pending(p, change);
                self.metrics.ws_conflated.inc();
                continue;
            }
            match conn.tx.try_send(Outbound::Update(Arc::clone(&delivery))) {
                Ok(()) => self.metrics.ws_queued.inc(),
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
                    self.metrics.ws_pending.inc();
                    let _ = conn.behind_since.compare_exchange(
                        0,
                        now_ms(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    conn.pending_notify.notify_one();
                    self.metrics.ws_conflated.inc();
                }
                // The connection is closing; its task removes it from the hub.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    fn remember(&self, delivery: &Arc<Delivery>) {
        if self.resume_capacity == 0 {
            return;
        }
        let mut resume = self.resume.lock();
        let buf = resume.entry(Arc::clone(&delivery.device)).or_default();
        // A replayed (older) change is already in the buffer or older than all of it.
        if buf.back().is_some_and(|last| last.seq >= delivery.seq) {
            return;
        }
        if buf.len() == self.resume_capacity {
            buf.pop_front();
        }
        buf.push_back(Arc::clone(delivery));
    }

    /// The updates of `device` after `since`, if the buffer still holds all of them.
    ///
    /// Call it *after* subscribing the connection: an update published meanwhile is then in the
    /// buffer or in the connection's queue (or both; the connection drops seqs it has), never in
    /// neither, because `publish` fills the buffer before it looks at the subscriptions.
    pub fn replay(&self, device: &str, since: u64) -> Replay {
        let resume = self.resume.lock();
        let Some(buf) = resume.get(device) else {
            return Replay::Gap;
        };
        match (buf.front(), buf.back()) {
            // Nothing newer than what the client has.
            (_, Some(last)) if last.seq <= since => Replay::Covered(Vec::new()),
            // The buffer starts at or before the first missed seq (seqs have no gaps).
            (Some(first), _) if first.seq <= since + 1 => {
                let missed: Vec<_> = buf.iter().filter(|d| d.seq > since).cloned().collect();
                // Seqs have no gaps; if this instance missed one, a snapshot is the honest answer.
                if missed
                    .iter()
                    .enumerate()
                    .all(|(i, d)| d.seq == since + 1 + i as u64)
                {
                    Replay::Covered(missed)
                } else {
                    Replay::Gap
                }
            }
            _ => Replay::Gap,
        }
    }

    /// Pushes an alert frame to every connection watching `device` that may see it.
    pub fn publish_alert(&self, device: &str, entry: Option<&DeviceEntry>, frame: &Utf8Bytes) {
        let inner = self.inner.read();
        for conn in inner.watchers(device) {
            if conn.caller.may_see(entry) {
                let _ = conn.alerts.send(frame.clone());
            }
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

    fn anon() -> Arc<Caller> {
        Arc::new(Caller::anonymous("local"))
    }

    fn user(name: &str, groups: &[&str]) -> Arc<Caller> {
        Arc::new(Caller {
            user: Arc::from(name),
            admin: false,
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            tier: None,
            expires_at: None,
            authenticated: true,
        })
    }

    fn entry(device: &str, owner: &str, groups: &[&str]) -> DeviceEntry {
        DeviceEntry {
            device: device.into(),
            owner: owner.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            updated_at: 0,
        }
    }

    fn seqs(c: &mut ConnRx) -> Vec<(String, u64)> {
        std::iter::from_fn(|| c.rx.try_recv().ok())
            .map(|Outbound::Update(d)| (d.device.to_string(), d.seq))
            .collect()
    }

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
        let hub = Hub::new(16, 0, Arc::new(Metrics::new()));
        let mut a = hub
            .connect(anon(), usize::MAX)
            .unwrap_or_else(|_| unreachable!());
        let mut b = hub
            .connect(anon(), usize::MAX)
            .unwrap_or_else(|_| unreachable!());
        hub.subscribe(a.id, &["d1".into()], false);
        hub.subscribe(b.id, &["d1".into()], true);
        hub.publish(&change("d1", 1, json!({"t": 1})), None);
        hub.publish(&change("d2", 1, json!({"t": 1})), None);
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
        hub.publish(&change("d1", 2, json!({"t": 2})), None);
        assert!(b.rx.try_recv().is_err());
        assert_eq!(hub.connections(), 1);
    }

    #[test]
    fn full_queue_conflates_per_device_keeping_newest_values() {
        let hub = Hub::new(2, 0, Arc::new(Metrics::new()));
        let mut c = hub
            .connect(anon(), usize::MAX)
            .unwrap_or_else(|_| unreachable!());
        hub.subscribe(c.id, &[], true);
        for seq in 1..=10 {
            hub.publish(
                &change("d1", seq, json!({ "t": seq, format!("f{}", seq % 3): seq })),
                None,
            );
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
        hub.publish(&change("d1", 11, json!({"t": 11})), None);
        assert!(c.rx.try_recv().is_err());
        assert_eq!(c.handle.pending.lock()[&Arc::<str>::from("d1")].seq, 11);
    }

    #[test]
    fn delivers_only_what_the_caller_may_see() {
        let hub = Hub::new(16, 0, Arc::new(Metrics::new()));
        let mut alice = hub
            .connect(user("alice", &[]), 5)
            .unwrap_or_else(|_| unreachable!());
        let mut lab = hub
            .connect(user("carol", &["lab"]), 5)
            .unwrap_or_else(|_| unreachable!());
        // Both subscribe to everything they may see, and alice names bob's device outright (as
        // if the subscribe-time check had been passed before bob took the device over).
        hub.subscribe(alice.id, &["b1".into()], true);
        hub.subscribe(lab.id, &[], true);
        let a1 = entry("a1", "alice", &[]);
        let b1 = entry("b1", "bob", &["lab"]);
        hub.publish(&change("a1", 1, json!({"t": 1})), Some(&a1));
        hub.publish(&change("b1", 1, json!({"t": 1})), Some(&b1));
        hub.publish(&change("x", 1, json!({"t": 1})), None);
        assert_eq!(seqs(&mut alice), vec![("a1".to_owned(), 1)]);
        assert_eq!(seqs(&mut lab), vec![("b1".to_owned(), 1)]);
        // A device registered later is covered by the wildcard.
        hub.publish(
            &change("a2", 1, json!({"t": 1})),
            Some(&entry("a2", "alice", &[])),
        );
        assert_eq!(seqs(&mut alice), vec![("a2".to_owned(), 1)]);
        // Alerts follow the same rule.
        hub.publish_alert("b1", Some(&b1), &Utf8Bytes::from_static("{}"));
        assert!(alice.alerts.try_recv().is_err());
        assert!(lab.alerts.try_recv().is_ok());
    }

    #[test]
    fn caps_connections_per_user() {
        let hub = Hub::new(16, 0, Arc::new(Metrics::new()));
        let a = hub
            .connect(user("alice", &[]), 2)
            .unwrap_or_else(|_| unreachable!());
        let _b = hub
            .connect(user("alice", &[]), 2)
            .unwrap_or_else(|_| unreachable!());
        assert!(hub.connect(user("alice", &[]), 2).is_err());
        assert!(hub.connect(user("bob", &[]), 2).is_ok());
        hub.disconnect(a.id);
        assert!(hub.connect(user("alice", &[]), 2).is_ok());
    }

    #[test]
    fn replays_from_the_buffer_or_reports_a_gap() {
        let hub = Hub::new(16, 4, Arc::new(Metrics::new()));
        for seq in 1..=6 {
            hub.publish(&change("d1", seq, json!({"t": seq})), None);
        }
        // A replayed old change does not enter the buffer twice.
        hub.publish(&change("d1", 5, json!({"t": 5})), None);
        let got = |r: Replay| match r {
            Replay::Covered(v) => Some(v.iter().map(|d| d.seq).collect::<Vec<_>>()),
            Replay::Gap => None,
        };
        // The buffer holds 3..=6.
        assert_eq!(got(hub.replay("d1", 4)), Some(vec![5, 6]));
        assert_eq!(got(hub.replay("d1", 2)), Some(vec![3, 4, 5, 6]));
        assert_eq!(got(hub.replay("d1", 6)), Some(vec![]));
        assert_eq!(got(hub.replay("d1", 9)), Some(vec![]));
        assert_eq!(got(hub.replay("d1", 1)), None, "seq 2 is gone");
        assert_eq!(got(hub.replay("d2", 0)), None, "never seen here");
        // A hole in what this instance saw is a gap too.
        hub.publish(&change("d3", 1, json!({"t": 1})), None);
        hub.publish(&change("d3", 3, json!({"t": 3})), None);
        assert_eq!(got(hub.replay("d3", 0)), None);
        assert_eq!(got(hub.replay("d3", 2)), Some(vec![3]));
    }

    #[test]
    fn a_full_queue_marks_the_connection_behind() {
        let hub = Hub::new(1, 0, Arc::new(Metrics::new()));
        let c = hub
            .connect(anon(), usize::MAX)
            .unwrap_or_else(|_| unreachable!());
        hub.subscribe(c.id, &[], true);
        hub.publish(&change("d1", 1, json!({"t": 1})), None);
        assert_eq!(c.handle.behind_since.load(Ordering::Relaxed), 0);
        hub.publish(&change("d1", 2, json!({"t": 2})), None);
        assert!(c.handle.behind_since.load(Ordering::Relaxed) > 0);
    }
}
