//! Configuration of the fanout service.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Most devices one connection may be subscribed to (`*` counts as one).
    pub max_subscriptions_per_connection: usize,
    /// Largest `limit` accepted by the history endpoint.
    pub max_history_limit: usize,
    /// Largest `limit` accepted by the device list and dead-letter endpoints.
    pub max_list_limit: usize,
    /// Updates kept per device for resuming clients (`since`); 0 turns resume buffers off (every
    /// resume gets a snapshot).
    pub resume_buffer: usize,
    /// A client that has had conflated updates waiting this long (or whose socket accepted nothing
    /// for this long) is closed with code 4002.
    #[serde(with = "humantime_serde")]
    pub slow_client_deadline: Duration,
    /// The server pings every connection this often.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection that sent nothing (not even a pong) for this long is closed with code 4003.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Who callers are (JWT).
    pub auth: AuthConfig,
    /// The tier of callers whose token has no tier claim.
    pub default_tier: String,
    /// Limits per tier (the token's tier claim names one).
    pub tiers: BTreeMap<String, Tier>,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            max_message_bytes: 64 * 1024,
            max_devices_per_subscribe: 10_000,
            max_subscriptions_per_connection: 10_000,
            max_history_limit: 1000,
            max_list_limit: 10_000,
            resume_buffer: 8,
            slow_client_deadline: Duration::from_secs(30),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            auth: AuthConfig::default(),
            default_tier: "free".into(),
            tiers: Tier::defaults(),
        }
    }
}

impl FanoutConfig {
    /// The limits of `tier` (the default tier's when it is unknown).
    pub fn tier(&self, tier: Option<&str>) -> &Tier {
        tier.and_then(|t| self.tiers.get(t))
            .or_else(|| self.tiers.get(&self.default_tier))
            .unwrap_or(&UNLIMITED)
    }

    /// Problems of this section, for the config validation.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.tiers.contains_key(&self.default_tier) {
            out.push(format!(
                "fanout.default_tier `{}` is not one of fanout.tiers",
                self.default_tier
            ));
        }
        for (name, t) in &self.tiers {
            if t.requests_per_minute == 0 || t.subscribes_per_minute == 0 || t.connections == 0 {
                out.push(format!("fanout.tiers.{name}: limits must be positive"));
            }
        }
        match self.auth.mode {
            AuthMode::None => {}
            AuthMode::Hs256 => {
                if self.auth.secret.len() < 32 {
                    out.push(
                        "fanout.auth.secret: HS256 needs a secret of at least 32 bytes".into(),
                    );
                }
            }
            AuthMode::Rs256 => {
                if self.auth.public_key_file.is_none() {
                    out.push("fanout.auth.public_key_file: RS256 needs a PEM public key".into());
                }
            }
        }
        if self.idle_timeout <= self.ping_interval {
            out.push("fanout.idle_timeout must be longer than fanout.ping_interval".into());
        }
        out
    }
}

static UNLIMITED: Tier = Tier {
    requests_per_minute: u32::MAX,
    burst: u32::MAX,
    subscribes_per_minute: u32::MAX,
    connections: usize::MAX,
};

/// How callers authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No authentication: every caller is an administrator. Only allowed on loopback addresses.
    #[default]
    None,
    /// JWTs signed with a shared secret (HMAC-SHA256).
    Hs256,
    /// JWTs signed with an RSA key (RSASSA-PKCS1-v1_5 with SHA-256); the server holds the public key.
    Rs256,
}

/// JWT settings. The algorithm is pinned: a token whose header names another algorithm (`none`
/// included) is refused.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `none`, `hs256` or `rs256`.
    pub mode: AuthMode,
    /// HS256 shared secret (at least 32 bytes; prefer `IOTPIPE_FANOUT__AUTH__SECRET`).
    pub secret: String,
    /// RS256: the PEM file of the public key.
    pub public_key_file: Option<PathBuf>,
    /// Required `aud` claim, when set.
    pub audience: Option<String>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Boolean claim that makes the caller an administrator.
    pub admin_claim: String,
    /// String claim naming the caller's tier.
    pub tier_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            secret: String::new(),
            public_key_file: None,
            audience: None,
            issuer: None,
            admin_claim: "admin".into(),
            tier_claim: "tier".into(),
            leeway: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field("secret", &if self.secret.is_empty() { "" } else { "***" })
            .field("public_key_file", &self.public_key_file)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("admin_claim", &self.admin_claim)
            .field("tier_claim", &self.tier_claim)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// Limits of one tier, per user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// REST calls per minute (sustained).
    pub requests_per_minute: u32,
    /// REST calls allowed at once on top of an idle budget.
    pub burst: u32,
    /// WebSocket subscribe/unsubscribe requests per minute (burst: a tenth of it, at least 5).
    pub subscribes_per_minute: u32,
    /// Open WebSocket connections per user, per fanout instance.
    pub connections: usize,
}

impl Tier {
    /// The seed's tiers: free 100 requests/min, paid 1,000, enterprise 10,000.
    pub fn defaults() -> BTreeMap<String, Tier> {
        let tier = |rpm: u32, burst: u32, spm: u32, connections: usize| Tier {
            requests_per_minute: rpm,
            burst,
            subscribes_per_minute: spm,
            connections,
        };
        BTreeMap::from([
            ("free".to_owned(), tier(100, 20, 60, 5)),
            ("paid".to_owned(), tier(1_000, 100, 600, 20)),
            ("enterprise".to_owned(), tier(10_000, 1_000, 6_000, 200)),
        ])
    }

    /// Burst of subscribe requests.
    pub fn subscribe_burst(&self) -> u32 {
        (self.subscribes_per_minute / 10).max(5)
    }
}
