//! [`ImageStore`] on PostgreSQL.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tokio_postgres::Row;
use uuid::Uuid;

use smartfarm_core::{Error, Result};

use super::{PostgresStore, pg_error};
use crate::image::{
    IMAGE_COLUMNS, ImageCursor, ImageFilter, ImageRecord, ImageStore, Inserted, PhotoToDiagnose, StoredDiagnosis,
    ThumbnailState, UPLOAD_COLUMNS, UploadState, VerdictMark, mark_parameters,
};

fn image_from_row(row: &Row) -> Result<ImageRecord> {
    let labels: serde_json::Value = row.get(10);
    let labels: BTreeMap<String, String> = serde_json::from_value(labels)
        .map_err(|error| Error::internal("images.labels is not a JSON object of strings", error))?;
    let diagnosis = row.get::<_, Option<String>>(16).map(|label| StoredDiagnosis {
        label,
        confidence: row.get::<_, Option<f64>>(17).unwrap_or(0.0),
        model_name: row.get::<_, Option<String>>(18).unwrap_or_default(),
        model_version: row.get::<_, Option<String>>(19).unwrap_or_default(),
        diagnose_time: row.get::<_, Option<SystemTime>>(20).unwrap_or(SystemTime::UNIX_EPOCH),
    });
    Ok(ImageRecord {
        id: row.get(0),
        farm_id: row.get(1),
        device_id: row.get(2),
        capture_time: row.get(3),
        receive_time: row.get(4),
        sha256: row.get(5),
        size_bytes: row.get::<_, i64>(6) as u64,
        content_type: row.get(7),
        width: row.get::<_, i32>(8) as u32,
        height: row.get::<_, i32>(9) as u32,
        labels,
        original_key: row.get(11),
        original_available: row.get(12),
        thumbnail_state: ThumbnailState::parse_stored(row.get(13))?,
        thumbnail_key: row.get(14),
        storage_class: row.get(15),
        diagnosis,
    })
}

fn upload_from_row(row: &Row) -> UploadState {
    UploadState {
        device_id: row.get(0),
        upload_id: row.get(1),
        farm_id: row.get(2),
        sha256: row.get(3),
        size_bytes: row.get::<_, i64>(4) as u64,
        received_bytes: row.get::<_, i64>(5) as u64,
        start_time: row.get(6),
        update_time: row.get(7),
        image_id: row.get(8),
    }
}

async fn find_image(
    client: &impl deadpool_postgres::GenericClient,
    farm_id: Uuid,
    sha256: &str,
) -> Result<Option<ImageRecord>> {
    let row = client
        .query_opt(
            &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE farm_id = $1 AND sha256 = $2"),
            &[&farm_id, &sha256],
        )
        .await
        .map_err(pg_error("find image"))?;
    row.as_ref().map(image_from_row).transpose()
}

async fn upsert_upload(client: &impl deadpool_postgres::GenericClient, state: &UploadState) -> Result<()> {
    client
        .execute(
            "INSERT INTO image_uploads (device_id, upload_id, farm_id, sha256, size_bytes, received_bytes,
                                        start_time, update_time, image_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (device_id, upload_id) DO UPDATE
             SET received_bytes = excluded.received_bytes, update_time = excluded.update_time,
                 image_id = excluded.image_id",
            &[
                &state.device_id,
                &state.upload_id,
                &state.farm_id,
                &state.sha256,
                &(state.size_bytes as i64),
                &(state.received_bytes as i64),
                &state.start_time,
                &state.update_time,
                &state.image_id,
            ],
        )
        .await
        .map_err(pg_error("save upload"))?;
    Ok(())
}

#[async_trait::async_trait]
impl ImageStore for PostgresStore {
    async fn get_image(&self, id: Uuid) -> Result<ImageRecord> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE id = $1"), &[&id])
            .await
            .map_err(pg_error("read image"))?;
        image_from_row(&row.ok_or_else(|| Error::not_found("image", id))?)
    }

    async fn find_image(&self, farm_id: Uuid, sha256: &str) -> Result<Option<ImageRecord>> {
        find_image(&self.client().await?, farm_id, sha256).await
    }

    async fn known_sha256s(&self, farm_id: Uuid, sha256s: &[String]) -> Result<Vec<String>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT sha256 FROM images WHERE farm_id = $1 AND sha256 = ANY($2)", &[&farm_id, &sha256s])
            .await
            .map_err(pg_error("look up sha256s"))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    async fn list_images(
        &self,
        filter: &ImageFilter,
        after: Option<ImageCursor>,
        limit: usize,
    ) -> Result<Vec<ImageRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {IMAGE_COLUMNS} FROM images
                     WHERE farm_id = $1
                       AND ($2::uuid IS NULL OR device_id = $2)
                       AND ($3::timestamptz IS NULL OR capture_time >= $3)
                       AND ($4::timestamptz IS NULL OR capture_time < $4)
                       AND ($5::text IS NULL OR diagnosis_label = $5)
                       AND ($6::timestamptz IS NULL OR (capture_time, id) < ($6, $7::uuid))
                     ORDER BY capture_time DESC, id DESC
                     LIMIT $8"
                ),
                &[
                    &filter.farm_id,
                    &filter.device_id,
                    &filter.captured_from,
                    &filter.captured_to,
                    &filter.diagnosis_label,
                    &after.map(|cursor| cursor.capture_time),
                    &after.map(|cursor| cursor.id),
                    &(limit as i64),
                ],
            )
            .await
            .map_err(pg_error("list images"))?;
        rows.iter().map(image_from_row).collect()
    }

    async fn insert_image(&self, image: ImageRecord, upload: Option<UploadState>) -> Result<Inserted> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin image insert"))?;
        let labels = serde_json::to_value(&image.labels).map_err(|error| Error::internal("encode labels", error))?;
        let inserted = transaction
            .execute(
                "INSERT INTO images (id, farm_id, device_id, capture_time, receive_time, sha256, size_bytes,
                                     content_type, width, height, labels, original_key, original_available,
                                     thumbnail_state, thumbnail_key, storage_class)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
                 ON CONFLICT (farm_id, sha256) DO NOTHING",
                &[
                    &image.id,
                    &image.farm_id,
                    &image.device_id,
                    &image.capture_time,
                    &image.receive_time,
                    &image.sha256,
                    &(image.size_bytes as i64),
                    &image.content_type,
                    &(image.width as i32),
                    &(image.height as i32),
                    &labels,
                    &image.original_key,
                    &image.original_available,
                    &image.thumbnail_state.as_str(),
                    &image.thumbnail_key,
                    &image.storage_class,
                ],
            )
            .await
            .map_err(pg_error("insert image"))?;
        let outcome = if inserted == 1 {
            Inserted::New(image.clone())
        } else {
            Inserted::Existing(
                find_image(&transaction, image.farm_id, &image.sha256)
                    .await?
                    .ok_or_else(|| Error::internal("image insert", anyhow::anyhow!("duplicate row vanished")))?,
            )
        };
        // A photo whose original retention deleted keeps its intent: the bytes just written are not referenced, and
        // the sweeper removes them.
        let referenced = match &outcome {
            Inserted::New(_) => true,
            Inserted::Existing(row) => row.original_available,
        };
        if referenced {
            let removed = transaction
                .execute("DELETE FROM blob_intents WHERE key = $1 AND NOT claimed", &[&image.original_key])
                .await
                .map_err(pg_error("delete blob intent"))?;
            if removed == 0 && matches!(outcome, Inserted::New(_)) {
                // Dropped, the transaction rolls back: nothing is stored.
                return Err(crate::image::swept_under_the_writer(&image.original_key));
            }
        }
        if let Some(upload) = upload {
            let image_id = match &outcome {
                Inserted::New(row) | Inserted::Existing(row) => row.id,
            };
            upsert_upload(&transaction, &UploadState { image_id: Some(image_id), ..upload }).await?;
        }
        transaction.commit().await.map_err(pg_error("commit image insert"))?;
        Ok(outcome)
    }

    async fn get_upload(&self, device_id: Uuid, upload_id: &str) -> Result<Option<UploadState>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {UPLOAD_COLUMNS} FROM image_uploads WHERE device_id = $1 AND upload_id = $2"),
                &[&device_id, &upload_id],
            )
            .await
            .map_err(pg_error("read upload"))?;
        Ok(row.as_ref().map(upload_from_row))
    }

    async fn save_upload(&self, state: &UploadState, expected_received: Option<u64>) -> Result<()> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin upload save"))?;
        let current: Option<i64> = transaction
            .query_opt(
                "SELECT received_bytes FROM image_uploads WHERE device_id = $1 AND upload_id = $2 FOR UPDATE",
                &[&state.device_id, &state.upload_id],
            )
            .await
            .map_err(pg_error("read upload"))?
            .map(|row| row.get(0));
        if current.map(|bytes| bytes as u64) != expected_received {
            return Err(Error::FailedPrecondition(format!(
                "upload {:?} moved on under this connection (now at {:?} bytes); resume from GetUploadStatus",
                state.upload_id, current
            )));
        }
        upsert_upload(&transaction, state).await?;
        transaction.commit().await.map_err(pg_error("commit upload save"))
    }

    async fn delete_upload(&self, device_id: Uuid, upload_id: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM image_uploads WHERE device_id = $1 AND upload_id = $2", &[&device_id, &upload_id])
            .await
            .map_err(pg_error("delete upload"))?;
        Ok(())
    }

    async fn stale_uploads(&self, before: SystemTime, limit: usize) -> Result<Vec<UploadState>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {UPLOAD_COLUMNS} FROM image_uploads WHERE update_time < $1 ORDER BY update_time LIMIT $2"
                ),
                &[&before, &(limit as i64)],
            )
            .await
            .map_err(pg_error("list stale uploads"))?;
        Ok(rows.iter().map(upload_from_row).collect())
    }

    async fn add_blob_intent(&self, key: &str, create_time: SystemTime) -> Result<()> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "INSERT INTO blob_intents (key, create_time) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET create_time = excluded.create_time WHERE NOT blob_intents.claimed",
                &[&key, &create_time],
            )
            .await
            .map_err(pg_error("add blob intent"))?;
        if changed == 0 {
            return Err(Error::Unavailable(format!("blob {key} is being swept; retry")));
        }
        Ok(())
    }

    async fn stale_blob_intents(&self, before: SystemTime, limit: usize) -> Result<Vec<String>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT key FROM blob_intents WHERE create_time < $1 OR claimed ORDER BY create_time LIMIT $2",
                &[&before, &(limit as i64)],
            )
            .await
            .map_err(pg_error("list stale intents"))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    async fn claim_blob_intent(&self, key: &str, before: SystemTime, now: SystemTime) -> Result<Option<Uuid>> {
        let client = self.client().await?;
        let claim = Uuid::now_v7();
        let abandoned = now.checked_sub(crate::image::CLAIM_LIFETIME).unwrap_or(std::time::UNIX_EPOCH);
        // A claim made before claims had ids (no claim_time) counts as abandoned.
        let changed = client
            .execute(
                "UPDATE blob_intents SET claimed = true, claim_id = $3, claim_time = $4
                 WHERE key = $1 AND CASE WHEN claimed THEN claim_time IS NULL OR claim_time < $5
                                         ELSE create_time < $2 END",
                &[&key, &before, &claim, &now, &abandoned],
            )
            .await
            .map_err(pg_error("claim blob intent"))?;
        Ok((changed == 1).then_some(claim))
    }

    async fn blob_referenced(&self, key: &str) -> Result<bool> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM images WHERE original_key = $1 AND original_available)
                     OR EXISTS (SELECT 1 FROM images WHERE thumbnail_key = $1)",
                &[&key],
            )
            .await
            .map_err(pg_error("look for blob references"))?;
        Ok(row.get(0))
    }

    async fn delete_blob_intent(&self, key: &str) -> Result<()> {
        let client = self.client().await?;
        client.execute("DELETE FROM blob_intents WHERE key = $1", &[&key]).await.map_err(pg_error("delete intent"))?;
        Ok(())
    }

    async fn release_blob_intent_claim(&self, key: &str, claim: Uuid) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE blob_intents SET claimed = false, claim_id = NULL, claim_time = NULL
                 WHERE key = $1 AND claim_id = $2",
                &[&key, &claim],
            )
            .await
            .map_err(pg_error("release a claimed intent"))?;
        Ok(())
    }

    async fn delete_claimed_blob_intent(&self, key: &str, claim: Uuid) -> Result<bool> {
        let client = self.client().await?;
        let removed = client
            .execute("DELETE FROM blob_intents WHERE key = $1 AND claim_id = $2", &[&key, &claim])
            .await
            .map_err(pg_error("delete claimed intent"))?;
        Ok(removed == 1)
    }

    async fn pending_thumbnails(&self, limit: usize) -> Result<Vec<ImageRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {IMAGE_COLUMNS} FROM images WHERE thumbnail_state = 'pending' AND original_available
                     ORDER BY receive_time LIMIT $1"
                ),
                &[&(limit as i64)],
            )
            .await
            .map_err(pg_error("list pending thumbnails"))?;
        rows.iter().map(image_from_row).collect()
    }

    async fn set_thumbnail(&self, id: Uuid, thumbnail_key: Option<&str>) -> Result<()> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin thumbnail update"))?;
        if let Some(key) = thumbnail_key {
            let removed = transaction
                .execute("DELETE FROM blob_intents WHERE key = $1 AND NOT claimed", &[&key])
                .await
                .map_err(pg_error("delete blob intent"))?;
            if removed == 0 {
                // Another replica made the same thumbnail and recorded it (its commit removed the intent): the
                // row references the key, so the sweeper keeps the blob.
                let row = transaction
                    .query_opt("SELECT 1 FROM images WHERE id = $1 AND thumbnail_key = $2", &[&id, &key])
                    .await
                    .map_err(pg_error("read thumbnail"))?;
                if row.is_some() {
                    return Ok(());
                }
                return Err(crate::image::swept_under_the_writer(key));
            }
        }
        let state = if thumbnail_key.is_some() { ThumbnailState::Done } else { ThumbnailState::Failed };
        transaction
            .execute(
                "UPDATE images SET thumbnail_state = $2, thumbnail_key = $3 WHERE id = $1",
                &[&id, &state.as_str(), &thumbnail_key],
            )
            .await
            .map_err(pg_error("update thumbnail"))?;
        transaction.commit().await.map_err(pg_error("commit thumbnail update"))
    }

    async fn expire_originals(
        &self,
        farm_id: Uuid,
        captured_before: SystemTime,
        limit: usize,
        now: SystemTime,
    ) -> Result<Vec<String>> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin retention"))?;
        let rows = transaction
            .query(
                "UPDATE images SET original_available = false
                 WHERE id IN (SELECT id FROM images
                              WHERE farm_id = $1 AND original_available AND capture_time < $2 AND receive_time < $2
                                AND thumbnail_state <> 'pending'
                              ORDER BY capture_time LIMIT $3
                              FOR UPDATE SKIP LOCKED)
                 RETURNING original_key",
                &[&farm_id, &captured_before, &(limit as i64)],
            )
            .await
            .map_err(pg_error("mark originals deleted"))?;
        let keys: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        transaction
            .execute(
                "INSERT INTO blob_intents (key, create_time) SELECT unnest($1::text[]), $2
                 ON CONFLICT (key) DO UPDATE SET create_time = excluded.create_time",
                &[&keys, &now],
            )
            .await
            .map_err(pg_error("add blob intents"))?;
        transaction.commit().await.map_err(pg_error("commit retention"))?;
        Ok(keys)
    }

    async fn originals_to_move(
        &self,
        captured_before: SystemTime,
        storage_class: &str,
        limit: usize,
    ) -> Result<Vec<ImageRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {IMAGE_COLUMNS} FROM images
                     WHERE original_available AND capture_time < $1 AND storage_class IS DISTINCT FROM $2
                     ORDER BY capture_time LIMIT $3"
                ),
                &[&captured_before, &storage_class, &(limit as i64)],
            )
            .await
            .map_err(pg_error("list originals to move"))?;
        rows.iter().map(image_from_row).collect()
    }

    async fn set_storage_class(&self, id: Uuid, storage_class: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute("UPDATE images SET storage_class = $2 WHERE id = $1", &[&id, &storage_class])
            .await
            .map_err(pg_error("set storage class"))?;
        Ok(())
    }

    async fn set_diagnosis(&self, id: Uuid, diagnosis: &StoredDiagnosis, mark: VerdictMark) -> Result<bool> {
        let client = self.client().await?;
        let (announced, pending_if_first) = mark_parameters(mark);
        // SET reads the row as it was: a label still NULL means this is the photo's first diagnosis.
        let updated = client
            .execute(
                "UPDATE images SET diagnosis_label = $2, diagnosis_confidence = $3, diagnosis_model = $4,
                     diagnosis_version = $5, diagnosis_time = $6,
                     verdict_pending = coalesce($7, CASE WHEN diagnosis_label IS NULL THEN $8 ELSE verdict_pending END)
                 WHERE id = $1 AND ($7::boolean IS NOT NULL OR diagnosis_label IS NULL OR NOT verdict_pending)",
                &[
                    &id,
                    &diagnosis.label,
                    &diagnosis.confidence,
                    &diagnosis.model_name,
                    &diagnosis.model_version,
                    &diagnosis.diagnose_time,
                    &announced,
                    &pending_if_first,
                ],
            )
            .await
            .map_err(pg_error("set diagnosis"))?;
        if updated == 0 {
            // Left as it was (a verdict pending), or no such photo.
            let found = client
                .query_opt("SELECT 1 FROM images WHERE id = $1", &[&id])
                .await
                .map_err(pg_error("find an image"))?;
            return found.map(|_| false).ok_or_else(|| Error::not_found("image", id));
        }
        Ok(true)
    }

    async fn images_to_diagnose(
        &self,
        received_from: SystemTime,
        received_before: SystemTime,
        now: SystemTime,
        max_tries: u32,
        limit: usize,
    ) -> Result<Vec<PhotoToDiagnose>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {IMAGE_COLUMNS}, late_tries FROM images
                     WHERE (diagnosis_label IS NULL OR verdict_pending)
                       AND receive_time >= $1 AND receive_time < $2 AND original_available
                       AND (diagnosis_time IS NULL OR diagnosis_time < $2)
                       AND late_tries < $3 AND (late_try_after IS NULL OR late_try_after <= $4)
                     ORDER BY receive_time LIMIT $5"
                ),
                &[&received_from, &received_before, &(max_tries.min(i32::MAX as u32) as i32), &now, &(limit as i64)],
            )
            .await
            .map_err(pg_error("list images to diagnose"))?;
        rows.iter()
            .map(|row| {
                let late_tries = row.get::<_, i32>(21).max(0) as u32;
                Ok(PhotoToDiagnose { image: image_from_row(row)?, late_tries })
            })
            .collect()
    }

    async fn claim_late_try(
        &self,
        id: Uuid,
        expected: u32,
        now: SystemTime,
        next_try_after: SystemTime,
    ) -> Result<bool> {
        let client = self.client().await?;
        let expected = expected.min(i32::MAX as u32 - 1) as i32;
        let updated = client
            .execute(
                "UPDATE images SET late_tries = $2 + 1, late_try_after = $4
                 WHERE id = $1 AND late_tries = $2 AND (late_try_after IS NULL OR late_try_after <= $3)
                   AND (diagnosis_label IS NULL OR verdict_pending)",
                &[&id, &expected, &now, &next_try_after],
            )
            .await
            .map_err(pg_error("count a late diagnosis try"))?;
        Ok(updated == 1)
    }

    async fn give_late_try_back(&self, id: Uuid, tries: u32) -> Result<bool> {
        let client = self.client().await?;
        let tries = tries.min(i32::MAX as u32) as i32;
        let updated = client
            .execute(
                "UPDATE images SET late_tries = $2 - 1 WHERE id = $1 AND late_tries = $2 AND $2 > 0",
                &[&id, &tries],
            )
            .await
            .map_err(pg_error("give a late diagnosis try back"))?;
        Ok(updated == 1)
    }

    async fn confirm_verdict(&self, id: Uuid, label: &str, model_version: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE images SET verdict_pending = false
                 WHERE id = $1 AND verdict_pending AND diagnosis_label = $2 AND diagnosis_version = $3",
                &[&id, &label, &model_version],
            )
            .await
            .map_err(pg_error("confirm a verdict"))?;
        Ok(())
    }
}
