//! The reading side of `ImageService`: upload status, which photos a farm has, the photos themselves (verified
//! against their sha256 on the way out), listings, and URLs.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;

use smartfarm_core::media::sniff_image;
use smartfarm_core::paging::{Page, time_id_key};
use smartfarm_core::{Error, Principal, Result, time, validate};
use smartfarm_proto::image::v1 as pb;
use smartfarm_store::image::{ImageCursor, ImageFilter, ImageRecord};

use crate::ImageApi;
use crate::upload::{sha256_hex, upload_id};
use crate::urls::Variant;

/// Most digests one CheckImages call may ask about.
const MAX_CHECKED_DIGESTS: usize = 1000;
/// Bytes per GetImage message.
const STREAM_CHUNK_BYTES: usize = 1 << 20;
/// URL lifetimes: the default and the longest (S3's limit for presigned URLs).
const DEFAULT_URL_LIFETIME: Duration = Duration::from_secs(15 * 60);
const MAX_URL_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

impl ImageApi {
    pub(crate) async fn upload_status(
        &self,
        principal: &Principal,
        request: &pb::GetUploadStatusRequest,
    ) -> Result<pb::GetUploadStatusResponse> {
        let upload_id = upload_id(&request.upload_id)?;
        let (device_id, _farm_id) = self.camera_for(principal, &request.device_id).await?;
        let Some(state) = self.images.get_upload(device_id, &upload_id).await? else {
            return Ok(pb::GetUploadStatusResponse { received_bytes: 0, image: None });
        };
        let image = match state.image_id {
            Some(id) => Some(self.to_proto(&self.images.get_image(id).await?)),
            None => None,
        };
        Ok(pb::GetUploadStatusResponse { received_bytes: state.received_bytes, image })
    }

    pub(crate) async fn check_images(
        &self,
        principal: &Principal,
        request: &pb::CheckImagesRequest,
    ) -> Result<pb::CheckImagesResponse> {
        // A gateway asks about its own farm and may leave the farm out.
        let farm_id = match (principal, request.farm_id.as_str()) {
            (Principal::Gateway { farm_id, .. }, "") => *farm_id,
            (Principal::Gateway { farm_id, .. }, asked) => {
                let asked = validate::id("farm_id", asked)?;
                if asked != *farm_id {
                    return Err(Error::PermissionDenied("the credential is scoped to another farm".into()));
                }
                asked
            }
            (_, asked) => {
                let farm_id = validate::id("farm_id", asked)?;
                principal.authorize_farm(farm_id)?;
                farm_id
            }
        };
        if request.sha256s.len() > MAX_CHECKED_DIGESTS {
            return Err(Error::invalid("sha256s", format!("at most {MAX_CHECKED_DIGESTS} digests per call")));
        }
        let digests = request.sha256s.iter().map(|digest| sha256_hex("sha256s", digest)).collect::<Result<Vec<_>>>()?;
        let known_sha256s = self.images.known_sha256s(farm_id, &digests).await?;
        Ok(pb::CheckImagesResponse { known_sha256s })
    }

    /// A photo the caller may read.
    async fn readable_image(&self, principal: &Principal, image_id: &str) -> Result<ImageRecord> {
        let image_id = validate::id("image_id", image_id)?;
        let image = self.images.get_image(image_id).await?;
        principal.authorize_farm(image.farm_id)?;
        Ok(image)
    }

    /// The blob key of a photo's variant, if it still exists.
    fn variant_key(image: &ImageRecord, variant: Variant) -> Result<String> {
        match variant {
            Variant::Original if image.original_available => Ok(image.original_key.clone()),
            Variant::Original => Err(Error::FailedPrecondition(format!(
                "the original of image {} was deleted by the farm's retention; its thumbnail and metadata remain",
                image.id
            ))),
            Variant::Thumbnail => image
                .thumbnail_key
                .clone()
                .ok_or_else(|| Error::FailedPrecondition(format!("image {} has no thumbnail (yet)", image.id))),
        }
    }

    /// A variant's bytes; an original is checked against its sha256, so corruption in storage is never served.
    async fn variant_bytes(&self, image: &ImageRecord, variant: Variant) -> Result<Vec<u8>> {
        let key = Self::variant_key(image, variant)?;
        let bytes = self.blobs.get(&key).await.map_err(|error| match error {
            Error::NotFound { .. } => Error::internal(
                format!("image {} row references missing blob {key}", image.id),
                anyhow::anyhow!("blob missing"),
            ),
            other => other,
        })?;
        if variant == Variant::Original {
            let actual = hex::encode(Sha256::digest(&bytes));
            if actual != image.sha256 {
                metrics::counter!("smartfarm_image_corrupt_reads_total").increment(1);
                return Err(Error::internal(
                    format!("image {} in storage hashes to {actual}, not {}", image.id, image.sha256),
                    anyhow::anyhow!("stored photo corrupted"),
                ));
            }
        }
        Ok(bytes)
    }

    /// A permit to hold an original in memory while it is read and sent (see [`crate::MAX_READING_ORIGINALS`]);
    /// `None` for a thumbnail, which is small.
    pub(crate) async fn reading_permit(&self, variant: Variant) -> Result<Option<OwnedSemaphorePermit>> {
        if variant != Variant::Original {
            return Ok(None);
        }
        match tokio::time::timeout(crate::READ_WAIT, self.reading.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            Ok(Err(_)) => Err(Error::Unavailable("the image service is stopping".into())),
            Err(_) => {
                metrics::counter!("smartfarm_image_reads_refused_total").increment(1);
                Err(Error::ResourceExhausted(format!(
                    "{} photos are being read from this process already; try again shortly",
                    crate::MAX_READING_ORIGINALS
                )))
            }
        }
    }

    /// The messages of `GetImage`, with the permit that must live until they are sent.
    pub(crate) async fn image_messages(
        &self,
        principal: &Principal,
        request: &pb::GetImageRequest,
    ) -> Result<(Option<OwnedSemaphorePermit>, Vec<pb::GetImageResponse>)> {
        let image = self.readable_image(principal, &request.image_id).await?;
        let variant = Variant::from_proto(request.variant)?;
        let reading = self.reading_permit(variant).await?;
        let bytes = self.variant_bytes(&image, variant).await?;
        let mut metadata = self.to_proto(&image);
        if variant == Variant::Thumbnail {
            metadata.content_type = "image/jpeg".into();
            metadata.size_bytes = bytes.len() as u64;
        }
        let mut messages = vec![pb::GetImageResponse { body: Some(pb::get_image_response::Body::Image(metadata)) }];
        messages.extend(
            bytes
                .chunks(STREAM_CHUNK_BYTES)
                .map(|chunk| pb::GetImageResponse { body: Some(pb::get_image_response::Body::Data(chunk.to_vec())) }),
        );
        Ok((reading, messages))
    }

    pub(crate) async fn list_images(
        &self,
        principal: &Principal,
        request: &pb::ListImagesRequest,
    ) -> Result<pb::ListImagesResponse> {
        let farm_id = validate::id("farm_id", &request.farm_id)?;
        principal.authorize_farm(farm_id)?;
        let device_id = validate::optional_id("device_id", &request.device_id)?;
        let (captured_from, captured_to) = match &request.capture_time_range {
            None => (None, None),
            Some(range) => {
                let start = range
                    .start_time
                    .as_ref()
                    .map(|t| time::from_timestamp("capture_time_range.start_time", t))
                    .transpose()?;
                let end = range
                    .end_time
                    .as_ref()
                    .map(|t| time::from_timestamp("capture_time_range.end_time", t))
                    .transpose()?;
                if let (Some(start), Some(end)) = (start, end)
                    && start >= end
                {
                    return Err(Error::invalid("capture_time_range", "start_time must be before end_time"));
                }
                (start, end)
            }
        };
        let diagnosis_label = match request.diagnosis_label.as_str() {
            "" => None,
            label if label.len() <= 128 => Some(label.to_string()),
            _ => return Err(Error::invalid("diagnosis_label", "is longer than 128 characters")),
        };
        let filter = ImageFilter { farm_id, device_id, captured_from, captured_to, diagnosis_label };
        let fingerprint = format!("{filter:?}");
        let page = Page::from_request(request.page_size, &request.page_token, &fingerprint)?;
        let after = page.after_time_id()?.map(|(capture_time, id)| ImageCursor { capture_time, id });
        let rows = self.images.list_images(&filter, after, page.fetch_limit()).await?;
        let (rows, next_page_token) =
            page.finish(rows, |image| time_id_key(image.capture_time, image.id), &fingerprint);
        Ok(pb::ListImagesResponse { images: rows.iter().map(|image| self.to_proto(image)).collect(), next_page_token })
    }

    pub(crate) async fn image_url(
        &self,
        principal: &Principal,
        request: &pb::GetImageUrlRequest,
    ) -> Result<pb::GetImageUrlResponse> {
        let image = self.readable_image(principal, &request.image_id).await?;
        let variant = Variant::from_proto(request.variant)?;
        let lifetime = match &request.expires_in {
            None => DEFAULT_URL_LIFETIME,
            Some(duration) if duration.seconds < 1 || duration.nanos < 0 => {
                return Err(Error::invalid("expires_in", "must be at least one second"));
            }
            Some(duration) => Duration::from_secs(duration.seconds as u64),
        };
        if lifetime > MAX_URL_LIFETIME {
            return Err(Error::invalid("expires_in", "must be at most 7 days"));
        }
        let key = Self::variant_key(&image, variant)?;
        let expire_time = time::now() + lifetime;
        let url = match self.blobs.presigned_url(&key, lifetime).await? {
            Some(url) => url,
            None => self.signer.url(&self.settings.public_url, image.id, variant, expire_time),
        };
        Ok(pb::GetImageUrlResponse { url, expire_time: Some(time::to_timestamp(expire_time)) })
    }

    /// What the signed content route serves: the variant's media type and bytes, if the signature is valid and
    /// unexpired.
    pub async fn signed_content(
        &self,
        image_id: &str,
        variant: &str,
        expires: &str,
        signature: &str,
    ) -> Result<(String, Vec<u8>, Option<OwnedSemaphorePermit>)> {
        let image_id = validate::id("image_id", image_id)?;
        let variant = Variant::parse(variant)?;
        self.signer.verify(image_id, variant, expires, signature, time::now())?;
        let image = self.images.get_image(image_id).await?;
        let reading = self.reading_permit(variant).await?;
        let bytes = self.variant_bytes(&image, variant).await?;
        let content_type = match variant {
            Variant::Original => image.content_type.clone(),
            Variant::Thumbnail => "image/jpeg".to_string(),
        };
        debug_assert!(variant == Variant::Thumbnail || sniff_image(&bytes) == Some(content_type.as_str()));
        Ok((content_type, bytes, reading))
    }
}
