//! History in redb: one row per record under the key `device 0x00 ts record-id`, so rows of a device
//! sort by time, a range query is one ordered scan, and a replayed record overwrites its own row.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, TableDefinition};

use super::{blocking, unavailable};
use crate::record::{Record, RecordId};
use crate::store::{
    parse_cursor, HistoryItem, HistoryPage, HistoryQuery, HistoryStore, Order, StoreError,
};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("history");

/// redb-backed [`HistoryStore`].
pub struct RedbHistory {
    db: Arc<Database>,
}

/// `i64` mapped to big-endian bytes that sort like the numbers (sign bit flipped).
fn ts_bytes(ts: i64) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

fn ts_from(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(a) ^ (1 << 63)) as i64
}

fn key(device: &str, ts: i64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 1 + 8 + id.len());
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&ts_bytes(ts));
    k.extend_from_slice(id.as_bytes());
    k
}

impl RedbHistory {
    /// Opens (or creates) the store at `path`.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be opened.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = super::open_db(path, 64 << 20)?;
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(TABLE).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(Self { db: Arc::new(db) })
    }
}

#[async_trait]
impl HistoryStore for RedbHistory {
    async fn write(&self, records: &[Record]) -> Result<(), StoreError> {
        let rows: Vec<(Vec<u8>, Vec<u8>)> = records
            .iter()
            .map(|r| serde_json::to_vec(&r.metrics).map(|v| (key(&r.device, r.ts, &r.id.0), v)))
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let db = Arc::clone(&self.db);
        blocking(move || {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(TABLE).map_err(unavailable)?;
                for (k, v) in &rows {
                    t.insert(k.as_slice(), v.as_slice()).map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn query(&self, q: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        let cursor = q.cursor.as_deref().map(parse_cursor).transpose()?;
        let q = q.clone();
        let db = Arc::clone(&self.db);
        blocking(move || {
            let lo_key = key(&q.device, q.from, "");
            // Upper bound: every id at `to` sorts below 0xff.
            let mut hi_key = key(&q.device, q.to, "");
            hi_key.push(0xff);
            let (lo, hi): (Bound<Vec<u8>>, Bound<Vec<u8>>) = match (&cursor, q.order) {
                (None, _) => (Bound::Included(lo_key), Bound::Included(hi_key)),
                (Some((ts, id)), Order::Asc) => (
                    Bound::Excluded(key(&q.device, *ts, id)),
                    Bound::Included(hi_key),
                ),
                (Some((ts, id)), Order::Desc) => (
                    Bound::Included(lo_key),
                    Bound::Excluded(key(&q.device, *ts, id)),
                ),
            };
            let rtx = db.begin_read().map_err(unavailable)?;
            let t = rtx.open_table(TABLE).map_err(unavailable)?;
            let range = t
                .range::<&[u8]>((as_slice(&lo), as_slice(&hi)))
                .map_err(unavailable)?;
            let limit = q.limit.max(1);
            let mut items = Vec::with_capacity(limit.min(1024));
            let prefix_len = q.device.len() + 1;
            let mut push = |row: Result<
                (redb::AccessGuard<'_, &[u8]>, redb::AccessGuard<'_, &[u8]>),
                redb::StorageError,
            >|
             -> Result<(), StoreError> {
                let (k, v) = row.map_err(unavailable)?;
                let k = k.value();
                if k.len() < prefix_len + 8 {
                    return Err(StoreError::Corrupt("short history key".into()));
                }
                let ts = ts_from(&k[prefix_len..]);
                let id = String::from_utf8_lossy(&k[prefix_len + 8..]).into_owned();
                let metrics = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                items.push(HistoryItem {
                    ts,
                    id: RecordId(id),
                    metrics,
                });
                Ok(())
            };
            // Read one more than asked to learn whether another page exists.
            match q.order {
                Order::Asc => {
                    for row in range.take(limit + 1) {
                        push(row)?;
                    }
                }
                Order::Desc => {
                    for row in range.rev().take(limit + 1) {
                        push(row)?;
                    }
                }
            }
            Ok(HistoryPage::from_overfetched(items, limit))
        })
        .await
    }
}

fn as_slice(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(v) => Bound::Included(v.as_slice()),
        Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{parse_record, Limits, SourceRef};

    const NOW: i64 = 1_750_000_000_000;

    fn rec(device: &str, ts: i64, n: i64) -> Record {
        parse_record(
            device,
            format!(r#"{{"ts":{ts},"n":{n}}}"#).as_bytes(),
            NOW,
            SourceRef::Internal,
            &Limits::default(),
        )
        .unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn q(order: Order, limit: usize, cursor: Option<String>) -> HistoryQuery {
        HistoryQuery {
            device: "d1".into(),
            from: NOW - 1000,
            to: NOW,
            limit,
            order,
            cursor,
        }
    }

    #[tokio::test]
    async fn idempotent_writes_ranges_and_paging() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let h =
            RedbHistory::open(&dir.path().join("h.redb")).unwrap_or_else(|e| unreachable!("{e}"));
        let recs: Vec<Record> = (0..10).map(|i| rec("d1", NOW - 900 + i * 100, i)).collect();
        h.write(&recs).await.unwrap_or_else(|e| unreachable!("{e}"));
        // Replaying the same records overwrites, never duplicates.
        h.write(&recs).await.unwrap_or_else(|e| unreachable!("{e}"));
        // Another device with a prefix of the name must not leak in.
        h.write(&[rec("d10", NOW - 500, 99), rec("d", NOW - 500, 98)])
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        for order in [Order::Asc, Order::Desc] {
            let mut all = Vec::new();
            let mut cursor = None;
            loop {
                let page = h
                    .query(&q(order, 3, cursor.clone()))
                    .await
                    .unwrap_or_else(|e| unreachable!("{e}"));
                assert!(page.items.len() <= 3);
                all.extend(
                    page.items
                        .iter()
                        .map(|i| i.metrics["n"].as_i64().unwrap_or(-1)),
                );
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            let mut expected: Vec<i64> = (0..10).collect();
            if order == Order::Desc {
                expected.reverse();
            }
            assert_eq!(all, expected, "{order:?}");
        }
        // Range bounds are inclusive.
        let mut narrow = q(Order::Asc, 100, None);
        narrow.from = NOW - 800;
        narrow.to = NOW - 600;
        let got: Vec<i64> = h
            .query(&narrow)
            .await
            .map(|p| p.items.iter().map(|i| i.ts).collect())
            .unwrap_or_default();
        assert_eq!(got, vec![NOW - 800, NOW - 700, NOW - 600]);
        assert!(matches!(
            h.query(&q(Order::Asc, 3, Some("garbage".into()))).await,
            Err(StoreError::InvalidQuery(_))
        ));
    }

    #[test]
    fn ts_encoding_sorts_like_numbers() {
        let v = [i64::MIN, -5, 0, 5, 1_750_000_000_000, i64::MAX];
        for w in v.windows(2) {
            assert!(ts_bytes(w[0]) < ts_bytes(w[1]));
            assert_eq!(ts_from(&ts_bytes(w[0])), w[0]);
        }
    }
}
