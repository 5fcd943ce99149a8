//! The telemetry record: what ingest makes of one device message, and the validation that decides
//! whether a message becomes a record or a dead letter.
//!
//! A record's id is a hash of (device id, device timestamp, canonical payload bytes). The same
//! message replayed from the broker or the log therefore gets the same id, which is what makes every
//! sink idempotent: history writes land on the same key and the latest-state merge recognises a
//! record it already applied. Two byte-identical messages at the same `ts` collapse into one, which
//! is correct for telemetry.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A deterministic record id: the first 16 bytes of a BLAKE3 hash, as 32 lowercase hex chars.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RecordId(pub String);

impl RecordId {
    /// Computes the id of a record from its device, device timestamp and canonical metrics.
    pub fn compute(device: &str, ts: i64, canonical_metrics: &[u8]) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&(device.len() as u64).to_le_bytes());
        h.update(device.as_bytes());
        h.update(&ts.to_le_bytes());
        h.update(canonical_metrics);
        let bytes = h.finalize();
        let mut s = String::with_capacity(32);
        for b in &bytes.as_bytes()[..16] {
            use fmt::Write;
            let _ = write!(s, "{b:02x}");
        }
        Self(s)
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a record came from, kept for tracing and dead letters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceRef {
    /// An MQTT message on this topic.
    Mqtt {
        /// The topic the message was published on.
        topic: String,
    },
    /// A Kinesis record (step 5).
    Kinesis {
        /// Shard id.
        shard: String,
        /// Sequence number within the shard.
        sequence: String,
    },
    /// Generated inside the process (tests, the simulator through a direct path).
    Internal,
}

/// One validated telemetry message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Deterministic id, see [`RecordId::compute`].
    pub id: RecordId,
    /// Device id, validated by [`validate_device_id`].
    pub device: String,
    /// Device timestamp, epoch ms: the payload's `ts`, or the receive time when it has none.
    pub ts: i64,
    /// When ingest received the message, epoch ms.
    pub received_at: i64,
    /// Arrival order at ingest (epoch ns, strictly increasing per ingest process). Breaks ties
    /// between records of a device with the same `ts`: the later arrival wins, which is what a
    /// device without timestamps (whose `ts` is the receive time in ms) means by "latest".
    #[serde(default)]
    pub arrival: u64,
    /// The payload without `ts`: a JSON object.
    pub metrics: Map<String, Value>,
    /// Where the message came from.
    pub source: SourceRef,
}

/// Limits applied to every incoming payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted payload in bytes; larger ones are dead-lettered (`payload_too_large`).
    pub max_payload_bytes: usize,
    /// Deepest accepted nesting of objects/arrays inside the payload object (the object is 1).
    pub max_depth: usize,
    /// How far into the future a device `ts` may lie before the record is rejected.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// How far into the past a device `ts` may lie before the record is rejected.
    #[serde(with = "humantime_serde")]
    pub max_past_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            max_depth: 16,
            max_future_skew: Duration::from_secs(5 * 60),
            max_past_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Why a message was refused; the `snake_case` name is the `reason` of its dead letter and the
/// `reason` label of `iotpipe_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The topic does not match the configured topic template.
    TopicMismatch,
    /// The device id is empty, longer than 128 chars or has characters outside `[A-Za-z0-9_.:-]`.
    InvalidDeviceId,
    /// The payload is larger than `max_payload_bytes`.
    PayloadTooLarge,
    /// The payload is not valid UTF-8 JSON.
    InvalidJson,
    /// The payload is JSON but not an object.
    NotAnObject,
    /// Nesting deeper than `max_depth`.
    TooDeep,
    /// A number that is not finite (NaN, infinity, or out of range like `1e999`).
    NonFiniteNumber,
    /// `ts` is present but neither epoch seconds/ms nor RFC 3339.
    InvalidTimestamp,
    /// `ts` lies further in the future than `max_future_skew`.
    TimestampInFuture,
    /// `ts` lies further in the past than `max_past_age`.
    TimestampTooOld,
    /// A record in the log could not be decoded (written by an incompatible version, corrupted).
    UndecodableRecord,
}

impl RejectReason {
    /// The `snake_case` name used in dead letters and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TopicMismatch => "topic_mismatch",
            Self::InvalidDeviceId => "invalid_device_id",
            Self::PayloadTooLarge => "payload_too_large",
            Self::InvalidJson => "invalid_json",
            Self::NotAnObject => "not_an_object",
            Self::TooDeep => "too_deep",
            Self::NonFiniteNumber => "non_finite_number",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::TimestampInFuture => "timestamp_in_future",
            Self::TimestampTooOld => "timestamp_too_old",
            Self::UndecodableRecord => "undecodable_record",
        }
    }
}

/// A refused message: a reason code plus a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Rejection {
    /// Machine-readable reason.
    pub reason: RejectReason,
    /// What exactly was wrong, for the person reading the dead letter.
    pub detail: String,
}

impl Rejection {
    /// Builds a rejection.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// Checks a device id: 1–128 chars of `[A-Za-z0-9_.:-]`.
///
/// # Errors
/// [`RejectReason::InvalidDeviceId`] with the offending detail.
pub fn validate_device_id(id: &str) -> Result<(), Rejection> {
    if id.is_empty() || id.len() > 128 {
        return Err(Rejection::new(
            RejectReason::InvalidDeviceId,
            format!("device id must be 1-128 characters, got {}", id.len()),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(Rejection::new(
            RejectReason::InvalidDeviceId,
            format!("device id contains {c:?}; allowed are A-Z a-z 0-9 _ . : -"),
        ));
    }
    Ok(())
}

/// Parses and validates one payload into a [`Record`].
///
/// `now_ms` is the receive time; it is also the reference for the timestamp skew checks.
///
/// # Errors
/// A [`Rejection`] for anything that is not a valid telemetry message; never panics on input.
pub fn parse_record(
    device: &str,
    payload: &[u8],
    now_ms: i64,
    source: SourceRef,
    limits: &Limits,
) -> Result<Record, Rejection> {
    validate_device_id(device)?;
    if payload.len() > limits.max_payload_bytes {
        return Err(Rejection::new(
            RejectReason::PayloadTooLarge,
            format!(
                "payload is {} bytes, limit is {}",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    // serde_json refuses NaN/Infinity literals and numbers out of f64 range, and stops at a
    // recursion depth of 128 with an error instead of overflowing the stack, so parsing untrusted
    // bytes is safe; the finer depth limit is checked on the parsed value below.
    let value: Value = serde_json::from_slice(payload).map_err(|e| {
        let msg = e.to_string();
        let reason = if msg.contains("recursion limit") {
            RejectReason::TooDeep
        } else if msg.contains("number out of range") {
            RejectReason::NonFiniteNumber
        } else {
            RejectReason::InvalidJson
        };
        Rejection::new(reason, msg)
    })?;
    let Value::Object(mut obj) = value else {
        return Err(Rejection::new(
            RejectReason::NotAnObject,
            format!("payload must be a JSON object, got {}", json_kind(&value)),
        ));
    };
    let depth = depth_of_map(&obj, 1);
    if depth > limits.max_depth {
        return Err(Rejection::new(
            RejectReason::TooDeep,
            format!(
                "payload nests {depth} levels, limit is {}",
                limits.max_depth
            ),
        ));
    }
    if let Some(path) = first_non_finite(&obj) {
        return Err(Rejection::new(
            RejectReason::NonFiniteNumber,
            format!("`{path}` is not a finite number"),
        ));
    }
    let ts = match obj.remove("ts") {
        None | Some(Value::Null) => now_ms,
        Some(v) => parse_ts(&v)?,
    };
    let future = i64::try_from(limits.max_future_skew.as_millis()).unwrap_or(i64::MAX);
    let past = i64::try_from(limits.max_past_age.as_millis()).unwrap_or(i64::MAX);
    if ts > now_ms.saturating_add(future) {
        return Err(Rejection::new(
            RejectReason::TimestampInFuture,
            format!(
                "ts {} is {} ms ahead of the receive time",
                crate::time::to_rfc3339(ts),
                ts - now_ms
            ),
        ));
    }
    if ts < now_ms.saturating_sub(past) {
        return Err(Rejection::new(
            RejectReason::TimestampTooOld,
            format!(
                "ts {} is older than max_past_age",
                crate::time::to_rfc3339(ts)
            ),
        ));
    }
    // serde_json's Map is a BTreeMap here (no `preserve_order`), so this serialization has sorted
    // keys: the canonical form the id is computed from, independent of the device's key order.
    let canonical = serde_json::to_vec(&obj)
        .map_err(|e| Rejection::new(RejectReason::InvalidJson, e.to_string()))?;
    Ok(Record {
        id: RecordId::compute(device, ts, &canonical),
        device: device.to_owned(),
        ts,
        received_at: now_ms,
        arrival: u64::try_from(now_ms).unwrap_or(0).saturating_mul(1_000_000),
        metrics: obj,
        source,
    })
}

/// Epoch numbers below this are seconds, above it milliseconds (1e11 s is the year 5138; 1e11 ms
/// is 1973), so both forms of any realistic timestamp are told apart.
const SECONDS_MS_BOUNDARY: f64 = 1e11;

fn parse_ts(v: &Value) -> Result<i64, Rejection> {
    match v {
        Value::Number(n) => {
            let Some(f) = n.as_f64() else {
                return Err(Rejection::new(
                    RejectReason::InvalidTimestamp,
                    format!("ts {n} is not a number"),
                ));
            };
            let ms = if f.abs() < SECONDS_MS_BOUNDARY {
                f * 1000.0
            } else {
                f
            };
            if !ms.is_finite() || ms.abs() > 9.0e15 {
                return Err(Rejection::new(
                    RejectReason::InvalidTimestamp,
                    format!("ts {n} is out of range"),
                ));
            }
            #[allow(clippy::cast_possible_truncation)]
            Ok(ms.round() as i64)
        }
        Value::String(s) => {
            ::time::OffsetDateTime::parse(s, &::time::format_description::well_known::Rfc3339)
                .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
                .map_err(|e| {
                    Rejection::new(
                        RejectReason::InvalidTimestamp,
                        format!("ts {s:?} is not RFC 3339: {e}"),
                    )
                })
        }
        other => Err(Rejection::new(
            RejectReason::InvalidTimestamp,
            format!(
                "ts must be epoch seconds, epoch milliseconds or RFC 3339 text, got {}",
                json_kind(other)
            ),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn depth_of_map(m: &Map<String, Value>, here: usize) -> usize {
    m.values().map(|v| depth_of(v, here)).max().unwrap_or(here)
}

fn depth_of(v: &Value, parent: usize) -> usize {
    match v {
        Value::Object(m) => depth_of_map(m, parent + 1),
        Value::Array(a) => a
            .iter()
            .map(|x| depth_of(x, parent + 1))
            .max()
            .unwrap_or(parent + 1),
        _ => parent,
    }
}

fn first_non_finite(m: &Map<String, Value>) -> Option<String> {
    fn walk(v: &Value, path: &mut String) -> bool {
        match v {
            Value::Number(n) => n.as_f64().is_some_and(|f| !f.is_finite()),
            Value::Object(m) => m.iter().any(|(k, v)| {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                let bad = walk(v, path);
                if !bad {
                    path.truncate(len);
                }
                bad
            }),
            Value::Array(a) => a.iter().any(|v| walk(v, path)),
            _ => false,
        }
    }
    let mut path = String::new();
    for (k, v) in m {
        path.clear();
        path.push_str(k);
        if walk(v, &mut path) {
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    fn parse(device: &str, payload: &str) -> Result<Record, Rejection> {
        parse_record(
            device,
            payload.as_bytes(),
            NOW,
            SourceRef::Internal,
            &Limits::default(),
        )
    }

    fn reason(device: &str, payload: &str) -> RejectReason {
        match parse(device, payload) {
            Ok(r) => unreachable!("expected a rejection, got {r:?}"),
            Err(e) => e.reason,
        }
    }

    #[test]
    fn timestamps_in_all_three_forms() {
        assert_eq!(
            parse("d1", r#"{"ts":1750000000123,"t":1}"#).map(|r| r.ts),
            Ok(1_750_000_000_123)
        );
        assert_eq!(
            parse("d1", r#"{"ts":1750000000,"t":1}"#).map(|r| r.ts),
            Ok(1_750_000_000_000)
        );
        assert_eq!(
            parse("d1", r#"{"ts":1750000000.5,"t":1}"#).map(|r| r.ts),
            Ok(1_750_000_000_500)
        );
        assert_eq!(
            parse("d1", r#"{"ts":"2025-06-15T15:06:40.123Z","t":1}"#).map(|r| r.ts),
            Ok(1_750_000_000_123)
        );
        assert_eq!(parse("d1", r#"{"t":1}"#).map(|r| r.ts), Ok(NOW));
    }

    #[test]
    fn ts_is_not_a_metric() {
        let r = parse("d1", r#"{"ts":1750000000,"t":1}"#).map(|r| r.metrics);
        assert_eq!(
            r.map(|m| m.keys().cloned().collect::<Vec<_>>()),
            Ok(vec!["t".to_owned()])
        );
    }

    #[test]
    fn record_id_is_deterministic_and_key_order_independent() {
        let a = parse("d1", r#"{"ts":1750000000,"a":1,"b":2}"#).map(|r| r.id);
        let b = parse("d1", r#"{"b":2,"ts":1750000000,"a":1}"#).map(|r| r.id);
        let c = parse("d1", r#"{"ts":1750000001,"a":1,"b":2}"#).map(|r| r.id);
        let d = parse("d2", r#"{"ts":1750000000,"a":1,"b":2}"#).map(|r| r.id);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn bad_inputs_have_reasons() {
        assert_eq!(reason("d1", "not json"), RejectReason::InvalidJson);
        assert_eq!(reason("d1", "[1,2]"), RejectReason::NotAnObject);
        assert_eq!(reason("d1", r#""text""#), RejectReason::NotAnObject);
        assert_eq!(reason("d1", r#"{"t":NaN}"#), RejectReason::InvalidJson);
        assert_eq!(
            reason("d1", r#"{"t":1e999}"#),
            RejectReason::NonFiniteNumber
        );
        assert_eq!(
            reason("d1", r#"{"t":-Infinity}"#),
            RejectReason::InvalidJson
        );
        assert_eq!(
            reason("bad id", r#"{"t":1}"#),
            RejectReason::InvalidDeviceId
        );
        assert_eq!(reason("", r#"{"t":1}"#), RejectReason::InvalidDeviceId);
        assert_eq!(
            reason(&"x".repeat(129), r#"{"t":1}"#),
            RejectReason::InvalidDeviceId
        );
        assert_eq!(
            reason("d1", r#"{"ts":"tomorrow"}"#),
            RejectReason::InvalidTimestamp
        );
        assert_eq!(
            reason("d1", r#"{"ts":true}"#),
            RejectReason::InvalidTimestamp
        );
        assert_eq!(
            reason("d1", r#"{"ts":4102444800000}"#),
            RejectReason::TimestampInFuture
        );
        assert_eq!(
            reason("d1", r#"{"ts":1000000000}"#),
            RejectReason::TimestampTooOld
        );
        let big = format!(r#"{{"t":"{}"}}"#, "x".repeat(70_000));
        assert_eq!(reason("d1", &big), RejectReason::PayloadTooLarge);
        let deep17 = format!(r#"{{"a":{}1{}}}"#, "[".repeat(16), "]".repeat(16));
        assert_eq!(reason("d1", &deep17), RejectReason::TooDeep);
        let deep16 = format!(r#"{{"a":{}1{}}}"#, "[".repeat(15), "]".repeat(15));
        assert!(parse("d1", &deep16).is_ok());
        let very_deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(5000), "]".repeat(5000));
        assert_eq!(
            parse_record(
                "d1",
                very_deep.as_bytes(),
                NOW,
                SourceRef::Internal,
                &Limits {
                    max_payload_bytes: 1 << 20,
                    ..Limits::default()
                }
            )
            .map_err(|e| e.reason),
            Err(RejectReason::TooDeep)
        );
        assert_eq!(reason("d1", "\u{0}\u{1}\u{ff}"), RejectReason::InvalidJson);
    }

    #[test]
    fn device_ids() {
        assert!(validate_device_id("plant-3:line_2.sensor-17").is_ok());
        assert!(validate_device_id(&"a".repeat(128)).is_ok());
        assert!(validate_device_id("a/b").is_err());
        assert!(validate_device_id("ä").is_err());
    }
}
