#!/usr/bin/env bash
# Runs every test of iotpipe: formatting, lints, unit, property and integration tests.
#
# It installs what the tests need and starts what they talk to, so it passes on a fresh machine
# with only a Rust toolchain. Step 1 (`iotpipe dev`) needs no external service: the integration
# tests start the real `iotpipe` binary, which embeds its MQTT broker, log and stores, and talk to
# it over MQTT, HTTP and WebSocket on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust from https://rustup.rs" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

log "format"
cargo fmt --all -- --check

log "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "build"
cargo build --workspace --all-targets --locked

log "tests"
cargo nextest run --workspace --locked --no-fail-fast

log "doc tests"
cargo test --workspace --doc --locked
