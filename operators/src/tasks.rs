//! Operators as tasks: spawning, joining and judging a shutdown, shared by `iotpipe dev` and the
//! distributed processes so both react to a failed operator and a slow drain the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use iotpipe_pipeline::log::{Consumer, Log, Topics};
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::record::Limits;
use iotpipe_pipeline::runtime::{
    run_ingest, run_operator, IngestRunConfig, Operator, OperatorError, RunConfig,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, Instrument};

use crate::ingest::MqttSource;

/// A running operator.
pub type OpTask = JoinHandle<Result<(), OperatorError>>;

/// Runs `op` on `consumer` until `stop`; a failure cancels `fatal`, which shuts the process down.
pub fn spawn_op<O: Operator>(
    name: &'static str,
    consumer: Box<dyn Consumer>,
    mut op: O,
    cfg: RunConfig,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
    fatal: CancellationToken,
) -> OpTask {
    tokio::spawn(
        async move {
            let r = run_operator(consumer, &mut op, cfg, stop, metrics).await;
            if let Err(e) = &r {
                error!(operator = name, error = %e, "Operator failed; shutting down.");
                fatal.cancel();
            }
            r
        }
        .instrument(info_span!("operator", name)),
    )
}

/// Runs ingest from `source` until `stop`, then disconnects it; a failure cancels `fatal`.
#[allow(clippy::too_many_arguments)]
pub fn spawn_ingest(
    mut source: MqttSource,
    log: Arc<dyn Log>,
    topics: Topics,
    limits: Limits,
    cfg: IngestRunConfig,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
    fatal: CancellationToken,
) -> OpTask {
    tokio::spawn(
        async move {
            let r = run_ingest(&mut source, log, &topics, &limits, cfg, stop, metrics).await;
            source.close().await;
            if let Err(e) = &r {
                error!(operator = "ingest", error = %e, "Ingest failed; shutting down.");
                fatal.cancel();
            }
            r
        }
        .instrument(info_span!("operator", name = "ingest")),
    )
}

/// Waits for every task; true when all ended without error.
pub async fn join_all(tasks: impl IntoIterator<Item = OpTask>) -> bool {
    let mut ok = true;
    for t in tasks {
        ok &= matches!(t.await, Ok(Ok(())));
    }
    ok
}

/// Judges a shutdown: `drained` is the result of the drain bounded by `timeout`.
///
/// # Errors
/// When an operator failed or the drain ran out of time.
pub fn outcome(
    drained: Result<bool, tokio::time::error::Elapsed>,
    fatal: &CancellationToken,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<()> {
    match drained {
        Ok(true) if !fatal.is_cancelled() => {
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Stopped cleanly."
            );
            Ok(())
        }
        Ok(_) => Err(anyhow!("an operator failed; see the log above")),
        Err(_) => Err(anyhow!(
            "shutdown did not finish within {timeout:?}; exiting anyway"
        )),
    }
}
