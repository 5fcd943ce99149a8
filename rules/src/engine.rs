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
//! - **Durable state.** With a store ([`RuleEngine::with_store`]: the embedded table in `dev`,
//!   Redis in distributed mode) the script's `state`, the alarm and the device's previous state are
//!   read from the store at the start of each batch (so a worker that took over a partition in a
//!   rebalance starts from what the previous one saved) and written back by
//!   [`Evaluator::flush`] before the batch is committed: restarts and rebalances neither re-fire
//!   nor forget. Active alarms are also indexed under `alarm/{rule}/{device}` for
//!   `GET /v1/alarms` ([`stored_alarms`]).
//! - **Timers** run, for each (rule, device), on the worker that last evaluated a record of that
//!   device (stamped in the stored state), so a partition moved in a rebalance is not timed twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use iotpipe_pipeline::change::{self, LatestState};
use iotpipe_pipeline::kv::{KeyValue, KvWrite};
use iotpipe_pipeline::metrics::Metrics;
use iotpipe_pipeline::record::{Record, RecordId};
use iotpipe_pipeline::registry::CachedRegistry;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::sandbox::{Action, Compiled, Input, MetricKeys, Prepared, RuleError, Sandbox};
use crate::{Alert, AlertKind, Evaluator};

/// Which devices a rule applies to (always within its owner's devices).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// Every device of the owner.
    #[default]
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
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique id (`[A-Za-z0-9._-]`, at most 128 characters).
    pub id: String,
    /// Name for people.
    #[serde(default)]
    pub name: String,
    /// The user who owns it.
    pub owner: String,
    /// Which of the owner's devices it applies to.
    #[serde(default)]
    pub selector: Selector,
    /// The Rhai script.
    pub script: String,
    /// Severity of `alert(text)` (a script may name another with `alert(severity, text)`).
    #[serde(default = "default_severity")]
    pub severity: String,
    /// Webhooks that receive the rule's alerts.
    #[serde(default)]
    pub notify: Vec<Webhook>,
    /// Cooldown after a clear before the same alarm may be raised again, ms of event time.
    #[serde(default)]
    pub cooldown_ms: i64,
    /// Whether it runs.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Version, set by whoever stores it (the API: the update time); a worker never replaces a
    /// rule with an older version.
    #[serde(default)]
    pub version: i64,
}

fn default_severity() -> String {
    "warning".into()
}

fn enabled_by_default() -> bool {
    true
}

impl Default for Rule {
    fn default() -> Self {
        Self {
            id: String::new(),
            name: String::new(),
            owner: String::new(),
            selector: Selector::All,
            script: String::new(),
            severity: default_severity(),
            notify: Vec::new(),
            cooldown_ms: 0,
            enabled: true,
            version: 0,
        }
    }
}

impl Rule {
    /// Checks the fields a script compile does not: id syntax, severity, webhooks.
    ///
    /// # Errors
    /// What is wrong, for people.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty()
            || self.id.len() > 128
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err("id must be 1-128 of [A-Za-z0-9._-]".into());
        }
        if self.owner.is_empty() {
            return Err("owner must be set".into());
        }
        if self.script.trim().is_empty() {
            return Err("script must not be empty".into());
        }
        if self.severity.is_empty() || self.severity.len() > 32 {
            return Err("severity must be 1-32 characters".into());
        }
        if self.notify.len() > 8 {
            return Err("at most 8 webhooks per rule".into());
        }
        for w in &self.notify {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://"))
                || w.url.len() > 2048
            {
                return Err(format!(
                    "webhook url `{}` must be http(s)://, at most 2048 characters",
                    w.url
                ));
            }
        }
        if self.cooldown_ms < 0 {
            return Err("cooldown_ms must not be negative".into());
        }
        Ok(())
    }
}

/// A webhook target: alerts are POSTed to `url` as JSON, signed with `secret` (HMAC-SHA256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Signing secret; never returned by the API.
    #[serde(default)]
    pub secret: String,
}

/// A change of a rule, as the rules topic carries it: the new version, or a removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleEvent {
    /// Rule id.
    pub id: String,
    /// Version of the change.
    pub version: i64,
    /// The rule; `None` when it was removed.
    pub rule: Option<Rule>,
}

/// Device -> owner, as far as rules are concerned.
#[async_trait]
pub trait DeviceOwners: Send + Sync + 'static {
    /// The owner of `device`, if it has one.
    ///
    /// # Errors
    /// A description when the registry cannot be read (the batch is retried).
    async fn owner_of(&self, device: &str) -> Result<Option<String>, String>;
}

/// A fixed map of owners (tests, tools).
#[derive(Debug, Default, Clone)]
pub struct StaticOwners(pub HashMap<String, String>);

/// One owner for every device (`iotpipe rules test|backtest`).
#[derive(Debug, Clone)]
pub struct SingleOwner(pub String);

#[async_trait]
impl DeviceOwners for SingleOwner {
    async fn owner_of(&self, _device: &str) -> Result<Option<String>, String> {
        Ok(Some(self.0.clone()))
    }
}

#[async_trait]
impl DeviceOwners for StaticOwners {
    async fn owner_of(&self, device: &str) -> Result<Option<String>, String> {
        Ok(self.0.get(device).cloned())
    }
}

#[async_trait]
impl DeviceOwners for CachedRegistry {
    async fn owner_of(&self, device: &str) -> Result<Option<String>, String> {
        CachedRegistry::owner_of(self, device)
            .await
            .map_err(|e| e.to_string())
    }
}

struct Loaded {
    rule: Rule,
    compiled: Compiled,
    failures: AtomicU32,
    disabled: AtomicBool,
    /// Its evaluation counter, looked up once (not per evaluation).
    evaluations: Option<prometheus::IntCounter>,
}

/// Only rules that mention `tick` run on the timer, so a plain threshold rule
/// (`if t > 30 { alert(..) } else { clear() }`) is never cleared by a tick.
fn runs_on_timer(r: &Loaded) -> bool {
    r.compiled.uses_tick()
}

impl Loaded {
    fn runs_for(&self, owner: Option<&str>, device: &str) -> bool {
        self.rule.enabled
            && !self.disabled.load(Ordering::Relaxed)
            && owner == Some(self.rule.owner.as_str())
            && self.rule.selector.matches(device)
    }
}

#[derive(Default)]
struct DeviceRuleState {
    state: rhai::Map,
    active: bool,
    cleared_at: Option<i64>,
    /// What the active alarm was raised with: (ts, severity, text).
    raised: Option<(i64, String, String)>,
    /// The worker that last evaluated a record of the device for this rule (runs its timers).
    worker: String,
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
        serde_json::json!({"state": state, "active": self.active, "cleared_at": self.cleared_at,
            "raised": self.raised, "worker": self.worker})
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
            worker: v["worker"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

type Key = (String, String);

fn state_key(rule: &str, device: &str) -> String {
    format!("rule-state/{rule}/{device}")
}

fn alarm_key(rule: &str, device: &str) -> String {
    format!("alarm/{rule}/{device}")
}

fn prev_key(device: &str) -> String {
    format!("prev/{device}")
}

/// Key of a stored rule definition (`rule/{id}`).
pub fn rule_key(id: &str) -> String {
    format!("rule/{id}")
}

/// The active alarms stored in `kv` (of `owner` only, when given), sorted by rule and device.
///
/// # Errors
/// A description when the store fails.
pub async fn stored_alarms(
    kv: &dyn KeyValue,
    owner: Option<&str>,
) -> Result<Vec<ActiveAlarm>, String> {
    let rows = kv.scan_prefix("alarm/").await.map_err(|e| e.to_string())?;
    let mut out: Vec<ActiveAlarm> = rows
        .iter()
        .filter_map(|(_, v)| serde_json::from_slice::<ActiveAlarm>(v).ok())
        .filter(|a| owner.is_none_or(|o| o == a.owner))
        .collect();
    out.sort_by(|a, b| (&a.rule, &a.device).cmp(&(&b.rule, &b.device)));
    Ok(out)
}

/// The rule definitions stored in `kv` (under `rule/`).
///
/// # Errors
/// A description when the store fails; undecodable entries are skipped with a warning.
pub async fn stored_rules(kv: &dyn KeyValue) -> Result<Vec<Rule>, String> {
    let rows = kv.scan_prefix("rule/").await.map_err(|e| e.to_string())?;
    Ok(rows
        .iter()
        .filter_map(|(k, v)| match serde_json::from_slice::<Rule>(v) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(key = %k, error = %e, "Skipped an undecodable stored rule.");
                None
            }
        })
        .collect())
}

/// What one batch runs on one device: its rules, the metrics they read, whether they read `prev`.
struct DevicePlan {
    rules: Vec<Arc<Loaded>>,
    keys: MetricKeys,
    uses_prev: bool,
}

impl DevicePlan {
    fn new(rules: Vec<Arc<Loaded>>) -> Self {
        let mut keys = MetricKeys::Keys(Vec::new());
        for r in &rules {
            keys.union(r.compiled.metric_keys());
        }
        let uses_prev = rules.iter().any(|r| r.compiled.uses_prev());
        Self {
            rules,
            keys,
            uses_prev,
        }
    }
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
    removed: Mutex<HashMap<String, i64>>,
    forgotten: Mutex<Vec<String>>,
    states: Mutex<HashMap<Key, DeviceRuleState>>,
    /// The device's latest state as the materializer computes it ([`change::merge`]), kept for
    /// devices whose rules read `prev`.
    prev: Mutex<HashMap<String, LatestState>>,
    max_consecutive_failures: u32,
    failures: Mutex<Vec<Failure>>,
    store: Option<Arc<dyn KeyValue>>,
    metrics: Option<Arc<Metrics>>,
    instance: String,
    dirty: Mutex<HashSet<Key>>,
    dirty_prev: Mutex<HashSet<String>>,
    watermark: AtomicI64,
    watermark_seen_at: AtomicI64,
}

/// Runs `f` where blocking is allowed: on a multi-threaded runtime the worker thread hands its
/// other tasks over first (`block_in_place`), so many or slow rules never stall other operators.
fn blocking_section<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
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
            removed: Mutex::new(HashMap::new()),
            forgotten: Mutex::new(Vec::new()),
            states: Mutex::new(HashMap::new()),
            prev: Mutex::new(HashMap::new()),
            max_consecutive_failures: max_consecutive_failures.max(1),
            failures: Mutex::new(Vec::new()),
            store: None,
            metrics: None,
            instance: "local".into(),
            dirty: Mutex::new(HashSet::new()),
            dirty_prev: Mutex::new(HashSet::new()),
            watermark: AtomicI64::new(i64::MIN),
            watermark_seen_at: AtomicI64::new(0),
        }
    }

    /// Keeps rule state, alarms and previous device state in `store`: read at the start of each
    /// batch, written by [`Evaluator::flush`].
    #[must_use]
    pub fn with_store(mut self, store: Arc<dyn KeyValue>) -> Self {
        self.store = Some(store);
        self
    }

    /// Exports per-rule metrics.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Names this worker (timers run on the worker that last saw the device).
    #[must_use]
    pub fn with_instance(mut self, instance: &str) -> Self {
        instance.clone_into(&mut self.instance);
        self
    }

    /// The active alarms held in memory (of `owner` only, when given), sorted by rule and device.
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
                Some(alarm_of(rule, rule_owner, device, st))
            })
            .collect();
        out.sort_by(|a, b| (&a.rule, &a.device).cmp(&(&b.rule, &b.device)));
        out
    }

    /// Loads every stored rule state (at start-up), so that timers run for devices that have
    /// gone silent since, and active alarms are known before the devices report again.
    ///
    /// # Errors
    /// A description when the store fails.
    pub async fn preload(&self) -> Result<usize, String> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let all = store
            .scan_prefix("rule-state/")
            .await
            .map_err(|e| e.to_string())?;
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

    /// Loads every rule stored under `rule/` in the engine's store (at start-up); returns how
    /// many compiled.
    ///
    /// # Errors
    /// A description when the store fails.
    pub async fn load_stored_rules(&self) -> Result<usize, String> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let mut n = 0;
        for rule in stored_rules(store.as_ref()).await? {
            let id = rule.id.clone();
            match self.upsert(rule) {
                Ok(_) => n += 1,
                Err(e) => warn!(rule = %id, error = %e, "Stored rule does not compile."),
            }
        }
        Ok(n)
    }

    /// Adds or replaces a rule (by id), compiling its script once. A version older than the one
    /// loaded (or than its removal) is ignored: returns `Ok(false)`.
    ///
    /// # Errors
    /// [`RuleError::Compile`] when the script does not compile; the old version stays.
    pub fn upsert(&self, rule: Rule) -> Result<bool, RuleError> {
        if self
            .removed
            .lock()
            .get(&rule.id)
            .is_some_and(|v| *v >= rule.version && rule.version != 0)
        {
            return Ok(false);
        }
        if self
            .rules
            .read()
            .iter()
            .any(|r| r.rule.id == rule.id && r.rule.version > rule.version)
        {
            return Ok(false);
        }
        let compiled = self.sandbox.compile(&rule.script)?;
        let loaded = Arc::new(Loaded {
            evaluations: self
                .metrics
                .as_ref()
                .map(|m| m.rule_evaluations.with_label_values(&[&rule.id])),
            rule,
            compiled,
            failures: AtomicU32::new(0),
            disabled: AtomicBool::new(false),
        });
        if let Some(m) = &self.metrics {
            m.rule_disabled.with_label_values(&[&loaded.rule.id]).set(0);
        }
        let mut rules = self.rules.write();
        rules.retain(|r| r.rule.id != loaded.rule.id);
        info!(rule = %loaded.rule.id, owner = %loaded.rule.owner, version = loaded.rule.version, "Rule loaded.");
        rules.push(loaded);
        self.set_loaded_gauge(rules.len());
        Ok(true)
    }

    fn set_loaded_gauge(&self, n: usize) {
        if let Some(m) = &self.metrics {
            m.rules_loaded.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Removes a rule and its state (the stored state and alarms go at the next flush).
    pub fn remove(&self, id: &str) {
        self.remove_version(id, 0);
    }

    fn remove_version(&self, id: &str, version: i64) {
        {
            let mut rules = self.rules.write();
            if rules
                .iter()
                .any(|r| r.rule.id == id && r.rule.version > version)
            {
                return;
            }
            rules.retain(|r| r.rule.id != id);
            self.set_loaded_gauge(rules.len());
        }
        if version != 0 {
            self.removed.lock().insert(id.to_owned(), version);
        }
        self.states.lock().retain(|(rule, _), _| rule != id);
        self.dirty.lock().retain(|(rule, _)| rule != id);
        self.forgotten.lock().push(id.to_owned());
        if let Some(m) = &self.metrics {
            let _ = m.rule_disabled.remove_label_values(&[id]);
        }
    }

    /// Applies a change from the rules topic or store: newer versions replace older ones.
    ///
    /// # Errors
    /// [`RuleError::Compile`] when the new script does not compile (the old version stays).
    pub fn apply_event(&self, event: &RuleEvent) -> Result<bool, RuleError> {
        match &event.rule {
            Some(rule) => self.upsert(rule.clone()),
            None => {
                self.remove_version(&event.id, event.version.max(1));
                Ok(true)
            }
        }
    }

    /// The loaded rule `id`.
    pub fn rule(&self, id: &str) -> Option<Rule> {
        self.rules
            .read()
            .iter()
            .find(|r| r.rule.id == id)
            .map(|r| r.rule.clone())
    }

    /// Every loaded rule, sorted by id.
    pub fn rules(&self) -> Vec<Rule> {
        let mut v: Vec<Rule> = self.rules.read().iter().map(|r| r.rule.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Whether rule `id` is currently disabled by failures.
    pub fn is_disabled(&self, id: &str) -> bool {
        self.rules
            .read()
            .iter()
            .any(|r| r.rule.id == id && r.disabled.load(Ordering::Relaxed))
    }

    /// Failures since the last call (for logs and tests).
    pub fn take_failures(&self) -> Vec<Failure> {
        std::mem::take(&mut *self.failures.lock())
    }

    /// Evaluates every applicable rule on one record; alerts, or none when the registry or store
    /// failed (logged).
    pub async fn evaluate_record(&self, record: &Record) -> Vec<Alert> {
        match self.evaluate(std::slice::from_ref(record)).await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "Rule evaluation failed.");
                Vec::new()
            }
        }
    }

    /// Replaces the in-memory state of `keys` and the previous state of `devices` with what the
    /// store holds.
    async fn reload(&self, keys: &[Key], devices: &[String]) -> Result<(), String> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        // What this engine changed and has not flushed yet is newer than the store.
        let keys: Vec<Key> = {
            let dirty = self.dirty.lock();
            keys.iter()
                .filter(|k| !dirty.contains(*k))
                .cloned()
                .collect()
        };
        let devices: Vec<String> = {
            let dirty = self.dirty_prev.lock();
            devices
                .iter()
                .filter(|d| !dirty.contains(*d))
                .cloned()
                .collect()
        };
        let mut names: Vec<String> = keys.iter().map(|(r, d)| state_key(r, d)).collect();
        names.extend(devices.iter().map(|d| prev_key(d)));
        let values = store.get_many(&names).await.map_err(|e| e.to_string())?;
        let (state_vals, prev_vals) = values.split_at(keys.len().min(values.len()));
        {
            let mut states = self.states.lock();
            for (key, v) in keys.iter().zip(state_vals) {
                let st = v
                    .as_deref()
                    .and_then(DeviceRuleState::decode)
                    .unwrap_or_default();
                states.insert(key.clone(), st);
            }
        }
        let mut prev = self.prev.lock();
        for (device, v) in devices.iter().zip(prev_vals) {
            let p = v
                .as_deref()
                .and_then(|b| serde_json::from_slice::<LatestState>(b).ok());
            match p {
                Some(p) => {
                    prev.insert(device.clone(), p);
                }
                None => {
                    prev.remove(device);
                }
            }
        }
        Ok(())
    }

    fn evaluate_rules(&self, record: &Record, plan: &DevicePlan, out: &mut Vec<Alert>) {
        if record.ts > self.watermark.fetch_max(record.ts, Ordering::Relaxed) {
            self.watermark_seen_at
                .store(iotpipe_pipeline::time::now_ms(), Ordering::Relaxed);
        }
        let at = At {
            device: &record.device,
            ts: record.ts,
            record_id: &record.id,
        };
        // Copied out of the lock only when a rule reads it.
        let prev_metrics = if plan.uses_prev {
            self.prev
                .lock()
                .get(&record.device)
                .map(LatestState::values)
        } else {
            None
        };
        let mut prepared = Sandbox::prepare_for(
            &Input {
                device: &record.device,
                ts: record.ts,
                now: record.ts,
                metrics: &record.metrics,
                prev: prev_metrics.as_ref(),
                tick: false,
            },
            &plan.keys,
        );
        for (i, r) in plan.rules.iter().enumerate() {
            let last = i + 1 == plan.rules.len();
            self.evaluate_one(r, at, &mut prepared, last, false, out);
        }
        if plan.uses_prev {
            let mut all = self.prev.lock();
            let state = all
                .entry(record.device.clone())
                .or_insert_with(|| LatestState::new(&record.device));
            if change::merge(state, record).change().is_some() {
                self.dirty_prev.lock().insert(record.device.clone());
            }
        }
    }

    /// Evaluates every rule for every device this worker times, as of event time `now`, with no
    /// record (`tick` is true, `metrics` empty): how "no data for 10 minutes" is written. The
    /// rules operator calls it every second with [`RuleEngine::event_time`].
    ///
    /// # Errors
    /// A description when the registry or the store fails.
    pub async fn tick(&self, now: i64) -> Result<Vec<Alert>, String> {
        let mine = |st: &DeviceRuleState| st.worker.is_empty() || st.worker == self.instance;
        let timed: HashSet<String> = self
            .rules
            .read()
            .iter()
            .filter(|r| runs_on_timer(r))
            .map(|r| r.rule.id.clone())
            .collect();
        let keys: Vec<Key> = self
            .states
            .lock()
            .iter()
            .filter(|(k, st)| timed.contains(&k.0) && mine(st))
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.reload(&keys, &[]).await?;
        // Another worker took over a device since: it runs the timers now.
        self.states
            .lock()
            .retain(|k, st| !timed.contains(&k.0) || mine(st));
        let rules: Vec<Arc<Loaded>> = self.rules.read().clone();
        let mut owners: HashMap<String, Option<String>> = HashMap::new();
        let mut plan = Vec::new();
        for (rule_id, device) in keys {
            let Some(r) = rules
                .iter()
                .find(|r| r.rule.id == rule_id && runs_on_timer(r))
            else {
                continue;
            };
            if !self
                .states
                .lock()
                .contains_key(&(rule_id.clone(), device.clone()))
            {
                continue;
            }
            if !owners.contains_key(&device) {
                let o = self.owners.owner_of(&device).await?;
                owners.insert(device.clone(), o);
            }
            if r.runs_for(owners[&device].as_deref(), &device) {
                plan.push((r.clone(), device));
            }
        }
        let empty = serde_json::Map::new();
        let no_record = RecordId(String::new());
        Ok(blocking_section(|| {
            let mut out = Vec::new();
            for (r, device) in &plan {
                let at = At {
                    device,
                    ts: now,
                    record_id: &no_record,
                };
                let mut prepared = Sandbox::prepare(&Input {
                    device,
                    ts: now,
                    now,
                    metrics: &empty,
                    prev: None,
                    tick: true,
                });
                self.evaluate_one(r, at, &mut prepared, true, true, &mut out);
            }
            out
        }))
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
        input: &mut Prepared<'_>,
        last: bool,
        tick: bool,
        out: &mut Vec<Alert>,
    ) {
        let key = (r.rule.id.clone(), at.device.to_owned());
        let mut states = self.states.lock();
        let st = states.entry(key.clone()).or_default();
        if let Some(c) = &r.evaluations {
            c.inc();
        }
        let before = out.len();
        let result = if last {
            self.sandbox
                .evaluate_last(&r.compiled, input, &mut st.state)
        } else {
            self.sandbox
                .evaluate_prepared(&r.compiled, input, &mut st.state)
        };
        match result {
            Ok(actions) => {
                r.failures.store(0, Ordering::Relaxed);
                if !tick {
                    self.instance.clone_into(&mut st.worker);
                }
                lifecycle(&r.rule, at, st, &actions, out);
                drop(states);
                self.dirty.lock().insert(key);
            }
            Err(error) => {
                drop(states);
                let n = r.failures.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(rule = %r.rule.id, device = %at.device, error = %error, consecutive = n, "Rule failed.");
                if let Some(m) = &self.metrics {
                    let kind = match &error {
                        RuleError::Compile { .. } => "compile".to_owned(),
                        RuleError::Runtime { kind, .. } => kind.to_string(),
                    };
                    m.rule_failures
                        .with_label_values(&[r.rule.id.as_str(), kind.as_str()])
                        .inc();
                }
                self.failures.lock().push(Failure {
                    rule: r.rule.id.clone(),
                    device: at.device.to_owned(),
                    error: error.clone(),
                });
                if n >= self.max_consecutive_failures && !r.disabled.swap(true, Ordering::Relaxed) {
                    if let Some(m) = &self.metrics {
                        m.rule_disabled.with_label_values(&[&r.rule.id]).set(1);
                    }
                    out.push(Alert {
                        rule: r.rule.id.clone(),
                        owner: r.rule.owner.clone(),
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
        if let Some(m) = &self.metrics {
            for a in &out[before..] {
                m.rule_alerts
                    .with_label_values(&[r.rule.id.as_str(), a.kind.as_str()])
                    .inc();
            }
        }
    }
}

fn alarm_of(rule: &str, owner: &str, device: &str, st: &DeviceRuleState) -> ActiveAlarm {
    let (since, severity, text) = st
        .raised
        .clone()
        .unwrap_or((0, String::new(), String::new()));
    ActiveAlarm {
        rule: rule.to_owned(),
        owner: owner.to_owned(),
        device: device.to_owned(),
        since,
        severity,
        text,
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
            let severity = if severity.is_empty() {
                rule.severity.clone()
            } else {
                severity.clone()
            };
            let cooling = st
                .cleared_at
                .is_some_and(|cleared| at.ts - cleared < rule.cooldown_ms);
            if !st.active && !cooling {
                st.active = true;
                st.raised = Some((at.ts, severity.clone(), text.clone()));
                out.push(Alert {
                    rule: rule.id.clone(),
                    owner: rule.owner.clone(),
                    device: at.device.to_owned(),
                    ts: at.ts,
                    kind: AlertKind::Raised,
                    severity,
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
                    owner: rule.owner.clone(),
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
    async fn evaluate(&self, records: &[Record]) -> Result<Vec<Alert>, String> {
        let started = Instant::now();
        let mut owners: HashMap<&str, Option<String>> = HashMap::new();
        for r in records {
            if !owners.contains_key(r.device.as_str()) {
                owners.insert(&r.device, self.owners.owner_of(&r.device).await?);
            }
        }
        // One plan per device, shared by its records.
        let rules: Vec<Arc<Loaded>> = self.rules.read().clone();
        let plans: HashMap<&str, DevicePlan> = owners
            .iter()
            .map(|(device, owner)| {
                let mine = rules
                    .iter()
                    .filter(|r| r.runs_for(owner.as_deref(), device))
                    .cloned()
                    .collect();
                (*device, DevicePlan::new(mine))
            })
            .filter(|(_, p)| !p.rules.is_empty())
            .collect();
        if self.store.is_some() && !plans.is_empty() {
            let mut keys: Vec<Key> = Vec::new();
            let mut devices: Vec<String> = Vec::new();
            for (device, plan) in &plans {
                if plan.uses_prev {
                    devices.push((*device).to_owned());
                }
                for r in &plan.rules {
                    keys.push((r.rule.id.clone(), (*device).to_owned()));
                }
            }
            self.reload(&keys, &devices).await?;
        }
        let out = blocking_section(|| {
            let mut out = Vec::new();
            for rec in records {
                if let Some(plan) = plans.get(rec.device.as_str()) {
                    self.evaluate_rules(rec, plan, &mut out);
                }
            }
            out
        });
        if let Some(m) = &self.metrics {
            m.rule_batch_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(out)
    }

    async fn on_timer(&self, wall_now_ms: i64) -> Result<Vec<Alert>, String> {
        let now = self.event_time(wall_now_ms);
        self.tick(now).await
    }

    async fn flush(&self) -> Result<(), String> {
        let Some(store) = &self.store else {
            self.dirty.lock().clear();
            self.dirty_prev.lock().clear();
            return Ok(());
        };
        let dirty: Vec<Key> = self.dirty.lock().drain().collect();
        let dirty_prev: Vec<String> = self.dirty_prev.lock().drain().collect();
        let forgotten: Vec<String> = std::mem::take(&mut *self.forgotten.lock());
        let owners: HashMap<String, String> = self
            .rules
            .read()
            .iter()
            .map(|r| (r.rule.id.clone(), r.rule.owner.clone()))
            .collect();
        let mut writes = Vec::new();
        for id in &forgotten {
            for prefix in [format!("rule-state/{id}/"), format!("alarm/{id}/")] {
                match store.scan_prefix(&prefix).await {
                    Ok(rows) => writes.extend(rows.into_iter().map(|(k, _)| KvWrite::Delete(k))),
                    Err(e) => {
                        self.forgotten.lock().extend(forgotten.iter().cloned());
                        self.dirty.lock().extend(dirty);
                        self.dirty_prev.lock().extend(dirty_prev);
                        return Err(e.to_string());
                    }
                }
            }
        }
        {
            let states = self.states.lock();
            for k in &dirty {
                let Some(st) = states.get(k) else { continue };
                writes.push(KvWrite::Put(state_key(&k.0, &k.1), st.encode()));
                let alarm = alarm_key(&k.0, &k.1);
                match (st.active, owners.get(&k.0)) {
                    (true, Some(owner)) => {
                        let a = alarm_of(&k.0, owner, &k.1, st);
                        writes.push(KvWrite::Put(
                            alarm,
                            serde_json::to_vec(&a).unwrap_or_default(),
                        ));
                    }
                    _ => writes.push(KvWrite::Delete(alarm)),
                }
            }
            let prev = self.prev.lock();
            for d in &dirty_prev {
                if let Some(p) = prev.get(d) {
                    writes.push(KvWrite::Put(
                        prev_key(d),
                        serde_json::to_vec(p).unwrap_or_default(),
                    ));
                }
            }
        }
        if let Err(e) = store.apply(writes).await {
            // The batch will be retried from the stored state: forget what it changed in memory,
            // so the retry does not apply it twice (a counter counting one record twice).
            self.forgotten.lock().extend(forgotten);
            let mut states = self.states.lock();
            for k in &dirty {
                states.remove(k);
            }
            let mut prev = self.prev.lock();
            for d in &dirty_prev {
                prev.remove(d);
            }
            return Err(e.to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_rules_are_those_that_mention_tick() {
        let mentions_tick = |s: &str| crate::sandbox::mentions(s, "tick");
        assert!(mentions_tick("if tick { alert(\"x\") }"));
        assert!(mentions_tick("let a = !tick;"));
        assert!(!mentions_tick("state.ticks += 1; let stick = 1;"));
        assert!(!mentions_tick(
            "if metrics.t > 30 { alert(\"hot\") } else { clear() }"
        ));
    }

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
