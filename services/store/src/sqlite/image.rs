//! [`ImageStore`] on SQLite.

use std::collections::BTreeMap;
use std::time::SystemTime;

use rusqlite::{OptionalExtension, Row, params, params_from_iter};
use uuid::Uuid;

use smartfarm_core::time::{from_unix_micros, to_unix_micros};
use smartfarm_core::{Error, Result};

use super::{SqliteStore, is_unique_violation, sql_error};
use crate::image::{
    IMAGE_COLUMNS, ImageCursor, ImageFilter, ImageRecord, ImageStore, Inserted, PhotoToDiagnose, StoredDiagnosis,
    ThumbnailState, UPLOAD_COLUMNS, UploadState, VerdictMark, mark_parameters,
};

fn uuid_text(row: &Row<'_>, index: usize) -> rusqlite::Result<Uuid> {
    let text: String = row.get(index)?;
    Uuid::try_parse(&text)
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(error)))
}

/// Raw image columns; labels and the thumbnail state are decoded afterwards so their errors say what is corrupt.
struct RawImage {
    record: ImageRecord,
    labels: String,
    thumbnail_state: String,
}

fn image_row(row: &Row<'_>) -> rusqlite::Result<RawImage> {
    let diagnosis = match row.get::<_, Option<String>>(16)? {
        Some(label) => Some(StoredDiagnosis {
            label,
            confidence: row.get::<_, Option<f64>>(17)?.unwrap_or(0.0),
            model_name: row.get::<_, Option<String>>(18)?.unwrap_or_default(),
            model_version: row.get::<_, Option<String>>(19)?.unwrap_or_default(),
            diagnose_time: from_unix_micros(row.get::<_, Option<i64>>(20)?.unwrap_or(0)),
        }),
        None => None,
    };
    Ok(RawImage {
        record: ImageRecord {
            id: uuid_text(row, 0)?,
            farm_id: uuid_text(row, 1)?,
            device_id: uuid_text(row, 2)?,
            capture_time: from_unix_micros(row.get(3)?),
            receive_time: from_unix_micros(row.get(4)?),
            sha256: row.get(5)?,
            size_bytes: row.get::<_, i64>(6)? as u64,
            content_type: row.get(7)?,
            width: row.get::<_, i64>(8)? as u32,
            height: row.get::<_, i64>(9)? as u32,
            labels: BTreeMap::new(),
            original_key: row.get(11)?,
            original_available: row.get(12)?,
            thumbnail_state: ThumbnailState::Pending,
            thumbnail_key: row.get(14)?,
            storage_class: row.get(15)?,
            diagnosis,
        },
        labels: row.get(10)?,
        thumbnail_state: row.get(13)?,
    })
}

impl RawImage {
    fn decode(mut self) -> Result<ImageRecord> {
        self.record.labels = serde_json::from_str(&self.labels)
            .map_err(|error| Error::internal("images.labels is not a JSON object of strings", error))?;
        self.record.thumbnail_state = ThumbnailState::parse_stored(&self.thumbnail_state)?;
        Ok(self.record)
    }
}

fn upload_row(row: &Row<'_>) -> rusqlite::Result<UploadState> {
    Ok(UploadState {
        device_id: uuid_text(row, 0)?,
        upload_id: row.get(1)?,
        farm_id: uuid_text(row, 2)?,
        sha256: row.get(3)?,
        size_bytes: row.get::<_, i64>(4)? as u64,
        received_bytes: row.get::<_, i64>(5)? as u64,
        start_time: from_unix_micros(row.get(6)?),
        update_time: from_unix_micros(row.get(7)?),
        image_id: match row.get::<_, Option<String>>(8)? {
            Some(_) => Some(uuid_text(row, 8)?),
            None => None,
        },
    })
}

fn query_images(
    connection: &rusqlite::Connection,
    sql: &str,
    parameters: impl rusqlite::Params,
) -> Result<Vec<ImageRecord>> {
    let mut statement = connection.prepare(sql).map_err(sql_error("prepare image query"))?;
    let rows = statement.query_map(parameters, image_row).map_err(sql_error("query images"))?;
    rows.map(|row| row.map_err(sql_error("read image row"))?.decode()).collect()
}

fn find_image(connection: &rusqlite::Connection, farm_id: Uuid, sha256: &str) -> Result<Option<ImageRecord>> {
    let sql = format!("SELECT {IMAGE_COLUMNS} FROM images WHERE farm_id = ?1 AND sha256 = ?2");
    Ok(query_images(connection, &sql, params![farm_id.to_string(), sha256])?.pop())
}

fn upsert_upload(connection: &rusqlite::Connection, state: &UploadState) -> Result<()> {
    connection
        .execute(
            "INSERT INTO image_uploads (device_id, upload_id, farm_id, sha256, size_bytes, received_bytes,
                                        start_time, update_time, image_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (device_id, upload_id) DO UPDATE
             SET received_bytes = excluded.received_bytes, update_time = excluded.update_time,
                 image_id = excluded.image_id",
            params![
                state.device_id.to_string(),
                state.upload_id,
                state.farm_id.to_string(),
                state.sha256,
                state.size_bytes as i64,
                state.received_bytes as i64,
                to_unix_micros(state.start_time),
                to_unix_micros(state.update_time),
                state.image_id.map(|id| id.to_string()),
            ],
        )
        .map_err(sql_error("save upload"))?;
    Ok(())
}

#[async_trait::async_trait]
impl ImageStore for SqliteStore {
    async fn get_image(&self, id: Uuid) -> Result<ImageRecord> {
        self.run(move |connection| {
            let sql = format!("SELECT {IMAGE_COLUMNS} FROM images WHERE id = ?1");
            query_images(connection, &sql, [id.to_string()])?.pop().ok_or_else(|| Error::not_found("image", id))
        })
        .await
    }

    async fn find_image(&self, farm_id: Uuid, sha256: &str) -> Result<Option<ImageRecord>> {
        let sha256 = sha256.to_string();
        self.run(move |connection| find_image(connection, farm_id, &sha256)).await
    }

    async fn known_sha256s(&self, farm_id: Uuid, sha256s: &[String]) -> Result<Vec<String>> {
        let sha256s = sha256s.to_vec();
        self.run(move |connection| {
            let mut known = Vec::new();
            let mut statement = connection
                .prepare_cached("SELECT 1 FROM images WHERE farm_id = ?1 AND sha256 = ?2")
                .map_err(sql_error("prepare sha256 lookup"))?;
            for sha256 in sha256s {
                if statement.exists(params![farm_id.to_string(), sha256]).map_err(sql_error("look up sha256"))? {
                    known.push(sha256);
                }
            }
            Ok(known)
        })
        .await
    }

    async fn list_images(
        &self,
        filter: &ImageFilter,
        after: Option<ImageCursor>,
        limit: usize,
    ) -> Result<Vec<ImageRecord>> {
        let filter = filter.clone();
        self.run(move |connection| {
            let sql = format!(
                "SELECT {IMAGE_COLUMNS} FROM images
                 WHERE farm_id = ?1
                   AND (?2 IS NULL OR device_id = ?2)
                   AND (?3 IS NULL OR capture_time >= ?3)
                   AND (?4 IS NULL OR capture_time < ?4)
                   AND (?5 IS NULL OR diagnosis_label = ?5)
                   AND (?6 IS NULL OR capture_time < ?6 OR (capture_time = ?6 AND id < ?7))
                 ORDER BY capture_time DESC, id DESC
                 LIMIT ?8"
            );
            query_images(
                connection,
                &sql,
                params![
                    filter.farm_id.to_string(),
                    filter.device_id.map(|id| id.to_string()),
                    filter.captured_from.map(to_unix_micros),
                    filter.captured_to.map(to_unix_micros),
                    filter.diagnosis_label,
                    after.map(|cursor| to_unix_micros(cursor.capture_time)),
                    after.map(|cursor| cursor.id.to_string()),
                    limit as i64,
                ],
            )
        })
        .await
    }

    async fn insert_image(&self, image: ImageRecord, upload: Option<UploadState>) -> Result<Inserted> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin image insert"))?;
            let labels =
                serde_json::to_string(&image.labels).map_err(|error| Error::internal("encode labels", error))?;
            let inserted = transaction.execute(
                "INSERT INTO images (id, farm_id, device_id, capture_time, receive_time, sha256, size_bytes,
                                     content_type, width, height, labels, original_key, original_available,
                                     thumbnail_state, thumbnail_key, storage_class)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    image.id.to_string(),
                    image.farm_id.to_string(),
                    image.device_id.to_string(),
                    to_unix_micros(image.capture_time),
                    to_unix_micros(image.receive_time),
                    image.sha256,
                    image.size_bytes as i64,
                    image.content_type,
                    image.width as i64,
                    image.height as i64,
                    labels,
                    image.original_key,
                    image.original_available,
                    image.thumbnail_state.as_str(),
                    image.thumbnail_key,
                    image.storage_class,
                ],
            );
            let outcome = match inserted {
                Ok(_) => Inserted::New(image.clone()),
                Err(error) if is_unique_violation(&error) => Inserted::Existing(
                    find_image(&transaction, image.farm_id, &image.sha256)?
                        .ok_or_else(|| Error::internal("image insert", anyhow::anyhow!("duplicate row vanished")))?,
                ),
                Err(error) => return Err(sql_error("insert image")(error)),
            };
            // A photo whose original retention deleted keeps its intent: the bytes just written are not referenced,
            // and the sweeper removes them.
            let referenced = match &outcome {
                Inserted::New(_) => true,
                Inserted::Existing(row) => row.original_available,
            };
            if referenced {
                let removed = transaction
                    .execute("DELETE FROM blob_intents WHERE key = ?1 AND NOT claimed", [&image.original_key])
                    .map_err(sql_error("delete blob intent"))?;
                if removed == 0 && matches!(outcome, Inserted::New(_)) {
                    // Dropped, the transaction rolls back: nothing is stored.
                    return Err(crate::image::swept_under_the_writer(&image.original_key));
                }
            }
            if let Some(upload) = upload {
                let image_id = match &outcome {
                    Inserted::New(row) | Inserted::Existing(row) => row.id,
                };
                upsert_upload(&transaction, &UploadState { image_id: Some(image_id), ..upload })?;
            }
            transaction.commit().map_err(sql_error("commit image insert"))?;
            Ok(outcome)
        })
        .await
    }

    async fn get_upload(&self, device_id: Uuid, upload_id: &str) -> Result<Option<UploadState>> {
        let upload_id = upload_id.to_string();
        self.run(move |connection| {
            connection
                .query_row(
                    &format!("SELECT {UPLOAD_COLUMNS} FROM image_uploads WHERE device_id = ?1 AND upload_id = ?2"),
                    params![device_id.to_string(), upload_id],
                    upload_row,
                )
                .optional()
                .map_err(sql_error("read upload"))
        })
        .await
    }

    async fn save_upload(&self, state: &UploadState, expected_received: Option<u64>) -> Result<()> {
        let state = state.clone();
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin upload save"))?;
            let current: Option<i64> = transaction
                .query_row(
                    "SELECT received_bytes FROM image_uploads WHERE device_id = ?1 AND upload_id = ?2",
                    params![state.device_id.to_string(), state.upload_id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sql_error("read upload"))?;
            if current.map(|bytes| bytes as u64) != expected_received {
                return Err(Error::FailedPrecondition(format!(
                    "upload {:?} moved on under this connection (now at {:?} bytes); resume from GetUploadStatus",
                    state.upload_id, current
                )));
            }
            upsert_upload(&transaction, &state)?;
            transaction.commit().map_err(sql_error("commit upload save"))
        })
        .await
    }

    async fn delete_upload(&self, device_id: Uuid, upload_id: &str) -> Result<()> {
        let upload_id = upload_id.to_string();
        self.run(move |connection| {
            connection
                .execute(
                    "DELETE FROM image_uploads WHERE device_id = ?1 AND upload_id = ?2",
                    params![device_id.to_string(), upload_id],
                )
                .map_err(sql_error("delete upload"))?;
            Ok(())
        })
        .await
    }

    async fn stale_uploads(&self, before: SystemTime, limit: usize) -> Result<Vec<UploadState>> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare(&format!(
                    "SELECT {UPLOAD_COLUMNS} FROM image_uploads WHERE update_time < ?1 ORDER BY update_time LIMIT ?2"
                ))
                .map_err(sql_error("prepare stale uploads"))?;
            let rows = statement
                .query_map(params![to_unix_micros(before), limit as i64], upload_row)
                .map_err(sql_error("list stale uploads"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read upload row"))
        })
        .await
    }

    async fn add_blob_intent(&self, key: &str, create_time: SystemTime) -> Result<()> {
        let key = key.to_string();
        self.run(move |connection| {
            let changed = connection
                .execute(
                    "INSERT INTO blob_intents (key, create_time) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET create_time = excluded.create_time WHERE NOT blob_intents.claimed",
                    params![key, to_unix_micros(create_time)],
                )
                .map_err(sql_error("add blob intent"))?;
            if changed == 0 {
                return Err(Error::Unavailable(format!("blob {key} is being swept; retry")));
            }
            Ok(())
        })
        .await
    }

    async fn stale_blob_intents(&self, before: SystemTime, limit: usize) -> Result<Vec<String>> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare("SELECT key FROM blob_intents WHERE create_time < ?1 OR claimed ORDER BY create_time LIMIT ?2")
                .map_err(sql_error("prepare stale intents"))?;
            let rows = statement
                .query_map(params![to_unix_micros(before), limit as i64], |row| row.get(0))
                .map_err(sql_error("list stale intents"))?;
            rows.collect::<rusqlite::Result<Vec<String>>>().map_err(sql_error("read intent row"))
        })
        .await
    }

    async fn claim_blob_intent(&self, key: &str, before: SystemTime, now: SystemTime) -> Result<Option<Uuid>> {
        let key = key.to_string();
        let claim = Uuid::now_v7();
        let abandoned = now.checked_sub(crate::image::CLAIM_LIFETIME).unwrap_or(std::time::UNIX_EPOCH);
        self.run(move |connection| {
            // A claim made before claims had ids (no claim_time) counts as abandoned.
            let changed = connection
                .execute(
                    "UPDATE blob_intents SET claimed = 1, claim_id = ?3, claim_time = ?4
                     WHERE key = ?1 AND CASE WHEN claimed THEN claim_time IS NULL OR claim_time < ?5
                                             ELSE create_time < ?2 END",
                    params![
                        key,
                        to_unix_micros(before),
                        claim.to_string(),
                        to_unix_micros(now),
                        to_unix_micros(abandoned)
                    ],
                )
                .map_err(sql_error("claim blob intent"))?;
            Ok((changed == 1).then_some(claim))
        })
        .await
    }

    async fn blob_referenced(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        self.run(move |connection| {
            connection
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM images WHERE original_key = ?1 AND original_available)
                         OR EXISTS (SELECT 1 FROM images WHERE thumbnail_key = ?1)",
                    [key],
                    |row| row.get(0),
                )
                .map_err(sql_error("look for blob references"))
        })
        .await
    }

    async fn delete_blob_intent(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.run(move |connection| {
            connection.execute("DELETE FROM blob_intents WHERE key = ?1", [key]).map_err(sql_error("delete intent"))?;
            Ok(())
        })
        .await
    }

    async fn release_blob_intent_claim(&self, key: &str, claim: Uuid) -> Result<()> {
        let key = key.to_string();
        self.run(move |connection| {
            connection
                .execute(
                    "UPDATE blob_intents SET claimed = 0, claim_id = NULL, claim_time = NULL
                     WHERE key = ?1 AND claim_id = ?2",
                    params![key, claim.to_string()],
                )
                .map_err(sql_error("release a claimed intent"))?;
            Ok(())
        })
        .await
    }

    async fn delete_claimed_blob_intent(&self, key: &str, claim: Uuid) -> Result<bool> {
        let key = key.to_string();
        self.run(move |connection| {
            let removed = connection
                .execute("DELETE FROM blob_intents WHERE key = ?1 AND claim_id = ?2", params![key, claim.to_string()])
                .map_err(sql_error("delete claimed intent"))?;
            Ok(removed == 1)
        })
        .await
    }

    async fn pending_thumbnails(&self, limit: usize) -> Result<Vec<ImageRecord>> {
        self.run(move |connection| {
            let sql = format!(
                "SELECT {IMAGE_COLUMNS} FROM images WHERE thumbnail_state = 'pending' AND original_available
                 ORDER BY receive_time LIMIT ?1"
            );
            query_images(connection, &sql, [limit as i64])
        })
        .await
    }

    async fn set_thumbnail(&self, id: Uuid, thumbnail_key: Option<&str>) -> Result<()> {
        let thumbnail_key = thumbnail_key.map(str::to_string);
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin thumbnail update"))?;
            if let Some(key) = &thumbnail_key {
                let removed = transaction
                    .execute("DELETE FROM blob_intents WHERE key = ?1 AND NOT claimed", [key])
                    .map_err(sql_error("delete blob intent"))?;
                if removed == 0 {
                    // Another replica made the same thumbnail and recorded it (its commit removed the intent): the
                    // row references the key, so the sweeper keeps the blob.
                    let recorded: bool = transaction
                        .query_row(
                            "SELECT EXISTS (SELECT 1 FROM images WHERE id = ?1 AND thumbnail_key = ?2)",
                            params![id.to_string(), key],
                            |row| row.get(0),
                        )
                        .map_err(sql_error("read thumbnail"))?;
                    if recorded {
                        return Ok(());
                    }
                    return Err(crate::image::swept_under_the_writer(key));
                }
            }
            let state = if thumbnail_key.is_some() { ThumbnailState::Done } else { ThumbnailState::Failed };
            transaction
                .execute(
                    "UPDATE images SET thumbnail_state = ?2, thumbnail_key = ?3 WHERE id = ?1",
                    params![id.to_string(), state.as_str(), thumbnail_key],
                )
                .map_err(sql_error("update thumbnail"))?;
            transaction.commit().map_err(sql_error("commit thumbnail update"))
        })
        .await
    }

    async fn expire_originals(
        &self,
        farm_id: Uuid,
        captured_before: SystemTime,
        limit: usize,
        now: SystemTime,
    ) -> Result<Vec<String>> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin retention"))?;
            let rows: Vec<(String, String)> = {
                let mut statement = transaction
                    .prepare(
                        "SELECT id, original_key FROM images
                         WHERE farm_id = ?1 AND original_available AND capture_time < ?2 AND receive_time < ?2
                           AND thumbnail_state <> 'pending'
                         ORDER BY capture_time LIMIT ?3",
                    )
                    .map_err(sql_error("prepare retention"))?;
                let rows = statement
                    .query_map(params![farm_id.to_string(), to_unix_micros(captured_before), limit as i64], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .map_err(sql_error("list expired originals"))?;
                rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read expired original"))?
            };
            for (id, key) in &rows {
                transaction
                    .execute("UPDATE images SET original_available = 0 WHERE id = ?1", [id])
                    .map_err(sql_error("mark original deleted"))?;
                transaction
                    .execute(
                        "INSERT INTO blob_intents (key, create_time) VALUES (?1, ?2)
                         ON CONFLICT (key) DO UPDATE SET create_time = excluded.create_time",
                        params![key, to_unix_micros(now)],
                    )
                    .map_err(sql_error("add blob intent"))?;
            }
            transaction.commit().map_err(sql_error("commit retention"))?;
            Ok(rows.into_iter().map(|(_, key)| key).collect())
        })
        .await
    }

    async fn originals_to_move(
        &self,
        captured_before: SystemTime,
        storage_class: &str,
        limit: usize,
    ) -> Result<Vec<ImageRecord>> {
        let storage_class = storage_class.to_string();
        self.run(move |connection| {
            let sql = format!(
                "SELECT {IMAGE_COLUMNS} FROM images
                 WHERE original_available AND capture_time < ?1 AND storage_class IS NOT ?2
                 ORDER BY capture_time LIMIT ?3"
            );
            query_images(connection, &sql, params![to_unix_micros(captured_before), storage_class, limit as i64])
        })
        .await
    }

    async fn set_storage_class(&self, id: Uuid, storage_class: &str) -> Result<()> {
        let storage_class = storage_class.to_string();
        self.run(move |connection| {
            connection
                .execute(
                    "UPDATE images SET storage_class = ?2 WHERE id = ?1",
                    params_from_iter([id.to_string(), storage_class]),
                )
                .map_err(sql_error("set storage class"))?;
            Ok(())
        })
        .await
    }

    async fn set_diagnosis(&self, id: Uuid, diagnosis: &StoredDiagnosis, mark: VerdictMark) -> Result<bool> {
        let (announced, pending_if_first) = mark_parameters(mark);
        let diagnosis = diagnosis.clone();
        self.run(move |connection| {
            let updated = connection
                .execute(
                    "UPDATE images SET diagnosis_label = ?2, diagnosis_confidence = ?3, diagnosis_model = ?4,
                         diagnosis_version = ?5, diagnosis_time = ?6,
                         verdict_pending = coalesce(?7, CASE WHEN diagnosis_label IS NULL THEN ?8 ELSE verdict_pending END)
                     WHERE id = ?1 AND (?7 IS NOT NULL OR diagnosis_label IS NULL OR NOT verdict_pending)",
                    params![
                        id.to_string(),
                        diagnosis.label,
                        diagnosis.confidence,
                        diagnosis.model_name,
                        diagnosis.model_version,
                        to_unix_micros(diagnosis.diagnose_time),
                        announced,
                        pending_if_first
                    ],
                )
                .map_err(sql_error("set diagnosis"))?;
            if updated == 0 {
                // Left as it was (a verdict pending), or no such photo.
                let found = connection
                    .query_row("SELECT 1 FROM images WHERE id = ?1", [id.to_string()], |_| Ok(()))
                    .optional()
                    .map_err(sql_error("find an image"))?;
                return found.map(|()| false).ok_or_else(|| Error::not_found("image", id));
            }
            Ok(true)
        })
        .await
    }

    async fn images_to_diagnose(
        &self,
        received_from: SystemTime,
        received_before: SystemTime,
        now: SystemTime,
        max_tries: u32,
        limit: usize,
    ) -> Result<Vec<PhotoToDiagnose>> {
        self.run(move |connection| {
            let sql = format!(
                "SELECT {IMAGE_COLUMNS}, late_tries FROM images
                 WHERE (diagnosis_label IS NULL OR verdict_pending)
                   AND receive_time >= ?1 AND receive_time < ?2 AND original_available
                   AND (diagnosis_time IS NULL OR diagnosis_time < ?2)
                   AND late_tries < ?3 AND (late_try_after IS NULL OR late_try_after <= ?4)
                 ORDER BY receive_time LIMIT ?5"
            );
            let mut statement = connection.prepare(&sql).map_err(sql_error("prepare image query"))?;
            let parameters = params![
                to_unix_micros(received_from),
                to_unix_micros(received_before),
                i64::from(max_tries),
                to_unix_micros(now),
                limit as i64
            ];
            let rows = statement
                .query_map(parameters, |row| Ok((image_row(row)?, row.get::<_, i64>(21)?)))
                .map_err(sql_error("list images to diagnose"))?;
            rows.map(|row| {
                let (image, late_tries) = row.map_err(sql_error("read image row"))?;
                Ok(PhotoToDiagnose {
                    image: image.decode()?,
                    late_tries: late_tries.clamp(0, i64::from(u32::MAX)) as u32,
                })
            })
            .collect()
        })
        .await
    }

    async fn claim_late_try(
        &self,
        id: Uuid,
        expected: u32,
        now: SystemTime,
        next_try_after: SystemTime,
    ) -> Result<bool> {
        self.run(move |connection| {
            let updated = connection
                .execute(
                    "UPDATE images SET late_tries = ?2 + 1, late_try_after = ?4
                     WHERE id = ?1 AND late_tries = ?2 AND (late_try_after IS NULL OR late_try_after <= ?3)
                       AND (diagnosis_label IS NULL OR verdict_pending)",
                    params![id.to_string(), i64::from(expected), to_unix_micros(now), to_unix_micros(next_try_after)],
                )
                .map_err(sql_error("count a late diagnosis try"))?;
            Ok(updated == 1)
        })
        .await
    }

    async fn give_late_try_back(&self, id: Uuid, tries: u32) -> Result<bool> {
        self.run(move |connection| {
            let updated = connection
                .execute(
                    "UPDATE images SET late_tries = ?2 - 1 WHERE id = ?1 AND late_tries = ?2 AND ?2 > 0",
                    params![id.to_string(), i64::from(tries)],
                )
                .map_err(sql_error("give a late diagnosis try back"))?;
            Ok(updated == 1)
        })
        .await
    }

    async fn confirm_verdict(&self, id: Uuid, label: &str, model_version: &str) -> Result<()> {
        let (label, model_version) = (label.to_owned(), model_version.to_owned());
        self.run(move |connection| {
            connection
                .execute(
                    "UPDATE images SET verdict_pending = 0
                     WHERE id = ?1 AND verdict_pending AND diagnosis_label = ?2 AND diagnosis_version = ?3",
                    params![id.to_string(), label, model_version],
                )
                .map_err(sql_error("confirm a verdict"))?;
            Ok(())
        })
        .await
    }
}
