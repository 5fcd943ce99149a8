#!/usr/bin/env bash
# Runs every test of iotpipe: formatting, lints, unit, property and integration tests.
#
# It installs what the tests need and starts what they talk to, so it passes on a fresh machine
# with only a Rust toolchain: scripts/services.sh brings up, on loopback, a Kafka-protocol broker
# (tansu), Redis, Mosquitto, DynamoDB Local and kinesis-mock (installing them where missing and
# reusing ones already running), and exports their endpoints. The `iotpipe dev` tests need none of
# them: they start the real binary, which embeds its broker, log and stores.
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

log "services"
scripts/services.sh up
eval "$(scripts/services.sh env)"

log "format"
cargo fmt --all -- --check

log "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "build"
cargo build --workspace --all-targets --locked

log "doc tests"
cargo test --workspace --doc --locked

# Last, so that its summary is the run's closing line.
log "tests"
cargo nextest run --workspace --locked --no-fail-fast
