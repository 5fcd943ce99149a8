//! The device registry: which user owns a device, and the groups it belongs to. Rules only see
//! records of their owner's devices, and fanout's access control (step 4) asks the same registry.
//!
//! - [`RegistryStore`]: the durable table (an embedded key-value table in `iotpipe dev`, a
//!   DynamoDB table in distributed mode).
//! - [`CachedRegistry`]: what operators ask, per record. Entries (and "not registered") are kept
//!   for a TTL; a change made through the admin API is written to the store first, then announced
//!   on the registry topic, and every process drops its cached entry when the announcement reaches
//!   it ([`CachedRegistry::invalidate`]), so a change is seen within one topic delivery, and at
//!   worst within the TTL if an announcement is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::kv::{KeyValue, KvWrite};
use crate::store::StoreError;

/// One registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Device id.
    pub device: String,
    /// The user who owns it.
    pub owner: String,
    /// Groups it belongs to (for selectors and access control).
    #[serde(default)]
    pub groups: Vec<String>,
    /// When it was registered or last changed, epoch ms.
    #[serde(default)]
    pub updated_at: i64,
}

/// What the registry topic carries: a device whose entry changed (the entry, or `None` when it was
/// removed). Consumers only use it to drop cached entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEvent {
    /// The device.
    pub device: String,
    /// Its new entry; `None` when removed.
    pub entry: Option<DeviceEntry>,
}

/// The durable device table.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// The entry of `device`.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    async fn get(&self, device: &str) -> Result<Option<DeviceEntry>, StoreError>;

    /// Creates or replaces an entry.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    async fn put(&self, entry: &DeviceEntry) -> Result<(), StoreError>;

    /// Creates or replaces many entries (one transaction where the store has them).
    ///
    /// # Errors
    /// [`StoreError`]; some entries may be stored when a store without transactions fails.
    async fn put_many(&self, entries: &[DeviceEntry]) -> Result<(), StoreError> {
        for e in entries {
            self.put(e).await?;
        }
        Ok(())
    }

    /// Removes an entry; returns whether it existed.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    async fn remove(&self, device: &str) -> Result<bool, StoreError>;

    /// Every entry, or only `owner`'s, sorted by device id.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    async fn list(&self, owner: Option<&str>) -> Result<Vec<DeviceEntry>, StoreError>;
}

/// The registry in a [`KeyValue`] table (`iotpipe dev`), under keys `device/{id}`.
pub struct KvRegistry(pub Arc<dyn KeyValue>);

const DEVICE_PREFIX: &str = "device/";

fn decode(bytes: &[u8]) -> Result<DeviceEntry, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("device entry: {e}")))
}

#[async_trait]
impl RegistryStore for KvRegistry {
    async fn get(&self, device: &str) -> Result<Option<DeviceEntry>, StoreError> {
        self.0
            .get(&format!("{DEVICE_PREFIX}{device}"))
            .await?
            .map(|b| decode(&b))
            .transpose()
    }

    async fn put(&self, entry: &DeviceEntry) -> Result<(), StoreError> {
        let value = serde_json::to_vec(entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.0
            .apply(vec![KvWrite::Put(
                format!("{DEVICE_PREFIX}{}", entry.device),
                value,
            )])
            .await
    }

    async fn put_many(&self, entries: &[DeviceEntry]) -> Result<(), StoreError> {
        let mut writes = Vec::with_capacity(entries.len());
        for e in entries {
            let value = serde_json::to_vec(e).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            writes.push(KvWrite::Put(format!("{DEVICE_PREFIX}{}", e.device), value));
        }
        self.0.apply(writes).await
    }

    async fn remove(&self, device: &str) -> Result<bool, StoreError> {
        let key = format!("{DEVICE_PREFIX}{device}");
        let existed = self.0.get(&key).await?.is_some();
        self.0.apply(vec![KvWrite::Delete(key)]).await?;
        Ok(existed)
    }

    async fn list(&self, owner: Option<&str>) -> Result<Vec<DeviceEntry>, StoreError> {
        let mut out = Vec::new();
        for (_, v) in self.0.scan_prefix(DEVICE_PREFIX).await? {
            let e = decode(&v)?;
            if owner.is_none_or(|o| o == e.owner) {
                out.push(e);
            }
        }
        Ok(out)
    }
}

/// Settings of the registry cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long an entry (or "not registered") is trusted without an invalidation.
    pub ttl: Duration,
    /// Most cached devices; the cache is cleared when it would grow past this.
    pub capacity: usize,
    /// Owner of devices that are not registered (`iotpipe dev`, single-user: `local`); `None`
    /// in distributed mode, where an unregistered device has no owner and no rule sees it.
    pub default_owner: Option<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            capacity: 200_000,
            default_owner: None,
        }
    }
}

/// A cached lookup: the entry (or "not registered") and when it was read.
type Cached = (Option<Arc<DeviceEntry>>, Instant);

/// The registry as operators see it: the store behind a TTL cache with invalidation.
pub struct CachedRegistry {
    store: Arc<dyn RegistryStore>,
    cfg: CacheConfig,
    cache: Mutex<HashMap<String, Cached>>,
}

impl CachedRegistry {
    /// A cache in front of `store`.
    pub fn new(store: Arc<dyn RegistryStore>, cfg: CacheConfig) -> Self {
        Self {
            store,
            cfg,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The store behind the cache (the admin API writes through it).
    pub fn store(&self) -> &Arc<dyn RegistryStore> {
        &self.store
    }

    /// The entry of `device`, from the cache when fresh.
    ///
    /// # Errors
    /// [`StoreError`] when the entry is not cached and the store fails.
    pub async fn entry(&self, device: &str) -> Result<Option<DeviceEntry>, StoreError> {
        Ok(self.shared(device).await?.map(|e| e.as_ref().clone()))
    }

    /// The entry of `device` as stored (shared, not copied), from the cache when fresh.
    ///
    /// # Errors
    /// [`StoreError`] when the entry is not cached and the store fails.
    pub async fn shared(&self, device: &str) -> Result<Option<Arc<DeviceEntry>>, StoreError> {
        if let Some((e, at)) = self.cache.lock().get(device) {
            if at.elapsed() < self.cfg.ttl {
                return Ok(e.clone());
            }
        }
        let e = self.store.get(device).await?.map(Arc::new);
        let mut cache = self.cache.lock();
        if cache.len() >= self.cfg.capacity {
            cache.clear();
        }
        cache.insert(device.to_owned(), (e.clone(), Instant::now()));
        Ok(e)
    }

    /// Who may see `device`: its entry, or for an unregistered device an entry naming the default
    /// owner when one is set (`iotpipe dev`), else `None` (nobody but admins).
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    pub async fn access(&self, device: &str) -> Result<Option<Arc<DeviceEntry>>, StoreError> {
        Ok(match self.shared(device).await? {
            Some(e) => Some(e),
            None => self.cfg.default_owner.as_ref().map(|owner| {
                Arc::new(DeviceEntry {
                    device: device.to_owned(),
                    owner: owner.clone(),
                    groups: Vec::new(),
                    updated_at: 0,
                })
            }),
        })
    }

    /// The registered devices `user` owns or shares a group with, sorted by id.
    ///
    /// Devices of a group are found by listing the whole registry, which costs O(registry size);
    /// only callers with groups pay it.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    pub async fn visible_to(
        &self,
        user: &str,
        groups: &[String],
    ) -> Result<Vec<DeviceEntry>, StoreError> {
        let mut out = self.store.list(Some(user)).await?;
        if !groups.is_empty() {
            out.extend(
                self.store
                    .list(None)
                    .await?
                    .into_iter()
                    .filter(|e| e.owner != user && e.groups.iter().any(|g| groups.contains(g))),
            );
        }
        out.sort_by(|a, b| a.device.cmp(&b.device));
        out.dedup_by(|a, b| a.device == b.device);
        Ok(out)
    }

    /// The owner of `device` (the default owner when it is not registered and one is set).
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    pub async fn owner_of(&self, device: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .shared(device)
            .await?
            .map(|e| e.owner.clone())
            .or_else(|| self.cfg.default_owner.clone()))
    }

    /// Drops the cached entry of `device` (a registry event arrived).
    pub fn invalidate(&self, device: &str) {
        self.cache.lock().remove(device);
    }

    /// Number of cached devices.
    pub fn cached(&self) -> usize {
        self.cache.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::RedbKv;

    #[tokio::test]
    async fn cache_serves_until_invalidated() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let kv: Arc<dyn KeyValue> = Arc::new(RedbKv::open(&dir.path().join("r.redb"))?);
        let store: Arc<dyn RegistryStore> = Arc::new(KvRegistry(kv));
        let reg = CachedRegistry::new(
            store.clone(),
            CacheConfig {
                ttl: Duration::from_secs(3600),
                ..CacheConfig::default()
            },
        );
        assert_eq!(reg.owner_of("d1").await?, None);
        let entry = DeviceEntry {
            device: "d1".into(),
            owner: "alice".into(),
            groups: vec!["plant".into()],
            updated_at: 1,
        };
        store.put(&entry).await?;
        // "Not registered" is cached too, until the registry event drops it.
        assert_eq!(reg.owner_of("d1").await?, None);
        reg.invalidate("d1");
        assert_eq!(reg.owner_of("d1").await?, Some("alice".into()));
        assert_eq!(store.list(Some("alice")).await?, vec![entry]);
        assert!(store.list(Some("bob")).await?.is_empty());
        assert!(store.remove("d1").await?);
        assert!(!store.remove("d1").await?);
        Ok(())
    }

    #[tokio::test]
    async fn default_owner_covers_unregistered_devices_only() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let kv: Arc<dyn KeyValue> = Arc::new(RedbKv::open(&dir.path().join("r.redb"))?);
        let store: Arc<dyn RegistryStore> = Arc::new(KvRegistry(kv));
        store
            .put(&DeviceEntry {
                device: "d2".into(),
                owner: "bob".into(),
                groups: vec![],
                updated_at: 1,
            })
            .await?;
        let reg = CachedRegistry::new(
            store,
            CacheConfig {
                default_owner: Some("local".into()),
                ..CacheConfig::default()
            },
        );
        assert_eq!(reg.owner_of("d1").await?, Some("local".into()));
        assert_eq!(reg.owner_of("d2").await?, Some("bob".into()));
        Ok(())
    }

    #[tokio::test]
    async fn visible_to_covers_owned_and_shared_group_devices() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let kv: Arc<dyn KeyValue> = Arc::new(RedbKv::open(&dir.path().join("r.redb"))?);
        let store: Arc<dyn RegistryStore> = Arc::new(KvRegistry(kv));
        for (d, owner, groups) in [
            ("a1", "alice", vec![]),
            ("a2", "alice", vec!["lab".to_owned()]),
            ("b1", "bob", vec!["lab".to_owned()]),
            ("b2", "bob", vec!["home".to_owned()]),
        ] {
            store
                .put(&DeviceEntry {
                    device: d.into(),
                    owner: owner.into(),
                    groups,
                    updated_at: 1,
                })
                .await?;
        }
        let reg = CachedRegistry::new(store, CacheConfig::default());
        let ids = |v: Vec<DeviceEntry>| v.into_iter().map(|e| e.device).collect::<Vec<_>>();
        assert_eq!(ids(reg.visible_to("alice", &[]).await?), ["a1", "a2"]);
        assert_eq!(
            ids(reg.visible_to("alice", &["lab".into()]).await?),
            ["a1", "a2", "b1"]
        );
        assert_eq!(
            ids(reg.visible_to("carol", &[]).await?),
            Vec::<String>::new()
        );
        // Without a default owner an unregistered device is nobody's.
        assert!(reg.access("zz").await?.is_none());
        assert_eq!(
            reg.access("b2").await?.map(|e| e.owner.clone()),
            Some("bob".into())
        );
        Ok(())
    }
}
