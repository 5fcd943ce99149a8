//! Per-key rate limits with GCRA (the generic cell rate algorithm: a token bucket kept as one
//! timestamp per key, the "theoretical arrival time").
//!
//! A [`Quota`] of `rate` per `period` with `burst` lets `burst` requests through at once and then
//! one every `period / rate`. [`LocalLimiter`] keeps the timestamps in the process (`iotpipe dev`,
//! one fanout instance); the Redis limiter (`iotpipe-redis`) keeps them in Redis so that every
//! fanout instance counts against the same budget.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::store::StoreError;

/// How many requests a key may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests per period, sustained.
    pub rate: u32,
    /// The period `rate` is counted over.
    pub period: Duration,
    /// Requests allowed at once on top of an idle key (at least 1).
    pub burst: u32,
}

impl Quota {
    /// `rate` requests per minute with the given burst.
    pub fn per_minute(rate: u32, burst: u32) -> Self {
        Self {
            rate,
            period: Duration::from_secs(60),
            burst,
        }
    }

    /// Time between two requests at the sustained rate, in microseconds (at least 1).
    pub fn emission_us(&self) -> u64 {
        (self.period.as_micros() as u64 / u64::from(self.rate.max(1))).max(1)
    }

    /// How far ahead of now the theoretical arrival time may run, in microseconds.
    pub fn tolerance_us(&self) -> u64 {
        self.emission_us() * u64::from(self.burst.max(1))
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The request may go ahead (and was counted).
    Allow,
    /// Over the limit: retry after this long (nothing was counted).
    Deny {
        /// Until the next request would be allowed.
        retry_after: Duration,
    },
}

/// One GCRA step: given the stored theoretical arrival time `tat` (or none) and `now` (both in
/// microseconds), the decision and, when allowed, the new `tat` to store.
pub fn gcra(tat: Option<u64>, now: u64, quota: &Quota) -> (Decision, Option<u64>) {
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat + quota.emission_us();
    let allow_at = new_tat.saturating_sub(quota.tolerance_us());
    if allow_at > now {
        (
            Decision::Deny {
                retry_after: Duration::from_micros(allow_at - now),
            },
            None,
        )
    } else {
        (Decision::Allow, Some(new_tat))
    }
}

/// Something that counts requests per key.
#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Counts one request of `key` against `quota`.
    ///
    /// # Errors
    /// [`StoreError`] when the shared store cannot be reached (callers let the request through:
    /// a limiter outage must not become an API outage).
    async fn check(&self, key: &str, quota: &Quota) -> Result<Decision, StoreError>;
}

/// Rate limits kept in this process.
pub struct LocalLimiter {
    started: Instant,
    tats: Mutex<HashMap<String, u64>>,
    capacity: usize,
}

impl LocalLimiter {
    /// A limiter that forgets keys whose budget is full again once it tracks `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            started: Instant::now(),
            tats: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self::new(100_000)
    }
}

#[async_trait]
impl RateLimiter for LocalLimiter {
    async fn check(&self, key: &str, quota: &Quota) -> Result<Decision, StoreError> {
        let now = self.now_us();
        let mut tats = self.tats.lock();
        if tats.len() >= self.capacity && !tats.contains_key(key) {
            // A key whose tat is in the past has its whole budget back: forgetting it changes
            // nothing.
            tats.retain(|_, tat| *tat > now);
        }
        let (decision, new_tat) = gcra(tats.get(key).copied(), now, quota);
        if let Some(t) = new_tat {
            tats.insert(key.to_owned(), t);
        }
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_sustained_rate() {
        // 60 per minute = one per second, burst 3.
        let q = Quota::per_minute(60, 3);
        let mut tat = None;
        let mut t = 1_000_000_000;
        for _ in 0..3 {
            let (d, n) = gcra(tat, t, &q);
            assert_eq!(d, Decision::Allow);
            tat = n;
        }
        let (d, n) = gcra(tat, t, &q);
        assert_eq!(
            d,
            Decision::Deny {
                retry_after: Duration::from_secs(1)
            }
        );
        assert_eq!(n, None, "a denied request is not counted");
        // Half a second later: still denied, half a second to go.
        t += 500_000;
        assert_eq!(
            gcra(tat, t, &q).0,
            Decision::Deny {
                retry_after: Duration::from_millis(500)
            }
        );
        // After a second, exactly one more.
        t += 500_000;
        let (d, n) = gcra(tat, t, &q);
        assert_eq!(d, Decision::Allow);
        tat = n;
        assert!(matches!(gcra(tat, t, &q).0, Decision::Deny { .. }));
        // Idle for a long time: the burst is back, not more.
        t += 3_600_000_000;
        for _ in 0..3 {
            let (d, n) = gcra(tat, t, &q);
            assert_eq!(d, Decision::Allow);
            tat = n;
        }
        assert!(matches!(gcra(tat, t, &q).0, Decision::Deny { .. }));
    }

    #[tokio::test]
    async fn local_limiter_counts_keys_apart() -> Result<(), StoreError> {
        let l = LocalLimiter::new(2);
        let q = Quota::per_minute(1, 1);
        assert_eq!(l.check("a", &q).await?, Decision::Allow);
        assert!(matches!(l.check("a", &q).await?, Decision::Deny { .. }));
        assert_eq!(l.check("b", &q).await?, Decision::Allow);
        // At capacity, a new key only evicts keys whose budget is full again; `a` is not.
        assert_eq!(l.check("c", &q).await?, Decision::Allow);
        assert!(matches!(l.check("a", &q).await?, Decision::Deny { .. }));
        Ok(())
    }
}
