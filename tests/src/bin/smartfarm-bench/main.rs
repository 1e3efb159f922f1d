//! `smartfarm-bench`: the telemetry and photo benchmarks, as a program that prints what it measured (JSON lines, then a
//! summary), each against a baseline run in the same process on the same machine:
//!
//! - `ingest`: readings/s from a full edge spool to committed rows (real agent, real cloud, PostgreSQL), against
//!   raw binary COPY of the same rows into the same table.
//! - `fanin`: messages/s through the agent with N publishers at QoS 1 (each acknowledged only once spooled),
//!   against Mosquitto routing the same load to one subscriber; then the publish→acknowledgement latency through
//!   the agent at half the load it sustained. `--fsync` picks the agent's policy (`always`, the default, fsyncs
//!   before every acknowledgement; `interval` shows what the path costs without waiting for the disk).
//! - `footprint`: the agent's resident memory with 1000 connected sensors publishing 10k messages/s in all.
//! - `alerts` and `commands`: alert latency at half the ingest maximum against the agent's plain publish→subscribe
//!   loop, and command round trips on one process and across two replicas (see `alerts.rs`).
//! - `images`: photo upload MB/s through agent, cloud and S3 against plain PutObject, and bytes stored per photo
//!   for a day of hourly photos from many cameras (see `images.rs`).
//!
//! It needs what the tests need: PostgreSQL at SMARTFARM_TEST_DATABASE_URL, the smartfarm binaries built, and the
//! Debian `mosquitto` package for the fan-in baseline.

mod alerts;
mod images;

use std::collections::HashMap;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, Subcommand};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::Mutex;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet, eventually};
use smartfarm_e2e::{Cloud, CloudData, CloudOptions, bootstrap_admin_key};
use smartfarm_edge::sim::SensorCredentials;
use smartfarm_edge::spool::{FsyncPolicy, Spool, SpoolConfig};
use smartfarm_proto::common::v1::Reading;
use smartfarm_proto::ingestion::v1::spool_record::Body;

#[derive(Debug, Parser)]
#[command(name = "smartfarm-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Spool → committed rows, against raw binary COPY.
    Ingest {
        #[arg(long, default_value_t = 500_000)]
        readings: u64,
        #[arg(long, default_value_t = 100)]
        devices: usize,
    },
    /// Messages/s through the agent against Mosquitto, and latency at half load.
    Fanin {
        #[arg(long, default_value_t = 50)]
        publishers: usize,
        #[arg(long, default_value_t = 2000)]
        messages_per_publisher: u64,
        /// The agent's `fsync` setting: `always` or `interval`.
        #[arg(long, default_value = "always")]
        fsync: String,
    },
    /// Alert latency (farm topic and cloud stream) at half the ingest maximum, against the agent's plain
    /// publish→subscribe loop.
    Alerts {
        /// Sensors that trigger alerts (each waits for its alert before the next).
        #[arg(long, default_value_t = 10)]
        probes: usize,
        /// Alert events to time (half open, half resolve).
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        /// Sensors that publish the background load.
        #[arg(long, default_value_t = 50)]
        publishers: usize,
        /// Probe rounds (one alert opened and resolved) per second, all probes together.
        #[arg(long, default_value_t = 100.0)]
        rounds_per_second: f64,
        /// The background load as a share of the measured maximum (the goal is stated at half).
        #[arg(long, default_value_t = 0.5)]
        background_share: f64,
        /// The niceness of the background load generator's threads (0: as the rest). On a farm the sensors are
        /// other devices; here their simulation shares the two cores with the agent, the broker and the cloud, and
        /// at 19 it takes only the CPU they leave (the maximum is then measured the same way).
        #[arg(long, default_value_t = 0)]
        load_nice: i32,
        /// The maximum the background load is a share of: `end-to-end` (a burst's messages over the time until
        /// the cloud has committed them) or `agent` (what the agent acknowledged per second during the burst).
        #[arg(long, value_enum, default_value_t = alerts::Maximum::EndToEnd)]
        maximum: alerts::Maximum,
        /// A fixed background load, in messages/s, instead of a share of the maximum: two builds compared at the
        /// same load (the maximum is still measured and printed).
        #[arg(long)]
        background_rate: Option<f64>,
    },
    /// Command round trips (SendCommand → device → ack → WatchCommand), on one process and across two replicas.
    Commands {
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Photo upload MB/s against PutObject, and bytes stored per photo for a day of hourly photos.
    Images {
        /// Photos of the throughput run (1600x1200 JPEGs of random pixels, about 3.6 MB each; 0 skips the run).
        #[arg(long, default_value_t = 100)]
        photos: usize,
        /// Cameras of the storage run, each taking one photo an hour (0 skips the run).
        #[arg(long, default_value_t = 100)]
        cameras: usize,
        #[arg(long, default_value_t = 24)]
        hours: usize,
    },
    /// Resident memory with many connected sensors.
    Footprint {
        #[arg(long, default_value_t = 1000)]
        sensors: usize,
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Ingest { readings, devices } => ingest(readings, devices).await,
        Command::Fanin { publishers, messages_per_publisher, fsync } => {
            fanin(publishers, messages_per_publisher, &fsync).await
        }
        Command::Footprint { sensors, rate, seconds } => footprint(sensors, rate, seconds).await,
        Command::Images { photos, cameras, hours } => images::images(photos, cameras, hours).await,
        Command::Alerts {
            probes,
            events,
            publishers,
            rounds_per_second,
            background_share,
            load_nice,
            maximum,
            background_rate,
        } => {
            let background = match background_rate {
                Some(rate) => alerts::Background::Rate(rate),
                None => alerts::Background::ShareOfMaximum(background_share),
            };
            alerts::alerts(probes, events, publishers, rounds_per_second, background, load_nice, maximum).await
        }
        Command::Commands { count } => alerts::commands(count).await,
    }
}

/// Has the kernel write back what other processes left dirty in the page cache, and returns how much that was (KiB,
/// from /proc/meminfo). A latency benchmark calls it first: a release build just before leaves hundreds of
/// megabytes, and their writeback lands on the fsyncs measured (1.5 GB left dirty took one run's cloud p99 from
/// about 35 to 78 ms). What the platform itself writes during the run stays in the figures.
fn settle_page_cache() -> u64 {
    let dirty = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|line| line.starts_with("Dirty:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0);
    match std::process::Command::new("sync").status() {
        Ok(status) if status.success() => {}
        other => eprintln!("bench: sync did not run ({other:?}); dirty pages may weigh on the figures"),
    }
    dirty
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpus} cpus, {model}")
}

async fn ingest(readings: u64, devices: usize) -> anyhow::Result<()> {
    let data = CloudData::new(smartfarm_e2e::Backend::Postgres).await;
    let url = data.database_url().unwrap().to_string();
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let fleet = Fleet::register(&cloud, &bootstrap_admin_key(&data), "ingest bench", devices).await;

    // A full spool: `readings` raw readings spread over the devices, one every second per device.
    let spool_dir = data.data_dir.path().join("spool");
    let base = SystemTime::now() - Duration::from_secs(readings / devices as u64 + 3600);
    {
        let (spool, _) = Spool::open(SpoolConfig {
            dir: spool_dir.clone(),
            segment_bytes: 8 << 20,
            max_bytes: 64 << 30,
            fsync: FsyncPolicy::Never,
        })?;
        let mut next = 0u64;
        while next < readings {
            let chunk = (readings - next).min(50_000);
            let bodies = (next..next + chunk)
                .map(|i| {
                    let device = &fleet.sensors[(i % devices as u64) as usize].device_id;
                    Body::Reading(Reading {
                        device_id: device.clone(),
                        metric: "soil_moisture".into(),
                        value: (i % 1000) as f64 / 10.0,
                        measure_time: Some(smartfarm_core::time::to_timestamp(
                            base + Duration::from_secs(i / devices as u64),
                        )),
                        receive_time: None,
                    })
                })
                .collect();
            spool.append(bodies)?;
            next += chunk;
        }
        spool.sync()?;
    }

    // Baseline: raw binary COPY of the same rows into the same table, before and after the pipeline's run.
    let baseline_before = raw_copy(&url, &fleet, readings, devices, base, 10_000_000_000).await?;

    let started = Instant::now();
    let edge = Edge::start(&EdgeOptions {
        config: "upload_interval = \"1h\"\nupload = \"raw\"\n".into(),
        ..EdgeOptions::new(&cloud, &fleet, spool_dir)
    })
    .await;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let gateway: uuid::Uuid = fleet.gateway_id.parse()?;
    // Polled every 10 ms (the shared `eventually` waits 200 ms, which would blur a run of a few seconds).
    let committed = || async {
        client
            .query_opt("SELECT committed_sequence FROM edge_streams WHERE gateway_id = $1", &[&gateway])
            .await
            .ok()
            .flatten()
            .map(|row| row.get::<_, i64>(0) as u64 >= readings)
            .unwrap_or(false)
    };
    while !committed().await {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "the spool did not drain within 10 minutes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pipeline = readings as f64 / started.elapsed().as_secs_f64();
    // How far scoring is behind the commits when they end, and a while later (the baselines' run): batches the
    // pipeline skipped (its queue was full) stay listed until they are scored late.
    let left_to_score = || async {
        client.query_one("SELECT count(*) FROM unscored_batches", &[]).await.map(|row| row.get::<_, i64>(0))
    };
    let left_at_drain_end = left_to_score().await?;
    let drained = Instant::now();
    edge.stop().await;

    let baseline_after = raw_copy(&url, &fleet, readings, devices, base, 20_000_000_000).await?;
    let baseline = (baseline_before + baseline_after) / 2.0;
    let server_side = server_side_copy(&client, readings).await?;
    let left_after_the_baselines = left_to_score().await?;
    // Then until scoring has caught up (every batch scored and, where it held anomalies, confirmed by the alert
    // role), two minutes at most: how long after the drain the list is empty.
    let mut left = left_after_the_baselines;
    while left > 0
        && started.elapsed() < Duration::from_secs(600)
        && Instant::now() < drained + Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = left_to_score().await?;
    }
    let scoring = serde_json::json!({
        "batches_left_to_score_at_drain_end": left_at_drain_end,
        "batches_left_to_score_after_the_baselines": left_after_the_baselines,
        "batches_left_to_score_at_the_end": left,
        "seconds_from_the_drain_until_scored": (left == 0).then(|| (drained.elapsed().as_secs_f64() * 10.0).round() / 10.0),
        "batches_scored": cloud.metric("smartfarm_inference_batches_scored_total").await,
        "anomalies_announced": cloud.metric("smartfarm_inference_anomalies_detected_total").await,
        "batches_confirmed_by_the_alert_role": cloud.metric("smartfarm_alert_scored_batches_confirmed_total").await,
        "events_missed": cloud.metric("smartfarm_inference_events_missed_total").await,
    });
    emit(serde_json::json!({
        "benchmark": "ingest", "machine": machine(), "readings": readings, "devices": devices,
        "pipeline_readings_per_second": pipeline.round(), "raw_copy_rows_per_second": baseline.round(),
        "raw_copy_before": baseline_before.round(), "raw_copy_after": baseline_after.round(),
        "server_side_copy_rows_per_second": server_side.round(),
        "ratio": (pipeline / baseline * 100.0).round() / 100.0,
        "scoring": scoring,
    }));
    cloud.stop().await;
    Ok(())
}

/// Raw binary COPY of `rows` rows shaped like the pipeline's into `readings`, in 50k-row transactions. Sequence
/// numbers start at `sequence_base` so they never collide with the pipeline's. Returns rows/s.
async fn raw_copy(
    url: &str,
    fleet: &Fleet,
    rows: u64,
    devices: usize,
    base: SystemTime,
    sequence_base: i64,
) -> anyhow::Result<f64> {
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let metric: i32 = client
        .query_one(
            "INSERT INTO metric_names (name) VALUES ('soil_moisture') ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING id",
            &[],
        )
        .await?
        .get(0);
    // The monthly partitions the rows fall in, named as the store names them (the store makes them on demand).
    let last = base + Duration::from_secs(rows / devices as u64);
    let months = client
        .query(
            "SELECT to_char(m, 'YYYYMM'), to_char(m, 'YYYY-MM-DD'), to_char(m + interval '1 month', 'YYYY-MM-DD')
             FROM generate_series(date_trunc('month', $1::timestamptz AT TIME ZONE 'UTC'),
                                  date_trunc('month', $2::timestamptz AT TIME ZONE 'UTC'), interval '1 month') AS m",
            &[&base, &last],
        )
        .await?;
    for month in months {
        let (name, from, to): (String, String, String) = (month.get(0), month.get(1), month.get(2));
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS readings_p{name} PARTITION OF readings FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')"
            ))
            .await?;
    }
    let farm: uuid::Uuid = fleet.farm_id.parse()?;
    let device_ids: Vec<uuid::Uuid> = fleet.sensors.iter().map(|s| s.device_id.parse().unwrap()).collect();
    // Each device's series, interned as the store interns them.
    let mut series_ids = Vec::with_capacity(device_ids.len());
    for device in &device_ids {
        let id: i32 = client
            .query_one(
                "INSERT INTO reading_series (farm_id, device_id, metric_id) VALUES ($1, $2, $3)
                 ON CONFLICT (device_id, metric_id, farm_id) DO UPDATE SET farm_id = excluded.farm_id RETURNING id",
                &[&farm, device, &metric],
            )
            .await?
            .get(0);
        series_ids.push(id);
    }
    let receive = SystemTime::now();
    let started = Instant::now();
    let mut next = 0u64;
    while next < rows {
        let chunk = (rows - next).min(50_000);
        let transaction = client.transaction().await?;
        let sink = transaction
            .copy_in("COPY readings (time, series_id, value, sequence, receive_time) FROM STDIN (FORMAT binary)")
            .await?;
        let types = [Type::TIMESTAMPTZ, Type::INT4, Type::FLOAT8, Type::INT8, Type::TIMESTAMPTZ];
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &types));
        for i in next..next + chunk {
            let time = base + Duration::from_secs(i / devices as u64);
            let series = series_ids[(i % devices as u64) as usize];
            let value = (i % 1000) as f64 / 10.0;
            let sequence = sequence_base + i as i64;
            writer.as_mut().write(&[&time, &series, &value, &sequence, &receive]).await?;
        }
        writer.finish().await?;
        transaction.commit().await?;
        next += chunk;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// PostgreSQL alone, no client in the way: the pipeline's committed rows exported to a binary file on the server
/// and copied back into the same table in one statement (the best case: no client, one transaction). Returns rows/s.
async fn server_side_copy(client: &tokio_postgres::Client, rows: u64) -> anyhow::Result<f64> {
    let file = format!("/tmp/smartfarm-bench-{}.bin", uuid::Uuid::now_v7().simple());
    client
        .batch_execute(&format!(
            "COPY (SELECT time, series_id, value, sequence + 30000000000, receive_time FROM readings
                   WHERE sequence <= {rows} ORDER BY sequence) TO '{file}' (FORMAT binary)"
        ))
        .await?;
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "COPY readings (time, series_id, value, sequence, receive_time) FROM '{file}' (FORMAT binary)"
        ))
        .await?;
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    Ok(rate)
}

/// Publishes `messages` messages per client at QoS 1 as fast as the broker acknowledges them (or at `rate` in all
/// when given); returns (messages acknowledged, seconds, per-message publish→ack latencies in µs).
async fn load(
    host_port: (String, u16),
    clients: &[SensorCredentials],
    messages: u64,
    rate: Option<f64>,
    authenticate: bool,
) -> (u64, f64, Vec<u64>) {
    let acked = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let client = client.clone();
        let (host, port) = host_port.clone();
        let acked = acked.clone();
        let latencies = latencies.clone();
        let period = rate.map(|r| Duration::from_secs_f64(clients.len() as f64 / r));
        tasks.spawn(async move {
            let mut options = MqttOptions::new(client.device_id.clone(), host, port);
            if authenticate {
                options.set_credentials(client.device_id.clone(), client.credential.clone());
            }
            options.set_keep_alive(Duration::from_secs(30));
            options.set_inflight(64);
            let (mqtt, mut eventloop) = AsyncClient::new(options, 256);
            let topic = format!("smartfarm/{}/telemetry", client.device_id);
            let publisher = tokio::spawn(async move {
                let mut ticks = period.map(tokio::time::interval);
                for i in 0..messages {
                    if let Some(ticks) = ticks.as_mut() {
                        ticks.tick().await;
                    }
                    let payload = format!(r#"{{"metrics": {{"soil_moisture": {}.5}}}}"#, i % 100);
                    if mqtt.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.is_err() {
                        return;
                    }
                }
            });
            let mut sent_at: HashMap<u16, Instant> = HashMap::new();
            let mut mine = 0u64;
            let mut my_latencies = Vec::new();
            while mine < messages {
                match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
                    Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        sent_at.insert(pkid, Instant::now());
                    }
                    Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        mine += 1;
                        acked.fetch_add(1, Ordering::Relaxed);
                        if let Some(sent) = sent_at.remove(&ack.pkid) {
                            my_latencies.push(sent.elapsed().as_micros() as u64);
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            publisher.abort();
            latencies.lock().await.extend(my_latencies);
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let latencies = std::mem::take(&mut *latencies.lock().await);
    (acked.load(Ordering::Relaxed), elapsed, latencies)
}

/// A Prometheus histogram's cumulative bucket counts, by upper bound (seconds).
async fn histogram(metrics: std::net::SocketAddr, name: &str) -> Vec<(f64, f64)> {
    let body = smartfarm_e2e::http_get(metrics, "/metrics").await;
    let prefix = format!("{name}_bucket{{le=\"");
    body.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (bound, count) = rest.split_once("\"} ")?;
            let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse().ok()? };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect()
}

/// The smallest bucket bound (ms) under which fraction `p` of the observations between two scrapes fell.
fn bucket_percentile(before: &[(f64, f64)], after: &[(f64, f64)], p: f64) -> f64 {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(bound, count)| {
            let earlier = before.iter().find(|(b, _)| b == bound).map(|(_, c)| *c).unwrap_or(0.0);
            (*bound, count - earlier)
        })
        .collect();
    let total = counts.last().map(|(_, c)| *c).unwrap_or(0.0);
    counts.iter().find(|(_, c)| *c >= total * p).map(|(bound, _)| bound * 1000.0).unwrap_or(f64::INFINITY)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

/// A cloud on the embedded default with one farm of `sensors` sensors, and its edge agent (with `config`) holding
/// the farm's registry.
async fn farm_with_edge(name: &str, sensors: usize, config: String) -> (CloudData, Cloud, Fleet, Edge) {
    let data = CloudData::new(smartfarm_e2e::Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let fleet = Fleet::register(&cloud, &bootstrap_admin_key(&data), name, sensors).await;
    let edge =
        Edge::start(&EdgeOptions { config, ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool")) })
            .await;
    edge.wait_for_registry(sensors + 1).await;
    (data, cloud, fleet, edge)
}

async fn fanin(publishers: usize, messages: u64, fsync: &str) -> anyhow::Result<()> {
    anyhow::ensure!(matches!(fsync, "always" | "interval"), "--fsync is `always` or `interval`, not {fsync:?}");
    let config = format!("upload_interval = \"1h\"\nupload = \"raw\"\nfsync = \"{fsync}\"\n");
    let (data, cloud, fleet, edge) = farm_with_edge("fan-in bench", publishers, config).await;
    let total = publishers as u64 * messages;

    // Mosquitto, same load generator, one subscriber receiving everything.
    let port = smartfarm_e2e::free_port();
    let conf = data.data_dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 64\nmax_queued_messages 1000000\n"
        ),
    )?;
    let mut mosquitto = tokio::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| anyhow::anyhow!("cannot start mosquitto (Debian package mosquitto): {error}"))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = Arc::new(AtomicU64::new(0));
    let last_received = Arc::new(std::sync::Mutex::new(Instant::now()));
    {
        let mut options = MqttOptions::new("bench-subscriber", "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        let (subscriber, mut eventloop) = AsyncClient::new(options, 1024);
        subscriber.subscribe("smartfarm/+/telemetry", QoS::AtLeastOnce).await?;
        let (received, last_received) = (received.clone(), last_received.clone());
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Packet::Publish(_)) = event {
                    received.fetch_add(1, Ordering::Relaxed);
                    *last_received.lock().unwrap() = Instant::now();
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mosquitto_started = Instant::now();
    let (mosquitto_acked, _, _) = load(("127.0.0.1".into(), port), &fleet.sensors, messages, None, false).await;
    eventually(Duration::from_secs(60), || async { received.load(Ordering::Relaxed) >= mosquitto_acked }).await;
    let mosquitto_seconds = last_received.lock().unwrap().duration_since(mosquitto_started).as_secs_f64();
    let mosquitto_rate = received.load(Ordering::Relaxed) as f64 / mosquitto_seconds;
    let _ = mosquitto.kill().await;

    let (agent_acked, agent_seconds, _) =
        load(("127.0.0.1".into(), edge.mqtt.port()), &fleet.sensors, messages, None, true).await;
    let agent_rate = agent_acked as f64 / agent_seconds;
    emit(serde_json::json!({
        "benchmark": "fanin", "machine": machine(), "publishers": publishers, "messages": total, "qos": 1,
        "agent_acked": agent_acked, "agent_messages_per_second": agent_rate.round(), "agent_fsync": fsync,
        "mosquitto_received": received.load(Ordering::Relaxed), "mosquitto_messages_per_second": mosquitto_rate.round(),
        "ratio": (agent_rate / mosquitto_rate * 100.0).round() / 100.0,
    }));

    // Latency at half the load the agent sustained: publish → PUBACK, which the agent sends once the reading is in
    // the spool (fsynced).
    // Also at fixed rates: 10k/s (the footprint load) and 1k/s (a busy farm).
    for (label, rate) in [("half_load", agent_rate / 2.0), ("fixed", 10_000.0), ("fixed", 1_000.0)] {
        let per_publisher = ((rate * 10.0) / publishers as f64).max(10.0) as u64;
        let before = histogram(edge.metrics, "smartfarm_edge_publish_to_spool_seconds").await;
        let append_before = histogram(edge.metrics, "smartfarm_edge_spool_append_seconds").await;
        let (_, _, mut latencies) =
            load(("127.0.0.1".into(), edge.mqtt.port()), &fleet.sensors, per_publisher, Some(rate), true).await;
        let after = histogram(edge.metrics, "smartfarm_edge_publish_to_spool_seconds").await;
        let append_after = histogram(edge.metrics, "smartfarm_edge_spool_append_seconds").await;
        latencies.sort_unstable();
        emit(serde_json::json!({
            "benchmark": "fanin_latency", "agent_fsync": fsync, "load": label, "machine": machine(), "rate": rate.round(), "messages": latencies.len(),
            "agent_publish_to_spool_p50_ms_at_most": bucket_percentile(&before, &after, 0.50),
            "agent_publish_to_spool_p99_ms_at_most": bucket_percentile(&before, &after, 0.99),
            "agent_spool_append_p99_ms_at_most": bucket_percentile(&append_before, &append_after, 0.99),
            "client_publish_to_puback_p50_ms": percentile(&latencies, 0.50),
            "client_publish_to_puback_p99_ms": percentile(&latencies, 0.99),
            "client_publish_to_puback_max_ms": percentile(&latencies, 1.0),
        }));
    }
    edge.stop().await;
    cloud.stop().await;
    Ok(())
}

/// The agent's resident memory now and at its peak, in MiB, from /proc.
fn resident_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn footprint(sensors: usize, rate: f64, seconds: u64) -> anyhow::Result<()> {
    let (_data, cloud, fleet, edge) =
        farm_with_edge("footprint bench", sensors, "upload_interval = \"10s\"\n".into()).await;
    let pid = edge.pid();
    let idle = resident_mib(pid).0;
    let per_sensor = (rate * seconds as f64 / sensors as f64) as u64;
    let (sensors_for_load, port) = (fleet.sensors.clone(), edge.mqtt.port());
    let load =
        tokio::spawn(
            async move { load(("127.0.0.1".into(), port), &sensors_for_load, per_sensor, Some(rate), true).await },
        );
    let mut samples = Vec::new();
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        samples.push(resident_mib(pid).0);
    }
    let (acked, elapsed, _) = load.await?;
    let (_, peak) = resident_mib(pid);
    emit(serde_json::json!({
        "benchmark": "footprint", "machine": machine(), "sensors": sensors, "target_rate": rate,
        "achieved_rate": (acked as f64 / elapsed).round(), "messages": acked,
        "rss_idle_mib": (idle * 10.0).round() / 10.0,
        "rss_under_load_max_mib": (samples.iter().cloned().fold(0.0, f64::max) * 10.0).round() / 10.0,
        "rss_peak_mib": (peak * 10.0).round() / 10.0,
    }));
    edge.stop().await;
    cloud.stop().await;
    Ok(())
}
