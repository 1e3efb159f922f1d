//! smartfarm-ingestion owns telemetry in the cloud: the edge link (`IngestionService.Connect`: hello and the
//! committed mark, registry, rules and model pushes, exactly-once batch commits acknowledged after the database
//! commit, rule evaluation on committed readings, urgent alerts and command receipts up, commands down), the
//! telemetry queries (`TelemetryService`), and the retention task. It holds no SQL: storage is
//! [`smartfarm_store::TelemetryStore`].

#![forbid(unsafe_code)]

pub mod batch;
mod link;
mod query;
mod urgent;

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use smartfarm_bus::Bus;
use smartfarm_core::config::TelemetryConfig;
use smartfarm_core::{Principal, time};
use smartfarm_proto::ingestion::v1 as pb;
use smartfarm_proto::ingestion::v1::ingestion_service_server::{IngestionService, IngestionServiceServer};
use smartfarm_proto::ingestion::v1::telemetry_service_server::TelemetryServiceServer;
use smartfarm_store::telemetry::Retention;
use smartfarm_store::{AlertStore, CommandStore, ModelStore, RegistryStore, TelemetryStore};

/// Batches decoded or being committed at once across every edge link of this process (a link holds one per batch
/// from its decoding to its commit): beyond it, links wait (backpressure on the agents through HTTP/2 flow control)
/// instead of piling decoded batches into memory and work onto the database.
const MAX_CONCURRENT_COMMITS: usize = 8;

/// The `IngestionService` and `TelemetryService` implementation.
#[derive(Clone)]
pub struct IngestionApi {
    registry: Arc<dyn RegistryStore>,
    telemetry: Arc<dyn TelemetryStore>,
    settings: Arc<TelemetryConfig>,
    /// Where committed readings are announced (the inference role scores them).
    bus: Option<Bus>,
    /// This process runs the inference pipeline, which scores what this process commits (see
    /// [`IngestionApi::with_scoring_here`]).
    scoring_here: bool,
    /// Something scores committed readings (this process or another replica): each commit lists its batch for
    /// scoring, so that one whose announcement is lost is scored late (see [`IngestionApi::with_batches_listed`]).
    batches_listed: bool,
    /// Which model versions serve: pushed to agents so they run the same plant-disease model.
    models: Option<Arc<dyn ModelStore>>,
    /// The farms' rules (pushed to agents and evaluated on committed readings) and their alerts (raised by agents
    /// and by this link).
    alerts: Option<Arc<dyn AlertStore>>,
    /// Commands for the farms' devices: sent down the link, their receipts recorded.
    commands: Option<Arc<dyn CommandStore>>,
    commit_permits: Arc<Semaphore>,
    /// Turns true when the process begins to shut down: open links end so their agents reconnect elsewhere.
    shutting_down: watch::Receiver<bool>,
    shutdown_sender: Arc<watch::Sender<bool>>,
    /// How many links' alert recorders are still running: a stopping process waits for them to record what the
    /// agents sent up (see [`IngestionApi::wait_for_alert_recorders`]).
    alert_recorders: Arc<watch::Sender<usize>>,
}

impl IngestionApi {
    /// The service over the given stores.
    pub fn new(
        registry: Arc<dyn RegistryStore>,
        telemetry: Arc<dyn TelemetryStore>,
        settings: TelemetryConfig,
    ) -> Self {
        let (shutdown_sender, shutting_down) = watch::channel(false);
        IngestionApi {
            registry,
            telemetry,
            settings: Arc::new(settings),
            bus: None,
            scoring_here: false,
            batches_listed: false,
            models: None,
            alerts: None,
            commands: None,
            commit_permits: Arc::new(Semaphore::new(MAX_CONCURRENT_COMMITS)),
            shutting_down,
            shutdown_sender: Arc::new(shutdown_sender),
            alert_recorders: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Announces every committed batch's series on `bus`.
    pub fn with_bus(mut self, bus: Bus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Says that this process's own inference pipeline scores what it commits; otherwise each committed batch is
    /// also handed out as work, to one of the replicas that run the inference role.
    pub fn with_scoring_here(mut self, scoring_here: bool) -> Self {
        self.scoring_here = scoring_here;
        self
    }

    /// Says that the inference role scores committed readings (here or on other replicas): each commit then also
    /// lists its batch among those still to score, in the same transaction, and the scorer confirms it. A batch
    /// whose announcement was lost (the process died or stopped first, or its pipeline fell behind) is so scored
    /// late rather than never. Leave it off when nothing scores: the list would only grow until retention.
    pub fn with_batches_listed(mut self, listed: bool) -> Self {
        self.batches_listed = listed;
        self
    }

    /// Tells every connected agent which plant-disease model version to run (at connect, and when it changes).
    pub fn with_models(mut self, models: Arc<dyn ModelStore>) -> Self {
        self.models = Some(models);
        self
    }

    /// Pushes each farm's rules to its agent, evaluates them on committed readings, and records the alerts agents
    /// raise (needs [`IngestionApi::with_bus`] to hear of rule changes and to pass alerts on).
    pub fn with_alerts(mut self, alerts: Arc<dyn AlertStore>) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// Sends queued commands down the links of their farms and records the agents' receipts (needs
    /// [`IngestionApi::with_bus`] to hear of new commands).
    pub fn with_commands(mut self, commands: Arc<dyn CommandStore>) -> Self {
        self.commands = Some(commands);
        self
    }

    /// Ends every open edge link (after the batch in hand is acknowledged), so that graceful shutdown is not held
    /// up by streams that would otherwise last for days. Agents reconnect, to another replica if there is one.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown_sender.send(true);
    }

    /// Waits, at most `limit`, until the alert recorders of the links that ended have recorded what their agents
    /// sent up (an agent sends an alert once; the process must not exit with it queued). Call it once the links are
    /// closed; returns whether they all finished.
    pub async fn wait_for_alert_recorders(&self, limit: std::time::Duration) -> bool {
        let mut running = self.alert_recorders.subscribe();
        tokio::time::timeout(limit, running.wait_for(|count| *count == 0)).await.is_ok()
    }

    /// Counts a link's alert recorder as running until the returned guard is dropped.
    pub(crate) fn alert_recorder_running(&self) -> AlertRecorderRunning {
        self.alert_recorders.send_modify(|count| *count += 1);
        AlertRecorderRunning(self.alert_recorders.clone())
    }

    /// The tonic server of the edge link, accepting batches up to the configured size.
    pub fn ingestion_server(self) -> IngestionServiceServer<IngestionApi> {
        // Room for the batch plus the message around it.
        let limit = self.settings.max_batch_bytes + 64 * 1024;
        IngestionServiceServer::new(self).max_decoding_message_size(limit)
    }

    /// The tonic server of the telemetry queries.
    pub fn telemetry_server(self) -> TelemetryServiceServer<IngestionApi> {
        TelemetryServiceServer::new(self)
    }

    /// Deletes expired telemetry every `retention_interval`, forever; run it in a task of its own.
    pub async fn run_retention(self) {
        let retention = Retention { raw: self.settings.raw_retention, rollups: self.settings.rollup_retention };
        let mut ticks = tokio::time::interval(self.settings.retention_interval);
        loop {
            ticks.tick().await;
            match self.telemetry.apply_retention(retention, time::now()).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "expired readings deleted"),
                Err(error) => tracing::warn!(%error, "retention failed; retrying at the next interval"),
            }
        }
    }
}

#[tonic::async_trait]
impl IngestionService for IngestionApi {
    type ConnectStream = ReceiverStream<Result<pb::ConnectResponse, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let principal = Principal::of(&request)?;
        let (gateway_id, farm_id) = principal.gateway_of()?;
        // (Only a gateway gets here; an empty hash matches no device's.)
        let credential_sha256 = match principal {
            Principal::Gateway { credential_sha256, .. } => credential_sha256,
            _ => String::new(),
        };
        let inbound = request.into_inner();
        // Enough room for a registry snapshot and the acks of the agent's in-flight window.
        let (outbound, receiver) = mpsc::channel(self.settings.max_in_flight_batches as usize + 8);
        tokio::spawn(link::run(self.clone(), (gateway_id, farm_id, credential_sha256), inbound, outbound));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// A link's alert recorder, counted while it runs (see [`IngestionApi::wait_for_alert_recorders`]).
pub(crate) struct AlertRecorderRunning(Arc<watch::Sender<usize>>);

impl Drop for AlertRecorderRunning {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}
