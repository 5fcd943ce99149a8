//! The DynamoDB key scheme, as pure functions.
//!
//! `pk = {device}#{bucket}` (plus `#{shard}` for hot devices) spreads one device's rows over one
//! partition per hour (or day), so a device's write rate is bounded per partition, not per table
//! lifetime; the shard, derived from the record id, spreads a single hot device further. `sk =
//! {ts:013}#{record id}` orders rows by time and makes a replayed record land on its own key.

use iotpipe_pipeline::record::RecordId;
use serde::{Deserialize, Serialize};

/// Largest ts the 13-digit sort key can hold (the year 2286).
pub const MAX_TS: i64 = 9_999_999_999_999;

/// Size of a partition-key time bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    /// One partition per device per UTC hour.
    Hour,
    /// One partition per device per UTC day.
    Day,
}

impl Bucket {
    fn millis(self) -> i64 {
        match self {
            Self::Hour => 3_600_000,
            Self::Day => 86_400_000,
        }
    }
}

/// The bucket label of `ts`: `2026-12-04T20` (hour) or `2026-12-04` (day), UTC.
pub fn bucket_of(ts: i64, bucket: Bucket) -> String {
    let start = ts.div_euclid(bucket.millis()) * bucket.millis();
    let t = time::OffsetDateTime::from_unix_timestamp(start / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    match bucket {
        Bucket::Hour => format!(
            "{:04}-{:02}-{:02}T{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour()
        ),
        Bucket::Day => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
    }
}

/// Every bucket label from the one holding `from` to the one holding `to`, oldest first.
pub fn buckets(from: i64, to: i64, bucket: Bucket) -> Vec<String> {
    let step = bucket.millis();
    let mut out = Vec::new();
    let mut b = from.div_euclid(step);
    while b <= to.div_euclid(step) {
        out.push(bucket_of(b * step, bucket));
        b += 1;
    }
    out
}

/// The write shard of a record: stable, derived from its id.
pub fn shard_of(id: &RecordId, shards: u32) -> u32 {
    let h = blake3::hash(id.0.as_bytes());
    let mut b = [0u8; 4];
    b.copy_from_slice(&h.as_bytes()[..4]);
    u32::from_le_bytes(b) % shards.max(1)
}

/// The partition key of a row.
pub fn partition_key(device: &str, ts: i64, bucket: Bucket, id: &RecordId, shards: u32) -> String {
    let b = bucket_of(ts, bucket);
    if shards > 1 {
        format!("{device}#{b}#{}", shard_of(id, shards))
    } else {
        format!("{device}#{b}")
    }
}

/// All partition keys of one device's bucket (one per shard).
pub fn partition_keys_of_bucket(device: &str, bucket_label: &str, shards: u32) -> Vec<String> {
    if shards > 1 {
        (0..shards)
            .map(|s| format!("{device}#{bucket_label}#{s}"))
            .collect()
    } else {
        vec![format!("{device}#{bucket_label}")]
    }
}

/// The sort key of a row.
pub fn sort_key(ts: i64, id: &str) -> String {
    format!("{:013}#{id}", ts.clamp(0, MAX_TS))
}

/// The smallest sort key at `ts`.
pub fn sort_key_lower(ts: i64) -> String {
    format!("{:013}#", ts.clamp(0, MAX_TS))
}

/// The largest sort key at `ts` (record ids are lowercase hex, all below `~`).
pub fn sort_key_upper(ts: i64) -> String {
    format!("{:013}#~", ts.clamp(0, MAX_TS))
}

/// The smallest key above `sk` (for an exclusive lower bound with BETWEEN).
pub fn after(sk: &str) -> String {
    format!("{sk}!")
}

/// A key below `sk` and above every key smaller than it (for an exclusive upper bound): the
/// record id's last hex digit decremented, with `~` appended (every real key is 32 hex chars, so
/// nothing lies between). The cursor row itself is then excluded.
pub fn before(sk: &str) -> String {
    let mut bytes = sk.as_bytes().to_vec();
    match bytes.pop() {
        Some(last) => {
            bytes.push(last.saturating_sub(1));
            bytes.push(b'~');
            String::from_utf8_lossy(&bytes).into_owned()
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_labels_and_walks() {
        let ts = 1_796_414_400_000; // 2026-12-04T20:00:00Z
        assert_eq!(bucket_of(ts, Bucket::Hour), "2026-12-04T20");
        assert_eq!(bucket_of(ts + 3_599_999, Bucket::Hour), "2026-12-04T20");
        assert_eq!(bucket_of(ts + 3_600_000, Bucket::Hour), "2026-12-04T21");
        assert_eq!(bucket_of(ts, Bucket::Day), "2026-12-04");
        assert_eq!(
            buckets(ts - 1, ts + 3_600_000, Bucket::Hour),
            vec!["2026-12-04T19", "2026-12-04T20", "2026-12-04T21"]
        );
    }

    #[test]
    fn sort_keys_order_like_time_and_bounds_are_tight() {
        let id = "0123456789abcdef0123456789abcdef";
        let k = sort_key(1_000, id);
        assert!(sort_key_lower(1_000) < k && k < sort_key_upper(1_000));
        assert!(sort_key_upper(999) < sort_key_lower(1_000));
        assert!(after(&k) > k);
        assert!(before(&k) < k);
        // Nothing real lies between before(k) and k.
        assert!(sort_key(1_000, "0123456789abcdef0123456789abcdee") < before(&k));
    }

    #[test]
    fn shards_are_stable_and_spread() {
        let ids: Vec<RecordId> = (0..400).map(|i| RecordId::compute("d", i, b"{}")).collect();
        let mut counts = [0u32; 4];
        for id in &ids {
            let s = shard_of(id, 4);
            assert_eq!(s, shard_of(id, 4));
            counts[s as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 60), "{counts:?}");
        assert_eq!(
            partition_key("d", 0, Bucket::Day, &ids[0], 1),
            "d#1970-01-01"
        );
    }
}
