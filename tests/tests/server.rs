//! The `smartfarm` process as operators meet it: reflection and health for grpcurl and load balancers, roles,
//! TLS, metrics, every capability answering through the gateway, the CLI's config and admin commands, and a
//! clean exit on SIGTERM (every `Cloud::stop` checks it).

use std::collections::BTreeSet;

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use smartfarm_e2e::{Backend, Bearer, Cloud, CloudData, CloudOptions, bootstrap_admin_key, run_smartfarm};
use smartfarm_proto::device::v1 as device_pb;

const SMARTFARM_SERVICES: [&str; 7] = [
    "smartfarm.alert.v1.AlertService",
    "smartfarm.command.v1.CommandService",
    "smartfarm.device.v1.DeviceService",
    "smartfarm.image.v1.ImageService",
    "smartfarm.inference.v1.InferenceService",
    "smartfarm.ingestion.v1.IngestionService",
    "smartfarm.ingestion.v1.TelemetryService",
];
const INFRASTRUCTURE: [&str; 3] =
    ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

/// The services a reflection client of one protocol version lists (v1 and v1alpha have the same shape in distinct
/// generated modules).
macro_rules! services_by_reflection {
    ($name:ident, $version:ident) => {
        async fn $name(channel: tonic::transport::Channel) -> BTreeSet<String> {
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut client = ServerReflectionClient::new(channel);
            let mut responses =
                client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
            let response = responses.next().await.unwrap().unwrap();
            match response.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
                other => panic!("unexpected reflection answer {other:?}"),
            }
        }
    };
}

services_by_reflection!(services_by_reflection_v1, v1);
services_by_reflection!(services_by_reflection_v1alpha, v1alpha);

async fn health_of(channel: tonic::transport::Channel, service: &str) -> Result<i32, tonic::Status> {
    let mut health = HealthClient::new(channel);
    health.check(HealthCheckRequest { service: service.to_string() }).await.map(|r| r.into_inner().status)
}

#[tokio::test]
async fn reflection_lists_every_service_and_health_is_serving_without_credentials() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let expected: BTreeSet<String> = SMARTFARM_SERVICES.iter().chain(&INFRASTRUCTURE).map(|s| s.to_string()).collect();
    assert_eq!(services_by_reflection_v1(cloud.channel().await).await, expected);
    assert_eq!(services_by_reflection_v1alpha(cloud.channel().await).await, expected);
    assert_eq!(health_of(cloud.channel().await, "").await.unwrap(), ServingStatus::Serving as i32);
    for service in SMARTFARM_SERVICES {
        assert_eq!(
            health_of(cloud.channel().await, service).await.unwrap(),
            ServingStatus::Serving as i32,
            "{service}"
        );
    }
    cloud.stop().await;
}

#[tokio::test]
async fn every_capability_answers_through_the_gateway() {
    use smartfarm_proto::alert::v1 as alert;
    use smartfarm_proto::command::v1 as command;
    use smartfarm_proto::inference::v1 as inference;

    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let key = bootstrap_admin_key(&data);
    let channel = cloud.channel().await;
    let bearer = Bearer::new(&key);

    // The built-in models are listed and active.
    let mut models =
        inference::inference_service_client::InferenceServiceClient::with_interceptor(channel.clone(), bearer.clone());
    let listed = models.list_models(inference::ListModelsRequest::default()).await.unwrap().into_inner().models;
    let names: BTreeSet<String> = listed.iter().map(|m| m.r#ref.as_ref().unwrap().name.clone()).collect();
    assert_eq!(names, ["leafnet-plantvillage7", "window-autoencoder"].map(String::from).into());
    assert!(listed.iter().all(|m| m.active), "{listed:?}");
    // Alerts and commands answer (a fresh installation has none).
    let mut alerts = alert::alert_service_client::AlertServiceClient::with_interceptor(channel.clone(), bearer.clone());
    let listed = alerts.list_alerts(alert::ListAlertsRequest::default()).await.unwrap().into_inner();
    assert!(listed.alerts.is_empty() && listed.next_page_token.is_empty());
    let mut commands =
        command::command_service_client::CommandServiceClient::with_interceptor(channel.clone(), bearer.clone());
    let listed = commands.list_commands(command::ListCommandsRequest::default()).await.unwrap().into_inner();
    assert!(listed.commands.is_empty());
    let status = commands.send_command(command::SendCommandRequest::default()).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "device_id: is required"), "{status:?}");

    // Authentication still comes first.
    let mut anonymous = alert::alert_service_client::AlertServiceClient::new(channel.clone());
    let status = anonymous.subscribe(alert::SubscribeRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    cloud.stop().await;
}

#[tokio::test]
async fn a_target_runs_only_its_roles() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions { target: Some("device,alert".into()), ..Default::default() }).await;
    let expected: BTreeSet<String> = ["smartfarm.device.v1.DeviceService", "smartfarm.alert.v1.AlertService"]
        .iter()
        .chain(&INFRASTRUCTURE)
        .map(|s| s.to_string())
        .collect();
    assert_eq!(services_by_reflection_v1(cloud.channel().await).await, expected);
    assert_eq!(
        health_of(cloud.channel().await, "smartfarm.device.v1.DeviceService").await.unwrap(),
        ServingStatus::Serving as i32
    );
    let not_here = health_of(cloud.channel().await, "smartfarm.image.v1.ImageService").await.unwrap_err();
    assert_eq!(not_here.code(), Code::NotFound);

    let key = bootstrap_admin_key(&data);
    let mut images = smartfarm_proto::image::v1::image_service_client::ImageServiceClient::with_interceptor(
        cloud.channel().await,
        Bearer::new(&key),
    );
    let status = images.list_images(smartfarm_proto::image::v1::ListImagesRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "a role that does not run here is not routed: {status:?}");
    cloud.stop().await;
}

#[tokio::test]
async fn settings_come_from_smartfarm_environment_variables_and_logs_can_be_json() {
    let data = CloudData::new(Backend::Sqlite).await;
    let env = vec![
        ("SMARTFARM_TARGET".to_string(), "device".to_string()),
        ("SMARTFARM_LOG_FORMAT".to_string(), "json".to_string()),
    ];
    let cloud = Cloud::start(&data, CloudOptions { env, ..Default::default() }).await;
    let expected: BTreeSet<String> =
        ["smartfarm.device.v1.DeviceService"].iter().chain(&INFRASTRUCTURE).map(|s| s.to_string()).collect();
    assert_eq!(services_by_reflection_v1(cloud.channel().await).await, expected);
    let log = cloud.log();
    let serving = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["message"] == "smartfarm serving")
        .unwrap_or_else(|| panic!("no JSON \"smartfarm serving\" line in:\n{log}"));
    assert_eq!(serving["roles"], "device");
    assert_eq!(serving["level"], "INFO");
    cloud.stop().await;
}

#[tokio::test]
async fn metrics_count_each_rpc_by_method_and_code() {
    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let mut admin = cloud.device_client(&bootstrap_admin_key(&data)).await;
    admin.create_farm(device_pb::CreateFarmRequest { name: "mike".into() }).await.unwrap();
    admin.create_farm(device_pb::CreateFarmRequest { name: "mike".into() }).await.unwrap_err();
    let mut anonymous = device_pb::device_service_client::DeviceServiceClient::new(cloud.channel().await);
    anonymous.list_farms(device_pb::ListFarmsRequest::default()).await.unwrap_err();

    let metrics = cloud.http_get("/metrics").await;
    for line in [
        r#"grpc_server_handled_total{grpc_service="smartfarm.device.v1.DeviceService",grpc_method="CreateFarm",grpc_code="OK"} 1"#,
        r#"grpc_server_handled_total{grpc_service="smartfarm.device.v1.DeviceService",grpc_method="CreateFarm",grpc_code="AlreadyExists"} 1"#,
        r#"grpc_server_handled_total{grpc_service="smartfarm.device.v1.DeviceService",grpc_method="ListFarms",grpc_code="Unauthenticated"} 1"#,
        r#"grpc_server_handling_seconds_count{grpc_service="smartfarm.device.v1.DeviceService",grpc_method="CreateFarm"} 2"#,
        r#"smartfarm_auth_rejections_total{reason="unauthenticated"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line}\n{metrics}");
    }
    assert_eq!(cloud.http_get("/healthz").await, "ok\n");
    cloud.stop().await;
}

#[tokio::test]
async fn the_listener_speaks_tls_when_given_a_certificate() {
    let data = CloudData::new(Backend::Sqlite).await;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = data.data_dir.path().join("tls.crt");
    let key_path = data.data_dir.path().join("tls.key");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let cloud = Cloud::start(&data, CloudOptions { tls: Some((cert_path, key_path)), ..Default::default() }).await;

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(certified.cert.pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", cloud.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(health_of(channel.clone(), "").await.unwrap(), ServingStatus::Serving as i32);
    let mut admin = device_pb::device_service_client::DeviceServiceClient::with_interceptor(
        channel,
        Bearer::new(&bootstrap_admin_key(&data)),
    );
    admin.create_farm(device_pb::CreateFarmRequest { name: "secure".into() }).await.unwrap();

    // A plaintext client gets nowhere.
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{}", cloud.addr)).unwrap().connect().await;
    if let Ok(channel) = plaintext {
        assert!(health_of(channel, "").await.is_err(), "plaintext must not be served on a TLS listener");
    }
    cloud.stop().await;
}

#[tokio::test]
async fn bad_tls_files_stop_the_start_with_a_reason() {
    let data = CloudData::new(Backend::Sqlite).await;
    let missing = data.data_dir.path().join("missing.pem");
    let (ok, _, stderr) = run_smartfarm(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.data_dir.path().to_str().unwrap(),
        "--tls-cert",
        missing.to_str().unwrap(),
        "--tls-key",
        missing.to_str().unwrap(),
    ])
    .await;
    assert!(!ok);
    assert!(stderr.contains("tls_cert: cannot read"), "{stderr}");
}

#[tokio::test]
async fn blobs_can_live_on_s3_and_a_bad_blob_url_stops_the_start() {
    let s3 = smartfarm_e2e::TestS3::start().await;
    let data = CloudData::new(Backend::Sqlite).await;
    let env = vec![("SMARTFARM_BLOB_URL".to_string(), s3.url.clone())];
    let cloud = Cloud::start(&data, CloudOptions { env, ..Default::default() }).await;
    let expected = format!("blobs=s3://{} at {}", s3.bucket, s3.endpoint);
    assert!(cloud.log().contains(&expected), "{expected} not in:\n{}", cloud.log());
    cloud.stop().await;

    let wrong_bucket = s3.url.replace(&format!("@{}", s3.bucket), "@no-such-bucket");
    let (ok, _, stderr) = run_smartfarm(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.data_dir.path().to_str().unwrap(),
        "--blob-url",
        &wrong_bucket,
    ])
    .await;
    assert!(!ok);
    assert!(stderr.contains("blob_url: the s3 bucket \"no-such-bucket\" does not exist"), "{stderr}");
}

#[tokio::test]
async fn config_example_is_a_valid_config_and_unknown_keys_are_refused() {
    let (ok, example, stderr) = run_smartfarm(&["config", "example"]).await;
    assert!(ok, "{stderr}");
    assert!(example.contains("listen = \"127.0.0.1:50051\""), "{example}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smartfarm.toml");
    let data_dir = dir.path().join("data");
    // The printed example, with only the data dir and port changed, starts a server.
    let config = example
        .replace("data_dir = \"smartfarm-data\"", &format!("data_dir = {:?}", data_dir.display().to_string()))
        .replace("127.0.0.1:50051", "127.0.0.1:0");
    std::fs::write(&path, &config).unwrap();
    let (ok, stdout, stderr) = run_smartfarm(&["migrate", "--config", path.to_str().unwrap()]).await;
    assert!(ok, "{stderr}");
    let newest = smartfarm_store::migrate::SQLITE.last().expect("migrations").version;
    assert!(stdout.contains(&format!("schema version {newest}")), "{stdout}");

    std::fs::write(&path, format!("{config}\nlisten_port = 8080\n")).unwrap();
    let (ok, _, stderr) = run_smartfarm(&["serve", "--config", path.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(stderr.contains("unknown field `listen_port`"), "{stderr}");

    let (ok, _, stderr) = run_smartfarm(&["serve", "--target", "device,weather"]).await;
    assert!(!ok);
    assert!(stderr.contains("unknown role \"weather\""), "{stderr}");
}

#[tokio::test]
async fn admin_create_key_prints_a_working_key_as_its_last_line() {
    let data = CloudData::new(Backend::Postgres).await;
    let dir = data.data_dir.path().to_str().unwrap();
    let (ok, stdout, stderr) =
        run_smartfarm(&["admin", "create-key", "--data-dir", dir, "--database-url", data.database_url().unwrap()])
            .await;
    assert!(ok, "{stderr}");
    let key = stdout.lines().last().unwrap().trim().to_string();
    assert!(key.starts_with("sfk_"), "{stdout}");

    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    assert!(!data.admin_key_file().exists(), "an installation that has a key gets no bootstrap key");
    let mut admin = cloud.device_client(&key).await;
    let farm = admin
        .create_farm(device_pb::CreateFarmRequest { name: "november".into() })
        .await
        .unwrap()
        .into_inner()
        .farm
        .unwrap();

    let (ok, stdout, stderr) = run_smartfarm(&[
        "admin",
        "create-key",
        "--data-dir",
        dir,
        "--database-url",
        data.database_url().unwrap(),
        "--farm-id",
        &farm.id,
        "--name",
        "november dashboard",
    ])
    .await;
    assert!(ok, "{stderr}");
    let farm_key = stdout.lines().last().unwrap().trim().to_string();
    let mut as_farm = cloud.device_client(&farm_key).await;
    let status = as_farm.create_farm(device_pb::CreateFarmRequest { name: "oscar".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "a --farm-id key is not an admin key");
    cloud.stop().await;
}
