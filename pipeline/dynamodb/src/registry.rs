//! The device registry in DynamoDB (distributed mode): one item per device, `device` the partition
//! key, and a `by_owner` index (`owner`, `device`) so "all devices of a user" is one query.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::types::{
    AttributeValue, BillingMode, KeyType, ReturnValue, ScalarAttributeType,
};
use aws_sdk_dynamodb::Client;
use iotpipe_pipeline::registry::{DeviceEntry, RegistryStore};
use iotpipe_pipeline::store::StoreError;
use tracing::info;

use crate::{unavailable, DynamoConfig};

/// Name of the registry's by-owner index.
pub const BY_OWNER: &str = "by_owner";

/// The registry table.
#[derive(Clone)]
pub struct DynamoRegistry {
    client: Client,
    table: String,
}

fn entry_of(item: &HashMap<String, AttributeValue>) -> Result<DeviceEntry, StoreError> {
    let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    Ok(DeviceEntry {
        device: s("device")
            .ok_or_else(|| StoreError::Corrupt("registry item without device".into()))?,
        owner: s("owner")
            .ok_or_else(|| StoreError::Corrupt("registry item without owner".into()))?,
        groups: item
            .get("groups")
            .and_then(|v| v.as_ss().ok())
            .cloned()
            .unwrap_or_default(),
        updated_at: item
            .get("updated_at")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    })
}

impl DynamoRegistry {
    /// Builds a client like [`crate::DynamoHistory::connect`], for `cfg.devices_table`.
    pub async fn connect(cfg: &DynamoConfig) -> Self {
        Self {
            client: crate::client(cfg).await,
            table: cfg.devices_table.clone(),
        }
    }

    /// Checks that the table answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| unavailable(DisplayErrorContext(&e)))
    }

    /// Creates the table and its index (on-demand capacity); an existing table is left alone.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when DynamoDB refuses.
    pub async fn init_table(&self) -> Result<(), StoreError> {
        let gsi = crate::index(BY_OWNER, "owner", "device")?;
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(crate::attr("device", ScalarAttributeType::S)?)
            .attribute_definitions(crate::attr("owner", ScalarAttributeType::S)?)
            .key_schema(crate::key("device", KeyType::Hash)?)
            .global_secondary_indexes(gsi)
            .send()
            .await;
        match created {
            Ok(_) => info!(table = %self.table, "Created device registry table."),
            Err(e) if e.code() == Some("ResourceInUseException") => {}
            Err(e) => {
                return Err(unavailable(format!(
                    "create table {}: {}",
                    self.table,
                    DisplayErrorContext(&e)
                )))
            }
        }
        crate::wait_active(&self.client, &self.table).await
    }
}

#[async_trait]
impl RegistryStore for DynamoRegistry {
    async fn get(&self, device: &str) -> Result<Option<DeviceEntry>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("device", AttributeValue::S(device.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| unavailable(DisplayErrorContext(&e)))?;
        out.item().map(entry_of).transpose()
    }

    async fn put(&self, entry: &DeviceEntry) -> Result<(), StoreError> {
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("device", AttributeValue::S(entry.device.clone()))
            .item("owner", AttributeValue::S(entry.owner.clone()))
            .item(
                "updated_at",
                AttributeValue::N(entry.updated_at.to_string()),
            );
        if !entry.groups.is_empty() {
            // A string set cannot be empty.
            req = req.item("groups", AttributeValue::Ss(entry.groups.clone()));
        }
        req.send()
            .await
            .map(|_| ())
            .map_err(|e| unavailable(DisplayErrorContext(&e)))
    }

    async fn put_many(&self, entries: &[DeviceEntry]) -> Result<(), StoreError> {
        for chunk in entries.chunks(25) {
            let mut requests = Vec::with_capacity(chunk.len());
            for e in chunk {
                let mut item = std::collections::HashMap::from([
                    ("device".to_owned(), AttributeValue::S(e.device.clone())),
                    ("owner".to_owned(), AttributeValue::S(e.owner.clone())),
                    (
                        "updated_at".to_owned(),
                        AttributeValue::N(e.updated_at.to_string()),
                    ),
                ]);
                if !e.groups.is_empty() {
                    item.insert("groups".to_owned(), AttributeValue::Ss(e.groups.clone()));
                }
                let put = aws_sdk_dynamodb::types::PutRequest::builder()
                    .set_item(Some(item))
                    .build()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                requests.push(
                    aws_sdk_dynamodb::types::WriteRequest::builder()
                        .put_request(put)
                        .build(),
                );
            }
            crate::write_chunk(
                &self.client,
                &self.table,
                requests,
                std::time::Duration::from_secs(30),
            )
            .await?;
        }
        Ok(())
    }

    async fn remove(&self, device: &str) -> Result<bool, StoreError> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("device", AttributeValue::S(device.to_owned()))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| unavailable(DisplayErrorContext(&e)))?;
        Ok(out.attributes().is_some_and(|a| !a.is_empty()))
    }

    async fn list(&self, owner: Option<&str>) -> Result<Vec<DeviceEntry>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let (items, next) = if let Some(owner) = owner {
                let r = self
                    .client
                    .query()
                    .table_name(&self.table)
                    .index_name(BY_OWNER)
                    .key_condition_expression("#o = :o")
                    .expression_attribute_names("#o", "owner")
                    .expression_attribute_values(":o", AttributeValue::S(owner.to_owned()))
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| unavailable(DisplayErrorContext(&e)))?;
                (r.items().to_vec(), r.last_evaluated_key().cloned())
            } else {
                let r = self
                    .client
                    .scan()
                    .table_name(&self.table)
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| unavailable(DisplayErrorContext(&e)))?;
                (r.items().to_vec(), r.last_evaluated_key().cloned())
            };
            for item in &items {
                out.push(entry_of(item)?);
            }
            match next {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(out)
    }
}
