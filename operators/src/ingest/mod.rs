//! The ingest operator: device messages from MQTT into the telemetry topic.
//!
//! It subscribes with QoS 1, a persistent session and manual acknowledgements. A message is
//! PUBACKed only after [`iotpipe_pipeline::runtime::run_ingest`] appended its record (or its dead
//! letter) to the log: until then the broker keeps it and redelivers it to a restarted ingest.
//!
//! The subscription covers more than the template (`devices/#` for `devices/{device_id}/telemetry`)
//! so that a message on a wrong topic under the same prefix becomes a `topic_mismatch` dead letter
//! that someone can see, rather than being silently ignored by the broker.

mod config;
mod template;

pub use config::IngestConfig;
pub use template::{TemplateError, TopicTemplate};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use iotpipe_pipeline::record::{validate_device_id, RejectReason, Rejection, SourceRef};
use iotpipe_pipeline::source::{Incoming, Source, SourceError};
use iotpipe_pipeline::time::now_ms;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Called by [`Source::stop_intake`]: stops devices from publishing more (the embedded broker's
/// device listener closes).
pub type StopHook = Arc<dyn Fn() + Send + Sync>;

/// An MQTT [`Source`] built on rumqttc.
pub struct MqttSource {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Publish>,
    unacked: Vec<Publish>,
    template: TopicTemplate,
    stop_hook: Option<StopHook>,
    task: JoinHandle<()>,
    subscribed: tokio::sync::watch::Receiver<bool>,
}

impl MqttSource {
    /// Connects to `host:port` and subscribes to the template's filter.
    ///
    /// # Errors
    /// [`TemplateError`] for an invalid template; connection errors are retried in the background.
    pub fn connect(
        host: &str,
        port: u16,
        cfg: &IngestConfig,
        max_packet: usize,
    ) -> Result<Self, TemplateError> {
        let template = TopicTemplate::parse(&cfg.topic_template)?;
        let mut opts = MqttOptions::new(cfg.client_id.clone(), host, port);
        opts.set_keep_alive(cfg.keep_alive.max(Duration::from_secs(5)))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(max_packet, max_packet);
        let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
        // Acknowledgements are tiny writes: without TCP_NODELAY they can wait out a delayed ACK.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (tx, rx) = mpsc::unbounded_channel();
        let filter = template.subscription_filter();
        let (sub_tx, subscribed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(drive(eventloop, client.clone(), filter, tx, sub_tx));
        Ok(Self {
            client,
            rx,
            unacked: Vec::new(),
            template,
            stop_hook: None,
            task,
            subscribed,
        })
    }

    /// True once the broker acknowledged the subscription (false again while disconnected). A
    /// broker acknowledges a device's QoS 1 publish even when nobody subscribes, so devices must
    /// not be let in before this: `iotpipe dev` opens its public port only then.
    pub fn subscribed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.subscribed.clone()
    }

    /// Sets what [`Source::stop_intake`] does.
    #[must_use]
    pub fn with_stop_hook(mut self, hook: StopHook) -> Self {
        self.stop_hook = Some(hook);
        self
    }

    /// Disconnects from the broker (after the last ack).
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }

    fn incoming(&self, p: &Publish) -> Incoming {
        let topic = p.topic.clone();
        let device = match self.template.device_of(&topic) {
            Some(d) => validate_device_id(d).map(|()| d.to_owned()),
            None => Err(Rejection::new(
                RejectReason::TopicMismatch,
                format!(
                    "topic `{topic}` does not match template `{}`",
                    self.template
                ),
            )),
        };
        Incoming {
            device,
            payload: Bytes::copy_from_slice(&p.payload),
            source: SourceRef::Mqtt { topic },
            received_at: now_ms(),
            arrival: iotpipe_pipeline::time::arrival_ns(),
        }
    }
}

/// Polls the event loop: forwards publishes, (re)subscribes on every connect, and keeps going
/// through disconnects (rumqttc reconnects on the next poll).
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    tx: mpsc::UnboundedSender<Publish>,
    subscribed: tokio::sync::watch::Sender<bool>,
) {
    let mut failures: u32 = 0;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // Unbounded is safe: the broker sends at most its inflight limit of unacknowledged
                // QoS 1 messages, and a bounded channel here could deadlock with `ack`, which needs
                // this loop to keep polling.
                if tx.send(p).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                info!(session_present = ack.session_present, filter = %filter, "Ingest connected to MQTT broker.");
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    warn!(error = %e, "Subscribe request failed.");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subscribed.send_replace(true);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                debug!("Ingest disconnected.");
                return;
            }
            Ok(_) => {}
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(e) => {
                subscribed.send_replace(false);
                if tx.is_closed() {
                    return;
                }
                failures = failures.saturating_add(1);
                let delay = Duration::from_millis(100 * u64::from(failures.min(20)));
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed.");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[async_trait]
impl Source for MqttSource {
    async fn recv(&mut self, max: usize, out: &mut Vec<Incoming>) -> Result<(), SourceError> {
        // `recv` on an mpsc receiver is cancel-safe: a message is either returned or left queued.
        let Some(first) = self.rx.recv().await else {
            return Err(SourceError::Closed);
        };
        out.push(self.incoming(&first));
        self.unacked.push(first);
        while out.len() < max {
            match self.rx.try_recv() {
                Ok(p) => {
                    out.push(self.incoming(&p));
                    self.unacked.push(p);
                }
                Err(_) => break,
            }
        }
        Ok(())
    }

    async fn ack(&mut self) -> Result<(), SourceError> {
        for p in self.unacked.drain(..) {
            self.client
                .ack(&p)
                .await
                .map_err(|e| SourceError::Disconnected(e.to_string()))?;
        }
        Ok(())
    }

    async fn stop_intake(&mut self) {
        if let Some(hook) = &self.stop_hook {
            hook();
        }
    }
}
