//! smartfarm-image owns crop photos in the cloud: resumable uploads (`ImageService.Upload` and
//! `GetUploadStatus`), content-addressed storage of each farm's photos in the blob store (`file://` or S3) with
//! their metadata rows, thumbnails, reading them back (`GetImage`, `ListImages`, `GetImageUrl` and the signed
//! `/v1/images/{id}/content` route for local storage), and the sweeper that repairs what crashes leave (orphaned
//! blobs, abandoned uploads) and applies retention and storage classes. It holds no SQL: metadata is
//! [`smartfarm_store::ImageStore`], bytes are [`smartfarm_store::BlobStore`]. New photos are announced on the bus.

#![forbid(unsafe_code)]

pub mod media;
mod read;
mod sweep;
mod upload;
pub mod urls;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, Semaphore};
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use smartfarm_bus::{Bus, Event, ImageStored, Job};
use smartfarm_core::config::ImagesConfig;
use smartfarm_core::{Principal, time};
use smartfarm_proto::common::v1::ModelRef;
use smartfarm_proto::image::v1 as pb;
use smartfarm_proto::image::v1::image_service_server::{ImageService, ImageServiceServer};
use smartfarm_store::image::ImageRecord;
use smartfarm_store::{BlobStore, ImageStore, RegistryStore};

pub use sweep::SweepReport;
pub use urls::UrlSigner;

/// The blob key of a farm's original photo: content-addressed within the farm, so the same bytes are stored once
/// and a key never names two different contents. Farms do not share objects, so no farm can learn from timing or
/// errors whether another farm holds a photo.
pub fn original_key(farm_id: Uuid, sha256: &str) -> String {
    format!("images/{}/{}/{sha256}", farm_id.simple(), &sha256[..2])
}

/// The blob key of a photo's thumbnail (always a JPEG).
pub fn thumbnail_key(farm_id: Uuid, sha256: &str) -> String {
    format!("thumbnails/{}/{}/{sha256}.jpg", farm_id.simple(), &sha256[..2])
}

/// Uploads receiving bytes at once, per process. Each holds its photo a few times over at its peak (the buffer as
/// received, which grows by doubling; a resumed upload's assembled parts; the S3 client's own copy as it writes):
/// with the default largest photo of 20 MiB, around 1 GiB at worst.
pub const MAX_RECEIVING_UPLOADS: usize = 16;

/// Originals read and sent at once, per process (`GetImage` and signed URLs). Each is held about twice until it has
/// gone out (as read, then as messages or a body), so with 20 MiB photos about 640 MiB at most: clients that ask for
/// the same large photo many times over, or open streams and never read them, cannot make the process hold more.
pub const MAX_READING_ORIGINALS: usize = 16;
/// How long a read waits for one of those before it is refused (`RESOURCE_EXHAUSTED`, try again).
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Counts one upload in flight for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> InFlight {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The `ImageService` implementation.
#[derive(Clone)]
pub struct ImageApi {
    registry: Arc<dyn RegistryStore>,
    images: Arc<dyn ImageStore>,
    blobs: Arc<dyn BlobStore>,
    bus: Bus,
    settings: Arc<ImagesConfig>,
    signer: UrlSigner,
    /// Wakes the thumbnail task when a photo arrives.
    thumbnails_wanted: Arc<Notify>,
    /// Uploads being received now: thumbnails wait for them (uploads first; see `sweep.rs`).
    uploads_in_flight: Arc<AtomicUsize>,
    /// Permits to hold a photo's bytes in memory: at most [`MAX_RECEIVING_UPLOADS`] uploads receive at once.
    receiving: Arc<Semaphore>,
    /// Permits to hold an original in memory while it is read and sent: at most [`MAX_READING_ORIGINALS`].
    reading: Arc<Semaphore>,
    /// A test hook (`SMARTFARM_FAILPOINT`): the name of a point at which the process aborts.
    failpoint: Option<String>,
}

impl ImageApi {
    /// The service over the given stores.
    pub fn new(
        registry: Arc<dyn RegistryStore>,
        images: Arc<dyn ImageStore>,
        blobs: Arc<dyn BlobStore>,
        bus: Bus,
        settings: ImagesConfig,
        signer: UrlSigner,
    ) -> Self {
        let failpoint = std::env::var("SMARTFARM_FAILPOINT").ok().filter(|name| !name.is_empty());
        if let Some(name) = &failpoint {
            tracing::warn!(failpoint = %name, "a test failpoint is armed: this process will abort on purpose");
        }
        ImageApi {
            registry,
            images,
            blobs,
            bus,
            settings: Arc::new(settings),
            signer,
            thumbnails_wanted: Arc::new(Notify::new()),
            uploads_in_flight: Arc::new(AtomicUsize::new(0)),
            receiving: Arc::new(Semaphore::new(MAX_RECEIVING_UPLOADS)),
            reading: Arc::new(Semaphore::new(MAX_READING_ORIGINALS)),
            failpoint,
        }
    }

    /// The tonic server, accepting chunks up to the largest chunk size.
    pub fn into_server(self) -> ImageServiceServer<ImageApi> {
        ImageServiceServer::new(self).max_decoding_message_size(upload::MAX_CHUNK_BYTES + 64 * 1024)
    }

    /// Announces a new photo, hands it out to be diagnosed (by one of the processes that run the inference role),
    /// and asks for its thumbnail.
    fn published(&self, image: &ImageRecord) {
        let stored = ImageStored {
            handed_out: true,
            image_id: image.id,
            farm_id: image.farm_id,
            device_id: image.device_id,
            sha256: image.sha256.clone(),
            content_type: image.content_type.clone(),
            capture_time: image.capture_time,
        };
        self.bus.hand_out(Job::Diagnose(stored.clone()));
        self.bus.publish(Event::ImageStored(stored));
        self.thumbnails_wanted.notify_one();
    }

    /// The metadata message of a row.
    fn to_proto(&self, image: &ImageRecord) -> pb::Image {
        pb::Image {
            id: image.id.to_string(),
            farm_id: image.farm_id.to_string(),
            device_id: image.device_id.to_string(),
            capture_time: Some(time::to_timestamp(image.capture_time)),
            receive_time: Some(time::to_timestamp(image.receive_time)),
            sha256: image.sha256.clone(),
            size_bytes: image.size_bytes,
            content_type: image.content_type.clone(),
            width: image.width,
            height: image.height,
            has_thumbnail: image.thumbnail_key.is_some(),
            labels: image.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            diagnosis: image.diagnosis.as_ref().map(|diagnosis| pb::Diagnosis {
                label: diagnosis.label.clone(),
                confidence: diagnosis.confidence,
                model: Some(ModelRef { name: diagnosis.model_name.clone(), version: diagnosis.model_version.clone() }),
                diagnose_time: Some(time::to_timestamp(diagnosis.diagnose_time)),
            }),
            original_available: image.original_available,
        }
    }
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    type GetImageStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GetImageResponse, Status>> + Send>>;

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let principal = Principal::of(&request)?;
        // In a task of its own: when the client's connection drops, the server drops this handler's future, and
        // the upload must live on to notice the broken stream and keep the bytes that arrived for resuming.
        let api = self.clone();
        let upload = tokio::spawn(async move {
            let _in_flight = InFlight::enter(&api.uploads_in_flight);
            let mut broken = None;
            let result = api.upload(&principal, request.into_inner(), &mut broken).await;
            (result, broken)
        });
        match upload.await.map_err(|error| smartfarm_core::Error::internal("upload task", error))? {
            (Ok(response), _) => Ok(Response::new(response)),
            // Not an error of the service (the upload logged it as what it is), so not through the error mapper,
            // which logs UNAVAILABLE as a failure of a dependency. Often nobody is left to read this answer.
            (Err(_), Some(detail)) => Err(Status::unavailable(format!("{detail}; resume from GetUploadStatus"))),
            (Err(error), None) => Err(error.into()),
        }
    }

    async fn get_upload_status(
        &self,
        request: Request<pb::GetUploadStatusRequest>,
    ) -> Result<Response<pb::GetUploadStatusResponse>, Status> {
        let principal = Principal::of(&request)?;
        Ok(Response::new(self.upload_status(&principal, request.get_ref()).await?))
    }

    async fn check_images(
        &self,
        request: Request<pb::CheckImagesRequest>,
    ) -> Result<Response<pb::CheckImagesResponse>, Status> {
        let principal = Principal::of(&request)?;
        Ok(Response::new(self.check_images(&principal, request.get_ref()).await?))
    }

    async fn get_image(&self, request: Request<pb::GetImageRequest>) -> Result<Response<Self::GetImageStream>, Status> {
        let principal = Principal::of(&request)?;
        let (reading, messages) = self.image_messages(&principal, request.get_ref()).await?;
        // The permit goes with the stream: the photo is in memory until the last message went or the client left.
        let stream = tokio_stream::StreamExt::map(tokio_stream::iter(messages), move |message| {
            let _held = &reading;
            Ok(message)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_images(
        &self,
        request: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let principal = Principal::of(&request)?;
        Ok(Response::new(self.list_images(&principal, request.get_ref()).await?))
    }

    async fn get_image_url(
        &self,
        request: Request<pb::GetImageUrlRequest>,
    ) -> Result<Response<pb::GetImageUrlResponse>, Status> {
        let principal = Principal::of(&request)?;
        Ok(Response::new(self.image_url(&principal, request.get_ref()).await?))
    }
}
