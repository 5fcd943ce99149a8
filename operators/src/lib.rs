//! iotpipe's operators and its command line.
//!
//! Each operator is written once against the traits of `iotpipe-pipeline` and runs unchanged on the
//! embedded backends (`iotpipe dev`) and on the distributed ones.
//!
//! # Layout
//! - [`ingest`]: the MQTT source (topic template, QoS 1, manual acks after the log append).
//! - [`materialize`]: merges records into latest state and emits change events.
//! - [`history`]: writes every record to the history store.
//! - [`rules`]: runs subscription rules (the sandboxed Rhai engine of `iotpipe-rules`) on records.
//! - [`webhooks`]: delivers alerts to the webhooks of their rules (signed, retried, dead-lettered).
//! - [`control`]: the device registry and rule definitions, their API and their feeds.
//! - [`http_client`]: the HTTP client of webhooks and the admin CLI.
//! - [`dead_letters`]: keeps the recent dead letters for the API.
//! - [`fanout`]: the HTTP API, the WebSocket push hub, and the built-in dashboard.
//! - [`dev`]: `iotpipe dev`, the whole pipeline in one process with an embedded MQTT broker.
//! - [`distributed`]: one process per operator (or `all`) on Kafka, Redis and DynamoDB.
//! - [`tasks`]: spawning operators and judging a shutdown, shared by both modes.
//! - [`config`]: the configuration file, its layering, validation and generated template.
//! - [`cli`]: the `iotpipe` command line.

pub mod cli;
pub mod config;
pub mod control;
pub mod dead_letters;
pub mod dev;
pub mod distributed;
pub mod fanout;
pub mod history;
pub mod http_client;
pub mod ingest;
pub mod materialize;
pub mod rules;
pub mod tasks;
pub mod webhooks;
