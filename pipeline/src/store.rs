//! The stores operators write to and the API reads from.
//!
//! - [`LatestStore`]: each device's latest state, merged with the out-of-order guard of
//!   [`crate::change::merge`]; returns what changed.
//! - [`HistoryStore`]: every record, written idempotently under its record id, queried by device and
//!   time range with a cursor.
//! - [`DeadLetterStore`]: the recent dead letters, for `GET /v1/dead-letters`.
//!
//! Every write returns only once it is durable: the runtime commits log offsets right after.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::change::{LatestState, MergeOutcome};
use crate::dead_letter::DeadLetter;
use crate::error::{ErrorClass, Retryable};
use crate::record::{Record, RecordId};

/// Errors of a store backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend is unreachable, throttling or timed out.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A query parameter is invalid (a bad cursor): the caller's input.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// Stored data could not be decoded, or another invariant broke.
    #[error("store corrupt: {0}")]
    Corrupt(String),
}

impl Retryable for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Unavailable(_) => ErrorClass::External,
            Self::InvalidQuery(_) => ErrorClass::Input,
            Self::Corrupt(_) => ErrorClass::Bug,
        }
    }
}

/// One device in the device list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSummary {
    /// Device id.
    pub device: String,
    /// Newest receive time, epoch ms.
    pub last_seen: i64,
    /// Newest device ts.
    pub ts: i64,
    /// Current seq.
    pub seq: u64,
}

/// Latest state per device.
#[async_trait]
pub trait LatestStore: Send + Sync + 'static {
    /// Merges each record (in order) into its device's state and persists the result; returns one
    /// outcome per record.
    ///
    /// # Errors
    /// [`StoreError`]; on error nothing of the batch may be assumed written.
    async fn merge(&self, records: &[Record]) -> Result<Vec<MergeOutcome>, StoreError>;

    /// The state of one device.
    ///
    /// # Errors
    /// [`StoreError`] when the backend fails.
    async fn get(&self, device: &str) -> Result<Option<LatestState>, StoreError>;

    /// Known devices, most recently seen first.
    ///
    /// # Errors
    /// [`StoreError`] when the backend fails.
    async fn devices(&self, limit: usize) -> Result<Vec<DeviceSummary>, StoreError>;
}

/// Sort order of a history query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Oldest first.
    #[default]
    Asc,
    /// Newest first.
    Desc,
}

/// A history range query.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    /// Device id.
    pub device: String,
    /// Inclusive lower bound, epoch ms.
    pub from: i64,
    /// Inclusive upper bound, epoch ms.
    pub to: i64,
    /// Page size.
    pub limit: usize,
    /// Order.
    pub order: Order,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
}

/// One stored history row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryItem {
    /// Device ts.
    pub ts: i64,
    /// Record id.
    pub id: RecordId,
    /// Metrics.
    pub metrics: Map<String, Value>,
}

/// The cursor of a history page: the `(ts, record id)` of its last row, as `ts.id`. Every history
/// store pages by it, so a cursor means the same whatever the backend.
pub fn format_cursor(item: &HistoryItem) -> String {
    format!("{}.{}", item.ts, item.id)
}

/// Parses a cursor made by [`format_cursor`].
///
/// # Errors
/// [`StoreError::InvalidQuery`] for a malformed cursor (it comes from the client).
pub fn parse_cursor(c: &str) -> Result<(i64, String), StoreError> {
    let bad = || StoreError::InvalidQuery(format!("malformed cursor `{c}`"));
    let (ts, id) = c.split_once('.').ok_or_else(bad)?;
    let ts: i64 = ts.parse().map_err(|_| bad())?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok((ts, id.to_owned()))
}

/// One page of a history query.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// Rows, in the requested order.
    pub items: Vec<HistoryItem>,
    /// Cursor for the next page, `None` on the last one.
    pub next_cursor: Option<String>,
}

impl HistoryPage {
    /// A page from up to `limit + 1` rows read in order: the extra row only says that there is
    /// a next page, whose cursor is the last row kept.
    pub fn from_overfetched(mut items: Vec<HistoryItem>, limit: usize) -> Self {
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(format_cursor)
        } else {
            None
        };
        Self { items, next_cursor }
    }
}

/// Every record, by device and time.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Writes records idempotently: a record whose id is already stored is overwritten, never
    /// duplicated.
    ///
    /// # Errors
    /// [`StoreError`]; on error the caller retries the whole batch.
    async fn write(&self, records: &[Record]) -> Result<(), StoreError>;

    /// One page of a range query.
    ///
    /// # Errors
    /// [`StoreError::InvalidQuery`] for a malformed cursor; other variants when the backend fails.
    async fn query(&self, q: &HistoryQuery) -> Result<HistoryPage, StoreError>;
}

/// Recent dead letters.
#[async_trait]
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Stores dead letters; the store keeps a bounded number of the newest.
    ///
    /// # Errors
    /// [`StoreError`] when the backend fails.
    async fn push(&self, letters: &[DeadLetter]) -> Result<(), StoreError>;

    /// The newest `limit` dead letters, newest first.
    ///
    /// # Errors
    /// [`StoreError`] when the backend fails.
    async fn recent(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
}

/// A small read-through cache for API responses (history pages), shared by fanout instances.
#[async_trait]
pub trait PageCache: Send + Sync + 'static {
    /// The cached value of `key`, if present and fresh.
    ///
    /// # Errors
    /// [`StoreError`] when the cache fails (callers then go to the source).
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Stores `value` under `key` for `ttl`.
    ///
    /// # Errors
    /// [`StoreError`] when the cache fails (callers ignore it).
    async fn put(&self, key: &str, value: &str, ttl: std::time::Duration)
        -> Result<(), StoreError>;
}
