//! The dead-letter keeper: consumes the dead-letter topic and keeps the newest dead letters in a
//! store, for `GET /v1/dead-letters`. (The topic itself is the full record; this is the window
//! an operator looks at first.)

use std::sync::Arc;

use async_trait::async_trait;
use iotpipe_pipeline::dead_letter::DeadLetter;
use iotpipe_pipeline::log::LogRecord;
use iotpipe_pipeline::runtime::{Operator, OperatorError};
use iotpipe_pipeline::store::DeadLetterStore;
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Settings of the dead-letter keeper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLettersConfig {
    /// How many of the newest dead letters are kept for the API.
    pub keep: u64,
}

impl Default for DeadLettersConfig {
    fn default() -> Self {
        Self { keep: 10_000 }
    }
}

/// The dead-letter keeper.
pub struct DeadLetters {
    store: Arc<dyn DeadLetterStore>,
}

impl DeadLetters {
    /// Builds the operator.
    pub fn new(store: Arc<dyn DeadLetterStore>) -> Self {
        Self { store }
    }
}

#[async_trait]
impl Operator for DeadLetters {
    fn name(&self) -> &'static str {
        "dead_letters"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        let mut letters = Vec::with_capacity(batch.len());
        for r in batch {
            match serde_json::from_slice::<DeadLetter>(&r.value) {
                Ok(dl) => letters.push(dl),
                // A dead letter that is itself unreadable has nowhere further to go: log and skip,
                // so it cannot stall the topic.
                Err(e) => {
                    warn!(partition = r.partition, offset = r.offset, error = %e, "Skipped undecodable dead letter.")
                }
            }
        }
        self.store.push(&letters).await?;
        Ok(())
    }
}
