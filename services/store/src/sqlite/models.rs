//! [`ModelStore`] on SQLite.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, Row, params};

use smartfarm_core::time::{from_unix_micros, to_unix_micros};
use smartfarm_core::{Error, Result};

use super::{SqliteStore, sql_error};
use crate::models::{ModelInserted, ModelStore, StoredModel};

const MODEL_COLUMNS: &str = "name, version, kind, sha256, size_bytes, blob_key, card, create_time, activate_time";

fn read_model(row: &Row<'_>) -> rusqlite::Result<StoredModel> {
    Ok(StoredModel {
        name: row.get(0)?,
        version: row.get(1)?,
        kind: row.get(2)?,
        sha256: row.get(3)?,
        size_bytes: row.get::<_, i64>(4)? as u64,
        blob_key: row.get(5)?,
        card: row.get(6)?,
        create_time: from_unix_micros(row.get(7)?),
        activate_time: row.get::<_, Option<i64>>(8)?.map(from_unix_micros),
    })
}

fn find(connection: &Connection, name: &str, version: &str) -> Result<Option<StoredModel>> {
    connection
        .query_row(
            &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = ?1 AND version = ?2"),
            params![name, version],
            read_model,
        )
        .optional()
        .map_err(sql_error("read model"))
}

#[async_trait::async_trait]
impl ModelStore for SqliteStore {
    async fn insert_model(&self, model: StoredModel) -> Result<ModelInserted> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin model insert"))?;
            if let Some(existing) = find(&transaction, &model.name, &model.version)? {
                if existing.sha256 == model.sha256 {
                    return Ok(ModelInserted::Existing(existing));
                }
                return Err(Error::AlreadyExists(format!(
                    "model {}@{} exists with other weights; store a new version",
                    model.name, model.version
                )));
            }
            transaction
                .execute(
                    &format!("INSERT INTO models ({MODEL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                    params![
                        model.name,
                        model.version,
                        model.kind,
                        model.sha256,
                        model.size_bytes as i64,
                        model.blob_key,
                        model.card,
                        to_unix_micros(model.create_time),
                        model.activate_time.map(to_unix_micros),
                    ],
                )
                .map_err(sql_error("insert model"))?;
            transaction.commit().map_err(sql_error("commit model insert"))?;
            Ok(ModelInserted::Created(model))
        })
        .await
    }

    async fn get_model(&self, name: &str, version: &str) -> Result<StoredModel> {
        let (name, version) = (name.to_string(), version.to_string());
        self.run(move |connection| {
            find(connection, &name, &version)?.ok_or_else(|| Error::not_found("model", format!("{name}@{version}")))
        })
        .await
    }

    async fn list_models(&self, kind: Option<&str>, name: Option<&str>) -> Result<Vec<StoredModel>> {
        let (kind, name) = (kind.map(str::to_string), name.map(str::to_string));
        self.run(move |connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {MODEL_COLUMNS} FROM models WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR name = ?2)
                     ORDER BY name, create_time DESC, version DESC"
                ))
                .map_err(sql_error("prepare model list"))?;
            let rows = statement.query_map(params![kind, name], read_model).map_err(sql_error("list models"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read models"))
        })
        .await
    }

    async fn activate_model(&self, name: &str, version: &str, at: SystemTime) -> Result<StoredModel> {
        let (name, version) = (name.to_string(), version.to_string());
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin model activation"))?;
            if find(&transaction, &name, &version)?.is_none() {
                return Err(Error::not_found("model", format!("{name}@{version}")));
            }
            transaction
                .execute(
                    "UPDATE models SET activate_time = NULL WHERE name = ?1 AND version <> ?2",
                    params![name, version],
                )
                .map_err(sql_error("deactivate models"))?;
            transaction
                .execute(
                    // Never before the kind's latest activation: the kind's serving model is the latest activated,
                    // and replicas' clocks may differ.
                    "UPDATE models SET activate_time = MAX(?3, COALESCE((SELECT MAX(m.activate_time) + 1 FROM models m
                                                             WHERE m.kind = models.kind AND m.name <> ?1), ?3))
                     WHERE name = ?1 AND version = ?2",
                    params![name, version, to_unix_micros(at)],
                )
                .map_err(sql_error("activate model"))?;
            let model = find(&transaction, &name, &version)?.expect("the row was there");
            transaction.commit().map_err(sql_error("commit model activation"))?;
            Ok(model)
        })
        .await
    }

    async fn active_model(&self, kind: &str) -> Result<Option<StoredModel>> {
        let kind = kind.to_string();
        self.run(move |connection| {
            connection
                .query_row(
                    &format!(
                        "SELECT {MODEL_COLUMNS} FROM models WHERE kind = ?1 AND activate_time IS NOT NULL
                         ORDER BY activate_time DESC LIMIT 1"
                    ),
                    [kind],
                    read_model,
                )
                .optional()
                .map_err(sql_error("read active model"))
        })
        .await
    }
}
