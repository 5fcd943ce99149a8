//! Readiness: what `/readyz` answers. A process is ready once it has started and every check it
//! registered (a backend answering, a consumer having joined its group) currently holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// The readiness of one process.
#[derive(Default)]
pub struct Readiness {
    started: AtomicBool,
    checks: Mutex<Vec<(String, Arc<AtomicBool>)>>,
}

impl Readiness {
    /// A readiness with no checks, not started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a named check; the flag is updated by whoever owns it.
    pub fn add(&self, name: impl Into<String>, flag: Arc<AtomicBool>) {
        self.checks.lock().push((name.into(), flag));
    }

    /// Marks the process started (true) or stopping (false).
    pub fn set_started(&self, started: bool) {
        self.started.store(started, Ordering::Release);
    }

    /// The names of what is not ready; empty when ready.
    pub fn failing(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.started.load(Ordering::Acquire) {
            out.push("not started".to_owned());
        }
        out.extend(
            self.checks
                .lock()
                .iter()
                .filter(|(_, f)| !f.load(Ordering::Acquire))
                .map(|(n, _)| n.clone()),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_started_and_every_check_holds() {
        let r = Readiness::new();
        let redis = Arc::new(AtomicBool::new(false));
        r.add("redis", Arc::clone(&redis));
        assert_eq!(r.failing(), vec!["not started", "redis"]);
        r.set_started(true);
        redis.store(true, Ordering::Release);
        assert!(r.failing().is_empty());
        redis.store(false, Ordering::Release);
        assert_eq!(r.failing(), vec!["redis"]);
    }
}
