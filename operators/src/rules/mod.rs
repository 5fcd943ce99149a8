//! The rules operator: runs subscription rules on every telemetry record and appends the alerts
//! they raise to the alerts topic, from which fanout pushes them to dashboards.
//!
//! The evaluator is pluggable ([`iotpipe_rules::Evaluator`]); step 3 supplies the sandboxed Rhai
//! engine. The operator runs in its own consumer group, so a slow or failing rule never delays
//! latest state, history or fanout.

pub mod tools;

use std::sync::Arc;

use iotpipe_pipeline::dead_letter::Stage;
use iotpipe_pipeline::log::{Log, LogRecord, Produce, Topics};
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::runtime::{Operator, OperatorError};
use iotpipe_rules::Evaluator;
use serde::{Deserialize, Serialize};

use crate::materialize::decode_records;

/// Settings of the rules operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Run the rules operator and webhook delivery in `iotpipe dev` and `iotpipe all`.
    pub enabled: bool,
    /// `iotpipe dev`: a directory of `NAME.rhai` rule files, re-read while running.
    pub dir: Option<std::path::PathBuf>,
    /// Cooldown of rule files after a clear before the same alarm may be raised again (event time).
    #[serde(with = "humantime_serde")]
    pub cooldown: std::time::Duration,
    /// Most records evaluated per batch.
    pub max_batch: usize,
    /// Consecutive failures after which a rule is disabled (and its owner told).
    pub max_consecutive_failures: u32,
    /// How long a device's owner is cached when no registry event says it changed.
    #[serde(with = "humantime_serde")]
    pub registry_cache_ttl: std::time::Duration,
    /// `iotpipe dev` only: owner of devices that are not registered (dev is single-user).
    pub dev_owner: String,
    /// Resource limits of every evaluation.
    pub limits: iotpipe_rules::sandbox::Limits,
    /// Webhook delivery of alerts.
    pub webhooks: crate::webhooks::WebhooksConfig,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
            cooldown: std::time::Duration::ZERO,
            max_batch: 500,
            max_consecutive_failures: 3,
            registry_cache_ttl: std::time::Duration::from_secs(30),
            dev_owner: "local".into(),
            limits: iotpipe_rules::sandbox::Limits::default(),
            webhooks: crate::webhooks::WebhooksConfig::default(),
        }
    }
}

/// A rule engine for this process: registry owners, state in `store`, per-rule metrics.
pub fn new_engine(
    cfg: &RulesConfig,
    owners: Arc<dyn iotpipe_rules::engine::DeviceOwners>,
    store: Arc<dyn iotpipe_pipeline::kv::KeyValue>,
    metrics: Arc<Metrics>,
    instance: &str,
) -> Arc<iotpipe_rules::engine::RuleEngine> {
    Arc::new(
        iotpipe_rules::engine::RuleEngine::new(
            iotpipe_rules::sandbox::Sandbox::new(cfg.limits.clone()),
            owners,
            cfg.max_consecutive_failures,
        )
        .with_store(store)
        .with_metrics(metrics)
        .with_instance(instance),
    )
}

/// Loads the stored rules and rule state into `engine` (at start-up, after joining the rules
/// topic); returns how many rules compiled.
///
/// # Errors
/// When the store cannot be read.
pub async fn load_engine(engine: &iotpipe_rules::engine::RuleEngine) -> anyhow::Result<usize> {
    let n = engine
        .load_stored_rules()
        .await
        .map_err(|e| anyhow::anyhow!("loading rules: {e}"))?;
    engine
        .preload()
        .await
        .map_err(|e| anyhow::anyhow!("loading rule state: {e}"))?;
    Ok(n)
}

/// The rules operator.
pub struct Rules {
    evaluator: Arc<dyn Evaluator>,
    log: Arc<dyn Log>,
    topics: Topics,
    metrics: Arc<Metrics>,
}

impl Rules {
    /// Builds the operator around an evaluator.
    pub fn new(
        evaluator: Arc<dyn Evaluator>,
        log: Arc<dyn Log>,
        topics: Topics,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            evaluator,
            log,
            topics,
            metrics,
        }
    }
}

#[async_trait::async_trait]
impl Operator for Rules {
    fn name(&self) -> &'static str {
        "rules"
    }

    async fn on_tick(&mut self) -> Result<(), OperatorError> {
        let alerts: Vec<Produce> = self
            .evaluator
            .on_timer(iotpipe_pipeline::time::now_ms())
            .await
            .map_err(OperatorError::external)?
            .iter()
            .map(|a| Produce::json(&a.device, a))
            .collect::<Result<_, _>>()?;
        if !alerts.is_empty() {
            self.log.append(&self.topics.alerts, alerts).await?;
        }
        self.evaluator
            .flush()
            .await
            .map_err(OperatorError::external)
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        let records = decode_records(
            batch,
            Stage::Rules,
            &self.metrics,
            self.log.as_ref(),
            &self.topics,
        )
        .await?;
        let alerts = self
            .evaluator
            .evaluate(&records)
            .await
            .map_err(OperatorError::external)?
            .iter()
            .map(|a| Produce::json(&a.device, a))
            .collect::<Result<Vec<_>, _>>()?;
        if !alerts.is_empty() {
            self.log.append(&self.topics.alerts, alerts).await?;
        }
        // Alerts first, then state: a crash in between replays the batch and may raise an alert
        // twice, but never loses one.
        self.evaluator
            .flush()
            .await
            .map_err(OperatorError::external)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use iotpipe_pipeline::embedded::MemLog;
    use iotpipe_pipeline::record::{parse_record, Limits, Record, SourceRef};
    use iotpipe_rules::Alert;
    use std::time::Duration;

    /// A threshold evaluator standing in for a compiled rule.
    struct Above(f64);

    #[async_trait]
    impl Evaluator for Above {
        async fn evaluate(&self, records: &[Record]) -> Result<Vec<Alert>, String> {
            Ok(records
                .iter()
                .filter_map(|record| {
                    match record.metrics.get("t").and_then(serde_json::Value::as_f64) {
                        Some(t) if t > self.0 => Some(Alert {
                            rule: "hot".into(),
                            owner: "alice".into(),
                            device: record.device.clone(),
                            ts: record.ts,
                            kind: iotpipe_rules::AlertKind::Raised,
                            severity: "warning".into(),
                            text: format!("t={t}"),
                            record_id: record.id.clone(),
                        }),
                        _ => None,
                    }
                })
                .collect())
        }
    }

    #[tokio::test]
    async fn alerts_from_the_evaluator_reach_the_alerts_topic() {
        let log = Arc::new(MemLog::new(2, 100));
        let topics = Topics::default();
        for t in [&topics.telemetry, &topics.alerts, &topics.dead_letters] {
            log.create_topic(t);
        }
        let mut alerts = log
            .subscribe(&topics.alerts, "test")
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let mut op = Rules::new(
            Arc::new(Above(30.0)),
            log.clone(),
            topics.clone(),
            Arc::new(Metrics::new()),
        );
        let now = iotpipe_pipeline::time::now_ms();
        let batch: Vec<LogRecord> = [20.0, 35.0]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let rec = parse_record(
                    "d1",
                    format!(r#"{{"t":{t}}}"#).as_bytes(),
                    now,
                    SourceRef::Internal,
                    &Limits::default(),
                )
                .unwrap_or_else(|e| unreachable!("{e}"));
                LogRecord {
                    partition: 0,
                    offset: i as u64,
                    key: "d1".into(),
                    value: serde_json::to_vec(&rec).unwrap_or_default().into(),
                }
            })
            .collect();
        op.process(&batch)
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let got = alerts
            .poll(10, Duration::from_millis(100))
            .await
            .unwrap_or_default();
        assert_eq!(got.len(), 1);
        let alert: Alert =
            serde_json::from_slice(&got[0].value).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(alert.text, "t=35");
    }
}
