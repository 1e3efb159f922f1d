//! Alerts end to end: one rule defined in the cloud runs on the farm's agent and in the cloud. A reading over the
//! threshold, published by Mosquitto's own client to the agent, reaches the farm's alert topic, a cloud `Subscribe`
//! stream and a signed webhook once each; with the link down the farm still gets its alert at once, and the cloud's
//! copy arrives when the link returns, as the same alert. Bad rules and webhooks are refused with the field named.

use std::time::Duration;

use tonic::Code;

use smartfarm_e2e::alerting::{AlertClient, MqttWatch, WebhookReceiver, mosquitto_pub, next_alert_event};
use smartfarm_e2e::edge::{Edge, EdgeOptions, Fleet, eventually};
use smartfarm_e2e::{Backend, Cloud, CloudData, CloudOptions, bootstrap_admin_key};
use smartfarm_proto::alert::v1 as pb;
use smartfarm_proto::pbjson_types;

/// The farm's alerts, newest first (the first page).
async fn farm_alerts(alerts: &AlertClient, farm_id: &str) -> Vec<pb::Alert> {
    let request = pb::ListAlertsRequest { farm_id: farm_id.into(), ..Default::default() };
    alerts.clone().list_alerts(request).await.expect("list alerts").into_inner().alerts
}

/// A rule on the plant-disease model's verdicts, any disease at 80 % or more.
fn verdict_rule(farm_id: &str) -> pb::Rule {
    pb::Rule {
        farm_id: farm_id.into(),
        name: "disease on the leaves".into(),
        severity: smartfarm_proto::common::v1::Severity::Critical as i32,
        condition: Some(pb::rule::Condition::ModelVerdict(pb::ModelVerdictCondition {
            disease_labels: vec![],
            min_confidence: 0.8,
            on_sensor_anomaly: true,
        })),
        ..Default::default()
    }
}

/// A fixture photo of an apple leaf with black rot (PlantVillage; see services/ml/fixtures).
fn black_rot_leaf() -> Vec<u8> {
    first_leaf_of("Apple___Black_rot")
}

/// The first photo (by file name) of a class of the PlantVillage fixtures.
fn first_leaf_of(class: &str) -> Vec<u8> {
    let leaf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/ml/fixtures/plants").join(class);
    let mut leaves: Vec<_> = std::fs::read_dir(leaf_dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    leaves.sort();
    std::fs::read(&leaves[0]).unwrap()
}

/// The next alert on a farm's `smartfarm/alerts` topic within `wait` (the topic's other messages skipped).
async fn next_farm_alert(topic: &mut MqttWatch, wait: Duration) -> Option<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let message: serde_json::Value = serde_json::from_str(&topic.next(left).await?).unwrap();
        if message["kind"] == "alert" {
            return Some(message);
        }
    }
}

fn hot_rule(farm_id: &str) -> pb::Rule {
    pb::Rule {
        farm_id: farm_id.to_string(),
        name: "greenhouse too hot".into(),
        severity: smartfarm_proto::common::v1::Severity::Critical as i32,
        metric: "temperature".into(),
        condition: Some(pb::rule::Condition::Threshold(pb::ThresholdCondition {
            direction: pb::ThresholdDirection::Above as i32,
            limit: 40.0,
            for_duration: None,
        })),
        ..Default::default()
    }
}

/// Starts the farm's agent, uploading every second, and waits until it has the farm's registry (the gateway and one
/// sensor) and its rules; returns it with the options it was started with.
async fn agent_with_rules(cloud: &Cloud, fleet: &Fleet, data: &CloudData) -> (Edge, EdgeOptions) {
    let spool = data.data_dir.path().join("spool");
    let options = EdgeOptions { config: "upload_interval = \"1s\"\n".into(), ..EdgeOptions::new(cloud, fleet, spool) };
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(2).await;
    assert!(
        eventually(Duration::from_secs(30), || async { edge.metric("smartfarm_edge_rules").await >= 1.0 }).await,
        "the rule reached the agent\n{}",
        edge.log()
    );
    (edge, options)
}

/// What a receiver checks: HMAC-SHA256 of `<timestamp>.<body>`, by hand (RFC 2104) so the test does not trust the
/// server's code for it.
fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut key = secret.as_bytes().to_vec();
    key.resize(64, 0);
    let inner: Vec<u8> = key.iter().map(|b| b ^ 0x36).collect();
    let outer: Vec<u8> = key.iter().map(|b| b ^ 0x5c).collect();
    let inner_hash =
        Sha256::new().chain_update(&inner).chain_update(format!("{timestamp}.")).chain_update(body).finalize();
    let mac = Sha256::new().chain_update(&outer).chain_update(inner_hash).finalize();
    format!("sha256={}", hex::encode(mac))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_reading_alerts_the_farm_a_subscriber_and_a_webhook_once_each_link_up_or_down() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "greenhouse", 1).await;
    let mut alerts = cloud.alert_client(&key).await;
    alerts.create_rule(pb::CreateRuleRequest { rule: Some(hot_rule(&fleet.farm_id)) }).await.unwrap();
    let mut receiver = WebhookReceiver::start().await;
    let created = alerts
        .create_webhook(pb::CreateWebhookRequest {
            farm_id: fleet.farm_id.clone(),
            url: receiver.url(),
            min_severity: smartfarm_proto::common::v1::Severity::Warning as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = alerts
        .subscribe(pb::SubscribeRequest { farm_id: fleet.farm_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    let (edge, _) = agent_with_rules(&cloud, &fleet, &data).await;
    let sensor = &fleet.sensors[0];
    let mut farm_topic = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, "smartfarm/alerts").await;
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 21}}"#)
        .await;
    mosquitto_pub(
        edge.mqtt,
        &sensor.device_id,
        &sensor.credential,
        &telemetry,
        r#"{"metrics": {"temperature": 45.5}}"#,
    )
    .await;

    // On the farm.
    let local = farm_topic.next(Duration::from_secs(10)).await.expect("the farm's alert topic says it");
    let local: serde_json::Value = serde_json::from_str(&local).unwrap();
    assert_eq!((local["kind"].as_str(), local["state"].as_str()), (Some("alert"), Some("ALERT_STATE_OPEN")), "{local}");
    assert_eq!(local["severity"], "SEVERITY_CRITICAL", "{local}");
    assert_eq!(local["value"], 45.5, "{local}");
    let alert_id = local["id"].as_str().unwrap().to_string();

    // On the cloud's stream.
    let event = next_alert_event(&mut stream, Duration::from_secs(10)).await.expect("the stream says it");
    assert_eq!(event.event_type, pb::AlertEventType::Opened as i32);
    let streamed = event.alert.unwrap();
    assert_eq!((streamed.id.as_str(), streamed.origin), (alert_id.as_str(), pb::AlertOrigin::Edge as i32));

    // On the webhook, signed.
    let delivery = receiver.next(Duration::from_secs(10)).await.expect("the webhook is called");
    let timestamp: u64 = delivery.header("x-smartfarm-timestamp").expect("a timestamp").parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(timestamp.abs_diff(now) < 60, "signed now: {timestamp} against {now}");
    assert_eq!(
        delivery.header("x-smartfarm-signature"),
        Some(signature(&created.signing_secret, timestamp, &delivery.body).as_str()),
        "the time and the body signed with the secret CreateWebhook returned"
    );
    let body = delivery.json();
    assert_eq!(
        (body["event_type"].as_str(), body["alert"]["id"].as_str()),
        (Some("ALERT_EVENT_TYPE_OPENED"), Some(alert_id.as_str()))
    );

    // The batch with the same reading reaches the cloud, which raises the same alert: still one alert, said once.
    assert!(
        eventually(Duration::from_secs(20), || async {
            edge.metric("smartfarm_edge_batches_acked_total").await >= 1.0
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(farm_topic.drain(Duration::from_millis(500)).await.is_empty(), "the farm heard it once");
    assert!(receiver.next(Duration::from_millis(500)).await.is_none(), "the webhook was called once");
    assert_eq!(next_alert_event(&mut stream, Duration::from_millis(500)).await, None, "streamed once");
    let listed = farm_alerts(&alerts, &fleet.farm_id).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].id.as_str(), listed[0].count), (alert_id.as_str(), 1));

    // The value falls back: the alert resolves, everywhere.
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 30}}"#)
        .await;
    let resolved: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(10)).await.expect("resolution on the farm")).unwrap();
    assert_eq!(resolved["state"], "ALERT_STATE_RESOLVED", "{resolved}");
    let event = next_alert_event(&mut stream, Duration::from_secs(10)).await.expect("the stream says it resolved");
    assert_eq!(event.event_type, pb::AlertEventType::Resolved as i32);
    let cursor = event.cursor.clone();

    // The link goes down. The farm still gets its alert at once.
    let cloud_addr = cloud.addr;
    drop(stream);
    cloud.stop().await;
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 48}}"#)
        .await;
    let offline: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(5)).await.expect("an alert with the link down"))
            .unwrap();
    assert_eq!(offline["state"], "ALERT_STATE_OPEN", "{offline}");
    let offline_id = offline["id"].as_str().unwrap().to_string();
    assert_ne!(offline_id, alert_id);

    // The cloud comes back: its copy arrives (from the urgent lane and from the batch): one alert, not two. (The
    // count of acknowledged batches is read while nothing can be acknowledged: the batch may well beat the event.)
    let acked_before = edge.metric("smartfarm_edge_batches_acked_total").await;
    let cloud = Cloud::start(&data, CloudOptions { listen: Some(cloud_addr), ..Default::default() }).await;
    let mut alerts = cloud.alert_client(&key).await;
    let mut stream = alerts
        .subscribe(pb::SubscribeRequest { farm_id: fleet.farm_id.clone(), cursor, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let event =
        next_alert_event(&mut stream, Duration::from_secs(30)).await.expect("the stream resumes from its cursor");
    assert_eq!((event.event_type, event.alert.unwrap().id), (pb::AlertEventType::Opened as i32, offline_id.clone()));
    assert!(
        eventually(Duration::from_secs(30), || async {
            edge.metric("smartfarm_edge_batches_acked_total").await > acked_before
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed = farm_alerts(&alerts, &fleet.farm_id).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!((listed[0].id.as_str(), listed[0].count), (offline_id.as_str(), 1), "newest first");
    // The stopped process held the webhook's lease: the new one takes over when it runs out (timeout + 5 s).
    let delivery = receiver.next(Duration::from_secs(30)).await;
    assert!(delivery.is_some(), "webhook deliveries resume after the cloud restarts");
    edge.stop().await;
    cloud.stop().await;
}

/// A farm key is refused another farm's rules and its devices' commands with PERMISSION_DENIED, as it is
/// another farm's devices.
#[tokio::test]
async fn a_farm_key_is_denied_another_farm_s_rules_and_commands() {
    use smartfarm_proto::command::v1 as command_pb;
    use smartfarm_proto::device::v1 as device_pb;
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let admin_key = bootstrap_admin_key(&data);
    let (ours, theirs) =
        (Fleet::register(&cloud, &admin_key, "ours", 1).await, Fleet::register(&cloud, &admin_key, "theirs", 1).await);
    let mut admin = cloud.device_client(&admin_key).await;
    let farm_key = admin
        .create_api_key(device_pb::CreateApiKeyRequest { name: "ours".into(), farm_id: ours.farm_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut as_admin = cloud.alert_client(&admin_key).await;
    let their_rule = as_admin.create_rule(pb::CreateRuleRequest { rule: Some(hot_rule(&theirs.farm_id)) }).await;
    let their_rule = their_rule.unwrap().into_inner().rule.unwrap().id;
    let mut as_ours = cloud.alert_client(&farm_key).await;
    let denied = as_ours.delete_rule(pb::DeleteRuleRequest { rule_id: their_rule }).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let mut commands = cloud.command_client(&farm_key).await;
    let send = command_pb::SendCommandRequest {
        device_id: theirs.sensors[0].device_id.clone(),
        name: "open_valve".into(),
        parameters: None,
        ttl: Some(pbjson_types::Duration { seconds: 60, nanos: 0 }),
        request_id: String::new(),
    };
    let denied = commands.send_command(send).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    cloud.stop().await;
}

/// A Subscribe stream and a WatchCommand stream live on after the call that opened them was checked: they end once
/// their API key is revoked.
#[tokio::test]
async fn a_subscription_and_a_command_watch_end_when_their_api_key_is_revoked() {
    use smartfarm_proto::command::v1 as command_pb;
    use smartfarm_proto::device::v1 as device_pb;
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let admin_key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &admin_key, "revocation", 1).await;
    let mut admin = cloud.device_client(&admin_key).await;
    let farm_key = admin
        .create_api_key(device_pb::CreateApiKeyRequest { name: "dashboard".into(), farm_id: fleet.farm_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut alerts = cloud.alert_client(&farm_key.secret).await;
    let request = pb::SubscribeRequest { farm_id: fleet.farm_id.clone(), ..Default::default() };
    let mut stream = alerts.subscribe(request).await.unwrap().into_inner();
    // A command for a farm whose agent is away: it stays queued, and its watch open.
    let mut commands = cloud.command_client(&farm_key.secret).await;
    let send = command_pb::SendCommandRequest {
        device_id: fleet.sensors[0].device_id.clone(),
        name: "open_valve".into(),
        parameters: None,
        ttl: Some(pbjson_types::Duration { seconds: 3600, nanos: 0 }),
        request_id: String::new(),
    };
    let command_id = commands.send_command(send).await.unwrap().into_inner().command.unwrap().id;
    let mut watch = commands.watch_command(command_pb::WatchCommandRequest { command_id }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().expect("the current status first");
    assert_eq!(first.receipt.unwrap().status, command_pb::CommandStatus::Queued as i32);

    let revoked = std::time::Instant::now();
    let key_id = farm_key.api_key.unwrap().id;
    admin.revoke_api_key(device_pb::RevokeApiKeyRequest { api_key_id: key_id }).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), stream.message()).await.expect("the stream ends");
    let status = ended.expect_err("ended by the revocation");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let ended = tokio::time::timeout(Duration::from_secs(15), watch.message()).await.expect("the watch ends");
    let status = ended.expect_err("ended by the revocation");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(revoked.elapsed() < Duration::from_secs(10), "within the recheck interval: {:?}", revoked.elapsed());
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_and_webhooks_are_refused_and_a_failing_webhook_is_marked_then_recovers() {
    let data = CloudData::new(Backend::Sqlite).await;
    let config = "[alerts]\nwebhook_retry_min = \"50ms\"\nwebhook_retry_max = \"200ms\"\nwebhook_max_failures = 2\n";
    let cloud = Cloud::start(&data, CloudOptions { config: Some(config.into()), ..Default::default() }).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "checks", 1).await;
    let mut alerts = cloud.alert_client(&key).await;

    let refusal = |status: tonic::Status| (status.code(), status.message().to_string());
    let mut bad = hot_rule(&fleet.farm_id);
    bad.metric = "Temperature (C)".into();
    let (code, message) = refusal(alerts.create_rule(pb::CreateRuleRequest { rule: Some(bad) }).await.unwrap_err());
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.starts_with("rule.metric:"), "{message}");
    let mut bad = hot_rule(&fleet.farm_id);
    bad.cooldown = Some(pbjson_types::Duration { seconds: -5, nanos: 0 });
    let (code, message) = refusal(alerts.create_rule(pb::CreateRuleRequest { rule: Some(bad) }).await.unwrap_err());
    assert_eq!((code, message.starts_with("rule.cooldown:")), (Code::InvalidArgument, true), "{message}");
    for (url, field) in [
        ("ftp://example.com/hook", "url:"),
        ("http://169.254.169.254/latest/meta-data/", "url:"),
        ("http://[fe80::1]:8080/hook", "url:"),
    ] {
        let (code, message) = refusal(
            alerts
                .create_webhook(pb::CreateWebhookRequest {
                    farm_id: fleet.farm_id.clone(),
                    url: url.into(),
                    min_severity: 0,
                })
                .await
                .unwrap_err(),
        );
        assert_eq!(code, Code::InvalidArgument, "{url}: {message}");
        assert!(message.starts_with(field), "{url}: {message}");
    }

    // A webhook whose endpoint fails is retried, marked failing after two failures, and recovers.
    let rule = alerts.create_rule(pb::CreateRuleRequest { rule: Some(hot_rule(&fleet.farm_id)) }).await.unwrap();
    let rule_id = rule.into_inner().rule.unwrap().id;
    let mut receiver = WebhookReceiver::start().await;
    receiver.answer_with(&[500, 503, 500, 500, 500, 500]);
    let webhook = alerts
        .create_webhook(pb::CreateWebhookRequest {
            farm_id: fleet.farm_id.clone(),
            url: receiver.url(),
            min_severity: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .webhook
        .unwrap();
    let (edge, _) = agent_with_rules(&cloud, &fleet, &data).await;
    let sensor = &fleet.sensors[0];
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 41}}"#)
        .await;
    let webhook_now = || {
        let mut alerts = alerts.clone();
        let farm_id = fleet.farm_id.clone();
        async move {
            alerts
                .list_webhooks(pb::ListWebhooksRequest { farm_id, ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .webhooks
                .remove(0)
        }
    };
    let mut attempts = Vec::new();
    for _ in 0..3 {
        attempts.push(receiver.next(Duration::from_secs(10)).await.expect("an attempt").json());
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            let now = webhook_now().await;
            now.state == pb::WebhookState::Failing as i32 && now.last_error.contains("500")
        })
        .await,
        "after two failures in a row the webhook shows as failing, with its last error"
    );
    for _ in 0..4 {
        attempts.push(receiver.next(Duration::from_secs(10)).await.expect("an attempt").json());
    }
    assert!(attempts.iter().all(|body| body["cursor"] == attempts[0]["cursor"]), "the same event, retried");
    assert_eq!(attempts[0]["alert"]["ruleId"], rule_id.as_str(), "the alert in the proto3 JSON mapping");
    assert_eq!(webhook_now().await.id, webhook.id);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let now = webhook_now().await;
            now.state == pb::WebhookState::Healthy as i32 && now.last_success_time.is_some()
        })
        .await,
        "the seventh attempt succeeded and the webhook is healthy again"
    );
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diseased_leaf_raises_the_model_verdict_rule_with_the_photo_as_evidence_and_the_farm_hears_it() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "orchard", 1).await;
    let camera = fleet.register_camera(&cloud, &key, "row 3 camera").await;
    let mut alerts = cloud.alert_client(&key).await;
    let rule = verdict_rule(&fleet.farm_id);
    let rule_id =
        alerts.create_rule(pb::CreateRuleRequest { rule: Some(rule) }).await.unwrap().into_inner().rule.unwrap().id;
    let camera_dir = data.data_dir.path().join("camera-3");
    let edge = Edge::start(&EdgeOptions {
        // The cloud diagnoses here (the agent's own diagnosis is the AI tests' subject).
        config: "diagnose_photos = false\ncamera_poll_interval = \"200ms\"\n".into(),
        args: vec!["--camera-dir".into(), format!("{camera}={}", camera_dir.display())],
        ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool"))
    })
    .await;
    edge.wait_for_registry(3).await;
    let sensor = &fleet.sensors[0];
    let mut farm_topic = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, "smartfarm/alerts").await;

    smartfarm_edge::sim::drop_photos(&camera_dir, &[("leaf.jpg", &black_rot_leaf())]).unwrap();

    let heard = farm_topic.next(Duration::from_secs(60)).await.expect("the cloud's alert reaches the farm's topic");
    let heard: serde_json::Value = serde_json::from_str(&heard).unwrap();
    assert_eq!((heard["kind"].as_str(), heard["ruleId"].as_str()), (Some("alert"), Some(rule_id.as_str())), "{heard}");
    assert_eq!(heard["origin"], "ALERT_ORIGIN_CLOUD", "{heard}");
    let listed = farm_alerts(&alerts, &fleet.farm_id).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let alert = &listed[0];
    assert_eq!(alert.device_id, camera);
    assert!(alert.message.contains("Apple___Black_rot"), "{}", alert.message);
    assert!(!alert.evidence_image_id.is_empty(), "the photo is the evidence");
    // The alert role confirmed the photo's verdict, so it is not diagnosed and announced again.
    let confirmed = || async { cloud.metric("smartfarm_alert_photo_verdicts_confirmed_total").await >= 1.0 };
    assert!(eventually(Duration::from_secs(10), confirmed).await, "{}", cloud.log());
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_farms_disease_alert_is_one_alert_with_the_clouds_and_resolves_on_a_healthy_leaf() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "offline orchard", 1).await;
    let camera = fleet.register_camera(&cloud, &key, "row 5 camera").await;
    let mut alerts = cloud.alert_client(&key).await;
    let rule_id = alerts
        .create_rule(pb::CreateRuleRequest { rule: Some(verdict_rule(&fleet.farm_id)) })
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap()
        .id;
    let camera_dir = data.data_dir.path().join("camera-5");
    let edge = Edge::start(&EdgeOptions {
        // The agent diagnoses on the farm (the default with the `ai` feature).
        config: "camera_poll_interval = \"200ms\"\nupload_interval = \"1s\"\n".into(),
        args: vec!["--camera-dir".into(), format!("{camera}={}", camera_dir.display())],
        ..EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool"))
    })
    .await;
    edge.wait_for_registry(3).await;
    assert!(eventually(Duration::from_secs(30), || async { edge.metric("smartfarm_edge_rules").await >= 1.0 }).await);
    let sensor = &fleet.sensors[0];
    let mut farm_topic = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, "smartfarm/alerts").await;

    // The link is down: the farm diagnoses the photo and raises the rule's alert itself.
    let addr = cloud.addr;
    cloud.stop().await;
    smartfarm_edge::sim::drop_photos(&camera_dir, &[("leaf.jpg", &black_rot_leaf())]).unwrap();
    let heard = next_farm_alert(&mut farm_topic, Duration::from_secs(60))
        .await
        .expect("the rule's alert on the farm's topic, with the cloud down");
    assert_eq!(heard["ruleId"].as_str(), Some(rule_id.as_str()), "{heard}");
    assert_eq!(heard["deviceId"].as_str(), Some(camera.as_str()), "{heard}");
    assert_eq!(heard["origin"], "ALERT_ORIGIN_EDGE", "{heard}");
    assert!(heard["message"].as_str().is_some_and(|message| message.contains("Apple___Black_rot")), "{heard}");
    let alert_id = heard["id"].as_str().unwrap().to_string();
    assert_eq!(heard["state"], "ALERT_STATE_OPEN", "{heard}");

    // The cloud comes back: the agent's alert goes up, the photo follows, the cloud diagnoses it and raises the same
    // alert, which adds the stored photo as evidence: one alert.
    let cloud = Cloud::start(&data, CloudOptions { listen: Some(addr), ..Default::default() }).await;
    let alerts = cloud.alert_client(&key).await;
    let one_alert_with_evidence = eventually(Duration::from_secs(60), || async {
        let listed = farm_alerts(&alerts, &fleet.farm_id).await;
        listed.len() == 1 && listed[0].id == alert_id && !listed[0].evidence_image_id.is_empty()
    })
    .await;
    // (Which copy the cloud records first, and so the alert's origin, depends on whether the photo or the urgent lane
    // gets there first.)
    let listed = farm_alerts(&alerts, &fleet.farm_id).await;
    assert!(one_alert_with_evidence, "the farm's alert and the cloud's diagnosis are one alert: {listed:?}");

    // The link goes down again, and a later photo of the camera is healthy: the farm resolves the alert on its own.
    cloud.stop().await;
    smartfarm_edge::sim::drop_photos(&camera_dir, &[("leaf-later.jpg", &first_leaf_of("Apple___healthy"))]).unwrap();
    let healed = loop {
        let heard =
            next_farm_alert(&mut farm_topic, Duration::from_secs(60)).await.expect("the resolution on the farm");
        // (The cloud's copy with the evidence may have come down as an update first.)
        if heard["state"] != "ALERT_STATE_OPEN" {
            break heard;
        }
    };
    assert_eq!(
        (healed["id"].as_str(), healed["state"].as_str()),
        (Some(alert_id.as_str()), Some("ALERT_STATE_RESOLVED"))
    );

    // The cloud comes back: the resolution reaches it (up the urgent lane, and from its own diagnosis of the photo).
    let cloud = Cloud::start(&data, CloudOptions { listen: Some(addr), ..Default::default() }).await;
    let alerts = cloud.alert_client(&key).await;
    let resolved = eventually(Duration::from_secs(60), || async {
        let listed = farm_alerts(&alerts, &fleet.farm_id).await;
        listed.len() == 1 && listed[0].id == alert_id && listed[0].state == pb::AlertState::Resolved as i32
    })
    .await;
    let listed = farm_alerts(&alerts, &fleet.farm_id).await;
    assert!(resolved, "still one alert, resolved in the cloud too: {listed:?}");
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_only_the_farm_raised_during_an_outage_survives_an_agent_kill_and_reaches_the_cloud() {
    alert_only_the_farm_saw_survives_a_kill(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_that_opened_and_resolved_during_an_outage_survives_an_agent_kill_and_reaches_the_cloud() {
    alert_only_the_farm_saw_survives_a_kill(true).await;
}

/// A device-silent alert (only the agent raises those) opens while the cloud is down, and with `resolve` resolves
/// too; the agent is killed before the link returns and restarted: the cloud ends up with the alert as the farm
/// last saw it.
async fn alert_only_the_farm_saw_survives_a_kill(resolve: bool) {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "quiet field", 1).await;
    let sensor = &fleet.sensors[0];
    let mut alerts = cloud.alert_client(&key).await;
    let rule = pb::Rule {
        farm_id: fleet.farm_id.clone(),
        name: "soil probe silent".into(),
        severity: smartfarm_proto::common::v1::Severity::Warning as i32,
        device_id: sensor.device_id.clone(),
        condition: Some(pb::rule::Condition::DeviceSilent(pb::DeviceSilentCondition {
            silent_for: Some(pbjson_types::Duration { seconds: 6, nanos: 0 }),
        })),
        ..Default::default()
    };
    alerts.create_rule(pb::CreateRuleRequest { rule: Some(rule) }).await.unwrap();
    let options = EdgeOptions::new(&cloud, &fleet, data.data_dir.path().join("spool"));
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(2).await;
    assert!(eventually(Duration::from_secs(30), || async { edge.metric("smartfarm_edge_rules").await >= 1.0 }).await);
    let mut farm_topic = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, "smartfarm/alerts").await;

    // The link goes down and the probe stays silent: only the agent can notice.
    let addr = cloud.addr;
    cloud.stop().await;
    let heard: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(20)).await.expect("the silence alert")).unwrap();
    assert_eq!(
        (heard["deviceId"].as_str(), heard["origin"].as_str()),
        (Some(sensor.device_id.as_str()), Some("ALERT_ORIGIN_EDGE"))
    );
    let alert_id = heard["id"].as_str().unwrap().to_string();
    assert_eq!(
        edge.metric("smartfarm_edge_urgent_sent_total").await,
        0.0,
        "the alert was raised before the link went down (this test's timing assumes the cloud stops within 6 s)"
    );
    let mut expected = pb::AlertState::Open;
    if resolve {
        // The probe is heard again: the agent resolves the alert, still without the cloud.
        let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
        mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"moisture": 31}}"#)
            .await;
        let resolved: serde_json::Value =
            serde_json::from_str(&farm_topic.next(Duration::from_secs(10)).await.expect("the resolution")).unwrap();
        assert_eq!(
            (resolved["id"].as_str(), resolved["state"].as_str()),
            (Some(alert_id.as_str()), Some("ALERT_STATE_RESOLVED"))
        );
        expected = pb::AlertState::Resolved;
    }
    // Killed before the link returns (what it learnt is written every second), restarted, then the cloud returns.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    edge.kill9().await;
    let edge = Edge::start(&options).await;
    let cloud = Cloud::start(&data, CloudOptions { listen: Some(addr), ..Default::default() }).await;
    let alerts = cloud.alert_client(&key).await;
    let reached = eventually(Duration::from_secs(30), || async {
        let listed = farm_alerts(&alerts, &fleet.farm_id).await;
        // (After its resolution the probe is silent again: a new alert may have opened by the time the link is back.)
        listed.iter().any(|alert| alert.id == alert_id && alert.state == expected as i32)
    })
    .await;
    assert!(reached, "the farm's alert reached the cloud after the agent's restart, {expected:?}");
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_that_holds_while_the_cloud_or_the_agent_restarts_stays_one_alert() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "steady heat", 1).await;
    let mut alerts = cloud.alert_client(&key).await;
    alerts.create_rule(pb::CreateRuleRequest { rule: Some(hot_rule(&fleet.farm_id)) }).await.unwrap();
    let (edge, options) = agent_with_rules(&cloud, &fleet, &data).await;
    let sensor = &fleet.sensors[0];
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    let acked = edge.metric("smartfarm_edge_batches_acked_total").await;
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 45}}"#)
        .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            edge.metric("smartfarm_edge_batches_acked_total").await > acked
        })
        .await
    );

    // The cloud restarts (its evaluator starts afresh) while the greenhouse stays hot.
    let addr = cloud.addr;
    cloud.stop().await;
    let cloud = Cloud::start(&data, CloudOptions { listen: Some(addr), ..Default::default() }).await;
    let alerts = cloud.alert_client(&key).await;
    let acked = edge.metric("smartfarm_edge_batches_acked_total").await;
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 46}}"#)
        .await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            edge.metric("smartfarm_edge_batches_acked_total").await > acked
        })
        .await,
        "the reading after the restart reached the cloud"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let listed = farm_alerts(&alerts, &fleet.farm_id).await;
    assert_eq!(listed.len(), 1, "one condition, one alert: {listed:?}");
    assert_eq!(listed[0].state, pb::AlertState::Open as i32);
    let alert_id = listed[0].id.clone();

    // Now the agent is killed (it keeps what its evaluator learnt, written every second) and comes back while the
    // greenhouse is still hot: the farm is not alerted a second time, and the cool reading resolves the same alert.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    edge.kill9().await;
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(2).await;
    let mut farm_topic = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, "smartfarm/alerts").await;
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 47}}"#)
        .await;
    assert!(farm_topic.drain(Duration::from_secs(2)).await.is_empty(), "the same alert, not announced again");
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 20}}"#)
        .await;
    let resolved: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(10)).await.expect("the resolution")).unwrap();
    assert_eq!(
        (resolved["id"].as_str(), resolved["state"].as_str()),
        (Some(alert_id.as_str()), Some("ALERT_STATE_RESOLVED"))
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            let listed = farm_alerts(&alerts, &fleet.farm_id).await;
            listed.len() == 1 && listed[0].state == pb::AlertState::Resolved as i32
        })
        .await,
        "the cloud's record: one alert, resolved"
    );
    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_that_joined_another_and_is_sent_again_after_a_restart_stays_one_alert() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "forgetful heat", 1).await;
    let mut alerts = cloud.alert_client(&key).await;
    alerts.create_rule(pb::CreateRuleRequest { rule: Some(hot_rule(&fleet.farm_id)) }).await.unwrap();
    let spool = data.data_dir.path().join("spool");
    let options = EdgeOptions::new(&cloud, &fleet, spool.clone());
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(2).await;
    assert!(eventually(Duration::from_secs(30), || async { edge.metric("smartfarm_edge_rules").await >= 1.0 }).await);
    let sensor = &fleet.sensors[0];
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 45}}"#)
        .await;
    let open = || async {
        let listed = farm_alerts(&alerts, &fleet.farm_id).await;
        listed.len() == 1 && listed[0].state == pb::AlertState::Open as i32
    };
    assert!(eventually(Duration::from_secs(20), open).await, "the alert reached the cloud");
    let alert_id = farm_alerts(&alerts, &fleet.farm_id).await[0].id.clone();

    // The agent loses what its evaluator learnt (as after a power cut) while the greenhouse stays hot: it raises the
    // condition again under a new id, which joins the cloud's alert; then the condition clears.
    edge.stop().await;
    std::fs::remove_file(spool.join("rules-state.json")).unwrap();
    let edge = Edge::start(&options).await;
    edge.wait_for_registry(2).await;
    let mut farm_topic = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, "smartfarm/alerts").await;
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 46}}"#)
        .await;
    let again: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(10)).await.expect("raised again")).unwrap();
    assert_ne!(again["id"].as_str(), Some(alert_id.as_str()), "a new id: the agent forgot the first");
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 20}}"#)
        .await;
    let resolved = || async {
        let listed = farm_alerts(&alerts, &fleet.farm_id).await;
        listed.len() == 1 && listed[0].id == alert_id && listed[0].state == pb::AlertState::Resolved as i32
    };
    assert!(eventually(Duration::from_secs(20), resolved).await, "the copy joined the cloud's alert and resolved it");

    // After a restart the agent sends the resolved copy again, on a link that never saw the join: still one alert.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    edge.stop().await;
    let edge = Edge::start(&options).await;
    assert!(
        eventually(Duration::from_secs(20), || async { edge.metric("smartfarm_edge_urgent_sent_total").await >= 1.0 })
            .await,
        "the resolved copy went up again"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed = farm_alerts(&alerts, &fleet.farm_id).await;
    assert_eq!(listed.len(), 1, "one condition, one alert: {listed:?}");
    assert_eq!((listed[0].id.as_str(), listed[0].state), (alert_id.as_str(), pb::AlertState::Resolved as i32));
    edge.stop().await;
    cloud.stop().await;
}

/// A person resolves an alert while its condition holds; the condition clears and comes back within the rule's
/// cooldown: that is a new alert, on the farm and in the cloud, not a repeat folded into the resolved one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_that_returns_after_a_resolution_by_hand_is_a_new_alert() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "resolved by hand", 1).await;
    let mut alerts = cloud.alert_client(&key).await;
    let mut rule = hot_rule(&fleet.farm_id);
    rule.cooldown = Some(pbjson_types::Duration { seconds: 600, nanos: 0 });
    alerts.create_rule(pb::CreateRuleRequest { rule: Some(rule) }).await.unwrap();
    let (edge, _) = agent_with_rules(&cloud, &fleet, &data).await;
    let sensor = &fleet.sensors[0];
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    let mut farm_topic = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, "smartfarm/alerts").await;
    let publish = |celsius: u32| {
        let (telemetry, device, credential) = (telemetry.clone(), sensor.device_id.clone(), sensor.credential.clone());
        let mqtt = edge.mqtt;
        async move {
            let payload = format!(r#"{{"metrics": {{"temperature": {celsius}}}}}"#);
            mosquitto_pub(mqtt, &device, &credential, &telemetry, &payload).await
        }
    };

    publish(45).await;
    let opened: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(10)).await.expect("the alert")).unwrap();
    let first = opened["id"].as_str().expect("an id").to_string();
    assert!(
        eventually(Duration::from_secs(20), || async { farm_alerts(&alerts, &fleet.farm_id).await.len() == 1 }).await,
        "the cloud has the alert"
    );

    alerts.resolve_alert(pb::ResolveAlertRequest { alert_id: first.clone() }).await.unwrap();
    let resolved: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(10)).await.expect("the resolution")).unwrap();
    assert_eq!(
        (resolved["id"].as_str(), resolved["state"].as_str()),
        (Some(first.as_str()), Some("ALERT_STATE_RESOLVED")),
        "the farm hears of it"
    );

    // Cool, then hot again: well within the ten-minute cooldown.
    publish(20).await;
    publish(46).await;
    let again: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(10)).await.expect("an alert")).unwrap();
    assert_eq!(again["state"].as_str(), Some("ALERT_STATE_OPEN"), "{again}");
    assert_ne!(again["id"].as_str(), Some(first.as_str()), "a new alert, not the resolved one again: {again}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            let listed = farm_alerts(&alerts, &fleet.farm_id).await;
            let states: Vec<i32> = listed.iter().map(|alert| alert.state).collect();
            listed.len() == 2
                && states.contains(&(pb::AlertState::Open as i32))
                && states.contains(&(pb::AlertState::Resolved as i32))
        })
        .await,
        "the cloud's record: the resolved alert and the new one (the farm's and the cloud's copies of it merged): {:?}",
        farm_alerts(&alerts, &fleet.farm_id).await
    );
    farm_topic.stop().await;
    edge.stop().await;
    cloud.stop().await;
}

/// Deleting a rule ends its open alerts, on the farm and in the cloud: nothing would ever evaluate them again, and a
/// siren must not sound on for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_rule_resolves_its_open_alerts() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let fleet = Fleet::register(&cloud, &key, "rule deleted", 1).await;
    let mut alerts = cloud.alert_client(&key).await;
    let rule = alerts.create_rule(pb::CreateRuleRequest { rule: Some(hot_rule(&fleet.farm_id)) }).await.unwrap();
    let rule_id = rule.into_inner().rule.unwrap().id;
    let (edge, _) = agent_with_rules(&cloud, &fleet, &data).await;
    let sensor = &fleet.sensors[0];
    let telemetry = format!("smartfarm/{}/telemetry", sensor.device_id);
    let mut farm_topic = MqttWatch::start(edge.mqtt, &sensor.device_id, &sensor.credential, "smartfarm/alerts").await;
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 45}}"#)
        .await;
    let opened: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(10)).await.expect("the alert")).unwrap();
    let alert_id = opened["id"].as_str().expect("an id").to_string();
    assert!(
        eventually(Duration::from_secs(20), || async { farm_alerts(&alerts, &fleet.farm_id).await.len() == 1 }).await,
        "the cloud has the alert"
    );

    alerts.delete_rule(pb::DeleteRuleRequest { rule_id }).await.unwrap();
    let resolved: serde_json::Value =
        serde_json::from_str(&farm_topic.next(Duration::from_secs(10)).await.expect("the resolution")).unwrap();
    assert_eq!(
        (resolved["id"].as_str(), resolved["state"].as_str()),
        (Some(alert_id.as_str()), Some("ALERT_STATE_RESOLVED")),
        "the farm hears it is over: {resolved}"
    );
    let listed = farm_alerts(&alerts, &fleet.farm_id).await;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].id.as_str(), listed[0].state), (alert_id.as_str(), pb::AlertState::Resolved as i32));
    assert!(listed[0].resolved_by_hand, "a person's doing: {:?}", listed[0]);

    // The agent no longer evaluates the rule.
    assert!(
        eventually(Duration::from_secs(20), || async { edge.metric("smartfarm_edge_rules").await == 0.0 }).await,
        "the snapshot without the rule reached the agent"
    );
    mosquitto_pub(edge.mqtt, &sensor.device_id, &sensor.credential, &telemetry, r#"{"metrics": {"temperature": 47}}"#)
        .await;
    let said = farm_topic.next(Duration::from_secs(2)).await;
    assert!(said.is_none(), "a deleted rule raises nothing: {said:?}");
    farm_topic.stop().await;
    edge.stop().await;
    cloud.stop().await;
}
