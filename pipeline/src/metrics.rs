//! Every Prometheus metric of iotpipe, registered once when [`Metrics::new`] builds the registry.
//!
//! Names follow `iotpipe_<what>_<unit>[_total]`; labels are bounded (`operator`, `stage`, `reason`,
//! `error_type`, `type`, `route`, `status`, and `rule`: rules are an admin-managed set) — never a
//! device or user id. Per-stage accounting holds:
//! `ingest_received = ingest_appended + dead_letters{stage="ingest"}` once ingest is idle.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All metrics.
#[derive(Clone)]
pub struct Metrics {
    /// The registry they live in.
    pub registry: Registry,
    /// Messages ingest received from its source.
    pub ingest_received: IntCounter,
    /// Records ingest appended to the telemetry topic.
    pub ingest_appended: IntCounter,
    /// Dead letters by stage and reason.
    pub dead_letters: IntCounterVec,
    /// Records the materializer merged.
    pub materialized: IntCounter,
    /// Change events emitted (replays included).
    pub changes_emitted: IntCounter,
    /// History rows written.
    pub history_rows: IntCounter,
    /// Records an operator processed, by operator.
    pub operator_records: IntCounterVec,
    /// Batch processing time, by operator.
    pub operator_batch_seconds: HistogramVec,
    /// Operator errors by operator and class.
    pub operator_errors: IntCounterVec,
    /// Records appended but not yet committed, by operator, where the log can tell.
    pub operator_lag: IntGaugeVec,
    /// Open WebSocket connections.
    pub ws_connections: IntGauge,
    /// Messages pushed to WebSocket clients, by type.
    pub ws_messages: IntCounterVec,
    /// Updates merged into a pending update because a client's queue was full.
    pub ws_conflated: IntCounter,
    /// Updates waiting in connections' queues (each queue holds at most `fanout.queue_capacity`).
    pub ws_queued: IntGauge,
    /// Conflated updates waiting for slow connections (at most one per connection and device).
    pub ws_pending: IntGauge,
    /// Device ts to push, seconds.
    pub push_latency: Histogram,
    /// WebSocket connections the server closed, by reason (token_expired, slow, idle, ...).
    pub ws_closes: IntCounterVec,
    /// WebSocket upgrades refused, by reason (unauthorized, too_many_connections).
    pub ws_rejected: IntCounterVec,
    /// Requests refused by a rate limit, by scope (rest, subscribe).
    pub rate_limited: IntCounterVec,
    /// Devices resumed with `since`, by outcome (replayed, snapshot, current).
    pub ws_resumes: IntCounterVec,
    /// Devices a subscribe named that the caller may not see (or that do not exist).
    pub ws_forbidden: IntCounter,
    /// HTTP requests by route and status.
    pub http_requests: IntCounterVec,
    /// HTTP request duration by route.
    pub http_seconds: HistogramVec,
    /// Rule evaluations, by rule (rule ids are an admin-managed, bounded set).
    pub rule_evaluations: IntCounterVec,
    /// Rule failures, by rule and kind (deadline, too_many_operations, ...).
    pub rule_failures: IntCounterVec,
    /// Alerts raised, cleared and rules disabled, by rule and kind.
    pub rule_alerts: IntCounterVec,
    /// 1 while a rule is disabled by failures, by rule.
    pub rule_disabled: IntGaugeVec,
    /// Rules loaded in this process.
    pub rules_loaded: IntGauge,
    /// Time to evaluate every applicable rule on one batch of records.
    pub rule_batch_seconds: Histogram,
    /// Webhook deliveries by outcome (`delivered`, `retried`, `dead_lettered`).
    pub webhook_deliveries: IntCounterVec,
}

impl Metrics {
    /// Builds and registers every metric.
    ///
    /// # Panics
    /// Never in practice: registration only fails for duplicate or malformed names, which are
    /// fixed here and covered by the unit test below.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition is valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric registered once");
                m
            }};
        }
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        Self {
            ingest_received: reg!(IntCounter::new(
                "iotpipe_ingest_received_total",
                "Messages ingest received from its source."
            )),
            ingest_appended: reg!(IntCounter::new(
                "iotpipe_ingest_appended_total",
                "Records ingest appended to the telemetry topic."
            )),
            dead_letters: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_dead_letters_total",
                    "Messages refused, by stage and reason."
                ),
                &["stage", "reason"]
            )),
            materialized: reg!(IntCounter::new(
                "iotpipe_materialize_records_total",
                "Records merged into latest state."
            )),
            changes_emitted: reg!(IntCounter::new(
                "iotpipe_changes_emitted_total",
                "Change events emitted by the materializer."
            )),
            history_rows: reg!(IntCounter::new(
                "iotpipe_history_rows_written_total",
                "History rows written."
            )),
            operator_records: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_operator_records_total",
                    "Log records processed and committed, by operator."
                ),
                &["operator"]
            )),
            operator_batch_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "iotpipe_operator_batch_duration_seconds",
                    "Time to process one batch, by operator."
                )
                .buckets(latency_buckets.clone()),
                &["operator"]
            )),
            operator_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_operator_errors_total",
                    "Operator errors, by operator and error type."
                ),
                &["operator", "error_type"]
            )),
            operator_lag: reg!(IntGaugeVec::new(
                Opts::new(
                    "iotpipe_operator_lag_records",
                    "Records appended but not yet committed, by operator."
                ),
                &["operator"]
            )),
            ws_connections: reg!(IntGauge::new(
                "iotpipe_ws_connections",
                "Open WebSocket connections."
            )),
            ws_messages: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_ws_messages_sent_total",
                    "Messages pushed to WebSocket clients, by type."
                ),
                &["type"]
            )),
            ws_conflated: reg!(IntCounter::new(
                "iotpipe_ws_conflated_total",
                "Updates merged into a pending update because a client's queue was full."
            )),
            ws_queued: reg!(IntGauge::new(
                "iotpipe_ws_queued_updates",
                "Updates waiting in WebSocket connections' queues."
            )),
            ws_pending: reg!(IntGauge::new(
                "iotpipe_ws_pending_updates",
                "Conflated updates waiting for slow WebSocket connections."
            )),
            push_latency: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "iotpipe_push_latency_seconds",
                    "From the device timestamp to the push to a WebSocket client."
                )
                .buckets(latency_buckets.clone())
            )),
            ws_closes: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_ws_closes_total",
                    "WebSocket connections closed by the server, by reason."
                ),
                &["reason"]
            )),
            ws_rejected: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_ws_rejected_total",
                    "WebSocket upgrades refused, by reason."
                ),
                &["reason"]
            )),
            rate_limited: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_rate_limited_total",
                    "Requests refused by a per-user rate limit, by scope."
                ),
                &["scope"]
            )),
            ws_resumes: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_ws_resumes_total",
                    "Devices resumed with `since`, by outcome (replayed, snapshot, current)."
                ),
                &["outcome"]
            )),
            ws_forbidden: reg!(IntCounter::new(
                "iotpipe_ws_forbidden_total",
                "Devices named in a subscribe that the caller may not see or that do not exist."
            )),
            http_requests: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_http_requests_total",
                    "HTTP requests, by route and status."
                ),
                &["route", "status"]
            )),
            http_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "iotpipe_http_request_duration_seconds",
                    "HTTP request duration, by route."
                )
                .buckets(latency_buckets.clone()),
                &["route"]
            )),
            rule_evaluations: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_rule_evaluations_total",
                    "Rule evaluations, by rule."
                ),
                &["rule"]
            )),
            rule_failures: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_rule_failures_total",
                    "Rule failures (errors and limits hit), by rule and kind."
                ),
                &["rule", "kind"]
            )),
            rule_alerts: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_rule_alerts_total",
                    "Alerts raised or cleared and rules disabled, by rule and kind."
                ),
                &["rule", "kind"]
            )),
            rule_disabled: reg!(IntGaugeVec::new(
                Opts::new(
                    "iotpipe_rule_disabled",
                    "1 while a rule is disabled after consecutive failures."
                ),
                &["rule"]
            )),
            rules_loaded: reg!(IntGauge::new(
                "iotpipe_rules_loaded",
                "Rules loaded in this process."
            )),
            rule_batch_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "iotpipe_rule_batch_seconds",
                    "Time to evaluate every applicable rule on one batch."
                )
                .buckets(latency_buckets)
            )),
            webhook_deliveries: reg!(IntCounterVec::new(
                Opts::new(
                    "iotpipe_webhook_deliveries_total",
                    "Webhook delivery attempts, by outcome (delivered, retried, dead_lettered)."
                ),
                &["outcome"]
            )),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_renders() {
        let m = Metrics::new();
        m.ingest_received.inc();
        m.dead_letters
            .with_label_values(&["ingest", "invalid_json"])
            .inc();
        let text = m.render();
        assert!(text.contains("iotpipe_ingest_received_total 1"));
        assert!(
            text.contains(r#"iotpipe_dead_letters_total{reason="invalid_json",stage="ingest"} 1"#)
        );
    }
}
