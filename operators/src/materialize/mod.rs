//! The materialize operator: merges telemetry records into each device's latest state and emits a
//! change event (only the changed fields, with the device's next seq) to the changes topic.
//!
//! Order inside a batch, and why: the merge is written durably first, then the change events are
//! appended, then (in the runtime) the offsets are committed. A crash after the merge but before the
//! append replays the batch; the store recognises the replayed records and returns their changes
//! again with the original seq (see `iotpipe_pipeline::change`), so the events are not lost, and
//! consumers drop seqs they already have, so they are not duplicated either.

use std::sync::Arc;

use async_trait::async_trait;
use iotpipe_pipeline::dead_letter::{DeadLetter, Stage};
use iotpipe_pipeline::log::{Log, LogRecord, Produce, Topics};
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::record::{Record, RejectReason, Rejection, SourceRef};
use iotpipe_pipeline::runtime::{Operator, OperatorError};
use iotpipe_pipeline::store::LatestStore;
use iotpipe_pipeline::time::now_ms;
use serde::{Deserialize, Serialize};

/// Settings of the materialize operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaterializeConfig {
    /// Most records merged in one store transaction.
    pub max_batch: usize,
}

impl Default for MaterializeConfig {
    fn default() -> Self {
        Self { max_batch: 500 }
    }
}

/// The materialize operator.
pub struct Materialize {
    latest: Arc<dyn LatestStore>,
    log: Arc<dyn Log>,
    topics: Topics,
    metrics: Arc<Metrics>,
}

impl Materialize {
    /// Builds the operator.
    pub fn new(
        latest: Arc<dyn LatestStore>,
        log: Arc<dyn Log>,
        topics: Topics,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            latest,
            log,
            topics,
            metrics,
        }
    }
}

/// Decodes telemetry log records; records that cannot be decoded become dead letters of `stage`,
/// appended to the dead-letter topic before this returns (so the batch may be committed).
///
/// # Errors
/// When the dead letters cannot be appended.
pub(crate) async fn decode_records(
    batch: &[LogRecord],
    stage: Stage,
    metrics: &Metrics,
    log: &dyn Log,
    topics: &Topics,
) -> Result<Vec<Record>, OperatorError> {
    let mut records = Vec::with_capacity(batch.len());
    let mut letters = Vec::new();
    for r in batch {
        match serde_json::from_slice::<Record>(&r.value) {
            Ok(rec) => records.push(rec),
            Err(e) => {
                metrics
                    .dead_letters
                    .with_label_values(&[stage.as_str(), RejectReason::UndecodableRecord.as_str()])
                    .inc();
                let dl = DeadLetter::from_rejection(
                    stage,
                    &Rejection::new(
                        RejectReason::UndecodableRecord,
                        format!("offset {}/{}: {e}", r.partition, r.offset),
                    ),
                    std::str::from_utf8(&r.key).ok(),
                    SourceRef::Internal,
                    &r.value,
                    now_ms(),
                );
                if let Ok(p) = Produce::json(dl.device.as_deref().unwrap_or(""), &dl) {
                    letters.push(p);
                }
            }
        }
    }
    if !letters.is_empty() {
        log.append(&topics.dead_letters, letters).await?;
    }
    Ok(records)
}

#[async_trait]
impl Operator for Materialize {
    fn name(&self) -> &'static str {
        "materialize"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        let records = decode_records(
            batch,
            Stage::Materialize,
            &self.metrics,
            self.log.as_ref(),
            &self.topics,
        )
        .await?;
        if records.is_empty() {
            return Ok(());
        }
        let outcomes = self.latest.merge(&records).await?;
        let changes: Vec<Produce> = outcomes
            .iter()
            .filter_map(|o| o.change())
            .map(|c| Produce::json(&c.device, c))
            .collect::<Result<_, _>>()?;
        self.metrics.materialized.inc_by(records.len() as u64);
        if !changes.is_empty() {
            let n = changes.len() as u64;
            self.log.append(&self.topics.changes, changes).await?;
            self.metrics.changes_emitted.inc_by(n);
        }
        Ok(())
    }
}
