//! Latest state in redb, with the whole state also held in memory.
//!
//! The materializer is the only writer, so an in-memory copy is always current: reads (snapshots,
//! `/latest`, the device list) never touch the disk, and a merge reads the previous states from
//! memory, computes the outcome with [`crate::change::merge`], writes the new states in one fsync'd
//! transaction and only then updates the copy — so nobody can read a state that is not durable.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use redb::{Database, ReadableTable, TableDefinition};

use super::{blocking, unavailable};
use crate::change::{merge, LatestState, MergeOutcome};
use crate::record::Record;
use crate::store::{DeviceSummary, LatestStore, StoreError};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("latest");

/// redb-backed [`LatestStore`].
pub struct RedbLatest {
    db: Arc<Database>,
    cache: RwLock<HashMap<String, Arc<LatestState>>>,
}

impl RedbLatest {
    /// Opens (or creates) the store at `path` and loads every state into memory.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be opened or holds undecodable data.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = super::open_db(path, 16 << 20)?;
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(TABLE).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        let mut cache = HashMap::new();
        {
            let rtx = db.begin_read().map_err(unavailable)?;
            let t = rtx.open_table(TABLE).map_err(unavailable)?;
            for row in t.iter().map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                let state: LatestState = serde_json::from_slice(v.value()).map_err(|e| {
                    StoreError::Corrupt(format!("latest state of {}: {e}", k.value()))
                })?;
                cache.insert(k.value().to_owned(), Arc::new(state));
            }
        }
        Ok(Self {
            db: Arc::new(db),
            cache: RwLock::new(cache),
        })
    }
}

#[async_trait]
impl LatestStore for RedbLatest {
    async fn merge(&self, records: &[Record]) -> Result<Vec<MergeOutcome>, StoreError> {
        let mut touched: HashMap<String, LatestState> = HashMap::new();
        let mut outcomes = Vec::with_capacity(records.len());
        {
            let cache = self.cache.read();
            for r in records {
                let state = touched.entry(r.device.clone()).or_insert_with(|| {
                    cache
                        .get(&r.device)
                        .map_or_else(|| LatestState::new(&r.device), |s| (**s).clone())
                });
                outcomes.push(merge(state, r));
            }
        }
        let encoded: Vec<(String, Vec<u8>)> = touched
            .iter()
            .map(|(k, s)| serde_json::to_vec(s).map(|v| (k.clone(), v)))
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let db = Arc::clone(&self.db);
        blocking(move || {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(TABLE).map_err(unavailable)?;
                for (k, v) in &encoded {
                    t.insert(k.as_str(), v.as_slice()).map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await?;
        let mut cache = self.cache.write();
        for (k, s) in touched {
            cache.insert(k, Arc::new(s));
        }
        Ok(outcomes)
    }

    async fn get(&self, device: &str) -> Result<Option<LatestState>, StoreError> {
        Ok(self.cache.read().get(device).map(|s| (**s).clone()))
    }

    async fn devices(&self, limit: usize) -> Result<Vec<DeviceSummary>, StoreError> {
        let mut all: Vec<DeviceSummary> = self
            .cache
            .read()
            .values()
            .map(|s| DeviceSummary {
                device: s.device.clone(),
                last_seen: s.last_seen,
                ts: s.ts,
                seq: s.seq,
            })
            .collect();
        all.sort_by(|a, b| {
            b.last_seen
                .cmp(&a.last_seen)
                .then_with(|| a.device.cmp(&b.device))
        });
        all.truncate(limit);
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{parse_record, Limits, SourceRef};

    fn rec(device: &str, ts: i64, payload: &str) -> Record {
        parse_record(
            device,
            payload.replace("TS", &ts.to_string()).as_bytes(),
            ts,
            SourceRef::Internal,
            &Limits::default(),
        )
        .unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[tokio::test]
    async fn merge_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let path = dir.path().join("latest.redb");
        let now = 1_750_000_000_000;
        {
            let s = RedbLatest::open(&path).unwrap_or_else(|e| unreachable!("{e}"));
            let out = s
                .merge(&[
                    rec("d1", now, r#"{"ts":TS,"t":1}"#),
                    rec("d1", now + 1, r#"{"ts":TS,"t":2,"h":3}"#),
                    rec("d2", now, r#"{"ts":TS,"x":1}"#),
                ])
                .await
                .unwrap_or_default();
            let seqs: Vec<Option<u64>> = out.iter().map(|o| o.change().map(|c| c.seq)).collect();
            assert_eq!(seqs, vec![Some(1), Some(2), Some(1)]);
        }
        let s = RedbLatest::open(&path).unwrap_or_else(|e| unreachable!("{e}"));
        let d1 = s
            .get("d1")
            .await
            .ok()
            .flatten()
            .map(|s| (s.seq, serde_json::Value::Object(s.values())));
        assert_eq!(d1, Some((2, serde_json::json!({"t": 2, "h": 3}))));
        assert_eq!(s.devices(10).await.map(|d| d.len()).unwrap_or(0), 2);
        // The next change continues the stored seq.
        let out = s
            .merge(&[rec("d1", now + 2, r#"{"ts":TS,"t":9}"#)])
            .await
            .unwrap_or_default();
        assert_eq!(out.first().and_then(|o| o.change()).map(|c| c.seq), Some(3));
    }
}
