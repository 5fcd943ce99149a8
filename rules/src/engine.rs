//! The rule engine: which rules see which records, per-rule-per-device state, the alarm lifecycle,
//! and failure isolation. It implements [`Evaluator`] for the rules operator.
//!
//! - **Ownership first.** A rule only ever sees records of devices its owner owns (asked of a
//!   [`DeviceOwners`] registry), whatever its selector says; the selector narrows further.
//! - **Raise once, clear once.** A rule calls `alert(..)` while its condition holds and `clear()`
//!   when it ends; the engine turns that into one `raised` alert when the alarm starts and one
//!   `cleared` when it ends. After a clear, a new raise is suppressed for the rule's `cooldown`
//!   (in event time). Hysteresis is the script's (see `docs/RULES.md`).
//! - **Isolation.** A rule that errors or hits a limit is counted; after `max_consecutive_failures`
//!   failures in a row it is disabled and a `rule_disabled` alert goes to its owner. No other rule,
//!   device or user is affected, and the record still reaches every other rule.
//!
//! State (the script's `state` map and the active alarms) lives in memory here; persisting it so
//! that restarts neither re-fire nor forget is the next step (Redis / the embedded store).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use iotpipe_pipeline::record::{Record, RecordId};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::sandbox::{Action, Compiled, Input, RuleError, Sandbox};
use crate::{Alert, AlertKind, Evaluator, StateStore};

/// Which devices a rule applies to (always within its owner's devices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// Every device of the owner.
    All,
    /// These device ids.
    Devices(Vec<String>),
    /// Device ids matching a glob with `*` (any run of characters) and `?` (one character).
    Glob(String),
}

impl Selector {
    /// Whether `device` is selected.
    pub fn matches(&self, device: &str) -> bool {
        match self {
            Self::All => true,
            Self::Devices(ids) => ids.iter().any(|d| d == device),
            Self::Glob(g) => glob(g.as_bytes(), device.as_bytes()),
        }
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard match with backtracking to the last `*`: linear in practice, no
    // recursion for a hostile pattern to exploit.
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// A subscription rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Unique id.
    pub id: String,
    /// Name for people.
    pub name: String,
    /// The user who owns it.
    pub owner: String,
    /// Which of the owner's devices it applies to.
    pub selector: Selector,
    /// The Rhai script.
    pub script: String,
    /// Cooldown after a clear before the same alarm may be raised again, ms of event time.
    pub cooldown_ms: i64,
    /// Whether it runs.
    pub enabled: bool,
}

/// Device -> owner, as far as rules are concerned.
pub trait DeviceOwners: Send + Sync + 'static {
    /// The owner of `device`, if registered.
    fn owner_of(&self, device: &str) -> Option<String>;
}

/// A fixed map of owners (tests, and `iotpipe dev` until the registry arrives).
#[derive(Debug, Default, Clone)]
pub struct StaticOwners(pub HashMap<String, String>);

/// One owner for every device: `iotpipe dev`, which is single-user until authentication arrives.
#[derive(Debug, Clone)]
pub struct SingleOwner(pub String);

impl DeviceOwners for SingleOwner {
    fn owner_of(&self, _device: &str) -> Option<String> {
        Some(self.0.clone())
    }
}

impl DeviceOwners for StaticOwners {
    fn owner_of(&self, device: &str) -> Option<String> {
        self.0.get(device).cloned()
    }
}

struct Loaded {
    rule: Rule,
    compiled: Compiled,
    failures: AtomicU32,
    disabled: AtomicBool,
}

#[derive(Default)]
struct DeviceRuleState {
    state: rhai::Map,
    active: bool,
    cleared_at: Option<i64>,
    /// What the active alarm was raised with: (ts, severity, text).
    raised: Option<(i64, String, String)>,
}

/// An alarm that is currently active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveAlarm {
    /// The rule.
    pub rule: String,
    /// The rule's owner.
    pub owner: String,
    /// The device.
    pub device: String,
    /// When it was raised (event time, ms).
    pub since: i64,
    /// Severity it was raised with.
    pub severity: String,
    /// Text it was raised with.
    pub text: String,
}

impl DeviceRuleState {
    fn encode(&self) -> Vec<u8> {
        let state: serde_json::Value =
            rhai::serde::from_dynamic(&rhai::Dynamic::from_map(self.state.clone()))
                .unwrap_or(serde_json::Value::Null);
        serde_json::json!({"state": state, "active": self.active, "cleared_at": self.cleared_at, "raised": self.raised})
            .to_string()
            .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let state = rhai::serde::to_dynamic(&v["state"])
            .ok()?
            .try_cast::<rhai::Map>()
            .unwrap_or_default();
        Some(Self {
            state,
            active: v["active"].as_bool().unwrap_or(false),
            cleared_at: v["cleared_at"].as_i64(),
            raised: serde_json::from_value(v["raised"].clone()).ok().flatten(),
        })
    }
}

fn state_key(rule: &str, device: &str) -> String {
    format!("rule-state/{rule}/{device}")
}

/// Failures of rules, for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The rule.
    pub rule: String,
    /// The device whose record it failed on.
    pub device: String,
    /// What went wrong.
    pub error: RuleError,
}

/// The rule engine.
pub struct RuleEngine {
    sandbox: Sandbox,
    owners: Arc<dyn DeviceOwners>,
    rules: RwLock<Vec<Arc<Loaded>>>,
    states: Mutex<HashMap<(String, String), DeviceRuleState>>,
    max_consecutive_failures: u32,
    failures: Mutex<Vec<Failure>>,
    store: Option<Arc<dyn StateStore>>,
    dirty: Mutex<std::collections::HashSet<(String, String)>>,
    watermark: AtomicI64,
    watermark_seen_at: AtomicI64,
}

impl RuleEngine {
    /// An engine with no rules.
    pub fn new(
        sandbox: Sandbox,
        owners: Arc<dyn DeviceOwners>,
        max_consecutive_failures: u32,
    ) -> Self {
        Self {
            sandbox,
            owners,
            rules: RwLock::new(Vec::new()),
            states: Mutex::new(HashMap::new()),
            max_consecutive_failures: max_consecutive_failures.max(1),
            failures: Mutex::new(Vec::new()),
            store: None,
            dirty: Mutex::new(std::collections::HashSet::new()),
            watermark: AtomicI64::new(i64::MIN),
            watermark_seen_at: AtomicI64::new(0),
        }
    }

    /// The active alarms, of `owner` only when given, sorted by rule and device.
    pub fn active_alarms(&self, owner: Option<&str>) -> Vec<ActiveAlarm> {
        let rules: HashMap<String, String> = self
            .rules
            .read()
            .iter()
            .map(|r| (r.rule.id.clone(), r.rule.owner.clone()))
            .collect();
        let mut out: Vec<ActiveAlarm> = self
            .states
            .lock()
            .iter()
            .filter(|(_, st)| st.active)
            .filter_map(|((rule, device), st)| {
                let rule_owner = rules.get(rule)?;
                if owner.is_some_and(|o| o != rule_owner) {
                    return None;
                }
                let (since, severity, text) =
                    st.raised
                        .clone()
                        .unwrap_or((0, String::new(), String::new()));
                Some(ActiveAlarm {
                    rule: rule.clone(),
                    owner: rule_owner.clone(),
                    device: device.clone(),
                    since,
                    severity,
                    text,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.rule, &a.device).cmp(&(&b.rule, &b.device)));
        out
    }

    /// Loads every stored rule state (at start-up), so that active alarms are known before the
    /// devices report again.
    ///
    /// # Errors
    /// A description when the store fails.
    pub async fn preload(&self) -> Result<usize, String> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let all = store.load_all().await?;
        let mut states = self.states.lock();
        let mut n = 0;
        for (key, bytes) in all {
            let Some((rule, device)) = key
                .strip_prefix("rule-state/")
                .and_then(|k| k.split_once('/'))
            else {
                continue;
            };
            if let Some(st) = DeviceRuleState::decode(&bytes) {
                states
                    .entry((rule.to_owned(), device.to_owned()))
                    .or_insert(st);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Keeps rule state and alarms in `store`: loaded on first use, saved by [`Evaluator::flush`].
    #[must_use]
    pub fn with_store(mut self, store: Arc<dyn StateStore>) -> Self {
        self.store = Some(store);
        self
    }

    fn applicable(&self, record: &Record) -> Vec<Arc<Loaded>> {
        let Some(owner) = self.owners.owner_of(&record.device) else {
            return Vec::new();
        };
        self.rules
            .read()
            .iter()
            .filter(|r| {
                r.rule.enabled
                    && !r.disabled.load(Ordering::Relaxed)
                    && r.rule.owner == owner
                    && r.rule.selector.matches(&record.device)
            })
            .cloned()
            .collect()
    }

    /// Adds or replaces a rule (by id), compiling its script once.
    ///
    /// # Errors
    /// [`RuleError::Compile`] when the script does not compile; the old version stays.
    pub fn upsert(&self, rule: Rule) -> Result<(), RuleError> {
        let compiled = self.sandbox.compile(&rule.script)?;
        let loaded = Arc::new(Loaded {
            rule,
            compiled,
            failures: AtomicU32::new(0),
            disabled: AtomicBool::new(false),
        });
        let mut rules = self.rules.write();
        rules.retain(|r| r.rule.id != loaded.rule.id);
        rules.push(loaded);
        Ok(())
    }

    /// Removes a rule and its state.
    pub fn remove(&self, id: &str) {
        self.rules.write().retain(|r| r.rule.id != id);
        self.states.lock().retain(|(rule, _), _| rule != id);
    }

    /// Whether rule `id` is currently disabled by failures.
    pub fn is_disabled(&self, id: &str) -> bool {
        self.rules
            .read()
            .iter()
            .any(|r| r.rule.id == id && r.disabled.load(Ordering::Relaxed))
    }

    /// Failures since the last call (for metrics and logs).
    pub fn take_failures(&self) -> Vec<Failure> {
        std::mem::take(&mut *self.failures.lock())
    }

    /// Evaluates every applicable rule on `record` (synchronously).
    pub fn evaluate_record(&self, record: &Record) -> Vec<Alert> {
        self.evaluate_rules(record, &self.applicable(record))
    }

    fn evaluate_rules(&self, record: &Record, rules: &[Arc<Loaded>]) -> Vec<Alert> {
        let mut out = Vec::new();
        if record.ts > self.watermark.fetch_max(record.ts, Ordering::Relaxed) {
            self.watermark_seen_at
                .store(iotpipe_pipeline::time::now_ms(), Ordering::Relaxed);
        }
        let at = At {
            device: &record.device,
            ts: record.ts,
            record_id: &record.id,
        };
        for r in rules {
            self.evaluate_one(r, at, &record.metrics, false, &mut out);
        }
        out
    }

    /// Evaluates every rule for every device it has state for, as of event time `now`, with no
    /// record (`tick` is true, `metrics` empty): how "no data for 10 minutes" is written. The
    /// rules operator calls it every second with [`RuleEngine::event_time`].
    pub fn tick(&self, now: i64) -> Vec<Alert> {
        let keys: Vec<(String, String)> = self.states.lock().keys().cloned().collect();
        let rules: Vec<Arc<Loaded>> = self.rules.read().clone();
        let empty = serde_json::Map::new();
        let no_record = RecordId(String::new());
        let mut out = Vec::new();
        for (rule_id, device) in keys {
            let Some(r) = rules.iter().find(|r| r.rule.id == rule_id) else {
                continue;
            };
            let owned = self
                .owners
                .owner_of(&device)
                .is_some_and(|o| o == r.rule.owner);
            if !r.rule.enabled
                || r.disabled.load(Ordering::Relaxed)
                || !owned
                || !r.rule.selector.matches(&device)
            {
                continue;
            }
            let at = At {
                device: &device,
                ts: now,
                record_id: &no_record,
            };
            self.evaluate_one(r, at, &empty, true, &mut out);
        }
        out
    }

    /// The engine's event time: the newest record ts seen, moved on by the wall-clock time since
    /// that record arrived, so that timers keep running when every device has gone quiet.
    pub fn event_time(&self, wall_now: i64) -> i64 {
        let mark = self.watermark.load(Ordering::Relaxed);
        if mark == i64::MIN {
            return wall_now;
        }
        mark + (wall_now - self.watermark_seen_at.load(Ordering::Relaxed)).max(0)
    }

    fn evaluate_one(
        &self,
        r: &Loaded,
        at: At<'_>,
        metrics: &serde_json::Map<String, serde_json::Value>,
        tick: bool,
        out: &mut Vec<Alert>,
    ) {
        let key = (r.rule.id.clone(), at.device.to_owned());
        self.dirty.lock().insert(key.clone());
        let mut states = self.states.lock();
        let st = states.entry(key).or_default();
        let input = Input {
            device: at.device,
            ts: at.ts,
            now: at.ts,
            metrics,
            prev: None,
            tick,
        };
        match self.sandbox.evaluate(&r.compiled, &input, &mut st.state) {
            Ok(actions) => {
                r.failures.store(0, Ordering::Relaxed);
                lifecycle(&r.rule, at, st, &actions, out);
            }
            Err(error) => {
                let n = r.failures.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(rule = %r.rule.id, device = %at.device, error = %error, consecutive = n, "Rule failed.");
                self.failures.lock().push(Failure {
                    rule: r.rule.id.clone(),
                    device: at.device.to_owned(),
                    error: error.clone(),
                });
                if n >= self.max_consecutive_failures && !r.disabled.swap(true, Ordering::Relaxed) {
                    out.push(Alert {
                        rule: r.rule.id.clone(),
                        device: at.device.to_owned(),
                        ts: at.ts,
                        kind: AlertKind::RuleDisabled,
                        severity: "error".into(),
                        text: format!(
                            "rule `{}` disabled after {n} consecutive failures; last: {error}",
                            r.rule.name
                        ),
                        record_id: at.record_id.clone(),
                    });
                }
            }
        }
    }
}

/// Where an evaluation happens: device, event time, and the record (empty id for timers).
#[derive(Clone, Copy)]
struct At<'a> {
    device: &'a str,
    ts: i64,
    record_id: &'a RecordId,
}

fn lifecycle(
    rule: &Rule,
    at: At<'_>,
    st: &mut DeviceRuleState,
    actions: &[Action],
    out: &mut Vec<Alert>,
) {
    // The last action of an evaluation decides; several `alert` calls raise one alarm.
    let Some(last) = actions.last() else { return };
    match last {
        Action::Alert { severity, text } => {
            let cooling = st
                .cleared_at
                .is_some_and(|cleared| at.ts - cleared < rule.cooldown_ms);
            if !st.active && !cooling {
                st.active = true;
                st.raised = Some((at.ts, severity.clone(), text.clone()));
                out.push(Alert {
                    rule: rule.id.clone(),
                    device: at.device.to_owned(),
                    ts: at.ts,
                    kind: AlertKind::Raised,
                    severity: severity.clone(),
                    text: text.clone(),
                    record_id: at.record_id.clone(),
                });
            }
        }
        Action::Clear => {
            if st.active {
                st.active = false;
                st.raised = None;
                st.cleared_at = Some(at.ts);
                out.push(Alert {
                    rule: rule.id.clone(),
                    device: at.device.to_owned(),
                    ts: at.ts,
                    kind: AlertKind::Cleared,
                    severity: "info".into(),
                    text: format!("{} cleared", rule.name),
                    record_id: at.record_id.clone(),
                });
            }
        }
    }
}

#[async_trait]
impl Evaluator for RuleEngine {
    async fn evaluate(&self, record: &Record) -> Vec<Alert> {
        let mut rules = self.applicable(record);
        if let Some(store) = &self.store {
            // Load the stored state of each applicable rule for this device on first use.
            let mut unloaded = Vec::new();
            for r in &rules {
                let key = (r.rule.id.clone(), record.device.clone());
                if self.states.lock().contains_key(&key) {
                    continue;
                }
                match store.load(&state_key(&key.0, &key.1)).await {
                    Ok(bytes) => {
                        let loaded = bytes
                            .as_deref()
                            .and_then(DeviceRuleState::decode)
                            .unwrap_or_default();
                        self.states.lock().entry(key).or_insert(loaded);
                    }
                    Err(e) => {
                        // Evaluating without the stored state could re-raise an active alarm:
                        // skip the rule for this record; the next one tries to load again.
                        warn!(rule = %key.0, device = %key.1, error = %e, "Cannot load rule state.");
                        unloaded.push(r.rule.id.clone());
                    }
                }
            }
            rules.retain(|r| !unloaded.contains(&r.rule.id));
        }
        self.evaluate_rules(record, &rules)
    }

    async fn on_timer(&self, wall_now_ms: i64) -> Vec<Alert> {
        let now = self.event_time(wall_now_ms);
        self.tick(now)
    }

    async fn flush(&self) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let dirty: Vec<(String, String)> = self.dirty.lock().drain().collect();
        let entries: Vec<(String, Vec<u8>)> = {
            let states = self.states.lock();
            dirty
                .iter()
                .filter_map(|k| states.get(k).map(|s| (state_key(&k.0, &k.1), s.encode())))
                .collect()
        };
        if let Err(e) = store.save(entries).await {
            // Keep them dirty for the retry.
            self.dirty.lock().extend(dirty);
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"plant-*-temp", b"plant-3-temp"));
        assert!(glob(b"*", b""));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"a?c", b"ac"));
        assert!(!glob(b"plant-*", b"other"));
        assert!(glob(b"*a*a*a*b", b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaab"));
        assert!(!glob(b"*a*a*a*b", &[b'a'; 5000]));
    }
}
