//! The fanout service: pushes change events and alerts to WebSocket clients and serves the HTTP API
//! and the built-in dashboard.
//!
//! Two operators feed the [`hub::Hub`] from the log — [`FanoutChanges`] (the changes topic) and
//! [`FanoutAlerts`] (the alerts topic); connections ([`ws`]) take their frames from the hub.

pub mod api;
mod config;
pub mod control_api;
pub mod hub;
pub mod ws;

pub use config::FanoutConfig;

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use iotpipe_pipeline::change::Change;
use iotpipe_pipeline::health::Readiness;
use iotpipe_pipeline::log::LogRecord;
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::runtime::{Operator, OperatorError};
use iotpipe_pipeline::store::{DeadLetterStore, HistoryStore, LatestStore, PageCache};
use iotpipe_rules::Alert;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use hub::Hub;

/// Everything the API and the connections share.
#[derive(Clone)]
pub struct AppState {
    /// Latest state (snapshots, `/latest`, the device list).
    pub latest: Arc<dyn LatestStore>,
    /// History.
    pub history: Arc<dyn HistoryStore>,
    /// Recent dead letters.
    pub dead_letters: Arc<dyn DeadLetterStore>,
    /// The push hub.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Fanout settings.
    pub config: FanoutConfig,
    /// What `GET /v1/info` returns.
    pub info: Arc<serde_json::Value>,
    /// `/readyz` answers 200 only when this says ready.
    pub ready: Arc<Readiness>,
    /// The device registry, rules and alarms (`/v1/admin/devices`, `/v1/rules`, `/v1/alarms`).
    pub control: Option<Arc<crate::control::Control>>,
    /// Read-through cache for history pages (Redis in distributed mode), and its TTL.
    pub history_cache: Option<(Arc<dyn PageCache>, std::time::Duration)>,
    /// Cancelled at shutdown: connections close with 1001.
    pub shutdown: CancellationToken,
}

/// Feeds change events into the hub.
pub struct FanoutChanges {
    hub: Arc<Hub>,
}

impl FanoutChanges {
    /// Builds the operator.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait]
impl Operator for FanoutChanges {
    fn name(&self) -> &'static str {
        "fanout"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        for r in batch {
            match serde_json::from_slice::<Change>(&r.value) {
                Ok(change) => self.hub.publish(&change),
                // A change we cannot read cannot be pushed; skipping it keeps the stream moving and
                // the next snapshot a client takes is complete anyway.
                Err(e) => {
                    warn!(partition = r.partition, offset = r.offset, error = %e, "Skipped undecodable change.")
                }
            }
        }
        Ok(())
    }
}

/// Feeds alerts into the hub.
pub struct FanoutAlerts {
    hub: Arc<Hub>,
}

impl FanoutAlerts {
    /// Builds the operator.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait]
impl Operator for FanoutAlerts {
    fn name(&self) -> &'static str {
        "fanout_alerts"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        for r in batch {
            match serde_json::from_slice::<Alert>(&r.value) {
                Ok(a) => {
                    let frame = serde_json::json!({
                        "type": "alert", "kind": a.kind, "device": a.device, "rule": a.rule, "ts": a.ts,
                        "severity": a.severity, "text": a.text,
                    });
                    self.hub
                        .publish_alert(&a.device, &Utf8Bytes::from(frame.to_string()));
                }
                Err(e) => {
                    warn!(partition = r.partition, offset = r.offset, error = %e, "Skipped undecodable alert.")
                }
            }
        }
        Ok(())
    }
}
