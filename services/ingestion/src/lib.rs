//! smartfarm-ingestion will own the edge link (`IngestionService.Connect`: batches up, acks, registry, rules and
//! commands down, exactly-once writes) and the telemetry queries (`TelemetryService`). Until the telemetry
//! capability is built, every RPC answers `UNIMPLEMENTED` and names that capability; nothing is faked.

#![forbid(unsafe_code)]

use tonic::{Request, Response, Status, Streaming};

use smartfarm_core::Error;
use smartfarm_proto::ingestion::v1 as pb;
use smartfarm_proto::ingestion::v1::ingestion_service_server::{IngestionService, IngestionServiceServer};
use smartfarm_proto::ingestion::v1::telemetry_service_server::{TelemetryService, TelemetryServiceServer};

/// How the README and the issue tracker name the capability these RPCs belong to.
const CAPABILITY: &str = "the telemetry capability (edge agent, spool, exactly-once upload)";

/// The `IngestionService` and `TelemetryService` implementation.
#[derive(Clone, Debug, Default)]
pub struct IngestionApi;

impl IngestionApi {
    /// The tonic server of the edge link.
    pub fn ingestion_server(self) -> IngestionServiceServer<IngestionApi> {
        IngestionServiceServer::new(self)
    }

    /// The tonic server of the telemetry queries.
    pub fn telemetry_server(self) -> TelemetryServiceServer<IngestionApi> {
        TelemetryServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl IngestionService for IngestionApi {
    type ConnectStream = tokio_stream::Empty<Result<pb::ConnectResponse, Status>>;

    async fn connect(
        &self,
        _request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        Err(Error::unimplemented("IngestionService.Connect", CAPABILITY).into())
    }
}

#[tonic::async_trait]
impl TelemetryService for IngestionApi {
    async fn query_readings(
        &self,
        _request: Request<pb::QueryReadingsRequest>,
    ) -> Result<Response<pb::QueryReadingsResponse>, Status> {
        Err(Error::unimplemented("TelemetryService.QueryReadings", CAPABILITY).into())
    }

    async fn query_aggregates(
        &self,
        _request: Request<pb::QueryAggregatesRequest>,
    ) -> Result<Response<pb::QueryAggregatesResponse>, Status> {
        Err(Error::unimplemented("TelemetryService.QueryAggregates", CAPABILITY).into())
    }

    async fn get_latest_readings(
        &self,
        _request: Request<pb::GetLatestReadingsRequest>,
    ) -> Result<Response<pb::GetLatestReadingsResponse>, Status> {
        Err(Error::unimplemented("TelemetryService.GetLatestReadings", CAPABILITY).into())
    }
}
