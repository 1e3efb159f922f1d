//! The alerts and commands benchmarks.
//!
//! - `alerts`: MQTT publish of a reading that crosses a rule's threshold (and of the one that clears it) at the
//!   agent → (a) the alert's message on the farm's `smartfarm/alerts` topic and (b) the alert event on a cloud
//!   `AlertService.Subscribe` stream, p50/p99 over every event, while other sensors publish at half the ingest
//!   maximum measured at the start of the same run (end to end: until the cloud has committed the readings). The
//!   baseline, in the same run and through the same broker, is the agent's plainest publish → subscribe loop: a
//!   publish the agent refuses and answers on the device's errors topic (parsing, no rules, no spool).
//! - `commands`: `SendCommand` → the device's command topic → its acknowledgement → `WatchCommand` reporting
//!   `ACKED`, p50/p99, with everything on one process and with the command sent and watched on replica A while the
//!   agent is connected to replica B (PostgreSQL and NATS JetStream between them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use smartfarm_e2e::alerting::AlertClient;
use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet, eventually};
use smartfarm_e2e::{Backend, Cloud, CloudData, CloudOptions, bootstrap_admin_key};
use smartfarm_edge::sim::SensorCredentials;
use smartfarm_proto::alert::v1 as alert;
use smartfarm_proto::command::v1 as command;

use crate::{emit, load, machine, percentile};

/// When each probe's trigger was published, by (device, the value that opened the alert, whether it is the
/// resolution): the alert's value identifies its events.
type Sent = Arc<Mutex<HashMap<(String, i64, bool), Instant>>>;

async fn create_rule(alerts: &mut AlertClient, farm_id: &str) -> anyhow::Result<()> {
    alerts
        .create_rule(alert::CreateRuleRequest {
            rule: Some(alert::Rule {
                farm_id: farm_id.into(),
                name: "too hot".into(),
                severity: smartfarm_proto::common::v1::Severity::Critical as i32,
                metric: "temperature".into(),
                condition: Some(alert::rule::Condition::Threshold(alert::ThresholdCondition {
                    direction: alert::ThresholdDirection::Above as i32,
                    limit: 40.0,
                    for_duration: None,
                })),
                ..Default::default()
            }),
        })
        .await?;
    Ok(())
}

/// An MQTT client of a device, subscribed to `topics`; its incoming publishes arrive on the receiver.
async fn device_client(
    port: u16,
    device: &SensorCredentials,
    topics: &[String],
) -> anyhow::Result<(AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>)> {
    let mut options = MqttOptions::new(format!("probe-{}", device.device_id), "127.0.0.1", port);
    options.set_credentials(device.device_id.clone(), device.credential.clone());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    // As a device that waits for answers should: without it, a small write after another waits for the agent's
    // delayed TCP acknowledgement (40 ms) before it leaves.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    for topic in topics {
        client.subscribe(topic.clone(), QoS::AtLeastOnce).await?;
    }
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(publish)) = event
                && sender.send((publish.topic.clone(), publish.payload.to_vec())).is_err()
            {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok((client, receiver))
}

/// What one probe measured (microseconds).
#[derive(Default)]
struct ProbeFigures {
    local: Vec<u64>,
    baseline: Vec<u64>,
}

/// One probe: `rounds` times, a hot reading (an alert opens), a cool one (it resolves), a refused publish (the
/// baseline loop), each waited for on the farm's topics; paced to `period` per round.
async fn probe(
    port: u16,
    device: SensorCredentials,
    rounds: u64,
    period: Duration,
    sent: Sent,
    first_value: i64,
    phase: f64,
) -> anyhow::Result<ProbeFigures> {
    let errors = format!("smartfarm/{}/errors", device.device_id);
    let (client, mut incoming) = device_client(port, &device, &["smartfarm/alerts".into(), errors.clone()]).await?;
    let telemetry = format!("smartfarm/{}/telemetry", device.device_id);
    let mut figures = ProbeFigures::default();
    // Probes take turns (each starts a share of the period after the previous): events arrive spread over time,
    // not in bursts of one per probe.
    tokio::time::sleep(period.mul_f64(phase)).await;
    let mut ticks = tokio::time::interval(period);
    for round in 0..rounds {
        ticks.tick().await;
        // Hot (opens), then cool (resolves): each a distinct value, so each event is known by its value.
        let hot = first_value + round as i64;
        for (reading, resolves, state) in [(hot, false, "ALERT_STATE_OPEN"), (-hot, true, "ALERT_STATE_RESOLVED")] {
            let payload = format!(r#"{{"metrics": {{"temperature": {reading}}}}}"#);
            let started = Instant::now();
            sent.lock().unwrap().insert((device.device_id.clone(), hot, resolves), started);
            client.publish(telemetry.clone(), QoS::AtLeastOnce, false, payload).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let Ok(Some((topic, message))) = tokio::time::timeout_at(deadline, incoming.recv()).await else {
                    anyhow::bail!("no alert on the farm's topic within 10 s (reading {reading})");
                };
                if topic != "smartfarm/alerts" {
                    continue;
                }
                let message: serde_json::Value = serde_json::from_slice(&message).unwrap_or_default();
                if message["deviceId"] == device.device_id.as_str() && message["state"] == state {
                    figures.local.push(started.elapsed().as_micros() as u64);
                    break;
                }
            }
        }
        // The baseline: a publish the agent refuses, answered on the device's errors topic.
        let started = Instant::now();
        client.publish(telemetry.clone(), QoS::AtLeastOnce, false, r#"{"metrics": "none"}"#).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let Ok(Some((topic, _))) = tokio::time::timeout_at(deadline, incoming.recv()).await else {
                anyhow::bail!("no answer on the errors topic within 10 s");
            };
            if topic == errors {
                figures.baseline.push(started.elapsed().as_micros() as u64);
                break;
            }
        }
    }
    Ok(figures)
}

/// Which maximum the background load is a share of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Maximum {
    /// Sensor to database: the messages of a burst divided by the time until the cloud has committed the last of
    /// them (the agent, its uploads, the cloud and PostgreSQL all done).
    EndToEnd,
    /// What the agent accepts (spooled and acknowledged) during the burst; its uploads and the cloud's commits,
    /// which follow on the same cores, are left out.
    Agent,
}

/// How much background load runs while the probes are timed.
#[derive(Clone, Copy, Debug)]
pub enum Background {
    /// This share of the measured maximum (the goal is stated at half).
    ShareOfMaximum(f64),
    /// This many messages a second, whatever the maximum.
    Rate(f64),
}

pub async fn alerts(
    probes: usize,
    events: u64,
    publishers: usize,
    rounds_per_second: f64,
    load_kind: Background,
    load_nice: i32,
    maximum_kind: Maximum,
) -> anyhow::Result<()> {
    let dirty_kib_written_back = crate::settle_page_cache();
    let data = CloudData::new(Backend::Postgres).await;
    // SMARTFARM_BENCH_CLOUD_CONFIG: a config file for the cloud (its defaults otherwise), to see what a setting costs.
    let cloud_config = std::env::var("SMARTFARM_BENCH_CLOUD_CONFIG").ok();
    let cloud = Cloud::start(&data, CloudOptions { config: cloud_config, ..CloudOptions::default() }).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "alert bench", probes + publishers).await;
    let mut alerts = cloud.alert_client(&key).await;
    create_rule(&mut alerts, &fleet.farm_id).await?;
    // SMARTFARM_BENCH_EDGE_CONFIG replaces the agent's settings (e.g. a huge upload_threshold_bytes, so no upload
    // happens while the probes run).
    let config = std::env::var("SMARTFARM_BENCH_EDGE_CONFIG")
        .unwrap_or_else(|_| "upload_interval = \"1h\"\nupload = \"raw\"\n".to_string());
    let edge_options = EdgeOptions { config, ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool")) };
    let edge = Edge::start(&edge_options).await;
    edge.wait_for_registry(probes + publishers + 1).await;
    anyhow::ensure!(
        eventually(Duration::from_secs(30), || async { edge.metric("smartfarm_edge_rules").await >= 1.0 }).await,
        "the rule did not reach the agent"
    );
    let (probe_sensors, background) = fleet.sensors.split_at(probes);

    // The ingest maximum with this many publishers, then a share of it in the background. A burst of a million
    // messages as fast as the agent takes them; the agent's maximum is what it acknowledged per second, the
    // end-to-end maximum is the burst divided by the time until the cloud has committed all of it (on these two
    // cores the uploads, the cloud and PostgreSQL share the CPU with the agent).
    let generator = load_generator(load_nice)?;
    let sensors = background.to_vec();
    let burst = 1_000_000 / background.len() as u64;
    let committed_before = committed_readings(&cloud).await;
    let port = edge.mqtt.port();
    let started = Instant::now();
    let (acked, accept_seconds, _) =
        generator.spawn(async move { load(("127.0.0.1".into(), port), &sensors, burst, None, true).await }).await?;
    let agent_maximum = acked as f64 / accept_seconds;
    let (edge, end_to_end_seconds) =
        until_committed(&cloud, edge, &edge_options, committed_before + acked as f64, started, accept_seconds).await?;
    edge.wait_for_registry(probes + publishers + 1).await;
    anyhow::ensure!(
        eventually(Duration::from_secs(30), || async { edge.metric("smartfarm_edge_rules").await >= 1.0 }).await,
        "the rule did not reach the restarted agent"
    );
    let end_to_end_maximum = acked as f64 / end_to_end_seconds;
    let maximum = match maximum_kind {
        Maximum::EndToEnd => end_to_end_maximum,
        Maximum::Agent => agent_maximum,
    };
    let port = edge.mqtt.port();
    let (half, background_share) = match load_kind {
        Background::ShareOfMaximum(share) => (maximum * share, share),
        Background::Rate(rate) => (rate, rate / maximum),
    };
    let rounds = events.div_ceil(2 * probes as u64);
    let duration = rounds as f64 * probes as f64 / rounds_per_second + 30.0;
    let per_publisher = (half * duration / background.len() as f64) as u64;
    let background_sensors = background.to_vec();
    let background_load = (half > 0.0).then(|| {
        generator.spawn(async move {
            load(("127.0.0.1".into(), port), &background_sensors, per_publisher, Some(half), true).await
        })
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The cloud's stream: each event's latency from the publish that caused it.
    let sent: Sent = Arc::default();
    let cloud_latencies = Arc::new(Mutex::new(Vec::new()));
    let mut stream = alerts
        .subscribe(alert::SubscribeRequest { farm_id: fleet.farm_id.clone(), ..Default::default() })
        .await?
        .into_inner();
    // SMARTFARM_BENCH_TRACE: a file to write each cloud event's arrival (Unix seconds) and latency (ms) to, one
    // line each, to line the tail up with what else the machine was doing at the time.
    let trace_path = std::env::var_os("SMARTFARM_BENCH_TRACE");
    let trace = trace_path.as_ref().map(|_| Arc::new(Mutex::new(Vec::<(SystemTime, Duration)>::new())));
    let stream_task = {
        let (sent, cloud_latencies, trace) = (sent.clone(), cloud_latencies.clone(), trace.clone());
        tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                let arrived = Instant::now();
                let Some(alert) = event.alert else { continue };
                let Some(value) = alert.value else { continue };
                let resolves = event.event_type == alert::AlertEventType::Resolved as i32;
                let key = (alert.device_id.clone(), value as i64, resolves);
                if let Some(started) = sent.lock().unwrap().remove(&key) {
                    cloud_latencies.lock().unwrap().push(arrived.duration_since(started).as_micros() as u64);
                    if let Some(trace) = trace.as_ref() {
                        trace.lock().unwrap().push((SystemTime::now(), arrived.duration_since(started)));
                    }
                }
            }
        })
    };

    let period = Duration::from_secs_f64(probes as f64 / rounds_per_second);
    let accepted_before = edge.metric("smartfarm_edge_readings_accepted_total").await;
    let cpu_busy_before = cpu_times();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, device) in probe_sensors.iter().enumerate() {
        let first_value = 1_000 + index as i64 * 1_000_000;
        let phase = index as f64 / probes as f64;
        tasks.spawn(probe(port, device.clone(), rounds, period, sent.clone(), first_value, phase));
    }
    let mut local = Vec::new();
    let mut baseline = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let figures = result??;
        local.extend(figures.local);
        baseline.extend(figures.baseline);
    }
    let probing_seconds = started.elapsed().as_secs_f64();
    let cpu_busy_while_probing = cpu_busy_before.zip(cpu_times()).map(|(before, after)| busy_share(before, after));
    let accepted = edge.metric("smartfarm_edge_readings_accepted_total").await - accepted_before;
    let expected = local.len();
    eventually(Duration::from_secs(30), || async { cloud_latencies.lock().unwrap().len() >= expected }).await;
    if let Some(background_load) = background_load {
        background_load.abort();
    }
    stream_task.abort();
    if let (Some(path), Some(trace)) = (trace_path, trace) {
        let lines: String = trace
            .lock()
            .unwrap()
            .iter()
            .map(|(arrived, latency)| {
                let unix = arrived.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
                format!("{unix:.4},{:.3}\n", latency.as_secs_f64() * 1e3)
            })
            .collect();
        std::fs::write(path, lines)?;
    }
    let mut cloud_side = std::mem::take(&mut *cloud_latencies.lock().unwrap());
    local.sort_unstable();
    baseline.sort_unstable();
    cloud_side.sort_unstable();
    let loop_p99 = percentile(&baseline, 0.99);
    // Where the cloud's copy spends its time: waiting on the agent's urgent lane, then from the link to the commit.
    let edge_metrics = smartfarm_e2e::http_get(edge.metrics, "/metrics").await;
    let cloud_metrics = cloud.http_get("/metrics").await;
    let stages = serde_json::json!({
        "agent_urgent_wait": histogram(&edge_metrics, "smartfarm_edge_urgent_wait_seconds"),
        "cloud_record_agent_alerts": histogram(&cloud_metrics, "smartfarm_alerts_record_seconds{origin=\"edge\""),
        "cloud_alert_writes": histogram(&cloud_metrics, "smartfarm_alerts_write_seconds"),
        // The cloud's own copies (from committed batches): those that added nothing were not written.
        "cloud_copies_recorded": counter(&cloud_metrics, "smartfarm_alerts_recorded_total{origin=\"cloud\"}"),
        "cloud_copies_known": counter(&cloud_metrics, "smartfarm_alert_copies_known_total"),
        // Streams read the log instead of forwarding the bus's event when one came out of order.
        "stream_log_reads_gap": counter(&cloud_metrics, "smartfarm_alert_stream_log_reads_total{reason=\"gap\"}"),
        "stream_log_reads_poll": counter(&cloud_metrics, "smartfarm_alert_stream_log_reads_total{reason=\"poll\"}"),
    });
    emit(serde_json::json!({
        "benchmark": "alert_latency", "machine": machine(), "database": "postgresql",
        "dirty_kib_written_back_before": dirty_kib_written_back,
        "ingest_maximum": match maximum_kind { Maximum::EndToEnd => "end-to-end", Maximum::Agent => "agent" },
        "ingest_maximum_messages_per_second": maximum.round(),
        "ingest_maximum_measured_over_messages": acked,
        "agent_maximum_messages_per_second": agent_maximum.round(), "agent_accept_seconds": accept_seconds,
        "end_to_end_maximum_messages_per_second": end_to_end_maximum.round(), "end_to_end_seconds": end_to_end_seconds,
        "background_target_messages_per_second": half.round(),
        "accepted_readings_per_second_while_probing": (accepted / probing_seconds).round(),
        "cpu_busy_share_while_probing": cpu_busy_while_probing,
        "background_publishers": background.len(), "background_share_of_maximum": background_share, "probes": probes, "events": local.len(),
        "events_per_second": (local.len() as f64 / probing_seconds).round(),
        "local_topic_p50_ms": percentile(&local, 0.50), "local_topic_p99_ms": percentile(&local, 0.99),
        "cloud_stream_events": cloud_side.len(),
        "cloud_stream_p50_ms": percentile(&cloud_side, 0.50), "cloud_stream_p99_ms": percentile(&cloud_side, 0.99),
        "baseline_loop_p50_ms": percentile(&baseline, 0.50), "baseline_loop_p99_ms": loop_p99,
        "goal_p99_ms": (2.0 * loop_p99 + 20.0).min(50.0), "load_generator_nice": load_nice, "stages": stages,
    }));
    edge.stop().await;
    cloud.stop().await;
    generator.shutdown_background();
    Ok(())
}

/// Readings the cloud has committed so far (its `smartfarm_ingest_readings_total`).
async fn committed_readings(cloud: &Cloud) -> f64 {
    counter(&cloud.http_get("/metrics").await, "smartfarm_ingest_readings_total")
}

/// Seconds from `started` until the cloud has committed `target` readings in all, and the agent that uploaded them.
/// What is left under the agent's upload threshold waits for its upload interval (an hour here); once the uploads
/// have stopped for 3 s the agent is restarted, which uploads everything at once, and the restart itself is not
/// counted. The uploads cannot have ended before the burst was accepted (`accept_seconds`).
async fn until_committed(
    cloud: &Cloud,
    edge: Edge,
    options: &EdgeOptions,
    target: f64,
    started: Instant,
    accept_seconds: f64,
) -> anyhow::Result<(Edge, f64)> {
    const LIMIT: Duration = Duration::from_secs(600);
    let mut committed = committed_readings(cloud).await;
    let mut last_commit = started.elapsed();
    while committed < target && started.elapsed() - last_commit < Duration::from_secs(3) {
        anyhow::ensure!(
            started.elapsed() < LIMIT,
            "the cloud committed {committed} of {target} readings in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = committed_readings(cloud).await;
        if now > committed {
            (committed, last_commit) = (now, started.elapsed());
        }
    }
    let uploading = last_commit.as_secs_f64().max(accept_seconds);
    if committed >= target {
        return Ok((edge, uploading));
    }
    edge.stop().await;
    let edge = Edge::start(options).await;
    anyhow::ensure!(
        eventually(Duration::from_secs(30), || async { edge.metric("smartfarm_edge_link_up").await >= 1.0 }).await,
        "the restarted agent did not connect to the cloud"
    );
    let reconnected = Instant::now();
    while committed_readings(cloud).await < target {
        anyhow::ensure!(reconnected.elapsed() < LIMIT, "the restarted agent did not upload its spool in 10 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((edge, uploading + reconnected.elapsed().as_secs_f64()))
}

/// The machine's CPU time so far, busy and in all (jiffies, from the first line of `/proc/stat`).
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).filter_map(|field| field.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: idle and iowait are the idle ones.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

/// The share of the machine's CPU time that was busy between two readings of [`cpu_times`].
fn busy_share((busy_before, total_before): (u64, u64), (busy_after, total_after): (u64, u64)) -> f64 {
    let total = total_after.saturating_sub(total_before).max(1);
    ((busy_after.saturating_sub(busy_before)) as f64 / total as f64 * 1000.0).round() / 1000.0
}

/// The runtime the background load runs on: two threads, at `nice` (Linux keeps a niceness per thread; `renice`,
/// from util-linux, sets it).
fn load_generator(nice: i32) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            if nice != 0 {
                // renice takes a thread's id; /proc/thread-self names it ("PID/task/TID").
                let thread = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|link| link.file_name().map(|tid| tid.to_string_lossy().into_owned()));
                let reniced = thread.is_some_and(|tid| {
                    std::process::Command::new("renice")
                        .args(["-n", &nice.to_string(), "-p", &tid])
                        .stdout(std::process::Stdio::null())
                        .status()
                        .is_ok_and(|status| status.success())
                });
                if !reniced {
                    eprintln!("cannot set the load generator's niceness to {nice}");
                }
            }
        })
        .build()?)
}

/// A counter from a `/metrics` page (`series` with its labels exactly as rendered), 0 when absent.
fn counter(page: &str, series: &str) -> f64 {
    page.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// A Prometheus histogram from a `/metrics` page (`series` is its name, with the start of its labels if any): the
/// count, the mean in ms, and the share of observations at or under each bucket bound.
fn histogram(page: &str, series: &str) -> serde_json::Value {
    let (name, labels) = series.split_once('{').map_or((series, ""), |(name, labels)| (name, labels));
    let value = |suffix: &str| -> Vec<(String, f64)> {
        page.lines()
            .filter_map(|line| line.strip_prefix(&format!("{name}{suffix}")))
            .filter(|rest| rest.starts_with('{') && rest.contains(labels) || labels.is_empty() && rest.starts_with(' '))
            .filter_map(|rest| {
                let (head, number) = rest.rsplit_once(' ')?;
                Some((head.to_string(), number.trim().parse().ok()?))
            })
            .collect()
    };
    let count = value("_count").first().map_or(0.0, |(_, count)| *count);
    let sum = value("_sum").first().map_or(0.0, |(_, sum)| *sum);
    let shares: serde_json::Map<String, serde_json::Value> = value("_bucket")
        .into_iter()
        .filter_map(|(head, cumulative)| {
            let bound = head.split("le=\"").nth(1)?.split('"').next()?.to_string();
            Some((bound, serde_json::json!(((cumulative / count.max(1.0)) * 1000.0).round() / 1000.0)))
        })
        .collect();
    serde_json::json!({"count": count, "mean_ms": (sum / count.max(1.0) * 1e3 * 100.0).round() / 100.0, "share_at_or_under_s": shares})
}

/// Sends `count` commands one after the other through `sender`, each acknowledged by the device's client as soon as
/// it arrives, and times each until `WatchCommand` reports it acked.
async fn round_trips(
    commands: &mut smartfarm_e2e::alerting::CommandClient,
    edge: &Edge,
    device: &SensorCredentials,
    count: usize,
) -> anyhow::Result<(Vec<u64>, serde_json::Value)> {
    let topic = format!("smartfarm/{}/commands", device.device_id);
    let (client, mut incoming) = device_client(edge.mqtt.port(), device, std::slice::from_ref(&topic)).await?;
    let ack_topic = format!("{topic}/ack");
    tokio::spawn(async move {
        while let Some((_, payload)) = incoming.recv().await {
            let message: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
            let ack = serde_json::json!({"id": message["id"], "status": "ok"}).to_string();
            if client.publish(ack_topic.clone(), QoS::AtLeastOnce, false, ack).await.is_err() {
                return;
            }
        }
    });
    let mut latencies = Vec::with_capacity(count);
    // Median time between the command's recorded receipts (queued → sent → delivered → acked), to see where a round
    // trip goes.
    let mut stages: [Vec<u64>; 3] = Default::default();
    for _ in 0..count {
        let started = Instant::now();
        let sent = commands
            .send_command(command::SendCommandRequest {
                device_id: device.device_id.clone(),
                name: "open_valve".into(),
                parameters: None,
                ttl: Some(smartfarm_proto::pbjson_types::Duration { seconds: 60, nanos: 0 }),
                request_id: String::new(),
            })
            .await?
            .into_inner()
            .command
            .unwrap();
        let command_id = sent.id.clone();
        let mut watch =
            commands.watch_command(command::WatchCommandRequest { command_id: sent.id }).await?.into_inner();
        loop {
            let change = tokio::time::timeout(Duration::from_secs(10), watch.message())
                .await
                .map_err(|_| anyhow::anyhow!("no acknowledgement within 10 s"))??
                .ok_or_else(|| anyhow::anyhow!("the watch ended before the acknowledgement"))?;
            if change.receipt.is_some_and(|receipt| receipt.status == command::CommandStatus::Acked as i32) {
                latencies.push(started.elapsed().as_micros() as u64);
                break;
            }
        }
        let stored = commands.get_command(command::GetCommandRequest { command_id }).await?.into_inner().command;
        let times: Vec<i64> = stored
            .map(|command| command.history)
            .unwrap_or_default()
            .iter()
            .filter_map(|receipt| {
                receipt.change_time.as_ref().map(|t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000)
            })
            .collect();
        if times.len() == 4 {
            for (stage, pair) in stages.iter_mut().zip(times.windows(2)) {
                stage.push((pair[1] - pair[0]).max(0) as u64);
            }
        }
    }
    latencies.sort_unstable();
    for stage in &mut stages {
        stage.sort_unstable();
    }
    let breakdown = serde_json::json!({
        "queued_to_sent_p50_ms": percentile(&stages[0], 0.5),
        "sent_to_delivered_p50_ms": percentile(&stages[1], 0.5),
        "delivered_to_acked_p50_ms": percentile(&stages[2], 0.5),
    });
    Ok((latencies, breakdown))
}

pub async fn commands(count: usize) -> anyhow::Result<()> {
    let dirty_kib_written_back = crate::settle_page_cache();
    // One process.
    let data = CloudData::new(Backend::Postgres).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "command bench", 1).await;
    let edge = Edge::start(&EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool"))).await;
    edge.wait_for_registry(2).await;
    let mut client = cloud.command_client(&key).await;
    let one = round_trips(&mut client, &edge, &fleet.sensors[0], count).await?;
    edge.stop().await;
    cloud.stop().await;

    // Two replicas on PostgreSQL and NATS JetStream: sent and watched on A, the agent on B.
    let data = CloudData::new(Backend::Postgres).await;
    let bus = smartfarm_bus::testing::bus_url("bench");
    let options = CloudOptions { env: vec![("SMARTFARM_BUS_URL".into(), bus.clone())], ..Default::default() };
    let a = Cloud::start(&data, options.clone()).await;
    let b = Cloud::start(&data, options).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&a, &key, "command bench", 1).await;
    let edge = Edge::start(&EdgeOptions::new(&b, &fleet, data.data_dir.path().join("spool"))).await;
    edge.wait_for_registry(2).await;
    let mut client = a.command_client(&key).await;
    let two = round_trips(&mut client, &edge, &fleet.sensors[0], count).await?;
    edge.stop().await;
    a.stop().await;
    b.stop().await;
    smartfarm_e2e::remove_nats_streams(&bus).await;
    for (setup, (latencies, breakdown)) in [("one process", &one), ("two replicas over NATS", &two)] {
        emit(serde_json::json!({
            "benchmark": "command_round_trip", "machine": machine(), "setup": setup, "database": "postgresql",
            "dirty_kib_written_back_before": dirty_kib_written_back,
            "commands": latencies.len(), "p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99),
            "max_ms": percentile(latencies, 1.0), "stages": breakdown,
        }));
    }
    Ok(())
}
