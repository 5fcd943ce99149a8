//! `iotpipe dev`: the whole pipeline in one process, with zero external services.
//!
//! An embedded MQTT broker (rumqttd, see [`broker`]) takes device messages; the ingest operator
//! reads them into the in-process log; materialize, history, dead-letters (and rules, when enabled)
//! consume the telemetry topic; fanout pushes changes and alerts to WebSocket clients and serves
//! the API and dashboard. State lives in redb files in the data directory and survives restarts.
//!
//! Shutdown drains upstream-first, because the in-process log does not outlive the process:
//! 1. devices are disconnected (the broker's public listener closes), the simulator stops;
//! 2. ingest reads what the broker still holds until it has been idle briefly, appends, acks;
//! 3. materialize, history, dead letters and rules consume the telemetry topic to its end;
//! 4. fanout pushes the last changes, then WebSockets close with 1001 and the process exits.
//!
//! The whole sequence is bounded by `dev.shutdown_timeout`; a second signal exits at once.

pub mod broker;
pub mod simulate;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use iotpipe_pipeline::embedded::{MemLog, RedbDeadLetters, RedbHistory, RedbKv, RedbLatest};
use iotpipe_pipeline::health::Readiness;
use iotpipe_pipeline::kv::KeyValue;
use iotpipe_pipeline::log::Log;
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::registry::{CacheConfig, CachedRegistry, KvRegistry};
use iotpipe_pipeline::runtime::{IngestRunConfig, RunConfig};
use iotpipe_pipeline::store::StoreError;
use iotpipe_rules::files::RuleDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, DEFAULT_HTTP_LISTEN, DEFAULT_MQTT_LISTEN};
use crate::control::{Control, RegistryFeed, RulesFeed};
use crate::dead_letters::DeadLetters;
use crate::fanout::hub::Hub;
use crate::fanout::{api, no_delay, AppState, FanoutAlerts, FanoutChanges};
use crate::history::History;
use crate::ingest::{MqttSource, TopicTemplate};
use crate::materialize::Materialize;
use crate::rules::Rules;
use crate::tasks::{join_all, outcome, spawn_ingest, spawn_op};
use crate::webhooks::Webhooks;
use axum::serve::ListenerExt;

/// Prints a line for the person running `iotpipe dev`. Unlike `println!` it never panics: a closed
/// stdout (a parent that stopped reading) must not take the pipeline down.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

/// Binds `explicit` if given (a taken port is then an error naming `flag`), else `default`, falling
/// back to a free port on the same interface when the default is taken.
///
/// # Errors
/// When the explicit address cannot be bound, or no port at all can be.
pub async fn bind_listener(
    explicit: Option<SocketAddr>,
    default: &str,
    flag: &str,
    what: &str,
) -> anyhow::Result<TcpListener> {
    if let Some(addr) = explicit {
        return TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow!("{flag} {addr}: {e}"));
    }
    let default: SocketAddr = default.parse().context("default address")?;
    match TcpListener::bind(default).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            let l = TcpListener::bind(SocketAddr::new(default.ip(), 0)).await?;
            say!(
                "{what} port {default} is in use; listening on {} instead (set {flag} to choose).",
                l.local_addr()?
            );
            Ok(l)
        }
        Err(e) => Err(anyhow!("{flag} {default}: {e}")),
    }
}

fn open_err(path: &std::path::Path, e: StoreError) -> anyhow::Error {
    let msg = e.to_string();
    if msg.contains("already open") || msg.contains("locked") {
        anyhow!(
            "{} is in use by another iotpipe process ({msg})",
            path.display()
        )
    } else {
        anyhow!("cannot open {}: {msg}", path.display())
    }
}

/// Runs `iotpipe dev` until `shutdown` is cancelled, then drains and returns.
///
/// # Errors
/// Start-up failures (a taken explicit port, a locked data directory) and a failed operator.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let topics = cfg.topics.clone();
    let template = TopicTemplate::parse(&cfg.ingest.topic_template)?;

    std::fs::create_dir_all(&cfg.dev.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.dev.data_dir.display()))?;
    let p = |f: &str| cfg.dev.data_dir.join(f);
    let latest =
        Arc::new(RedbLatest::open(&p("latest.redb")).map_err(|e| open_err(&p("latest.redb"), e))?);
    let history = Arc::new(
        RedbHistory::open(&p("history.redb")).map_err(|e| open_err(&p("history.redb"), e))?,
    );
    let dead = Arc::new(
        RedbDeadLetters::open(&p("dead_letters.redb"), cfg.dead_letters.keep)
            .map_err(|e| open_err(&p("dead_letters.redb"), e))?,
    );

    let mem_log = Arc::new(MemLog::new(cfg.dev.log_partitions, cfg.dev.log_capacity));
    for t in [
        &topics.telemetry,
        &topics.changes,
        &topics.alerts,
        &topics.dead_letters,
        &topics.rules,
        &topics.registry,
    ] {
        mem_log.create_topic(t);
    }
    let log: Arc<dyn Log> = mem_log;

    let http_listener = bind_listener(
        cfg.dev.http_listen,
        DEFAULT_HTTP_LISTEN,
        "--http-listen",
        "HTTP",
    )
    .await?;
    let mqtt_listener = bind_listener(
        cfg.dev.mqtt_listen,
        DEFAULT_MQTT_LISTEN,
        "--mqtt-listen",
        "MQTT",
    )
    .await?;
    let http_addr = http_listener.local_addr()?;
    crate::fanout::check_exposure(&cfg.fanout, http_addr)?;
    let authenticator = crate::fanout::auth_parts(&cfg.fanout, &cfg.rules.dev_owner)?;
    let mqtt_addr = mqtt_listener.local_addr()?;
    let max_packet = (cfg.limits.max_payload_bytes * 4).max(1 << 20);
    let broker_addr = broker::start_rumqttd(max_packet).await?;

    // Tokens: one per drain stage, cancelled in order at shutdown; `fatal` when an operator dies.
    let fatal = CancellationToken::new();
    let ingest_stop = CancellationToken::new();
    let intake = CancellationToken::new();
    let stage2 = CancellationToken::new();
    let stage3 = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let sim_stop = CancellationToken::new();

    // Join every consumer group before ingest starts, so no group misses the first records.
    let run_cfg = |max_batch: usize| RunConfig {
        max_batch,
        ..RunConfig::default()
    };
    let mut stage2_tasks = vec![
        spawn_op(
            "materialize",
            log.subscribe(&topics.telemetry, "materialize").await?,
            Materialize::new(latest.clone(), log.clone(), topics.clone(), metrics.clone()),
            run_cfg(cfg.materialize.max_batch),
            stage2.clone(),
            metrics.clone(),
            fatal.clone(),
        ),
        spawn_op(
            "history",
            log.subscribe(&topics.telemetry, "history").await?,
            History::new(
                history.clone(),
                log.clone(),
                topics.clone(),
                metrics.clone(),
            ),
            run_cfg(cfg.history.max_batch),
            stage2.clone(),
            metrics.clone(),
            fatal.clone(),
        ),
    ];
    // The control plane: device registry, rule definitions, rule state and alarms, in one
    // embedded table that survives restarts (a restart neither re-raises nor forgets an alarm).
    let control_kv: Arc<dyn KeyValue> =
        Arc::new(RedbKv::open(&p("control.redb")).map_err(|e| open_err(&p("control.redb"), e))?);
    let registry = Arc::new(CachedRegistry::new(
        Arc::new(KvRegistry(control_kv.clone())),
        CacheConfig {
            ttl: cfg.rules.registry_cache_ttl,
            default_owner: Some(cfg.rules.dev_owner.clone()),
            ..CacheConfig::default()
        },
    ));
    let control = Arc::new(Control::new(
        registry.clone(),
        control_kv.clone(),
        log.clone(),
        topics.clone(),
        cfg.rules.limits.clone(),
    ));
    let mut stage3_extra = vec![spawn_op(
        "registry_feed",
        log.subscribe(&topics.registry, "registry_feed").await?,
        RegistryFeed(registry.clone()),
        run_cfg(1000),
        stage3.clone(),
        metrics.clone(),
        fatal.clone(),
    )];
    if cfg.rules.enabled || cfg.rules.dir.is_some() {
        let engine = crate::rules::new_engine(
            &cfg.rules,
            registry.clone(),
            control_kv.clone(),
            metrics.clone(),
            "dev",
        );
        crate::rules::load_engine(&engine).await?;
        if let Some(dir) = &cfg.rules.dir {
            let cooldown = i64::try_from(cfg.rules.cooldown.as_millis()).unwrap_or(i64::MAX);
            let mut files = RuleDir::new(dir, &cfg.rules.dev_owner, cooldown);
            for e in files.sync(&engine) {
                say!("rule error: {e}");
            }
            // Re-read the directory every second: edits take effect without a restart.
            let (engine, stop) = (engine.clone(), stage2.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    for e in files.sync(&engine) {
                        say!("rule error: {e}");
                    }
                }
            });
        }
        stage3_extra.push(spawn_op(
            "rules_feed",
            log.subscribe(&topics.rules, "rules_feed").await?,
            RulesFeed(engine.clone()),
            run_cfg(100),
            stage3.clone(),
            metrics.clone(),
            fatal.clone(),
        ));
        if cfg.rules.webhooks.enabled {
            stage3_extra.push(spawn_op(
                "webhooks",
                log.subscribe(&topics.alerts, "webhooks").await?,
                Webhooks::new(
                    engine.clone(),
                    cfg.rules.webhooks.clone(),
                    log.clone(),
                    topics.clone(),
                    metrics.clone(),
                )
                .map_err(|e| anyhow!(e))?,
                run_cfg(100),
                stage3.clone(),
                metrics.clone(),
                fatal.clone(),
            ));
        }
        stage2_tasks.push(spawn_op(
            "rules",
            log.subscribe(&topics.telemetry, "rules").await?,
            Rules::new(engine, log.clone(), topics.clone(), metrics.clone()),
            // Timer rules ("no data for 10 minutes") are evaluated every second.
            RunConfig {
                tick: Some(Duration::from_secs(1)),
                ..run_cfg(cfg.rules.max_batch)
            },
            stage2.clone(),
            metrics.clone(),
            fatal.clone(),
        ));
    }
    let hub = Arc::new(Hub::new(
        cfg.fanout.queue_capacity,
        cfg.fanout.resume_buffer,
        metrics.clone(),
    ));
    // Dead letters are written by every stage up to materialize/history, so they drain last.
    let mut stage3_tasks = vec![
        spawn_op(
            "fanout",
            log.subscribe(&topics.changes, "fanout").await?,
            FanoutChanges::new(hub.clone(), Some(registry.clone())),
            run_cfg(1000),
            stage3.clone(),
            metrics.clone(),
            fatal.clone(),
        ),
        spawn_op(
            "fanout_alerts",
            log.subscribe(&topics.alerts, "fanout").await?,
            FanoutAlerts::new(hub.clone(), Some(registry.clone())),
            run_cfg(1000),
            stage3.clone(),
            metrics.clone(),
            fatal.clone(),
        ),
        spawn_op(
            "dead_letters",
            log.subscribe(&topics.dead_letters, "dead_letters").await?,
            DeadLetters::new(dead.clone()),
            run_cfg(1000),
            stage3.clone(),
            metrics.clone(),
            fatal.clone(),
        ),
    ];
    stage3_tasks.extend(stage3_extra);

    let info = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "mode": "dev",
        "mqtt": mqtt_addr.to_string(),
        "http": http_addr.to_string(),
        "data_dir": cfg.dev.data_dir.display().to_string(),
        "topic_template": template.to_string(),
        "subscription_filter": template.subscription_filter(),
    });
    let ready = Arc::new(Readiness::new());
    let state = AppState {
        latest: latest.clone(),
        history: history.clone(),
        dead_letters: dead.clone(),
        hub: hub.clone(),
        metrics: metrics.clone(),
        config: Arc::new(cfg.fanout.clone()),
        info: Arc::new(info),
        ready: ready.clone(),
        history_cache: None,
        control: Some(control.clone()),
        shutdown: http_stop.clone(),
        auth: authenticator,
        limiter: Arc::new(iotpipe_pipeline::ratelimit::LocalLimiter::default()),
        registry: Some(registry.clone()),
    };
    let app = api::router(state);
    let http_token = http_stop.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http_listener.tap_io(no_delay), app)
            .with_graceful_shutdown(http_token.cancelled_owned())
            .await
    });

    // Ingest, reading from the private broker port; its stop hook closes the public one.
    let intake_hook = intake.clone();
    let source = MqttSource::connect(
        &broker_addr.ip().to_string(),
        broker_addr.port(),
        &cfg.ingest,
        max_packet,
    )?
    .with_stop_hook(Arc::new(move || intake_hook.cancel()));
    let mut subscribed = source.subscribed();
    let ingest_cfg = IngestRunConfig {
        max_batch: cfg.ingest.max_batch,
        drain_idle: cfg.ingest.drain_idle,
        ..IngestRunConfig::default()
    };
    let ingest_task = spawn_ingest(
        source,
        log.clone(),
        topics.clone(),
        cfg.limits.clone(),
        ingest_cfg,
        ingest_stop.clone(),
        metrics.clone(),
        fatal.clone(),
    );
    // Devices come in only once ingest's subscription stands: the broker acknowledges a QoS 1
    // publish even when nobody subscribes, and such a message would be lost.
    tokio::time::timeout(Duration::from_secs(10), subscribed.wait_for(|s| *s))
        .await
        .map_err(|_| anyhow!("ingest did not subscribe to the embedded broker within 10 s"))?
        .map_err(|_| anyhow!("ingest stopped before subscribing"))?;
    broker::spawn_proxy(mqtt_listener, broker_addr, intake.clone());

    let sim_task = (cfg.dev.simulate > 0).then(|| {
        tokio::spawn(simulate::run(
            mqtt_addr,
            template.clone(),
            cfg.dev.simulate,
            cfg.dev.simulate_interval,
            sim_stop.clone(),
        ))
    });

    ready.set_started(true);
    say!("iotpipe dev is running.");
    say!("  MQTT broker: {mqtt_addr}  (publish JSON to {template})");
    say!("  Dashboard:   http://{http_addr}/");
    say!("  API:         http://{http_addr}/v1/devices");
    say!("  Data dir:    {}", cfg.dev.data_dir.display());
    info!(mqtt = %mqtt_addr, http = %http_addr, "iotpipe dev started.");

    tokio::select! {
        () = shutdown.cancelled() => info!("Shutting down: draining the pipeline."),
        () = fatal.cancelled() => warn!("An operator failed; shutting down."),
    }
    ready.set_started(false);
    let started = Instant::now();
    let drained = tokio::time::timeout(cfg.dev.shutdown_timeout, async {
        sim_stop.cancel();
        if let Some(t) = sim_task {
            let _ = t.await;
        }
        ingest_stop.cancel();
        let mut ok = join_all(vec![ingest_task]).await;
        stage2.cancel();
        ok &= join_all(stage2_tasks).await;
        stage3.cancel();
        ok &= join_all(stage3_tasks).await;
        http_stop.cancel();
        hub.wait_closed(Duration::from_secs(2)).await;
        let _ = http_task.await;
        ok
    })
    .await;
    outcome(drained, &fatal, started, cfg.dev.shutdown_timeout)
}
