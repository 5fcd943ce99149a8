//! The history operator: writes every telemetry record to the history store, in batches.
//!
//! Writes are keyed by record id, so a batch replayed after a crash overwrites the rows it already
//! wrote and never duplicates them; offsets are committed by the runtime only after the write
//! returned, so no record is skipped either.

use std::sync::Arc;

use async_trait::async_trait;
use iotpipe_pipeline::dead_letter::Stage;
use iotpipe_pipeline::log::{Log, LogRecord, Topics};
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::runtime::{Operator, OperatorError};
use iotpipe_pipeline::store::HistoryStore;
use serde::{Deserialize, Serialize};

use crate::materialize::decode_records;

/// Settings of the history operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Most records written in one store transaction.
    pub max_batch: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self { max_batch: 1000 }
    }
}

/// The history operator.
pub struct History {
    store: Arc<dyn HistoryStore>,
    log: Arc<dyn Log>,
    topics: Topics,
    metrics: Arc<Metrics>,
}

impl History {
    /// Builds the operator.
    pub fn new(
        store: Arc<dyn HistoryStore>,
        log: Arc<dyn Log>,
        topics: Topics,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            log,
            topics,
            metrics,
        }
    }
}

#[async_trait]
impl Operator for History {
    fn name(&self) -> &'static str {
        "history"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        let records = decode_records(
            batch,
            Stage::History,
            &self.metrics,
            self.log.as_ref(),
            &self.topics,
        )
        .await?;
        if !records.is_empty() {
            self.store.write(&records).await?;
            self.metrics.history_rows.inc_by(records.len() as u64);
        }
        Ok(())
    }
}
