//! [`RegistryStore`] on SQLite.

use std::collections::BTreeMap;
use std::time::SystemTime;

use rusqlite::{OptionalExtension, Row, params, params_from_iter, types::Value};
use uuid::Uuid;

use smartfarm_core::time::{from_unix_micros, to_unix_micros};
use smartfarm_core::{Error, Result};

use super::{SqliteStore, is_unique_violation, sql_error};
use crate::model::{ApiKey, Device, DeviceFilter, DeviceKind, DeviceState, DeviceUpdate, Farm, KeysetPage, NewDevice};
use crate::registry::RegistryStore;

const FARM_COLUMNS: &str = "id, name, create_time, registry_version";
const DEVICE_COLUMNS: &str =
    "id, farm_id, name, kind, state, labels, credential_sha256, last_seen_time, create_time, update_time";
const API_KEY_COLUMNS: &str = "id, name, farm_id, secret_sha256, create_time, revoke_time";

/// A row read failed to convert; kept apart from SQL errors so a corrupt row is reported as such.
type RowResult<T> = std::result::Result<T, Error>;

pub(super) fn uuid_column(row: &Row<'_>, index: usize) -> rusqlite::Result<Uuid> {
    let text: String = row.get(index)?;
    Uuid::try_parse(&text)
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(error)))
}

fn farm_from_row(row: &Row<'_>) -> rusqlite::Result<Farm> {
    Ok(Farm {
        id: uuid_column(row, 0)?,
        name: row.get(1)?,
        create_time: from_unix_micros(row.get(2)?),
        registry_version: row.get::<_, i64>(3)? as u64,
    })
}

/// Raw device columns; kind, state and labels are decoded afterwards so their errors say what is corrupt.
struct DeviceRow {
    id: Uuid,
    farm_id: Uuid,
    name: String,
    kind: String,
    state: String,
    labels: String,
    credential_sha256: Option<String>,
    last_seen_time: Option<i64>,
    create_time: i64,
    update_time: i64,
}

fn device_row(row: &Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        id: uuid_column(row, 0)?,
        farm_id: uuid_column(row, 1)?,
        name: row.get(2)?,
        kind: row.get(3)?,
        state: row.get(4)?,
        labels: row.get(5)?,
        credential_sha256: row.get(6)?,
        last_seen_time: row.get(7)?,
        create_time: row.get(8)?,
        update_time: row.get(9)?,
    })
}

impl DeviceRow {
    fn decode(self) -> RowResult<Device> {
        let labels: BTreeMap<String, String> = serde_json::from_str(&self.labels)
            .map_err(|error| Error::internal("devices.labels is not a JSON object of strings", error))?;
        Ok(Device {
            id: self.id,
            farm_id: self.farm_id,
            name: self.name,
            kind: DeviceKind::parse_stored(&self.kind)?,
            state: DeviceState::parse_stored(&self.state)?,
            labels,
            last_seen_time: self.last_seen_time.map(from_unix_micros),
            create_time: from_unix_micros(self.create_time),
            update_time: from_unix_micros(self.update_time),
            credential_sha256: self.credential_sha256,
        })
    }
}

fn api_key_from_row(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    let farm_id: Option<String> = row.get(2)?;
    let farm_id = farm_id
        .map(|text| Uuid::try_parse(&text))
        .transpose()
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(error)))?;
    Ok(ApiKey {
        id: uuid_column(row, 0)?,
        name: row.get(1)?,
        farm_id,
        secret_sha256: row.get(3)?,
        create_time: from_unix_micros(row.get(4)?),
        revoke_time: row.get::<_, Option<i64>>(5)?.map(from_unix_micros),
    })
}

fn load_device(connection: &rusqlite::Connection, id: Uuid) -> Result<Device> {
    connection
        .query_row(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"), [id.to_string()], device_row)
        .optional()
        .map_err(sql_error("read device"))?
        .ok_or_else(|| Error::not_found("device", id))?
        .decode()
}

fn bump_registry_version(connection: &rusqlite::Connection, farm_id: Uuid) -> Result<()> {
    connection
        .execute("UPDATE farms SET registry_version = registry_version + 1 WHERE id = ?1", [farm_id.to_string()])
        .map_err(sql_error("bump registry version"))?;
    Ok(())
}

fn labels_json(labels: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(labels).map_err(|error| Error::internal("encode labels", error))
}

fn duplicate_device_name(name: &str) -> Error {
    Error::AlreadyExists(format!("a device named {name:?} already exists on this farm"))
}

#[async_trait::async_trait]
impl RegistryStore for SqliteStore {
    async fn create_farm(&self, id: Uuid, name: &str, create_time: SystemTime) -> Result<Farm> {
        let name = name.to_string();
        self.run(move |connection| {
            connection
                .execute(
                    "INSERT INTO farms (id, name, create_time) VALUES (?1, ?2, ?3)",
                    params![id.to_string(), name, to_unix_micros(create_time)],
                )
                .map_err(|error| {
                    if is_unique_violation(&error) {
                        Error::AlreadyExists(format!("a farm named {name:?} already exists"))
                    } else {
                        sql_error("insert farm")(error)
                    }
                })?;
            Ok(Farm { id, name, create_time, registry_version: 0 })
        })
        .await
    }

    async fn get_farm(&self, id: Uuid) -> Result<Farm> {
        self.run(move |connection| {
            connection
                .query_row(&format!("SELECT {FARM_COLUMNS} FROM farms WHERE id = ?1"), [id.to_string()], farm_from_row)
                .optional()
                .map_err(sql_error("read farm"))?
                .ok_or_else(|| Error::not_found("farm", id))
        })
        .await
    }

    async fn list_farms(&self, only: Option<Uuid>, page: KeysetPage) -> Result<Vec<Farm>> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare(&format!(
                    "SELECT {FARM_COLUMNS} FROM farms
                     WHERE (?1 IS NULL OR id = ?1) AND (?2 IS NULL OR id > ?2)
                     ORDER BY id LIMIT ?3"
                ))
                .map_err(sql_error("prepare farm listing"))?;
            let rows = statement
                .query_map(
                    params![only.map(|id| id.to_string()), page.after.map(|id| id.to_string()), page.limit as i64],
                    farm_from_row,
                )
                .map_err(sql_error("list farms"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read farm row"))
        })
        .await
    }

    async fn create_device(&self, device: NewDevice) -> Result<Device> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin device registration"))?;
            let farm_exists: Option<i64> = transaction
                .query_row("SELECT 1 FROM farms WHERE id = ?1", [device.farm_id.to_string()], |row| row.get(0))
                .optional()
                .map_err(sql_error("look up farm"))?;
            if farm_exists.is_none() {
                return Err(Error::not_found("farm", device.farm_id));
            }
            let micros = to_unix_micros(device.create_time);
            transaction
                .execute(
                    "INSERT INTO devices (id, farm_id, name, kind, state, labels, credential_sha256, create_time, update_time)
                     VALUES (?1, ?2, ?3, ?4, 'provisioned', ?5, ?6, ?7, ?7)",
                    params![
                        device.id.to_string(),
                        device.farm_id.to_string(),
                        device.name,
                        device.kind.as_str(),
                        labels_json(&device.labels)?,
                        device.credential_sha256,
                        micros
                    ],
                )
                .map_err(|error| {
                    if is_unique_violation(&error) { duplicate_device_name(&device.name) } else { sql_error("insert device")(error) }
                })?;
            bump_registry_version(&transaction, device.farm_id)?;
            let stored = load_device(&transaction, device.id)?;
            transaction.commit().map_err(sql_error("commit device registration"))?;
            Ok(stored)
        })
        .await
    }

    async fn get_device(&self, id: Uuid) -> Result<Device> {
        self.run(move |connection| load_device(connection, id)).await
    }

    async fn list_devices(&self, filter: &DeviceFilter, page: KeysetPage) -> Result<Vec<Device>> {
        let filter = filter.clone();
        self.run(move |connection| {
            let mut sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE 1 = 1");
            let mut values: Vec<Value> = Vec::new();
            if let Some(farm_id) = filter.farm_id {
                values.push(Value::Text(farm_id.to_string()));
                sql.push_str(&format!(" AND farm_id = ?{}", values.len()));
            }
            if let Some(kind) = filter.kind {
                values.push(Value::Text(kind.as_str().to_string()));
                sql.push_str(&format!(" AND kind = ?{}", values.len()));
            }
            if let Some(state) = filter.state {
                values.push(Value::Text(state.as_str().to_string()));
                sql.push_str(&format!(" AND state = ?{}", values.len()));
            }
            if let Some(after) = page.after {
                values.push(Value::Text(after.to_string()));
                sql.push_str(&format!(" AND id > ?{}", values.len()));
            }
            values.push(Value::Integer(page.limit as i64));
            sql.push_str(&format!(" ORDER BY id LIMIT ?{}", values.len()));
            let mut statement = connection.prepare(&sql).map_err(sql_error("prepare device listing"))?;
            let rows = statement.query_map(params_from_iter(values), device_row).map_err(sql_error("list devices"))?;
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read device row"))?;
            rows.into_iter().map(DeviceRow::decode).collect()
        })
        .await
    }

    async fn update_device(&self, id: Uuid, update: DeviceUpdate, update_time: SystemTime) -> Result<Device> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin device update"))?;
            let current = load_device(&transaction, id)?;
            if current.state == DeviceState::Decommissioned {
                return Err(Error::FailedPrecondition(format!("device {id} is decommissioned and cannot be changed")));
            }
            let name = update.name.unwrap_or(current.name);
            let labels = update.labels.unwrap_or(current.labels);
            transaction
                .execute(
                    "UPDATE devices SET name = ?2, labels = ?3, update_time = ?4 WHERE id = ?1",
                    params![id.to_string(), name, labels_json(&labels)?, to_unix_micros(update_time)],
                )
                .map_err(|error| {
                    if is_unique_violation(&error) {
                        duplicate_device_name(&name)
                    } else {
                        sql_error("update device")(error)
                    }
                })?;
            bump_registry_version(&transaction, current.farm_id)?;
            let stored = load_device(&transaction, id)?;
            transaction.commit().map_err(sql_error("commit device update"))?;
            Ok(stored)
        })
        .await
    }

    async fn decommission_device(&self, id: Uuid, update_time: SystemTime) -> Result<Device> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin decommission"))?;
            let current = load_device(&transaction, id)?;
            if current.state == DeviceState::Decommissioned {
                return Ok(current);
            }
            transaction
                .execute(
                    "UPDATE devices SET state = 'decommissioned', credential_sha256 = NULL, update_time = ?2 WHERE id = ?1",
                    params![id.to_string(), to_unix_micros(update_time)],
                )
                .map_err(sql_error("decommission device"))?;
            bump_registry_version(&transaction, current.farm_id)?;
            let stored = load_device(&transaction, id)?;
            transaction.commit().map_err(sql_error("commit decommission"))?;
            Ok(stored)
        })
        .await
    }

    async fn set_device_credential(
        &self,
        id: Uuid,
        credential_sha256: &str,
        update_time: SystemTime,
    ) -> Result<Device> {
        let credential_sha256 = credential_sha256.to_string();
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin credential rotation"))?;
            let current = load_device(&transaction, id)?;
            if current.state == DeviceState::Decommissioned {
                return Err(Error::FailedPrecondition(format!(
                    "device {id} is decommissioned and cannot get a credential"
                )));
            }
            transaction
                .execute(
                    "UPDATE devices SET credential_sha256 = ?2, update_time = ?3 WHERE id = ?1",
                    params![id.to_string(), credential_sha256, to_unix_micros(update_time)],
                )
                .map_err(sql_error("rotate credential"))?;
            bump_registry_version(&transaction, current.farm_id)?;
            let stored = load_device(&transaction, id)?;
            transaction.commit().map_err(sql_error("commit credential rotation"))?;
            Ok(stored)
        })
        .await
    }

    async fn record_devices_seen(&self, ids: &[Uuid], seen_time: SystemTime) -> Result<()> {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin last-seen update"))?;
            {
                let mut statement = transaction
                    .prepare(
                        "UPDATE devices
                         SET last_seen_time = MAX(COALESCE(last_seen_time, ?2), ?2),
                             state = CASE WHEN state = 'provisioned' THEN 'active' ELSE state END
                         WHERE id = ?1 AND state <> 'decommissioned'",
                    )
                    .map_err(sql_error("prepare last-seen update"))?;
                let micros = to_unix_micros(seen_time);
                for id in &ids {
                    statement.execute(params![id, micros]).map_err(sql_error("update last seen"))?;
                }
            }
            transaction.commit().map_err(sql_error("commit last-seen update"))
        })
        .await
    }

    async fn create_api_key(&self, key: ApiKey) -> Result<ApiKey> {
        self.run(move |connection| {
            connection
                .execute(
                    "INSERT INTO api_keys (id, name, farm_id, secret_sha256, create_time, revoke_time)
                     VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
                    params![
                        key.id.to_string(),
                        key.name,
                        key.farm_id.map(|id| id.to_string()),
                        key.secret_sha256,
                        to_unix_micros(key.create_time)
                    ],
                )
                .map_err(|error| match &error {
                    rusqlite::Error::SqliteFailure(failure, _)
                        if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
                    {
                        Error::not_found("farm", key.farm_id.map(|id| id.to_string()).unwrap_or_default())
                    }
                    _ => sql_error("insert api key")(error),
                })?;
            Ok(ApiKey { revoke_time: None, ..key })
        })
        .await
    }

    async fn get_api_key(&self, id: Uuid) -> Result<ApiKey> {
        self.run(move |connection| {
            connection
                .query_row(
                    &format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                    [id.to_string()],
                    api_key_from_row,
                )
                .optional()
                .map_err(sql_error("read api key"))?
                .ok_or_else(|| Error::not_found("api key", id))
        })
        .await
    }

    async fn list_api_keys(&self, farm_id: Option<Uuid>, page: KeysetPage) -> Result<Vec<ApiKey>> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare(&format!(
                    "SELECT {API_KEY_COLUMNS} FROM api_keys
                     WHERE (?1 IS NULL OR farm_id = ?1) AND (?2 IS NULL OR id > ?2)
                     ORDER BY id LIMIT ?3"
                ))
                .map_err(sql_error("prepare api key listing"))?;
            let rows = statement
                .query_map(
                    params![farm_id.map(|id| id.to_string()), page.after.map(|id| id.to_string()), page.limit as i64],
                    api_key_from_row,
                )
                .map_err(sql_error("list api keys"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read api key row"))
        })
        .await
    }

    async fn revoke_api_key(&self, id: Uuid, revoke_time: SystemTime) -> Result<ApiKey> {
        self.run(move |connection| {
            connection
                .execute(
                    "UPDATE api_keys SET revoke_time = ?2 WHERE id = ?1 AND revoke_time IS NULL",
                    params![id.to_string(), to_unix_micros(revoke_time)],
                )
                .map_err(sql_error("revoke api key"))?;
            connection
                .query_row(
                    &format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                    [id.to_string()],
                    api_key_from_row,
                )
                .optional()
                .map_err(sql_error("read api key"))?
                .ok_or_else(|| Error::not_found("api key", id))
        })
        .await
    }

    async fn count_api_keys(&self) -> Result<u64> {
        self.run(|connection| {
            let count: i64 = connection
                .query_row("SELECT COUNT(*) FROM api_keys", [], |row| row.get(0))
                .map_err(sql_error("count api keys"))?;
            Ok(count as u64)
        })
        .await
    }
}
