//! Dead letters: what a message that cannot be processed becomes, so that bad input never panics a
//! worker and never stalls a partition. Each carries the reason, the stage that refused it and a
//! bounded excerpt of the original bytes, and is appended to the dead-letter topic like any record.

use serde::{Deserialize, Serialize};

use crate::record::{Rejection, SourceRef};

/// How many bytes of the original payload a dead letter keeps.
pub const MAX_EXCERPT_BYTES: usize = 1024;

/// The pipeline stage that refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Parsing and validating device messages.
    Ingest,
    /// Merging records into latest state.
    Materialize,
    /// Writing history.
    History,
    /// Evaluating rules.
    Rules,
    /// Pushing to clients.
    Fanout,
    /// Delivering alerts to webhooks.
    Webhook,
}

impl Stage {
    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Materialize => "materialize",
            Self::History => "history",
            Self::Rules => "rules",
            Self::Fanout => "fanout",
            Self::Webhook => "webhook",
        }
    }
}

/// A refused message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Which stage refused it.
    pub stage: Stage,
    /// Machine-readable reason (see [`crate::record::RejectReason`]).
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// The device id, when one could be determined.
    pub device: Option<String>,
    /// Where the message came from.
    pub source: SourceRef,
    /// When it was refused, epoch ms.
    pub at: i64,
    /// Up to [`MAX_EXCERPT_BYTES`] of the original payload, lossily decoded as UTF-8.
    pub payload_excerpt: String,
    /// The original payload's size in bytes.
    pub payload_bytes: usize,
}

impl DeadLetter {
    /// Builds a dead letter from a rejection and the original payload.
    pub fn from_rejection(
        stage: Stage,
        rejection: &Rejection,
        device: Option<&str>,
        source: SourceRef,
        payload: &[u8],
        at: i64,
    ) -> Self {
        let cut = &payload[..payload.len().min(MAX_EXCERPT_BYTES)];
        Self {
            stage,
            reason: rejection.reason.as_str().to_owned(),
            detail: truncate(&rejection.detail, 512),
            device: device.map(|d| truncate(d, 256)),
            source,
            at,
            payload_excerpt: String::from_utf8_lossy(cut).into_owned(),
            payload_bytes: payload.len(),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RejectReason;

    #[test]
    fn excerpt_is_bounded() {
        let payload = vec![b'x'; 100_000];
        let dl = DeadLetter::from_rejection(
            Stage::Ingest,
            &Rejection::new(RejectReason::PayloadTooLarge, "big"),
            Some("d1"),
            SourceRef::Internal,
            &payload,
            0,
        );
        assert_eq!(dl.payload_excerpt.len(), MAX_EXCERPT_BYTES);
        assert_eq!(dl.payload_bytes, 100_000);
        assert_eq!(dl.reason, "payload_too_large");
    }
}
