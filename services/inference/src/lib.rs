//! smartfarm-inference will own the Burn models: plant-disease classification of photos, anomaly detection on
//! sensor series, and versioned models with activation and rollback. Until the AI capability is built, every RPC
//! answers `UNIMPLEMENTED` and names that capability; nothing is faked.

#![forbid(unsafe_code)]

use tonic::{Request, Response, Status};

use smartfarm_core::Error;
use smartfarm_proto::inference::v1 as pb;
use smartfarm_proto::inference::v1::inference_service_server::{InferenceService, InferenceServiceServer};

/// How the README and the issue tracker name the capability these RPCs belong to.
const CAPABILITY: &str = "the AI capability (Burn plant-disease and anomaly models)";

/// The `InferenceService` implementation.
#[derive(Clone, Debug, Default)]
pub struct InferenceApi;

impl InferenceApi {
    /// The tonic server for this service.
    pub fn into_server(self) -> InferenceServiceServer<InferenceApi> {
        InferenceServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn classify_image(
        &self,
        _request: Request<pb::ClassifyImageRequest>,
    ) -> Result<Response<pb::ClassifyImageResponse>, Status> {
        Err(Error::unimplemented("InferenceService.ClassifyImage", CAPABILITY).into())
    }

    async fn detect_anomalies(
        &self,
        _request: Request<pb::DetectAnomaliesRequest>,
    ) -> Result<Response<pb::DetectAnomaliesResponse>, Status> {
        Err(Error::unimplemented("InferenceService.DetectAnomalies", CAPABILITY).into())
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Err(Error::unimplemented("InferenceService.ListModels", CAPABILITY).into())
    }

    async fn activate_model(
        &self,
        _request: Request<pb::ActivateModelRequest>,
    ) -> Result<Response<pb::ActivateModelResponse>, Status> {
        Err(Error::unimplemented("InferenceService.ActivateModel", CAPABILITY).into())
    }
}
