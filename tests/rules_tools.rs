//! `iotpipe rules check|test|backtest`, the rule authors' tools, through the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Dev, Publisher};
use serde_json::{json, Value};

fn iotpipe(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iotpipe"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/examples")
}

fn kinds(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn check_lists_errors_with_file_line_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("good.rhai"),
        "if (metrics.t ?? 0) > 1 { alert(\"info\", \"x\") }",
    )
    .unwrap();
    let (ok, out, _) = iotpipe(&["rules", "check", dir.path().to_str().unwrap()]);
    assert!(ok, "{out}");
    std::fs::write(dir.path().join("broken.rhai"), "let x = 1;\nif x > { }").unwrap();
    let (ok, out, _) = iotpipe(&["rules", "check", dir.path().to_str().unwrap()]);
    assert!(!ok);
    let line = out
        .lines()
        .find(|l| l.contains("broken.rhai"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("broken.rhai:2:"), "{line}");
    assert!(out.contains("1 of 2 rules compile."), "{out}");
    // Every shipped example compiles.
    for entry in std::fs::read_dir(examples()).unwrap() {
        let dir = entry.unwrap().path();
        let (ok, out, _) = iotpipe(&["rules", "check", dir.to_str().unwrap()]);
        assert!(
            ok && out.contains("1 of 1 rules compile."),
            "{}: {out}",
            dir.display()
        );
    }
}

#[test]
fn test_prints_each_raise_and_clear_with_its_record() {
    let ex = examples().join("high_temperature");
    let (ok, out, err) = iotpipe(&[
        "rules",
        "test",
        ex.join("rule.rhai").to_str().unwrap(),
        "--input",
        ex.join("input.jsonl").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(kinds(&out), vec!["raised", "cleared", "raised"]);
    let first: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["record"], json!({"temperature": 31.5}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backtest_runs_over_stored_history_from_the_api_and_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rule = dir.path().join("hot.rhai");
    std::fs::write(
        &rule,
        r#"if (metrics.t ?? 0) > 30 { alert("warning", `t=${metrics.t}`) } else { clear() }"#,
    )
    .unwrap();
    let dev = Dev::start(&data, 0, &[]);
    let mut p = Publisher::new(dev.mqtt, "bt-pub");
    let t0 = iotpipe_pipeline::time::now_ms() - 60_000;
    for (i, t) in [20, 35, 36, 20, 40].iter().enumerate() {
        p.publish(
            "devices/bt-1/telemetry",
            json!({"ts": t0 + i as i64 * 1000, "t": t})
                .to_string()
                .as_bytes(),
            Duration::from_secs(10),
        )
        .await;
    }
    dev.wait_for("/v1/devices/bt-1/history?limit=100", |_, v| {
        v["items"].as_array().map_or(0, Vec::len) == 5
    })
    .await;
    let (from, to) = (t0.to_string(), (t0 + 10_000).to_string());
    let api = dev.http.to_string();
    let r = rule.to_str().unwrap().to_owned();
    let (ok, out, err) = tokio::task::spawn_blocking({
        let (r, from, to, api) = (r.clone(), from.clone(), to.clone(), api.clone());
        move || {
            iotpipe(&[
                "rules", "backtest", &r, "--device", "bt-1", "--from", &from, "--to", &to, "--api",
                &api,
            ])
        }
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert_eq!(kinds(&out), vec!["raised", "cleared", "raised"]);
    assert!(err.contains("nothing was sent"), "{err}");
    dev.stop();
    // The same over the stopped instance's data directory.
    let (ok, out2, err) = iotpipe(&[
        "rules",
        "backtest",
        &r,
        "--device",
        "bt-1",
        "--from",
        &from,
        "--to",
        &to,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out2, out);
}
