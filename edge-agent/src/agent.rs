//! Wires the agent together: spool, registry cache, ingest pipeline, MQTT broker, uplink, metrics, and the tasks
//! that keep them going, until the shutdown signal; then it stops accepting, spools open aggregation windows and
//! syncs the spool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::camera::Cameras;
use crate::commands::{AckOutcome, Arrival, CloudClock, CommandBook};
use crate::config::{EdgeConfig, FsyncMode};
use crate::image_spool::ImageSpool;
use crate::image_uplink::ImageUplink;
use crate::ingest::{Ingestor, LocalAlert, RaisedAlerts};
use crate::mqtt::broker::{self, ALERTS_TOPIC, Broker};
use crate::registry::Registry;
use crate::rules::EdgeRules;
use crate::spool::{FsyncPolicy, Spool};
use crate::uplink::{Alerting, Uplink};
use crate::urgent::UrgentQueue;
use smartfarm_proto::ingestion::v1::connect_request::Body as UrgentBody;

/// Where the agent listens, once it does.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Bound {
    pub mqtt: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

/// Runs the agent until `shutdown` resolves. `addr_file`, when given, receives the bound addresses as JSON once
/// the agent listens (how tests and scripts find ports chosen with port 0).
pub async fn run(
    config: EdgeConfig,
    addr_file: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    // The recorder first, so that every figure from here on is kept.
    let metrics_handle = (!config.metrics_listen.is_empty()).then(smartfarm_core::observability::init_metrics);
    let (spool, recovery) = Spool::open(config.spool()).context("cannot open the spool")?;
    let spool = Arc::new(spool);
    tracing::info!(
        dir = %config.spool_dir.display(), spool_id = %spool.id(), segments = recovery.segments,
        pending = recovery.pending_records, truncated_bytes = recovery.truncated_bytes, "spool open"
    );
    let registry = Arc::new(Registry::load(&config.spool_dir));
    metrics::gauge!("smartfarm_edge_registry_devices").set(registry.len() as f64);
    if registry.is_empty() {
        tracing::warn!("no registry cached yet: sensors are refused until the cloud sends the farm's devices");
    }

    let rules = Arc::new(EdgeRules::load(&config.spool_dir));
    rules.set_devices(&registry.sensors());
    metrics::gauge!("smartfarm_edge_rules").set(rules.len() as f64);
    let urgent = Arc::new(UrgentQueue::default());
    // The urgent lane lives in memory: what it may have held before a restart goes up again.
    for alert in rules.alerts_to_resend() {
        urgent.push(UrgentBody::Alert(alert.to_proto()));
    }
    let book = Arc::new(CommandBook::load(&config.spool_dir).context("cannot open the command book")?);

    let (alerts, mut alert_events) = mpsc::unbounded_channel::<LocalAlert>();
    let ingestor =
        Ingestor::new(spool.clone(), alerts.clone(), config.upload, config.aggregation_window, config.max_future_skew)
            .with_rules(rules.clone(), RaisedAlerts { urgent: urgent.clone(), alerts: alerts.clone() });
    let broker = Broker::new(
        registry.clone(),
        ingestor.clone(),
        config.allow_anonymous,
        Some(config.spool_dir.join("mqtt-sessions.json")),
    );

    let mqtt_listener = TcpListener::bind(config.mqtt_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.mqtt_listen))?;
    let metrics_listener = match config.metrics_listen.as_str() {
        "" => None,
        address => Some(TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))?),
    };
    let bound = Bound {
        mqtt: mqtt_listener.local_addr()?,
        metrics: metrics_listener.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    if let Some(path) = &addr_file {
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, serde_json::to_vec(&bound)?)?;
        std::fs::rename(&temp, path)?;
    }
    tracing::info!(mqtt = %bound.mqtt, metrics = ?bound.metrics, cloud = %config.cloud, "smartfarm-edge running");

    let (stop, stopping) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    let mut broker_stop = stopping.clone();
    tasks.spawn(broker::serve(broker.clone(), mqtt_listener, async move {
        let _ = broker_stop.wait_for(|stop| *stop).await;
    }));
    if let Some(listener) = metrics_listener {
        let mut metrics_stop = stopping.clone();
        let handle = metrics_handle.clone().expect("a metrics listener implies a recorder");
        let app =
            axum::Router::new().route("/metrics", axum::routing::get(move || std::future::ready(handle.render())));
        tasks.spawn(async move {
            let shutdown = async move {
                let _ = metrics_stop.wait_for(|stop| *stop).await;
            };
            if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::error!(%error, "metrics endpoint failed");
            }
        });
    }
    // Diagnosis on the farm (agents built with `ai`): photos to the model, the cloud's model updates to its keeper.
    let (command_sender, commands) = mpsc::unbounded_channel();
    let (ack_sender, acks) = mpsc::unbounded_channel();
    broker.route_command_acks(ack_sender);
    let clock = Arc::new(CloudClock::default());
    tasks.spawn(run_commands(
        CommandParts {
            book: book.clone(),
            broker: broker.clone(),
            registry: registry.clone(),
            urgent: urgent.clone(),
            clock: clock.clone(),
        },
        commands,
        acks,
        stopping.clone(),
    ));
    #[allow(unused_mut, reason = "only agents built with the ai feature diagnose")]
    let mut uplink =
        Uplink::new(config.clone(), spool.clone(), registry.clone(), alerts.clone()).with_alerting(Alerting {
            rules: rules.clone(),
            urgent: urgent.clone(),
            book: book.clone(),
            commands: command_sender,
            clock: clock.clone(),
        });
    #[allow(unused_mut, reason = "only agents built with the ai feature diagnose")]
    let mut diagnosis = None;
    #[cfg(feature = "ai")]
    if config.diagnose_photos {
        let raised = RaisedAlerts { urgent: urgent.clone(), alerts: alerts.clone() };
        let diagnoser = crate::diagnose::Diagnoser::load(&config, alerts.clone(), (rules.clone(), raised))?;
        let (photos, photo_queue) = mpsc::channel(16);
        let (updates, update_queue) = mpsc::channel(4);
        tasks.spawn(diagnoser.clone().run(photo_queue, stopping.clone()));
        tasks.spawn(diagnoser.follow_updates(update_queue, stopping.clone()));
        uplink = uplink.with_model_updates(updates);
        diagnosis = Some(photos);
    }
    #[cfg(not(feature = "ai"))]
    if config.diagnose_photos && !config.cameras.is_empty() {
        tracing::info!("this agent was built without the ai feature: photos are diagnosed in the cloud only");
    }
    tasks.spawn(uplink.run(stopping.clone()));

    // Cameras: each source spools photos into the image area, and the image uplink sends them.
    let image_spool = Arc::new(
        ImageSpool::open(&config.spool_dir, config.image_spool_max_bytes, config.fsync != FsyncMode::Never)
            .context("cannot open the image spool")?,
    );
    let mut cameras = Cameras::new(&config, image_spool.clone(), alerts.clone());
    cameras.diagnosis = diagnosis;
    for camera in config.cameras.clone() {
        tracing::info!(device_id = %camera.device_id, source = %camera.describe(), "camera configured");
        tasks.spawn(cameras.clone().run(camera, config.camera_poll_interval, stopping.clone()));
    }
    tasks.spawn(
        ImageUplink::new(config.clone(), image_spool, cameras.photo_spooled.clone(), alerts.clone())
            .run(stopping.clone()),
    );

    // Local alerts go to the farm's alert topic at once, link or no link (rule alerts went up the urgent lane as
    // they were raised).
    let alert_broker = broker.clone();
    let alert_rules = rules.clone();
    let mut alerts_stop = stopping.clone();
    tasks.spawn(async move {
        // What the topic last said of each alert, so the cloud's copy of an alert raised here is not said twice.
        let mut announced: HashMap<String, (i32, u64)> = HashMap::new();
        loop {
            let alert = tokio::select! {
                alert = alert_events.recv() => match alert {
                    Some(alert) => alert,
                    None => return,
                },
                _ = alerts_stop.wait_for(|stop| *stop) => return,
            };
            let message = match &alert {
                // Already up the urgent lane (see `RaisedAlerts`).
                LocalAlert::Rule(raised) => {
                    let wire = raised.to_proto();
                    if !newly_announced(&mut announced, &wire) {
                        continue;
                    }
                    rule_alert_message(&wire)
                }
                LocalAlert::FromCloud(wire) => {
                    // A resolution by hand (of an alert either side raised first) ends the alert for this
                    // evaluator too.
                    if wire.resolved_by_hand
                        && wire.state == smartfarm_proto::alert::v1::AlertState::Resolved as i32
                        && let Ok(farm_id) = uuid::Uuid::try_parse(&wire.farm_id)
                        && let Ok(resolved) = smartfarm_core::rules::Alert::from_edge(wire, farm_id)
                    {
                        alert_rules.resolved_by_hand(&resolved);
                    }
                    if !newly_announced(&mut announced, wire) {
                        continue;
                    }
                    rule_alert_message(wire)
                }
                LocalAlert::SpoolOverflow { dropped_records } => serde_json::json!({
                    "kind": "spool_overflow", "severity": "SEVERITY_CRITICAL", "dropped_records": dropped_records,
                    "message": format!("the spool reached its size cap and dropped {dropped_records} unsent records"),
                }),
                LocalAlert::SpoolFailed { reason } => serde_json::json!({
                    "kind": "spool_failed", "severity": "SEVERITY_CRITICAL",
                    "message": format!("{reason}; restart the agent (and check its disk)"),
                }),
                LocalAlert::BatchRefused { first_sequence, last_sequence, reason } => serde_json::json!({
                    "kind": "batch_refused", "severity": "SEVERITY_CRITICAL", "first_sequence": first_sequence,
                    "last_sequence": last_sequence, "message": format!("the cloud refused a batch: {reason}"),
                }),
                LocalAlert::DroppedByCloud { last_sequence, dropped } => dropped_by_cloud_message(*last_sequence, dropped),
                LocalAlert::ImageSpoolOverflow { dropped_photos, bytes } => serde_json::json!({
                    "kind": "image_spool_overflow", "severity": "SEVERITY_CRITICAL", "dropped_photos": dropped_photos,
                    "dropped_bytes": bytes,
                    "message": format!("the image spool reached its size cap and dropped {dropped_photos} unsent photos"),
                }),
                LocalAlert::ImageRefused { file, reason } => serde_json::json!({
                    "kind": "image_refused", "severity": "SEVERITY_WARNING", "file": file,
                    "message": format!("the cloud refused a photo ({reason}); it was set aside in {file}"),
                }),
                LocalAlert::DiseaseDetected { camera, label, confidence, model } => serde_json::json!({
                    "kind": "disease_detected", "severity": "SEVERITY_CRITICAL", "device_id": camera.to_string(),
                    "label": label, "confidence": confidence, "model": model,
                    "message": format!("{label} on a photo of camera {camera} ({:.0}% sure, model {model})", confidence * 100.0),
                }),
            };
            alert_broker.publish(ALERTS_TOPIC, Bytes::from(message.to_string()));
        }
    });

    // Housekeeping every second: close aggregation windows, fsync under the interval policy, publish spool figures,
    // raise device-silent alerts.
    let housekeeping_rules = rules.clone();
    let housekeeping_raised = RaisedAlerts { urgent: urgent.clone(), alerts: alerts.clone() };
    let housekeeping_alerts = alerts.clone();
    let housekeeping_spool = spool.clone();
    let housekeeping_broker = broker.clone();
    let housekeeping_ingestor = ingestor.clone();
    let fsync = config.spool().fsync;
    let mut housekeeping_stop = stopping.clone();
    tasks.spawn(async move {
        let period = match fsync {
            FsyncPolicy::Interval(interval) => interval.min(Duration::from_secs(1)),
            _ => Duration::from_secs(1),
        };
        let mut ticks = tokio::time::interval(period);
        let mut spool_failure_announced = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = housekeeping_stop.wait_for(|stop| *stop) => return,
            }
            // Said once on the farm's alert topic: the spool refuses readings until someone restarts the agent.
            if !spool_failure_announced && let Some(reason) = housekeeping_spool.failure() {
                spool_failure_announced = true;
                let _ = housekeeping_alerts.send(LocalAlert::SpoolFailed { reason });
            }
            for alert in housekeeping_rules.on_tick(SystemTime::now()) {
                housekeeping_raised.raise(alert);
            }
            if let Err(error) = housekeeping_rules.save_state() {
                tracing::error!(%error, "cannot write the rules' state");
            }
            if let Err(error) = housekeeping_broker.save_sessions() {
                tracing::error!(%error, "cannot save the MQTT sessions");
            }
            if let Err(error) = housekeeping_ingestor.flush_windows(Some(SystemTime::now())).await {
                tracing::error!(%error, "cannot spool closed aggregation windows");
            }
            if matches!(fsync, FsyncPolicy::Interval(_)) {
                // Off the async workers, which serve the sensors: the fsync takes the disk's time, and waits for
                // the uplink's when that one is in flight (syncs take turns).
                let spool = housekeeping_spool.clone();
                match tokio::task::spawn_blocking(move || spool.sync()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::error!(%error, "spool fsync failed"),
                    Err(error) => tracing::error!(%error, "the spool fsync task failed"),
                }
            }
            let stats = housekeeping_spool.stats();
            metrics::gauge!("smartfarm_edge_spool_bytes").set(stats.bytes as f64);
            metrics::gauge!("smartfarm_edge_spool_pending_records").set(stats.pending_records as f64);
            let age = stats.oldest_pending_since.and_then(|since| SystemTime::now().duration_since(since).ok());
            metrics::gauge!("smartfarm_edge_spool_oldest_pending_seconds")
                .set(age.map(|a| a.as_secs_f64()).unwrap_or(0.0));
        }
    });

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    if let Err(error) = rules.save_state() {
        tracing::error!(%error, "cannot write the rules' state at shutdown");
    }
    if let Err(error) = ingestor.flush_windows(None).await {
        tracing::error!(%error, "cannot spool open aggregation windows at shutdown");
    }
    spool.sync().context("cannot fsync the spool at shutdown")?;
    broker.save_sessions().context("cannot save the MQTT sessions at shutdown")?;
    tracing::info!(pending = spool.stats().pending_records, "smartfarm-edge stopped");
    Ok(())
}

/// Whether the alert topic has not yet said this much of the alert (its state and count): the cloud's copy of an
/// alert raised here, or a change that arrives after a later one (the cloud's "opened" after the farm's
/// "resolved"), is not said again. Remembers what it now has said.
fn newly_announced(announced: &mut HashMap<String, (i32, u64)>, alert: &smartfarm_proto::alert::v1::Alert) -> bool {
    let known = announced.get(&alert.id).copied();
    if known.is_some_and(|(state, count)| state >= alert.state && count >= alert.count) {
        return false;
    }
    if announced.len() >= 10_000 {
        // A bound on memory: forgetting only risks saying an alert's state twice.
        announced.clear();
    }
    let (state, count) = known.unwrap_or_default();
    announced.insert(alert.id.clone(), (state.max(alert.state), count.max(alert.count)));
    true
}

/// A rule's alert on the farm's alert topic: the alert as the contract's JSON, with `"kind": "alert"`.
fn rule_alert_message(alert: &smartfarm_proto::alert::v1::Alert) -> serde_json::Value {
    let mut message = serde_json::to_value(alert).unwrap_or_default();
    message["kind"] = serde_json::Value::from("alert");
    message
}

/// Records the cloud committed a batch without, on the farm's alert topic: how many for each reason, and what to
/// check where the reason says a clock is wrong (the agent takes times up to `max_future_skew` ahead of its own
/// clock, the cloud up to a day ahead of its own).
fn dropped_by_cloud_message(last_sequence: u64, dropped: &[(String, u64)]) -> serde_json::Value {
    let total: u64 = dropped.iter().map(|(_, count)| count).sum();
    let reasons: Vec<String> = dropped.iter().map(|(reason, count)| format!("{count} {reason}")).collect();
    let hint = if dropped.iter().any(|(reason, _)| reason == "bad_time") {
        "; bad_time is a time before 2000 or more than a day ahead of the cloud's clock: check the clocks of the \
         sensors and of this gateway"
    } else {
        ""
    };
    let by_reason: serde_json::Map<String, serde_json::Value> =
        dropped.iter().map(|(reason, count)| (reason.clone(), serde_json::Value::from(*count))).collect();
    serde_json::json!({
        "kind": "records_dropped", "severity": "SEVERITY_WARNING", "last_sequence": last_sequence,
        "dropped": by_reason,
        "message": format!(
            "the cloud did not store {total} records of the batches up to sequence {last_sequence} ({}){hint}",
            reasons.join(", ")
        ),
    })
}

/// What the command task works with.
struct CommandParts {
    book: Arc<CommandBook>,
    broker: Arc<Broker>,
    registry: Arc<Registry>,
    urgent: Arc<UrgentQueue>,
    /// Commands expire by the cloud's clock.
    clock: Arc<CloudClock>,
}

/// Commands from the cloud to the devices' topics (through the command book, which makes them run at most once),
/// the devices' acknowledgements to receipts on the urgent lane, and held commands released once a second.
/// A command that reached nobody when published goes back on hold (see `CommandBook::not_delivered`).
fn held_again(book: &CommandBook, id: &str) {
    metrics::counter!("smartfarm_edge_commands_total", "outcome" => "reached_nobody").increment(1);
    tracing::info!(command_id = %id, "a command reached nobody; held until its device listens");
    if let Ok(id) = uuid::Uuid::try_parse(id) {
        let _ = book.not_delivered(id);
    }
}

async fn run_commands(
    parts: CommandParts,
    mut commands: mpsc::UnboundedReceiver<smartfarm_proto::command::v1::Command>,
    mut acks: mpsc::UnboundedReceiver<crate::mqtt::broker::CommandAck>,
    mut stopping: watch::Receiver<bool>,
) {
    let CommandParts { book, broker, registry, urgent, clock } = parts;
    let mut release = tokio::time::interval(Duration::from_secs(1));
    let receipt = |receipt| urgent.push(UrgentBody::CommandReceipt(receipt));
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                let arrival = book.arrive(
                    &command,
                    clock.now(),
                    |device| registry.contains(&device),
                    |topic| broker.has_subscribers(topic),
                );
                match arrival {
                    Ok(Some(Arrival::Publish { topic, payload, receipt: delivered })) => {
                        if broker.publish(&topic, payload) == 0 {
                            held_again(&book, &command.id);
                        } else {
                            metrics::counter!("smartfarm_edge_commands_total", "outcome" => "published").increment(1);
                            tracing::info!(command_id = %command.id, %topic, "command published to its device");
                        }
                        receipt(delivered);
                    }
                    Ok(Some(Arrival::Held { receipt: delivered })) => {
                        tracing::info!(command_id = %command.id, "command held until its device subscribes");
                        receipt(delivered);
                    }
                    Ok(Some(Arrival::Answer { receipt: answer })) => {
                        metrics::counter!("smartfarm_edge_commands_total", "outcome" => "answered_from_book").increment(1);
                        receipt(answer)
                    }
                    Ok(None) => {}
                    Err(error) => {
                        // Without the book on disk the command could run twice after a crash: it does not run.
                        tracing::error!(command_id = %command.id, %error, "cannot record a command; refusing it");
                        receipt(smartfarm_proto::command::v1::CommandReceipt {
                            command_id: command.id.clone(),
                            status: smartfarm_proto::command::v1::CommandStatus::Failed as i32,
                            detail: format!("the agent cannot record the command: {error}"),
                            change_time: Some(smartfarm_core::time::to_timestamp(clock.now())),
                        });
                    }
                }
            }
            ack = acks.recv() => {
                let Some(crate::mqtt::broker::CommandAck { device, payload, recorded }) = ack else { return };
                let outcome = book.acknowledge(device, &payload, clock.now());
                let _ = recorded.send(outcome.is_ok());
                match outcome {
                    Ok(AckOutcome::Receipt(answer)) => receipt(answer),
                    Ok(AckOutcome::Refused(reason)) => {
                        tracing::warn!(%device, %reason, "command acknowledgement refused");
                        broker.tell_device(device, &format!("smartfarm/{device}/commands/ack"), "bad_ack", &reason);
                    }
                    Err(error) => tracing::error!(%device, %error, "cannot record a command acknowledgement"),
                }
            }
            // Held commands wait for the cloud's time after a restart: the Pi's own may be far behind.
            _ = release.tick() => match clock.known().map(|now| book.release(now, |topic| broker.has_subscribers(topic))) {
                None => {}
                Some(Ok((out, receipts))) => {
                    for (id, topic, payload) in out {
                        if broker.publish(&topic, payload) == 0 {
                            held_again(&book, &id.to_string());
                        }
                    }
                    receipts.into_iter().for_each(receipt);
                }
                Some(Err(error)) => tracing::error!(%error, "cannot release held commands"),
            },
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}
