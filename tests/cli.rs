//! The command line: config generate/print, port handling of `dev`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::process::Command;

fn iotpipe(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iotpipe"))
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_generate_and_print() {
    let (ok, generated, _) = iotpipe(&["config", "generate"], &[]);
    assert!(ok);
    assert!(generated.contains("topic_template = \"devices/{device_id}/telemetry\""));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("iotpipe.toml");
    std::fs::write(&file, generated.replace("simulate = 0", "simulate = 7")).unwrap();
    let (ok, printed, err) = iotpipe(
        &["config", "print", "--config", file.to_str().unwrap()],
        &[(
            "IOTPIPE_INGEST__TOPIC_TEMPLATE",
            "NBtechv1/{device_id}/data",
        )],
    );
    assert!(ok, "{err}");
    assert!(printed.contains("simulate = 7"), "{printed}");
    assert!(
        printed.contains("topic_template = \"NBtechv1/{device_id}/data\""),
        "{printed}"
    );

    std::fs::write(&file, "[fanout]\nqueue_capacty = 3\n").unwrap();
    let (ok, _, err) = iotpipe(
        &["config", "print", "--config", file.to_str().unwrap()],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("queue_capacty"), "{err}");

    let (ok, _, err) = iotpipe(
        &["config", "generate", "--output", file.to_str().unwrap()],
        &[],
    );
    assert!(!ok, "refuses to overwrite without --force");
    assert!(err.contains("--force"));
}

#[test]
fn an_explicitly_given_port_that_is_taken_is_a_one_line_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = iotpipe(
        &[
            "dev",
            "--http-listen",
            &addr,
            "--mqtt-listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        line.contains("--http-listen") && line.contains(&addr),
        "{err}"
    );
    let (ok, _, err) = iotpipe(
        &[
            "dev",
            "--mqtt-listen",
            &addr,
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.lines()
            .any(|l| l.starts_with("error:") && l.contains("--mqtt-listen")),
        "{err}"
    );
}

#[test]
fn a_taken_default_port_falls_back_to_a_free_one() {
    // The default ports may or may not be free on this machine; take the default HTTP port if it
    // is free, so the fallback path runs either way.
    let _guard = std::net::TcpListener::bind("127.0.0.1:8080").ok();
    let dir = tempfile::tempdir().unwrap();
    let dev = common::Dev::spawn(&dir.path().join("data"), &[]);
    assert_ne!(dev.http.port(), 8080);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, info) = rt.block_on(dev.get("/v1/info"));
    assert_eq!(status, 200);
    assert_eq!(info["http"], dev.http.to_string());
    assert_eq!(info["mqtt"], dev.mqtt.to_string());
    dev.stop();
}

#[test]
fn a_closed_stdout_does_not_take_dev_down() {
    use std::io::{BufRead, BufReader};
    let http = format!("127.0.0.1:{}", common::free_port());
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_iotpipe"))
        .args([
            "dev",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            &http,
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        // Read one line, then close our end while iotpipe still has lines to print.
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: std::net::SocketAddr = http.parse().unwrap();
    let mut healthy = false;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            child.try_wait().unwrap().is_none(),
            "iotpipe dev died after its stdout closed"
        );
        if rt.block_on(common::http_get_opt(addr, "/readyz")) == Some(200) {
            healthy = true;
            break;
        }
    }
    assert!(healthy);
    let _ = child.kill();
    let _ = child.wait();
}

/// Without authentication every caller is an administrator, so the API must not be reachable from
/// outside the machine: `dev` (and `fanout`/`all`, which share the check) refuse a non-loopback
/// address unless `[fanout.auth]` is set, and a too-short HS256 secret is a config error.
#[test]
fn no_public_listener_without_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ok, _, err) = iotpipe(
        &[
            "dev",
            "--data-dir",
            data.to_str().unwrap(),
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "0.0.0.0:0",
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("refusing to serve the API on 0.0.0.0") && err.contains("[fanout.auth]"),
        "{err}"
    );
    let (ok, _, err) = iotpipe(
        &["config", "print"],
        &[
            ("IOTPIPE_FANOUT__AUTH__MODE", "hs256"),
            ("IOTPIPE_FANOUT__AUTH__SECRET", "short"),
        ],
    );
    assert!(!ok);
    assert!(err.contains("at least 32 bytes"), "{err}");
    // With authentication the same address is accepted (the process starts; stop it).
    let cfg = dir.path().join("auth.toml");
    std::fs::write(
        &cfg,
        "[fanout.auth]\nmode = \"hs256\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n",
    )
    .unwrap();
    let dev = common::Dev::spawn(
        &data,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "0.0.0.0:0",
        ],
    );
    dev.stop();
}
