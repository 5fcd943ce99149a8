//! The fanout service: pushes change events and alerts to WebSocket clients and serves the HTTP API
//! and the built-in dashboard.
//!
//! Two operators feed the [`hub::Hub`] from the log — [`FanoutChanges`] (the changes topic) and
//! [`FanoutAlerts`] (the alerts topic); connections ([`ws`]) take their frames from the hub.

pub mod api;
pub mod auth;
mod config;
pub mod control_api;
pub mod hub;
pub mod ws;

pub use config::{AuthConfig, AuthMode, FanoutConfig, Tier};

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use iotpipe_pipeline::change::Change;
use iotpipe_pipeline::health::Readiness;
use iotpipe_pipeline::log::LogRecord;
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::ratelimit::RateLimiter;
use iotpipe_pipeline::registry::{CachedRegistry, DeviceEntry};
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
    pub config: Arc<FanoutConfig>,
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
    /// Verifies callers' tokens.
    pub auth: Arc<auth::Authenticator>,
    /// Per-user rate limits (in process in dev, Redis in distributed mode).
    pub limiter: Arc<dyn RateLimiter>,
    /// The device registry the access rule reads.
    pub registry: Option<Arc<CachedRegistry>>,
}

/// Sets TCP_NODELAY on an accepted connection: pushed updates are small writes that must not
/// wait for the client's delayed ACK (Nagle's algorithm would hold them up to ~40 ms).
pub fn no_delay(stream: &mut tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "Cannot set TCP_NODELAY.");
    }
}

/// Refuses to serve on a non-loopback address without authentication: without it every caller is
/// an administrator.
///
/// # Errors
/// When `addr` is not loopback and `fanout.auth.mode` is `none`.
pub fn check_exposure(cfg: &FanoutConfig, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    if cfg.auth.mode == AuthMode::None && !addr.ip().is_loopback() {
        anyhow::bail!(
            "refusing to serve the API on {addr} without authentication: every caller would be an \
             administrator. Configure [fanout.auth] (mode = \"hs256\" or \"rs256\"), or listen on a \
             loopback address"
        );
    }
    Ok(())
}

/// The rate limiter and token verifier of one process.
///
/// # Errors
/// When the RS256 key cannot be read.
pub fn auth_parts(
    cfg: &FanoutConfig,
    anonymous_user: &str,
) -> anyhow::Result<Arc<auth::Authenticator>> {
    Ok(Arc::new(auth::Authenticator::new(
        &cfg.auth,
        anonymous_user,
    )?))
}

/// The registry entries of the devices in a batch, each looked up once (cached by the
/// registry; a registry outage fails the batch, which the runtime retries).
async fn entries<'a>(
    registry: Option<&CachedRegistry>,
    devices: impl Iterator<Item = &'a str>,
) -> Result<HashMap<String, Option<Arc<DeviceEntry>>>, OperatorError> {
    let mut out = HashMap::new();
    let Some(registry) = registry else {
        return Ok(out);
    };
    for d in devices {
        if !out.contains_key(d) {
            let e = registry
                .access(d)
                .await
                .map_err(|e| OperatorError::external(format!("device registry: {e}")))?;
            out.insert(d.to_owned(), e);
        }
    }
    Ok(out)
}

impl AppState {
    /// Whether `caller` may see `device` (administrators see all; see [`auth`]).
    ///
    /// # Errors
    /// When the registry cannot be read.
    pub async fn may_see(
        &self,
        caller: &auth::Caller,
        device: &str,
    ) -> Result<bool, iotpipe_pipeline::store::StoreError> {
        if caller.admin {
            return Ok(true);
        }
        let entry = match &self.registry {
            Some(r) => r.access(device).await?,
            None => None,
        };
        Ok(caller.may_see(entry.as_deref()))
    }

    /// The devices `caller` sees, at most `limit`: every device with state for an administrator,
    /// else the registered devices the caller owns or shares a group with.
    ///
    /// # Errors
    /// When the store or the registry cannot be read.
    pub async fn visible_devices(
        &self,
        caller: &auth::Caller,
        limit: usize,
    ) -> Result<Vec<String>, iotpipe_pipeline::store::StoreError> {
        if caller.admin {
            return Ok(self
                .latest
                .devices(limit)
                .await?
                .into_iter()
                .map(|d| d.device)
                .collect());
        }
        let Some(registry) = &self.registry else {
            return Ok(Vec::new());
        };
        Ok(registry
            .visible_to(&caller.user, &caller.groups)
            .await?
            .into_iter()
            .take(limit)
            .map(|e| e.device)
            .collect())
    }

    /// Counts one request of `caller` against `quota` (key `{scope}:{user}`); `Some(wait)` when
    /// over. Unauthenticated callers are not limited, and a limiter outage lets the request
    /// through: it must not become an outage of the API.
    pub async fn over_limit(
        &self,
        caller: &auth::Caller,
        scope: &'static str,
        quota: &iotpipe_pipeline::ratelimit::Quota,
    ) -> Option<std::time::Duration> {
        if !caller.authenticated {
            return None;
        }
        match self
            .limiter
            .check(&format!("{scope}:{}", caller.user), quota)
            .await
        {
            Ok(iotpipe_pipeline::ratelimit::Decision::Allow) => None,
            Ok(iotpipe_pipeline::ratelimit::Decision::Deny { retry_after }) => {
                self.metrics.rate_limited.with_label_values(&[scope]).inc();
                Some(retry_after)
            }
            Err(e) => {
                tracing::debug!(error = %e, "Rate limiter unavailable; request let through.");
                None
            }
        }
    }
}

/// Feeds change events into the hub.
pub struct FanoutChanges {
    hub: Arc<Hub>,
    registry: Option<Arc<CachedRegistry>>,
}

impl FanoutChanges {
    /// Builds the operator; `registry` decides who may see each device (without one, only
    /// administrators see anything).
    pub fn new(hub: Arc<Hub>, registry: Option<Arc<CachedRegistry>>) -> Self {
        Self { hub, registry }
    }
}

#[async_trait]
impl Operator for FanoutChanges {
    fn name(&self) -> &'static str {
        "fanout"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        let mut changes = Vec::with_capacity(batch.len());
        for r in batch {
            match serde_json::from_slice::<Change>(&r.value) {
                Ok(change) => changes.push(change),
                // A change we cannot read cannot be pushed; skipping it keeps the stream moving and
                // the next snapshot a client takes is complete anyway.
                Err(e) => {
                    warn!(partition = r.partition, offset = r.offset, error = %e, "Skipped undecodable change.")
                }
            }
        }
        let entries = entries(
            self.registry.as_deref(),
            changes.iter().map(|c| c.device.as_str()),
        )
        .await?;
        for c in &changes {
            let entry = entries.get(&c.device).and_then(Option::as_deref);
            self.hub.publish(c, entry);
        }
        Ok(())
    }
}

/// Feeds alerts into the hub.
pub struct FanoutAlerts {
    hub: Arc<Hub>,
    registry: Option<Arc<CachedRegistry>>,
}

impl FanoutAlerts {
    /// Builds the operator.
    pub fn new(hub: Arc<Hub>, registry: Option<Arc<CachedRegistry>>) -> Self {
        Self { hub, registry }
    }
}

#[async_trait]
impl Operator for FanoutAlerts {
    fn name(&self) -> &'static str {
        "fanout_alerts"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        let mut alerts = Vec::with_capacity(batch.len());
        for r in batch {
            match serde_json::from_slice::<Alert>(&r.value) {
                Ok(a) => alerts.push(a),
                Err(e) => {
                    warn!(partition = r.partition, offset = r.offset, error = %e, "Skipped undecodable alert.")
                }
            }
        }
        let entries = entries(
            self.registry.as_deref(),
            alerts.iter().map(|a| a.device.as_str()),
        )
        .await?;
        for a in &alerts {
            let frame = serde_json::json!({
                "type": "alert", "kind": a.kind, "device": a.device, "rule": a.rule, "ts": a.ts,
                "severity": a.severity, "text": a.text,
            });
            let entry = entries.get(&a.device).and_then(Option::as_deref);
            self.hub
                .publish_alert(&a.device, entry, &Utf8Bytes::from(frame.to_string()));
        }
        Ok(())
    }
}
