//! Distributed mode: each operator as its own process (`iotpipe ingest|materialize|history|rules|
//! fanout`), or all of them in one (`iotpipe all`), on Kafka, Redis and DynamoDB.
//!
//! The operators are the same ones `iotpipe dev` runs; only the backends differ. N copies of an
//! operator share the telemetry partitions through their consumer group; every fanout instance
//! consumes the whole changes topic in a group of its own, because any dashboard may be connected
//! to any instance.
//!
//! Every process serves `/healthz`, `/readyz` (ready only while its backends answer and its
//! consumers have joined their groups) and `/metrics`. On SIGTERM it becomes not-ready, stops
//! ingest (what the MQTT broker still holds stays there for the next ingest), lets each operator
//! finish and commit its current batch (what is left stays in Kafka for the partition's next
//! owner), flushes the producer, closes WebSockets with 1001 and exits — within
//! `server.shutdown_timeout`; a second signal exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use iotpipe_dynamodb::{DynamoHistory, DynamoRegistry};
use iotpipe_kafka::KafkaLog;
use iotpipe_pipeline::health::Readiness;
use iotpipe_pipeline::kv::KeyValue;
use iotpipe_pipeline::log::{Consumer, Log, StartAt};
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::registry::{CacheConfig, CachedRegistry};
use iotpipe_pipeline::runtime::{Drain, IngestRunConfig, Operator, RunConfig};
use iotpipe_redis::{RedisDeadLetters, RedisKv, RedisLatest, RedisLimiter, RedisPageCache};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::control::{Control, RegistryFeed, RulesFeed};
use crate::dead_letters::DeadLetters;
use crate::fanout::hub::Hub;
use crate::fanout::{api, no_delay, AppState, FanoutAlerts, FanoutChanges};
use crate::history::History;
use crate::ingest::MqttSource;
use crate::materialize::Materialize;
use crate::rules::Rules;
use crate::tasks::{join_all, outcome, spawn_ingest, spawn_op, OpTask};
use crate::webhooks::Webhooks;

/// Which operators a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// MQTT -> Kafka.
    Ingest,
    /// Kafka -> Redis latest state + changes.
    Materialize,
    /// Kafka -> DynamoDB history.
    History,
    /// Kafka -> rules -> alerts.
    Rules,
    /// Changes and alerts -> WebSocket; the HTTP API.
    Fanout,
    /// Every operator in one process.
    All,
}

impl Role {
    /// The role's name (command and metric label).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Materialize => "materialize",
            Self::History => "history",
            Self::Rules => "rules",
            Self::Fanout => "fanout",
            Self::All => "all",
        }
    }

    fn runs(self, op: Role, cfg: &Config) -> bool {
        match self {
            // In `all`, rules run only when enabled; `iotpipe rules` runs them regardless.
            Self::All => op != Self::Rules || cfg.rules.enabled,
            r => r == op,
        }
    }
}

fn instance_id(cfg: &Config) -> String {
    cfg.server
        .instance_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| {
            format!(
                "{}-{:x}",
                std::process::id(),
                iotpipe_pipeline::time::arrival_ns() & 0xffff_ffff
            )
        })
}

/// Polls `check` every 5 s and keeps `flag` set while it succeeds.
fn watch<F, Fut>(name: &'static str, flag: Arc<AtomicBool>, stop: CancellationToken, check: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        loop {
            let ok = match tokio::time::timeout(Duration::from_secs(5), check()).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    warn!(backend = name, error = %e, "Backend check failed.");
                    false
                }
                Err(_) => {
                    warn!(backend = name, "Backend check timed out.");
                    false
                }
            };
            flag.store(ok, Ordering::Release);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}

struct Spawner {
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    stop: CancellationToken,
    fatal: CancellationToken,
    tasks: Vec<OpTask>,
}

impl Spawner {
    fn spawn<O: Operator>(
        &mut self,
        name: &'static str,
        consumer: Box<dyn Consumer>,
        op: O,
        max_batch: usize,
    ) {
        self.spawn_with(
            name,
            consumer,
            op,
            RunConfig {
                max_batch,
                drain: Drain::Immediate,
                ..RunConfig::default()
            },
        );
    }

    fn spawn_with<O: Operator>(
        &mut self,
        name: &'static str,
        consumer: Box<dyn Consumer>,
        op: O,
        cfg: RunConfig,
    ) {
        if let Some(joined) = consumer.joined() {
            self.ready.add(format!("{name} consumer group"), joined);
        }
        self.tasks.push(spawn_op(
            name,
            consumer,
            op,
            cfg,
            self.stop.clone(),
            self.metrics.clone(),
            self.fatal.clone(),
        ));
    }
}

/// Creates the DynamoDB history table, its TTL and index (`iotpipe history init`).
///
/// # Errors
/// When DynamoDB refuses.
pub async fn history_init(cfg: &Config) -> anyhow::Result<()> {
    let store = DynamoHistory::connect(&cfg.dynamodb).await;
    store.init_table().await?;
    println!("History table `{}` is ready.", cfg.dynamodb.table);
    DynamoRegistry::connect(&cfg.dynamodb)
        .await
        .init_table()
        .await?;
    println!(
        "Device registry table `{}` is ready.",
        cfg.dynamodb.devices_table
    );
    Ok(())
}

/// Runs `role` until `shutdown` is cancelled, then drains and returns.
///
/// # Errors
/// Start-up failures (unreachable backends, a taken port) and a failed operator.
#[allow(clippy::too_many_lines)]
pub async fn run(
    role: Role,
    cfg: Config,
    http_listen: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(Readiness::new());
    let topics = cfg.topics.clone();
    let checks_stop = CancellationToken::new();

    let kafka = Arc::new(KafkaLog::new(&cfg.kafka, role.name())?);
    if cfg.kafka.create_topics {
        tokio::time::timeout(
            Duration::from_secs(30),
            kafka.ensure_topics_with(
                &[
                    &topics.telemetry,
                    &topics.changes,
                    &topics.alerts,
                    &topics.dead_letters,
                ],
                &[&topics.rules, &topics.registry],
            ),
        )
        .await
        .map_err(|_| anyhow!("Kafka at {} did not answer within 30 s", cfg.kafka.brokers))??;
    }
    let kafka_ok = Arc::new(AtomicBool::new(true));
    ready.add("kafka", kafka_ok.clone());
    let k = kafka.clone();
    watch("kafka", kafka_ok, checks_stop.clone(), move || {
        let k = k.clone();
        async move { k.ping().await.map_err(|e| e.to_string()) }
    });
    let log: Arc<dyn Log> = kafka.clone();

    let runs_rules = role.runs(Role::Rules, &cfg);
    let runs_fanout = role.runs(Role::Fanout, &cfg);
    let needs_redis = role.runs(Role::Materialize, &cfg) || runs_fanout || runs_rules;
    let needs_dynamo = role.runs(Role::History, &cfg) || runs_fanout || runs_rules;
    let latest = if needs_redis {
        let l = Arc::new(
            RedisLatest::connect(&cfg.redis)
                .await
                .with_context(|| "Redis (redis.url)")?,
        );
        let ok = Arc::new(AtomicBool::new(true));
        ready.add("redis", ok.clone());
        let l2 = l.clone();
        watch("redis", ok, checks_stop.clone(), move || {
            let l = l2.clone();
            async move { l.ping().await.map_err(|e| e.to_string()) }
        });
        Some(l)
    } else {
        None
    };
    let history = if needs_dynamo {
        let h = Arc::new(DynamoHistory::connect(&cfg.dynamodb).await);
        h.ping().await.with_context(|| {
            format!(
                "DynamoDB table `{}` (run `iotpipe history init`)",
                cfg.dynamodb.table
            )
        })?;
        let ok = Arc::new(AtomicBool::new(true));
        ready.add("dynamodb", ok.clone());
        let h2 = h.clone();
        watch("dynamodb", ok, checks_stop.clone(), move || {
            let h = h2.clone();
            async move { h.ping().await.map_err(|e| e.to_string()) }
        });
        Some(h)
    } else {
        None
    };

    let fatal = CancellationToken::new();
    let ops_stop = CancellationToken::new();
    let mut ops = Spawner {
        metrics: metrics.clone(),
        ready: ready.clone(),
        stop: ops_stop.clone(),
        fatal: fatal.clone(),
        tasks: Vec::new(),
    };

    if let (true, Some(latest)) = (role.runs(Role::Materialize, &cfg), &latest) {
        let c = log
            .subscribe(&topics.telemetry, &kafka.group("materialize"))
            .await?;
        ops.spawn(
            "materialize",
            c,
            Materialize::new(latest.clone(), log.clone(), topics.clone(), metrics.clone()),
            cfg.materialize.max_batch,
        );
    }
    if let (true, Some(history)) = (role.runs(Role::History, &cfg), &history) {
        let c = log
            .subscribe(&topics.telemetry, &kafka.group("history"))
            .await?;
        ops.spawn(
            "history",
            c,
            History::new(
                history.clone(),
                log.clone(),
                topics.clone(),
                metrics.clone(),
            ),
            cfg.history.max_batch,
        );
    }
    let instance = instance_id(&cfg);
    // The control plane (registry, rule definitions, rule state, alarms) where rules or the API run.
    let control = if runs_rules || runs_fanout {
        let kv: Arc<dyn KeyValue> = Arc::new(RedisKv::connect(&cfg.redis).await?);
        let registry_store = DynamoRegistry::connect(&cfg.dynamodb).await;
        registry_store.ping().await.with_context(|| {
            format!(
                "DynamoDB table `{}` (run `iotpipe history init`)",
                cfg.dynamodb.devices_table
            )
        })?;
        let registry = Arc::new(CachedRegistry::new(
            Arc::new(registry_store),
            CacheConfig {
                ttl: cfg.rules.registry_cache_ttl,
                ..CacheConfig::default()
            },
        ));
        let c = log
            .subscribe_at(
                &topics.registry,
                &kafka.group(&format!("registry-{}-{instance}", role.name())),
                StartAt::Latest,
            )
            .await?;
        ops.spawn("registry_feed", c, RegistryFeed(registry.clone()), 1000);
        Some(Arc::new(Control::new(
            registry,
            kv,
            log.clone(),
            topics.clone(),
            cfg.rules.limits.clone(),
        )))
    } else {
        None
    };
    if let (true, Some(control)) = (runs_rules, &control) {
        let engine = crate::rules::new_engine(
            &cfg.rules,
            control.registry.clone(),
            control.kv.clone(),
            metrics.clone(),
            &instance,
        );
        // Join the rules topic first, then load what is stored: no change falls in between.
        let c = log
            .subscribe_at(
                &topics.rules,
                &kafka.group(&format!("rules-feed-{instance}")),
                StartAt::Latest,
            )
            .await?;
        ops.spawn("rules_feed", c, RulesFeed(engine.clone()), 100);
        let n = crate::rules::load_engine(&engine).await?;
        info!(rules = n, "Rules loaded.");
        if cfg.rules.webhooks.enabled {
            let c = log
                .subscribe(&topics.alerts, &kafka.group("webhooks"))
                .await?;
            let hooks = Webhooks::new(
                engine.clone(),
                cfg.rules.webhooks.clone(),
                log.clone(),
                topics.clone(),
                metrics.clone(),
            )
            .map_err(|e| anyhow!(e))?;
            ops.spawn("webhooks", c, hooks, 100);
        }
        let c = log
            .subscribe(&topics.telemetry, &kafka.group("rules"))
            .await?;
        ops.spawn_with(
            "rules",
            c,
            Rules::new(engine, log.clone(), topics.clone(), metrics.clone()),
            RunConfig {
                max_batch: cfg.rules.max_batch,
                drain: Drain::Immediate,
                // Timer rules ("no data for 10 minutes") run every second.
                tick: Some(Duration::from_secs(1)),
                ..RunConfig::default()
            },
        );
    }

    let http_stop = CancellationToken::new();
    let listen = http_listen.unwrap_or(cfg.server.http_listen);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow!("--http-listen {listen}: {e}"))?;
    let http_addr = listener.local_addr()?;
    if runs_fanout {
        crate::fanout::check_exposure(&cfg.fanout, http_addr)?;
    }
    let mut hub_for_close = None;
    let app = if let (true, Some(latest), Some(history)) = (runs_fanout, &latest, &history) {
        let hub = Arc::new(Hub::new(
            cfg.fanout.queue_capacity,
            cfg.fanout.resume_buffer,
            metrics.clone(),
        ));
        let registry = control.as_ref().map(|c| c.registry.clone());
        let c = log
            .subscribe_at(
                &topics.changes,
                &kafka.group(&format!("fanout-{instance}")),
                StartAt::Latest,
            )
            .await?;
        ops.spawn(
            "fanout",
            c,
            FanoutChanges::new(hub.clone(), registry.clone()),
            1000,
        );
        let c = log
            .subscribe_at(
                &topics.alerts,
                &kafka.group(&format!("fanout-alerts-{instance}")),
                StartAt::Latest,
            )
            .await?;
        ops.spawn(
            "fanout_alerts",
            c,
            FanoutAlerts::new(hub.clone(), registry.clone()),
            1000,
        );
        // One shared group: each dead letter is kept once, whichever instance reads it.
        let dead = Arc::new(RedisDeadLetters::connect(&cfg.redis).await?);
        let c = log
            .subscribe(&topics.dead_letters, &kafka.group("dead_letters"))
            .await?;
        ops.spawn("dead_letters", c, DeadLetters::new(dead.clone()), 1000);
        let cache = Arc::new(RedisPageCache::connect(&cfg.redis).await?);
        info!(instance = %instance, "Fanout instance.");
        hub_for_close = Some(hub.clone());
        let info = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "mode": role.name(),
            "instance": instance,
            "http": http_addr.to_string(),
            "topic_template": cfg.ingest.topic_template,
        });
        api::router(AppState {
            latest: latest.clone(),
            history: history.clone(),
            dead_letters: dead,
            hub,
            metrics: metrics.clone(),
            config: Arc::new(cfg.fanout.clone()),
            info: Arc::new(info),
            ready: ready.clone(),
            history_cache: Some((cache, cfg.server.history_cache_ttl)),
            control: control.clone(),
            shutdown: http_stop.clone(),
            auth: crate::fanout::auth_parts(&cfg.fanout, "admin")?,
            limiter: Arc::new(RedisLimiter::connect(&cfg.redis).await?),
            registry,
        })
    } else {
        let (r, m, s) = (ready.clone(), metrics.clone(), http_stop.clone());
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || async move { api::readiness_response(&r, s.is_cancelled()) }),
            )
            .route(
                "/metrics",
                get(move || async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        m.render(),
                    )
                }),
            )
    };
    let http_token = http_stop.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(listener.tap_io(no_delay), app)
            .with_graceful_shutdown(http_token.cancelled_owned())
            .await
    });

    let ingest_stop = CancellationToken::new();
    let ingest_task: Option<OpTask> = if role.runs(Role::Ingest, &cfg) {
        let (host, port) = cfg
            .ingest
            .broker
            .rsplit_once(':')
            .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_owned(), p)))
            .ok_or_else(|| {
                anyhow!(
                    "ingest.broker must be host:port, got `{}`",
                    cfg.ingest.broker
                )
            })?;
        let max_packet = (cfg.limits.max_payload_bytes * 4).max(1 << 20);
        let source = MqttSource::connect(&host, port, &cfg.ingest, max_packet)?;
        // Ready only while the subscription stands (the broker would ack what nobody reads).
        let sub_ok = Arc::new(AtomicBool::new(false));
        ready.add("mqtt subscription", sub_ok.clone());
        let mut sub = source.subscribed();
        tokio::spawn(async move {
            loop {
                sub_ok.store(*sub.borrow_and_update(), Ordering::Release);
                if sub.changed().await.is_err() {
                    return;
                }
            }
        });
        let run_cfg = IngestRunConfig {
            max_batch: cfg.ingest.max_batch,
            drain_source: false,
            ..IngestRunConfig::default()
        };
        Some(spawn_ingest(
            source,
            log.clone(),
            topics.clone(),
            cfg.limits.clone(),
            run_cfg,
            ingest_stop.clone(),
            metrics.clone(),
            fatal.clone(),
        ))
    } else {
        None
    };

    ready.set_started(true);
    println!(
        "iotpipe {} is running; HTTP on http://{http_addr}/ (healthz, readyz, metrics).",
        role.name()
    );
    info!(role = role.name(), http = %http_addr, "Started.");

    tokio::select! {
        () = shutdown.cancelled() => info!("Shutting down."),
        () = fatal.cancelled() => warn!("An operator failed; shutting down."),
    }
    ready.set_started(false);
    let started = Instant::now();
    let drained = tokio::time::timeout(cfg.server.shutdown_timeout, async {
        ingest_stop.cancel();
        let mut ok = join_all(ingest_task).await;
        ops_stop.cancel();
        ok &= join_all(ops.tasks).await;
        let k = kafka.clone();
        let _ = tokio::task::spawn_blocking(move || k.flush(Duration::from_secs(10))).await;
        http_stop.cancel();
        if let Some(hub) = hub_for_close {
            hub.wait_closed(Duration::from_secs(2)).await;
        }
        let _ = http_task.await;
        ok
    })
    .await;
    checks_stop.cancel();
    outcome(drained, &fatal, started, cfg.server.shutdown_timeout)
}
