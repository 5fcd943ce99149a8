//! The operator runtime: the loops that drive sources and operators.
//!
//! Operators implement one method, [`Operator::process`]; the runtime owns everything around it:
//! polling the log, batching, retrying external failures with backoff and jitter, committing
//! offsets only after `process` returned `Ok`, ticking, and stopping.
//!
//! Delivery guarantee. `process(batch)` returning `Ok` means every side effect of every record in
//! the batch is durable (or the record was dead-lettered). Only then are the batch's offsets
//! committed, so a crash at any point replays uncommitted records, and idempotent sinks (record ids,
//! seq numbers) turn the replay into a no-op. A batch that fails with an external error is retried
//! as a whole and nothing is committed meanwhile: the backlog grows in the log (back-pressure) and
//! nothing is dropped. A bug stops the operator without committing.
//!
//! Shutdown. Each loop watches a [`CancellationToken`]. With [`Drain::ToEnd`] (the embedded,
//! in-process log, which does not outlive the process) the loop keeps consuming until its input is
//! exhausted and then returns; the caller cancels the stages one after another, upstream first, so
//! every record that entered the pipeline reaches its sinks. With [`Drain::Immediate`] (Kafka, where
//! unconsumed records are safe in the broker) it finishes the current batch, commits and returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::dead_letter::{DeadLetter, Stage};
use crate::error::{ErrorClass, Retryable};
use crate::log::{Consumer, Log, LogError, LogRecord, Produce, Topics};
use crate::metrics::Metrics;
use crate::record::{parse_record, Limits};
use crate::source::{Incoming, Source};
use crate::store::StoreError;

/// An operator failure, classified for the runtime.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OperatorError {
    /// What kind of failure.
    pub class: ErrorClass,
    /// Description.
    pub message: String,
}

impl OperatorError {
    /// An external fault: the batch is retried.
    pub fn external(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::External,
            message: message.into(),
        }
    }

    /// A bug: the operator stops without committing.
    pub fn bug(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Bug,
            message: message.into(),
        }
    }
}

impl Retryable for OperatorError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

impl From<StoreError> for OperatorError {
    fn from(e: StoreError) -> Self {
        // A store refusing our own query shape is a bug, not the input of a device.
        let class = match e.class() {
            ErrorClass::External => ErrorClass::External,
            ErrorClass::Input | ErrorClass::Bug => ErrorClass::Bug,
        };
        Self {
            class,
            message: e.to_string(),
        }
    }
}

impl From<LogError> for OperatorError {
    fn from(e: LogError) -> Self {
        Self {
            class: e.class(),
            message: e.to_string(),
        }
    }
}

/// A stream-processing operator.
#[async_trait]
pub trait Operator: Send + 'static {
    /// Name used in logs and metric labels.
    fn name(&self) -> &'static str;

    /// Processes a batch. `Ok` promises that every side effect of every record is durable (or the
    /// record was dead-lettered); the runtime commits right after.
    ///
    /// # Errors
    /// [`OperatorError`]: external errors make the runtime retry the whole batch.
    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError>;

    /// Called every [`RunConfig::tick`] (for timers such as "no data for 10 minutes").
    ///
    /// # Errors
    /// As for `process`.
    async fn on_tick(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Called once after the last batch, before the loop returns.
    ///
    /// # Errors
    /// As for `process`.
    async fn on_shutdown(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }
}

/// How a loop stops when its token is cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Keep consuming until the input is exhausted (in-process log).
    ToEnd,
    /// Finish the current batch, commit, return (Kafka).
    Immediate,
}

/// Settings of an operator loop.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Largest batch handed to `process`.
    pub max_batch: usize,
    /// How long one poll waits for the first record.
    pub poll_wait: Duration,
    /// Interval of `on_tick`, if any.
    pub tick: Option<Duration>,
    /// Shutdown behaviour.
    pub drain: Drain,
    /// Retry policy for external errors.
    pub backoff: Backoff,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            max_batch: 500,
            poll_wait: Duration::from_millis(100),
            tick: None,
            drain: Drain::ToEnd,
            backoff: Backoff::default(),
        }
    }
}

/// Exponential backoff with full jitter: attempt `n` sleeps a random time in
/// `[0, min(max, initial * 2^n)]`, so many workers retrying one dependency do not move in lockstep.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First ceiling.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(jitter() % nanos)
    }
}

fn jitter() -> u64 {
    use std::cell::Cell;
    thread_local!(static STATE: Cell<u64> = Cell::new(
        u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(1) & u128::from(u64::MAX)).unwrap_or(1) | 1
    ));
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// Runs `op` on `consumer` until `shutdown` is cancelled (and, with [`Drain::ToEnd`], the input
/// is exhausted).
///
/// # Errors
/// The first bug-class error of the operator or the log; nothing of the failing batch is committed.
pub async fn run_operator<O: Operator + ?Sized>(
    mut consumer: Box<dyn Consumer>,
    op: &mut O,
    cfg: RunConfig,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), OperatorError> {
    let name = op.name();
    let records_total = metrics.operator_records.with_label_values(&[name]);
    let batch_seconds = metrics.operator_batch_seconds.with_label_values(&[name]);
    let lag = metrics.operator_lag.with_label_values(&[name]);
    let mut last_tick = Instant::now();
    let mut draining = false;
    info!(operator = name, "Operator started.");
    loop {
        if !draining && shutdown.is_cancelled() {
            if cfg.drain == Drain::Immediate {
                break;
            }
            draining = true;
            debug!(operator = name, "Draining input.");
        }
        let wait = if draining {
            Duration::from_millis(20)
        } else {
            cfg.poll_wait
        };
        let polled = tokio::select! {
            biased;
            () = shutdown.cancelled(), if !draining => continue,
            r = consumer.poll(cfg.max_batch, wait) => r,
        };
        let batch = match polled {
            Ok(b) => b,
            Err(e) => {
                let err = OperatorError::from(e);
                metrics
                    .operator_errors
                    .with_label_values(&[name, err.class.as_str()])
                    .inc();
                if err.class != ErrorClass::External {
                    error!(operator = name, error = %err, "Log failed; stopping operator.");
                    return Err(err);
                }
                warn!(operator = name, error = %err, "Poll failed; retrying.");
                tokio::time::sleep(cfg.backoff.delay(3)).await;
                continue;
            }
        };
        if batch.is_empty() {
            if draining {
                break;
            }
        } else {
            let started = Instant::now();
            process_with_retry(op, &batch, &cfg, &shutdown, &metrics).await?;
            let offsets = next_offsets(&batch);
            commit_with_retry(consumer.as_mut(), &offsets, &cfg, name, &metrics).await?;
            records_total.inc_by(batch.len() as u64);
            batch_seconds.observe(started.elapsed().as_secs_f64());
            if let Some(l) = consumer.lag() {
                lag.set(i64::try_from(l).unwrap_or(i64::MAX));
            }
        }
        if let Some(tick) = cfg.tick {
            if last_tick.elapsed() >= tick {
                last_tick = Instant::now();
                if let Err(e) = op.on_tick().await {
                    metrics
                        .operator_errors
                        .with_label_values(&[name, e.class.as_str()])
                        .inc();
                    warn!(operator = name, error = %e, "Tick failed.");
                }
            }
        }
    }
    op.on_shutdown().await?;
    info!(operator = name, "Operator stopped.");
    Ok(())
}

async fn process_with_retry<O: Operator + ?Sized>(
    op: &mut O,
    batch: &[LogRecord],
    cfg: &RunConfig,
    shutdown: &CancellationToken,
    metrics: &Metrics,
) -> Result<(), OperatorError> {
    let name = op.name();
    let mut attempt = 0;
    loop {
        match op.process(batch).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                metrics
                    .operator_errors
                    .with_label_values(&[name, e.class.as_str()])
                    .inc();
                if e.class != ErrorClass::External {
                    error!(operator = name, error = %e, "Operator failed; stopping without commit.");
                    return Err(e);
                }
                // Immediate-drain backends keep unprocessed records safely in the broker, so a
                // shutdown may abandon the retry; the records are redelivered to the next owner.
                if cfg.drain == Drain::Immediate && shutdown.is_cancelled() {
                    return Err(e);
                }
                let delay = cfg.backoff.delay(attempt);
                warn!(operator = name, attempt, error = %e, delay_ms = delay.as_millis() as u64, "Batch failed; retrying.");
                tokio::time::sleep(delay).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

async fn commit_with_retry(
    consumer: &mut dyn Consumer,
    offsets: &[(u32, u64)],
    cfg: &RunConfig,
    name: &'static str,
    metrics: &Metrics,
) -> Result<(), OperatorError> {
    for attempt in 0..10 {
        match consumer.commit(offsets).await {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == ErrorClass::External => {
                metrics
                    .operator_errors
                    .with_label_values(&[name, "external"])
                    .inc();
                warn!(operator = name, error = %e, "Commit failed; retrying.");
                tokio::time::sleep(cfg.backoff.delay(attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Giving up on a commit is safe: the records are processed again (idempotently) after a restart.
    Err(OperatorError::external("commit kept failing"))
}

/// For each partition in `batch`, the offset after its last record.
pub fn next_offsets(batch: &[LogRecord]) -> Vec<(u32, u64)> {
    let mut out: Vec<(u32, u64)> = Vec::new();
    for r in batch {
        match out.iter_mut().find(|(p, _)| *p == r.partition) {
            Some((_, o)) => *o = (*o).max(r.offset + 1),
            None => out.push((r.partition, r.offset + 1)),
        }
    }
    out
}

/// Settings of the ingest loop.
#[derive(Debug, Clone)]
pub struct IngestRunConfig {
    /// Largest batch of messages appended (and acknowledged) together.
    pub max_batch: usize,
    /// After shutdown began: stop once the source has been idle this long.
    pub drain_idle: Duration,
    /// On shutdown, drain the source (embedded broker, which does not outlive the process) or
    /// stop after the current batch (an external broker keeps what was not acknowledged).
    pub drain_source: bool,
    /// Retry policy for log errors.
    pub backoff: Backoff,
}

impl Default for IngestRunConfig {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            drain_idle: Duration::from_secs(1),
            drain_source: true,
            backoff: Backoff::default(),
        }
    }
}

/// Reads `source`, validates every message, appends records to the telemetry topic and refusals to
/// the dead-letter topic, and only then acknowledges the messages to the source.
///
/// On `shutdown` it stops the source's intake and keeps draining what the source still holds until
/// the source has been idle for `drain_idle`; the caller bounds the whole by a deadline.
///
/// # Errors
/// A bug-class log error; messages not yet acknowledged stay with the source and are redelivered.
#[allow(clippy::too_many_arguments)]
pub async fn run_ingest(
    source: &mut dyn Source,
    log: Arc<dyn Log>,
    topics: &Topics,
    limits: &Limits,
    cfg: IngestRunConfig,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<(), OperatorError> {
    let mut buf: Vec<Incoming> = Vec::with_capacity(cfg.max_batch);
    let mut draining = false;
    info!(operator = "ingest", "Ingest started.");
    loop {
        buf.clear();
        let got = tokio::select! {
            biased;
            () = shutdown.cancelled(), if !draining => {
                if !cfg.drain_source {
                    // Everything received was appended and acknowledged; what the broker still
                    // holds stays there for the next ingest.
                    info!(operator = "ingest", "Stopping; unacknowledged messages stay with the broker.");
                    break;
                }
                info!(operator = "ingest", "Stopping intake and draining the source.");
                source.stop_intake().await;
                draining = true;
                continue;
            }
            r = source.recv(cfg.max_batch, &mut buf) => r,
            () = tokio::time::sleep(cfg.drain_idle), if draining => break,
        };
        if let Err(e) = got {
            match e.class() {
                ErrorClass::External => {
                    warn!(operator = "ingest", error = %e, "Source error.");
                    continue;
                }
                _ => break,
            }
        }
        metrics.ingest_received.inc_by(buf.len() as u64);
        let (records, letters) = validate_batch(&buf, limits);
        let n_records = records.len();
        for dl in &letters {
            metrics
                .dead_letters
                .with_label_values(&[Stage::Ingest.as_str(), dl.reason.as_str()])
                .inc();
        }
        let letters: Vec<Produce> = letters
            .iter()
            .map(|dl| Produce::json(dl.device.as_deref().unwrap_or(""), dl))
            .collect::<Result<_, _>>()?;
        append_with_retry(log.as_ref(), &topics.telemetry, records, cfg.backoff).await?;
        append_with_retry(log.as_ref(), &topics.dead_letters, letters, cfg.backoff).await?;
        metrics.ingest_appended.inc_by(n_records as u64);
        // The append above has returned: the log holds every record of the batch. Only now may the
        // source let its upstream forget them.
        if let Err(e) = source.ack().await {
            warn!(operator = "ingest", error = %e, "Acknowledgement failed; the upstream will redeliver.");
        }
    }
    info!(operator = "ingest", "Ingest stopped.");
    Ok(())
}

/// Validates a batch of incoming messages into log records and dead letters.
pub fn validate_batch(batch: &[Incoming], limits: &Limits) -> (Vec<Produce>, Vec<DeadLetter>) {
    let mut records = Vec::with_capacity(batch.len());
    let mut letters = Vec::new();
    for m in batch {
        let parsed = m
            .device
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|d| parse_record(d, &m.payload, m.received_at, m.source.clone(), limits))
            .map(|mut r| {
                r.arrival = m.arrival;
                r
            });
        match parsed.and_then(|r| {
            Produce::json(&r.device, &r).map_err(|e| {
                crate::record::Rejection::new(
                    crate::record::RejectReason::InvalidJson,
                    e.to_string(),
                )
            })
        }) {
            Ok(p) => records.push(p),
            Err(rej) => {
                debug!(reason = rej.reason.as_str(), detail = %rej.detail, "Rejected message.");
                letters.push(DeadLetter::from_rejection(
                    Stage::Ingest,
                    &rej,
                    m.device.as_deref().ok(),
                    m.source.clone(),
                    &m.payload,
                    m.received_at,
                ));
            }
        }
    }
    (records, letters)
}

/// Appends, retrying external errors with backoff until the log accepts the batch.
///
/// # Errors
/// A bug-class [`LogError`] (unknown topic, closed log).
pub async fn append_with_retry(
    log: &dyn Log,
    topic: &str,
    batch: Vec<Produce>,
    backoff: Backoff,
) -> Result<(), OperatorError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut attempt = 0;
    loop {
        match log.append(topic, batch.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == ErrorClass::External => {
                warn!(topic, attempt, error = %e, "Append failed; retrying.");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
        };
        for attempt in 0..40 {
            assert!(b.delay(attempt) <= Duration::from_millis(100));
        }
        let distinct: std::collections::HashSet<_> = (0..20).map(|_| b.delay(5)).collect();
        assert!(distinct.len() > 1, "delays should be jittered");
    }

    #[test]
    fn next_offsets_per_partition() {
        let r = |partition, offset| LogRecord {
            partition,
            offset,
            key: bytes::Bytes::new(),
            value: bytes::Bytes::new(),
        };
        let mut got = next_offsets(&[r(0, 5), r(1, 2), r(0, 6), r(1, 3)]);
        got.sort_unstable();
        assert_eq!(got, vec![(0, 7), (1, 4)]);
    }
}
