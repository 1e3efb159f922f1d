//! The uplink: one `IngestionService.Connect` stream to the cloud, kept open. On every connection the agent says
//! hello, learns the cloud's committed mark (and drops what it covers), then drains its backlog oldest first; after
//! that it sends every `upload_interval`, or sooner when `upload_threshold_bytes` are waiting. A batch leaves the
//! spool only when the cloud acknowledges it, so a cut link, a cloud restart or a kill of either side loses nothing
//! and, thanks to the cloud's mark, duplicates nothing. HTTP/2 keepalive notices a half-open link; reconnects back
//! off exponentially with jitter.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use smartfarm_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use smartfarm_proto::ingestion::v1::{self as pb, connect_request, connect_response};

use crate::config::EdgeConfig;
use crate::ingest::LocalAlert;
use crate::registry::Registry;
use crate::spool::Spool;

/// The version the agent reports in its hello.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to the cloud: {0}")]
    Connect(String),
    #[error("the cloud refused the link: {0}")]
    Refused(tonic::Status),
    #[error("the link failed: {0}")]
    Stream(tonic::Status),
    #[error("the cloud closed the link")]
    Closed,
    #[error("the cloud broke the protocol: {0}")]
    Protocol(String),
    #[error("the cloud refused batch {first}..={last} for good: {reason}")]
    BatchRefused { first: u64, last: u64, reason: String },
    #[error("{0}")]
    Spool(String),
}

/// Keeps the link to the cloud.
pub struct Uplink {
    config: EdgeConfig,
    spool: Arc<Spool>,
    registry: Arc<Registry>,
    alerts: mpsc::UnboundedSender<LocalAlert>,
    /// Where the cloud's model updates go (to the diagnoser, when the agent diagnoses photos).
    model_updates: Option<mpsc::Sender<Vec<smartfarm_proto::common::v1::ModelRef>>>,
    /// Rules, the urgent lane and commands (when the agent runs them).
    alerting: Option<Alerting>,
    /// Records the cloud dropped and the farm has not been told of yet.
    dropped: Mutex<DroppedByCloud>,
}

/// How often at most the farm's alert topic is told of records the cloud dropped: a gateway whose clock runs a day
/// ahead has every batch's readings dropped, and a drain would otherwise announce each batch.
const DROPPED_REPORT_EVERY: Duration = Duration::from_secs(60);

/// Records the cloud dropped, summed by reason between two announcements.
#[derive(Debug, Default)]
struct DroppedByCloud {
    by_reason: BTreeMap<String, u64>,
    last_sequence: u64,
    last_told: Option<Instant>,
}

impl DroppedByCloud {
    /// Adds what an acknowledgement says.
    fn add(&mut self, ack: &pb::BatchAck) {
        for dropped in &ack.dropped {
            *self.by_reason.entry(dropped.reason.clone()).or_default() += dropped.count;
        }
        self.last_sequence = self.last_sequence.max(ack.last_sequence);
    }

    /// What to announce now, if anything waits and the last announcement is old enough (or `at_once`: the agent
    /// is stopping).
    fn take_due(&mut self, now: Instant, at_once: bool) -> Option<LocalAlert> {
        let too_soon = !at_once && self.last_told.is_some_and(|told| now - told < DROPPED_REPORT_EVERY);
        if self.by_reason.is_empty() || too_soon {
            return None;
        }
        self.last_told = Some(now);
        let dropped = std::mem::take(&mut self.by_reason).into_iter().collect();
        Some(LocalAlert::DroppedByCloud { last_sequence: self.last_sequence, dropped })
    }
}

/// The alerts-and-commands parts the link serves: the rules cache it updates, the urgent lane it drains, the command
/// book whose receipts it resends at every connection, and where the cloud's commands go.
pub struct Alerting {
    pub rules: Arc<crate::rules::EdgeRules>,
    pub urgent: Arc<crate::urgent::UrgentQueue>,
    pub book: Arc<crate::commands::CommandBook>,
    pub commands: mpsc::UnboundedSender<smartfarm_proto::command::v1::Command>,
    /// Set from each welcome's server time.
    pub clock: Arc<crate::commands::CloudClock>,
}

impl Uplink {
    pub fn new(
        config: EdgeConfig,
        spool: Arc<Spool>,
        registry: Arc<Registry>,
        alerts: mpsc::UnboundedSender<LocalAlert>,
    ) -> Self {
        Uplink {
            config,
            spool,
            registry,
            alerts,
            model_updates: None,
            alerting: None,
            dropped: Mutex::new(DroppedByCloud::default()),
        }
    }

    /// Keeps the rules, sends the urgent lane at once, and passes commands on.
    pub fn with_alerting(mut self, alerting: Alerting) -> Self {
        self.alerting = Some(alerting);
        self
    }

    /// Passes the cloud's model updates to `updates`.
    pub fn with_model_updates(mut self, updates: mpsc::Sender<Vec<smartfarm_proto::common::v1::ModelRef>>) -> Self {
        self.model_updates = Some(updates);
        self
    }

    /// Connects, and reconnects, until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = self.config.reconnect_min;
        loop {
            let started = Instant::now();
            let result = self.session(&mut shutdown).await;
            metrics::gauge!("smartfarm_edge_link_up").set(0.0);
            // What waits of the cloud's drops is told now, not only while a link stays up; all of it when stopping.
            self.tell_dropped(None, *shutdown.borrow());
            if *shutdown.borrow() {
                return;
            }
            match result {
                Ok(()) => return,
                Err(error) => {
                    // A link that worked for a while starts the backoff over.
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = self.config.reconnect_min;
                    }
                    // The same batch would be refused again at once: wait as long as the backoff ever does.
                    if matches!(error, LinkError::BatchRefused { .. }) {
                        backoff = self.config.reconnect_max;
                    }
                    metrics::counter!("smartfarm_edge_link_reconnects_total").increment(1);
                    let jitter = rand::rng().random_range(0.5..1.5);
                    let wait = backoff.mul_f64(jitter).min(self.config.reconnect_max);
                    tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "cloud link down");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {
                            self.tell_dropped(None, true);
                            return;
                        }
                    }
                    backoff = (backoff * 2).min(self.config.reconnect_max);
                }
            }
        }
    }

    /// One connection: hello, welcome, then batches and acknowledgements until something ends it.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), LinkError> {
        let channel = connect(&self.config).await?;
        let token = bearer(&self.config)?;
        let mut client = IngestionServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            request.metadata_mut().insert("authorization", token.clone());
            Ok(request)
        })
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(64 << 20);

        let (up, up_receiver) = mpsc::channel::<pb::ConnectRequest>(64);
        let stats = self.spool.stats();
        let hello = pb::EdgeHello {
            agent_version: AGENT_VERSION.into(),
            spool_first_sequence: self.spool.first_pending_sequence(),
            spool_last_sequence: stats.last_sequence,
            registry_version: self.registry.version(),
            rules_version: self.alerting.as_ref().map_or(0, |alerting| alerting.rules.version()),
            spool_id: self.spool.id().to_string(),
        };
        up.send(pb::ConnectRequest { body: Some(connect_request::Body::Hello(hello)) })
            .await
            .map_err(|_| LinkError::Closed)?;
        let mut down = client.connect(ReceiverStream::new(up_receiver)).await.map_err(LinkError::Refused)?.into_inner();

        let welcome = match down.message().await.map_err(LinkError::Stream)? {
            Some(pb::ConnectResponse { body: Some(connect_response::Body::Welcome(welcome)) }) => welcome,
            Some(other) => return Err(LinkError::Protocol(format!("expected welcome, got {other:?}"))),
            None => return Err(LinkError::Closed),
        };
        // A mark costs two fsyncs: written on a blocking thread, as the later ones are (see `write_marks`).
        let (spool, committed) = (self.spool.clone(), welcome.committed_sequence);
        tokio::task::spawn_blocking(move || spool.ack(committed))
            .await
            .map_err(|error| LinkError::Spool(format!("the mark writer failed: {error}")))?
            .map_err(|error| LinkError::Spool(error.to_string()))?;
        if let (Some(alerting), Some(server_time)) = (&self.alerting, &welcome.server_time)
            && let Ok(cloud) = smartfarm_core::time::from_timestamp("welcome.server_time", server_time)
        {
            alerting.clock.observe(cloud, std::time::SystemTime::now());
        }
        metrics::gauge!("smartfarm_edge_link_up").set(1.0);
        tracing::info!(
            committed = welcome.committed_sequence,
            pending = self.spool.stats().pending_records,
            "cloud link up"
        );

        let window = welcome.max_in_flight_batches.max(1) as usize;
        let mut last_sent = welcome.committed_sequence.max(self.spool.stats().acked_sequence);
        let mut in_flight: VecDeque<u64> = VecDeque::new();
        // The backlog drains at once after a (re)connect; afterwards uploads wait for the interval or the threshold.
        let mut draining = true;
        let mut upload_timer = tokio::time::interval(self.config.upload_interval);
        upload_timer.tick().await;
        let mut threshold_check = tokio::time::interval(Duration::from_secs(1));
        // What waited while the link was down goes first. Receipts the cloud may have missed when the last link
        // died are not sent again wholesale: the cloud sends its unfinished commands down at connect, and the
        // command book answers each (a busy farm's book would otherwise push queued alerts out of the lane).
        let no_urgent_lane = crate::urgent::UrgentQueue::default();
        let urgent = self.alerting.as_ref().map_or(&no_urgent_lane, |alerting| &*alerting.urgent);

        // The cloud's marks are written by a task of their own (a mark costs two fsyncs): the link goes on sending
        // alerts and batches meanwhile, and the marks that arrive during one write are written as one.
        let (mark, marks) = watch::channel(welcome.committed_sequence);
        let mut marking = tokio::spawn(write_marks(self.spool.clone(), marks));
        // The next batch, read and compressed off the async workers while urgent messages keep going up: an alert
        // raised during a drain waits for no batch to be prepared.
        let mut preparing: Option<JoinHandle<Result<Option<pb::ReadingBatch>, LinkError>>> = None;
        // An upload asked for while a batch was being prepared: the read may have missed what landed meanwhile, so
        // finding nothing does not end the drain.
        let mut asked_while_preparing = false;
        loop {
            let mut taken = urgent.take().into_iter();
            while let Some((queued, body)) = taken.next() {
                if let Err(unsent) = up.send(pb::ConnectRequest { body: Some(body) }).await {
                    // The link died: this message and the ones after it wait for the next.
                    let mut back: Vec<_> = unsent.0.body.into_iter().map(|body| (queued, body)).collect();
                    back.extend(taken);
                    urgent.put_back(back);
                    return Err(LinkError::Closed);
                }
                metrics::counter!("smartfarm_edge_urgent_sent_total").increment(1);
                metrics::histogram!("smartfarm_edge_urgent_wait_seconds").record(queued.elapsed().as_secs_f64());
            }
            if draining && preparing.is_none() && in_flight.len() < window {
                asked_while_preparing = false;
                preparing = Some(self.prepare_batch(last_sent));
            }
            tokio::select! {
                prepared = prepared_batch(&mut preparing) => {
                    preparing = None;
                    match prepared? {
                        None => draining = std::mem::take(&mut asked_while_preparing),
                        Some(batch) => {
                            let last = batch.last_sequence;
                            metrics::counter!("smartfarm_edge_batches_sent_total").increment(1);
                            tracing::debug!(first = batch.first_sequence, last, records = batch.record_count, "batch sent");
                            up.send(pb::ConnectRequest { body: Some(connect_request::Body::Batch(batch)) })
                                .await
                                .map_err(|_| LinkError::Closed)?;
                            in_flight.push_back(last);
                            last_sent = last;
                        }
                    }
                }
                message = down.message() => {
                    let body = match message.map_err(LinkError::Stream)? {
                        Some(pb::ConnectResponse { body: Some(body) }) => body,
                        Some(_) => return Err(LinkError::Protocol("an empty message".into())),
                        None => return Err(LinkError::Closed),
                    };
                    match body {
                        connect_response::Body::BatchAck(ack) => {
                            if in_flight.front() != Some(&ack.last_sequence) {
                                return Err(LinkError::Protocol(format!(
                                    "ack for {} while {:?} were in flight", ack.last_sequence, in_flight
                                )));
                            }
                            in_flight.pop_front();
                            // Counted before the ack, which may fail: the batch is committed and never comes back.
                            if !ack.dropped.is_empty() {
                                for dropped in &ack.dropped {
                                    metrics::counter!("smartfarm_edge_records_dropped_by_cloud_total", "reason" => dropped.reason.clone())
                                        .increment(dropped.count);
                                }
                                tracing::warn!(last_sequence = ack.last_sequence, dropped = ?ack.dropped, "the cloud did not store some records of a batch");
                                self.tell_dropped(Some(&ack), false);
                            }
                            mark.send_replace(ack.last_sequence);
                            metrics::counter!("smartfarm_edge_batches_acked_total").increment(1);
                        }
                        connect_response::Body::BatchReject(reject) => {
                            let _ = self.alerts.send(LocalAlert::BatchRefused {
                                first_sequence: reject.first_sequence,
                                last_sequence: reject.last_sequence,
                                reason: reject.reason.clone(),
                            });
                            return Err(LinkError::BatchRefused {
                                first: reject.first_sequence,
                                last: reject.last_sequence,
                                reason: reject.reason,
                            });
                        }
                        connect_response::Body::Registry(snapshot) => {
                            match self.registry.apply(&snapshot) {
                                Ok(()) => {
                                    if let Some(alerting) = &self.alerting {
                                        alerting.rules.set_devices(&self.registry.sensors());
                                    }
                                    metrics::gauge!("smartfarm_edge_registry_devices").set(snapshot.devices.len() as f64);
                                    tracing::info!(version = snapshot.version, devices = snapshot.devices.len(), "registry updated");
                                }
                                Err(error) => tracing::error!(%error, "cannot cache the registry; keeping the old one"),
                            }
                        }
                        connect_response::Body::Welcome(_) => return Err(LinkError::Protocol("a second welcome".into())),
                        connect_response::Body::ModelUpdate(update) => {
                            tracing::info!(models = ?update.models, "the cloud named the models to run");
                            match &self.model_updates {
                                Some(updates) => {
                                    let _ = updates.try_send(update.models);
                                }
                                None => tracing::debug!("this agent does not diagnose on the farm; model update ignored"),
                            }
                        }
                        connect_response::Body::Rules(snapshot) => match &self.alerting {
                            Some(alerting) => match alerting.rules.apply(&snapshot) {
                                Ok(ended) => {
                                    // Alerts of deleted rules: over, on the farm's topic and in the cloud.
                                    let raised = crate::ingest::RaisedAlerts {
                                        urgent: alerting.urgent.clone(),
                                        alerts: self.alerts.clone(),
                                    };
                                    for alert in ended {
                                        raised.raise(alert);
                                    }
                                    alerting.rules.set_devices(&self.registry.sensors());
                                    metrics::gauge!("smartfarm_edge_rules").set(alerting.rules.len() as f64);
                                    tracing::info!(version = snapshot.version, rules = alerting.rules.len(), "rules updated");
                                }
                                Err(error) => tracing::error!(%error, "cannot cache the rules; keeping the old ones"),
                            },
                            None => tracing::debug!("this agent does not evaluate rules; snapshot ignored"),
                        },
                        connect_response::Body::Command(command) => match &self.alerting {
                            Some(alerting) => {
                                let _ = alerting.commands.send(command);
                            }
                            None => tracing::warn!(command_id = %command.id, "this agent does not run commands; ignored"),
                        },
                        connect_response::Body::Alert(alert) => {
                            let _ = self.alerts.send(LocalAlert::FromCloud(alert));
                        }
                    }
                }
                _ = urgent.news() => {}
                // It ends only when a mark cannot be written: so does the link (the next one writes the mark again).
                written = &mut marking => {
                    let error = match written {
                        Ok(Err(error)) => error,
                        Ok(Ok(())) => "the mark writer stopped".to_string(),
                        Err(panicked) => format!("the mark writer failed: {panicked}"),
                    };
                    return Err(LinkError::Spool(error));
                }
                _ = upload_timer.tick() => {
                    draining = true;
                    asked_while_preparing |= preparing.is_some();
                }
                _ = threshold_check.tick() => {
                    self.tell_dropped(None, false);
                    if self.spool.stats().pending_bytes >= self.config.upload_threshold_bytes {
                        draining = true;
                        asked_while_preparing |= preparing.is_some();
                    }
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// Adds what `ack` says the cloud dropped, and tells the farm's alert topic what has waited long enough (all
    /// of it `at_once`).
    fn tell_dropped(&self, ack: Option<&pb::BatchAck>, at_once: bool) {
        let mut dropped = self.dropped.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ack) = ack {
            dropped.add(ack);
        }
        if let Some(alert) = dropped.take_due(Instant::now(), at_once) {
            let _ = self.alerts.send(alert);
        }
    }

    /// Starts reading and compressing the next batch after `last_sent` (`None` when nothing is waiting), off the
    /// async workers, which serve the sensors.
    fn prepare_batch(&self, last_sent: u64) -> JoinHandle<Result<Option<pb::ReadingBatch>, LinkError>> {
        let spool = self.spool.clone();
        let (max_records, max_bytes) = (self.config.batch_max_records, self.config.batch_max_bytes);
        tokio::task::spawn_blocking(move || {
            // Only what is on disk goes up (under the interval and never policies this makes it so): a cloud mark
            // must never run ahead of what survives a power cut here.
            spool.sync().map_err(|error| LinkError::Spool(error.to_string()))?;
            let records = spool
                .read_after(last_sent, max_records, max_bytes)
                .map_err(|error| LinkError::Spool(error.to_string()))?;
            let Some(last) = records.last().map(|record| record.sequence) else { return Ok(None) };
            let record_count = records.len() as u32;
            let payload = pb::BatchPayload { records }.encode_to_vec();
            let compressed =
                zstd::bulk::compress(&payload, 3).map_err(|error| LinkError::Spool(format!("zstd: {error}")))?;
            Ok(Some(pb::ReadingBatch {
                // From just after the last batch: records the cap dropped leave a gap the cloud's mark steps over.
                first_sequence: last_sent + 1,
                last_sequence: last,
                compression: pb::Compression::Zstd as i32,
                payload: compressed,
                record_count,
            }))
        })
    }
}

/// The batch being prepared, once it is (forever when none is).
async fn prepared_batch(
    preparing: &mut Option<JoinHandle<Result<Option<pb::ReadingBatch>, LinkError>>>,
) -> Result<Option<pb::ReadingBatch>, LinkError> {
    match preparing {
        Some(handle) => handle.await.map_err(|error| LinkError::Spool(format!("the batch reader failed: {error}")))?,
        None => std::future::pending().await,
    }
}

/// A channel to the cloud, with the link's keepalives and TLS settings.
pub async fn connect(config: &EdgeConfig) -> Result<Channel, LinkError> {
    let connect_error = |error: tonic::transport::Error| {
        LinkError::Connect(format!("{error}: {:?}", std::error::Error::source(&error)))
    };
    let mut endpoint = Endpoint::from_shared(config.cloud.clone())
        .map_err(connect_error)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true);
    if config.cloud.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(path) = &config.ca_cert {
            let pem = tokio::fs::read(path)
                .await
                .map_err(|error| LinkError::Connect(format!("cannot read ca_cert {}: {error}", path.display())))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(connect_error)?;
    }
    endpoint.connect().await.map_err(connect_error)
}

/// The `authorization` header value of the gateway credential.
pub fn bearer(config: &EdgeConfig) -> Result<MetadataValue<tonic::metadata::Ascii>, LinkError> {
    format!("Bearer {}", config.credential)
        .parse()
        .map_err(|_| LinkError::Connect("the credential is not valid header text".into()))
}

/// Writes each mark the link receives from the cloud ([`Spool::ack`], on a blocking thread), the latest one when
/// several arrived during a write, until the link drops its sender (the last mark is written first) or a write
/// fails.
async fn write_marks(spool: Arc<Spool>, mut marks: watch::Receiver<u64>) -> Result<(), String> {
    while marks.changed().await.is_ok() {
        let sequence = *marks.borrow_and_update();
        let spool = spool.clone();
        match tokio::task::spawn_blocking(move || spool.ack(sequence)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                // Logged here too: a link that ended meanwhile no longer hears of it.
                tracing::error!(%error, sequence, "cannot write the cloud's mark");
                return Err(error.to_string());
            }
            // Only a panic: the runtime is not shutting down while the link runs.
            Err(error) => return Err(format!("the mark writer failed: {error}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(last_sequence: u64, dropped: &[(&str, u64)]) -> pb::BatchAck {
        pb::BatchAck {
            last_sequence,
            duplicate: false,
            dropped: dropped
                .iter()
                .map(|(reason, count)| pb::DroppedRecords { reason: reason.to_string(), count: *count })
                .collect(),
        }
    }

    /// The first report goes at once; what follows within a minute is summed into the next one.
    #[test]
    fn dropped_records_are_told_at_once_then_summed_for_a_minute() {
        let mut dropped = DroppedByCloud::default();
        let start = Instant::now();
        assert!(dropped.take_due(start, false).is_none(), "nothing to tell");
        dropped.add(&ack(100, &[("bad_time", 3)]));
        let Some(LocalAlert::DroppedByCloud { last_sequence, dropped: told }) = dropped.take_due(start, false) else {
            panic!("told at once")
        };
        assert_eq!((last_sequence, told), (100, vec![("bad_time".to_string(), 3)]));
        dropped.add(&ack(200, &[("bad_time", 5), ("bad_value", 1)]));
        dropped.add(&ack(300, &[("bad_time", 2)]));
        assert!(dropped.take_due(start + Duration::from_secs(59), false).is_none(), "not within the minute");
        let Some(LocalAlert::DroppedByCloud { last_sequence, dropped: told }) =
            dropped.take_due(start + Duration::from_secs(60), false)
        else {
            panic!("told after the minute")
        };
        assert_eq!((last_sequence, told), (300, vec![("bad_time".to_string(), 7), ("bad_value".to_string(), 1)]));
        assert!(dropped.take_due(start + Duration::from_secs(200), false).is_none(), "told once");
        // A stopping agent tells what waits without waiting for the minute.
        dropped.add(&ack(400, &[("foreign_device", 1)]));
        assert!(dropped.take_due(start + Duration::from_secs(61), false).is_none(), "within the minute");
        assert!(dropped.take_due(start + Duration::from_secs(61), true).is_some(), "told when stopping");
    }
}
