//! `smartfarm demo`: the whole product on one machine, in one process: the cloud on the embedded default (SQLite
//! and files), one farm's edge agent with its MQTT broker, and simulated sensors replaying real soil-moisture data
//! into it, readings flowing up every few seconds, and a camera whose photos go up as they are dropped into its
//! directory. It prints the commands to look at them. State lives in the demo's
//! data dir, so a second run continues where the first stopped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use smartfarm_core::config::ServerConfig;
use smartfarm_edge::config::{CameraConfig, EdgeConfig, UploadMode};
use smartfarm_edge::sim::{self, RunOptions, SensorCredentials};
use smartfarm_proto::device::v1::device_service_client::DeviceServiceClient;
use smartfarm_proto::device::v1::{CreateFarmRequest, DeviceKind, ListFarmsRequest, RegisterDeviceRequest};

/// The name of the farm the demo creates.
pub const DEMO_FARM: &str = "demo farm";

/// Flags of `demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the cloud listens (gRPC, gRPC-web, health, reflection, /metrics).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Where the edge agent's MQTT broker listens (connect your own sensors here).
    #[arg(long, default_value = "127.0.0.1:11883")]
    pub mqtt_listen: SocketAddr,
    /// How many simulated sensors.
    #[arg(long, default_value_t = 20)]
    pub sensors: usize,
    /// Messages per second, all sensors together (two readings each).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// How often the edge agent uploads (a real farm uses an hour).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub upload_interval: Duration,
    /// Once running, write the cloud's and the broker's addresses as JSON here (for scripts using port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
}

/// What the demo registered, kept for the next run.
#[derive(Debug, Serialize, Deserialize)]
struct DemoState {
    farm_id: String,
    gateway_credential: String,
    sensors: Vec<SensorCredentials>,
    /// The demo camera (empty in the state of a demo from before cameras).
    #[serde(default)]
    camera_id: String,
}

/// Resolves when `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn wait_for_file(path: &Path, what: &str) -> anyhow::Result<String> {
    for _ in 0..300 {
        if let Some(text) = std::fs::read_to_string(path).ok().filter(|text| !text.trim().is_empty()) {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{what} did not start within 15 s")
}

pub async fn run(args: DemoArgs, mut config: ServerConfig) -> anyhow::Result<()> {
    // The cloud's data dir (--data-dir) also holds the edge agent's spool and the demo's sensors.
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    config.listen = args.listen;
    // The demo's farm changes while it runs (you may register devices): let the link notice quickly.
    config.telemetry.registry_refresh_interval = Duration::from_secs(5);

    let (stop, stopping) = watch::channel(false);
    tokio::spawn(async move {
        smartfarm_core::shutdown::signal().await;
        let _ = stop.send(true);
    });

    let cloud_addr_file = data_dir.join(".demo-cloud-addr");
    let _ = std::fs::remove_file(&cloud_addr_file);
    let cloud = tokio::spawn(crate::serve::run(config, Some(cloud_addr_file.clone()), stopped(stopping.clone())));
    let cloud_addr: SocketAddr = wait_for_file(&cloud_addr_file, "the cloud").await?.trim().parse()?;
    let admin_key = std::fs::read_to_string(data_dir.join("admin-key"))
        .context(
            "the demo needs the admin key its first run wrote to <data dir>/admin-key; start with a fresh --data-dir",
        )?
        .trim()
        .to_string();
    let state = demo_state(&data_dir, cloud_addr, &admin_key, args.sensors).await?;
    let camera_dir = data_dir.join("demo-camera");

    let edge_config = EdgeConfig {
        cloud: format!("http://{cloud_addr}"),
        credential: state.gateway_credential.clone(),
        allow_plaintext: true,
        mqtt_listen: args.mqtt_listen,
        spool_dir: data_dir.join("edge-spool"),
        upload_interval: args.upload_interval,
        upload: UploadMode::Both,
        aggregation_window: Duration::from_secs(60),
        metrics_listen: String::new(),
        cameras: match state.camera_id.parse() {
            Ok(camera) => vec![CameraConfig::dir(camera, camera_dir.clone())],
            Err(_) => Vec::new(),
        },
        camera_poll_interval: Duration::from_millis(500),
        ..EdgeConfig::default()
    };
    // The demo camera "takes" the leaf photos again on every run; the agent sends only those the cloud lacks.
    if !state.camera_id.is_empty() {
        sim::drop_photos(&camera_dir, sim::PHOTO_FIXTURES)
            .with_context(|| format!("cannot write photos into {}", camera_dir.display()))?;
    }
    let edge_addr_file = data_dir.join(".demo-edge-addr");
    let _ = std::fs::remove_file(&edge_addr_file);
    let edge =
        tokio::spawn(smartfarm_edge::agent::run(edge_config, Some(edge_addr_file.clone()), stopped(stopping.clone())));
    let edge_bound: serde_json::Value = serde_json::from_str(&wait_for_file(&edge_addr_file, "the edge agent").await?)?;
    let mqtt = edge_bound["mqtt"].as_str().unwrap_or_default().to_string();
    if let Some(path) = &args.addr_file {
        std::fs::write(path, serde_json::json!({ "cloud": cloud_addr.to_string(), "mqtt": mqtt }).to_string())?;
    }

    let options = RunOptions {
        mqtt: mqtt.clone(),
        rate: args.rate,
        messages_per_sensor: u64::MAX,
        replay: sim::parse_replay(sim::SOIL_MOISTURE_FIXTURE),
        qos: 1,
        drain_timeout: Duration::from_secs(5),
    };
    let sensors = state.sensors.clone();
    // Give the agent a moment to receive the farm's registry before the sensors log in.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let simulator = tokio::spawn(async move { sim::run(&sensors, options).await });

    let first_sensor = &state.sensors[0];
    println!(
        "\nsmartfarm demo running: cloud on {cloud_addr}, edge agent's MQTT broker on {mqtt}, {} simulated sensors on \
         farm {} (\"{DEMO_FARM}\") sending {} messages/s; uploads every {}.\n\
         \nLook at the readings (grpcurl, from another shell in this directory):\n\
         \x20 AUTH=\"authorization: Bearer $(cat {dir}/admin-key)\"\n\
         \x20 grpcurl -plaintext -H \"$AUTH\" -d '{{\"farm_id\": \"{farm}\"}}' {cloud_addr} smartfarm.ingestion.v1.TelemetryService/GetLatestReadings\n\
         \x20 grpcurl -plaintext -H \"$AUTH\" -d \"{{\\\"farm_id\\\": \\\"{farm}\\\", \\\"metrics\\\": [\\\"soil_moisture\\\"], \\\"bucket_width\\\": \\\"60s\\\", \\\"time_range\\\": {{\\\"start_time\\\": \\\"$(date -u -d '-10 min' +%FT%TZ)\\\", \\\"end_time\\\": \\\"$(date -u -d '+1 min' +%FT%TZ)\\\"}}}}\" {cloud_addr} smartfarm.ingestion.v1.TelemetryService/QueryAggregates\n\
         \nPublish as one of the sensors (mosquitto-clients):\n\
         \x20 mosquitto_pub -h {mqtt_host} -p {mqtt_port} -u {sensor} -P {credential} -t smartfarm/{sensor}/telemetry -m '{{\"metrics\": {{\"temperature\": 21.5}}}}'\n\
         \nLook at the demo camera's photos (drop your own JPEG or PNG files into {dir}/demo-camera):\n\
         \x20 grpcurl -plaintext -H \"$AUTH\" -d '{{\"farm_id\": \"{farm}\"}}' {cloud_addr} smartfarm.image.v1.ImageService/ListImages\n\
         \nctrl-c stops everything; readings not yet uploaded stay in {dir}/edge-spool for the next run.\n",
        state.sensors.len(),
        state.farm_id,
        args.rate,
        humantime::format_duration(args.upload_interval),
        dir = data_dir.display(),
        farm = state.farm_id,
        mqtt_host = mqtt.rsplit_once(':').map(|(h, _)| h).unwrap_or("127.0.0.1"),
        mqtt_port = mqtt.rsplit_once(':').map(|(_, p)| p).unwrap_or("11883"),
        sensor = first_sensor.device_id,
        credential = first_sensor.credential,
    );

    stopped(stopping).await;
    simulator.abort();
    edge.await.context("the edge agent task failed")??;
    cloud.await.context("the cloud task failed")??;
    Ok(())
}

/// The demo farm, its gateway and sensors: loaded from the data dir, or registered on the first run.
async fn demo_state(data_dir: &Path, cloud: SocketAddr, admin_key: &str, sensors: usize) -> anyhow::Result<DemoState> {
    let path = data_dir.join("demo.json");
    if let Ok(bytes) = std::fs::read(&path) {
        let state: DemoState =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is unreadable", path.display()))?;
        return Ok(state);
    }
    let url = format!("http://{cloud}");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())?.connect().await?;
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {admin_key}").parse()?;
    let mut client = DeviceServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", token.clone());
        Ok(request)
    });
    let existing =
        client.list_farms(ListFarmsRequest { page_size: 1000, page_token: String::new() }).await?.into_inner();
    anyhow::ensure!(
        !existing.farms.iter().any(|farm| farm.name == DEMO_FARM),
        "{} has a \"{DEMO_FARM}\" but no demo.json; start with a fresh --data-dir",
        data_dir.display()
    );
    let farm =
        client.create_farm(CreateFarmRequest { name: DEMO_FARM.into() }).await?.into_inner().farm.context("no farm")?;
    let gateway = client
        .register_device(RegisterDeviceRequest {
            farm_id: farm.id.clone(),
            name: "demo gateway".into(),
            kind: DeviceKind::Gateway as i32,
            labels: Default::default(),
        })
        .await?
        .into_inner();
    let sensors = sim::provision(&url, admin_key, &farm.id, sensors.max(1), "soil-probe").await?;
    let camera = client
        .register_device(RegisterDeviceRequest {
            farm_id: farm.id.clone(),
            name: "demo camera".into(),
            kind: DeviceKind::Camera as i32,
            labels: Default::default(),
        })
        .await?
        .into_inner()
        .device
        .context("no camera")?;
    let state = DemoState { farm_id: farm.id, gateway_credential: gateway.credential, sensors, camera_id: camera.id };
    std::fs::write(&path, serde_json::to_vec_pretty(&state)?)?;
    Ok(state)
}
