//! The partitioned, keyed log between pipeline stages (Kafka in distributed mode, an in-process log
//! in `iotpipe dev`).
//!
//! Records with the same key land in the same partition, in append order; that is how all records of
//! a device reach one materializer in order. Consumers belong to groups, each group has its own
//! committed offset per partition, and a consumer resumes from its group's committed offsets.
//!
//! The contract that makes delivery at-least-once: [`Log::append`] returns only once the log has
//! durably accepted every record of the batch (the Kafka delivery report; the in-process insert),
//! so the caller may then acknowledge its own upstream. [`Consumer::commit`] is called by the runtime
//! only after the operator's side effect for every committed record is durable.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{ErrorClass, Retryable};

/// Names of the topics the pipeline uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    /// Validated telemetry records, keyed by device id.
    pub telemetry: String,
    /// Change events from the materializer, keyed by device id.
    pub changes: String,
    /// Alerts raised by rules, keyed by device id.
    pub alerts: String,
    /// Dead letters from every stage.
    pub dead_letters: String,
    /// Rule definitions, keyed by rule id (compacted): how rules reach every rules worker.
    pub rules: String,
    /// Device registry changes, keyed by device id (compacted): cache invalidation.
    pub registry: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            telemetry: "iot.telemetry".into(),
            changes: "iot.changes".into(),
            alerts: "iot.alerts".into(),
            dead_letters: "iot.dlq".into(),
            rules: "iot.rules".into(),
            registry: "iot.registry".into(),
        }
    }
}

/// One record read from the log.
#[derive(Debug, Clone)]
pub struct LogRecord {
    /// Partition it was read from.
    pub partition: u32,
    /// Its offset within the partition.
    pub offset: u64,
    /// Its key (the device id for every topic of iotpipe).
    pub key: Bytes,
    /// Its value (JSON).
    pub value: Bytes,
}

/// A record to append.
#[derive(Debug, Clone)]
pub struct Produce {
    /// Partitioning key.
    pub key: Bytes,
    /// Value.
    pub value: Bytes,
}

impl Produce {
    /// A record with a string key and a JSON-serialized value.
    ///
    /// # Errors
    /// [`LogError::Encode`] when `value` cannot be serialized (a bug).
    pub fn json<T: serde::Serialize>(key: &str, value: &T) -> Result<Self, LogError> {
        Ok(Self {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from(
                serde_json::to_vec(value).map_err(|e| LogError::Encode(e.to_string()))?,
            ),
        })
    }
}

/// Errors of a log backend.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The topic does not exist.
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    /// The backend is unreachable, overloaded or timed out.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// The log has been closed (shutdown).
    #[error("log closed")]
    Closed,
    /// A value could not be encoded.
    #[error("cannot encode record: {0}")]
    Encode(String),
}

impl Retryable for LogError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Unavailable(_) => ErrorClass::External,
            Self::UnknownTopic(_) | Self::Closed | Self::Encode(_) => ErrorClass::Bug,
        }
    }
}

/// The log: append and subscribe.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Appends a batch; returns once the log durably holds every record of it.
    ///
    /// # Errors
    /// [`LogError`]; on error, none, some or all records may have been appended (the caller
    /// retries, and record ids make the retry harmless downstream).
    async fn append(&self, topic: &str, batch: Vec<Produce>) -> Result<(), LogError>;

    /// Joins consumer group `group` on `topic`. The consumer resumes at the group's committed
    /// offsets, or at the earliest retained record for a new group.
    ///
    /// # Errors
    /// [`LogError`] when the topic is unknown or the backend unreachable.
    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Consumer>, LogError> {
        self.subscribe_at(topic, group, StartAt::Earliest).await
    }

    /// Like [`Log::subscribe`], but a group without committed offsets starts at `start` instead
    /// of the earliest record. Fanout instances use [`StartAt::Latest`]: each has its own group,
    /// and a new instance has no use for old changes (its clients take snapshots).
    ///
    /// # Errors
    /// As for `subscribe`.
    async fn subscribe_at(
        &self,
        topic: &str,
        group: &str,
        start: StartAt,
    ) -> Result<Box<dyn Consumer>, LogError>;
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// At the earliest retained record.
    Earliest,
    /// At the end: only records appended from now on.
    Latest,
}

/// A member of a consumer group.
#[async_trait]
pub trait Consumer: Send {
    /// Returns up to `max` records, waiting up to `wait` for the first one; an empty vector means
    /// nothing arrived in time. Cancel-safe: dropping the future loses no record.
    ///
    /// # Errors
    /// [`LogError`] when the backend fails.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<LogRecord>, LogError>;

    /// Commits, for each `(partition, next_offset)`, that every record below `next_offset` has been
    /// fully processed by this group.
    ///
    /// # Errors
    /// [`LogError`] when the backend fails; the records will then be delivered again.
    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), LogError>;

    /// Records appended but not yet committed by this group, summed over its partitions, when the
    /// backend can tell cheaply.
    fn lag(&self) -> Option<u64> {
        None
    }

    /// Whether this member has joined its group and received its assignment (which may be
    /// empty when there are more members than partitions). `/readyz` waits for it.
    fn joined(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        None
    }
}

/// The partition a key maps to (FNV-1a, stable across processes and versions).
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    u32::try_from(h % u64::from(partitions.max(1))).unwrap_or(0)
}
