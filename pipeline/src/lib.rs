//! iotpipe's core: the event model, the traits every backend and operator is written against, the
//! operator runtime, and the embedded backends that let `iotpipe dev` run with no external service.
//!
//! Data flows `Source -> ingest -> Log(telemetry) -> operators -> stores / Log(changes) -> fanout`.
//! This crate knows no concrete operator: operators (in `iotpipe-operators`) implement
//! [`runtime::Operator`] and the runtime owns the consume loop, batching, retries, shutdown and
//! commit-after-success, so the same operator code runs on the embedded backends here and on the
//! distributed ones (Kafka, Redis, DynamoDB).
//!
//! # Layout
//! - [`record`]: telemetry records, payload parsing and validation, deterministic record ids.
//! - [`dead_letter`]: what bad input becomes (reason, stage, bounded original bytes).
//! - [`change`]: latest state, the field-level merge with its out-of-order guard, change events.
//! - [`log`]: the partitioned, keyed [`log::Log`] with consumer groups and commits.
//! - [`store`]: [`store::LatestStore`], [`store::HistoryStore`], [`store::DeadLetterStore`].
//! - [`source`]: the [`source::Source`] trait ingest reads from (MQTT now, Kinesis later).
//! - [`runtime`]: the operator trait and the loops that drive operators and sources.
//! - [`metrics`]: every Prometheus metric, registered once.
//! - [`health`]: readiness checks behind `/readyz`.
//! - [`kv`]: a small durable key-value interface for control data (rules, rule state, alarms).
//! - [`ratelimit`]: per-key GCRA rate limits (in process; the Redis one is in `iotpipe-redis`).
//! - [`registry`]: the device registry (device -> owner, groups) and its cache.
//! - [`embedded`]: in-process log and redb-backed stores.
//! - [`error`]: the error classification shared by all of the above.

pub mod change;
pub mod dead_letter;
pub mod embedded;
pub mod error;
pub mod health;
pub mod kv;
pub mod log;
pub mod metrics;
pub mod ratelimit;
pub mod record;
pub mod registry;
pub mod runtime;
pub mod source;
pub mod store;
pub mod time;

pub use change::{Change, FieldState, LatestState, MergeOutcome};
pub use dead_letter::{DeadLetter, Stage};
pub use error::{ErrorClass, Retryable};
pub use record::{Limits, Record, RecordId, RejectReason, Rejection, SourceRef};
