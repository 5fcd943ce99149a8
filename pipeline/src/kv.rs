//! A small durable key-value interface for control data that is neither latest state nor history:
//! rule definitions, rule state and active alarms, the device registry of `iotpipe dev`.
//!
//! Implemented by [`crate::embedded::RedbKv`] (one file) and by the Redis backend (one hash).
//! Keys are namespaced by a prefix (`rule/`, `rule-state/`, `alarm/`, `device/`), so one table
//! serves several uses and [`KeyValue::scan_prefix`] lists one of them.

use async_trait::async_trait;

use crate::store::StoreError;

/// One write of a [`KeyValue::apply`] batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    /// Sets `key` to the value.
    Put(String, Vec<u8>),
    /// Removes `key` (a no-op when absent).
    Delete(String),
}

/// A durable key-value table.
#[async_trait]
pub trait KeyValue: Send + Sync + 'static {
    /// The value of `key`.
    ///
    /// # Errors
    /// [`StoreError`] when the read fails.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The values of `keys`, in order (one round trip where the backend allows).
    ///
    /// # Errors
    /// [`StoreError`] when the read fails.
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.get(k).await?);
        }
        Ok(out)
    }

    /// Every pair whose key starts with `prefix`, sorted by key.
    ///
    /// # Errors
    /// [`StoreError`] when the read fails.
    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Applies every write durably, all or nothing.
    ///
    /// # Errors
    /// [`StoreError`] when the write fails; nothing is written then.
    async fn apply(&self, writes: Vec<KvWrite>) -> Result<(), StoreError>;
}
