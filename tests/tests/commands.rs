//! Live commands end to end: a command reaches its device's topic on the farm's agent (read by Mosquitto's own
//! client) and the device's acknowledgement closes it; a command whose TTL passes while the agent is down expires
//! and is never delivered; a command redelivered after a kill -9 of the agent (between delivery and the device's
//! acknowledgement) runs once; a device registered a moment before its first command gets it. Bad requests are
//! refused with the field named.

use std::time::Duration;

use tonic::Code;

use smartfarm_e2e::alerting::{CommandClient, MqttWatch, mosquitto_pub};
use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet, eventually};
use smartfarm_e2e::{Backend, Cloud, CloudData, CloudOptions, bootstrap_admin_key, free_port};
use smartfarm_proto::command::v1 as pb;
use smartfarm_proto::pbjson_types;

pub fn ttl(seconds: i64) -> Option<pbjson_types::Duration> {
    Some(pbjson_types::Duration { seconds, nanos: 0 })
}

async fn send(commands: &mut CommandClient, device_id: &str, name: &str, seconds: i64) -> pb::Command {
    let parameters: pbjson_types::Struct = serde_json::from_str(r#"{"valve": 3, "minutes": 10}"#).unwrap();
    commands
        .send_command(pb::SendCommandRequest {
            device_id: device_id.into(),
            name: name.into(),
            parameters: Some(parameters),
            ttl: ttl(seconds),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .command
        .unwrap()
}

async fn status_of(commands: &mut CommandClient, id: &str) -> i32 {
    commands
        .get_command(pb::GetCommandRequest { command_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .command
        .unwrap()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_their_device_once_and_never_after_their_ttl() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "irrigation", 1).await;
    let mut commands = cloud.command_client(&key).await;
    let sensor = fleet.sensors[0].clone();
    let options = EdgeOptions {
        mqtt_port: Some(free_port()),
        ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool"))
    };
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(2).await;
    let topic = format!("smartfarm/{}/commands", sensor.device_id);
    let ack_topic = format!("{topic}/ack");
    let mut device = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, &topic).await;

    // Sent, delivered, acknowledged; WatchCommand follows it to the end.
    let command = send(&mut commands, &sensor.device_id, "open_valve", 60).await;
    assert_eq!(command.status, pb::CommandStatus::Queued as i32);
    let mut watch =
        commands.watch_command(pb::WatchCommandRequest { command_id: command.id.clone() }).await.unwrap().into_inner();
    let received: serde_json::Value =
        serde_json::from_str(&device.next(Duration::from_secs(10)).await.expect("the device gets its command"))
            .unwrap();
    assert_eq!((received["id"].as_str(), received["name"].as_str()), (Some(command.id.as_str()), Some("open_valve")));
    assert_eq!(received["parameters"]["valve"], 3.0);
    let ack = format!(r#"{{"id": "{}", "status": "ok", "detail": "valve 3 open"}}"#, command.id);
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &ack_topic, &ack).await;
    let mut seen = Vec::new();
    while let Ok(Some(change)) = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap() {
        seen.push(change.receipt.unwrap().status);
    }
    assert_eq!(seen.last(), Some(&(pb::CommandStatus::Acked as i32)), "{seen:?}");
    assert!(seen.contains(&(pb::CommandStatus::Delivered as i32)) || seen[0] > pb::CommandStatus::Delivered as i32);
    let stored = commands.get_command(pb::GetCommandRequest { command_id: command.id.clone() }).await.unwrap();
    let stored = stored.into_inner().command.unwrap();
    assert_eq!((stored.status, stored.status_detail.as_str()), (pb::CommandStatus::Acked as i32, "valve 3 open"));
    let history: Vec<i32> = stored.history.iter().map(|receipt| receipt.status).collect();
    assert_eq!(history, [1, 2, 3, 4], "queued, sent, delivered, acked");

    // A device registered a moment ago (well inside the link's registry refresh interval): its first command
    // reaches the agent after the registry that names it, is held until the device listens, and then delivered.
    let newcomer = smartfarm_edge::sim::provision(&format!("http://{}", cloud.addr), &key, &fleet.farm_id, 1, "late")
        .await
        .unwrap()
        .remove(0);
    let first = send(&mut commands, &newcomer.device_id, "open_valve", 60).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut commands = commands.clone();
            let id = first.id.clone();
            async move { status_of(&mut commands, &id).await == pb::CommandStatus::Delivered as i32 }
        })
        .await,
        "the agent took the command for its new device (status {})\n{}",
        status_of(&mut commands, &first.id).await,
        edge.log()
    );
    let newcomer_topic = format!("smartfarm/{}/commands", newcomer.device_id);
    let mut newcomer_device =
        MqttWatch::start(edge.mqtt, &newcomer.device_id, &newcomer.credential, &newcomer_topic).await;
    let received = newcomer_device.next(Duration::from_secs(10)).await.expect("the new device gets its command");
    assert!(received.contains(&first.id), "{received}");
    newcomer_device.stop().await;

    // kill -9 after delivery, before the device answers: the cloud sends it again at the next connection, and
    // the agent's command book keeps it from running twice.
    let second = send(&mut commands, &sensor.device_id, "close_valve", 120).await;
    assert!(device.next(Duration::from_secs(10)).await.expect("delivered").contains(&second.id));
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut commands = commands.clone();
            let id = second.id.clone();
            async move { status_of(&mut commands, &id).await == pb::CommandStatus::Delivered as i32 }
        })
        .await
    );
    edge.kill9().await;
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(2).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            edge.metric("smartfarm_edge_commands_total{outcome=\"answered_from_book\"}").await >= 1.0
        })
        .await,
        "the cloud sent the unanswered command again and the book answered it\n{}",
        edge.log()
    );
    let again = device.drain(Duration::from_secs(3)).await;
    assert!(again.iter().all(|message| !message.contains(&second.id)), "run once: {again:?}");
    let ack = format!(r#"{{"id": "{}", "status": "error", "detail": "valve stuck"}}"#, second.id);
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &ack_topic, &ack).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut commands = commands.clone();
            let id = second.id.clone();
            async move { status_of(&mut commands, &id).await == pb::CommandStatus::Failed as i32 }
        })
        .await
    );

    // With the agent down, a command with a 2 s TTL expires and never reaches the device.
    edge.stop().await;
    let late = send(&mut commands, &sensor.device_id, "open_valve", 2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut commands = commands.clone();
            let id = late.id.clone();
            async move { status_of(&mut commands, &id).await == pb::CommandStatus::Expired as i32 }
        })
        .await
    );
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(2).await;
    let after = device.drain(Duration::from_secs(3)).await;
    assert!(after.iter().all(|message| !message.contains(&late.id)), "never delivered: {after:?}");
    assert_eq!(status_of(&mut commands, &late.id).await, pb::CommandStatus::Expired as i32);
    device.stop().await;
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_are_refused_with_the_field_named() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "refusals", 1).await;
    let mut commands = cloud.command_client(&key).await;
    let device = fleet.sensors[0].device_id.clone();
    let request = |device_id: &str, name: &str, ttl: Option<pbjson_types::Duration>| pb::SendCommandRequest {
        device_id: device_id.into(),
        name: name.into(),
        parameters: None,
        ttl,
        request_id: String::new(),
    };
    let cases = [
        (request(&uuid::Uuid::now_v7().to_string(), "open_valve", ttl(60)), Code::NotFound, "device"),
        (request("not-an-id", "open_valve", ttl(60)), Code::InvalidArgument, "device_id:"),
        (request(&device, "", ttl(60)), Code::InvalidArgument, "name:"),
        (request(&device, "Open Valve!", ttl(60)), Code::InvalidArgument, "name:"),
        (request(&device, "open_valve", ttl(0)), Code::InvalidArgument, "ttl:"),
        (request(&device, "open_valve", None), Code::InvalidArgument, "ttl:"),
        (request(&device, "open_valve", ttl(10 * 365 * 24 * 3600)), Code::InvalidArgument, "ttl:"),
    ];
    for (request, code, start) in cases {
        let status = commands.send_command(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {}", status.message());
        assert!(status.message().starts_with(start), "{request:?}: {}", status.message());
    }
    // A retry with the same request id is the same command.
    let mut retried = request(&device, "open_valve", ttl(60));
    retried.request_id = "irrigation-42".into();
    let first = commands.send_command(retried.clone()).await.unwrap().into_inner().command.unwrap();
    let second = commands.send_command(retried).await.unwrap().into_inner().command.unwrap();
    assert_eq!(first.id, second.id);
    cloud.stop().await;
}
