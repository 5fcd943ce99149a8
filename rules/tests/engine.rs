//! The rule engine: raise once and clear once, cooldown, hysteresis in the script, ownership and
//! selectors, and a failing rule disabled without affecting any other.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;

use iotpipe_pipeline::embedded::RedbKv;
use iotpipe_pipeline::kv::KeyValue;
use iotpipe_pipeline::record::{parse_record, Limits, Record, SourceRef};
use iotpipe_rules::engine::stored_alarms;
use iotpipe_rules::engine::{Rule, RuleEngine, Selector, StaticOwners};
use iotpipe_rules::sandbox::{Limits as RuleLimits, Sandbox};
use iotpipe_rules::{Alert, AlertKind, Evaluator};
use serde_json::json;

const T0: i64 = 1_750_000_000_000;

fn engine(owners: &[(&str, &str)]) -> RuleEngine {
    let owners = StaticOwners(
        owners
            .iter()
            .map(|(d, o)| ((*d).to_owned(), (*o).to_owned()))
            .collect::<HashMap<_, _>>(),
    );
    RuleEngine::new(Sandbox::new(RuleLimits::default()), Arc::new(owners), 3)
}

fn rule(id: &str, owner: &str, selector: Selector, script: &str, cooldown_ms: i64) -> Rule {
    Rule {
        id: id.into(),
        name: id.into(),
        owner: owner.into(),
        selector,
        script: script.into(),
        cooldown_ms,
        ..Rule::default()
    }
}

fn rec(device: &str, ts: i64, metrics: serde_json::Value) -> Record {
    let mut m = metrics.as_object().cloned().unwrap();
    m.insert("ts".into(), json!(ts));
    parse_record(
        device,
        serde_json::Value::Object(m).to_string().as_bytes(),
        ts,
        SourceRef::Internal,
        &Limits::default(),
    )
    .unwrap()
}

fn kinds(alerts: &[Alert]) -> Vec<(String, AlertKind)> {
    alerts.iter().map(|a| (a.rule.clone(), a.kind)).collect()
}

const HOT: &str =
    r#"if (metrics.t ?? 0) > 30 { alert("warning", `t=${metrics.t}`) } else { clear() }"#;

#[tokio::test]
async fn raised_once_cleared_once_then_cooldown() {
    let e = engine(&[("d1", "alice")]);
    e.upsert(rule("hot", "alice", Selector::All, HOT, 60_000))
        .unwrap();
    let mut seen = Vec::new();
    for (i, t) in [20, 35, 36, 37, 20, 21, 40, 41].iter().enumerate() {
        seen.extend(kinds(
            &e.evaluate_record(&rec("d1", T0 + i as i64 * 1000, json!({ "t": t })))
                .await,
        ));
    }
    // Raised at 35, not again at 36/37; cleared at 20; 40 comes within the 60 s cooldown: silent.
    assert_eq!(
        seen,
        vec![
            ("hot".into(), AlertKind::Raised),
            ("hot".into(), AlertKind::Cleared)
        ]
    );
    // After the cooldown it may raise again.
    let later = e
        .evaluate_record(&rec("d1", T0 + 120_000, json!({"t": 50})))
        .await;
    assert_eq!(kinds(&later), vec![("hot".into(), AlertKind::Raised)]);
    assert_eq!(later[0].text, "t=50");
}

#[tokio::test]
async fn hysteresis_and_n_consecutive_live_in_the_script_state() {
    let e = engine(&[("d1", "alice")]);
    // Raise after 3 consecutive readings above 30; clear only below 25 (hysteresis).
    let script = r#"
        let t = metrics.t ?? ();
        if t == () { return; }
        if t > 30 { state.above = (state.above ?? 0) + 1 } else { state.above = 0 }
        if state.above >= 3 { alert("critical", "hot for 3 readings") }
        if t < 25 { clear() }
    "#;
    e.upsert(rule("hyst", "alice", Selector::All, script, 0))
        .unwrap();
    let mut seen = Vec::new();
    for (i, t) in [31, 32, 33, 28, 26, 24].iter().enumerate() {
        for a in e
            .evaluate_record(&rec("d1", T0 + i as i64 * 1000, json!({ "t": t })))
            .await
        {
            seen.push((i, a.kind));
        }
    }
    assert_eq!(seen, vec![(2, AlertKind::Raised), (5, AlertKind::Cleared)]);
}

#[tokio::test]
async fn rules_see_only_their_owners_devices_whatever_the_selector() {
    let e = engine(&[("alice-1", "alice"), ("bob-1", "bob")]);
    // Alice's rule names Bob's device explicitly and by glob: it must never see it.
    e.upsert(rule(
        "steal",
        "alice",
        Selector::Devices(vec!["bob-1".into(), "alice-1".into()]),
        HOT,
        0,
    ))
    .unwrap();
    e.upsert(rule("glob", "alice", Selector::Glob("*-1".into()), HOT, 0))
        .unwrap();
    assert!(e
        .evaluate_record(&rec("bob-1", T0, json!({"t": 99})))
        .await
        .is_empty());
    let got = e
        .evaluate_record(&rec("alice-1", T0, json!({"t": 99})))
        .await;
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|a| a.device == "alice-1"));
    // Unregistered devices reach no rule at all.
    assert!(e
        .evaluate_record(&rec("nobody-1", T0, json!({"t": 99})))
        .await
        .is_empty());
}

#[tokio::test]
async fn a_failing_rule_is_disabled_after_n_failures_and_others_keep_firing() {
    let e = engine(&[("d1", "alice")]);
    e.upsert(rule("bad", "alice", Selector::All, "loop { }", 0))
        .unwrap();
    e.upsert(rule("good", "alice", Selector::All, HOT, 0))
        .unwrap();
    let mut seen = Vec::new();
    for (i, t) in [35, 20, 35, 20].iter().enumerate() {
        seen.extend(kinds(
            &e.evaluate_record(&rec("d1", T0 + i as i64 * 1000, json!({ "t": t })))
                .await,
        ));
    }
    assert_eq!(
        seen,
        vec![
            ("good".into(), AlertKind::Raised),
            ("good".into(), AlertKind::Cleared),
            ("bad".into(), AlertKind::RuleDisabled),
            ("good".into(), AlertKind::Raised),
            ("good".into(), AlertKind::Cleared),
        ]
    );
    assert!(e.is_disabled("bad"));
    assert_eq!(e.take_failures().len(), 3);
    // Replacing the rule (a new version) enables it again.
    e.upsert(rule("bad", "alice", Selector::All, HOT, 0))
        .unwrap();
    assert!(!e.is_disabled("bad"));
}

#[tokio::test]
async fn a_script_that_does_not_compile_is_refused_and_the_old_version_stays() {
    let e = engine(&[("d1", "alice")]);
    e.upsert(rule("r", "alice", Selector::All, HOT, 0)).unwrap();
    assert!(e
        .upsert(rule("r", "alice", Selector::All, "if {", 0))
        .is_err());
    assert_eq!(
        kinds(&e.evaluate_record(&rec("d1", T0, json!({"t": 99}))).await),
        vec![("r".into(), AlertKind::Raised)]
    );
}

fn kv() -> (tempfile::TempDir, Arc<dyn KeyValue>) {
    let dir = tempfile::tempdir().unwrap();
    let kv = RedbKv::open(&dir.path().join("rules.redb")).unwrap();
    (dir, Arc::new(kv))
}

#[tokio::test]
async fn a_restarted_engine_neither_re_raises_nor_forgets() {
    let (_dir, store) = kv();
    let counting = r#"state.n = (state.n ?? 0) + 1; if (metrics.t ?? 0) > 30 { alert("warning", `n=${state.n}`) } else { clear() }"#;
    let first = engine(&[("d1", "alice")]).with_store(store.clone());
    first
        .upsert(rule("hot", "alice", Selector::All, counting, 0))
        .unwrap();
    assert_eq!(
        kinds(
            &first
                .evaluate_record(&rec("d1", T0, json!({"t": 35})))
                .await
        ),
        vec![("hot".into(), AlertKind::Raised)]
    );
    first.flush().await.unwrap();
    drop(first);

    let second = engine(&[("d1", "alice")]).with_store(store.clone());
    second
        .upsert(rule("hot", "alice", Selector::All, counting, 0))
        .unwrap();
    // Still above: the alarm is already active, so nothing is raised again.
    assert!(second
        .evaluate_record(&rec("d1", T0 + 1000, json!({"t": 36})))
        .await
        .is_empty());
    // And it is not forgotten: the drop clears it, and the script's counter went on.
    let cleared = second
        .evaluate_record(&rec("d1", T0 + 2000, json!({"t": 20})))
        .await;
    assert_eq!(kinds(&cleared), vec![("hot".into(), AlertKind::Cleared)]);
    let again = second
        .evaluate_record(&rec("d1", T0 + 3000, json!({"t": 40})))
        .await;
    assert_eq!(again[0].text, "n=4");
}

#[tokio::test]
async fn no_data_for_10_minutes_fires_on_a_timer_by_event_time() {
    let e = engine(&[("d1", "alice")]);
    let script = r#"
        if tick {
            if state.last != () && now - state.last > 10 * 60 * 1000 { alert("warning", "no data for 10 minutes") }
        } else {
            state.last = ts;
            clear();
        }
    "#;
    e.upsert(rule("silent", "alice", Selector::All, script, 0))
        .unwrap();
    assert!(e
        .evaluate_record(&rec("d1", T0, json!({"t": 1})))
        .await
        .is_empty());
    assert!(e.tick(T0 + 5 * 60_000).await.unwrap().is_empty());
    let fired = e.tick(T0 + 11 * 60_000).await.unwrap();
    assert_eq!(kinds(&fired), vec![("silent".into(), AlertKind::Raised)]);
    assert_eq!(fired[0].ts, T0 + 11 * 60_000);
    assert!(
        e.tick(T0 + 12 * 60_000).await.unwrap().is_empty(),
        "raised once"
    );
    assert_eq!(
        kinds(
            &e.evaluate_record(&rec("d1", T0 + 13 * 60_000, json!({"t": 2})))
                .await
        ),
        vec![("silent".into(), AlertKind::Cleared)]
    );
}

#[tokio::test]
async fn event_time_follows_records_and_keeps_moving_when_all_is_quiet() {
    let e = engine(&[("d1", "alice")]);
    e.upsert(rule("r", "alice", Selector::All, HOT, 0)).unwrap();
    let wall = iotpipe_pipeline::time::now_ms();
    assert_eq!(e.event_time(wall), wall, "no record yet: wall clock");
    e.evaluate_record(&rec("d1", T0, json!({"t": 1}))).await;
    let arrived = iotpipe_pipeline::time::now_ms();
    // Right after the record, event time is its ts; with no record for ten seconds of wall
    // time, it moved on by ten seconds.
    assert!(e.event_time(arrived) <= T0 + 1000);
    assert_eq!(
        e.event_time(arrived + 10_000) - e.event_time(arrived),
        10_000
    );
    // An older record does not move it back.
    e.evaluate_record(&rec("d1", T0 - 60_000, json!({"t": 1})))
        .await;
    assert!(e.event_time(arrived) >= T0);
}

#[tokio::test]
async fn prev_is_the_devices_previous_state_and_survives_a_restart() {
    let (_dir, store) = kv();
    let jump = r#"
        let t = metrics.t ?? ();
        if t == () || prev == () || prev.t == () { return; }
        if t - prev.t > 10 { alert("warning", `jump ${prev.t} -> ${t}`) } else { clear() }
    "#;
    let e = engine(&[("d1", "alice")]).with_store(store.clone());
    e.upsert(rule("jump", "alice", Selector::All, jump, 0))
        .unwrap();
    assert!(e
        .evaluate_record(&rec("d1", T0, json!({"t": 20})))
        .await
        .is_empty());
    // A record without `t` keeps the previous `t` in `prev` (previous state, not previous record).
    assert!(e
        .evaluate_record(&rec("d1", T0 + 1000, json!({"h": 1})))
        .await
        .is_empty());
    e.flush().await.unwrap();
    drop(e);
    let e = engine(&[("d1", "alice")]).with_store(store.clone());
    e.upsert(rule("jump", "alice", Selector::All, jump, 0))
        .unwrap();
    let got = e
        .evaluate_record(&rec("d1", T0 + 2000, json!({"t": 35})))
        .await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].text, "jump 20 -> 35");
}

#[tokio::test]
async fn active_alarms_are_indexed_in_the_store_per_owner_and_removed_with_the_rule() {
    let (_dir, store) = kv();
    let e = engine(&[("a1", "alice"), ("b1", "bob")]).with_store(store.clone());
    e.upsert(rule("ha", "alice", Selector::All, HOT, 0))
        .unwrap();
    e.upsert(rule("hb", "bob", Selector::All, HOT, 0)).unwrap();
    e.evaluate(&[
        rec("a1", T0, json!({"t": 99})),
        rec("b1", T0, json!({"t": 99})),
    ])
    .await
    .unwrap();
    e.flush().await.unwrap();
    let alice = stored_alarms(store.as_ref(), Some("alice")).await.unwrap();
    assert_eq!(alice.len(), 1);
    assert_eq!(
        (alice[0].rule.as_str(), alice[0].device.as_str()),
        ("ha", "a1")
    );
    assert_eq!(stored_alarms(store.as_ref(), None).await.unwrap().len(), 2);
    // Cleared: gone from the index.
    e.evaluate_record(&rec("a1", T0 + 1, json!({"t": 1}))).await;
    e.flush().await.unwrap();
    assert!(stored_alarms(store.as_ref(), Some("alice"))
        .await
        .unwrap()
        .is_empty());
    // A removed rule takes its alarms and state with it.
    e.remove("hb");
    e.flush().await.unwrap();
    assert!(stored_alarms(store.as_ref(), None)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .scan_prefix("rule-state/hb/")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn timers_run_on_the_worker_that_last_saw_the_device() {
    let (_dir, store) = kv();
    let script = r#"
        if tick {
            if state.last != () && now - state.last > 60000 { alert("warning", "silent") }
        } else { state.last = ts; clear(); }
    "#;
    let a = engine(&[("d1", "alice")])
        .with_store(store.clone())
        .with_instance("a");
    let b = engine(&[("d1", "alice")])
        .with_store(store.clone())
        .with_instance("b");
    for e in [&a, &b] {
        e.upsert(rule("silent", "alice", Selector::All, script, 0))
            .unwrap();
    }
    a.evaluate_record(&rec("d1", T0, json!({"t": 1}))).await;
    a.flush().await.unwrap();
    // The partition moves to b, which sees the next record.
    b.evaluate_record(&rec("d1", T0 + 1000, json!({"t": 1})))
        .await;
    b.flush().await.unwrap();
    // a still holds state for d1 in memory, but the device is b's now: a stays silent.
    assert!(a.tick(T0 + 10 * 60_000).await.unwrap().is_empty());
    let fired = b.tick(T0 + 10 * 60_000).await.unwrap();
    assert_eq!(kinds(&fired), vec![("silent".into(), AlertKind::Raised)]);
}

#[tokio::test]
async fn threshold_rules_do_not_run_on_the_timer() {
    let e = engine(&[("d1", "alice")]);
    e.upsert(rule("hot", "alice", Selector::All, HOT, 0))
        .unwrap();
    assert_eq!(
        kinds(&e.evaluate_record(&rec("d1", T0, json!({"t": 99}))).await),
        vec![("hot".into(), AlertKind::Raised)]
    );
    // A tick carries no metrics; were it run, HOT would clear the alarm.
    assert!(e.tick(T0 + 60_000).await.unwrap().is_empty());
    assert_eq!(e.active_alarms(None).len(), 1);
}

#[tokio::test]
async fn newer_versions_win_whatever_order_they_arrive_in() {
    use iotpipe_rules::engine::RuleEvent;
    let e = engine(&[("d1", "alice")]);
    let v = |version: i64, text: &str| Rule {
        version,
        ..rule(
            "r",
            "alice",
            Selector::All,
            &format!(r#"alert("{text}")"#),
            0,
        )
    };
    assert!(e.upsert(v(2, "two")).unwrap());
    assert!(!e.upsert(v(1, "one")).unwrap(), "older version ignored");
    assert!(e.rule("r").unwrap().script.contains("two"));
    e.apply_event(&RuleEvent {
        id: "r".into(),
        version: 3,
        rule: None,
    })
    .unwrap();
    assert!(e.rule("r").is_none());
    assert!(
        !e.upsert(v(2, "two")).unwrap(),
        "a removal outranks older versions"
    );
    assert!(e.upsert(v(4, "four")).unwrap());
    assert_eq!(e.rules().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluates_on_a_multi_threaded_runtime_with_a_store() {
    let (_dir, store) = kv();
    let e = engine(&[("a1", "alice")]).with_store(store.clone());
    e.upsert(rule("ha", "alice", Selector::All, HOT, 0))
        .unwrap();
    let got = e
        .evaluate(&[rec("a1", T0, json!({"t": 99}))])
        .await
        .unwrap();
    assert_eq!(kinds(&got), vec![("ha".into(), AlertKind::Raised)]);
}

#[tokio::test]
async fn failures_alerts_and_disabling_are_counted_per_rule() {
    let metrics = Arc::new(iotpipe_pipeline::metrics::Metrics::new());
    let e = engine(&[("d1", "alice")]).with_metrics(metrics.clone());
    e.upsert(rule("bad", "alice", Selector::All, "loop { }", 0))
        .unwrap();
    e.upsert(rule("good", "alice", Selector::All, HOT, 0))
        .unwrap();
    for i in 0..3 {
        e.evaluate_record(&rec("d1", T0 + i, json!({"t": 35})))
            .await;
    }
    let get = |name: &str, labels: &[&str]| -> f64 {
        match name {
            "eval" => metrics.rule_evaluations.with_label_values(labels).get() as f64,
            "fail" => metrics.rule_failures.with_label_values(labels).get() as f64,
            "alert" => metrics.rule_alerts.with_label_values(labels).get() as f64,
            _ => metrics.rule_disabled.with_label_values(labels).get() as f64,
        }
    };
    assert_eq!(get("eval", &["good"]), 3.0);
    assert_eq!(get("eval", &["bad"]), 3.0);
    assert_eq!(
        get("fail", &["bad", "too_many_operations"]) + get("fail", &["bad", "deadline"]),
        3.0
    );
    assert_eq!(get("fail", &["good", "deadline"]), 0.0);
    assert_eq!(get("alert", &["good", "raised"]), 1.0);
    assert_eq!(get("alert", &["bad", "rule_disabled"]), 1.0);
    assert_eq!(get("disabled", &["bad"]), 1.0);
    assert_eq!(metrics.rules_loaded.get(), 2);
    assert!(metrics
        .render()
        .contains("iotpipe_rule_failures_total{kind="));
}
