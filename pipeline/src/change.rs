//! Latest state and change events: the field-level merge every `LatestStore` applies.
//!
//! A device's latest state is a map of top-level metric fields. Each field remembers the
//! `(ts, arrival, record id)` of the newest record that carried it, and a record replaces a field
//! only when its own key is greater. An old record that arrives late therefore changes nothing and
//! emits no change event. Between records with the same device `ts` the later arrival at ingest
//! wins (devices without a clock get the receive time in ms as `ts`, so two of their messages can
//! share one); the id only breaks the remaining ties. The final state is the same for every
//! processing order (property-tested below).
//!
//! The materializer is the only writer per device (the log is keyed by device), so it numbers the
//! change events of each device `seq = previous + 1` and stores `seq` with the state. Dashboards use
//! it to join snapshots and updates without gaps (see `docs/PROTOCOL.md`).
//!
//! Replays: after a crash, records whose state was written but whose offsets were not committed
//! are processed again. Their fields are no longer newer, so a plain merge would return nothing
//! and the change event they caused — if it never reached the changes stream — would be lost. The
//! state keeps the `(record id, arrival, seq)` of its last [`RECENT_CHANGES`] changes; a replayed
//! record (same id and arrival stamp) found there re-emits its change with the *original* seq (the fields it set that were not overwritten
//! since), and consumers drop any seq they have already seen. So a replay neither loses nor
//! duplicates what a dashboard sees.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::record::{Record, RecordId};

/// How many recent changes a state remembers for replay detection.
pub const RECENT_CHANGES: usize = 16;

/// One field of a device's latest state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldState {
    /// Current value.
    pub v: Value,
    /// Device ts of the newest record that carried this field.
    pub ts: i64,
    /// Arrival stamp of that record; the later arrival wins between records with the same ts.
    #[serde(default)]
    pub arrival: u64,
    /// Id of that record.
    pub rid: RecordId,
    /// The seq of the change that last changed this field's value.
    pub seq: u64,
}

/// The latest state of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatestState {
    /// Device id.
    pub device: String,
    /// Newest device ts applied.
    pub ts: i64,
    /// Seq of the newest change event.
    pub seq: u64,
    /// Newest receive time of any record of this device (epoch ms): "last seen".
    pub last_seen: i64,
    /// Fields by name.
    pub fields: BTreeMap<String, FieldState>,
    /// `(record id, arrival, seq)` of the last changes, newest last; see the module docs.
    #[serde(default)]
    pub recent: VecDeque<(RecordId, u64, u64)>,
}

impl LatestState {
    /// An empty state for `device`.
    pub fn new(device: &str) -> Self {
        Self {
            device: device.to_owned(),
            ts: i64::MIN,
            seq: 0,
            last_seen: i64::MIN,
            fields: BTreeMap::new(),
            recent: VecDeque::new(),
        }
    }

    /// The field values as a JSON object (what `snapshot` messages and `/latest` carry).
    pub fn values(&self) -> Map<String, Value> {
        self.fields
            .iter()
            .map(|(k, f)| (k.clone(), f.v.clone()))
            .collect()
    }
}

/// A change event: the fields a record changed, numbered per device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Device id.
    pub device: String,
    /// Device ts of the record that caused the change.
    pub ts: i64,
    /// Per-device sequence number, starting at 1, without gaps.
    pub seq: u64,
    /// The record that caused it.
    pub record_id: RecordId,
    /// When ingest received that record (epoch ms), for end-to-end latency.
    pub received_at: i64,
    /// Exactly the fields whose values changed, with their new values.
    pub changes: Map<String, Value>,
}

/// What merging one record did.
#[derive(Debug, Clone, PartialEq)]
pub enum MergeOutcome {
    /// New values: emit this change.
    Changed(Change),
    /// The record was applied before (a replay): emit this change again, with its original seq.
    Replayed(Change),
    /// Nothing changed (older record, or same values).
    Unchanged,
}

impl MergeOutcome {
    /// The change to emit, if any.
    pub fn change(&self) -> Option<&Change> {
        match self {
            Self::Changed(c) | Self::Replayed(c) => Some(c),
            Self::Unchanged => None,
        }
    }
}

/// Merges `record` into `state` and returns what to emit. Pure and deterministic.
pub fn merge(state: &mut LatestState, record: &Record) -> MergeOutcome {
    state.last_seen = state.last_seen.max(record.received_at);
    // A replay is the same event again: same record id *and* same arrival stamp (the stamp
    // travels with the record through the log). A device resending identical bytes is a new
    // event with a later arrival, ordered like any other record.
    if let Some(&(_, _, seq)) = state
        .recent
        .iter()
        .find(|(id, arrival, _)| *id == record.id && *arrival == record.arrival)
    {
        let changes: Map<String, Value> = state
            .fields
            .iter()
            .filter(|(_, f)| f.seq == seq && f.rid == record.id && f.arrival == record.arrival)
            .map(|(k, f)| (k.clone(), f.v.clone()))
            .collect();
        if changes.is_empty() {
            return MergeOutcome::Unchanged;
        }
        return MergeOutcome::Replayed(Change {
            device: state.device.clone(),
            ts: record.ts,
            seq,
            record_id: record.id.clone(),
            received_at: record.received_at,
            changes,
        });
    }
    let next_seq = state.seq + 1;
    let mut changes = Map::new();
    let mut touched = false;
    for (k, v) in &record.metrics {
        match state.fields.get_mut(k) {
            Some(f) => {
                if (record.ts, record.arrival, &record.id) <= (f.ts, f.arrival, &f.rid) {
                    continue;
                }
                touched = true;
                f.ts = record.ts;
                f.arrival = record.arrival;
                f.rid = record.id.clone();
                if f.v != *v {
                    f.v = v.clone();
                    f.seq = next_seq;
                    changes.insert(k.clone(), v.clone());
                }
            }
            None => {
                touched = true;
                state.fields.insert(
                    k.clone(),
                    FieldState {
                        v: v.clone(),
                        ts: record.ts,
                        arrival: record.arrival,
                        rid: record.id.clone(),
                        seq: next_seq,
                    },
                );
                changes.insert(k.clone(), v.clone());
            }
        }
    }
    if touched || state.ts == i64::MIN {
        state.ts = state.ts.max(record.ts);
    }
    if changes.is_empty() {
        return MergeOutcome::Unchanged;
    }
    state.seq = next_seq;
    state
        .recent
        .push_back((record.id.clone(), record.arrival, next_seq));
    while state.recent.len() > RECENT_CHANGES {
        state.recent.pop_front();
    }
    MergeOutcome::Changed(Change {
        device: state.device.clone(),
        ts: record.ts,
        seq: next_seq,
        record_id: record.id.clone(),
        received_at: record.received_at,
        changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SourceRef;
    use proptest::prelude::*;
    use serde_json::json;

    fn rec(ts: i64, metrics: Value) -> Record {
        let Value::Object(metrics) = metrics else {
            unreachable!("test metrics are objects")
        };
        let canonical = serde_json::to_vec(&metrics).unwrap_or_default();
        Record {
            id: RecordId::compute("d1", ts, &canonical),
            device: "d1".into(),
            ts,
            received_at: ts,
            arrival: 0,
            metrics,
            source: SourceRef::Internal,
        }
    }

    #[test]
    fn only_changed_fields_are_emitted() {
        let mut s = LatestState::new("d1");
        let c1 = merge(&mut s, &rec(10, json!({"t": 1, "h": 50})));
        assert_eq!(
            c1.change().map(|c| (c.seq, c.changes.clone())),
            Some((
                1,
                json!({"t":1,"h":50})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            ))
        );
        let c2 = merge(&mut s, &rec(20, json!({"t": 2, "h": 50})));
        assert_eq!(
            c2.change()
                .map(|c| (c.seq, Value::Object(c.changes.clone()))),
            Some((2, json!({"t": 2})))
        );
        let c3 = merge(&mut s, &rec(30, json!({"t": 2})));
        assert_eq!(c3, MergeOutcome::Unchanged);
        assert_eq!(s.seq, 2);
    }

    #[test]
    fn older_record_does_not_overwrite_newer_fields() {
        let mut s = LatestState::new("d1");
        merge(&mut s, &rec(20, json!({"t": 2})));
        let late = merge(&mut s, &rec(10, json!({"t": 1, "h": 40})));
        // `h` is new, so it is taken; `t` is older than what we have, so it is not.
        assert_eq!(
            late.change().map(|c| Value::Object(c.changes.clone())),
            Some(json!({"h": 40}))
        );
        assert_eq!(Value::Object(s.values()), json!({"t": 2, "h": 40}));
        assert_eq!(s.ts, 20);
    }

    #[test]
    fn same_value_at_newer_ts_blocks_an_older_different_value() {
        let mut s = LatestState::new("d1");
        merge(&mut s, &rec(10, json!({"t": 5})));
        assert_eq!(
            merge(&mut s, &rec(20, json!({"t": 5}))),
            MergeOutcome::Unchanged
        );
        assert_eq!(
            merge(&mut s, &rec(15, json!({"t": 7}))),
            MergeOutcome::Unchanged
        );
        assert_eq!(Value::Object(s.values()), json!({"t": 5}));
    }

    #[test]
    fn same_ts_later_arrival_wins() {
        let mut s = LatestState::new("d1");
        for (arrival, n) in [(1u64, 93), (2, 94), (3, 95)] {
            let mut r = rec(10, json!({ "n": n }));
            r.arrival = arrival;
            let out = merge(&mut s, &r);
            assert_eq!(
                out.change().map(|c| Value::Object(c.changes.clone())),
                Some(json!({ "n": n }))
            );
        }
        // An earlier arrival with the same ts, processed late, does not win.
        let mut old = rec(10, json!({"n": 1}));
        old.arrival = 0;
        assert_eq!(merge(&mut s, &old), MergeOutcome::Unchanged);
    }

    #[test]
    fn replay_re_emits_with_the_original_seq() {
        let mut s = LatestState::new("d1");
        let r1 = rec(10, json!({"t": 1, "h": 1}));
        let r2 = rec(20, json!({"t": 2}));
        let first = merge(&mut s, &r1);
        merge(&mut s, &r2);
        let again = merge(&mut s, &r1);
        // r1's `t` was overwritten by r2 (seq 2), so only `h` is re-emitted, with seq 1.
        assert_eq!(
            again
                .change()
                .map(|c| (c.seq, Value::Object(c.changes.clone()))),
            Some((1, json!({"h": 1})))
        );
        assert!(matches!(first, MergeOutcome::Changed(_)));
        assert!(matches!(again, MergeOutcome::Replayed(_)));
        assert_eq!(s.seq, 2);
    }

    fn arb_records() -> impl Strategy<Value = Vec<Record>> {
        prop::collection::vec(
            (
                0i64..50,
                prop::collection::btree_map(
                    prop::sample::select(vec!["a", "b", "c", "d"]),
                    0i64..4,
                    1..4,
                ),
            ),
            1..25,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (ts, m))| {
                    let mut r = rec(
                        ts,
                        Value::Object(
                            m.into_iter()
                                .map(|(k, v)| (k.to_owned(), json!(v)))
                                .collect(),
                        ),
                    );
                    r.arrival = i as u64;
                    r
                })
                .collect()
        })
    }

    proptest! {
        /// Whatever the processing order (with duplicates), the final state is, per field, the value
        /// of the record with the greatest (ts, arrival, id) that carried it; seqs have no gaps; each change
        /// holds exactly the fields whose visible value changed.
        #[test]
        fn final_state_is_per_field_newest(records in arb_records(), seed in any::<u64>(), dups in 0usize..5) {
            let mut order: Vec<Record> = records.clone();
            order.extend(records.iter().take(dups).cloned());
            // Deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut s = LatestState::new("d1");
            let mut last_seq = 0;
            for r in &order {
                let before = s.values();
                let out = merge(&mut s, r);
                let after = s.values();
                if let MergeOutcome::Changed(c) = &out {
                    prop_assert_eq!(c.seq, last_seq + 1);
                    last_seq = c.seq;
                    let diff: Map<String, Value> = after.iter().filter(|(k, v)| before.get(*k) != Some(v)).map(|(k, v)| (k.clone(), v.clone())).collect();
                    prop_assert_eq!(&c.changes, &diff);
                } else {
                    prop_assert_eq!(&before, &after);
                }
            }
            let mut expected: BTreeMap<String, (i64, u64, RecordId, Value)> = BTreeMap::new();
            for r in &records {
                for (k, v) in &r.metrics {
                    let cand = (r.ts, r.arrival, r.id.clone(), v.clone());
                    match expected.get(k) {
                        Some(cur) if (cur.0, cur.1, &cur.2) >= (cand.0, cand.1, &cand.2) => {}
                        _ => { expected.insert(k.clone(), cand); }
                    }
                }
            }
            let expected: Map<String, Value> = expected.into_iter().map(|(k, (_, _, _, v))| (k, v)).collect();
            prop_assert_eq!(s.values(), expected);
            prop_assert_eq!(s.seq, last_seq);
        }
    }
}
