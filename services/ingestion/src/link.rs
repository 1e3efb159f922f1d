//! One edge link: the `Connect` stream of one farm's gateway. The session answers `hello` with the committed mark,
//! pushes the farm's registry down (again whenever it changes), and commits each batch before acknowledging it.
//! A link is a two-stage pipeline: the session decodes the next batches while a commit task writes earlier ones
//! (those already waiting share one transaction), and the commit task commits, acknowledges and refuses strictly in
//! arrival order. So a link never has more work in the cloud than the agent's window of batches plus what HTTP/2
//! flow control lets it buffer; a global semaphore bounds the batches decoded or committing across links.
//!
//! A reader task takes the agent's messages off the stream as they come: alerts and command receipts (the urgent
//! lane) are handled at once, batches go to the session in order, so an alert is never held up behind a batch being
//! decoded. The farm's rules, commands and alert changes travel down the same stream (see `urgent`).
//!
//! The stream outlives the request's authentication, so the session re-checks its gateway on every registry
//! refresh and ends the link when the gateway is decommissioned or its credential rotated.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, broadcast, mpsc};
use tonic::{Status, Streaming};
use uuid::Uuid;

use smartfarm_bus::{Event, Job, ReadingsCommitted, SeriesSpan, SpanReadings};
use smartfarm_core::batch::BatchKey;
use smartfarm_core::{Error, Result, time};
use smartfarm_proto::device::v1::DeviceKind as ProtoKind;
use smartfarm_proto::ingestion::v1 as pb;
use smartfarm_store::model::{DeviceFilter, DeviceKind, DeviceState, KeysetPage};
use smartfarm_store::telemetry::BatchOutcome;

use crate::urgent::{self, FarmRules};
use crate::{IngestionApi, batch};

/// What a session sends down.
pub(crate) type Outbound = mpsc::Sender<Result<pb::ConnectResponse, Status>>;

/// Most of an agent's alerts or command receipts waiting to be recorded; past that the link reads the agent more
/// slowly, so an agent cannot make the cloud hold more of them in memory.
pub(crate) const URGENT_QUEUE: usize = 1024;

/// How long an agent has to say hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn down(body: pb::connect_response::Body) -> pb::ConnectResponse {
    pb::ConnectResponse { body: Some(body) }
}

/// Runs a session until the agent hangs up, the cloud shuts the link, or something fails. Failures end the stream
/// with a status; the agent reconnects and resends whatever was not acknowledged.
pub(crate) async fn run(
    api: IngestionApi,
    (gateway_id, farm_id, signed_in_with): (Uuid, Uuid, String),
    inbound: Streaming<pb::ConnectRequest>,
    outbound: Outbound,
) {
    metrics::gauge!("smartfarm_edge_links").increment(1.0);
    let result = serve(&api, (gateway_id, farm_id, signed_in_with), inbound, &outbound).await;
    metrics::gauge!("smartfarm_edge_links").decrement(1.0);
    match result {
        Ok(()) => tracing::info!(%gateway_id, %farm_id, "edge link closed by the agent"),
        Err(error) => {
            tracing::warn!(%gateway_id, %farm_id, %error, "edge link ended");
            // Not waited for: the link may have ended because the agent makes no room on its stream.
            let _ = outbound.try_send(Err(Status::from(error)));
        }
    }
}

async fn serve(
    api: &IngestionApi,
    (gateway_id, farm_id, signed_in_with): (Uuid, Uuid, String),
    mut inbound: Streaming<pb::ConnectRequest>,
    outbound: &Outbound,
) -> Result<()> {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(Error::invalid("hello", "the agent said nothing for 30 s after connecting")),
        Ok(Err(status)) => return Err(Error::Unavailable(format!("the agent's stream failed: {status}"))),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(pb::ConnectRequest { body: Some(pb::connect_request::Body::Hello(hello)) }))) => hello,
        Ok(Ok(Some(_))) => return Err(Error::invalid("hello", "the first message on the edge link must be hello")),
    };
    let spool_id = smartfarm_core::validate::id("hello.spool_id", &hello.spool_id)?;
    // The hash the stream signed in with, not the device's hash now: a credential replaced while the agent took its
    // time to say hello must not carry the link over to the new one.
    let gateway = api.registry.get_device(gateway_id).await?;
    if gateway.state == DeviceState::Decommissioned || gateway.credential_sha256.as_deref() != Some(&signed_in_with) {
        return Err(Error::Unauthenticated("the gateway was decommissioned or its credential replaced".into()));
    }
    let credential_at_connect = Some(signed_in_with);
    let committed = api.telemetry.committed_sequence(gateway_id, spool_id).await?;
    tracing::info!(
        %gateway_id, %farm_id, %spool_id, agent_version = %hello.agent_version, committed,
        spool_first = hello.spool_first_sequence, spool_last = hello.spool_last_sequence,
        "edge link open"
    );
    send(
        outbound,
        pb::connect_response::Body::Welcome(pb::CloudWelcome {
            committed_sequence: committed,
            server_time: Some(time::to_timestamp(time::now())),
            max_in_flight_batches: api.settings.max_in_flight_batches,
        }),
    )
    .await?;

    let mut registry = RegistryView { version: hello.registry_version, devices: Arc::default() };
    registry.refresh(api, farm_id, outbound, true).await?;
    api.registry.record_devices_seen(&[gateway_id], time::now()).await?;

    // Listening starts before the rules and the waiting commands are read, so no change falls between the two.
    let changes = api.bus.as_ref().map(|bus| bus.subscribe());
    let rules = FarmRules::new(api, farm_id, outbound.clone());
    let mut agent_rules_version = hello.rules_version;
    urgent::refresh_rules(api, &rules, &mut agent_rules_version, outbound).await?;
    urgent::send_pending_commands(api, farm_id, outbound, true).await?;

    // Decoded batches wait while another commits: decoding overlaps the database's work. The agent has at most
    // `max_in_flight_batches` unacknowledged, so that many may wait.
    let (ready, in_order) = mpsc::channel::<Ready>(api.settings.max_in_flight_batches as usize);
    let committer = tokio::spawn(commit_in_order(api.clone(), gateway_id, rules.clone(), in_order, outbound.clone()));
    // The agent's messages are read by a task of their own: an alert or a receipt behind a batch does not wait for
    // the batch to be decoded (or for the window of decoded batches to free up).
    let (batches, incoming) = mpsc::channel(api.settings.max_in_flight_batches as usize + 1);
    tokio::spawn(read_agent(api.clone(), farm_id, rules.clone(), inbound, batches));
    let farm_side = FarmSide { rules, agent_rules_version, changes };
    let received = receive(
        api,
        (gateway_id, spool_id, farm_id),
        credential_at_connect,
        &mut registry,
        farm_side,
        incoming,
        outbound,
        ready,
    )
    .await;
    // The batches already decoded are committed and acknowledged before the link ends (the sender is gone, so the
    // commit task stops after them); its failure is the one that explains the end.
    let committed = committer.await.map_err(|error| Error::internal("the commit task of an edge link", error))?;
    committed.and(received)
}

/// The alerts-and-commands state of a session: the farm's rules, the rules version the agent has, and the bus
/// events the link passes on.
struct FarmSide {
    rules: Arc<FarmRules>,
    agent_rules_version: u64,
    changes: Option<broadcast::Receiver<Event>>,
}

/// The next bus event; `None` when events were missed (the caller reloads what they would have said). Waits
/// forever without a bus.
async fn next_change(changes: &mut Option<broadcast::Receiver<Event>>) -> Option<Event> {
    let Some(receiver) = changes else { return std::future::pending().await };
    match receiver.recv().await {
        Ok(event) => Some(event),
        Err(broadcast::error::RecvError::Lagged(missed)) => {
            tracing::warn!(missed, "an edge link fell behind the bus; reloading its farm's rules and commands");
            None
        }
        Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
    }
}

/// What the reader task passes on to the session: batches, in order, and how the agent's stream ended.
enum Incoming {
    Batch(pb::ReadingBatch),
    /// The agent hung up (`Ok`) or broke the protocol or the stream (`Err`).
    Ended(Result<()>),
}

/// Reads the agent's messages after hello: urgent ones (alerts, command receipts) are handled at once, batches go to
/// the session in order. Ends with the stream, or when the session stops listening.
async fn read_agent(
    api: IngestionApi,
    farm_id: Uuid,
    rules: Arc<FarmRules>,
    mut inbound: Streaming<pb::ConnectRequest>,
    batches: mpsc::Sender<Incoming>,
) {
    // Receipts touch the database: a task of their own keeps them in order without holding up the reading. Its
    // queue is bounded: an agent that sends faster than they are recorded is read more slowly.
    let (receipts, mut receipt_queue) = mpsc::channel(URGENT_QUEUE);
    let receipt_api = api.clone();
    tokio::spawn(async move {
        while let Some(receipt) = receipt_queue.recv().await {
            if let Err(error) = urgent::on_receipt(&receipt_api, farm_id, &receipt).await {
                // The command stays unfinished here: it goes down again at the agent's next connection (or at a
                // refresh once its TTL passed), and the agent answers again from its command book.
                tracing::warn!(%farm_id, %error, "cannot record a command receipt");
            }
        }
    });
    let ended = loop {
        let message = tokio::select! {
            _ = batches.closed() => return,
            message = inbound.message() => message,
        };
        let message = match message {
            Ok(Some(message)) => message,
            Ok(None) => break Ok(()),
            Err(status) => break Err(Error::Unavailable(format!("the agent's stream failed: {status}"))),
        };
        match message.body {
            Some(pb::connect_request::Body::Batch(wire)) => {
                if batches.send(Incoming::Batch(wire)).await.is_err() {
                    return;
                }
            }
            Some(pb::connect_request::Body::Alert(alert)) => urgent::on_alert(&rules, &alert).await,
            Some(pb::connect_request::Body::CommandReceipt(receipt)) => {
                let _ = receipts.send(receipt).await;
            }
            Some(pb::connect_request::Body::Hello(_)) => {
                break Err(Error::invalid("hello", "hello may only be the first message"));
            }
            None => break Err(Error::invalid("body", "an edge message carries nothing")),
        }
    };
    let _ = batches.send(Incoming::Ended(ended)).await;
}

/// Takes the agent's batches and decodes them for the commit task, until the agent hangs up, the cloud shuts the
/// link, or something fails.
#[allow(clippy::too_many_arguments, reason = "one session's parts, passed once")]
async fn receive(
    api: &IngestionApi,
    (gateway_id, spool_id, farm_id): (Uuid, Uuid, Uuid),
    credential_at_connect: Option<String>,
    registry: &mut RegistryView,
    mut farm_side: FarmSide,
    mut incoming: mpsc::Receiver<Incoming>,
    outbound: &Outbound,
    ready: mpsc::Sender<Ready>,
) -> Result<()> {
    let mut refresh = tokio::time::interval(api.settings.registry_refresh_interval);
    refresh.tick().await;
    let mut shutting_down = api.shutting_down.clone();
    let mut models_sent = None;
    push_models(api, &mut models_sent, outbound).await?;
    loop {
        if *shutting_down.borrow_and_update() {
            return Err(Error::Unavailable("the cloud is shutting down; reconnect".into()));
        }
        tokio::select! {
            _ = shutting_down.changed() => continue,
            // The commit task failed: its error ends the link.
            _ = ready.closed() => return Ok(()),
            message = incoming.recv() => match message {
                Some(Incoming::Batch(wire)) => {
                    // Before a commit permit is taken: a link whose alert copies pile up slows itself only. A stop
                    // does not wait for the copies (the batch is not acknowledged: the agent sends it again).
                    tokio::select! {
                        () = farm_side.rules.wait_for_copy_room() => {}
                        _ = shutting_down.wait_for(|down| *down) => {
                            return Err(Error::Unavailable("the cloud is shutting down; reconnect".into()));
                        }
                    }
                    let decoded = prepare(api, (gateway_id, spool_id, farm_id), registry, wire, outbound).await?;
                    if ready.send(decoded).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Incoming::Ended(ended)) => return ended,
                None => return Ok(()),
            },
            change = next_change(&mut farm_side.changes) => {
                let side = (&*farm_side.rules, &mut farm_side.agent_rules_version);
                match change {
                    Some(event) => {
                        // The agent refuses a command for a device it does not know: one registered since the
                        // last push reaches it with the registry first.
                        if matches!(&event, Event::CommandQueued { farm_id: target, .. } if *target == farm_id) {
                            registry.refresh(api, farm_id, outbound, false).await?;
                        }
                        urgent::on_bus_event(api, side, event, outbound).await?
                    }
                    None => {
                        urgent::refresh_rules(api, side.0, side.1, outbound).await?;
                        registry.refresh(api, farm_id, outbound, false).await?;
                        urgent::send_pending_commands(api, farm_id, outbound, false).await?;
                    }
                }
            }
            _ = refresh.tick() => {
                let gateway = api.registry.get_device(gateway_id).await?;
                if gateway.state == DeviceState::Decommissioned || gateway.credential_sha256 != credential_at_connect {
                    return Err(Error::Unauthenticated("the gateway was decommissioned or its credential replaced".into()));
                }
                registry.refresh(api, farm_id, outbound, false).await?;
                push_models(api, &mut models_sent, outbound).await?;
                // The bus says when rules change; reading them now and then covers a message it lost.
                urgent::refresh_rules(api, &farm_side.rules, &mut farm_side.agent_rules_version, outbound).await?;
                urgent::send_pending_commands(api, farm_id, outbound, false).await?;
            }
        }
    }
}

/// Sends the active plant-disease model version down the link when it differs from what the link last sent (the
/// agent fetches the file with `InferenceService.GetModelFile`).
async fn push_models(api: &IngestionApi, sent: &mut Option<(String, String)>, outbound: &Outbound) -> Result<()> {
    let Some(models) = &api.models else { return Ok(()) };
    let Some(active) = models.active_model("plant_disease").await? else { return Ok(()) };
    let current = (active.name, active.version);
    if sent.as_ref() == Some(&current) {
        return Ok(());
    }
    let update = pb::ModelUpdate {
        models: vec![smartfarm_proto::common::v1::ModelRef { name: current.0.clone(), version: current.1.clone() }],
    };
    send(outbound, pb::connect_response::Body::ModelUpdate(update)).await?;
    *sent = Some(current);
    Ok(())
}

/// How long a message to the agent may wait for room on its stream. An agent that stops reading (HTTP/2 flow
/// control then holds the stream) would otherwise keep its link, the batches waiting behind an acknowledgement, and
/// the commit permits they hold (which every link of the process shares) forever. The link ends instead; the agent
/// reconnects and sends again what was not acknowledged.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) async fn send(outbound: &Outbound, body: pb::connect_response::Body) -> Result<()> {
    send_within(outbound, body, SEND_TIMEOUT).await
}

async fn send_within(outbound: &Outbound, body: pb::connect_response::Body, limit: std::time::Duration) -> Result<()> {
    match tokio::time::timeout(limit, outbound.send(Ok(down(body)))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Error::Unavailable("the agent went away".into())),
        Err(_) => Err(Error::Unavailable(format!(
            "the agent read nothing of its stream for {} s; the link ends",
            limit.as_secs_f64()
        ))),
    }
}

/// The farm's registry as this link last pushed it.
struct RegistryView {
    version: u64,
    /// Every device of the farm (for checking batch records).
    devices: Arc<HashSet<Uuid>>,
}

impl RegistryView {
    /// Reloads the farm's devices and pushes a snapshot down when the version moved (or when `force_check` and the
    /// agent's cached version differs).
    async fn refresh(
        &mut self,
        api: &IngestionApi,
        farm_id: Uuid,
        outbound: &Outbound,
        force_check: bool,
    ) -> Result<()> {
        let farm = api.registry.get_farm(farm_id).await?;
        if !force_check && farm.registry_version == self.version && !self.devices.is_empty() {
            return Ok(());
        }
        let mut devices = Vec::new();
        let mut after = None;
        loop {
            let filter = DeviceFilter { farm_id: Some(farm_id), kind: None, state: None };
            let page = api.registry.list_devices(&filter, KeysetPage { after, limit: 1000 }).await?;
            after = page.last().map(|device| device.id);
            let done = page.len() < 1000;
            devices.extend(page);
            if done {
                break;
            }
        }
        self.devices = Arc::new(devices.iter().map(|device| device.id).collect());
        if farm.registry_version != self.version {
            let snapshot = pb::RegistrySnapshot {
                version: farm.registry_version,
                devices: devices
                    .iter()
                    .filter(|device| device.state != DeviceState::Decommissioned)
                    .filter_map(|device| {
                        Some(pb::EdgeDevice {
                            device_id: device.id.to_string(),
                            name: device.name.clone(),
                            kind: proto_kind(device.kind) as i32,
                            credential_sha256: device.credential_sha256.clone()?,
                        })
                    })
                    .collect(),
            };
            tracing::debug!(%farm_id, version = farm.registry_version, devices = snapshot.devices.len(), "registry pushed to the edge");
            send(outbound, pb::connect_response::Body::Registry(snapshot)).await?;
            self.version = farm.registry_version;
        }
        Ok(())
    }
}

fn proto_kind(kind: DeviceKind) -> ProtoKind {
    match kind {
        DeviceKind::Sensor => ProtoKind::Sensor,
        DeviceKind::Camera => ProtoKind::Camera,
        DeviceKind::Actuator => ProtoKind::Actuator,
        DeviceKind::Gateway => ProtoKind::Gateway,
    }
}

/// Decodes a batch off the async workers (decompressing and decoding megabytes is CPU work).
async fn decode(
    wire: &Arc<pb::ReadingBatch>,
    (gateway_id, spool_id, farm_id): (Uuid, Uuid, Uuid),
    devices: &Arc<HashSet<Uuid>>,
    max_decompressed: usize,
    receive_time: SystemTime,
) -> Result<std::result::Result<(smartfarm_store::telemetry::EdgeBatch, batch::Dropped), batch::Refusal>> {
    let (wire, devices) = (wire.clone(), devices.clone());
    tokio::task::spawn_blocking(move || {
        batch::decode(&wire, gateway_id, spool_id, farm_id, &devices, max_decompressed, receive_time)
    })
    .await
    .map_err(|error| Error::internal("decode a batch", error))
}

/// A batch ready for the commit task, in arrival order.
enum Ready {
    /// Decoded; the permit bounds decoded batches in memory and commits across links until it is committed.
    Commit {
        batch: smartfarm_store::telemetry::EdgeBatch,
        /// Its records not stored, told to the agent with the acknowledgement.
        dropped: batch::Dropped,
        started: Instant,
        permit: OwnedSemaphorePermit,
    },
    /// Refused whole: the refusal goes down in its turn, after the acknowledgements of the batches before it.
    Refuse(pb::BatchReject),
}

/// Decodes one batch (looking at the registry again when it names devices this link does not know).
async fn prepare(
    api: &IngestionApi,
    ids: (Uuid, Uuid, Uuid),
    registry: &mut RegistryView,
    wire: pb::ReadingBatch,
    outbound: &Outbound,
) -> Result<Ready> {
    let (gateway_id, _, farm_id) = ids;
    let started = Instant::now();
    let receive_time = time::now();
    let permit =
        api.commit_permits.clone().acquire_owned().await.map_err(|_| Error::Unavailable("shutting down".into()))?;
    let wire = Arc::new(wire);
    let max_decompressed = api.settings.max_batch_bytes.saturating_mul(16);
    let mut decoded = decode(&wire, ids, &registry.devices, max_decompressed, receive_time).await?;
    if matches!(&decoded, Ok((_, dropped)) if dropped.foreign_device > 0) {
        // Maybe a device registered since the last refresh (registering moves the farm's registry version): look
        // again before dropping anything.
        let version = registry.version;
        registry.refresh(api, farm_id, outbound, false).await?;
        if registry.version != version {
            decoded = decode(&wire, ids, &registry.devices, max_decompressed, receive_time).await?;
        }
    }
    let (batch, dropped) = match decoded {
        Ok(decoded) => decoded,
        Err(batch::Refusal(reason)) => {
            metrics::counter!("smartfarm_ingest_batches_total", "outcome" => "rejected").increment(1);
            tracing::warn!(%gateway_id, first = wire.first_sequence, last = wire.last_sequence, %reason, "batch refused");
            return Ok(Ready::Refuse(pb::BatchReject {
                first_sequence: wire.first_sequence,
                last_sequence: wire.last_sequence,
                reason,
            }));
        }
    };
    for (reason, count) in dropped.by_reason() {
        if count > 0 {
            metrics::counter!("smartfarm_ingest_records_dropped_total", "reason" => reason).increment(count);
            tracing::warn!(%gateway_id, reason, count, "records dropped from a batch");
        }
    }
    Ok(Ready::Commit { batch, dropped, started, permit })
}

/// Most records committed in one transaction when several decoded batches are waiting.
const MAX_GROUP_RECORDS: usize = 50_000;

/// Commits decoded batches in arrival order, acknowledging each after its commit. Batches that are already waiting
/// when a commit starts go into the same transaction (the mark moves to the last of them): under a backlog, the
/// transaction's fixed costs (the mark's lock, rollups, latest values, the WAL flush) are paid once for several
/// batches. Stops when the session stops sending, at the first failure (the agent resends what was not
/// acknowledged), or after refusing a batch: nothing behind a refused batch commits, because the mark would pass
/// over it and the agent, told that mark at its next connection, would delete the refused records as stored.
async fn commit_in_order(
    api: IngestionApi,
    gateway_id: Uuid,
    rules: Arc<FarmRules>,
    mut in_order: mpsc::Receiver<Ready>,
    outbound: Outbound,
) -> Result<()> {
    let mut next = in_order.recv().await;
    while let Some(ready) = next.take() {
        let (mut group, dropped, started, permit) = match ready {
            Ready::Commit { batch, dropped, started, permit } => (batch, dropped, started, permit),
            Ready::Refuse(refusal) => {
                let (first, last) = (refusal.first_sequence, refusal.last_sequence);
                send(&outbound, pb::connect_response::Body::BatchReject(refusal)).await?;
                return Err(Error::FailedPrecondition(format!(
                    "batch {first}..={last} was refused; the link ends so that nothing after it commits"
                )));
            }
        };
        let mut ranges = vec![(group.first_sequence, group.last_sequence, dropped)];
        let mut permits = vec![permit];
        while group.readings.len() + group.aggregates.len() < MAX_GROUP_RECORDS {
            match in_order.try_recv() {
                // Same gateway and spool, later numbers: the group commits exactly what the batches one after the
                // other would. Rows keep the receive time of the group's first batch.
                Ok(Ready::Commit { batch, dropped, permit, .. }) if batch.first_sequence > group.last_sequence => {
                    ranges.push((batch.first_sequence, batch.last_sequence, dropped));
                    permits.push(permit);
                    group.last_sequence = batch.last_sequence;
                    group.readings.extend(batch.readings);
                    group.aggregates.extend(batch.aggregates);
                }
                // A refusal goes down after the acknowledgements of the batches before it; a batch that overlaps
                // the group (a resend) is committed on its own, after it, where the mark sorts it out.
                Ok(other) => {
                    next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        group.score_later = api.batches_listed;
        let outcome = api.telemetry.commit_batch(&group, &api.settings.rollup_widths).await?;
        drop(permits);
        // A group is a duplicate as a whole or not at all: a batch resent after a reconnect together with new ones
        // is acknowledged as new (the flag is informational; the mark is what the agent relies on).
        let duplicate = outcome == BatchOutcome::Duplicate;
        if let BatchOutcome::Committed { readings, aggregates, above } = outcome {
            // Only what this commit wrote is new: in a group that overlapped the mark (a resend after a reconnect
            // racing the old stream's commit) the records at or below it were committed, evaluated and announced
            // by the other stream.
            group.readings.retain(|reading| reading.sequence > above);
            group.aggregates.retain(|aggregate| aggregate.sequence > above);
            metrics::counter!("smartfarm_ingest_batches_total", "outcome" => "committed")
                .increment(ranges.len() as u64);
            metrics::counter!("smartfarm_ingest_readings_total").increment(readings as u64);
            metrics::counter!("smartfarm_ingest_aggregates_total").increment(aggregates as u64);
            let mut seen: Vec<Uuid> = group.readings.iter().map(|r| r.device_id).collect();
            seen.extend(group.aggregates.iter().map(|a| a.device_id));
            seen.sort();
            seen.dedup();
            // The batches are committed: a failure here must not hold back their acknowledgements (the agent would
            // resend them, only to be told they are duplicates).
            if !seen.is_empty()
                && let Err(error) = api.registry.record_devices_seen(&seen, group.receive_time).await
            {
                tracing::warn!(%gateway_id, %error, "cannot record when the batch's devices were last seen");
            }
        } else {
            metrics::counter!("smartfarm_ingest_batches_total", "outcome" => "duplicate")
                .increment(ranges.len() as u64);
        }
        metrics::histogram!("smartfarm_ingest_batch_seconds").record(started.elapsed().as_secs_f64());
        let acknowledged = async {
            for (first, last, dropped) in ranges {
                tracing::debug!(%gateway_id, first, last, duplicate, "batch acknowledged");
                // A duplicate wrote nothing, so it reports nothing. Best effort: a duplicate whose first
                // acknowledgement was lost with its link leaves its drops counted only here, and a group that
                // overlapped the mark may report the drops of records committed before.
                let dropped = if duplicate { Vec::new() } else { dropped.to_proto() };
                let ack = pb::BatchAck { last_sequence: last, duplicate, dropped };
                send(&outbound, pb::connect_response::Body::BatchAck(ack)).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        // After the acknowledgements, which do not wait for it, and whether or not they could go: the batches are
        // committed, and a resend would be a duplicate, never evaluated or announced. The rules see new readings
        // once, in sequence order, and the readings are announced with their series for scoring. Off the async
        // workers: sorting and evaluating tens of thousands of readings must not hold up the agent's alerts.
        if !duplicate {
            // As the store listed it: only a commit that wrote readings is scored.
            let listed = (group.score_later && !group.readings.is_empty()).then_some(BatchKey {
                gateway_id: group.gateway_id,
                spool_id: group.spool_id,
                last_sequence: group.last_sequence,
            });
            let (rules, readings, farm_id) = (rules.clone(), group.readings, group.farm_id);
            let series = tokio::task::spawn_blocking(move || {
                urgent::evaluate_committed(&rules, &readings);
                series_spans(&readings)
            })
            .await
            .map_err(|error| Error::internal("evaluate the rules on a batch", error))?;
            if let Some(bus) = &api.bus {
                let committed = ReadingsCommitted {
                    farm_id,
                    series,
                    scored_where_committed: api.scoring_here,
                    handed_out: !api.scoring_here,
                    published_here: true,
                    batch: listed,
                };
                // Without the inference role here, the batch is handed to one of the replicas that run it. The
                // announcement goes to all: what they kept of these series no longer ends where the series do.
                if committed.handed_out {
                    metrics::counter!("smartfarm_ingest_batches_handed_out_total").increment(1);
                    bus.hand_out(Job::Score(committed.clone()));
                }
                bus.publish(Event::ReadingsCommitted(committed));
            }
        }
        acknowledged?;
        if next.is_none() {
            next = in_order.recv().await;
        }
    }
    Ok(())
}

/// Each device's metric in `readings`, with the first and last measurement time as stored (microseconds: agents
/// stamp nanoseconds, and a span finer than the rows would miss its own first reading), and its readings for the
/// subscribers in this process: in time order, one per instant (the lowest sequence number's, as a read of the
/// table would keep).
fn series_spans(readings: &[smartfarm_store::telemetry::ReadingRow]) -> Vec<SeriesSpan> {
    // (measurement time as stored, sequence number, value) per device's metric.
    type Rows = Vec<(SystemTime, u64, f64)>;
    let mut series: std::collections::BTreeMap<(Uuid, &str), Rows> = std::collections::BTreeMap::new();
    for reading in readings {
        series.entry((reading.device_id, reading.metric.as_str())).or_default().push((
            stored_precision(reading.measure_time),
            reading.sequence,
            reading.value,
        ));
    }
    series
        .into_iter()
        .map(|((device_id, metric), mut rows)| {
            rows.sort_unstable_by_key(|&(time, sequence, _)| (time, sequence));
            rows.dedup_by_key(|&mut (time, _, _)| time);
            SeriesSpan {
                device_id,
                metric: metric.to_string(),
                first_time: rows[0].0,
                last_time: rows[rows.len() - 1].0,
                readings: Some(SpanReadings(rows.into_iter().map(|(time, _, value)| (time, value)).collect())),
            }
        })
        .collect()
}

fn stored_precision(time: std::time::SystemTime) -> std::time::SystemTime {
    time::from_unix_micros(time::to_unix_micros(time))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use smartfarm_store::telemetry::{EdgeBatch, ReadingRow};

    use super::*;

    /// A batch committed while its agent hangs up (the acknowledgement cannot go) is still announced for scoring:
    /// resent after a reconnect it would be a duplicate, never announced.
    #[tokio::test]
    async fn a_batch_committed_as_the_agent_hangs_up_is_still_announced() {
        let test = smartfarm_store::testing::TestDatabase::sqlite().await;
        let (farm_id, devices) = test.farm_with_devices(&[DeviceKind::Gateway, DeviceKind::Sensor]).await;
        let bus = smartfarm_bus::Bus::in_process();
        let mut announcements = bus.subscribe();
        let api = IngestionApi::new(test.registry(), test.database.telemetry(), Default::default()).with_bus(bus);
        let reading = ReadingRow {
            sequence: 1,
            device_id: devices[1],
            metric: "temperature".into(),
            value: 21.5,
            measure_time: time::now() - Duration::from_secs(60),
        };
        let batch = EdgeBatch {
            gateway_id: devices[0],
            spool_id: Uuid::now_v7(),
            farm_id,
            first_sequence: 1,
            last_sequence: 1,
            readings: vec![reading],
            aggregates: Vec::new(),
            receive_time: time::now(),
            score_later: false,
        };
        let permit = api.commit_permits.clone().acquire_owned().await.unwrap();
        let (ready, in_order) = mpsc::channel(1);
        ready
            .send(Ready::Commit { batch, dropped: batch::Dropped::default(), started: Instant::now(), permit })
            .await
            .unwrap();
        drop(ready);
        let (outbound, hung_up) = mpsc::channel(1);
        drop(hung_up);
        let rules = FarmRules::new(&api, farm_id, outbound.clone());
        let ended = commit_in_order(api.clone(), devices[0], rules, in_order, outbound).await;
        assert!(ended.unwrap_err().to_string().contains("went away"), "the acknowledgement could not go");
        match announcements.try_recv() {
            Ok(Event::ReadingsCommitted(committed)) => {
                assert_eq!(committed.series.len(), 1);
                assert_eq!(committed.series[0].device_id, devices[1]);
            }
            other => panic!("the committed batch was not announced: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_message_the_agent_makes_no_room_for_ends_the_link_in_time() {
        let (outbound, _never_read) = mpsc::channel(1);
        let ack = || pb::connect_response::Body::BatchAck(pb::BatchAck { last_sequence: 1, ..Default::default() });
        send_within(&outbound, ack(), Duration::from_millis(50)).await.expect("room for one");
        let waited =
            tokio::time::timeout(Duration::from_secs(5), send_within(&outbound, ack(), Duration::from_millis(50)));
        let ended = waited.await.expect("the send gave up in time").unwrap_err();
        assert!(ended.to_string().contains("read nothing of its stream"), "{ended}");
    }
}
