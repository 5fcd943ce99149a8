//! Webhook delivery of alerts: each alert of a rule with `notify` targets is POSTed as JSON to
//! every target, signed with the target's secret.
//!
//! - **Signature**: `X-Iotpipe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//!   "<t>.<body>")>` (the receiver recomputes it and rejects old `t` to stop replays);
//!   `X-Iotpipe-Event` is a stable id of the alert for deduplication (delivery is at least once).
//! - **Retries**: a timeout, a connection error, a 429 or a 5xx is retried with exponential backoff
//!   and full jitter, up to `max_attempts`; other 4xx are final. After the last attempt the alert
//!   becomes a dead letter (stage `webhook`, reason `webhook_failed`, the last error).
//! - **Isolation**: this operator reads the alerts topic in its own consumer group, so a slow or
//!   failing webhook never delays rule evaluation; deliveries of one batch run concurrently.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use hmac::{Hmac, KeyInit, Mac};
use iotpipe_pipeline::dead_letter::{DeadLetter, Stage};
use iotpipe_pipeline::log::{Log, LogRecord, Produce, Topics};
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::record::SourceRef;
use iotpipe_pipeline::runtime::{Backoff, Operator, OperatorError};
use iotpipe_rules::engine::{RuleEngine, Webhook};
use iotpipe_rules::Alert;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tracing::{info, warn};

use crate::http_client::HttpClient;

/// Settings of webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Deliver alerts to the webhooks of their rules.
    pub enabled: bool,
    /// Timeout of one attempt (connect, send, response).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per alert and target before it becomes a dead letter.
    pub max_attempts: u32,
    /// First retry delay (doubled per attempt, full jitter).
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout: Duration::from_secs(5),
            max_attempts: 5,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            concurrency: 32,
        }
    }
}

/// The signature header value for `body` sent at unix time `t` with `secret`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature header against `body` and `secret` (what a receiver does); `max_age_s`
/// bounds how old `t` may be relative to `now_s`.
pub fn verify(secret: &str, header: &str, body: &[u8], now_s: i64, max_age_s: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (now_s - t).abs() > max_age_s {
        return false;
    }
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

/// The webhook operator.
pub struct Webhooks {
    rules: Arc<RuleEngine>,
    client: HttpClient,
    cfg: WebhooksConfig,
    log: Arc<dyn Log>,
    topics: Topics,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    /// Builds the operator; rules are looked up in `rules` (their current version).
    ///
    /// # Errors
    /// When the HTTP client cannot be built (no TLS roots).
    pub fn new(
        rules: Arc<RuleEngine>,
        cfg: WebhooksConfig,
        log: Arc<dyn Log>,
        topics: Topics,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        Ok(Self {
            rules,
            client: HttpClient::new()?,
            cfg,
            log,
            topics,
            metrics,
        })
    }
}

/// One delivery: returns the last error when every attempt failed.
async fn deliver(
    client: &HttpClient,
    cfg: &WebhooksConfig,
    metrics: &Metrics,
    target: &Webhook,
    event_id: &str,
    body: Bytes,
) -> Result<(), String> {
    let backoff = Backoff {
        initial: cfg.backoff_initial,
        max: cfg.backoff_max,
    };
    let mut last = String::new();
    for attempt in 0..cfg.max_attempts.max(1) {
        if attempt > 0 {
            metrics
                .webhook_deliveries
                .with_label_values(&["retried"])
                .inc();
            tokio::time::sleep(backoff.delay(attempt - 1)).await;
        }
        let t = iotpipe_pipeline::time::now_ms() / 1000;
        let headers = [
            ("content-type", "application/json".to_owned()),
            (
                "user-agent",
                concat!("iotpipe/", env!("CARGO_PKG_VERSION")).to_owned(),
            ),
            ("x-iotpipe-event", event_id.to_owned()),
            ("x-iotpipe-signature", signature(&target.secret, t, &body)),
        ];
        match client
            .send("POST", &target.url, &headers, body.clone(), cfg.timeout)
            .await
        {
            Ok(r) if (200..300).contains(&r.status) => return Ok(()),
            Ok(r) if r.status == 429 || r.status >= 500 => {
                last = format!("HTTP {}", r.status);
            }
            Ok(r) => return Err(format!("HTTP {} (not retried)", r.status)),
            Err(e) => last = e,
        }
        warn!(url = %target.url, attempt = attempt + 1, error = %last, "Webhook attempt failed.");
    }
    Err(format!("{last} after {} attempts", cfg.max_attempts.max(1)))
}

#[async_trait]
impl Operator for Webhooks {
    fn name(&self) -> &'static str {
        "webhooks"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        let mut jobs = Vec::new();
        for r in batch {
            let Ok(alert) = serde_json::from_slice::<Alert>(&r.value) else {
                warn!(
                    partition = r.partition,
                    offset = r.offset,
                    "Skipped undecodable alert."
                );
                continue;
            };
            let Some(rule) = self.rules.rule(&alert.rule) else {
                continue;
            };
            if rule.notify.is_empty() {
                continue;
            }
            let body = serde_json::json!({
                "type": "alert", "rule": alert.rule, "rule_name": rule.name, "owner": alert.owner,
                "device": alert.device, "kind": alert.kind, "severity": alert.severity,
                "text": alert.text, "ts": alert.ts, "record_id": alert.record_id,
            });
            let event_id = format!(
                "{}:{}:{}:{}",
                alert.rule,
                alert.device,
                alert.kind.as_str(),
                alert.ts
            );
            let body = Bytes::from(body.to_string());
            for target in rule.notify {
                jobs.push((target, event_id.clone(), body.clone(), alert.device.clone()));
            }
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let (client, cfg, metrics) = (&self.client, &self.cfg, &self.metrics);
        let failed: Vec<DeadLetter> = stream::iter(jobs)
            .map(|(target, event_id, body, device)| async move {
                match deliver(client, cfg, metrics, &target, &event_id, body.clone()).await {
                    Ok(()) => {
                        metrics
                            .webhook_deliveries
                            .with_label_values(&["delivered"])
                            .inc();
                        None
                    }
                    Err(e) => {
                        metrics
                            .webhook_deliveries
                            .with_label_values(&["dead_lettered"])
                            .inc();
                        info!(url = %target.url, error = %e, "Webhook delivery failed; dead-lettered.");
                        let excerpt = String::from_utf8_lossy(&body).into_owned();
                        Some(DeadLetter {
                            stage: Stage::Webhook,
                            reason: "webhook_failed".into(),
                            detail: format!("{}: {e}", target.url),
                            device: Some(device),
                            source: SourceRef::Internal,
                            at: iotpipe_pipeline::time::now_ms(),
                            payload_bytes: body.len(),
                            payload_excerpt: excerpt,
                        })
                    }
                }
            })
            .buffer_unordered(cfg.concurrency.max(1))
            .filter_map(|x| async move { x })
            .collect()
            .await;
        if !failed.is_empty() {
            let produce = failed
                .iter()
                .map(|d| Produce::json(d.device.as_deref().unwrap_or(""), d))
                .collect::<Result<Vec<_>, _>>()?;
            self.log.append(&self.topics.dead_letters, produce).await?;
            self.metrics
                .dead_letters
                .with_label_values(&[Stage::Webhook.as_str(), "webhook_failed"])
                .inc_by(failed.len() as u64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let body = br#"{"type":"alert"}"#;
        let h = signature("s3cret", 1_700_000_000, body);
        assert!(h.starts_with("t=1700000000,v1="));
        assert!(verify("s3cret", &h, body, 1_700_000_010, 300));
        assert!(!verify("other", &h, body, 1_700_000_010, 300));
        assert!(!verify(
            "s3cret",
            &h,
            br#"{"type":"alarm"}"#,
            1_700_000_010,
            300
        ));
        assert!(!verify("s3cret", &h, body, 1_700_009_999, 300), "too old");
        assert!(!verify("s3cret", "t=1,v1=zz", body, 1, 300));
    }
}
