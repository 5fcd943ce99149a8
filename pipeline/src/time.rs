//! Wall-clock helpers. All timestamps in iotpipe are UTC epoch milliseconds (`i64`).

use std::time::{SystemTime, UNIX_EPOCH};

/// The current time as epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A strictly increasing arrival stamp: epoch nanoseconds, bumped by one when the clock has not
/// moved on (or went back) since the previous call in this process.
pub fn arrival_ns() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// Formats epoch milliseconds as RFC 3339 (UTC, millisecond precision).
pub fn to_rfc3339(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match ::time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => t
            .format(&::time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| ms.to_string()),
        Err(_) => ms.to_string(),
    }
}

/// Parses a timestamp given as epoch milliseconds (an integer) or RFC 3339 text.
///
/// # Errors
/// Returns a message naming the accepted forms when `s` is neither.
pub fn parse_ms_or_rfc3339(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.trim().parse::<i64>() {
        return Ok(ms);
    }
    ::time::OffsetDateTime::parse(s.trim(), &::time::format_description::well_known::Rfc3339)
        .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
        .map_err(|_| format!("`{s}` is neither epoch milliseconds nor an RFC 3339 timestamp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let ms = 1_700_000_000_123;
        assert_eq!(parse_ms_or_rfc3339(&to_rfc3339(ms)), Ok(ms));
        assert_eq!(parse_ms_or_rfc3339("1700000000123"), Ok(ms));
        assert!(parse_ms_or_rfc3339("yesterday").is_err());
    }
}
