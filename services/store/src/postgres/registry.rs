//! [`RegistryStore`] on PostgreSQL.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use smartfarm_core::{Error, Result};

use super::{PostgresStore, is_foreign_key_violation, is_unique_violation, pg_error};
use crate::model::{ApiKey, Device, DeviceFilter, DeviceKind, DeviceState, DeviceUpdate, Farm, KeysetPage, NewDevice};
use crate::registry::RegistryStore;

const FARM_COLUMNS: &str = "id, name, create_time, registry_version";
const DEVICE_COLUMNS: &str =
    "id, farm_id, name, kind, state, labels, credential_sha256, last_seen_time, create_time, update_time";
const API_KEY_COLUMNS: &str = "id, name, farm_id, secret_sha256, create_time, revoke_time";

fn farm_from_row(row: &Row) -> Farm {
    Farm { id: row.get(0), name: row.get(1), create_time: row.get(2), registry_version: row.get::<_, i64>(3) as u64 }
}

fn device_from_row(row: &Row) -> Result<Device> {
    let labels: serde_json::Value = row.get(5);
    let labels: BTreeMap<String, String> = serde_json::from_value(labels)
        .map_err(|error| Error::internal("devices.labels is not a JSON object of strings", error))?;
    Ok(Device {
        id: row.get(0),
        farm_id: row.get(1),
        name: row.get(2),
        kind: DeviceKind::parse_stored(row.get(3))?,
        state: DeviceState::parse_stored(row.get(4))?,
        labels,
        credential_sha256: row.get(6),
        last_seen_time: row.get(7),
        create_time: row.get(8),
        update_time: row.get(9),
    })
}

fn api_key_from_row(row: &Row) -> ApiKey {
    ApiKey {
        id: row.get(0),
        name: row.get(1),
        farm_id: row.get(2),
        secret_sha256: row.get(3),
        create_time: row.get(4),
        revoke_time: row.get(5),
    }
}

fn labels_json(labels: &BTreeMap<String, String>) -> Result<serde_json::Value> {
    serde_json::to_value(labels).map_err(|error| Error::internal("encode labels", error))
}

fn duplicate_device_name(name: &str) -> Error {
    Error::AlreadyExists(format!("a device named {name:?} already exists on this farm"))
}

async fn load_device(client: &impl deadpool_postgres::GenericClient, id: Uuid, lock: bool) -> Result<Device> {
    let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1{}", if lock { " FOR UPDATE" } else { "" });
    let row = client.query_opt(&sql, &[&id]).await.map_err(pg_error("read device"))?;
    device_from_row(&row.ok_or_else(|| Error::not_found("device", id))?)
}

async fn bump_registry_version(client: &impl deadpool_postgres::GenericClient, farm_id: Uuid) -> Result<()> {
    client
        .execute("UPDATE farms SET registry_version = registry_version + 1 WHERE id = $1", &[&farm_id])
        .await
        .map_err(pg_error("bump registry version"))?;
    Ok(())
}

#[async_trait::async_trait]
impl RegistryStore for PostgresStore {
    async fn create_farm(&self, id: Uuid, name: &str, create_time: SystemTime) -> Result<Farm> {
        let client = self.client().await?;
        client
            .execute("INSERT INTO farms (id, name, create_time) VALUES ($1, $2, $3)", &[&id, &name, &create_time])
            .await
            .map_err(|error| {
                if is_unique_violation(&error) {
                    Error::AlreadyExists(format!("a farm named {name:?} already exists"))
                } else {
                    pg_error("insert farm")(error)
                }
            })?;
        Ok(Farm { id, name: name.to_string(), create_time, registry_version: 0 })
    }

    async fn get_farm(&self, id: Uuid) -> Result<Farm> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {FARM_COLUMNS} FROM farms WHERE id = $1"), &[&id])
            .await
            .map_err(pg_error("read farm"))?;
        row.map(|row| farm_from_row(&row)).ok_or_else(|| Error::not_found("farm", id))
    }

    async fn list_farms(&self, only: Option<Uuid>, page: KeysetPage) -> Result<Vec<Farm>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {FARM_COLUMNS} FROM farms
                     WHERE ($1::uuid IS NULL OR id = $1) AND ($2::uuid IS NULL OR id > $2)
                     ORDER BY id LIMIT $3"
                ),
                &[&only, &page.after, &(page.limit as i64)],
            )
            .await
            .map_err(pg_error("list farms"))?;
        Ok(rows.iter().map(farm_from_row).collect())
    }

    async fn create_device(&self, device: NewDevice) -> Result<Device> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin device registration"))?;
        let labels = labels_json(&device.labels)?;
        let inserted = transaction
            .execute(
                "INSERT INTO devices (id, farm_id, name, kind, state, labels, credential_sha256, create_time, update_time)
                 VALUES ($1, $2, $3, $4, 'provisioned', $5, $6, $7, $7)",
                &[
                    &device.id,
                    &device.farm_id,
                    &device.name,
                    &device.kind.as_str(),
                    &labels,
                    &device.credential_sha256,
                    &device.create_time,
                ],
            )
            .await;
        if let Err(error) = inserted {
            return Err(if is_unique_violation(&error) {
                duplicate_device_name(&device.name)
            } else if is_foreign_key_violation(&error) {
                Error::not_found("farm", device.farm_id)
            } else {
                pg_error("insert device")(error)
            });
        }
        bump_registry_version(&transaction, device.farm_id).await?;
        let stored = load_device(&transaction, device.id, false).await?;
        transaction.commit().await.map_err(pg_error("commit device registration"))?;
        Ok(stored)
    }

    async fn get_device(&self, id: Uuid) -> Result<Device> {
        let client = self.client().await?;
        load_device(&client, id, false).await
    }

    async fn list_devices(&self, filter: &DeviceFilter, page: KeysetPage) -> Result<Vec<Device>> {
        let client = self.client().await?;
        let kind = filter.kind.map(DeviceKind::as_str);
        let state = filter.state.map(DeviceState::as_str);
        let limit = page.limit as i64;
        let params: [&(dyn ToSql + Sync); 5] = [&filter.farm_id, &kind, &state, &page.after, &limit];
        let rows = client
            .query(
                &format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices
                     WHERE ($1::uuid IS NULL OR farm_id = $1)
                       AND ($2::text IS NULL OR kind = $2)
                       AND ($3::text IS NULL OR state = $3)
                       AND ($4::uuid IS NULL OR id > $4)
                     ORDER BY id LIMIT $5"
                ),
                &params,
            )
            .await
            .map_err(pg_error("list devices"))?;
        rows.iter().map(device_from_row).collect()
    }

    async fn update_device(&self, id: Uuid, update: DeviceUpdate, update_time: SystemTime) -> Result<Device> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin device update"))?;
        let current = load_device(&transaction, id, true).await?;
        if current.state == DeviceState::Decommissioned {
            return Err(Error::FailedPrecondition(format!("device {id} is decommissioned and cannot be changed")));
        }
        let name = update.name.unwrap_or(current.name);
        let labels = labels_json(&update.labels.unwrap_or(current.labels))?;
        transaction
            .execute(
                "UPDATE devices SET name = $2, labels = $3, update_time = $4 WHERE id = $1",
                &[&id, &name, &labels, &update_time],
            )
            .await
            .map_err(|error| {
                if is_unique_violation(&error) {
                    duplicate_device_name(&name)
                } else {
                    pg_error("update device")(error)
                }
            })?;
        bump_registry_version(&transaction, current.farm_id).await?;
        let stored = load_device(&transaction, id, false).await?;
        transaction.commit().await.map_err(pg_error("commit device update"))?;
        Ok(stored)
    }

    async fn decommission_device(&self, id: Uuid, update_time: SystemTime) -> Result<Device> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin decommission"))?;
        let current = load_device(&transaction, id, true).await?;
        if current.state == DeviceState::Decommissioned {
            return Ok(current);
        }
        transaction
            .execute(
                "UPDATE devices SET state = 'decommissioned', credential_sha256 = NULL, update_time = $2 WHERE id = $1",
                &[&id, &update_time],
            )
            .await
            .map_err(pg_error("decommission device"))?;
        bump_registry_version(&transaction, current.farm_id).await?;
        let stored = load_device(&transaction, id, false).await?;
        transaction.commit().await.map_err(pg_error("commit decommission"))?;
        Ok(stored)
    }

    async fn set_device_credential(
        &self,
        id: Uuid,
        credential_sha256: &str,
        update_time: SystemTime,
    ) -> Result<Device> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin credential rotation"))?;
        let current = load_device(&transaction, id, true).await?;
        if current.state == DeviceState::Decommissioned {
            return Err(Error::FailedPrecondition(format!(
                "device {id} is decommissioned and cannot get a credential"
            )));
        }
        transaction
            .execute(
                "UPDATE devices SET credential_sha256 = $2, update_time = $3 WHERE id = $1",
                &[&id, &credential_sha256, &update_time],
            )
            .await
            .map_err(pg_error("rotate credential"))?;
        bump_registry_version(&transaction, current.farm_id).await?;
        let stored = load_device(&transaction, id, false).await?;
        transaction.commit().await.map_err(pg_error("commit credential rotation"))?;
        Ok(stored)
    }

    async fn record_devices_seen(&self, ids: &[Uuid], seen_time: SystemTime) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE devices
                 SET last_seen_time = GREATEST(last_seen_time, $2),
                     state = CASE WHEN state = 'provisioned' THEN 'active' ELSE state END
                 WHERE id = ANY($1) AND state <> 'decommissioned'",
                &[&ids, &seen_time],
            )
            .await
            .map_err(pg_error("update last seen"))?;
        Ok(())
    }

    async fn create_api_key(&self, key: ApiKey) -> Result<ApiKey> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO api_keys (id, name, farm_id, secret_sha256, create_time) VALUES ($1, $2, $3, $4, $5)",
                &[&key.id, &key.name, &key.farm_id, &key.secret_sha256, &key.create_time],
            )
            .await
            .map_err(|error| {
                if is_foreign_key_violation(&error) {
                    Error::not_found("farm", key.farm_id.map(|id| id.to_string()).unwrap_or_default())
                } else {
                    pg_error("insert api key")(error)
                }
            })?;
        Ok(ApiKey { revoke_time: None, ..key })
    }

    async fn get_api_key(&self, id: Uuid) -> Result<ApiKey> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = $1"), &[&id])
            .await
            .map_err(pg_error("read api key"))?;
        row.map(|row| api_key_from_row(&row)).ok_or_else(|| Error::not_found("api key", id))
    }

    async fn list_api_keys(&self, farm_id: Option<Uuid>, page: KeysetPage) -> Result<Vec<ApiKey>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {API_KEY_COLUMNS} FROM api_keys
                     WHERE ($1::uuid IS NULL OR farm_id = $1) AND ($2::uuid IS NULL OR id > $2)
                     ORDER BY id LIMIT $3"
                ),
                &[&farm_id, &page.after, &(page.limit as i64)],
            )
            .await
            .map_err(pg_error("list api keys"))?;
        Ok(rows.iter().map(api_key_from_row).collect())
    }

    async fn revoke_api_key(&self, id: Uuid, revoke_time: SystemTime) -> Result<ApiKey> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE api_keys SET revoke_time = COALESCE(revoke_time, $2) WHERE id = $1 RETURNING {API_KEY_COLUMNS}"
                ),
                &[&id, &revoke_time],
            )
            .await
            .map_err(pg_error("revoke api key"))?;
        row.map(|row| api_key_from_row(&row)).ok_or_else(|| Error::not_found("api key", id))
    }

    async fn count_api_keys(&self) -> Result<u64> {
        let client = self.client().await?;
        let row = client.query_one("SELECT COUNT(*) FROM api_keys", &[]).await.map_err(pg_error("count api keys"))?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}
