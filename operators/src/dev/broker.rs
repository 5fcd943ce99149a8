//! The embedded MQTT broker of `iotpipe dev`: rumqttd behind a small TCP proxy.
//!
//! rumqttd listens on a private loopback port; devices connect to the public address, where a proxy
//! forwards bytes to it. The proxy exists for shutdown: rumqttd has no stop API, but closing the
//! proxy stops devices from publishing more while ingest (connected to the private port) drains
//! what the broker already accepted. A message the broker PUBACKed is therefore drained into the
//! log; one it did not is retransmitted by the device after the restart. It also lets us bind the
//! public port ourselves and report a taken port clearly.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Starts rumqttd on a free private loopback port and waits until it accepts connections.
///
/// `max_payload` must exceed the pipeline's own payload limit, so that an oversized message is
/// dead-lettered with a reason instead of the broker dropping the device's connection.
///
/// # Errors
/// When no port is free or the broker does not come up within 10 s.
pub async fn start_rumqttd(max_payload: usize) -> anyhow::Result<SocketAddr> {
    let addr = StdListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut v4 = std::collections::HashMap::new();
    v4.insert(
        "internal".to_owned(),
        rumqttd::ServerSettings {
            name: "internal".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: max_payload,
                max_inflight_count: 1000,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100_000,
            max_outgoing_packet_count: 1000,
            // rumqttd keeps every accepted message in an in-memory commit log until it falls out
            // of these segments. Their size counts payload bytes only; with its per-message
            // overhead 8 x 4 MiB holds about 400,000 small messages in ~150 MiB: 20 s of backlog
            // at 20,000 msg/s for ingest to catch up after a stall. (Larger segments grew the
            // process by 600 MiB under sustained load; docs/BENCHMARKS.md.)
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 8,
            ..Default::default()
        },
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "Embedded MQTT broker stopped.");
            }
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(addr);
        }
        if Instant::now() > deadline {
            anyhow::bail!("embedded MQTT broker did not start on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Forwards every connection accepted on `listener` to `upstream` until `intake` is cancelled;
/// then stops accepting and closes every forwarded connection.
pub fn spawn_proxy(listener: TcpListener, upstream: SocketAddr, intake: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = intake.cancelled() => break,
                a = listener.accept() => a,
            };
            let (mut client, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!(error = %e, "MQTT accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let token = intake.clone();
            tokio::spawn(async move {
                let mut server = match TcpStream::connect(upstream).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%peer, error = %e, "Cannot reach the embedded broker.");
                        return;
                    }
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                tokio::select! {
                    () = token.cancelled() => debug!(%peer, "Closing device connection for shutdown."),
                    r = tokio::io::copy_bidirectional(&mut client, &mut server) => {
                        if let Err(e) = r {
                            debug!(%peer, error = %e, "Device connection ended.");
                        }
                    }
                }
            });
        }
        debug!("MQTT listener closed.");
    });
}
