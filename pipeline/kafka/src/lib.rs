//! iotpipe's Kafka [`Log`]: rdkafka with its bundled librdkafka (the distribution's librdkafka 2.0
//! cannot talk to current brokers).
//!
//! # Layout
//! - [`KafkaConfig`]: brokers, producer and consumer settings, topic creation.
//! - [`KafkaLog`]: the producer side ([`Log::append`]) and the factory of consumers.
//! - `KafkaConsumer`: one consumer-group member with manual commits.
//!
//! Delivery. `append` sends every record of the batch and returns only when the broker has
//! acknowledged each one (`acks=all`, idempotent producer, delivery reports awaited), which is what
//! lets ingest acknowledge its upstream afterwards. Consumers never auto-commit: the runtime
//! commits a batch's offsets after the operator's side effect is durable.
//!
//! Rebalances. librdkafka runs rebalance callbacks inside `poll`, and the runtime polls only
//! between batches — after the previous batch was processed and committed — so a revoked partition
//! never has work in flight. Records of a partition that was revoked while a batch was being
//! assembled are still processed (idempotently), but their offsets are not committed: the
//! partition's new owner reads them again. Nothing is committed for a record that was not applied.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::FutureExt;
use std::sync::atomic::{AtomicBool, Ordering};

use iotpipe_pipeline::log::{Consumer, Log, LogError, LogRecord, Produce, StartAt};
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Kafka settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Client id prefix (the operator name is appended).
    pub client_id: String,
    /// Prefix of every consumer group name, so several deployments can share a cluster.
    pub group_prefix: String,
    /// How long the producer waits to fill a batch before sending.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Most messages in one produce batch.
    pub batch_messages: u32,
    /// Consumer group session timeout (lower it for brokers that take long to rebalance).
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Longest time between two polls before the consumer is considered dead and its partitions
    /// move. A batch being retried while a store is down counts against it.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// Create missing topics at start-up.
    pub create_topics: bool,
    /// Partitions of topics created at start-up.
    pub partitions: i32,
    /// Replication factor of topics created at start-up.
    pub replication: i32,
    /// Extra librdkafka properties, applied last (e.g. `security.protocol`).
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            client_id: "iotpipe".into(),
            group_prefix: "iotpipe.".into(),
            linger: Duration::from_millis(5),
            batch_messages: 10_000,
            session_timeout: Duration::from_secs(10),
            max_poll_interval: Duration::from_secs(300),
            create_topics: true,
            partitions: 12,
            replication: 1,
            extra: BTreeMap::new(),
        }
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

fn classify(e: &KafkaError) -> LogError {
    match e {
        KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
        ) => LogError::UnknownTopic(e.to_string()),
        _ => LogError::Unavailable(e.to_string()),
    }
}

impl KafkaConfig {
    fn base(&self, role: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("{}-{role}", self.client_id));
        c
    }

    fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }
}

/// The Kafka log.
pub struct KafkaLog {
    cfg: KafkaConfig,
    producer: FutureProducer,
}

impl KafkaLog {
    /// Builds the producer (connections are made lazily by librdkafka).
    ///
    /// # Errors
    /// [`LogError::Unavailable`] for an invalid configuration.
    pub fn new(cfg: &KafkaConfig, role: &str) -> Result<Self, LogError> {
        let mut c = cfg.base(role);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", ms(cfg.linger))
            .set("batch.num.messages", cfg.batch_messages.to_string())
            .set("message.timeout.ms", "30000")
            .set("queue.buffering.max.messages", "1000000");
        let producer = cfg
            .finish(c)
            .create()
            .map_err(|e| LogError::Unavailable(format!("producer: {e}")))?;
        Ok(Self {
            cfg: cfg.clone(),
            producer,
        })
    }

    /// Creates `topics` with the configured partitions and replication; existing ones are left
    /// alone.
    ///
    /// # Errors
    /// [`LogError::Unavailable`] when the broker refuses or cannot be reached.
    pub async fn ensure_topics(&self, topics: &[&str]) -> Result<(), LogError> {
        self.ensure_topics_with(topics, &[]).await
    }

    /// Like [`KafkaLog::ensure_topics`], and also creates `compacted` with
    /// `cleanup.policy=compact` (keyed control data: rules, registry changes), so the latest
    /// record of each key is kept for ever.
    ///
    /// # Errors
    /// [`LogError::Unavailable`] when the broker refuses or cannot be reached.
    pub async fn ensure_topics_with(
        &self,
        topics: &[&str],
        compacted: &[&str],
    ) -> Result<(), LogError> {
        let admin: AdminClient<DefaultClientContext> = self
            .cfg
            .finish(self.cfg.base("admin"))
            .create()
            .map_err(|e| LogError::Unavailable(format!("admin: {e}")))?;
        let mut new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.cfg.partitions,
                    TopicReplication::Fixed(self.cfg.replication),
                )
            })
            .collect();
        new.extend(compacted.iter().map(|t| {
            NewTopic::new(
                t,
                self.cfg.partitions,
                TopicReplication::Fixed(self.cfg.replication),
            )
            .set("cleanup.policy", "compact")
        }));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&new, &opts)
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))?;
        for r in results {
            match r {
                Ok(t) => info!(topic = %t, partitions = self.cfg.partitions, "Created topic."),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(LogError::Unavailable(format!(
                        "cannot create topic {t}: {code}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Checks that the brokers answer a metadata request.
    ///
    /// # Errors
    /// [`LogError::Unavailable`] when they do not within 5 s.
    pub async fn ping(&self) -> Result<(), LogError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(5))
                .map(|_| ())
        })
        .await
        .map_err(|e| LogError::Unavailable(e.to_string()))?
        .map_err(|e| LogError::Unavailable(e.to_string()))
    }

    /// Commits the current end offsets of every partition of `topic` for `group`, before any
    /// member joins it.
    ///
    /// This is how [`StartAt::Latest`] is implemented, instead of `auto.offset.reset=latest`:
    /// librdkafka resolves "latest" lazily, some time after the assignment, so records appended in
    /// between would be skipped without a trace. A fanout instance could then miss a change that a
    /// client, already connected and snapshotted, was waiting for — a silent gap. Fixing the start
    /// offsets before the consumer (and the HTTP server) starts closes that window.
    async fn commit_end_offsets(&self, topic: &str, group: &str) -> Result<(), LogError> {
        let mut c = self.cfg.base(group);
        c.set("group.id", group).set("enable.auto.commit", "false");
        let cfg = self.cfg.finish(c);
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || -> Result<(), LogError> {
            let consumer: rdkafka::consumer::BaseConsumer = cfg
                .create()
                .map_err(|e| LogError::Unavailable(format!("consumer: {e}")))?;
            let timeout = Duration::from_secs(10);
            let md = consumer
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| LogError::Unavailable(e.to_string()))?;
            let partitions: Vec<i32> = md
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                return Err(LogError::UnknownTopic(topic));
            }
            let mut tpl = TopicPartitionList::new();
            for p in partitions {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, timeout)
                    .map_err(|e| LogError::Unavailable(e.to_string()))?;
                tpl.add_partition_offset(&topic, p, Offset::Offset(high))
                    .map_err(|e| LogError::Unavailable(e.to_string()))?;
            }
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| LogError::Unavailable(format!("commit start offsets: {e}")))
        })
        .await
        .map_err(|e| LogError::Unavailable(e.to_string()))?
    }

    /// The full name of consumer group `name` (with the configured prefix).
    pub fn group(&self, name: &str) -> String {
        format!("{}{name}", self.cfg.group_prefix)
    }

    /// Waits until every message handed to the producer was delivered or failed.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            warn!(error = %e, "Producer flush incomplete.");
        }
    }
}

#[async_trait]
impl Log for KafkaLog {
    async fn append(&self, topic: &str, batch: Vec<Produce>) -> Result<(), LogError> {
        let mut pending = Vec::with_capacity(batch.len());
        for rec in &batch {
            loop {
                match self.producer.send_result(
                    FutureRecord::to(topic)
                        .key(rec.key.as_ref())
                        .payload(rec.value.as_ref()),
                ) {
                    Ok(fut) => {
                        pending.push(fut);
                        break;
                    }
                    // The local queue is full: let librdkafka deliver some, then try again.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(classify(&e)),
                }
            }
        }
        for result in join_all(pending).await {
            match result {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(classify(&e)),
                Err(_canceled) => {
                    return Err(LogError::Unavailable(
                        "producer dropped the delivery report".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    async fn subscribe_at(
        &self,
        topic: &str,
        group: &str,
        start: StartAt,
    ) -> Result<Box<dyn Consumer>, LogError> {
        if start == StartAt::Latest {
            self.commit_end_offsets(topic, group).await?;
        }
        let ctx = RebalanceContext {
            assigned: Arc::new(Mutex::new(HashSet::new())),
            joined: Arc::new(AtomicBool::new(false)),
        };
        let assigned = Arc::clone(&ctx.assigned);
        let joined = Arc::clone(&ctx.joined);
        let mut c = self.cfg.base(group);
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                // With StartAt::Latest the start offsets were committed above; "earliest" is then
                // only the fallback for partitions created later.
                "auto.offset.reset",
                "earliest",
            )
            .set("session.timeout.ms", ms(self.cfg.session_timeout))
            .set("max.poll.interval.ms", ms(self.cfg.max_poll_interval))
            .set("partition.assignment.strategy", "range,roundrobin");
        let consumer: StreamConsumer<RebalanceContext> = self
            .cfg
            .finish(c)
            .create_with_context(ctx)
            .map_err(|e| LogError::Unavailable(format!("consumer: {e}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| LogError::Unavailable(e.to_string()))?;
        Ok(Box::new(KafkaConsumer {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            assigned,
            joined,
        }))
    }
}

/// Tracks the partitions this member holds, so offsets of revoked partitions are not committed.
struct RebalanceContext {
    assigned: Arc<Mutex<HashSet<i32>>>,
    /// Set after the first assignment (possibly empty): the member has joined its group.
    joined: Arc<AtomicBool>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(
        &self,
        _base: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut a = self.assigned.lock();
            for e in tpl.elements() {
                a.remove(&e.partition());
            }
            info!(partitions = tpl.count(), "Partitions revoked.");
        }
    }

    fn post_rebalance(
        &self,
        _base: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut a = self.assigned.lock();
            for e in tpl.elements() {
                a.insert(e.partition());
            }
            self.joined.store(true, Ordering::Release);
            info!(partitions = tpl.count(), "Partitions assigned.");
        }
    }
}

struct KafkaConsumer {
    consumer: Arc<StreamConsumer<RebalanceContext>>,
    topic: String,
    assigned: Arc<Mutex<HashSet<i32>>>,
    joined: Arc<AtomicBool>,
}

fn to_record(m: &rdkafka::message::BorrowedMessage<'_>) -> LogRecord {
    LogRecord {
        partition: u32::try_from(m.partition()).unwrap_or(0),
        offset: u64::try_from(m.offset()).unwrap_or(0),
        key: m.key().map(Bytes::copy_from_slice).unwrap_or_default(),
        value: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<LogRecord>, LogError> {
        let mut out = Vec::new();
        // `recv` is cancel-safe: a message is taken from librdkafka's queue only when returned.
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => return Ok(out),
            Ok(Err(e)) => return Err(LogError::Unavailable(e.to_string())),
            Ok(Ok(m)) => out.push(to_record(&m)),
        }
        while out.len() < max {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => out.push(to_record(&m)),
                Some(Err(e)) => {
                    warn!(error = %e, "Consumer error while batching.");
                    break;
                }
                None => break,
            }
        }
        Ok(out)
    }

    fn joined(&self) -> Option<Arc<AtomicBool>> {
        Some(Arc::clone(&self.joined))
    }

    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        let assigned = self.assigned.lock().clone();
        let mut tpl = TopicPartitionList::new();
        for &(p, next) in offsets {
            let p = i32::try_from(p).unwrap_or(i32::MAX);
            if !assigned.contains(&p) {
                continue;
            }
            tpl.add_partition_offset(
                &self.topic,
                p,
                Offset::Offset(i64::try_from(next).unwrap_or(i64::MAX)),
            )
            .map_err(|e| LogError::Unavailable(e.to_string()))?;
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        let consumer = Arc::clone(&self.consumer);
        // A synchronous commit blocks its thread until the broker answers.
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))?
            .map_err(|e| LogError::Unavailable(e.to_string()))
    }
}
