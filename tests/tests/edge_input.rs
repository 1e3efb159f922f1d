//! The edge agent faces whatever a farm's devices send. Mosquitto's own clients (`mosquitto_pub`,
//! `mosquitto_sub`, an independent MQTT implementation) send bad payloads, wrong credentials and publishes on
//! another device's topic: each is refused, counted and explained, and the agent keeps serving.

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use prost::Message;

use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet, eventually};
use smartfarm_e2e::{Backend, Bearer, Cloud, CloudData, CloudOptions, bootstrap_admin_key};
use smartfarm_proto::ingestion::v1 as pb;

/// Publishes once with mosquitto_pub at QoS 1: whether it exited cleanly, and what it printed on stderr (where it
/// reports an MQTT 5 PUBACK's refusal, with exit status 0).
async fn publish(
    edge: &Edge,
    user: &str,
    password: &str,
    topic: &str,
    version: &str,
    payload: &[u8],
) -> (bool, String) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), payload).unwrap();
    let output = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &edge.mqtt.port().to_string(), "-V", version, "-q", "1"])
        .args(["-u", user, "-P", password, "-t", topic, "-f"])
        .arg(file.path())
        .output()
        .await
        .expect("mosquitto_pub (Debian package mosquitto-clients; scripts/install-tools.sh installs it)");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Whether mosquitto_pub published and the broker accepted it.
async fn mosquitto_pub(edge: &Edge, user: &str, password: &str, topic: &str, version: &str, payload: &[u8]) -> bool {
    let (exited_cleanly, stderr) = publish(edge, user, password, topic, version, payload).await;
    exited_cleanly && !stderr.contains("failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_foreign_topics_and_wrong_credentials_are_refused_counted_and_explained() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let admin_key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &admin_key, "input", 2).await;
    let options = EdgeOptions {
        config: "upload_interval = \"200ms\"\n".into(),
        ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool"))
    };
    let edge = Edge::start(&options).await;
    let (me, other) = (&fleet.sensors[0], &fleet.sensors[1]);
    let my_topic = format!("smartfarm/{}/telemetry", me.device_id);
    edge.wait_for_registry(3).await;
    assert!(
        mosquitto_pub(&edge, &me.device_id, &me.credential, &my_topic, "mqttv311", br#"{"metrics": {"warmup": 1}}"#)
            .await,
        "the agent accepts a known sensor once it has the registry\n{}",
        edge.log()
    );

    // The device listens to its errors topic.
    let errors = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &edge.mqtt.port().to_string(), "-V", "mqttv5"])
        .args([
            "-u",
            &me.device_id,
            "-P",
            &me.credential,
            "-t",
            &format!("smartfarm/{}/errors", me.device_id),
            "-C",
            "6",
            "-W",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let nan = smartfarm_proto::common::v1::DeviceTelemetry {
        measure_time: None,
        metrics: [("temperature".to_string(), f64::NAN)].into(),
    };
    let future = SystemTime::now() + Duration::from_secs(86_400);
    let future_ms = future.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis();
    let bad_payloads: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "unreadable_payload"),
        (nan.encode_to_vec(), "bad_value"),
        (br#"{"metrics": {"Temperature!": 20}}"#.to_vec(), "bad_metric_name"),
        (format!(r#"{{"ts": {future_ms}, "metrics": {{"temperature": 20}}}}"#).into_bytes(), "future_timestamp"),
    ];
    for (payload, _) in &bad_payloads {
        // 3.1.1 can only acknowledge; the refusal is told on the errors topic and counted.
        mosquitto_pub(&edge, &me.device_id, &me.credential, &my_topic, "mqttv311", payload).await;
    }
    // MQTT 5 also gets the refusal in its PUBACK, which mosquitto_pub reports.
    let (_, stderr) = publish(&edge, &me.device_id, &me.credential, &my_topic, "mqttv5", b"{broken").await;
    assert!(stderr.contains("Payload format invalid"), "{stderr}");
    // Publishing as another device is refused by the topic ACL.
    let foreign_topic = format!("smartfarm/{}/telemetry", other.device_id);
    let (_, stderr) =
        publish(&edge, &me.device_id, &me.credential, &foreign_topic, "mqttv5", br#"{"metrics": {"temperature": 99}}"#)
            .await;
    assert!(stderr.contains("Not authorized"), "{stderr}");
    // Wrong password and an unknown device are refused at CONNECT.
    assert!(
        !mosquitto_pub(&edge, &me.device_id, "not-the-credential", &my_topic, "mqttv311", br#"{"metrics": {"t": 1}}"#)
            .await
    );
    assert!(
        !mosquitto_pub(
            &edge,
            &uuid::Uuid::now_v7().to_string(),
            "whatever",
            &my_topic,
            "mqttv311",
            br#"{"metrics": {"t": 1}}"#
        )
        .await
    );

    let errors = String::from_utf8(errors.wait_with_output().await.unwrap().stdout).unwrap();
    for (_, reason) in &bad_payloads {
        assert!(errors.contains(reason), "the device was told {reason}: {errors}");
    }
    assert!(errors.contains("not_authorized"), "{errors}");
    for (series, expected) in [
        ("smartfarm_edge_readings_rejected_total{reason=\"unreadable_payload\"}", 2.0),
        ("smartfarm_edge_readings_rejected_total{reason=\"bad_value\"}", 1.0),
        ("smartfarm_edge_readings_rejected_total{reason=\"bad_metric_name\"}", 1.0),
        ("smartfarm_edge_readings_rejected_total{reason=\"future_timestamp\"}", 1.0),
        ("smartfarm_edge_acl_denied_total{action=\"publish\"}", 1.0),
        ("smartfarm_edge_mqtt_auth_failures_total{reason=\"bad_credential\"}", 1.0),
        ("smartfarm_edge_mqtt_auth_failures_total{reason=\"unknown_device\"}", 1.0),
    ] {
        assert_eq!(edge.metric(series).await, expected, "{series}");
    }

    // The agent is still up, and what was valid arrives; nothing refused does.
    assert!(
        mosquitto_pub(
            &edge,
            &me.device_id,
            &me.credential,
            &my_topic,
            "mqttv5",
            br#"[{"n": "soil_moisture", "v": 0.42}]"#
        )
        .await
    );
    let mut telemetry = pb::telemetry_service_client::TelemetryServiceClient::with_interceptor(
        cloud.channel().await,
        Bearer::new(&admin_key),
    );
    let arrived = eventually(Duration::from_secs(15), || {
        let mut telemetry = telemetry.clone();
        let farm_id = fleet.farm_id.clone();
        async move {
            let latest = telemetry
                .get_latest_readings(pb::GetLatestReadingsRequest { farm_id, device_ids: vec![] })
                .await
                .unwrap()
                .into_inner()
                .readings;
            latest.iter().any(|r| r.metric == "soil_moisture" && r.value == 0.42)
        }
    })
    .await;
    assert!(arrived, "{}", edge.log());
    let latest = telemetry
        .get_latest_readings(pb::GetLatestReadingsRequest { farm_id: fleet.farm_id.clone(), device_ids: vec![] })
        .await
        .unwrap()
        .into_inner()
        .readings;
    let mut metrics: Vec<(String, String)> = latest.iter().map(|r| (r.device_id.clone(), r.metric.clone())).collect();
    metrics.sort();
    assert_eq!(
        metrics,
        vec![(me.device_id.clone(), "soil_moisture".to_string()), (me.device_id.clone(), "warmup".to_string())],
        "nothing refused was stored, and nothing landed on the other device"
    );
    edge.stop().await;
    cloud.stop().await;
}
