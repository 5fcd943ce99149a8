//! The configuration: one TOML file plus `IOTPIPE_...` environment overrides.
//!
//! Layering, lowest precedence first:
//! 1. compiled-in defaults (every field has one; `iotpipe config generate` prints them, commented);
//! 2. the file given with `--config`;
//! 3. environment variables `IOTPIPE_<SECTION>__<KEY>=value` (double underscore between levels,
//!    e.g. `IOTPIPE_INGEST__TOPIC_TEMPLATE=NBtechv1/{device_id}/data`); values are read as TOML
//!    values when they parse as one (numbers, booleans), else as strings;
//! 4. command-line flags, which the `dev` command applies last.
//!
//! Unknown keys are errors at every layer, and validation reports every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iotpipe_pipeline::log::Topics;
use iotpipe_pipeline::record::Limits;
use serde::{Deserialize, Serialize};

use iotpipe_dynamodb::DynamoConfig;
use iotpipe_kafka::KafkaConfig;
use iotpipe_redis::RedisConfig;

use crate::dead_letters::DeadLettersConfig;
use crate::fanout::FanoutConfig;
use crate::history::HistoryConfig;
use crate::ingest::IngestConfig;
use crate::materialize::MaterializeConfig;
use crate::rules::RulesConfig;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `iotpipe dev`: the embedded, single-process mode.
    pub dev: DevConfig,
    /// Limits applied to every device message.
    pub limits: Limits,
    /// Topic names.
    pub topics: Topics,
    /// The ingest operator.
    pub ingest: IngestConfig,
    /// The materialize operator.
    pub materialize: MaterializeConfig,
    /// The history operator.
    pub history: HistoryConfig,
    /// The rules operator.
    pub rules: RulesConfig,
    /// The dead-letter keeper.
    pub dead_letters: DeadLettersConfig,
    /// The fanout service: HTTP API and WebSocket push.
    pub fanout: FanoutConfig,
    /// Distributed mode: the process's HTTP endpoint, identity and drain.
    pub server: ServerConfig,
    /// Distributed mode: the Kafka log.
    pub kafka: KafkaConfig,
    /// Distributed mode: Redis (latest state, dead letters, history cache).
    pub redis: RedisConfig,
    /// Distributed mode: the DynamoDB history table.
    pub dynamodb: DynamoConfig,
}

/// Settings of a distributed-mode process (`iotpipe ingest|materialize|history|rules|fanout|all`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTP address: `/healthz`, `/readyz`, `/metrics` on every process, plus the API, WebSocket
    /// and dashboard on `fanout` and `all`.
    pub http_listen: SocketAddr,
    /// Name of this instance (each fanout instance consumes all changes in its own consumer
    /// group, named after it). Unset: `$HOSTNAME` (the pod name in Kubernetes), else a random id.
    pub instance_id: Option<String>,
    /// How long fanout caches a history page in Redis (`X-Cache: HIT|MISS`).
    #[serde(with = "humantime_serde")]
    pub history_cache_ttl: Duration,
    /// Longest a graceful shutdown may take before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            instance_id: None,
            history_cache_ttl: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Settings of `iotpipe dev`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevConfig {
    /// Address of the embedded MQTT broker. Unset: 127.0.0.1:1883, or a free port when that is taken.
    pub mqtt_listen: Option<SocketAddr>,
    /// Address of the HTTP API, WebSocket and dashboard. Unset: 127.0.0.1:8080, or a free port when taken.
    pub http_listen: Option<SocketAddr>,
    /// Directory for the embedded stores (latest state, history, dead letters).
    pub data_dir: PathBuf,
    /// Number of simulated devices publishing over MQTT (0 = none).
    pub simulate: u32,
    /// How often each simulated device publishes.
    #[serde(with = "humantime_serde")]
    pub simulate_interval: Duration,
    /// Partitions of each topic of the in-process log.
    pub log_partitions: u32,
    /// Records a partition of the in-process log holds before appends wait (back-pressure).
    pub log_capacity: usize,
    /// Longest a graceful shutdown may take before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

/// The default MQTT address of `iotpipe dev`.
pub const DEFAULT_MQTT_LISTEN: &str = "127.0.0.1:1883";
/// The default HTTP address of `iotpipe dev`.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            mqtt_listen: None,
            http_listen: None,
            data_dir: PathBuf::from("./iotpipe-data"),
            simulate: 0,
            simulate_interval: Duration::from_secs(1),
            log_partitions: 8,
            log_capacity: 100_000,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file, an environment override or a value is malformed or unknown.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// Values are individually well-formed but not acceptable; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Loads defaults, then `file`, then the `IOTPIPE_..__..` variables of `env`, and validates.
    ///
    /// # Errors
    /// [`ConfigError`] naming every problem found.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text)
                    .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("IOTPIPE_") else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value.clone()));
            set_path(&mut table, &path, parsed)
                .map_err(|e| ConfigError::Parse(format!("{key}: {e}")))?;
        }
        let config: Config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; reports all problems at once.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing each problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if let Err(e) = crate::ingest::TopicTemplate::parse(&self.ingest.topic_template) {
            errors.push(format!("ingest.topic_template: {e}"));
        }
        let positive = [
            ("ingest.max_batch", self.ingest.max_batch),
            ("materialize.max_batch", self.materialize.max_batch),
            ("history.max_batch", self.history.max_batch),
            ("fanout.queue_capacity", self.fanout.queue_capacity),
            ("fanout.max_message_bytes", self.fanout.max_message_bytes),
            ("fanout.max_history_limit", self.fanout.max_history_limit),
            ("dev.log_capacity", self.dev.log_capacity),
            ("limits.max_payload_bytes", self.limits.max_payload_bytes),
            ("limits.max_depth", self.limits.max_depth),
        ];
        for (name, v) in positive {
            if v == 0 {
                errors.push(format!("{name} must be greater than 0"));
            }
        }
        errors.extend(self.fanout.problems());
        if self.dev.log_partitions == 0 || self.dev.log_partitions > 1024 {
            errors.push("dev.log_partitions must be between 1 and 1024".into());
        }
        if self.limits.max_depth > 128 {
            errors
                .push("limits.max_depth must be at most 128 (the JSON parser's own limit)".into());
        }
        if self.dev.simulate > 100_000 {
            errors.push("dev.simulate must be at most 100000".into());
        }
        if self.dev.simulate_interval < Duration::from_millis(10) {
            errors.push("dev.simulate_interval must be at least 10ms".into());
        }
        for (name, t) in [
            ("topics.telemetry", &self.topics.telemetry),
            ("topics.changes", &self.topics.changes),
            ("topics.alerts", &self.topics.alerts),
            ("topics.dead_letters", &self.topics.dead_letters),
            ("topics.rules", &self.topics.rules),
            ("topics.registry", &self.topics.registry),
        ] {
            if t.is_empty()
                || t.len() > 249
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                errors.push(format!(
                    "{name}: `{t}` is not a valid topic name (1-249 of [A-Za-z0-9._-])"
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".into());
    };
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    t.insert(last.clone(), value);
    Ok(())
}

/// The commented default configuration written by `iotpipe config generate`.
pub const TEMPLATE: &str = include_str!("config_template.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_the_default() {
        let parsed: Config =
            toml::from_str(TEMPLATE).unwrap_or_else(|e| unreachable!("template must parse: {e}"));
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn template_mentions_every_key() {
        let rendered: toml::Table =
            toml::from_str(&Config::default().to_toml()).unwrap_or_default();
        for (section, v) in &rendered {
            let Some(t) = v.as_table() else { continue };
            assert!(
                TEMPLATE.contains(&format!("[{section}]")),
                "template lacks [{section}]"
            );
            for (key, value) in t {
                if let Some(sub) = value.as_table() {
                    // A nested section, e.g. [rules.limits] (an empty map may stay inline).
                    if sub.is_empty() {
                        continue;
                    }
                    assert!(
                        TEMPLATE.contains(&format!("[{section}.{key}]")),
                        "template lacks [{section}.{key}]"
                    );
                    for k in sub.keys() {
                        assert!(
                            TEMPLATE.contains(&format!("{k} =")),
                            "template lacks {section}.{key}.{k}"
                        );
                    }
                    continue;
                }
                assert!(
                    TEMPLATE.contains(&format!("{key} =")),
                    "template lacks {section}.{key}"
                );
            }
        }
    }

    #[test]
    fn env_overrides_file_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[ingest]\ntopic_template = \"a/{device_id}\"\nmax_batch = 10\n",
        )
        .unwrap_or_default();
        let env = vec![
            (
                "IOTPIPE_INGEST__TOPIC_TEMPLATE".to_owned(),
                "NBtechv1/{device_id}/data".to_owned(),
            ),
            ("IOTPIPE_DEV__SIMULATE".to_owned(), "5".to_owned()),
            ("IOTPIPE_UNRELATED".to_owned(), "x".to_owned()),
        ];
        let c = Config::load(Some(&file), env).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.ingest.topic_template, "NBtechv1/{device_id}/data");
        assert_eq!(c.ingest.max_batch, 10);
        assert_eq!(c.dev.simulate, 5);

        std::fs::write(&file, "[ingest]\ntopic_tempalte = \"x\"\n").unwrap_or_default();
        let err = Config::load(Some(&file), Vec::new())
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(
            matches!(&err, Err(e) if e.contains("topic_tempalte")),
            "{err:?}"
        );

        let err = Config::load(
            None,
            vec![("IOTPIPE_FANOUT__NOPE".to_owned(), "1".to_owned())],
        )
        .map(|_| ());
        assert!(err.is_err());
    }

    #[test]
    fn validation_reports_every_problem() {
        let mut c = Config::default();
        c.ingest.topic_template = "devices/+/x".into();
        c.materialize.max_batch = 0;
        c.topics.changes = "bad topic".into();
        match c.validate() {
            Err(ConfigError::Invalid(errs)) => assert_eq!(errs.len(), 3, "{errs:?}"),
            other => unreachable!("expected invalid, got {other:?}"),
        }
    }
}
