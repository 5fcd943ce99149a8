//! Configuration of the fanout service.

use serde::{Deserialize, Serialize};

/// Settings of the HTTP API and WebSocket push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// Frames queued per WebSocket connection before updates are conflated (merged per device)
    /// instead of queued, so a slow client costs bounded memory and never delays others.
    pub queue_capacity: usize,
    /// Largest WebSocket message a client may send, in bytes (library defaults are 64 MiB).
    pub max_message_bytes: usize,
    /// Most devices named in one subscribe request.
    pub max_devices_per_subscribe: usize,
    /// Largest `limit` accepted by the history endpoint.
    pub max_history_limit: usize,
    /// Largest `limit` accepted by the device list and dead-letter endpoints.
    pub max_list_limit: usize,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            max_message_bytes: 64 * 1024,
            max_devices_per_subscribe: 10_000,
            max_history_limit: 1000,
            max_list_limit: 10_000,
        }
    }
}
