//! The control plane: the device registry and rule definitions, as the admin and rules API change
//! them, and the feeds that carry those changes to every process.
//!
//! A change is written to its durable store first (registry: the embedded table or DynamoDB; rule
//! definitions: the embedded table or Redis), then announced on its topic (`iot.registry`,
//! `iot.rules`, both compacted). Every process follows the topics ([`RegistryFeed`],
//! [`RulesFeed`]): registry events drop cached entries, rule events load the new version into the
//! process's rule engine — no restart. A worker that starts joins the topic first, then loads every
//! stored rule, so no change falls between the two; versions make the order of the two harmless.

use std::sync::Arc;

use async_trait::async_trait;
use iotpipe_pipeline::kv::{KeyValue, KvWrite};
use iotpipe_pipeline::log::{Log, LogRecord, Produce, Topics};
use iotpipe_pipeline::registry::{CachedRegistry, DeviceEntry, RegistryEvent};
use iotpipe_pipeline::runtime::{Operator, OperatorError};
use iotpipe_pipeline::store::StoreError;
use iotpipe_rules::engine::{
    rule_key, stored_alarms, stored_rules, ActiveAlarm, Rule, RuleEngine, RuleEvent,
};
use iotpipe_rules::sandbox::{Limits as RuleLimits, RuleError, Sandbox};
use tracing::warn;

/// Why a control-plane change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The input is invalid (400).
    #[error("{0}")]
    Invalid(String),
    /// The script does not compile (422).
    #[error("{line}:{column}: {message}")]
    Compile {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A backend failed (503).
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

impl From<iotpipe_pipeline::log::LogError> for ControlError {
    fn from(e: iotpipe_pipeline::log::LogError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// The registry and the rule definitions, with the log their changes are announced on.
pub struct Control {
    /// The device registry, cached.
    pub registry: Arc<CachedRegistry>,
    /// Rule definitions (`rule/`) and, where the rules operator writes them, alarms (`alarm/`).
    pub kv: Arc<dyn KeyValue>,
    log: Arc<dyn Log>,
    topics: Topics,
    sandbox: Sandbox,
}

impl Control {
    /// Builds the control plane.
    pub fn new(
        registry: Arc<CachedRegistry>,
        kv: Arc<dyn KeyValue>,
        log: Arc<dyn Log>,
        topics: Topics,
        limits: RuleLimits,
    ) -> Self {
        Self {
            registry,
            kv,
            log,
            topics,
            sandbox: Sandbox::new(limits),
        }
    }

    /// Registers (or re-registers) a device.
    ///
    /// # Errors
    /// [`ControlError`].
    pub async fn register_device(
        &self,
        device: &str,
        owner: &str,
        groups: Vec<String>,
    ) -> Result<DeviceEntry, ControlError> {
        let mut entries = self
            .register_devices(vec![(device.to_owned(), owner.to_owned(), groups)])
            .await?;
        entries
            .pop()
            .ok_or_else(|| ControlError::Unavailable("registration returned nothing".into()))
    }

    /// Registers (or re-registers) many devices: all are checked first, then stored in one
    /// batch and announced in one append.
    ///
    /// # Errors
    /// [`ControlError::Invalid`] naming the first bad entry (nothing is stored), or
    /// [`ControlError::Unavailable`].
    pub async fn register_devices(
        &self,
        devices: Vec<(String, String, Vec<String>)>,
    ) -> Result<Vec<DeviceEntry>, ControlError> {
        let now = iotpipe_pipeline::time::now_ms();
        let mut entries = Vec::with_capacity(devices.len());
        for (device, owner, groups) in devices {
            iotpipe_pipeline::record::validate_device_id(&device)
                .map_err(|e| ControlError::Invalid(format!("`{device}`: {}", e.detail)))?;
            if owner.is_empty() || owner.len() > 256 {
                return Err(ControlError::Invalid(format!(
                    "`{device}`: owner must be 1-256 characters"
                )));
            }
            if groups.len() > 32 || groups.iter().any(|g| g.is_empty() || g.len() > 128) {
                return Err(ControlError::Invalid(format!(
                    "`{device}`: at most 32 groups of 1-128 characters"
                )));
            }
            entries.push(DeviceEntry {
                device,
                owner,
                groups,
                updated_at: now,
            });
        }
        self.registry.store().put_many(&entries).await?;
        let mut events = Vec::with_capacity(entries.len());
        for e in &entries {
            self.registry.invalidate(&e.device);
            let ev = RegistryEvent {
                device: e.device.clone(),
                entry: Some(e.clone()),
            };
            events.push(Produce::json(&e.device, &ev)?);
        }
        self.log.append(&self.topics.registry, events).await?;
        Ok(entries)
    }

    /// Removes a device from the registry; returns whether it was registered.
    ///
    /// # Errors
    /// [`ControlError`].
    pub async fn remove_device(&self, device: &str) -> Result<bool, ControlError> {
        let existed = self.registry.store().remove(device).await?;
        self.announce_device(device, None).await?;
        Ok(existed)
    }

    async fn announce_device(
        &self,
        device: &str,
        entry: Option<DeviceEntry>,
    ) -> Result<(), ControlError> {
        self.registry.invalidate(device);
        let ev = RegistryEvent {
            device: device.to_owned(),
            entry,
        };
        self.log
            .append(&self.topics.registry, vec![Produce::json(device, &ev)?])
            .await?;
        Ok(())
    }

    /// Registered devices, of `owner` only when given.
    ///
    /// # Errors
    /// [`ControlError::Unavailable`].
    pub async fn devices(&self, owner: Option<&str>) -> Result<Vec<DeviceEntry>, ControlError> {
        Ok(self.registry.store().list(owner).await?)
    }

    /// Checks, versions, stores and announces a rule; returns it as stored.
    ///
    /// # Errors
    /// [`ControlError::Invalid`], [`ControlError::Compile`] with line and column, or
    /// [`ControlError::Unavailable`].
    pub async fn put_rule(&self, mut rule: Rule) -> Result<Rule, ControlError> {
        rule.validate().map_err(ControlError::Invalid)?;
        if rule.script.len() > 64 * 1024 {
            return Err(ControlError::Invalid("script is larger than 64 KiB".into()));
        }
        if let Err(e) = self.sandbox.compile(&rule.script) {
            return Err(match e {
                RuleError::Compile {
                    line,
                    column,
                    message,
                } => ControlError::Compile {
                    line,
                    column,
                    message,
                },
                other => ControlError::Invalid(other.to_string()),
            });
        }
        if rule.name.is_empty() {
            rule.name.clone_from(&rule.id);
        }
        let old = self.rule(&rule.id).await?;
        rule.version = iotpipe_pipeline::time::now_ms().max(old.map_or(0, |o| o.version + 1));
        let value = serde_json::to_vec(&rule).map_err(|e| ControlError::Invalid(e.to_string()))?;
        self.kv
            .apply(vec![KvWrite::Put(rule_key(&rule.id), value)])
            .await?;
        let ev = RuleEvent {
            id: rule.id.clone(),
            version: rule.version,
            rule: Some(rule.clone()),
        };
        self.log
            .append(&self.topics.rules, vec![Produce::json(&rule.id, &ev)?])
            .await?;
        Ok(rule)
    }

    /// Removes a rule; returns whether it existed.
    ///
    /// # Errors
    /// [`ControlError::Unavailable`].
    pub async fn delete_rule(&self, id: &str) -> Result<bool, ControlError> {
        let Some(old) = self.rule(id).await? else {
            return Ok(false);
        };
        self.kv.apply(vec![KvWrite::Delete(rule_key(id))]).await?;
        let ev = RuleEvent {
            id: id.to_owned(),
            version: iotpipe_pipeline::time::now_ms().max(old.version + 1),
            rule: None,
        };
        self.log
            .append(&self.topics.rules, vec![Produce::json(id, &ev)?])
            .await?;
        Ok(true)
    }

    /// The stored rule `id`.
    ///
    /// # Errors
    /// [`ControlError::Unavailable`].
    pub async fn rule(&self, id: &str) -> Result<Option<Rule>, ControlError> {
        Ok(self
            .kv
            .get(&rule_key(id))
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Stored rules, of `owner` only when given, sorted by id.
    ///
    /// # Errors
    /// [`ControlError::Unavailable`].
    pub async fn rules(&self, owner: Option<&str>) -> Result<Vec<Rule>, ControlError> {
        let mut v: Vec<Rule> = stored_rules(self.kv.as_ref())
            .await
            .map_err(ControlError::Unavailable)?
            .into_iter()
            .filter(|r| owner.is_none_or(|o| o == r.owner))
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// Active alarms, of `owner` only when given.
    ///
    /// # Errors
    /// [`ControlError::Unavailable`].
    pub async fn alarms(&self, owner: Option<&str>) -> Result<Vec<ActiveAlarm>, ControlError> {
        stored_alarms(self.kv.as_ref(), owner)
            .await
            .map_err(ControlError::Unavailable)
    }
}

/// Follows the registry topic: drops cached entries of changed devices.
pub struct RegistryFeed(pub Arc<CachedRegistry>);

#[async_trait]
impl Operator for RegistryFeed {
    fn name(&self) -> &'static str {
        "registry_feed"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        for r in batch {
            // The key is the device id whatever the value says.
            self.0.invalidate(&String::from_utf8_lossy(&r.key));
        }
        Ok(())
    }
}

/// Follows the rules topic: loads new versions into the engine, removes deleted rules.
pub struct RulesFeed(pub Arc<RuleEngine>);

#[async_trait]
impl Operator for RulesFeed {
    fn name(&self) -> &'static str {
        "rules_feed"
    }

    async fn process(&mut self, batch: &[LogRecord]) -> Result<(), OperatorError> {
        for r in batch {
            match serde_json::from_slice::<RuleEvent>(&r.value) {
                Ok(ev) => {
                    if let Err(e) = self.0.apply_event(&ev) {
                        // The API compiled it; a worker with other limits may not.
                        warn!(rule = %ev.id, error = %e, "Rule from the rules topic does not compile here.");
                    }
                }
                Err(e) => {
                    warn!(partition = r.partition, offset = r.offset, error = %e, "Skipped undecodable rule event.");
                }
            }
        }
        Ok(())
    }
}
