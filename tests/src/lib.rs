//! smartfarm-e2e: a sandbox that starts real `smartfarm` processes on port 0, against a fresh data dir and (when
//! asked) a fresh PostgreSQL database, and tears them down; plus gRPC clients that authenticate as a test would.
//! End-to-end tests live in `tests/`. The sandbox runs the binary cargo built next to the test executable, so run
//! `cargo build -p smartfarm` (the test command does) before these tests.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use smartfarm_proto::device::v1::device_service_client::DeviceServiceClient;

pub mod alerting;
pub mod edge;
pub mod proxy;

pub use smartfarm_store::testing::{PostgresCluster, TestPostgres, TestS3};

/// Which database a cloud process uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: SQLite in the data dir.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
}

/// The storage one or more cloud processes share: a data dir, and a PostgreSQL database when the backend asks for
/// one. Keeping it apart from the process lets a test restart the cloud on the same data.
#[derive(Debug)]
pub struct CloudData {
    pub backend: Backend,
    pub data_dir: tempfile::TempDir,
    postgres: Option<TestPostgres>,
    /// A database URL of the test's own (a private cluster), instead of `postgres`.
    database_url: Option<String>,
}

impl CloudData {
    /// Fresh, empty storage.
    pub async fn new(backend: Backend) -> CloudData {
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TestPostgres::create().await),
        };
        CloudData { backend, data_dir: tempfile::tempdir().expect("create a temp dir"), postgres, database_url: None }
    }

    /// Fresh storage on a database the test provides (a private cluster it may crash).
    pub fn on_database(url: &str) -> CloudData {
        CloudData {
            backend: Backend::Postgres,
            data_dir: tempfile::tempdir().expect("create a temp dir"),
            postgres: None,
            database_url: Some(url.to_string()),
        }
    }

    /// The `--database-url` to pass, if not the embedded default.
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref().or(self.postgres.as_ref().map(|postgres| postgres.url.as_str()))
    }

    /// Where the first `serve` writes the bootstrap admin key.
    pub fn admin_key_file(&self) -> PathBuf {
        self.data_dir.path().join("admin-key")
    }
}

/// The `smartfarm` binary cargo built for this test run.
pub fn smartfarm_binary() -> PathBuf {
    if let Ok(path) = std::env::var("SMARTFARM_BIN") {
        return PathBuf::from(path);
    }
    // Test executables live in target/<profile>/deps/, binaries (the benchmark too) in target/<profile>/.
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe.parent().expect("the executable's directory");
    [dir.join("smartfarm"), dir.parent().map(|p| p.join("smartfarm")).unwrap_or_default()]
        .into_iter()
        .find(|candidate| candidate.exists())
        .unwrap_or_else(|| {
            panic!(
                "the smartfarm binary is missing next to {}: build it first with `cargo build -p smartfarm` \
                 (scripts/test.sh does), or set SMARTFARM_BIN",
                exe.display()
            )
        })
}

/// A DeviceService client that authenticates with a bearer token.
pub type DeviceClient = DeviceServiceClient<InterceptedService<Channel, Bearer>>;

/// A running `smartfarm serve`.
#[derive(Debug)]
pub struct Cloud {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
}

/// Options for [`Cloud::start`] beyond the storage.
#[derive(Clone, Debug, Default)]
pub struct CloudOptions {
    /// `--target`; `None` runs every role.
    pub target: Option<String>,
    /// `--tls-cert` and `--tls-key`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Extra environment variables (`SMARTFARM_*` settings, for instance).
    pub env: Vec<(String, String)>,
    /// A fixed address instead of port 0 (a cloud restarted where its agents expect it).
    pub listen: Option<SocketAddr>,
    /// A config file's contents, passed with `--config`.
    pub config: Option<String>,
}

impl Cloud {
    /// Starts `smartfarm serve` on 127.0.0.1:0 over `data` and waits until it listens.
    pub async fn start(data: &CloudData, options: CloudOptions) -> Cloud {
        let dir = data.data_dir.path();
        let run_id = uuid::Uuid::now_v7().simple().to_string();
        let addr_file = dir.join(format!("addr-{run_id}"));
        let log_path = dir.join(format!("serve-{run_id}.log"));
        let log = std::fs::File::create(&log_path).expect("create the log file");
        let mut command = tokio::process::Command::new(smartfarm_binary());
        command
            .arg("serve")
            .arg("--listen")
            .arg(options.listen.map(|a| a.to_string()).unwrap_or_else(|| "127.0.0.1:0".into()))
            .arg("--data-dir")
            .arg(dir)
            .arg("--addr-file")
            .arg(&addr_file)
            .env_remove("SMARTFARM_CONFIG")
            .env_remove("SMARTFARM_DATABASE_URL")
            .env_remove("SMARTFARM_TARGET")
            .env("SMARTFARM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .kill_on_drop(true);
        if let Some(url) = data.database_url() {
            command.arg("--database-url").arg(url);
        }
        if let Some(config) = &options.config {
            let path = dir.join(format!("config-{run_id}.toml"));
            std::fs::write(&path, config).expect("write the config file");
            command.arg("--config").arg(path);
        }
        if let Some(target) = &options.target {
            command.arg("--target").arg(target);
        }
        if let Some((cert, key)) = &options.tls {
            command.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        command.envs(options.env.iter().map(|(name, value)| (name, value)));
        let mut child = command.spawn().expect("start smartfarm serve");

        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Some(addr) = std::fs::read_to_string(&addr_file).ok().and_then(|text| text.trim().parse().ok()) {
                break addr;
            }
            if let Some(status) = child.try_wait().expect("poll smartfarm serve") {
                panic!("smartfarm serve exited with {status} before listening:\n{}", read_log(&log_path));
            }
            assert!(Instant::now() < deadline, "smartfarm serve did not listen within 30 s:\n{}", read_log(&log_path));
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Cloud { child, addr, log_path }
    }

    /// A plaintext HTTP/2 channel to the server.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("a valid endpoint")
            .connect()
            .await
            .unwrap_or_else(|error| panic!("connect to {}: {error}\n{}", self.addr, read_log(&self.log_path)))
    }

    /// A DeviceService client that sends `key` as its bearer token.
    pub async fn device_client(&self, key: &str) -> DeviceClient {
        DeviceServiceClient::with_interceptor(self.channel().await, Bearer::new(key))
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits for it to be gone.
    pub async fn kill9(mut self) {
        self.child.start_kill().expect("send SIGKILL");
        let _ = self.child.wait().await;
    }

    /// Waits for the process to exit on its own (a crash the test provoked); panics after `limit`.
    pub async fn wait_for_exit(mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("smartfarm did not exit within {limit:?}:\n{}", read_log(&self.log_path)))
            .expect("wait for smartfarm")
    }

    /// Sends SIGTERM and waits for a clean exit; panics if it takes over 15 seconds or fails.
    pub async fn stop(mut self) {
        terminate(&mut self.child, &self.log_path, "smartfarm").await;
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Fetches a plain-HTTP path (such as `/metrics`); returns the body.
    pub async fn http_get(&self, path: &str) -> String {
        http_get(self.addr, path).await
    }

    /// The value of a metric on its `/metrics` page (see [`metric_value`]).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.http_get("/metrics").await, series)
    }
}

/// The value of `series` (a metric's name, with its labels exactly as rendered if it has any) on a `/metrics` page;
/// 0 when absent.
pub fn metric_value(page: &str, series: &str) -> f64 {
    page.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// A minimal HTTP/1.1 GET; returns the body (the status must be 200).
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect for http");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send http request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read http response");
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").expect("an http response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    // axum answers small bodies with content-length; chunked bodies are de-chunked crudely (metrics are text).
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut text = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || after.len() < size {
                break;
            }
            text.push_str(&after[..size]);
            rest = after[size..].trim_start_matches("\r\n");
        }
        return text;
    }
    body.to_string()
}

/// Sends SIGTERM to `child` and waits for a clean exit; panics (with the log) if it takes over 15 seconds or fails.
pub(crate) async fn terminate(child: &mut tokio::process::Child, log_path: &Path, name: &str) {
    let pid = child.id().expect("the process is running");
    let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("run kill");
    assert!(status.success(), "kill -TERM {pid} ({name}) failed");
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{name} did not stop within 15 s of SIGTERM:\n{}", read_log(log_path)))
        .unwrap_or_else(|error| panic!("wait for {name}: {error}"));
    assert!(exit.success(), "{name} exited with {exit} after SIGTERM:\n{}", read_log(log_path));
}

pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| format!("(no log: {error})"))
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Debug)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Bearer {
        Bearer(format!("Bearer {token}").parse().expect("an ascii token"))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// Reads the bootstrap admin key a fresh data dir's first `serve` wrote.
pub fn bootstrap_admin_key(data: &CloudData) -> String {
    let key = std::fs::read_to_string(data.admin_key_file()).expect("the first serve writes data_dir/admin-key");
    key.trim().to_string()
}

/// Deletes the NATS streams of a bus URL that replicas used (`nats://HOST:PORT/NAME`), so that NATS does not go on
/// reserving their room after the test.
pub async fn remove_nats_streams(bus_url: &str) {
    let bus = smartfarm_bus::Bus::connect(bus_url).await.expect("connect to NATS to remove the test's streams");
    bus.remove_streams().await.expect("remove the test's NATS streams");
}

/// Runs the smartfarm binary with `args` to completion; returns (success, stdout, stderr).
pub async fn run_smartfarm(args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(smartfarm_binary())
        .args(args)
        .env_remove("SMARTFARM_CONFIG")
        .env_remove("SMARTFARM_DATABASE_URL")
        .output()
        .await
        .expect("run smartfarm");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A free TCP port on 127.0.0.1 (for a process that must come back on the same address after a restart).
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    // Below the kernel's ephemeral range: a port it never hands out for port 0, so another test's port-0 bind
    // cannot take it between this check and the process that listens on it.
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = 10_000.min(ephemeral_start.saturating_sub(1_000));
    for _ in 0..1_000 {
        let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let port = low + (random % u64::from(ephemeral_start - low)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("local address").port()
}
