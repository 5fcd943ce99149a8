//! A small durable key-value table in redb, for state that is neither latest state nor history
//! (rule state and active alarms, later the device registry).

use std::path::Path;
use std::sync::Arc;

use redb::{Database, TableDefinition};

use super::{blocking, unavailable};
use crate::store::StoreError;

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");

/// A redb-backed key-value table.
#[derive(Clone)]
pub struct RedbKv {
    db: Arc<Database>,
}

impl RedbKv {
    /// Opens (or creates) the table at `path`.
    ///
    /// # Errors
    /// [`StoreError`] when the file cannot be opened.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = super::open_db(path, 8 << 20)?;
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(TABLE).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// The value of `key`.
    ///
    /// # Errors
    /// [`StoreError`] when the read fails.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (db, key) = (Arc::clone(&self.db), key.to_owned());
        blocking(move || {
            let rtx = db.begin_read().map_err(unavailable)?;
            let t = rtx.open_table(TABLE).map_err(unavailable)?;
            Ok(t.get(key.as_str())
                .map_err(unavailable)?
                .map(|v| v.value().to_vec()))
        })
        .await
    }

    /// Every pair whose key starts with `prefix`.
    ///
    /// # Errors
    /// [`StoreError`] when the read fails.
    pub async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (db, prefix) = (Arc::clone(&self.db), prefix.to_owned());
        blocking(move || {
            let rtx = db.begin_read().map_err(unavailable)?;
            let t = rtx.open_table(TABLE).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.range(prefix.as_str()..).map_err(unavailable)? {
                let (k, v) = row.map_err(unavailable)?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    /// Writes every pair in one durable transaction.
    ///
    /// # Errors
    /// [`StoreError`] when the write fails; nothing is written then.
    pub async fn put_many(&self, pairs: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let db = Arc::clone(&self.db);
        blocking(move || {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(TABLE).map_err(unavailable)?;
                for (k, v) in &pairs {
                    t.insert(k.as_str(), v.as_slice()).map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }
}
