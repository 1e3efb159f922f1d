//! `ImageService.Upload`: a header, then chunks in offset order. The bytes of one call are kept in memory (at most
//! `max_image_bytes`) and written once, complete and verified; when the stream breaks before the end, what arrived
//! is kept as a part blob so the client can resume from `GetUploadStatus`. A stored photo is one content-addressed
//! blob and one row, committed in that order behind a blob intent (see `smartfarm_store::image`).

use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tonic::Streaming;
use uuid::Uuid;

use smartfarm_core::media::{IMAGE_TYPES, SNIFF_BYTES, describe_non_image, sniff_image};
use smartfarm_core::{Error, Principal, Result, time, validate};
use smartfarm_proto::image::v1 as pb;
use smartfarm_store::image::{ImageRecord, Inserted, ThumbnailState, UploadState};
use smartfarm_store::model::{DeviceKind, DeviceState};

use crate::{ImageApi, media, original_key};

/// The largest chunk accepted.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;
/// An upload that sends nothing for this long is cut (what arrived is kept for resuming).
const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Capture times further than this in the future are refused (a camera with a wrong clock).
const MAX_FUTURE_SKEW: Duration = Duration::from_secs(24 * 3600);

/// A validated upload header.
struct Header {
    upload_id: String,
    device_id: Uuid,
    farm_id: Uuid,
    capture_time: SystemTime,
    sha256: String,
    size_bytes: u64,
    content_type: &'static str,
    labels: std::collections::BTreeMap<String, String>,
}

/// Checks an upload id: 1 to 128 letters, digits, '-' and '_' (it becomes part of blob keys).
pub(crate) fn upload_id(value: &str) -> Result<String> {
    let valid = !value.is_empty()
        && value.len() <= 128
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(Error::invalid(
            "upload_id",
            format!("{} must be 1 to 128 letters, digits, '-' or '_'", validate::excerpt(value)),
        ));
    }
    Ok(value.to_string())
}

/// Checks a hex SHA-256 and lowers its case.
pub(crate) fn sha256_hex(field: &str, value: &str) -> Result<String> {
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(
            field,
            format!("{} is not a hex SHA-256 (64 hex digits)", validate::excerpt(value)),
        ));
    }
    Ok(value.to_ascii_lowercase())
}

impl ImageApi {
    /// The camera a call names, if the caller may act for it: a gateway for its own farm's cameras, an API key for
    /// cameras of farms it may touch.
    pub(crate) async fn camera_for(&self, principal: &Principal, device_id: &str) -> Result<(Uuid, Uuid)> {
        let device_id = validate::id("device_id", device_id)?;
        let device = self.registry.get_device(device_id).await?;
        match principal {
            Principal::Gateway { farm_id, .. } if *farm_id != device.farm_id => {
                return Err(Error::PermissionDenied("the camera belongs to another farm".into()));
            }
            Principal::Gateway { .. } => {}
            other => other.authorize_farm(device.farm_id)?,
        }
        if device.kind != DeviceKind::Camera {
            return Err(Error::FailedPrecondition(format!(
                "device {device_id} is a {}, not a camera",
                device.kind.as_str()
            )));
        }
        if device.state == DeviceState::Decommissioned {
            return Err(Error::FailedPrecondition(format!("camera {device_id} is decommissioned")));
        }
        Ok((device_id, device.farm_id))
    }

    async fn header(&self, principal: &Principal, header: pb::UploadHeader) -> Result<Header> {
        let upload_id = upload_id(&header.upload_id)?;
        let sha256 = sha256_hex("sha256", &header.sha256)?;
        if header.size_bytes == 0 {
            return Err(Error::invalid("size_bytes", "must be at least 1"));
        }
        if header.size_bytes > self.settings.max_image_bytes {
            return Err(Error::invalid(
                "size_bytes",
                format!(
                    "{} bytes is over the maximum photo size of {} bytes",
                    header.size_bytes, self.settings.max_image_bytes
                ),
            ));
        }
        let content_type = IMAGE_TYPES.iter().find(|t| **t == header.content_type).ok_or_else(|| {
            Error::invalid(
                "content_type",
                format!(
                    "{} is not a stored type ({})",
                    validate::excerpt(&header.content_type),
                    IMAGE_TYPES.join(", ")
                ),
            )
        })?;
        let capture_time = header.capture_time.as_ref().ok_or_else(|| Error::invalid("capture_time", "is required"))?;
        let capture_time = time::from_timestamp("capture_time", capture_time)?;
        if capture_time > time::now() + MAX_FUTURE_SKEW {
            return Err(Error::invalid("capture_time", "is more than a day in the future: check the camera's clock"));
        }
        let labels = validate::labels("labels", &header.labels)?;
        let (device_id, farm_id) = self.camera_for(principal, &header.device_id).await?;
        Ok(Header {
            upload_id,
            device_id,
            farm_id,
            capture_time,
            sha256,
            size_bytes: header.size_bytes,
            content_type,
            labels,
        })
    }

    /// Runs one `Upload` call. When the stream breaks or goes silent (on a farm's link, a common event rather than an
    /// error of the service), `broken` says how, and the error returned is only for the client, if it is still there.
    pub(crate) async fn upload(
        &self,
        principal: &Principal,
        mut stream: Streaming<pb::UploadRequest>,
        broken: &mut Option<String>,
    ) -> Result<pb::UploadResponse> {
        let first = stream.message().await.map_err(|status| cut_short("broke before its header", status, broken))?;
        let header = match first.and_then(|message| message.body) {
            Some(pb::upload_request::Body::Header(header)) => self.header(principal, header).await?,
            _ => return Err(Error::invalid("header", "the first message of an upload must be its header")),
        };

        // The farm already has the photo: nothing to receive.
        if let Some(existing) = self.images.find_image(header.farm_id, &header.sha256).await? {
            metrics::counter!("smartfarm_image_uploads_total", "outcome" => "duplicate").increment(1);
            return Ok(pb::UploadResponse { image: Some(self.to_proto(&existing)), duplicate: true });
        }
        let previous = self.images.get_upload(header.device_id, &header.upload_id).await?;
        if let Some(previous) = &previous {
            if previous.sha256 != header.sha256 || previous.size_bytes != header.size_bytes {
                return Err(Error::FailedPrecondition(format!(
                    "upload {:?} was begun for another photo (sha256 {}, {} bytes); use a new upload_id",
                    header.upload_id, previous.sha256, previous.size_bytes
                )));
            }
            if let Some(image_id) = previous.image_id {
                let image = self.images.get_image(image_id).await?;
                return Ok(pb::UploadResponse { image: Some(self.to_proto(&image)), duplicate: true });
            }
        }
        let resumed_from = previous.as_ref().map(|state| state.received_bytes).unwrap_or(0);
        let mut received = resumed_from;
        // Bounds the photos held in memory at once; further uploads wait here (HTTP/2 flow control holds their
        // senders back). The buffer grows as bytes arrive, never ahead of them.
        let _receiving = self
            .receiving
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("upload permits", anyhow::anyhow!("closed")))?;
        let mut buffer = Vec::new();

        while received < header.size_bytes {
            let next = match tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, stream.message()).await {
                Ok(next) => next,
                Err(_) => {
                    self.keep_part(&header, previous.as_ref(), resumed_from, &buffer).await;
                    let silence = format!("went silent for {} s after byte {received}", UPLOAD_IDLE_TIMEOUT.as_secs());
                    return Err(cut_short(&silence, tonic::Status::deadline_exceeded("idle"), broken));
                }
            };
            let message = match next {
                Ok(Some(message)) => message,
                Ok(None) => {
                    return Err(Error::invalid(
                        "size_bytes",
                        format!("the upload ended after {received} of the {} bytes declared", header.size_bytes),
                    ));
                }
                Err(status) => {
                    // The client is gone; keep what arrived so that it can resume.
                    self.keep_part(&header, previous.as_ref(), resumed_from, &buffer).await;
                    return Err(cut_short(&format!("broke at byte {received}"), status, broken));
                }
            };
            let chunk = match message.body {
                Some(pb::upload_request::Body::Chunk(chunk)) => chunk,
                _ => return Err(Error::invalid("header", "only the first message of an upload may be a header")),
            };
            if chunk.offset != received {
                return Err(Error::FailedPrecondition(format!(
                    "chunk at offset {} but {received} bytes were received: chunks must come in order; resume from \
                     the offset GetUploadStatus reports",
                    chunk.offset
                )));
            }
            if chunk.data.is_empty() || chunk.data.len() > MAX_CHUNK_BYTES {
                return Err(Error::invalid("chunk.data", format!("must hold 1 to {MAX_CHUNK_BYTES} bytes")));
            }
            if received + chunk.data.len() as u64 > header.size_bytes {
                return Err(Error::invalid(
                    "size_bytes",
                    format!("the photo is larger than the {} bytes declared", header.size_bytes),
                ));
            }
            buffer.extend_from_slice(&chunk.data);
            received += chunk.data.len() as u64;
            // Refuse a non-image as soon as its first bytes are here, before receiving the rest.
            if resumed_from == 0 && buffer.len() >= SNIFF_BYTES.min(header.size_bytes as usize) {
                check_type(&buffer, header.content_type)?;
            }
        }

        let bytes = if resumed_from == 0 {
            buffer
        } else {
            let mut bytes = self.read_parts(&header, resumed_from).await?;
            bytes.extend_from_slice(&buffer);
            bytes
        };
        self.store(header, bytes, previous.is_some()).await
    }

    /// Verifies a complete photo and stores it: blob intent, blob, row (which also records the upload as done).
    async fn store(&self, header: Header, bytes: Vec<u8>, had_parts: bool) -> Result<pb::UploadResponse> {
        let verified = {
            let content_type = header.content_type;
            let declared = header.sha256.clone();
            // Hashing and header parsing of up to max_image_bytes: off the async workers.
            tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, u32, u32)> {
                let actual = hex::encode(Sha256::digest(&bytes));
                if actual != declared {
                    return Err(Error::invalid(
                        "sha256",
                        format!("the bytes received hash to {actual}, not to the declared {declared}"),
                    ));
                }
                check_type(&bytes, content_type)?;
                let (width, height) = media::dimensions(&bytes, content_type).map_err(|reason| {
                    Error::invalid("data", format!("the bytes are not a decodable {content_type}: {reason}"))
                })?;
                Ok((bytes, width, height))
            })
            .await
            .map_err(|error| Error::internal("verify photo", error))?
        };
        let (bytes, width, height) = match verified {
            Ok(verified) => verified,
            Err(error) => {
                // Bytes that will never verify: forget them, so a retry starts clean.
                if had_parts {
                    self.forget_upload(header.device_id, &header.upload_id).await;
                }
                metrics::counter!("smartfarm_image_uploads_total", "outcome" => "refused").increment(1);
                return Err(error);
            }
        };

        let now = time::now();
        let key = original_key(header.farm_id, &header.sha256);
        self.images.add_blob_intent(&key, now).await?;
        self.blobs.put(&key, &bytes).await?;
        if self.failpoint.as_deref() == Some("image-after-blob-put") {
            // Test hook (SMARTFARM_FAILPOINT): die like a kill -9 between the blob write and the row's commit.
            tracing::error!(key, "failpoint image-after-blob-put: aborting");
            std::process::abort();
        }
        let record = ImageRecord {
            id: Uuid::now_v7(),
            farm_id: header.farm_id,
            device_id: header.device_id,
            capture_time: header.capture_time,
            receive_time: now,
            sha256: header.sha256.clone(),
            size_bytes: bytes.len() as u64,
            content_type: header.content_type.to_string(),
            width,
            height,
            labels: header.labels,
            original_key: key,
            original_available: true,
            thumbnail_state: ThumbnailState::Pending,
            thumbnail_key: None,
            storage_class: None,
            diagnosis: None,
        };
        let finished = UploadState {
            device_id: header.device_id,
            upload_id: header.upload_id.clone(),
            farm_id: header.farm_id,
            sha256: header.sha256,
            size_bytes: header.size_bytes,
            received_bytes: header.size_bytes,
            start_time: now,
            update_time: now,
            image_id: None,
        };
        let prefix = finished.part_prefix();
        let inserted = self.images.insert_image(record, Some(finished)).await?;
        if had_parts {
            // Parts left behind (a blob store error) go when the sweeper expires the finished upload.
            self.delete_prefix(&prefix).await;
        }
        let (image, duplicate) = match inserted {
            Inserted::New(image) => {
                metrics::counter!("smartfarm_image_uploads_total", "outcome" => "stored").increment(1);
                metrics::counter!("smartfarm_image_stored_bytes_total").increment(image.size_bytes);
                tracing::info!(image_id = %image.id, farm_id = %image.farm_id, device_id = %image.device_id, size = image.size_bytes, "photo stored");
                self.published(&image);
                (image, false)
            }
            Inserted::Existing(image) => {
                metrics::counter!("smartfarm_image_uploads_total", "outcome" => "duplicate").increment(1);
                (image, true)
            }
        };
        Ok(pb::UploadResponse { image: Some(self.to_proto(&image)), duplicate })
    }

    /// Keeps the bytes a broken stream delivered as a part blob and records the upload's progress. Best effort:
    /// if it fails, the client resumes from the last progress recorded, which is still correct.
    async fn keep_part(&self, header: &Header, previous: Option<&UploadState>, resumed_from: u64, buffer: &[u8]) {
        if buffer.is_empty() {
            return;
        }
        let now = time::now();
        let mut state = UploadState {
            device_id: header.device_id,
            upload_id: header.upload_id.clone(),
            farm_id: header.farm_id,
            sha256: header.sha256.clone(),
            size_bytes: header.size_bytes,
            received_bytes: resumed_from,
            start_time: previous.map(|state| state.start_time).unwrap_or(now),
            update_time: now,
            image_id: None,
        };
        let part = format!("{}{resumed_from:012}", state.part_prefix());
        let result = async {
            // The row first: it is what lets the sweeper find the part blobs of an abandoned upload.
            if previous.is_none() {
                self.images.save_upload(&state, None).await?;
            }
            self.blobs.put(&part, buffer).await?;
            state.received_bytes = resumed_from + buffer.len() as u64;
            if let Err(error) = self.images.save_upload(&state, Some(resumed_from)).await {
                // The upload's row moved on or was expired meanwhile: this part is nobody's.
                let _ = self.blobs.delete(&part).await;
                return Err(error);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                metrics::counter!("smartfarm_image_upload_parts_kept_total").increment(1);
                tracing::info!(upload_id = %header.upload_id, device_id = %header.device_id, received = state.received_bytes, size = header.size_bytes, "upload cut short; kept for resuming");
            }
            Err(error) => tracing::warn!(upload_id = %header.upload_id, %error, "cannot keep a cut upload's bytes"),
        }
    }

    /// The bytes `0..received` of an upload, from its part blobs.
    async fn read_parts(&self, header: &Header, received: u64) -> Result<Vec<u8>> {
        let prefix = smartfarm_store::image::upload_part_prefix(header.device_id, &header.upload_id);
        let mut bytes = Vec::with_capacity(header.size_bytes as usize);
        for key in self.blobs.list(&prefix).await? {
            let offset: u64 = key[prefix.len()..].parse().unwrap_or(u64::MAX);
            if offset == bytes.len() as u64 && offset < received {
                bytes.extend_from_slice(&self.blobs.get(&key).await?);
            }
        }
        if bytes.len() as u64 != received {
            // A part went missing or two resumptions raced: the only safe answer is to start again.
            self.forget_upload(header.device_id, &header.upload_id).await;
            return Err(Error::FailedPrecondition(format!(
                "the {received} bytes kept of upload {:?} are incomplete; upload the photo again from offset 0",
                header.upload_id
            )));
        }
        Ok(bytes)
    }

    /// Deletes an upload's parts, then its row. The row is what lets the sweeper find the parts: while a part is
    /// left (a blob store error), the row stays, and the next resume or the sweeper tries again.
    async fn forget_upload(&self, device_id: Uuid, upload_id: &str) {
        if !self.delete_prefix(&smartfarm_store::image::upload_part_prefix(device_id, upload_id)).await {
            return;
        }
        if let Err(error) = self.images.delete_upload(device_id, upload_id).await {
            tracing::warn!(upload_id, %error, "cannot forget an upload; the sweeper will");
        }
    }

    /// Deletes the blobs under `prefix`; whether every one is gone.
    pub(crate) async fn delete_prefix(&self, prefix: &str) -> bool {
        let keys = match self.blobs.list(prefix).await {
            Ok(keys) => keys,
            Err(error) => {
                tracing::warn!(prefix, %error, "cannot list blobs to delete; trying again later");
                return false;
            }
        };
        let mut all_gone = true;
        for key in keys {
            if let Err(error) = self.blobs.delete(&key).await {
                tracing::warn!(key, %error, "cannot delete a blob; trying again later");
                all_gone = false;
            }
        }
        all_gone
    }
}

/// Refuses bytes that do not start like the declared type.
fn check_type(bytes: &[u8], declared: &str) -> Result<()> {
    match sniff_image(bytes) {
        Some(actual) if actual == declared => Ok(()),
        Some(actual) => Err(Error::invalid("content_type", format!("declared {declared}, but the bytes are {actual}"))),
        None => Err(Error::invalid(
            "data",
            format!("the bytes are not an image ({}); accepted: {}", describe_non_image(bytes), IMAGE_TYPES.join(", ")),
        )),
    }
}

/// The end of a stream that broke or went silent: recorded in `broken`, answered as retryable.
fn cut_short(how: &str, status: tonic::Status, broken: &mut Option<String>) -> Error {
    metrics::counter!("smartfarm_image_uploads_total", "outcome" => "cut").increment(1);
    let detail = format!("the upload stream {how} ({})", status.message());
    *broken = Some(detail.clone());
    Error::Unavailable(detail)
}
