//! [`ModelStore`] on PostgreSQL.

use std::time::SystemTime;

use tokio_postgres::Row;

use smartfarm_core::{Error, Result};

use super::{PostgresStore, is_unique_violation, pg_error};
use crate::models::{ModelInserted, ModelStore, StoredModel};

const MODEL_COLUMNS: &str = "name, version, kind, sha256, size_bytes, blob_key, card, create_time, activate_time";

fn read_model(row: &Row) -> StoredModel {
    StoredModel {
        name: row.get(0),
        version: row.get(1),
        kind: row.get(2),
        sha256: row.get(3),
        size_bytes: row.get::<_, i64>(4) as u64,
        blob_key: row.get(5),
        card: row.get(6),
        create_time: row.get(7),
        activate_time: row.get(8),
    }
}

impl PostgresStore {
    async fn find_model(
        &self,
        client: &tokio_postgres::Client,
        name: &str,
        version: &str,
    ) -> Result<Option<StoredModel>> {
        let row = client
            .query_opt(
                &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 AND version = $2"),
                &[&name, &version],
            )
            .await
            .map_err(pg_error("read model"))?;
        Ok(row.as_ref().map(read_model))
    }
}

#[async_trait::async_trait]
impl ModelStore for PostgresStore {
    async fn insert_model(&self, model: StoredModel) -> Result<ModelInserted> {
        let client = self.client().await?;
        let inserted = client
            .execute(
                &format!("INSERT INTO models ({MODEL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
                &[
                    &model.name,
                    &model.version,
                    &model.kind,
                    &model.sha256,
                    &(model.size_bytes as i64),
                    &model.blob_key,
                    &model.card,
                    &model.create_time,
                    &model.activate_time,
                ],
            )
            .await;
        match inserted {
            Ok(_) => Ok(ModelInserted::Created(model)),
            Err(error) if is_unique_violation(&error) => {
                let existing = self.find_model(&client, &model.name, &model.version).await?.ok_or_else(|| {
                    Error::Unavailable(format!(
                        "model {}@{} was being written concurrently; retry",
                        model.name, model.version
                    ))
                })?;
                if existing.sha256 == model.sha256 {
                    Ok(ModelInserted::Existing(existing))
                } else {
                    Err(Error::AlreadyExists(format!(
                        "model {}@{} exists with other weights; store a new version",
                        model.name, model.version
                    )))
                }
            }
            Err(error) => Err(pg_error("insert model")(error)),
        }
    }

    async fn get_model(&self, name: &str, version: &str) -> Result<StoredModel> {
        let client = self.client().await?;
        self.find_model(&client, name, version)
            .await?
            .ok_or_else(|| Error::not_found("model", format!("{name}@{version}")))
    }

    async fn list_models(&self, kind: Option<&str>, name: Option<&str>) -> Result<Vec<StoredModel>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {MODEL_COLUMNS} FROM models WHERE ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR name = $2)
                     ORDER BY name, create_time DESC, version DESC"
                ),
                &[&kind, &name],
            )
            .await
            .map_err(pg_error("list models"))?;
        Ok(rows.iter().map(read_model).collect())
    }

    async fn activate_model(&self, name: &str, version: &str, at: SystemTime) -> Result<StoredModel> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin model activation"))?;
        // Lock the model's rows so that two activations of one model serialise.
        let rows = transaction
            .query(&format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 FOR UPDATE"), &[&name])
            .await
            .map_err(pg_error("lock model"))?;
        let Some(kind) = rows.iter().find(|row| row.get::<_, String>(1) == version).map(|row| row.get::<_, String>(2))
        else {
            return Err(Error::not_found("model", format!("{name}@{version}")));
        };
        // Activations of one kind take turns, so each is dated after the one before (see below).
        transaction
            .execute("SELECT pg_advisory_xact_lock(hashtext('smartfarm-model-kind:' || $1))", &[&kind])
            .await
            .map_err(pg_error("take the model kind's lock"))?;
        transaction
            .execute("UPDATE models SET activate_time = NULL WHERE name = $1 AND version <> $2", &[&name, &version])
            .await
            .map_err(pg_error("deactivate models"))?;
        let row = transaction
            .query_one(
                &format!(
                    // Never before the kind's latest activation: the kind's serving model is the latest activated,
                    // and replicas' clocks may differ.
                    "UPDATE models SET activate_time = GREATEST($3, (SELECT max(m.activate_time) + interval '1 microsecond'
                                                                  FROM models m WHERE m.kind = models.kind AND m.name <> $1))
                     WHERE name = $1 AND version = $2 RETURNING {MODEL_COLUMNS}"
                ),
                &[&name, &version, &at],
            )
            .await
            .map_err(pg_error("activate model"))?;
        transaction.commit().await.map_err(pg_error("commit model activation"))?;
        Ok(read_model(&row))
    }

    async fn active_model(&self, kind: &str) -> Result<Option<StoredModel>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {MODEL_COLUMNS} FROM models WHERE kind = $1 AND activate_time IS NOT NULL
                     ORDER BY activate_time DESC LIMIT 1"
                ),
                &[&kind],
            )
            .await
            .map_err(pg_error("read active model"))?;
        Ok(row.as_ref().map(read_model))
    }
}
