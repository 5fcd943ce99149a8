//! Golden-file tests of the example rules in `rules/examples/`: each folder holds `rule.rhai`,
//! `input.jsonl` (records) and `expected.jsonl` (the alerts the engine must produce, in order).
//! `IOTPIPE_BLESS=1` writes `expected.jsonl` from the current output instead of comparing — for a
//! new example, after reading what it produced.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use iotpipe_pipeline::record::{parse_record, Limits, SourceRef};
use iotpipe_rules::engine::{Rule, RuleEngine, Selector, StaticOwners};
use iotpipe_rules::sandbox::{Limits as RuleLimits, Sandbox};
use serde_json::{json, Value};

async fn run_example(dir: &Path) -> Vec<Value> {
    let script = std::fs::read_to_string(dir.join("rule.rhai")).unwrap();
    let input = std::fs::read_to_string(dir.join("input.jsonl")).unwrap();
    let rows: Vec<Value> = input
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let owners: HashMap<String, String> = rows
        .iter()
        .map(|r| (r["device"].as_str().unwrap().to_owned(), "alice".to_owned()))
        .collect();
    let engine = RuleEngine::new(
        Sandbox::new(RuleLimits::default()),
        Arc::new(StaticOwners(owners)),
        3,
    );
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    engine
        .upsert(Rule {
            id: name.clone(),
            name,
            owner: "alice".into(),
            selector: Selector::All,
            script,
            cooldown_ms: 0,
            ..Rule::default()
        })
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut out = Vec::new();
    for r in rows {
        let ts = r["ts"].as_i64().unwrap();
        let mut m = r["metrics"].as_object().cloned().unwrap();
        m.insert("ts".into(), json!(ts));
        let rec = parse_record(
            r["device"].as_str().unwrap(),
            Value::Object(m).to_string().as_bytes(),
            ts,
            SourceRef::Internal,
            &Limits::default(),
        )
        .unwrap();
        for a in engine.evaluate_record(&rec).await {
            out.push(json!({"device": a.device, "ts": a.ts, "kind": a.kind, "severity": a.severity, "text": a.text}));
        }
    }
    assert!(
        engine.take_failures().is_empty(),
        "{}: the example rule failed",
        dir.display()
    );
    out
}

#[tokio::test]
async fn example_rules_match_their_golden_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 8, "at least 8 examples, found {}", dirs.len());
    for dir in dirs {
        let got = run_example(&dir).await;
        let expected_path = dir.join("expected.jsonl");
        if std::env::var_os("IOTPIPE_BLESS").is_some() {
            let text: String = got.iter().map(|v| format!("{v}\n")).collect();
            std::fs::write(&expected_path, text).unwrap();
            continue;
        }
        let expected: Vec<Value> = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| {
                panic!(
                    "{} missing; run with IOTPIPE_BLESS=1 and review it",
                    expected_path.display()
                )
            })
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got, expected, "{}", dir.display());
        assert!(
            !expected.is_empty(),
            "{}: an example must raise something",
            dir.display()
        );
    }
}
