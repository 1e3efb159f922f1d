//! smartfarm-alert will own alert rules (evaluated in the cloud and pushed to edge agents), the alerts they raise,
//! and their fan-out (live streams, signed webhooks). Until the alerts capability is built, every RPC answers
//! `UNIMPLEMENTED` and names that capability; nothing is faked.

#![forbid(unsafe_code)]

use tonic::{Request, Response, Status};

use smartfarm_core::Error;
use smartfarm_proto::alert::v1 as pb;
use smartfarm_proto::alert::v1::alert_service_server::{AlertService, AlertServiceServer};

/// How the README and the issue tracker name the capability these RPCs belong to.
const CAPABILITY: &str = "the alerts and commands capability (offline-first rules, fan-out)";

/// The `AlertService` implementation.
#[derive(Clone, Debug, Default)]
pub struct AlertApi;

impl AlertApi {
    /// The tonic server for this service.
    pub fn into_server(self) -> AlertServiceServer<AlertApi> {
        AlertServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl AlertService for AlertApi {
    type SubscribeStream = tokio_stream::Empty<Result<pb::SubscribeResponse, Status>>;

    async fn create_rule(
        &self,
        _request: Request<pb::CreateRuleRequest>,
    ) -> Result<Response<pb::CreateRuleResponse>, Status> {
        Err(Error::unimplemented("AlertService.CreateRule", CAPABILITY).into())
    }

    async fn list_rules(
        &self,
        _request: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        Err(Error::unimplemented("AlertService.ListRules", CAPABILITY).into())
    }

    async fn delete_rule(
        &self,
        _request: Request<pb::DeleteRuleRequest>,
    ) -> Result<Response<pb::DeleteRuleResponse>, Status> {
        Err(Error::unimplemented("AlertService.DeleteRule", CAPABILITY).into())
    }

    async fn list_alerts(
        &self,
        _request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        Err(Error::unimplemented("AlertService.ListAlerts", CAPABILITY).into())
    }

    async fn acknowledge_alert(
        &self,
        _request: Request<pb::AcknowledgeAlertRequest>,
    ) -> Result<Response<pb::AcknowledgeAlertResponse>, Status> {
        Err(Error::unimplemented("AlertService.AcknowledgeAlert", CAPABILITY).into())
    }

    async fn resolve_alert(
        &self,
        _request: Request<pb::ResolveAlertRequest>,
    ) -> Result<Response<pb::ResolveAlertResponse>, Status> {
        Err(Error::unimplemented("AlertService.ResolveAlert", CAPABILITY).into())
    }

    async fn subscribe(
        &self,
        _request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Error::unimplemented("AlertService.Subscribe", CAPABILITY).into())
    }

    async fn create_webhook(
        &self,
        _request: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::CreateWebhookResponse>, Status> {
        Err(Error::unimplemented("AlertService.CreateWebhook", CAPABILITY).into())
    }

    async fn list_webhooks(
        &self,
        _request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        Err(Error::unimplemented("AlertService.ListWebhooks", CAPABILITY).into())
    }

    async fn delete_webhook(
        &self,
        _request: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        Err(Error::unimplemented("AlertService.DeleteWebhook", CAPABILITY).into())
    }
}
