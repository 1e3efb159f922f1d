//! Telemetry end to end: simulated sensors (real MQTT clients) → a real `smartfarm-edge` → a real `smartfarm` on
//! a real PostgreSQL database, checked row by row: every reading acknowledged to a sensor is in the database, and
//! nothing is written twice after the spool.

use std::time::Duration;

use smartfarm_e2e::alerting::{MqttWatch, mosquitto_pub};
use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet, eventually, readings_per_device, tally};
use smartfarm_e2e::{Backend, Cloud, CloudData, CloudOptions, bootstrap_admin_key};
use smartfarm_edge::sim::{self, METRICS_PER_MESSAGE, RunOptions};

fn edge_options(cloud: &Cloud, fleet: &Fleet, data: &CloudData, config: &str) -> EdgeOptions {
    EdgeOptions { config: config.to_string(), ..EdgeOptions::new(cloud, fleet, data.data_dir.path().join("spool")) }
}

fn run_options(edge: &Edge, rate: f64, messages_per_sensor: u64) -> RunOptions {
    RunOptions {
        mqtt: edge.mqtt.to_string(),
        rate,
        messages_per_sensor,
        replay: Vec::new(),
        qos: 1,
        drain_timeout: Duration::from_secs(60),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_sensors_arrive_exactly_once() {
    let data = CloudData::new(Backend::Postgres).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let fleet = Fleet::register(&cloud, &bootstrap_admin_key(&data), "thousand", 1000).await;
    let edge = Edge::start(&edge_options(&cloud, &fleet, &data, "upload_interval = \"1s\"\nupload = \"raw\"\n")).await;
    edge.wait_for_registry(1001).await;

    // QoS 2 with persistent sessions: exactly once from the sensor on, even when a client times out and resends.
    let report = sim::run(&fleet.sensors, RunOptions { qos: 2, ..run_options(&edge, 2000.0, 5) }).await.unwrap();
    eprintln!(
        "simulator: {} sent, {} acknowledged in {:.1} s, {} connection errors {:?}",
        report.messages_sent,
        report.messages_acked,
        report.elapsed_seconds,
        report.connection_errors,
        report.error_samples
    );
    assert_eq!(
        report.messages_acked, 5000,
        "every message acknowledged ({} sent, {} connection errors: {:?})",
        report.messages_sent, report.connection_errors, report.error_samples
    );
    let url = data.database_url().unwrap().to_string();
    let expected = (report.messages_acked * METRICS_PER_MESSAGE) as i64;
    let arrived =
        eventually(Duration::from_secs(60), || async { tally(&url, &fleet.farm_id).await.rows >= expected }).await;
    let counts = tally(&url, &fleet.farm_id).await;
    assert!(arrived, "{counts:?} after 60 s, expected {expected} rows\n{}", edge.log());
    assert_eq!(
        counts,
        smartfarm_e2e::edge::Tally {
            rows: expected,
            distinct_sequences: expected,
            distinct_readings: expected,
            max_sequence: expected,
        },
        "exactly once: as many rows as readings, no sequence twice, no gap"
    );
    let per_device = readings_per_device(&url, &fleet.farm_id).await;
    assert_eq!(per_device.len(), 1000);
    for (device, acked) in &report.acked_per_device {
        assert_eq!(per_device.get(device).copied(), Some(*acked as i64 * METRICS_PER_MESSAGE as i64), "{device}");
    }
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_edge_twenty_times_loses_and_duplicates_nothing_after_the_spool() {
    let data = CloudData::new(Backend::Postgres).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let fleet = Fleet::register(&cloud, &bootstrap_admin_key(&data), "kill nine", 20).await;
    let mut options = edge_options(&cloud, &fleet, &data, "upload_interval = \"200ms\"\nupload = \"raw\"\n");
    options.mqtt_port = Some(smartfarm_e2e::free_port());
    let mut edge = Edge::start(&options).await;
    edge.wait_for_registry(21).await;

    // 20 sensors, 150 messages each at 200 messages/s: 15 s of publishing while the agent dies 20 times.
    let (sensors, mut run) = (fleet.sensors.clone(), run_options(&edge, 200.0, 150));
    // Messages in flight when the agent dies are never acknowledged; the sensors need not wait long for them.
    run.drain_timeout = Duration::from_secs(10);
    let sim = tokio::spawn(async move { sim::run(&sensors, run).await });
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        edge.kill9().await;
        edge = Edge::start(&options).await;
    }
    let report = sim.await.unwrap().unwrap();
    let url = data.database_url().unwrap().to_string();
    let spool_last = || async {
        let counts = tally(&url, &fleet.farm_id).await;
        counts.rows > 0 && edge.metric("smartfarm_edge_spool_pending_records").await == 0.0
    };
    assert!(eventually(Duration::from_secs(60), spool_last).await, "the spool drained\n{}", edge.log());
    let counts = tally(&url, &fleet.farm_id).await;
    assert_eq!(counts.distinct_sequences, counts.rows, "no spool record written twice: {counts:?}");
    assert_eq!(counts.max_sequence, counts.rows, "no spool record lost (every sequence 1..=max present): {counts:?}");
    let per_device = readings_per_device(&url, &fleet.farm_id).await;
    for (device, acked) in &report.acked_per_device {
        let stored = per_device.get(device).copied().unwrap_or(0);
        assert!(
            stored >= *acked as i64 * METRICS_PER_MESSAGE as i64,
            "{device}: {acked} messages acknowledged to the sensor, {stored} readings stored"
        );
    }
    // A sensor whose acknowledgement died with the agent sends the message again (MQTT QoS 1 is at least once);
    // those copies have new sequence numbers. They are counted here, not hidden.
    let resent_by_sensors = counts.rows - counts.distinct_readings;
    eprintln!(
        "kill -9 x20: {counts:?}; readings resent by sensors after a lost PUBACK: {resent_by_sensors}; messages sent {}, \
         acknowledged {}, never acknowledged (in flight when the agent died; the sensor still holds them) {}",
        report.messages_sent,
        report.messages_acked,
        report.messages_sent - report.messages_acked
    );
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cloud_killed_and_postgres_crashed_mid_ingest_lose_and_duplicate_nothing() {
    let cluster = smartfarm_e2e::PostgresCluster::start();
    let data = CloudData::on_database(&cluster.url);
    let listen = Some(format!("127.0.0.1:{}", smartfarm_e2e::free_port()).parse().unwrap());
    let cloud_options = CloudOptions { listen, ..Default::default() };
    let cloud = Cloud::start(&data, cloud_options.clone()).await;
    let fleet = Fleet::register(&cloud, &bootstrap_admin_key(&data), "crashes", 10).await;
    let edge = Edge::start(&edge_options(
        &cloud,
        &fleet,
        &data,
        "upload_interval = \"200ms\"\nupload = \"raw\"\nreconnect_max = \"2s\"\n",
    ))
    .await;
    edge.wait_for_registry(11).await;

    let (sensors, mut run) = (fleet.sensors.clone(), run_options(&edge, 100.0, 150));
    run.drain_timeout = Duration::from_secs(10);
    let sim = tokio::spawn(async move { sim::run(&sensors, run).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    cloud.kill9().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cloud = Cloud::start(&data, cloud_options).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.stop_immediately();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_again();
    let report = sim.await.unwrap().unwrap();

    let url = cluster.url.clone();
    let drained = eventually(Duration::from_secs(60), || async {
        edge.metric("smartfarm_edge_spool_pending_records").await == 0.0 && tally(&url, &fleet.farm_id).await.rows > 0
    })
    .await;
    assert!(drained, "the agent reconnected by itself and drained its spool\n{}", edge.log());
    let counts = tally(&url, &fleet.farm_id).await;
    assert_eq!(counts.distinct_sequences, counts.rows, "nothing written twice: {counts:?}");
    assert_eq!(counts.max_sequence, counts.rows, "nothing lost after the spool: {counts:?}");
    let per_device = readings_per_device(&url, &fleet.farm_id).await;
    for (device, acked) in &report.acked_per_device {
        assert!(per_device.get(device).copied().unwrap_or(0) >= *acked as i64 * METRICS_PER_MESSAGE as i64, "{device}");
    }
    assert!(edge.metric("smartfarm_edge_link_reconnects_total").await >= 1.0);
    eprintln!(
        "cloud kill -9 and postgres -m immediate: {counts:?}; acked {} of {} messages",
        report.messages_acked, report.messages_sent
    );
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_outage_drains_oldest_first_and_past_the_cap_drops_exactly_what_the_metric_counts() {
    let data = CloudData::new(Backend::Postgres).await;
    let listen = Some(format!("127.0.0.1:{}", smartfarm_e2e::free_port()).parse().unwrap());
    let cloud_options = CloudOptions { listen, ..Default::default() };
    let cloud = Cloud::start(&data, cloud_options.clone()).await;
    let fleet = Fleet::register(&cloud, &bootstrap_admin_key(&data), "outage", 10).await;
    let config = "upload_interval = \"200ms\"\nupload = \"raw\"\nreconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n\
                  spool_max_bytes = 65536\nspool_segment_bytes = 8192\n";
    let edge = Edge::start(&edge_options(&cloud, &fleet, &data, config)).await;
    edge.wait_for_registry(11).await;
    // The agent has the registry now; the cloud goes away for the whole run.
    cloud.stop().await;

    let alerts = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &edge.mqtt.port().to_string(), "-t", "smartfarm/alerts", "-C", "1", "-W", "60"])
        .args(["-u", &fleet.sensors[0].device_id, "-P", &fleet.sensors[0].credential])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients; scripts/install-tools.sh installs it)");
    let report = sim::run(&fleet.sensors, run_options(&edge, 1000.0, 200)).await.unwrap();
    assert_eq!(report.messages_acked, 2000);
    let spool_bytes = edge.metric("smartfarm_edge_spool_bytes").await;
    assert!(spool_bytes <= (65536 + 8192) as f64, "the spool stays under its cap: {spool_bytes}");
    let dropped = edge.metric("smartfarm_edge_spool_dropped_records_total").await;
    assert!(dropped > 0.0, "4000 readings do not fit in 64 KiB");
    let alert = alerts.wait_with_output().await.unwrap();
    let alert = String::from_utf8_lossy(&alert.stdout);
    assert!(alert.contains("spool_overflow"), "the overflow is announced on smartfarm/alerts: {alert:?}");

    let cloud = Cloud::start(&data, cloud_options).await;
    let url = data.database_url().unwrap().to_string();
    let drained = eventually(Duration::from_secs(60), || async {
        edge.metric("smartfarm_edge_spool_pending_records").await == 0.0 && tally(&url, &fleet.farm_id).await.rows > 0
    })
    .await;
    assert!(drained, "{}", edge.log());
    let counts = tally(&url, &fleet.farm_id).await;
    let dropped = edge.metric("smartfarm_edge_spool_dropped_records_total").await as i64;
    assert_eq!(
        counts.rows + dropped,
        4000,
        "what arrived plus what the metric says was dropped is everything: {counts:?}"
    );
    assert_eq!(counts.distinct_sequences, counts.rows);
    assert_eq!(counts.max_sequence, 4000, "the newest data is what was kept");

    // Oldest first: committed in sequence order.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let out_of_order: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT receive_time, lag(receive_time) OVER (ORDER BY sequence) AS before FROM readings) t
             WHERE receive_time < before",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(out_of_order, 0, "batches drain oldest first");
    eprintln!("outage past the cap: {counts:?}, dropped {dropped}");
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_torn_last_spool_record_is_cut_on_start_and_the_rest_arrives() {
    let data = CloudData::new(Backend::Postgres).await;
    let listen = Some(format!("127.0.0.1:{}", smartfarm_e2e::free_port()).parse().unwrap());
    let cloud_options = CloudOptions { listen, ..Default::default() };
    let cloud = Cloud::start(&data, cloud_options.clone()).await;
    let fleet = Fleet::register(&cloud, &bootstrap_admin_key(&data), "torn", 5).await;
    let options = edge_options(&cloud, &fleet, &data, "upload_interval = \"200ms\"\nupload = \"raw\"\n");
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(6).await;
    cloud.stop().await;
    let report = sim::run(&fleet.sensors, run_options(&edge, 500.0, 20)).await.unwrap();
    assert_eq!(report.messages_acked, 100);
    edge.kill9().await;

    // A power cut in the middle of the last write: its last 3 bytes never reached the disk.
    let segments = options.spool_dir.join("segments");
    let mut files: Vec<_> = std::fs::read_dir(&segments).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let last = files.last().expect("a segment");
    let length = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(last).unwrap().set_len(length - 3).unwrap();

    let cloud = Cloud::start(&data, cloud_options).await;
    let edge = Edge::start(&options).await;
    let url = data.database_url().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(30), || async { tally(&url, &fleet.farm_id).await.rows >= 199 }).await,
        "{}",
        edge.log()
    );
    let counts = tally(&url, &fleet.farm_id).await;
    assert_eq!(
        (counts.rows, counts.distinct_sequences, counts.max_sequence),
        (199, 199, 199),
        "all but the torn record"
    );
    assert!(edge.log().contains("cut a torn spool tail"), "{}", edge.log());
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_wait_for_the_interval_unless_the_spool_passes_its_threshold() {
    let data = CloudData::new(Backend::Postgres).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let fleet = Fleet::register(&cloud, &bootstrap_admin_key(&data), "threshold", 4).await;
    let config = "upload_interval = \"1h\"\nupload = \"raw\"\nupload_threshold_bytes = 16384\n";
    let edge = Edge::start(&edge_options(&cloud, &fleet, &data, config)).await;
    edge.wait_for_registry(5).await;
    let url = data.database_url().unwrap().to_string();

    // A few readings: far below the threshold, so they wait for the hourly upload.
    let report = sim::run(&fleet.sensors, run_options(&edge, 100.0, 5)).await.unwrap();
    assert_eq!(report.messages_acked, 20);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(tally(&url, &fleet.farm_id).await.rows, 0, "nothing goes up before the interval");
    assert_eq!(edge.metric("smartfarm_edge_spool_pending_records").await, 40.0);

    // Past 16 KiB waiting, the agent sends what is waiting at once; what arrives after that drain, below the
    // threshold again, waits for the interval.
    let report = sim::run(&fleet.sensors, run_options(&edge, 1000.0, 150)).await.unwrap();
    assert_eq!(report.messages_acked, 600);
    let uploaded = eventually(Duration::from_secs(10), || async {
        let rows = tally(&url, &fleet.farm_id).await.rows as f64;
        let pending = edge.metric("smartfarm_edge_spool_pending_records").await;
        rows >= 1000.0 && rows + pending == 1240.0
    })
    .await;
    assert!(
        uploaded,
        "{:?}, {} pending\n{}",
        tally(&url, &fleet.farm_id).await,
        edge.metric("smartfarm_edge_spool_pending_records").await,
        edge.log()
    );
    edge.stop().await;
    cloud.stop().await;
}

/// Batches committed while nothing scored them (a cloud without the inference role, killed afterwards: their
/// announcements are gone with it) are scored by the next cloud that runs the role, from the list their commits
/// wrote, each once. On SQLite, the embedded default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_nobody_scored_are_scored_late_by_the_next_cloud() {
    let data = CloudData::new(Backend::Sqlite).await;
    let ingesting =
        Cloud::start(&data, CloudOptions { target: Some("device,ingestion".into()), ..Default::default() }).await;
    let fleet = Fleet::register(&ingesting, &bootstrap_admin_key(&data), "late scoring", 1).await;
    let sensor = fleet.sensors[0].clone();
    // Raw readings only: an aggregates-only batch, uploaded when a window closes, is not listed for scoring.
    let edge_config = "upload_interval = \"1s\"\nupload = \"raw\"\n";
    let edge = Edge::start(&edge_options(&ingesting, &fleet, &data, edge_config)).await;
    edge.wait_for_registry(2).await;
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    for value in [20, 21, 22] {
        let acked_before = edge.metric("smartfarm_edge_batches_acked_total").await;
        let payload = format!(r#"{{"metrics": {{"temperature": {value}}}}}"#);
        mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, &payload).await;
        let acked = || async { edge.metric("smartfarm_edge_batches_acked_total").await > acked_before };
        assert!(eventually(Duration::from_secs(20), acked).await, "the batch was committed\n{}", ingesting.log());
    }
    // Without the role here, each batch was handed out on the in-process bus, where nobody takes it.
    let committed = ingesting.metric("smartfarm_ingest_batches_handed_out_total").await;
    assert!(committed >= 3.0, "{committed} batches committed");
    edge.stop().await;
    ingesting.kill9().await;

    let config = "[inference]\nlate_scoring_after = \"1s\"\n".to_string();
    let scoring = Cloud::start(&data, CloudOptions { config: Some(config), ..Default::default() }).await;
    let late = || async { scoring.metric("smartfarm_inference_late_batches_total").await };
    let all_late = || async { late().await >= committed };
    assert!(eventually(Duration::from_secs(60), all_late).await, "{} of {committed}\n{}", late().await, scoring.log());
    // Each once: confirmed scored, they left the list.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(late().await, committed);
    assert_eq!(scoring.metric("smartfarm_inference_batches_scored_total").await, committed);
    scoring.stop().await;
}

/// Readings the agent took but the cloud does not store (stamped two days ahead, which this agent is set to take, as
/// one whose clock runs ahead would) are announced on the farm's alert topic with their reason and a hint; the rest
/// of the batch is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_the_cloud_drops_are_announced_on_the_farm() {
    let data = CloudData::new(Backend::Postgres).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let fleet = Fleet::register(&cloud, &bootstrap_admin_key(&data), "clock ahead", 1).await;
    let config = "upload_interval = \"1s\"\nupload = \"raw\"\nmax_future_skew = \"3d\"\n";
    let edge = Edge::start(&edge_options(&cloud, &fleet, &data, config)).await;
    edge.wait_for_registry(2).await;
    let sensor = &fleet.sensors[0];
    let mut farm_topic = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, "smartfarm/alerts").await;
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    let ahead = std::time::SystemTime::now() + Duration::from_secs(2 * 24 * 3600);
    let ahead_ms = ahead.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let skewed = format!(r#"{{"ts": {ahead_ms}, "metrics": {{"temperature": 21, "humidity": 60}}}}"#);
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, &skewed).await;
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 22}}"#)
        .await;

    let message = farm_topic.next(Duration::from_secs(30)).await.expect("the dropped readings announced on the farm");
    let message: serde_json::Value = serde_json::from_str(&message).unwrap();
    assert_eq!(message["kind"], "records_dropped", "{message}");
    assert_eq!(message["dropped"], serde_json::json!({"bad_time": 2}), "{message}");
    let text = message["message"].as_str().unwrap();
    assert!(text.contains("did not store 2 records") && text.contains("check the clocks"), "{text}");
    let url = data.database_url().unwrap().to_string();
    let stored = eventually(Duration::from_secs(30), || async { tally(&url, &fleet.farm_id).await.rows == 1 }).await;
    assert!(stored, "the reading of the present stored: {:?}", tally(&url, &fleet.farm_id).await);
    let counted = edge.metric("smartfarm_edge_records_dropped_by_cloud_total{reason=\"bad_time\"}").await;
    assert_eq!(counted, 2.0);
    assert!(farm_topic.drain(Duration::from_secs(2)).await.is_empty(), "announced once");
    edge.stop().await;
    cloud.stop().await;
}
