//! The sandbox against hostile and ordinary scripts: every failure is a typed error within the
//! deadline, no panic, and the engine stays usable for the next rule.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::{Duration, Instant};

use iotpipe_rules::sandbox::{Action, Input, Limits, RuleError, RuntimeKind, Sandbox};
use rhai::Map;
use serde_json::json;

fn metrics(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().cloned().unwrap()
}

fn run(
    sb: &Sandbox,
    src: &str,
    m: &serde_json::Value,
    state: &mut Map,
) -> Result<Vec<Action>, RuleError> {
    let rule = sb.compile(src)?;
    let m = metrics(m.clone());
    sb.evaluate(
        &rule,
        &Input {
            device: "d1",
            ts: 1000,
            now: 1000,
            metrics: &m,
            prev: None,
            tick: false,
        },
        state,
    )
}

fn runtime_kind(r: Result<Vec<Action>, RuleError>) -> RuntimeKind {
    match r {
        Err(RuleError::Runtime { kind, .. }) => kind,
        other => panic!("expected a runtime error, got {other:?}"),
    }
}

#[test]
fn threshold_with_missing_metric_and_state() {
    let sb = Sandbox::new(Limits::default());
    let src = r#"
        let t = metrics.temperature ?? 0;
        state.count = (state.count ?? 0) + 1;
        if t > 30 { alert("warning", `hot: ${t} on ${device}`) } else { clear() }
    "#;
    let mut state = Map::new();
    assert_eq!(
        run(&sb, src, &json!({"temperature": 35}), &mut state).unwrap(),
        vec![Action::Alert {
            severity: "warning".into(),
            text: "hot: 35 on d1".into()
        }]
    );
    assert_eq!(
        run(&sb, src, &json!({"humidity": 1}), &mut state).unwrap(),
        vec![Action::Clear],
        "a missing metric is no crash"
    );
    assert_eq!(
        state.get("count").and_then(|v| v.as_int().ok()),
        Some(2),
        "state persists between evaluations"
    );
}

#[test]
fn compile_errors_have_line_and_column() {
    let sb = Sandbox::new(Limits::default());
    match sb.compile("let x = 1;\nif x > { }") {
        Err(RuleError::Compile { line, column, .. }) => assert_eq!((line, column > 0), (2, true)),
        other => panic!("{other:?}"),
    }
    // Strict variables: a typo is a compile error, not a silent ().
    assert!(matches!(
        sb.compile("if metrcs.t > 1 { alert(\"x\", \"y\") }"),
        Err(RuleError::Compile { .. })
    ));
}

#[test]
fn hostile_scripts_fail_with_typed_errors_quickly() {
    let sb = Sandbox::new(Limits::default());
    let m = json!({"t": 1});
    let started = Instant::now();
    let cases: Vec<(&str, RuntimeKind)> = vec![  // (script, expected; Deadline is also accepted where marked below)
        ("loop { }", RuntimeKind::TooManyOperations),
        ("let x = 0; while true { x += 1; }", RuntimeKind::TooManyOperations),
        ("fn f(n) { f(n + 1) } f(0)", RuntimeKind::StackOverflow),
        ("let s = \"ab\"; loop { s += s; }", RuntimeKind::DataTooLarge),
        ("let a = []; loop { a.push(1); }", RuntimeKind::DataTooLarge),
        // Rhai does not size-check index assignment; the operations limit or the deadline
        // (whichever comes first on this machine) bounds it instead.
        ("let m = #{}; let i = 0; loop { m[`k${i}`] = i; i += 1; }", RuntimeKind::Deadline),
        // The rule's own state is checked after every evaluation, so it cannot grow across them.
        ("let i = 0; while i < 1000 { state[`k${i}`] = i; i += 1; }", RuntimeKind::DataTooLarge),
        ("for i in 0..3 { let b = \"\"; for j in 0..350 { b += \"xxxxxxxxxx\"; } state[`b${i}`] = b; }", RuntimeKind::DataTooLarge),
        ("let x = 9223372036854775807; x + 1", RuntimeKind::Arithmetic),
        ("let x = 1 / 0;", RuntimeKind::Arithmetic),
        ("open_file(\"/etc/passwd\")", RuntimeKind::FunctionNotFound),
        ("let x = \"a\" - metrics.t;", RuntimeKind::FunctionNotFound),
    ];
    for (src, kind) in cases {
        let mut state = Map::new();
        let got = runtime_kind(run(&sb, src, &m, &mut state));
        let slow_enough_for_either =
            kind == RuntimeKind::Deadline && got == RuntimeKind::TooManyOperations;
        assert!(got == kind || slow_enough_for_either, "{src}: {got:?}");
        assert!(
            state.is_empty(),
            "a failed evaluation leaves state unchanged"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "all hostile scripts end quickly: {:?}",
        started.elapsed()
    );
    // And the engine still works afterwards.
    assert_eq!(
        run(&sb, "alert(\"info\", \"ok\")", &m, &mut Map::new())
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn compile_time_limits() {
    let sb = Sandbox::new(Limits::default());
    let deep = format!("let x = {}1{};", "(".repeat(200), ")".repeat(200));
    assert!(
        matches!(sb.compile(&deep), Err(RuleError::Compile { .. })),
        "deep nesting"
    );
    let huge = format!("let s = \"{}\";", "x".repeat(10_000));
    assert!(
        matches!(sb.compile(&huge), Err(RuleError::Compile { .. })),
        "huge literal"
    );
    assert!(
        matches!(
            sb.compile("import \"x\" as y;"),
            Err(RuleError::Compile { .. })
        ),
        "import"
    );
    assert!(
        matches!(
            sb.compile("eval(\"1 + 1\")"),
            Err(RuleError::Compile { .. })
        ),
        "eval is disabled"
    );
}

#[test]
fn the_wall_clock_deadline_stops_slow_scripts() {
    // Operations allowed, but the deadline is tiny: the deadline must fire first.
    let sb = Sandbox::new(Limits {
        max_operations: u64::MAX / 2,
        deadline_us: 2_000,
        ..Limits::default()
    });
    let started = Instant::now();
    let got = run(
        &sb,
        "let x = 0; loop { x = (x + 1) % 7; }",
        &json!({}),
        &mut Map::new(),
    );
    assert_eq!(runtime_kind(got), RuntimeKind::Deadline);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn metrics_and_prev_are_read_only_so_no_rule_changes_what_the_next_sees() {
    let sb = Sandbox::new(Limits::default());
    let m = metrics(json!({"t": 35, "tags": [1, 2]}));
    let p = metrics(json!({"t": 30}));
    let input = Input {
        device: "d1",
        ts: 1,
        now: 1,
        metrics: &m,
        prev: Some(&p),
        tick: false,
    };
    let prepared = Sandbox::prepare(&input);
    for src in [
        "metrics.t = 0;",
        "metrics.tags.push(3);",
        "metrics[\"t\"] = 0;",
        "prev.t = 0;",
        "metrics = #{};",
        "metrics.tags[0] = 9;",
        "let x = metrics; x.t = 1; x.tags.push(3);",
    ] {
        let rule = sb.compile(src).unwrap();
        // Either refused, or applied to a copy: never to the shared record.
        let _ = sb.evaluate_prepared(&rule, &prepared, &mut Map::new());
    }
    let check = sb
        .compile(r#"if metrics.t == 35 && metrics.tags.len() == 2 && metrics.tags[0] == 1 && prev.t == 30 { alert("ok") }"#)
        .unwrap();
    let got = sb
        .evaluate_prepared(&check, &prepared, &mut Map::new())
        .unwrap();
    assert_eq!(got.len(), 1, "a rule changed the record another rule sees");
}

#[test]
fn only_the_metrics_a_script_reads_are_converted_and_anything_unusual_means_all() {
    use iotpipe_rules::sandbox::MetricKeys;
    let sb = Sandbox::new(Limits::default());
    let keys = |src: &str| sb.compile(src).unwrap().metric_keys().clone();
    assert_eq!(
        keys(
            r#"if metrics.temp > 30.0 && (metrics?.hum ?? 0) > 1 && metrics["bat"] < 3 { alert("x") }"#
        ),
        MetricKeys::Keys(vec!["temp".into(), "hum".into(), "bat".into()])
    );
    for all in [
        r#"if "temp" in metrics { alert("x") }"#,
        "for k in metrics.keys() { }",
        "let m = metrics; if m.temp > 1 { alert(\"x\") }",
        "let k = \"temp\"; if metrics[k] > 1 { alert(\"x\") }",
        "if metrics.len() > 3 { alert(\"x\") }",
    ] {
        assert_eq!(keys(all), MetricKeys::All, "{all}");
    }
    // The narrowed conversion gives the script what it reads.
    let m = metrics(json!({"temp": 31.5, "hum": 40, "other": "x"}));
    let rule = sb
        .compile(r#"if metrics.temp > 30.0 && metrics.hum == 40 { alert("hot") }"#)
        .unwrap();
    let input = Input {
        device: "d1",
        ts: 1,
        now: 1,
        metrics: &m,
        prev: None,
        tick: false,
    };
    let mut p = Sandbox::prepare_for(&input, rule.metric_keys());
    assert_eq!(
        sb.evaluate_last(&rule, &mut p, &mut Map::new())
            .unwrap()
            .len(),
        1
    );
}
