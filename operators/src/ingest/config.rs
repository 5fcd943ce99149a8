//! Configuration of the ingest operator.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Settings of the MQTT ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Broker to read from as `host:port` (in `iotpipe dev` the embedded broker is used instead).
    pub broker: String,
    /// Topic layout of device messages; `{device_id}` marks the level that holds the device id.
    /// Example for an AWS IoT style layout: `NBtechv1/{device_id}/data`.
    pub topic_template: String,
    /// MQTT client id of the ingest. Keep it stable: the broker keeps the session (and every
    /// message not yet acknowledged) under this id while ingest restarts.
    pub client_id: String,
    /// MQTT keep-alive interval.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Most messages validated, appended and acknowledged together.
    pub max_batch: usize,
    /// During shutdown, stop once the broker has sent nothing for this long.
    #[serde(with = "humantime_serde")]
    pub drain_idle: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            broker: "127.0.0.1:1883".into(),
            topic_template: "devices/{device_id}/telemetry".into(),
            client_id: "iotpipe-ingest".into(),
            keep_alive: Duration::from_secs(30),
            max_batch: 1000,
            drain_idle: Duration::from_secs(1),
        }
    }
}
