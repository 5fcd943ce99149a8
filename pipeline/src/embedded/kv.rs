//! A small durable key-value table in redb, for state that is neither latest state nor history
//! (rule definitions, rule state, active alarms, the device registry of `iotpipe dev`).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, TableDefinition};

use super::{blocking, unavailable};
use crate::kv::{KeyValue, KvWrite};
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
}

#[async_trait]
impl KeyValue for RedbKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
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

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let (db, keys) = (Arc::clone(&self.db), keys.to_vec());
        blocking(move || {
            let rtx = db.begin_read().map_err(unavailable)?;
            let t = rtx.open_table(TABLE).map_err(unavailable)?;
            keys.iter()
                .map(|k| {
                    Ok(t.get(k.as_str())
                        .map_err(unavailable)?
                        .map(|v| v.value().to_vec()))
                })
                .collect()
        })
        .await
    }

    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
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

    async fn apply(&self, writes: Vec<KvWrite>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let db = Arc::clone(&self.db);
        blocking(move || {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(TABLE).map_err(unavailable)?;
                for w in &writes {
                    match w {
                        KvWrite::Put(k, v) => {
                            t.insert(k.as_str(), v.as_slice()).map_err(unavailable)?;
                        }
                        KvWrite::Delete(k) => {
                            t.remove(k.as_str()).map_err(unavailable)?;
                        }
                    }
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn puts_deletes_and_prefix_scans() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let kv = RedbKv::open(&dir.path().join("kv.redb"))?;
        kv.apply(vec![
            KvWrite::Put("a/1".into(), b"x".to_vec()),
            KvWrite::Put("a/2".into(), b"y".to_vec()),
            KvWrite::Put("b/1".into(), b"z".to_vec()),
        ])
        .await?;
        kv.apply(vec![KvWrite::Delete("a/1".into())]).await?;
        assert_eq!(kv.get("a/1").await?, None);
        assert_eq!(
            kv.get_many(&["a/2".into(), "nope".into()]).await?,
            vec![Some(b"y".to_vec()), None]
        );
        assert_eq!(
            kv.scan_prefix("a/").await?,
            vec![("a/2".to_owned(), b"y".to_vec())]
        );
        Ok(())
    }
}
