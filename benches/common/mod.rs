//! Helpers shared by the load generators (`loadgen`, `fanout_load`): start `iotpipe dev` as a
//! child process on free ports, read a process's CPU time and RSS from /proc, and the clock the
//! latency stamps use.
//!
//! Each bench pulls this in with `mod common;`; not every bench uses every helper.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: publishers stamp `sent_us` with it and receivers subtract it
/// from the same clock, so latency needs both ends in one process (or on one machine).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A running `iotpipe dev` child and the addresses it printed.
pub struct Server {
    pub child: Child,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    /// Holds the data dir (and any config file the caller wrote there) until the server is gone.
    pub dir: tempfile::TempDir,
}

impl Server {
    /// Sends SIGTERM and waits for the exit, so the data dir is not removed under a running server.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Starts `bin dev --mqtt-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --data-dir <dir>/data`
/// followed by `extra`, and waits for the broker and dashboard lines on its stdout.
pub fn start_server(bin: &Path, dir: tempfile::TempDir, extra: &[&OsStr]) -> Server {
    let mut child = Command::new(bin)
        .args([
            "dev",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .args(extra)
        .env("RUST_LOG", "warn,rumqttd=off")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start iotpipe dev");
    let out = BufReader::new(child.stdout.take().unwrap());
    let (mut mqtt, mut http) = (None, None);
    let mut lines = out.lines();
    for line in lines.by_ref().map_while(Result::ok) {
        let addr = || {
            line.split_whitespace().find_map(|w| {
                w.trim_start_matches("http://")
                    .trim_end_matches('/')
                    .parse()
                    .ok()
            })
        };
        if line.contains("MQTT broker:") {
            mqtt = addr();
        } else if line.contains("Dashboard:") {
            http = addr();
        }
        if mqtt.is_some() && http.is_some() {
            break;
        }
    }
    // Keep draining the server's stdout so it never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Server {
        child,
        mqtt: mqtt.expect("mqtt address"),
        http: http.expect("http address"),
        dir,
    }
}

/// (utime + stime) in seconds and RSS in KiB of a process, from /proc.
pub fn proc_stats(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((cpu, rss))
}
