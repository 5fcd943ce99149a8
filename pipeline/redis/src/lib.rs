//! iotpipe's Redis backends: [`RedisLatest`] (a [`LatestStore`] whose merge runs server-side in a
//! Lua script) and [`RedisDeadLetters`] (a capped list).
//!
//! # Layout
//! - `merge.lua`: the latest-state merge, the same rules as `iotpipe_pipeline::change::merge`.
//! - [`RedisConfig`]: connection URL and key prefix.
//! - [`RedisLatest`], [`RedisDeadLetters`]: the stores.
//!
//! Keys: `{prefix}latest:{<device>}` holds one device's state (the braces are a Redis Cluster hash
//! tag: each device's key lives on one slot and the script touches only that key, passed in KEYS);
//! `{prefix}devices` is a sorted set of device ids scored by last-seen time (for `/v1/devices`),
//! updated with `ZADD GT` beside the script call; `{prefix}dead_letters` is a capped list.
//!
//! Writes of a batch are pipelined: one round trip per batch, not per record. The connection is a
//! `ConnectionManager`, which reconnects by itself; while Redis is down every call fails with
//! [`StoreError::Unavailable`], the runtime retries with backoff and commits nothing, so nothing is
//! lost and the backlog waits in the log.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use async_trait::async_trait;
use iotpipe_pipeline::change::{Change, FieldState, LatestState, MergeOutcome};
use iotpipe_pipeline::dead_letter::DeadLetter;
use iotpipe_pipeline::kv::{KeyValue, KvWrite};
use iotpipe_pipeline::ratelimit::{Decision, Quota, RateLimiter};
use iotpipe_pipeline::record::{Record, RecordId};
use iotpipe_pipeline::store::{DeadLetterStore, DeviceSummary, LatestStore, PageCache, StoreError};
use redis::aio::ConnectionManager;
use redis::{RedisError, Script, Value};
use serde::{Deserialize, Serialize};
use serde_json::Map;

/// Connection settings.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379` or `rediss://user:password@host:6380/0`.
    pub url: String,
    /// Prefix of every key, so several deployments (or test runs) can share one Redis.
    pub key_prefix: String,
    /// How many dead letters the list keeps.
    pub dead_letters_keep: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "iotpipe:".into(),
            dead_letters_keep: 10_000,
        }
    }
}

impl fmt::Debug for RedisConfig {
    // The URL may carry a password: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match self.url.split_once('@') {
            Some((scheme_user, host)) => format!(
                "{}:***@{host}",
                scheme_user.split(':').take(2).collect::<Vec<_>>().join(":")
            ),
            None => self.url.clone(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &url)
            .field("key_prefix", &self.key_prefix)
            .field("dead_letters_keep", &self.dead_letters_keep)
            .finish()
    }
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Connects with a reconnecting connection manager.
///
/// # Errors
/// [`StoreError::Unavailable`] when the URL is invalid or Redis cannot be reached at start.
pub async fn connect(cfg: &RedisConfig) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(cfg.url.as_str())
        .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {e}")))?;
    // Without timeouts a request to a Redis that went away can wait forever (redis-rs sets none
    // by default), which would stall the operator instead of letting the runtime back off and
    // retry; bounded reconnect attempts keep each failure short.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(std::time::Duration::from_secs(2))
        .set_response_timeout(std::time::Duration::from_secs(5))
        .set_number_of_retries(2)
        .set_max_delay(1000);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(unavailable)
}

/// Latest state in Redis.
#[derive(Clone)]
pub struct RedisLatest {
    conn: ConnectionManager,
    script: Script,
    prefix: String,
}

impl RedisLatest {
    /// Connects and loads the merge script.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, StoreError> {
        let mut conn = connect(cfg).await?;
        let script = Script::new(include_str!("merge.lua"));
        script
            .prepare_invoke()
            .load_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(Self {
            conn,
            script,
            prefix: cfg.key_prefix.clone(),
        })
    }

    /// Checks that Redis answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    fn device_key(&self, device: &str) -> String {
        format!("{}latest:{{{device}}}", self.prefix)
    }

    fn index_key(&self) -> String {
        format!("{}devices", self.prefix)
    }

    async fn run_batch(&self, records: &[Record]) -> Result<Vec<Value>, RedisError> {
        let mut pipe = redis::pipe();
        for r in records {
            let mut inv = self.script.key(self.device_key(&r.device));
            inv.arg(&r.id.0)
                .arg(r.ts)
                .arg(format!("{:020}", r.arrival))
                .arg(r.received_at);
            for (k, v) in &r.metrics {
                inv.arg(k).arg(v.to_string());
            }
            pipe.invoke_script(&inv);
            pipe.cmd("ZADD")
                .arg(self.index_key())
                .arg("GT")
                .arg(r.received_at)
                .arg(&r.device)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await
    }
}

fn parse_outcome(record: &Record, v: &Value) -> Result<MergeOutcome, StoreError> {
    let bad = || StoreError::Corrupt(format!("unexpected merge reply {v:?}"));
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let text = |x: &Value| -> Option<String> {
        match x {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let kind = items.first().and_then(text).ok_or_else(bad)?;
    let seq = match items.get(1) {
        Some(Value::Int(n)) => u64::try_from(*n).map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    let mut changes = Map::new();
    for pair in items[2..].chunks(2) {
        let (Some(name), Some(json)) = (pair.first().and_then(text), pair.get(1).and_then(text))
        else {
            return Err(bad());
        };
        let value = serde_json::from_str(&json)
            .map_err(|e| StoreError::Corrupt(format!("field {name}: {e}")))?;
        changes.insert(name, value);
    }
    let change = || Change {
        device: record.device.clone(),
        ts: record.ts,
        seq,
        record_id: record.id.clone(),
        received_at: record.received_at,
        changes: changes.clone(),
    };
    match kind.as_str() {
        "c" => Ok(MergeOutcome::Changed(change())),
        "r" => Ok(MergeOutcome::Replayed(change())),
        "u" => Ok(MergeOutcome::Unchanged),
        _ => Err(bad()),
    }
}

fn parse_state(
    device: &str,
    map: BTreeMap<String, String>,
) -> Result<Option<LatestState>, StoreError> {
    if map.is_empty() {
        return Ok(None);
    }
    let corrupt = |what: &str| StoreError::Corrupt(format!("latest state of {device}: bad {what}"));
    let num = |k: &str, default: i64| -> Result<i64, StoreError> {
        map.get(k)
            .map_or(Ok(default), |v| v.parse().map_err(|_| corrupt(k)))
    };
    let mut state = LatestState::new(device);
    state.seq = u64::try_from(num("seq", 0)?).map_err(|_| corrupt("seq"))?;
    state.ts = num("ts", i64::MIN)?;
    state.last_seen = num("last_seen", i64::MIN)?;
    if let Some(recent) = map.get("recent") {
        state.recent = recent
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|e| {
                let mut parts = e.split(':');
                let (Some(rid), Some(arrival), Some(seq)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(corrupt("recent"));
                };
                Ok((
                    RecordId(rid.to_owned()),
                    arrival.parse().map_err(|_| corrupt("recent"))?,
                    seq.parse().map_err(|_| corrupt("recent"))?,
                ))
            })
            .collect::<Result<VecDeque<_>, StoreError>>()?;
    }
    for (k, v) in &map {
        let Some(name) = k.strip_prefix("m:") else {
            continue;
        };
        let mut parts = v.splitn(5, '|');
        let (Some(ts), Some(arrival), Some(rid), Some(seq), Some(json)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(corrupt(k));
        };
        state.fields.insert(
            name.to_owned(),
            FieldState {
                v: serde_json::from_str(json).map_err(|_| corrupt(k))?,
                ts: ts.parse().map_err(|_| corrupt(k))?,
                arrival: arrival.parse().map_err(|_| corrupt(k))?,
                rid: RecordId(rid.to_owned()),
                seq: seq.parse().map_err(|_| corrupt(k))?,
            },
        );
    }
    Ok(Some(state))
}

#[async_trait]
impl LatestStore for RedisLatest {
    async fn merge(&self, records: &[Record]) -> Result<Vec<MergeOutcome>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let replies = match self.run_batch(records).await {
            // Redis restarted or flushed its script cache: load the script again, retry once.
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                let mut conn = self.conn.clone();
                self.script
                    .prepare_invoke()
                    .load_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                self.run_batch(records).await.map_err(unavailable)?
            }
            other => other.map_err(unavailable)?,
        };
        if replies.len() != records.len() {
            return Err(StoreError::Corrupt(format!(
                "{} replies for {} records",
                replies.len(),
                records.len()
            )));
        }
        records
            .iter()
            .zip(&replies)
            .map(|(r, v)| parse_outcome(r, v))
            .collect()
    }

    async fn get(&self, device: &str) -> Result<Option<LatestState>, StoreError> {
        let mut conn = self.conn.clone();
        let map: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(self.device_key(device))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        parse_state(device, map)
    }

    async fn devices(&self, limit: usize) -> Result<Vec<DeviceSummary>, StoreError> {
        let mut conn = self.conn.clone();
        let stop = isize::try_from(limit)
            .unwrap_or(isize::MAX)
            .saturating_sub(1);
        let ids: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
            .arg(self.index_key())
            .arg(0)
            .arg(stop)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (id, _) in &ids {
            pipe.cmd("HMGET")
                .arg(self.device_key(id))
                .arg("ts")
                .arg("seq");
        }
        let rows: Vec<(Option<i64>, Option<u64>)> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        #[allow(clippy::cast_possible_truncation)]
        Ok(ids
            .into_iter()
            .zip(rows)
            .map(|((device, last_seen), (ts, seq))| DeviceSummary {
                device,
                last_seen: last_seen as i64,
                ts: ts.unwrap_or(i64::MIN),
                seq: seq.unwrap_or(0),
            })
            .collect())
    }
}

/// Recent dead letters in a capped Redis list.
#[derive(Clone)]
pub struct RedisDeadLetters {
    conn: ConnectionManager,
    key: String,
    keep: usize,
}

impl RedisDeadLetters {
    /// Connects.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, StoreError> {
        Ok(Self {
            conn: connect(cfg).await?,
            key: format!("{}dead_letters", cfg.key_prefix),
            keep: cfg.dead_letters_keep.max(1),
        })
    }
}

#[async_trait]
impl DeadLetterStore for RedisDeadLetters {
    async fn push(&self, letters: &[DeadLetter]) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for dl in letters {
            pipe.cmd("LPUSH")
                .arg(&self.key)
                .arg(serde_json::to_string(dl).map_err(|e| StoreError::Corrupt(e.to_string()))?)
                .ignore();
        }
        pipe.cmd("LTRIM")
            .arg(&self.key)
            .arg(0)
            .arg(self.keep - 1)
            .ignore();
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn recent(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut conn = self.conn.clone();
        let stop = isize::try_from(limit)
            .unwrap_or(isize::MAX)
            .saturating_sub(1);
        let rows: Vec<String> = redis::cmd("LRANGE")
            .arg(&self.key)
            .arg(0)
            .arg(stop)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|r| serde_json::from_str(r).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }
}

/// A [`PageCache`] in Redis (`SET key value PX ttl`), shared by every fanout instance.
#[derive(Clone)]
pub struct RedisPageCache {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisPageCache {
    /// Connects.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, StoreError> {
        Ok(Self {
            conn: connect(cfg).await?,
            prefix: format!("{}cache:", cfg.key_prefix),
        })
    }
}

#[async_trait]
impl PageCache for RedisPageCache {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(format!("{}{key}", self.prefix))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn put(
        &self,
        key: &str,
        value: &str,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        redis::cmd("SET")
            .arg(format!("{}{key}", self.prefix))
            .arg(value)
            .arg("PX")
            .arg(ms)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }
}

/// A [`KeyValue`] table in Redis: the part of a key before its first `/` names a hash
/// (`{prefix}{kv}:<namespace>`, one Redis Cluster slot for all of them), the rest is the field.
/// Rule definitions, rule state and active alarms of distributed mode live here.
#[derive(Clone)]
pub struct RedisKv {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisKv {
    /// Connects.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, StoreError> {
        Ok(Self {
            conn: connect(cfg).await?,
            prefix: cfg.key_prefix.clone(),
        })
    }

    fn split<'k>(&self, key: &'k str) -> (String, &'k str) {
        let (ns, field) = key.split_once('/').unwrap_or(("", key));
        (format!("{}{{kv}}:{ns}", self.prefix), field)
    }
}

#[async_trait]
impl KeyValue for RedisKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (hash, field) = self.split(key);
        let mut conn = self.conn.clone();
        redis::cmd("HGET")
            .arg(hash)
            .arg(field)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in keys {
            let (hash, field) = self.split(k);
            pipe.cmd("HGET").arg(hash).arg(field);
        }
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await.map_err(unavailable)
    }

    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (hash, field_prefix) = self.split(prefix);
        let ns = prefix.split_once('/').map_or("", |(ns, _)| ns);
        let mut conn = self.conn.clone();
        let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(hash)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut out: Vec<(String, Vec<u8>)> = all
            .into_iter()
            .filter(|(f, _)| f.starts_with(field_prefix))
            .map(|(f, v)| {
                let key = if ns.is_empty() {
                    f
                } else {
                    format!("{ns}/{f}")
                };
                (key, v)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn apply(&self, writes: Vec<KvWrite>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for w in &writes {
            match w {
                KvWrite::Put(k, v) => {
                    let (hash, field) = self.split(k);
                    pipe.cmd("HSET").arg(hash).arg(field).arg(v).ignore();
                }
                KvWrite::Delete(k) => {
                    let (hash, field) = self.split(k);
                    pipe.cmd("HDEL").arg(hash).arg(field).ignore();
                }
            }
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }
}

/// GCRA in Redis: one key per limited subject (`{prefix}rl:<key>`) holding its theoretical
/// arrival time in microseconds of Redis's own clock (`TIME`), so fanout instances with skewed
/// clocks still share one budget. Keys expire once the budget is full again.
const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission
local allow_at = new_tat - tolerance
if allow_at > now then return allow_at - now end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return 0
";

/// Rate limits shared by every fanout instance, kept in Redis.
#[derive(Clone)]
pub struct RedisLimiter {
    conn: ConnectionManager,
    prefix: String,
    script: Script,
}

impl RedisLimiter {
    /// Connects.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, StoreError> {
        Ok(Self {
            conn: connect(cfg).await?,
            prefix: format!("{}rl:", cfg.key_prefix),
            script: Script::new(GCRA_LUA),
        })
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    async fn check(&self, key: &str, quota: &Quota) -> Result<Decision, StoreError> {
        let mut conn = self.conn.clone();
        let wait_us: u64 = self
            .script
            .key(format!("{}{key}", self.prefix))
            .arg(quota.emission_us())
            .arg(quota.tolerance_us())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(if wait_us == 0 {
            Decision::Allow
        } else {
            Decision::Deny {
                retry_after: std::time::Duration::from_micros(wait_us),
            }
        })
    }
}
