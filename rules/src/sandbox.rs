//! The sandbox that runs user-written Rhai rules: untrusted code that must never stall the
//! pipeline, read another user's data, touch files or the network, or take unbounded memory.
//!
//! It starts from `Engine::new_raw()` (no packages, no module resolver) and adds only what rules
//! need: arithmetic, logic, strings, math, arrays, maps, ranges and iteration. Modules are compiled out (`no_module`:
//! `import` is a syntax error), `eval` is disabled, every limit is set explicitly (see [`Limits`]),
//! variables are strict (a typo is a compile error with line and column, not a silent `()`), and a
//! wall-clock deadline per evaluation is enforced from the progress callback.
//!
//! A rule sees, per record: `device` (string), `ts` (device time, ms), `metrics` (map), `prev`
//! (the device's previous latest state as a map, or `()`), `now` (event time, ms) and `state` (a
//! map the rule owns per device, kept between evaluations: counters, "since" timestamps,
//! hysteresis). It acts with `alert(severity, text)` and `clear()`. A missing metric reads as
//! `()`; `metrics.temperature ?? 0` or `"temperature" in metrics` handle it.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicIteratorPackage, BasicMapPackage, BasicMathPackage,
    BasicStringPackage, LanguageCorePackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, Map, Position, Scope, AST};
use serde::{Deserialize, Serialize};

/// Every resource limit of a rule evaluation. The defaults suit one short condition per record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most Rhai operations per evaluation.
    pub max_operations: u64,
    /// Deepest function-call nesting.
    pub max_call_levels: usize,
    /// Deepest expression nesting (at compile time).
    pub max_expr_depth: usize,
    /// Deepest expression nesting inside functions (at compile time).
    pub max_function_expr_depth: usize,
    /// Longest string, in bytes (literals included).
    pub max_string_size: usize,
    /// Most elements of one array.
    pub max_array_size: usize,
    /// Most entries of one map (the `state` map included).
    pub max_map_size: usize,
    /// Most variables in scope.
    pub max_variables: usize,
    /// Most functions a script may define.
    pub max_functions: usize,
    /// Wall-clock deadline of one evaluation, in microseconds.
    pub deadline_us: u64,
    /// Largest `state` a rule may keep per device, in bytes of JSON.
    pub max_state_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_operations: 100_000,
            max_call_levels: 16,
            max_expr_depth: 32,
            max_function_expr_depth: 16,
            max_string_size: 4096,
            max_array_size: 1024,
            max_map_size: 256,
            max_variables: 128,
            max_functions: 32,
            deadline_us: 20_000,
            max_state_bytes: 8192,
        }
    }
}

/// What a rule did in one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `alert(severity, text)` or `alert(text)`: the condition holds.
    Alert {
        /// Severity chosen by the script; empty for `alert(text)` (the rule's severity applies).
        severity: String,
        /// Text for people.
        text: String,
    },
    /// `clear()`: the condition ended.
    Clear,
}

/// How a rule failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The script does not compile.
    #[error("{line}:{column}: {message}")]
    Compile {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The script failed while running.
    #[error("{kind}: {message}")]
    Runtime {
        /// Which limit or error.
        kind: RuntimeKind,
        /// Details, with the position in the script.
        message: String,
    },
}

/// Kinds of runtime failure, for metrics and for the rule's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// The wall-clock deadline passed.
    Deadline,
    /// `max_operations` reached.
    TooManyOperations,
    /// `max_call_levels` reached.
    StackOverflow,
    /// A string, array or map grew past its limit.
    DataTooLarge,
    /// Overflow, division by zero and the like.
    Arithmetic,
    /// A function that does not exist (or is disabled, like `eval`).
    FunctionNotFound,
    /// Anything else (type mismatch, bad index, ...).
    Other,
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Deadline => "deadline",
            Self::TooManyOperations => "too_many_operations",
            Self::StackOverflow => "stack_overflow",
            Self::DataTooLarge => "data_too_large",
            Self::Arithmetic => "arithmetic",
            Self::FunctionNotFound => "function_not_found",
            Self::Other => "other",
        };
        f.write_str(s)
    }
}

/// A compiled rule script.
#[derive(Debug, Clone)]
pub struct Compiled {
    ast: AST,
    /// Which of [`VARIABLES`] the script mentions (by name, conservatively): only those are set
    /// up per evaluation.
    uses: [bool; 7],
    metric_keys: MetricKeys,
}

impl Compiled {
    /// Whether the script mentions `prev` (so the device's previous state must be prepared).
    pub fn uses_prev(&self) -> bool {
        self.uses[4]
    }

    /// Whether the script mentions `tick` (a timer rule).
    pub fn uses_tick(&self) -> bool {
        self.uses[6]
    }

    /// Which metrics the script reads.
    pub fn metric_keys(&self) -> &MetricKeys {
        &self.metric_keys
    }
}

/// Which of a record's metrics a script reads: only those are converted for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricKeys {
    /// The whole map (the script iterates it, tests membership, passes it on, ...).
    All,
    /// Only these keys (`metrics.temp`, `metrics["temp"]`, `metrics?.temp`).
    Keys(Vec<String>),
}

impl MetricKeys {
    /// What two scripts on the same record need together.
    pub fn union(&mut self, other: &Self) {
        match (&mut *self, other) {
            (Self::All, _) => {}
            (_, Self::All) => *self = Self::All,
            (Self::Keys(a), Self::Keys(b)) => {
                for k in b {
                    if !a.contains(k) {
                        a.push(k.clone());
                    }
                }
            }
        }
    }

    /// Scans a script for its uses of `metrics`; anything but a plain key read means all.
    fn of(source: &str) -> Self {
        let b = source.as_bytes();
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        let mut keys: Vec<String> = Vec::new();
        for (i, _) in source.match_indices("metrics") {
            let end = i + "metrics".len();
            if (i > 0 && ident(b[i - 1])) || b.get(end).is_some_and(|c| ident(*c)) {
                continue;
            }
            let rest = &source[end..];
            let key = if let Some(r) = rest.strip_prefix('.').or_else(|| rest.strip_prefix("?.")) {
                let n = r.bytes().take_while(|c| ident(*c)).count();
                let after = r[n..].trim_start();
                // `metrics.keys()` is a method call, not a key.
                (n > 0 && !after.starts_with('(')).then(|| r[..n].to_owned())
            } else if let Some(r) = rest
                .strip_prefix("[\"")
                .or_else(|| rest.strip_prefix("?[\""))
            {
                r.find('"')
                    .map(|q| &r[..q])
                    .filter(|k| !k.contains('\\') && !k.contains('$'))
                    .map(str::to_owned)
            } else {
                None
            };
            match key {
                Some(k) => {
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
                None => return Self::All,
            }
        }
        Self::Keys(keys)
    }
}

/// Whether `name` appears in `source` as a whole identifier (a comment or string counts too,
/// which only costs a variable set up for nothing).
pub(crate) fn mentions(source: &str, name: &str) -> bool {
    let b = source.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    source.match_indices(name).any(|(i, _)| {
        (i == 0 || !ident(b[i - 1])) && b.get(i + name.len()).is_none_or(|c| !ident(*c))
    })
}

/// The input of one evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Device id.
    pub device: &'a str,
    /// Device ts of the record, epoch ms.
    pub ts: i64,
    /// Event time of the evaluation (the record's ts; for timer evaluations, the timer's time).
    pub now: i64,
    /// The record's metrics (empty for timer evaluations).
    pub metrics: &'a serde_json::Map<String, serde_json::Value>,
    /// The device's previous latest state.
    pub prev: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// True for a timer evaluation (no record; `metrics` is empty).
    pub tick: bool,
}

thread_local! {
    // Evaluations are synchronous on one thread: the deadline and the actions of the current one
    // live here, so the engine-wide callbacks can reach them.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    static ACTIONS: RefCell<Vec<Action>> = const { RefCell::new(Vec::new()) };
    // One scope per thread, rewound for each evaluation: no allocation per evaluation.
    static SCOPE: RefCell<Scope<'static>> = RefCell::new(Scope::new());
}

/// The rule sandbox: one engine, shared by every rule.
pub struct Sandbox {
    engine: Engine,
    limits: Limits,
}

const VARIABLES: [&str; 7] = ["device", "ts", "now", "metrics", "prev", "state", "tick"];

impl Sandbox {
    /// Builds the engine with `limits`.
    pub fn new(limits: Limits) -> Self {
        let mut engine = Engine::new_raw();
        for module in [
            LanguageCorePackage::new().as_shared_module(),
            ArithmeticPackage::new().as_shared_module(),
            LogicPackage::new().as_shared_module(),
            BasicStringPackage::new().as_shared_module(),
            MoreStringPackage::new().as_shared_module(),
            BasicMathPackage::new().as_shared_module(),
            BasicArrayPackage::new().as_shared_module(),
            BasicMapPackage::new().as_shared_module(),
            BasicIteratorPackage::new().as_shared_module(),
        ] {
            engine.register_global_module(module);
        }
        engine
            .set_max_operations(limits.max_operations)
            .set_max_call_levels(limits.max_call_levels)
            .set_max_expr_depths(limits.max_expr_depth, limits.max_function_expr_depth)
            .set_max_string_size(limits.max_string_size)
            .set_max_array_size(limits.max_array_size)
            .set_max_map_size(limits.max_map_size)
            .set_max_variables(limits.max_variables)
            .set_max_functions(limits.max_functions)
            .set_strict_variables(true);
        engine.disable_symbol("eval");
        engine.on_progress(|ops| {
            // Checking the clock every 256 operations keeps the check cheap.
            if ops % 256 == 0 {
                if let Some(deadline) = DEADLINE.with(Cell::get) {
                    if Instant::now() > deadline {
                        return Some(Dynamic::from("deadline"));
                    }
                }
            }
            None
        });
        engine.register_fn("alert", |severity: &str, text: &str| {
            ACTIONS.with(|a| {
                a.borrow_mut().push(Action::Alert {
                    severity: severity.to_owned(),
                    text: text.to_owned(),
                })
            });
        });
        engine.register_fn("alert", |text: &str| {
            ACTIONS.with(|a| {
                a.borrow_mut().push(Action::Alert {
                    severity: String::new(),
                    text: text.to_owned(),
                })
            });
        });
        engine.register_fn("clear", || {
            ACTIONS.with(|a| a.borrow_mut().push(Action::Clear))
        });
        Self { engine, limits }
    }

    fn scope_template() -> Scope<'static> {
        let mut scope = Scope::new();
        for v in VARIABLES {
            scope.push(v, Dynamic::UNIT);
        }
        scope
    }

    /// Compiles a rule script.
    ///
    /// # Errors
    /// [`RuleError::Compile`] with line and column.
    pub fn compile(&self, source: &str) -> Result<Compiled, RuleError> {
        let scope = Self::scope_template();
        self.engine
            .compile_with_scope(&scope, source)
            .map(|ast| Compiled {
                ast,
                uses: VARIABLES.map(|v| mentions(source, v)),
                metric_keys: MetricKeys::of(source),
            })
            .map_err(|e| {
                let (line, column) = (e.1.line().unwrap_or(0), e.1.position().unwrap_or(0));
                RuleError::Compile {
                    line,
                    column,
                    message: e.0.to_string(),
                }
            })
    }

    /// Converts a record's values for the script once; evaluate any number of rules on it with
    /// [`Sandbox::evaluate_prepared`].
    pub fn prepare<'a>(input: &Input<'a>) -> Prepared<'a> {
        Self::prepare_for(input, &MetricKeys::All)
    }

    /// Like [`Sandbox::prepare`], converting only the metrics `keys` names (what the rules to
    /// be run on it read, see [`Compiled::metric_keys`]).
    pub fn prepare_for<'a>(input: &Input<'a>, keys: &MetricKeys) -> Prepared<'a> {
        let metrics = match keys {
            MetricKeys::All => map_to_dynamic(input.metrics),
            MetricKeys::Keys(keys) => {
                let mut m = Map::new();
                for k in keys {
                    if let Some(v) = input.metrics.get(k) {
                        m.insert(k.as_str().into(), json_to_dynamic(v));
                    }
                }
                Dynamic::from_map(m)
            }
        };
        Prepared {
            device_id: input.device,
            device: std::cell::OnceCell::new(),
            ts: input.ts,
            now: input.now,
            tick: input.tick,
            // Converted once; each rule gets its own copy (a shared value would let one rule
            // change what the next one sees), pushed as a constant.
            metrics,
            prev: input.prev.map_or(Dynamic::UNIT, map_to_dynamic),
        }
    }

    /// Runs `rule` on `input`; `state` is the rule's per-device map, updated in place.
    ///
    /// # Errors
    /// [`RuleError::Runtime`] when the script fails or hits a limit; `state` is then unchanged.
    pub fn evaluate(
        &self,
        rule: &Compiled,
        input: &Input<'_>,
        state: &mut Map,
    ) -> Result<Vec<Action>, RuleError> {
        self.evaluate_prepared(rule, &Self::prepare(input), state)
    }

    /// Runs `rule` on prepared input (see [`Sandbox::prepare`]).
    ///
    /// # Errors
    /// [`RuleError::Runtime`] when the script fails or hits a limit; `state` is then unchanged.
    pub fn evaluate_prepared(
        &self,
        rule: &Compiled,
        input: &Prepared<'_>,
        state: &mut Map,
    ) -> Result<Vec<Action>, RuleError> {
        self.run(rule, input, None, state)
    }

    /// Like [`Sandbox::evaluate_prepared`] for the last rule evaluated on a record: its values
    /// are moved into the script instead of copied.
    ///
    /// # Errors
    /// [`RuleError::Runtime`] when the script fails or hits a limit; `state` is then unchanged.
    pub fn evaluate_last(
        &self,
        rule: &Compiled,
        input: &mut Prepared<'_>,
        state: &mut Map,
    ) -> Result<Vec<Action>, RuleError> {
        let metrics = std::mem::take(&mut input.metrics);
        self.run(rule, input, Some(metrics), state)
    }

    fn run(
        &self,
        rule: &Compiled,
        input: &Prepared<'_>,
        metrics: Option<Dynamic>,
        state: &mut Map,
    ) -> Result<Vec<Action>, RuleError> {
        // An empty state (most rules) needs no copy to restore after a failure.
        let original = (!state.is_empty()).then(|| state.clone());
        let (result, new_state) = SCOPE.with(|cell| {
            let mut scope = cell.borrow_mut();
            scope.rewind(0);
            // Only what the script mentions, in the order of VARIABLES (compiled against).
            let u = rule.uses;
            if u[0] {
                let d = input
                    .device
                    .get_or_init(|| Dynamic::from(ImmutableString::from(input.device_id)));
                scope.push_dynamic("device", d.clone());
            }
            if u[1] {
                scope.push("ts", input.ts);
            }
            if u[2] {
                scope.push("now", input.now);
            }
            if u[3] {
                let m = metrics.unwrap_or_else(|| input.metrics.clone());
                scope.push_constant_dynamic("metrics", m);
            }
            if u[4] {
                scope.push_constant_dynamic("prev", input.prev.clone());
            }
            if u[5] {
                scope.push("state", std::mem::take(state));
            }
            if u[6] {
                scope.push("tick", input.tick);
            }
            DEADLINE.with(|d| {
                d.set(Some(
                    Instant::now() + Duration::from_micros(self.limits.deadline_us),
                ))
            });
            ACTIONS.with(|a| a.borrow_mut().clear());
            let result = self.engine.run_ast_with_scope(&mut scope, &rule.ast);
            DEADLINE.with(|d| d.set(None));
            // A script that never mentions `state` leaves it as it was.
            let new_state = if u[5] {
                scope
                    .get_mut("state")
                    .map(std::mem::take)
                    .and_then(Dynamic::try_cast::<Map>)
            } else {
                Some(std::mem::take(state))
            };
            scope.rewind(0);
            (result, new_state)
        });
        let actions = ACTIONS.with(|a| std::mem::take(&mut *a.borrow_mut()));
        let restore = |state: &mut Map| *state = original.clone().unwrap_or_default();
        if let Err(e) = result {
            restore(state);
            return Err(runtime_error(&e));
        }
        let Some(new_state) = new_state else {
            restore(state);
            return Err(RuleError::Runtime {
                kind: RuntimeKind::Other,
                message: "`state` must stay a map".into(),
            });
        };
        // The state outlives the evaluation (it is stored per rule and device), so its size is
        // checked here too: within one evaluation the limits above bound it, across evaluations
        // only this does.
        let bytes = json_size(&new_state);
        if new_state.len() > self.limits.max_map_size || bytes > self.limits.max_state_bytes {
            restore(state);
            return Err(RuleError::Runtime {
                kind: RuntimeKind::DataTooLarge,
                message: format!(
                    "`state` would hold {} entries / about {bytes} bytes; the limits are {} / {}",
                    new_state.len(),
                    self.limits.max_map_size,
                    self.limits.max_state_bytes
                ),
            });
        }
        *state = new_state;
        Ok(actions)
    }
}

/// A record's values converted for scripts, shared by every rule evaluated on it.
#[derive(Debug, Clone)]
pub struct Prepared<'a> {
    device_id: &'a str,
    /// The device id as a script string, made on first use (most rules never read it).
    device: std::cell::OnceCell<Dynamic>,
    ts: i64,
    now: i64,
    tick: bool,
    metrics: Dynamic,
    prev: Dynamic,
}

fn map_to_dynamic(m: &serde_json::Map<String, serde_json::Value>) -> Dynamic {
    // Inserted one by one: JSON maps come sorted, and `collect` would sort again.
    let mut out = Map::new();
    for (k, v) in m {
        out.insert(k.as_str().into(), json_to_dynamic(v));
    }
    Dynamic::from_map(out)
}

/// JSON to a script value directly (no serde round trip): integers stay integers, other numbers
/// are floats, null is `()`.
fn json_to_dynamic(v: &serde_json::Value) -> Dynamic {
    use serde_json::Value;
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(ImmutableString::from(s.as_str())),
        Value::Array(a) => Dynamic::from_array(a.iter().map(json_to_dynamic).collect()),
        Value::Object(o) => map_to_dynamic(o),
    }
}

/// About how many bytes `m` takes as JSON (exact for plain values; a bound for the size limit,
/// computed without serializing).
fn json_size(m: &Map) -> usize {
    fn size(v: &Dynamic) -> usize {
        if v.is_unit() {
            4
        } else if let Ok(b) = v.as_bool() {
            if b {
                4
            } else {
                5
            }
        } else if v.is_int() || v.is_float() {
            20
        } else if let Some(s) = v.read_lock::<ImmutableString>() {
            s.len() + 2
        } else if let Some(a) = v.read_lock::<rhai::Array>() {
            2 + a.iter().map(|x| size(x) + 1).sum::<usize>()
        } else if let Some(m) = v.read_lock::<Map>() {
            json_size(&m)
        } else {
            v.to_string().len() + 2
        }
    }
    2 + m.iter().map(|(k, v)| k.len() + 4 + size(v)).sum::<usize>()
}

fn runtime_error(e: &EvalAltResult) -> RuleError {
    let kind = match e {
        EvalAltResult::ErrorTerminated(..) => RuntimeKind::Deadline,
        EvalAltResult::ErrorTooManyOperations(..) => RuntimeKind::TooManyOperations,
        EvalAltResult::ErrorStackOverflow(..) => RuntimeKind::StackOverflow,
        EvalAltResult::ErrorDataTooLarge(..) => RuntimeKind::DataTooLarge,
        EvalAltResult::ErrorArithmetic(..) => RuntimeKind::Arithmetic,
        EvalAltResult::ErrorFunctionNotFound(..) => RuntimeKind::FunctionNotFound,
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => return runtime_error(inner),
        _ => RuntimeKind::Other,
    };
    let pos: Position = e.position();
    let at = match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!(" (at {l}:{c})"),
        _ => String::new(),
    };
    RuleError::Runtime {
        kind,
        message: format!("{e}{at}"),
    }
}
