//! smartfarm-image will own crop photos: resumable uploads, content-addressed storage on `file://` and S3,
//! metadata, thumbnails and retention. Until the images capability is built, every RPC answers `UNIMPLEMENTED` and
//! names that capability; nothing is faked.

#![forbid(unsafe_code)]

use tonic::{Request, Response, Status, Streaming};

use smartfarm_core::Error;
use smartfarm_proto::image::v1 as pb;
use smartfarm_proto::image::v1::image_service_server::{ImageService, ImageServiceServer};

/// How the README and the issue tracker name the capability these RPCs belong to.
const CAPABILITY: &str = "the images capability (camera service, resumable uploads, S3)";

/// The `ImageService` implementation.
#[derive(Clone, Debug, Default)]
pub struct ImageApi;

impl ImageApi {
    /// The tonic server for this service.
    pub fn into_server(self) -> ImageServiceServer<ImageApi> {
        ImageServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    type GetImageStream = tokio_stream::Empty<Result<pb::GetImageResponse, Status>>;

    async fn upload(
        &self,
        _request: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        Err(Error::unimplemented("ImageService.Upload", CAPABILITY).into())
    }

    async fn get_upload_status(
        &self,
        _request: Request<pb::GetUploadStatusRequest>,
    ) -> Result<Response<pb::GetUploadStatusResponse>, Status> {
        Err(Error::unimplemented("ImageService.GetUploadStatus", CAPABILITY).into())
    }

    async fn check_images(
        &self,
        _request: Request<pb::CheckImagesRequest>,
    ) -> Result<Response<pb::CheckImagesResponse>, Status> {
        Err(Error::unimplemented("ImageService.CheckImages", CAPABILITY).into())
    }

    async fn get_image(
        &self,
        _request: Request<pb::GetImageRequest>,
    ) -> Result<Response<Self::GetImageStream>, Status> {
        Err(Error::unimplemented("ImageService.GetImage", CAPABILITY).into())
    }

    async fn list_images(
        &self,
        _request: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        Err(Error::unimplemented("ImageService.ListImages", CAPABILITY).into())
    }

    async fn get_image_url(
        &self,
        _request: Request<pb::GetImageUrlRequest>,
    ) -> Result<Response<pb::GetImageUrlResponse>, Status> {
        Err(Error::unimplemented("ImageService.GetImageUrl", CAPABILITY).into())
    }
}
