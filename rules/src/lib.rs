//! Subscription rules: the interface between the rules operator and a rule engine.
//!
//! The rules operator (in `iotpipe-operators`) calls an [`Evaluator`] on every telemetry record and
//! appends the [`Alert`]s it returns to the alerts topic. Step 3 of the roadmap implements
//! `Evaluator` with sandboxed, user-written Rhai scripts ([`engine::RuleEngine`]); [`NoRules`] is
//! the evaluator with no rules.
//!
//! # Layout
//! - [`sandbox`]: the Rhai sandbox user rules run in (limits, deadline, script API).
//! - [`engine`]: rules, selectors, ownership, alarm lifecycle, failure isolation.
//! - [`files`]: rules as `.rhai` files in a directory, reloaded while running.
//! - [`Evaluator`]: evaluate one record, return alerts.
//! - [`Alert`]: what an evaluation raises; the payload of the alerts topic.
//! - [`NoRules`]: the evaluator with no rules.

pub mod engine;
pub mod files;
pub mod sandbox;

use async_trait::async_trait;
use iotpipe_pipeline::record::{Record, RecordId};
use serde::{Deserialize, Serialize};

/// An alert raised by a rule for a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Id of the rule that raised it.
    pub rule: String,
    /// The rule's owner: who receives it.
    #[serde(default)]
    pub owner: String,
    /// Device id.
    pub device: String,
    /// Device ts of the record that raised it.
    pub ts: i64,
    /// What happened: raised, cleared, or the rule was disabled.
    pub kind: AlertKind,
    /// Severity chosen by the rule (`info`, `warning`, `critical`, ...).
    pub severity: String,
    /// Text for people.
    pub text: String,
    /// The record that raised it.
    pub record_id: RecordId,
}

/// What an alert reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The rule's condition started to hold.
    Raised,
    /// It stopped holding.
    Cleared,
    /// The rule failed too often and was disabled (reported to its owner).
    RuleDisabled,
}

impl AlertKind {
    /// The name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raised => "raised",
            Self::Cleared => "cleared",
            Self::RuleDisabled => "rule_disabled",
        }
    }
}

/// Evaluates rules on records.
#[async_trait]
pub trait Evaluator: Send + Sync + 'static {
    /// Runs every rule that applies to each record's device; returns the alerts raised. One
    /// failing rule never fails the batch (failures are the engine's to count and report); an
    /// error means the registry or the state store could not be read, and the batch is retried.
    ///
    /// # Errors
    /// A description of the backend failure.
    async fn evaluate(&self, records: &[Record]) -> Result<Vec<Alert>, String>;

    /// Makes the state changed by the evaluations so far durable. The rules operator calls it at
    /// the end of each batch, after appending the batch's alerts and before committing.
    ///
    /// # Errors
    /// A description; the batch is then retried.
    async fn flush(&self) -> Result<(), String> {
        Ok(())
    }

    /// Called about once a second with the wall clock: runs timer evaluations ("no data for 10
    /// minutes") and returns their alerts.
    ///
    /// # Errors
    /// A description of the backend failure.
    async fn on_timer(&self, wall_now_ms: i64) -> Result<Vec<Alert>, String> {
        let _ = wall_now_ms;
        Ok(Vec::new())
    }
}

/// The evaluator with no rules: raises nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRules;

#[async_trait]
impl Evaluator for NoRules {
    async fn evaluate(&self, _records: &[Record]) -> Result<Vec<Alert>, String> {
        Ok(Vec::new())
    }
}
