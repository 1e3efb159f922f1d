//! The image uplink: sends the photos in the spool's image area to the cloud's `ImageService`, oldest first, and
//! lets go of each one only when the cloud has it. It first asks which photos the farm already has (CheckImages)
//! and skips sending those, then uploads three at a time; each upload asks how much the cloud kept of an earlier attempt (GetUploadStatus) and
//! resumes from there, so a link cut in the middle of a large photo costs only what was in flight. Failures retry
//! with exponential backoff; a photo the cloud refuses for good (not an image, say) is set aside in
//! `images/refused/` and alerted, never silently dropped.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, mpsc, watch};
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use smartfarm_proto::image::v1 as pb;
use smartfarm_proto::image::v1::image_service_client::ImageServiceClient;

use crate::config::EdgeConfig;
use crate::image_spool::{ImageSpool, SpooledPhoto};
use crate::ingest::LocalAlert;
use crate::uplink::{LinkError, bearer, connect};

/// How often the uplink looks at the image area even when nothing woke it.
const IDLE_CHECK: Duration = Duration::from_secs(30);
/// Digests per CheckImages call (the cloud's limit).
const CHECK_BATCH: usize = 1000;

type Client = ImageServiceClient<tonic::service::interceptor::InterceptedService<Channel, Authorize>>;

/// Adds the gateway credential to every call.
#[derive(Clone)]
pub struct Authorize(pub MetadataValue<Ascii>);

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// How one photo's upload ended.
enum Sent {
    /// The cloud has it (stored now or before).
    Stored { duplicate: bool },
    /// The cloud will never take it.
    Refused(String),
    /// The size cap dropped it while it waited (already counted and alerted).
    Gone,
    /// The cloud will not take it now for a reason of its own (its camera is unknown, decommissioned or of
    /// another farm; an earlier attempt is in the way): kept, tried again next round, and the others go on.
    Deferred(tonic::Status),
}

/// Photos uploading at once: while the cloud stores one (hash, blob write, row), the next ones' bytes travel. Each
/// is in memory while it uploads (a few MB for a camera photo).
const UPLOADS_IN_FLIGHT: usize = 3;

/// Sends spooled photos.
#[derive(Clone)]
pub struct ImageUplink {
    config: EdgeConfig,
    spool: Arc<ImageSpool>,
    photo_spooled: Arc<Notify>,
    alerts: mpsc::UnboundedSender<LocalAlert>,
}

impl ImageUplink {
    pub fn new(
        config: EdgeConfig,
        spool: Arc<ImageSpool>,
        photo_spooled: Arc<Notify>,
        alerts: mpsc::UnboundedSender<LocalAlert>,
    ) -> Self {
        ImageUplink { config, spool, photo_spooled, alerts }
    }

    /// Sends what is waiting, then waits for more, until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut client: Option<Client> = None;
        let mut backoff = self.config.reconnect_min;
        loop {
            let wait = match self.send_pending(&mut client).await {
                Ok(()) => {
                    backoff = self.config.reconnect_min;
                    IDLE_CHECK
                }
                Err(error) => {
                    client = None;
                    metrics::counter!("smartfarm_edge_image_upload_failures_total").increment(1);
                    let wait = backoff.mul_f64(rand::rng().random_range(0.5..1.5)).min(self.config.reconnect_max);
                    tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "photo upload failed");
                    backoff = (backoff * 2).min(self.config.reconnect_max);
                    wait
                }
            };
            let (bytes, count) = self.spool.stats();
            metrics::gauge!("smartfarm_edge_image_spool_bytes").set(bytes as f64);
            metrics::gauge!("smartfarm_edge_image_spool_photos").set(count as f64);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.photo_spooled.notified(), if wait == IDLE_CHECK => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn client(&self, client: &mut Option<Client>) -> Result<Client, LinkError> {
        if let Some(client) = client {
            return Ok(client.clone());
        }
        let channel = connect(&self.config).await?;
        let made = ImageServiceClient::with_interceptor(channel, Authorize(bearer(&self.config)?))
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20);
        *client = Some(made.clone());
        Ok(made)
    }

    /// Sends every photo waiting now.
    async fn send_pending(&self, client: &mut Option<Client>) -> Result<(), LinkError> {
        let pending = self.spool.pending().map_err(|error| LinkError::Spool(error.to_string()))?;
        if pending.is_empty() {
            return Ok(());
        }
        let mut images = self.client(client).await?;
        for batch in pending.chunks(CHECK_BATCH) {
            let request = pb::CheckImagesRequest {
                farm_id: String::new(),
                sha256s: batch.iter().map(|photo| photo.sha256.clone()).collect(),
            };
            let known = images.check_images(request).await.map_err(LinkError::Stream)?.into_inner().known_sha256s;
            let mut uploads = tokio::task::JoinSet::new();
            for photo in batch {
                if known.contains(&photo.sha256) {
                    metrics::counter!("smartfarm_edge_images_known_skipped_total").increment(1);
                    tracing::debug!(sha256 = %photo.sha256, "the cloud already has this photo");
                    self.spool.remove(photo).map_err(|error| LinkError::Spool(error.to_string()))?;
                    continue;
                }
                if uploads.len() >= UPLOADS_IN_FLIGHT
                    && let Some(done) = uploads.join_next().await
                {
                    self.finish(done)?;
                }
                let (uplink, mut images, photo) = (self.clone(), images.clone(), photo.clone());
                uploads.spawn(async move {
                    let sent = uplink.send(&mut images, &photo).await;
                    (photo, sent)
                });
            }
            while let Some(done) = uploads.join_next().await {
                self.finish(done)?;
            }
        }
        Ok(())
    }

    /// Lets go of a photo the cloud has, or sets aside one it refused. (A failure ends the round: the photos still
    /// uploading are abandoned, and the cloud keeps what it received of them for the retry.)
    fn finish(
        &self,
        done: Result<(SpooledPhoto, Result<Sent, LinkError>), tokio::task::JoinError>,
    ) -> Result<(), LinkError> {
        let (photo, sent) = done.map_err(|error| LinkError::Spool(format!("an upload task failed: {error}")))?;
        match sent? {
            Sent::Stored { duplicate } => {
                metrics::counter!("smartfarm_edge_images_uploaded_total").increment(1);
                metrics::counter!("smartfarm_edge_image_uploaded_bytes_total").increment(photo.size_bytes);
                tracing::debug!(sha256 = %photo.sha256, duplicate, "photo uploaded");
                self.spool.remove(&photo).map_err(|error| LinkError::Spool(error.to_string()))?;
            }
            Sent::Gone => {}
            Sent::Deferred(status) => {
                metrics::counter!("smartfarm_edge_image_uploads_deferred_total").increment(1);
                tracing::warn!(sha256 = %photo.sha256, device_id = %photo.device_id, code = ?status.code(), reason = status.message(), "photo kept for a later round");
            }
            Sent::Refused(reason) => {
                metrics::counter!("smartfarm_edge_images_refused_total").increment(1);
                let aside = self.spool.set_aside(&photo).map_err(|error| LinkError::Spool(error.to_string()))?;
                tracing::error!(file = %aside.display(), reason, "the cloud refused a photo for good; set aside");
                let _ = self.alerts.send(LocalAlert::ImageRefused { file: aside.display().to_string(), reason });
            }
        }
        Ok(())
    }

    /// Uploads one photo, resuming from what the cloud kept of an earlier attempt.
    async fn send(&self, images: &mut Client, photo: &SpooledPhoto) -> Result<Sent, LinkError> {
        // The content address names the upload: a retry of the same photo from the same camera resumes it.
        let upload_id = photo.sha256.clone();
        let status = images
            .get_upload_status(pb::GetUploadStatusRequest {
                upload_id: upload_id.clone(),
                device_id: photo.device_id.to_string(),
            })
            .await;
        let offset = match status {
            Ok(status) => {
                let status = status.into_inner();
                if status.image.is_some() {
                    return Ok(Sent::Stored { duplicate: true });
                }
                status.received_bytes
            }
            Err(status) => return refusal_or_failure(status),
        };
        let Some(bytes) = self.spool.read(photo).map_err(|error| LinkError::Spool(error.to_string()))? else {
            return Ok(Sent::Gone);
        };
        if offset > bytes.len() as u64 {
            return Err(LinkError::Protocol(format!("the cloud holds {offset} bytes of a {}-byte photo", bytes.len())));
        }
        if offset > 0 {
            metrics::counter!("smartfarm_edge_image_resumed_bytes_total").increment(offset);
            tracing::info!(sha256 = %photo.sha256, offset, size = bytes.len(), "resuming a photo upload");
        }
        let header = pb::UploadHeader {
            upload_id,
            device_id: photo.device_id.to_string(),
            capture_time: Some(smartfarm_core::time::to_timestamp(photo.capture_time)),
            sha256: photo.sha256.clone(),
            size_bytes: bytes.len() as u64,
            content_type: photo.content_type.to_string(),
            labels: Default::default(),
        };
        // Chunks are cut as the stream is polled, so a photo is in memory once, not twice.
        let chunk_bytes = self.config.image_chunk_bytes;
        let total = bytes.len();
        let bytes = Arc::new(bytes);
        let chunks = (offset as usize..total).step_by(chunk_bytes).map(move |start| pb::UploadRequest {
            body: Some(pb::upload_request::Body::Chunk(pb::UploadChunk {
                offset: start as u64,
                data: bytes[start..(start + chunk_bytes).min(total)].to_vec(),
            })),
        });
        let messages =
            std::iter::once(pb::UploadRequest { body: Some(pb::upload_request::Body::Header(header)) }).chain(chunks);
        match images.upload(tokio_stream::iter(messages)).await {
            Ok(response) => Ok(Sent::Stored { duplicate: response.into_inner().duplicate }),
            Err(status) => refusal_or_failure(status),
        }
    }
}

/// A refusal the same photo would get again (set it aside), one about this photo or its camera (keep it for a later
/// round, go on with the others), or a failure of the link (end the round, back off).
fn refusal_or_failure(status: tonic::Status) -> Result<Sent, LinkError> {
    match status.code() {
        Code::InvalidArgument => Ok(Sent::Refused(status.message().to_string())),
        Code::NotFound | Code::PermissionDenied | Code::FailedPrecondition => Ok(Sent::Deferred(status)),
        _ => Err(LinkError::Stream(status)),
    }
}
