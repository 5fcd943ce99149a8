//! Where telemetry enters: the [`Source`] trait ingest reads from.
//!
//! A source hands out messages and is told, afterwards, that they are safe: [`Source::ack`] is
//! called only after every message of the batch was appended to the log (or dead-lettered). The MQTT
//! source turns that into PUBACKs; a Kinesis source (step 5) will turn it into a checkpoint. This is
//! the only thing that lets the upstream forget a message, so nothing acknowledged is lost.

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{ErrorClass, Retryable};
use crate::record::{Rejection, SourceRef};

/// One message from a source.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The device id the source derived (e.g. from the MQTT topic), or why it could not.
    pub device: Result<String, Rejection>,
    /// Raw payload bytes.
    pub payload: Bytes,
    /// Where it came from.
    pub source: SourceRef,
    /// Receive time, epoch ms.
    pub received_at: i64,
    /// Arrival stamp from [`crate::time::arrival_ns`].
    pub arrival: u64,
}

/// Errors of a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Connection to the upstream failed; the source reconnects by itself.
    #[error("source disconnected: {0}")]
    Disconnected(String),
    /// The source has ended and will deliver nothing more.
    #[error("source closed")]
    Closed,
}

impl Retryable for SourceError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Disconnected(_) => ErrorClass::External,
            Self::Closed => ErrorClass::Bug,
        }
    }
}

/// A stream of device messages with explicit acknowledgement.
#[async_trait]
pub trait Source: Send {
    /// Waits for at least one message and appends up to `max` to `out`. Cancel-safe.
    ///
    /// # Errors
    /// [`SourceError::Closed`] when the source has ended.
    async fn recv(&mut self, max: usize, out: &mut Vec<Incoming>) -> Result<(), SourceError>;

    /// Acknowledges every message returned by earlier `recv` calls and not yet acknowledged, in
    /// order. Called only after they are durable in the log.
    ///
    /// # Errors
    /// [`SourceError`] when the acknowledgement cannot be sent; the upstream will redeliver.
    async fn ack(&mut self) -> Result<(), SourceError>;

    /// Stops taking new messages from the upstream where the source can (e.g. stop the broker's
    /// device listener); messages already accepted upstream are still delivered by `recv`.
    async fn stop_intake(&mut self) {}
}
