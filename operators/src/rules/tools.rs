//! Author tools: `iotpipe rules check|test|backtest`.
//!
//! - `check PATH`: compile every `.rhai` file (PATH is a file or a directory); list each error as
//!   `file:line:column: message`; exit non-zero if any.
//! - `test RULE --input FILE.jsonl`: run one rule over records (`{"device","ts","metrics"}` per
//!   line) and print each raise and clear with the record that caused it.
//! - `backtest RULE --device ID --from T --to T`: run one rule over the device's stored history
//!   (from a running instance's API, or a stopped `iotpipe dev` data directory), sending nothing,
//!   and print the alerts it would have raised.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use iotpipe_pipeline::embedded::RedbHistory;
use iotpipe_pipeline::record::{parse_record, Limits, Record, SourceRef};
use iotpipe_pipeline::store::{HistoryQuery, HistoryStore, Order};
use iotpipe_pipeline::time::parse_ms_or_rfc3339;
use iotpipe_rules::engine::{Rule, RuleEngine, Selector, SingleOwner};
use iotpipe_rules::sandbox::{Limits as RuleLimits, RuleError, Sandbox};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rhai_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("rhai"))
            .collect();
        files.sort();
        Ok(files)
    } else if path.exists() {
        Ok(vec![path.to_owned()])
    } else {
        bail!("{} does not exist", path.display())
    }
}

/// `iotpipe rules check PATH`; returns whether every file compiled.
///
/// # Errors
/// When PATH cannot be read.
pub fn check(path: &Path) -> anyhow::Result<bool> {
    let sandbox = Sandbox::new(RuleLimits::default());
    let files = rhai_files(path)?;
    let mut bad = 0;
    for f in &files {
        let src = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
        if let Err(e) = sandbox.compile(&src) {
            bad += 1;
            match e {
                RuleError::Compile {
                    line,
                    column,
                    message,
                } => println!("{}:{line}:{column}: {message}", f.display()),
                other => println!("{}: {other}", f.display()),
            }
        }
    }
    println!("{} of {} rules compile.", files.len() - bad, files.len());
    Ok(bad == 0)
}

fn engine_with(rule: &Path) -> anyhow::Result<(RuleEngine, String)> {
    let script = std::fs::read_to_string(rule).with_context(|| format!("{}", rule.display()))?;
    let id = rule
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("rule")
        .to_owned();
    let engine = RuleEngine::new(
        Sandbox::new(RuleLimits::default()),
        Arc::new(SingleOwner("local".into())),
        u32::MAX,
    );
    engine
        .upsert(Rule {
            id: id.clone(),
            name: id.clone(),
            owner: "local".into(),
            selector: Selector::All,
            script,
            cooldown_ms: 0,
            ..Rule::default()
        })
        .map_err(|e| anyhow!("{}:{e}", rule.display()))?;
    Ok((engine, id))
}

fn record(
    device: &str,
    ts: i64,
    metrics: &serde_json::Map<String, Value>,
) -> anyhow::Result<Record> {
    let mut m = metrics.clone();
    m.insert("ts".into(), json!(ts));
    // The skew checks are about live input; a test or backtest replays any time.
    let limits = Limits {
        max_past_age: std::time::Duration::from_secs(u64::MAX / 4),
        ..Limits::default()
    };
    parse_record(
        device,
        Value::Object(m).to_string().as_bytes(),
        ts,
        SourceRef::Internal,
        &limits,
    )
    .map_err(|e| anyhow!("{device}@{ts}: {e}"))
}

/// Runs the rule over records and prints every alert as a JSON line with its record; returns how
/// many alerts were printed.
async fn run_and_print(engine: &RuleEngine, records: impl IntoIterator<Item = Record>) -> usize {
    let mut n = 0;
    for r in records {
        for a in engine.evaluate_record(&r).await {
            n += 1;
            println!(
                "{}",
                json!({"ts": a.ts, "device": a.device, "kind": a.kind, "severity": a.severity, "text": a.text, "record": r.metrics})
            );
        }
        for f in engine.take_failures() {
            eprintln!("rule failed on {}@{}: {}", f.device, r.ts, f.error);
        }
    }
    n
}

/// `iotpipe rules test RULE --input FILE.jsonl`.
///
/// # Errors
/// When the rule does not compile or the input is malformed.
pub async fn test(rule: &Path, input: &Path) -> anyhow::Result<()> {
    let (engine, _) = engine_with(rule)?;
    let text = std::fs::read_to_string(input).with_context(|| format!("{}", input.display()))?;
    let mut records = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}", input.display(), i + 1))?;
        let (Some(device), Some(ts), Some(metrics)) = (
            v["device"].as_str(),
            v["ts"].as_i64(),
            v["metrics"].as_object(),
        ) else {
            bail!(
                "{}:{}: expected {{\"device\", \"ts\", \"metrics\"}}",
                input.display(),
                i + 1
            );
        };
        records.push(record(device, ts, metrics)?);
    }
    let n = run_and_print(&engine, records).await;
    eprintln!("{n} alerts.");
    Ok(())
}

/// One stored history row: device ts and metrics.
type Row = (i64, serde_json::Map<String, Value>);

/// Where `backtest` reads history from.
pub enum HistorySource {
    /// A running instance's HTTP API (`iotpipe dev` or `fanout`).
    Api(SocketAddr),
    /// The data directory of a stopped `iotpipe dev`.
    DataDir(PathBuf),
}

async fn http_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP answer"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        bail!("GET {path}: {status} {body}");
    }
    Ok(serde_json::from_str(body)?)
}

/// `iotpipe rules backtest RULE --device ID --from T --to T`.
///
/// # Errors
/// When the rule does not compile or the history cannot be read.
pub async fn backtest(
    rule: &Path,
    device: &str,
    from: &str,
    to: &str,
    source: HistorySource,
) -> anyhow::Result<()> {
    let (engine, _) = engine_with(rule)?;
    let from_ms = parse_ms_or_rfc3339(from).map_err(|e| anyhow!("--from: {e}"))?;
    let to_ms = parse_ms_or_rfc3339(to).map_err(|e| anyhow!("--to: {e}"))?;
    let mut records = Vec::new();
    let mut cursor: Option<String> = None;
    let store = match &source {
        HistorySource::DataDir(dir) => Some(
            RedbHistory::open(&dir.join("history.redb"))
                .map_err(|e| anyhow!("{}: {e}", dir.display()))?,
        ),
        HistorySource::Api(_) => None,
    };
    loop {
        let (items, next): (Vec<Row>, Option<String>) = match (&source, &store) {
            (_, Some(store)) => {
                let q = HistoryQuery {
                    device: device.to_owned(),
                    from: from_ms,
                    to: to_ms,
                    limit: 1000,
                    order: Order::Asc,
                    cursor: cursor.clone(),
                };
                let page = store.query(&q).await?;
                (
                    page.items.into_iter().map(|i| (i.ts, i.metrics)).collect(),
                    page.next_cursor,
                )
            }
            (HistorySource::Api(addr), None) => {
                let mut path = format!(
                    "/v1/devices/{device}/history?from={from_ms}&to={to_ms}&limit=1000&order=asc"
                );
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                let v = http_json(*addr, &path).await?;
                let items = v["items"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|i| {
                                Some((i["ts"].as_i64()?, i["metrics"].as_object()?.clone()))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (items, v["next_cursor"].as_str().map(str::to_owned))
            }
            (HistorySource::DataDir(_), None) => unreachable!("the store is opened above"),
        };
        for (ts, m) in items {
            records.push(record(device, ts, &m)?);
        }
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let n = run_and_print(&engine, records.iter().cloned()).await;
    eprintln!(
        "{n} alerts would have been raised over {} records (nothing was sent).",
        records.len()
    );
    Ok(())
}
