//! Two cloud replicas on one PostgreSQL database and a NATS JetStream bus (NATS runs on 127.0.0.1:4222 where the
//! project is tested; `SMARTFARM_TEST_NATS_URL` points elsewhere). The farm's agent is connected to replica B: a
//! rule created and a command sent through replica A reach it (within seconds: without the bus, B's link would
//! notice them only at its next refresh, 30 s later), the device's acknowledgement is seen by a watch on A, an alert
//! the agent raises through B reaches a subscriber on A, the batch that carried its reading is scored for anomalies
//! by B alone (both run the inference role), and a command acknowledged by A just before A is killed still reaches
//! the device. With three replicas, the photos and batches of one that does not run the inference role are
//! diagnosed and scored once, by one of the two that do.

use std::time::Duration;

use smartfarm_e2e::alerting::{MqttWatch, mosquitto_pub, next_alert_event};
use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet, eventually};
use smartfarm_e2e::{Backend, Cloud, CloudData, CloudOptions, bootstrap_admin_key, metric_value, remove_nats_streams};
use smartfarm_proto::alert::v1 as alert;
use smartfarm_proto::command::v1 as command;
use smartfarm_proto::pbjson_types;

/// A bus URL on the test NATS server with a stream of the test's own, so tests sharing the server do not hear each
/// other.
fn nats_url() -> String {
    smartfarm_bus::testing::bus_url("e2e")
}

async fn replica(data: &CloudData, bus: &str) -> Cloud {
    replica_with_roles(data, bus, None).await
}

/// A replica running `target`'s roles (`None`: all of them).
async fn replica_with_roles(data: &CloudData, bus: &str, target: Option<&str>) -> Cloud {
    Cloud::start(
        data,
        CloudOptions {
            // The links re-read rules and commands only every 30 s (the default): what crosses sooner crossed NATS.
            env: vec![("SMARTFARM_BUS_URL".into(), bus.into())],
            target: target.map(str::to_string),
            ..Default::default()
        },
    )
    .await
}

/// A leaf photo of the PlantVillage fixtures.
fn leaf() -> Vec<u8> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/ml/fixtures/plants/Apple___Black_rot");
    let mut leaves: Vec<_> = std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    leaves.sort();
    std::fs::read(&leaves[0]).unwrap()
}

fn send_request(device_id: &str, name: &str) -> command::SendCommandRequest {
    command::SendCommandRequest {
        device_id: device_id.into(),
        name: name.into(),
        parameters: None,
        ttl: Some(pbjson_types::Duration { seconds: 60, nanos: 0 }),
        request_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_alerts_cross_replicas_over_nats() {
    let data = CloudData::new(Backend::Postgres).await;
    let bus = nats_url();
    let a = replica(&data, &bus).await;
    let b = replica(&data, &bus).await;
    assert!(
        a.log().contains("bus on NATS JetStream"),
        "replica A runs on NATS (is nats-server -js running on 127.0.0.1:4222?)\n{}",
        a.log()
    );
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&a, &key, "two replicas", 1).await;
    let sensor = fleet.sensors[0].clone();
    let spool = data.data_dir.path().join("spool");
    // Uploads every second, so the reading below reaches the database (through B) within the test.
    let options = EdgeOptions { config: "upload_interval = \"1s\"\n".into(), ..EdgeOptions::new(&b, &fleet, spool) };
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(2).await;

    // A rule created through A reaches the agent connected to B.
    let mut alerts_a = a.alert_client(&key).await;
    alerts_a
        .create_rule(alert::CreateRuleRequest {
            rule: Some(alert::Rule {
                farm_id: fleet.farm_id.clone(),
                name: "frost".into(),
                severity: smartfarm_proto::common::v1::Severity::Warning as i32,
                metric: "temperature".into(),
                condition: Some(alert::rule::Condition::Threshold(alert::ThresholdCondition {
                    direction: alert::ThresholdDirection::Below as i32,
                    limit: 0.0,
                    for_duration: None,
                })),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async { edge.metric("smartfarm_edge_rules").await >= 1.0 }).await,
        "the rule crossed from A to B's link\n{}",
        b.log()
    );

    // A command sent through A reaches the device through B; a watch on A sees the device's answer.
    let topic = format!("smartfarm/{}/commands", sensor.device_id);
    let mut device = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, &topic).await;
    let mut commands_a = a.command_client(&key).await;
    let sent = commands_a.send_command(send_request(&sensor.device_id, "open_vent")).await.unwrap();
    let sent = sent.into_inner().command.unwrap();
    let mut watch = commands_a
        .watch_command(command::WatchCommandRequest { command_id: sent.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let received = device.next(Duration::from_secs(10)).await.expect("the command crossed replicas");
    assert!(received.contains(&sent.id), "{received}");
    let ack = format!(r#"{{"id": "{}", "status": "ok"}}"#, sent.id);
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &format!("{topic}/ack"), &ack).await;
    let mut last = 0;
    while let Ok(Some(change)) = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap() {
        last = change.receipt.unwrap().status;
    }
    assert_eq!(last, command::CommandStatus::Acked as i32, "the watch on A saw the acknowledgement B recorded");

    // An alert the agent raises through B reaches a subscriber on A.
    let mut stream = alerts_a
        .subscribe(alert::SubscribeRequest { farm_id: fleet.farm_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": -3}}"#)
        .await;
    let event = next_alert_event(&mut stream, Duration::from_secs(10)).await.expect("the alert crossed from B to A");
    assert_eq!(event.event_type, alert::AlertEventType::Opened as i32);
    assert_eq!(event.alert.unwrap().origin, alert::AlertOrigin::Edge as i32);

    // The batch that carried the reading, committed by B, is scored by B; A hears of it and leaves it to B.
    let scored_by_b_left_by_a = || async {
        b.metric("smartfarm_inference_batches_scored_total").await >= 1.0
            && a.metric("smartfarm_inference_batches_left_to_their_replica_total").await >= 1.0
    };
    assert!(
        eventually(Duration::from_secs(20), scored_by_b_left_by_a).await,
        "B scored its batch and A left it to B\n{}",
        a.http_get("/metrics").await
    );
    assert_eq!(a.metric("smartfarm_inference_batches_scored_total").await, 0.0);

    // A command A acknowledged to its caller survives A's death right after.
    let last_words = commands_a.send_command(send_request(&sensor.device_id, "close_vent")).await.unwrap();
    let last_words = last_words.into_inner().command.unwrap();
    drop(stream);
    a.kill9().await;
    // Sent on by A's bus before it died, or read from the database at B's next refresh.
    let received = device.next(Duration::from_secs(40)).await.expect("B delivered the dead replica's command");
    assert!(received.contains(&last_words.id), "{received}");
    device.stop().await;
    edge.stop().await;
    b.stop().await;
    remove_nats_streams(&bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photos_and_batches_of_a_replica_without_the_inference_role_are_handled_once_by_one_that_runs_it() {
    let data = CloudData::new(Backend::Postgres).await;
    let bus = nats_url();
    let a = replica(&data, &bus).await;
    let c = replica(&data, &bus).await;
    let b = replica_with_roles(&data, &bus, Some("device,ingestion,image,alert,command")).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&a, &key, "ingestion apart", 1).await;
    let camera = fleet.register_camera(&a, &key, "row 1 camera").await;
    let sensor = fleet.sensors[0].clone();
    let spool = data.data_dir.path().join("spool");
    let camera_dir = data.data_dir.path().join("camera-1");
    let options = EdgeOptions {
        // The cloud diagnoses the photo, not the agent.
        config: "upload_interval = \"1s\"\ncamera_poll_interval = \"200ms\"\ndiagnose_photos = false\n".into(),
        args: vec!["--camera-dir".into(), format!("{camera}={}", camera_dir.display())],
        ..EdgeOptions::new(&b, &fleet, spool)
    };
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(3).await;

    // A few batches, a second apart, committed by B, which does not run the inference role.
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    for value in [20, 21, 22] {
        let acked_before = edge.metric("smartfarm_edge_batches_acked_total").await;
        let payload = format!(r#"{{"metrics": {{"temperature": {value}}}}}"#);
        mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, &payload).await;
        assert!(
            eventually(Duration::from_secs(20), || async {
                edge.metric("smartfarm_edge_batches_acked_total").await > acked_before
            })
            .await,
            "the batch was committed\n{}",
            b.log()
        );
    }

    // B handed each out as work; A and C scored each once between them, and each left B's announcement alone.
    let tally = || async {
        let (a, b, c) = (a.http_get("/metrics").await, b.http_get("/metrics").await, c.http_get("/metrics").await);
        let scored = |page: &str| metric_value(page, "smartfarm_inference_batches_scored_total");
        let left = |page: &str| metric_value(page, "smartfarm_inference_batches_left_to_their_replica_total");
        (metric_value(&b, "smartfarm_ingest_batches_handed_out_total"), scored(&a), scored(&c), left(&a), left(&c))
    };
    let all_scored = || async {
        let (handed_out, by_a, by_c, left_by_a, left_by_c) = tally().await;
        handed_out >= 3.0 && by_a + by_c == handed_out && left_by_a == handed_out && left_by_c == handed_out
    };
    assert!(
        eventually(Duration::from_secs(30), all_scored).await,
        "(handed out, scored by A, by C, left by A, by C) = {:?}",
        tally().await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (handed_out, by_a, by_c, _, _) = tally().await;
    assert_eq!(by_a + by_c, handed_out, "nothing was scored twice (A {by_a}, C {by_c})");
    assert_eq!(b.metric("smartfarm_inference_batches_scored_total").await, 0.0);

    // A photo stored by B is diagnosed by A or C, not both.
    smartfarm_edge::sim::drop_photos(&camera_dir, &[("leaf.jpg", &leaf())]).unwrap();
    let diagnosed = || async {
        let diagnosed = |page: String| metric_value(&page, "smartfarm_inference_images_diagnosed_total");
        (diagnosed(a.http_get("/metrics").await), diagnosed(c.http_get("/metrics").await))
    };
    assert!(
        eventually(Duration::from_secs(60), || async {
            let (by_a, by_c) = diagnosed().await;
            by_a + by_c >= 1.0
        })
        .await,
        "the photo was diagnosed\n{}",
        b.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (by_a, by_c) = diagnosed().await;
    assert_eq!(by_a + by_c, 1.0, "diagnosed once (A {by_a}, C {by_c})");
    edge.stop().await;
    for replica in [a, b, c] {
        replica.stop().await;
    }
    remove_nats_streams(&bus).await;
}
