//! iotpipe's DynamoDB [`HistoryStore`]: time-bucketed, optionally write-sharded keys so that no
//! partition runs hot, idempotent batch writes, and range queries that fan in over buckets and
//! shards. The capacity math behind the key design is in `docs/DYNAMODB.md`.
//!
//! # Layout
//! - [`DynamoConfig`]: table, endpoint, bucket size, hot-device shards, retention, retry caps.
//! - [`DynamoHistory`]: the store; [`DynamoHistory::init_table`] creates table, TTL and index.
//! - [`keys`]: the key scheme, pure functions.
//! - [`registry`]: the device registry table ([`DynamoRegistry`]).
//!
//! Items: `pk = {device}#{bucket}[#{shard}]`, `sk = {ts:013}#{record id}`, plus `device`, `ts`,
//! `id`, `m` (the metrics as JSON text, exact), `expires_at` (TTL, when retention is set) and, when
//! the device has an owner, `gsi1pk = {owner}#{day}` for the by-owner index (sparse).
//!
//! Writes: BatchWriteItem in chunks of 25 with no duplicate key inside a request (a replayed record
//! has the same key, so it is deduplicated first and overwritten, never duplicated), up to
//! `write_parallelism` requests in flight, `UnprocessedItems` retried with exponential backoff and
//! full jitter until `max_retry_time`, then an `Unavailable` error: the runtime then retries the
//! batch and commits nothing — back-pressure, consumer lag grows, nothing is dropped.

pub mod keys;
pub mod registry;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, PutRequest, ScalarAttributeType, TimeToLiveSpecification,
    WriteRequest,
};
use aws_sdk_dynamodb::Client;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use iotpipe_pipeline::record::{Record, RecordId};
use iotpipe_pipeline::runtime::Backoff;
use iotpipe_pipeline::store::{
    parse_cursor, HistoryItem, HistoryPage, HistoryQuery, HistoryStore, Order, StoreError,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use keys::Bucket;
pub use registry::DynamoRegistry;

/// DynamoDB settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamoConfig {
    /// Table name.
    pub table: String,
    /// Table of the device registry (device -> owner, groups).
    pub devices_table: String,
    /// Endpoint override (DynamoDB Local: `http://127.0.0.1:8000`); unset: AWS.
    pub endpoint: Option<String>,
    /// Region; unset: from the environment / profile.
    pub region: Option<String>,
    /// Time bucket of the partition key: `hour` or `day`.
    pub bucket: Bucket,
    /// Write shards per hot device (`{ "dev-17" = 4 }`): spreads one device over several
    /// partitions when it writes more than one partition takes (1,000 writes/s).
    pub hot_devices: BTreeMap<String, u32>,
    /// Keep rows this long (sets `expires_at` for DynamoDB TTL); unset: forever.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Longest time one batch keeps retrying unprocessed items before reporting back-pressure.
    #[serde(with = "humantime_serde")]
    pub max_retry_time: Duration,
    /// BatchWriteItem requests in flight at once.
    pub write_parallelism: usize,
    /// Bucket queries in flight at once during a range query.
    pub query_parallelism: usize,
    /// How far back an open-ended (`from` unset) query looks.
    #[serde(with = "humantime_serde")]
    pub max_lookback: Duration,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        Self {
            table: "iotpipe_history".into(),
            devices_table: "iotpipe_devices".into(),
            endpoint: None,
            region: None,
            bucket: Bucket::Hour,
            hot_devices: BTreeMap::new(),
            retention: None,
            max_retry_time: Duration::from_secs(30),
            write_parallelism: 4,
            query_parallelism: 8,
            max_lookback: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Name of the by-owner index created by [`DynamoHistory::init_table`].
pub const OWNER_INDEX: &str = "by_owner_day";

pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A client from the environment (credentials chain, region) and the config overrides.
async fn client(cfg: &DynamoConfig) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &cfg.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &cfg.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    Client::new(&loader.load().await)
}

fn attr(name: &str, t: ScalarAttributeType) -> Result<AttributeDefinition, StoreError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(t)
        .build()
        .map_err(unavailable)
}

fn key(name: &str, t: KeyType) -> Result<KeySchemaElement, StoreError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(t)
        .build()
        .map_err(unavailable)
}

/// An index on `hash` and `range` projecting every attribute.
fn index(name: &str, hash: &str, range: &str) -> Result<GlobalSecondaryIndex, StoreError> {
    GlobalSecondaryIndex::builder()
        .index_name(name)
        .key_schema(key(hash, KeyType::Hash)?)
        .key_schema(key(range, KeyType::Range)?)
        .projection(
            Projection::builder()
                .projection_type(ProjectionType::All)
                .build(),
        )
        .build()
        .map_err(unavailable)
}

/// Waits up to 60 s for `table` to become active.
async fn wait_active(client: &Client, table: &str) -> Result<(), StoreError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| unavailable(DisplayErrorContext(&e)))?;
        if d.table()
            .and_then(|t| t.table_status())
            .is_some_and(|s| s.as_str() == "ACTIVE")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(StoreError::Unavailable(format!(
                "table {table} did not become active in 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The DynamoDB history store.
#[derive(Clone)]
pub struct DynamoHistory {
    client: Client,
    cfg: DynamoConfig,
}

impl DynamoHistory {
    /// Builds a client from the environment (credentials chain, region) and the config overrides.
    pub async fn connect(cfg: &DynamoConfig) -> Self {
        Self {
            client: client(cfg).await,
            cfg: cfg.clone(),
        }
    }

    /// Creates the table (on-demand capacity), its TTL and the by-owner index; an existing table
    /// is left as it is.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when DynamoDB refuses.
    pub async fn init_table(&self) -> Result<(), StoreError> {
        let gsi = index(OWNER_INDEX, "gsi1pk", "ts")?;
        let created = self
            .client
            .create_table()
            .table_name(&self.cfg.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr("pk", ScalarAttributeType::S)?)
            .attribute_definitions(attr("sk", ScalarAttributeType::S)?)
            .attribute_definitions(attr("gsi1pk", ScalarAttributeType::S)?)
            .attribute_definitions(attr("ts", ScalarAttributeType::N)?)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .global_secondary_indexes(gsi)
            .send()
            .await;
        match created {
            Ok(_) => info!(table = %self.cfg.table, "Created history table."),
            Err(e) if e.code() == Some("ResourceInUseException") => {
                info!(table = %self.cfg.table, "History table exists.")
            }
            Err(e) => {
                return Err(unavailable(format!(
                    "create table {}: {}",
                    self.cfg.table,
                    DisplayErrorContext(&e)
                )))
            }
        }
        // Wait until it is active, then make sure TTL is on.
        wait_active(&self.client, &self.cfg.table).await?;
        let ttl = self
            .client
            .update_time_to_live()
            .table_name(&self.cfg.table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name("expires_at")
                    .build()
                    .map_err(unavailable)?,
            )
            .send()
            .await;
        if let Err(e) = ttl {
            // Enabling TTL twice is refused with a validation error; anything else is real.
            if e.code() != Some("ValidationException") {
                return Err(unavailable(format!(
                    "enable TTL: {}",
                    DisplayErrorContext(&e)
                )));
            }
        }
        Ok(())
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.cfg.table
    }

    /// Checks that the table answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .describe_table()
            .table_name(&self.cfg.table)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| unavailable(DisplayErrorContext(&e)))
    }

    fn item(
        &self,
        r: &Record,
    ) -> Result<(String, String, HashMap<String, AttributeValue>), StoreError> {
        let shards = self.cfg.hot_devices.get(&r.device).copied().unwrap_or(1);
        let pk = keys::partition_key(&r.device, r.ts, self.cfg.bucket, &r.id, shards);
        let sk = keys::sort_key(r.ts, &r.id.0);
        let mut item = HashMap::new();
        item.insert("pk".to_owned(), AttributeValue::S(pk.clone()));
        item.insert("sk".to_owned(), AttributeValue::S(sk.clone()));
        item.insert("device".to_owned(), AttributeValue::S(r.device.clone()));
        item.insert("ts".to_owned(), AttributeValue::N(r.ts.to_string()));
        item.insert("id".to_owned(), AttributeValue::S(r.id.0.clone()));
        item.insert(
            "m".to_owned(),
            AttributeValue::S(
                serde_json::to_string(&r.metrics)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            ),
        );
        if let Some(ret) = self.cfg.retention {
            let expires = r.ts / 1000 + i64::try_from(ret.as_secs()).unwrap_or(i64::MAX / 2);
            item.insert(
                "expires_at".to_owned(),
                AttributeValue::N(expires.to_string()),
            );
        }
        Ok((pk, sk, item))
    }

    /// Writes one request of at most 25 items (see [`write_chunk`]).
    async fn write_chunk(&self, requests: Vec<WriteRequest>) -> Result<(), StoreError> {
        write_chunk(
            &self.client,
            &self.cfg.table,
            requests,
            self.cfg.max_retry_time,
        )
        .await
    }

    /// Queries one partition key for `sk` in `[lo, hi]` (bounds as sort keys), in `order`,
    /// returning at most `limit` items.
    async fn query_pk(
        &self,
        pk: String,
        lo: String,
        hi: String,
        order: Order,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let resp = self
                .client
                .query()
                .table_name(&self.cfg.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
                .expression_attribute_values(":pk", AttributeValue::S(pk.clone()))
                .expression_attribute_values(":lo", AttributeValue::S(lo.clone()))
                .expression_attribute_values(":hi", AttributeValue::S(hi.clone()))
                .scan_index_forward(order == Order::Asc)
                .limit(i32::try_from(limit - out.len()).unwrap_or(i32::MAX).max(1))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| unavailable(format!("Query: {}", DisplayErrorContext(&e))))?;
            for item in resp.items() {
                out.push(parse_item(item)?);
            }
            match resp.last_evaluated_key() {
                Some(k) if out.len() < limit => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }
}

fn parse_item(item: &HashMap<String, AttributeValue>) -> Result<HistoryItem, StoreError> {
    let s = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_s().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("history item without {k}")))
    };
    let ts = item
        .get("ts")
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| StoreError::Corrupt("history item without ts".into()))?;
    Ok(HistoryItem {
        ts,
        id: RecordId(s("id")?.clone()),
        metrics: serde_json::from_str(s("m")?).map_err(|e| StoreError::Corrupt(e.to_string()))?,
    })
}

#[async_trait]
impl HistoryStore for DynamoHistory {
    async fn write(&self, records: &[Record]) -> Result<(), StoreError> {
        // One item per key: a record replayed inside the batch would otherwise make DynamoDB
        // refuse the whole request ("duplicate keys").
        let mut by_key: BTreeMap<(String, String), HashMap<String, AttributeValue>> =
            BTreeMap::new();
        for r in records {
            let (pk, sk, item) = self.item(r)?;
            by_key.insert((pk, sk), item);
        }
        let requests: Vec<WriteRequest> = by_key
            .into_values()
            .map(|item| {
                PutRequest::builder()
                    .set_item(Some(item))
                    .build()
                    .map(|p| WriteRequest::builder().put_request(p).build())
            })
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let chunks: Vec<Vec<WriteRequest>> =
            requests.chunks(25).map(<[WriteRequest]>::to_vec).collect();
        stream::iter(chunks.into_iter().map(|c| self.write_chunk(c)))
            .buffer_unordered(self.cfg.write_parallelism.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn query(&self, q: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        let now = iotpipe_pipeline::time::now_ms();
        let lookback = i64::try_from(self.cfg.max_lookback.as_millis()).unwrap_or(i64::MAX);
        let from = if q.from == i64::MIN {
            now.saturating_sub(lookback)
        } else {
            q.from
        }
        .max(0);
        let to = if q.to == i64::MAX {
            now + 3_600_000
        } else {
            q.to
        }
        .min(keys::MAX_TS);
        let cursor = q.cursor.as_deref().map(parse_cursor).transpose()?;
        let limit = q.limit.max(1);
        if from > to {
            return Ok(HistoryPage {
                items: Vec::new(),
                next_cursor: None,
            });
        }
        // Sort-key bounds: the range, narrowed past the cursor (exclusive: the cursor's own row
        // was the last one returned).
        let (mut lo, mut hi) = (keys::sort_key_lower(from), keys::sort_key_upper(to));
        let (mut first_ts, mut last_ts) = (from, to);
        if let Some((ts, id)) = &cursor {
            match q.order {
                Order::Asc => {
                    lo = keys::after(&keys::sort_key(*ts, id));
                    first_ts = (*ts).max(from);
                }
                Order::Desc => {
                    hi = keys::before(&keys::sort_key(*ts, id));
                    last_ts = (*ts).min(to);
                }
            }
        }
        let mut buckets = keys::buckets(first_ts, last_ts, self.cfg.bucket);
        if q.order == Order::Desc {
            buckets.reverse();
        }
        let shards = self.cfg.hot_devices.get(&q.device).copied().unwrap_or(1);
        let mut items: Vec<HistoryItem> = Vec::new();
        // Walk the buckets in order, `query_parallelism` at a time, until the page is full.
        for window in buckets.chunks(self.cfg.query_parallelism.max(1)) {
            let queries = window.iter().map(|b| {
                let pks = keys::partition_keys_of_bucket(&q.device, b, shards);
                let (lo, hi) = (lo.clone(), hi.clone());
                async move {
                    let mut rows = Vec::new();
                    for pk in pks {
                        rows.extend(
                            self.query_pk(pk, lo.clone(), hi.clone(), q.order, limit + 1)
                                .await?,
                        );
                    }
                    // Shards of one bucket interleave in time: merge them.
                    rows.sort_by(|a, b| (a.ts, &a.id).cmp(&(b.ts, &b.id)));
                    if q.order == Order::Desc {
                        rows.reverse();
                    }
                    Ok::<_, StoreError>(rows)
                }
            });
            for rows in futures_util::future::join_all(queries).await {
                items.extend(rows?);
            }
            if items.len() > limit {
                break;
            }
        }
        Ok(HistoryPage::from_overfetched(items, limit))
    }
}

/// Writes one `BatchWriteItem` request of at most 25 items to `table`, retrying unprocessed items
/// (and throttling or transport errors) with backoff until `max_retry_time`.
pub(crate) async fn write_chunk(
    client: &Client,
    table: &str,
    mut requests: Vec<WriteRequest>,
    max_retry_time: Duration,
) -> Result<(), StoreError> {
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(5),
    };
    let started = Instant::now();
    let mut attempt = 0;
    let mut last_error = String::from("throttled");
    loop {
        let mut batch = HashMap::new();
        batch.insert(table.to_owned(), requests.clone());
        match client
            .batch_write_item()
            .set_request_items(Some(batch))
            .send()
            .await
        {
            Ok(out) => {
                requests = out
                    .unprocessed_items
                    .and_then(|mut m| m.remove(table))
                    .unwrap_or_default();
                if requests.is_empty() {
                    return Ok(());
                }
            }
            Err(e) => {
                // A validation error means a malformed item of ours: retrying cannot help.
                if e.code() == Some("ValidationException") {
                    return Err(StoreError::Corrupt(format!(
                        "BatchWriteItem refused: {}",
                        DisplayErrorContext(&e)
                    )));
                }
                last_error = DisplayErrorContext(&e).to_string();
                warn!(error = %last_error, attempt, "BatchWriteItem failed; retrying.");
            }
        }
        if started.elapsed() >= max_retry_time {
            return Err(StoreError::Unavailable(format!(
                "{} items not written after {max_retry_time:?} ({last_error})",
                requests.len(),
            )));
        }
        tokio::time::sleep(backoff.delay(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}
