//! Edge agents in the sandbox: real `smartfarm-edge` processes, the farm and sensors they serve, and what the
//! database holds afterwards.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use smartfarm_edge::sim::SensorCredentials;
use smartfarm_proto::device::v1::{CreateFarmRequest, DeviceKind, RegisterDeviceRequest};

use crate::{Cloud, read_log, smartfarm_binary, terminate};

/// A farm registered through the API: its gateway's credential and its sensors' credentials.
#[derive(Clone, Debug)]
pub struct Fleet {
    pub farm_id: String,
    pub gateway_id: String,
    pub gateway_credential: String,
    pub sensors: Vec<SensorCredentials>,
}

impl Fleet {
    /// Creates a farm with a gateway and `sensors` sensors.
    pub async fn register(cloud: &Cloud, admin_key: &str, name: &str, sensors: usize) -> Fleet {
        let mut admin = cloud.device_client(admin_key).await;
        let farm = admin
            .create_farm(CreateFarmRequest { name: name.into() })
            .await
            .expect("create farm")
            .into_inner()
            .farm
            .unwrap();
        let gateway = admin
            .register_device(RegisterDeviceRequest {
                farm_id: farm.id.clone(),
                name: "gateway".into(),
                kind: DeviceKind::Gateway as i32,
                labels: Default::default(),
            })
            .await
            .expect("register gateway")
            .into_inner();
        let sensors =
            smartfarm_edge::sim::provision(&format!("http://{}", cloud.addr), admin_key, &farm.id, sensors, "sensor")
                .await
                .expect("register sensors");
        Fleet {
            farm_id: farm.id,
            gateway_id: gateway.device.unwrap().id,
            gateway_credential: gateway.credential,
            sensors,
        }
    }

    /// Registers a camera on the farm; returns its id.
    pub async fn register_camera(&self, cloud: &Cloud, admin_key: &str, name: &str) -> String {
        cloud
            .device_client(admin_key)
            .await
            .register_device(RegisterDeviceRequest {
                farm_id: self.farm_id.clone(),
                name: name.into(),
                kind: DeviceKind::Camera as i32,
                labels: Default::default(),
            })
            .await
            .expect("register a camera")
            .into_inner()
            .device
            .expect("the camera")
            .id
    }
}

/// The `smartfarm-edge` binary built next to `smartfarm`.
pub fn edge_binary() -> PathBuf {
    smartfarm_binary().with_file_name("smartfarm-edge")
}

/// How to start an agent.
#[derive(Clone, Debug)]
pub struct EdgeOptions {
    /// The cloud's address (plaintext).
    pub cloud: SocketAddr,
    pub credential: String,
    pub spool_dir: PathBuf,
    /// A fixed MQTT port, so sensors reconnect to a restarted agent; `None` picks a free one.
    pub mqtt_port: Option<u16>,
    /// Extra config file lines (TOML), e.g. `upload_interval = "1s"`.
    pub config: String,
    /// Extra command-line arguments, e.g. `--camera-dir ID=DIR`.
    pub args: Vec<String>,
}

impl EdgeOptions {
    /// An agent of `fleet`'s farm for `cloud`, spooling into `spool_dir`, with the default settings.
    pub fn new(cloud: &Cloud, fleet: &Fleet, spool_dir: PathBuf) -> EdgeOptions {
        EdgeOptions {
            cloud: cloud.addr,
            credential: fleet.gateway_credential.clone(),
            spool_dir,
            mqtt_port: None,
            config: String::new(),
            args: Vec::new(),
        }
    }
}

/// A running `smartfarm-edge`.
#[derive(Debug)]
pub struct Edge {
    child: tokio::process::Child,
    pub mqtt: SocketAddr,
    pub metrics: SocketAddr,
    pub log_path: PathBuf,
}

impl Edge {
    /// Starts an agent and waits until it listens.
    pub async fn start(options: &EdgeOptions) -> Edge {
        std::fs::create_dir_all(&options.spool_dir).expect("create the spool dir");
        let run_id = uuid::Uuid::now_v7().simple().to_string();
        let work = options.spool_dir.parent().unwrap_or(Path::new("."));
        let addr_file = work.join(format!("edge-addr-{run_id}"));
        let log_path = work.join(format!("edge-{run_id}.log"));
        let config_path = work.join(format!("edge-{run_id}.toml"));
        std::fs::write(&config_path, &options.config).expect("write the edge config");
        let log = std::fs::File::create(&log_path).expect("create the edge log");
        let mqtt = format!("127.0.0.1:{}", options.mqtt_port.unwrap_or(0));
        let mut child = tokio::process::Command::new(edge_binary())
            .arg("--config")
            .arg(&config_path)
            .arg("--cloud")
            .arg(format!("http://{}", options.cloud))
            .arg("--allow-plaintext")
            .arg("--mqtt-listen")
            .arg(&mqtt)
            .arg("--spool-dir")
            .arg(&options.spool_dir)
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .arg("--addr-file")
            .arg(&addr_file)
            .args(&options.args)
            .env("SMARTFARM_EDGE_CREDENTIAL", &options.credential)
            .env("SMARTFARM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start smartfarm-edge");
        let deadline = Instant::now() + Duration::from_secs(30);
        let bound: serde_json::Value = loop {
            if let Some(bound) = std::fs::read(&addr_file).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()) {
                break bound;
            }
            if let Some(status) = child.try_wait().expect("poll smartfarm-edge") {
                panic!("smartfarm-edge exited with {status} before listening:\n{}", read_log(&log_path));
            }
            assert!(Instant::now() < deadline, "smartfarm-edge did not listen within 30 s:\n{}", read_log(&log_path));
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let address = |key: &str| bound[key].as_str().and_then(|a| a.parse().ok()).expect("a bound address");
        Edge { child, mqtt: address("mqtt"), metrics: address("metrics"), log_path }
    }

    /// Waits until the agent knows `devices` devices (its registry came down the link), so sensors are not refused
    /// for connecting before it.
    pub async fn wait_for_registry(&self, devices: usize) {
        let known = eventually(Duration::from_secs(30), || async {
            self.metric("smartfarm_edge_registry_devices").await >= devices as f64
        })
        .await;
        assert!(known, "the agent did not receive the registry within 30 s:\n{}", self.log());
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Kills the agent with SIGKILL.
    pub async fn kill9(mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and a clean exit within 15 s.
    pub async fn stop(mut self) {
        terminate(&mut self.child, &self.log_path, "smartfarm-edge").await;
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// The value of a metric line on /metrics (0 when absent), e.g. `smartfarm_edge_spool_dropped_records_total`.
    pub async fn metric(&self, series: &str) -> f64 {
        crate::metric_value(&crate::http_get(self.metrics, "/metrics").await, series)
    }
}

/// What the readings table holds for a farm, read straight from PostgreSQL.
#[derive(Debug, PartialEq, Eq)]
pub struct Tally {
    pub rows: i64,
    /// Distinct edge sequence numbers: fewer than `rows` means something was written twice after the spool.
    pub distinct_sequences: i64,
    /// Distinct (device, metric, measure time): fewer than `rows` means a sensor's message arrived twice.
    pub distinct_readings: i64,
    pub max_sequence: i64,
}

/// Counts a farm's readings in the test database.
pub async fn tally(database_url: &str, farm_id: &str) -> Tally {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let farm: uuid::Uuid = farm_id.parse().expect("a farm id");
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT sequence), count(DISTINCT (s.device_id, s.metric_id, r.time)), COALESCE(max(sequence), 0)
             FROM readings r JOIN reading_series s ON s.id = r.series_id WHERE s.farm_id = $1",
            &[&farm],
        )
        .await
        .expect("tally readings");
    Tally { rows: row.get(0), distinct_sequences: row.get(1), distinct_readings: row.get(2), max_sequence: row.get(3) }
}

/// Readings per device (by device id) in the test database.
pub async fn readings_per_device(database_url: &str, farm_id: &str) -> std::collections::BTreeMap<String, i64> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let farm: uuid::Uuid = farm_id.parse().expect("a farm id");
    let rows = client
        .query(
            "SELECT s.device_id, count(DISTINCT (s.metric_id, r.time))
             FROM readings r JOIN reading_series s ON s.id = r.series_id WHERE s.farm_id = $1 GROUP BY s.device_id",
            &[&farm],
        )
        .await
        .expect("count per device");
    rows.iter().map(|row| (row.get::<_, uuid::Uuid>(0).to_string(), row.get::<_, i64>(1))).collect()
}

/// Polls `condition` every 200 ms until it holds or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
