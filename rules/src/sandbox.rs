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
use rhai::{Dynamic, Engine, EvalAltResult, Map, Position, Scope, AST};
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
            .map(|ast| Compiled { ast })
            .map_err(|e| {
                let (line, column) = (e.1.line().unwrap_or(0), e.1.position().unwrap_or(0));
                RuleError::Compile {
                    line,
                    column,
                    message: e.0.to_string(),
                }
            })
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
        let to_dyn = |v: &serde_json::Map<String, serde_json::Value>| {
            rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT)
        };
        let mut scope = Scope::new();
        scope.push("device", input.device.to_owned());
        scope.push("ts", input.ts);
        scope.push("now", input.now);
        scope.push("tick", input.tick);
        scope.push("metrics", to_dyn(input.metrics));
        scope.push("prev", input.prev.map_or(Dynamic::UNIT, to_dyn));
        scope.push("state", state.clone());
        DEADLINE.with(|d| {
            d.set(Some(
                Instant::now() + Duration::from_micros(self.limits.deadline_us),
            ))
        });
        ACTIONS.with(|a| a.borrow_mut().clear());
        let result = self.engine.run_ast_with_scope(&mut scope, &rule.ast);
        DEADLINE.with(|d| d.set(None));
        let actions = ACTIONS.with(|a| std::mem::take(&mut *a.borrow_mut()));
        result.map_err(|e| runtime_error(&e))?;
        let Some(new_state) = scope.get_value::<Map>("state") else {
            return Err(RuleError::Runtime {
                kind: RuntimeKind::Other,
                message: "`state` must stay a map".into(),
            });
        };
        // The state outlives the evaluation (it is stored per rule and device), so its size is
        // checked here too: within one evaluation the limits above bound it, across evaluations
        // only this does.
        let bytes =
            rhai::serde::from_dynamic::<serde_json::Value>(&Dynamic::from_map(new_state.clone()))
                .ok()
                .and_then(|v| serde_json::to_vec(&v).ok())
                .map_or(usize::MAX, |v| v.len());
        if new_state.len() > self.limits.max_map_size || bytes > self.limits.max_state_bytes {
            return Err(RuleError::Runtime {
                kind: RuntimeKind::DataTooLarge,
                message: format!(
                    "`state` would hold {} entries / {bytes} bytes; the limits are {} / {}",
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
