//! Recent dead letters in redb, keyed by an increasing sequence number; the oldest are removed once
//! more than `keep` are stored.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{blocking, unavailable};
use crate::dead_letter::DeadLetter;
use crate::store::{DeadLetterStore, StoreError};

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// redb-backed [`DeadLetterStore`].
pub struct RedbDeadLetters {
    db: Arc<Database>,
    next: Arc<AtomicU64>,
    keep: u64,
}

impl RedbDeadLetters {
    /// Opens (or creates) the store at `path`, keeping the newest `keep` dead letters.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be opened.
    pub fn open(path: &Path, keep: u64) -> Result<Self, StoreError> {
        let db = super::open_db(path, 4 << 20)?;
        let tx = db.begin_write().map_err(unavailable)?;
        let next = {
            let t = tx.open_table(TABLE).map_err(unavailable)?;
            let last = t.last().map_err(unavailable)?.map(|(k, _)| k.value());
            last.map_or(0, |k| k + 1)
        };
        tx.commit().map_err(unavailable)?;
        Ok(Self {
            db: Arc::new(db),
            next: Arc::new(AtomicU64::new(next)),
            keep: keep.max(1),
        })
    }
}

#[async_trait]
impl DeadLetterStore for RedbDeadLetters {
    async fn push(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        let rows: Vec<Vec<u8>> = letters
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let db = Arc::clone(&self.db);
        let next = Arc::clone(&self.next);
        let keep = self.keep;
        blocking(move || {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(TABLE).map_err(unavailable)?;
                for row in &rows {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    t.insert(k, row.as_slice()).map_err(unavailable)?;
                }
                while t.len().map_err(unavailable)? > keep {
                    t.pop_first().map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn recent(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let db = Arc::clone(&self.db);
        blocking(move || {
            let rtx = db.begin_read().map_err(unavailable)?;
            let t = rtx.open_table(TABLE).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)?.rev().take(limit) {
                let (_, v) = row.map_err(unavailable)?;
                out.push(
                    serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                );
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letter::Stage;
    use crate::record::{RejectReason, Rejection, SourceRef};

    #[tokio::test]
    async fn keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let path = dir.path().join("dl.redb");
        let mk = |i: usize| {
            DeadLetter::from_rejection(
                Stage::Ingest,
                &Rejection::new(RejectReason::InvalidJson, format!("n{i}")),
                None,
                SourceRef::Internal,
                b"x",
                0,
            )
        };
        {
            let s = RedbDeadLetters::open(&path, 5).unwrap_or_else(|e| unreachable!("{e}"));
            s.push(&(0..4).map(mk).collect::<Vec<_>>())
                .await
                .unwrap_or_else(|e| unreachable!("{e}"));
        }
        let s = RedbDeadLetters::open(&path, 5).unwrap_or_else(|e| unreachable!("{e}"));
        s.push(&(4..8).map(mk).collect::<Vec<_>>())
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let got: Vec<String> = s
            .recent(100)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.detail)
            .collect();
        assert_eq!(got, vec!["n7", "n6", "n5", "n4", "n3"]);
    }
}
