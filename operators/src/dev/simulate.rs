//! The built-in device simulator (`iotpipe dev --simulate N`): N devices publishing realistic
//! telemetry over MQTT, the same way real devices do, through the public broker address.
//!
//! Each device drifts its temperature and humidity every message, drains its battery slowly,
//! changes signal strength now and then and rarely reports a warning, so updates carry only a few
//! changed fields, as real telemetry does.

use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::ingest::TopicTemplate;

/// Devices sharing one MQTT connection of the simulator.
const DEVICES_PER_CONNECTION: u32 = 100;

struct SimDevice {
    id: String,
    topic: String,
    temperature: f64,
    humidity: f64,
    battery: f64,
    rssi: i64,
    status: &'static str,
}

impl SimDevice {
    fn new(n: u32, template: &TopicTemplate, rng: &mut StdRng) -> Self {
        let id = format!("sim-{n:04}");
        Self {
            topic: template.topic_for(&id),
            id,
            temperature: rng.gen_range(18.0..26.0),
            humidity: rng.gen_range(35.0..60.0),
            battery: rng.gen_range(60.0..100.0),
            rssi: rng.gen_range(-90..-50),
            status: "ok",
        }
    }

    fn step(&mut self, rng: &mut StdRng) -> serde_json::Value {
        self.temperature = (self.temperature + rng.gen_range(-0.3..0.3)).clamp(-20.0, 60.0);
        self.humidity = (self.humidity + rng.gen_range(-0.8..0.8)).clamp(5.0, 95.0);
        if rng.gen_bool(0.05) {
            self.battery = (self.battery - 0.1).max(0.0);
        }
        if rng.gen_bool(0.2) {
            self.rssi = (self.rssi + rng.gen_range(-3..=3)).clamp(-110, -30);
        }
        self.status = if self.temperature > 35.0 || rng.gen_bool(0.01) {
            "warn"
        } else {
            "ok"
        };
        json!({
            "ts": iotpipe_pipeline::time::now_ms(),
            "temperature": (self.temperature * 100.0).round() / 100.0,
            "humidity": (self.humidity * 10.0).round() / 10.0,
            "battery": (self.battery * 10.0).round() / 10.0,
            "rssi": self.rssi,
            "status": self.status,
        })
    }
}

/// Runs `devices` simulated devices against the broker at `broker` until `stop` is cancelled.
pub async fn run(
    broker: SocketAddr,
    template: TopicTemplate,
    devices: u32,
    interval: Duration,
    stop: CancellationToken,
) {
    info!(
        devices,
        interval_ms = interval.as_millis() as u64,
        "Simulator started."
    );
    let mut tasks = Vec::new();
    let mut first = 0;
    let mut conn = 0;
    while first < devices {
        let count = DEVICES_PER_CONNECTION.min(devices - first);
        tasks.push(tokio::spawn(connection(
            broker,
            template.clone(),
            conn,
            first,
            count,
            interval,
            stop.clone(),
        )));
        first += count;
        conn += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
    info!("Simulator stopped.");
}

async fn connection(
    broker: SocketAddr,
    template: TopicTemplate,
    conn: u32,
    first: u32,
    count: u32,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut rng = StdRng::from_entropy();
    let mut opts = MqttOptions::new(
        format!("iotpipe-sim-{conn}"),
        broker.ip().to_string(),
        broker.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let poll_stop = stop.clone();
    let poller = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = poll_stop.cancelled() => break,
                r = eventloop.poll() => if let Err(e) = r {
                    debug!(error = %e, "Simulator connection failed; retrying.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    let mut devs: Vec<SimDevice> = (first..first + count)
        .map(|n| SimDevice::new(n, &template, &mut rng))
        .collect();
    // Spread the devices of this connection evenly over the interval.
    let mut tick = tokio::time::interval(interval / count.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = 0usize;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let n = devs.len();
        let d = &mut devs[i % n];
        let payload = d.step(&mut rng).to_string();
        if client
            .try_publish(d.topic.clone(), QoS::AtLeastOnce, false, payload)
            .is_err()
        {
            debug!(device = %d.id, "Simulator queue full; skipping a message.");
        }
        i = i.wrapping_add(1);
    }
    let _ = client.disconnect().await;
    let _ = poller.await;
}
