//! Helpers for tests that need real servers. PostgreSQL: each test gets a database of its own, created from
//! `SMARTFARM_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and dropped afterwards.
//! S3: each test starts its own s3s-fs server (a real S3 implementation over a directory) on a free port. A missing
//! server or tool fails the test with the command that provides it; nothing is skipped.

use tokio_postgres::NoTls;

/// The server tests use unless `SMARTFARM_TEST_DATABASE_URL` says otherwise.
pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A throwaway database on the test PostgreSQL server, dropped when this value is dropped.
#[derive(Debug)]
pub struct TestPostgres {
    /// The URL of the new database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestPostgres {
    /// Creates a fresh, empty database. Panics with instructions when the server cannot be reached.
    pub async fn create() -> TestPostgres {
        let admin_url =
            std::env::var("SMARTFARM_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_string());
        let name = format!("smartfarm_test_{}", uuid::Uuid::now_v7().simple());
        let (client, connection) = tokio_postgres::connect(&admin_url, NoTls).await.unwrap_or_else(|error| {
            panic!(
                "PostgreSQL is needed for this test and is not reachable at {admin_url}: {error}. Start it (Debian: \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or point \
                 SMARTFARM_TEST_DATABASE_URL at a server where this user may create databases."
            )
        });
        let connection = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| panic!("cannot create test database {name} on {admin_url}: {error}"));
        drop(client);
        let _ = connection.await;
        let url = with_database(&admin_url, &name);
        TestPostgres { url, admin_url, name }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // Drop runs outside async context, possibly inside a runtime: do the async cleanup on a thread of its own.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&admin_url, NoTls).await.ok()?;
                let connection = tokio::spawn(connection);
                let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                drop(client);
                let _ = connection.await;
                Some(())
            })
        });
        let _ = cleanup.join();
    }
}

/// A migrated database for one test: SQLite in a temporary directory, or a fresh database on the test PostgreSQL
/// server, with what must live as long as it. The storage suites run each case on both.
#[derive(Debug)]
pub struct TestDatabase {
    pub database: crate::Database,
    /// Its URL, to connect again as after a restart.
    pub url: String,
    _sqlite_dir: Option<tempfile::TempDir>,
    _postgres: Option<TestPostgres>,
}

impl TestDatabase {
    /// A fresh SQLite database.
    pub async fn sqlite() -> TestDatabase {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        let database = TestDatabase::migrated(&url).await;
        TestDatabase { database, url, _sqlite_dir: Some(dir), _postgres: None }
    }

    /// A fresh PostgreSQL database (see [`TestPostgres`]).
    pub async fn postgres() -> TestDatabase {
        let postgres = TestPostgres::create().await;
        let url = postgres.url.clone();
        let database = TestDatabase::migrated(&url).await;
        TestDatabase { database, url, _sqlite_dir: None, _postgres: Some(postgres) }
    }

    async fn migrated(url: &str) -> crate::Database {
        let database = crate::Database::connect(url, &smartfarm_core::config::PostgresConfig::default())
            .await
            .unwrap_or_else(|error| panic!("connect to {url}: {error}"));
        database.migrate().await.unwrap_or_else(|error| panic!("migrate {url}: {error}"));
        database
    }

    /// The registry of the database.
    pub fn registry(&self) -> std::sync::Arc<dyn crate::RegistryStore> {
        self.database.registry()
    }

    /// A new farm with one device of each of `kinds` (named after their kind); returns the farm's id and the
    /// devices' ids, in order.
    pub async fn farm_with_devices(&self, kinds: &[crate::model::DeviceKind]) -> (uuid::Uuid, Vec<uuid::Uuid>) {
        let registry = self.registry();
        let now = smartfarm_core::time::now();
        let farm = registry.create_farm(uuid::Uuid::now_v7(), "farm", now).await.expect("create a farm");
        let mut devices = Vec::new();
        for kind in kinds {
            let device = crate::model::NewDevice {
                id: uuid::Uuid::now_v7(),
                farm_id: farm.id,
                name: kind.as_str().to_string(),
                kind: *kind,
                labels: Default::default(),
                credential_sha256: "00".repeat(32),
                create_time: now,
            };
            devices.push(registry.create_device(device).await.expect("create a device").id);
        }
        (farm.id, devices)
    }

    /// A second connection to the same database, as after a restart.
    pub async fn reopen(&self) -> crate::Database {
        crate::Database::connect(&self.url, &smartfarm_core::config::PostgresConfig::default())
            .await
            .unwrap_or_else(|error| panic!("reconnect to {}: {error}", self.url))
    }
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[authority_start..].find('/').map(|i| i + authority_start).unwrap_or(base.len());
    format!("{}/{database}{query}", &base[..path_start])
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_names_are_replaced() {
        assert_eq!(super::with_database("postgres://u@h:5432/postgres", "t1"), "postgres://u@h:5432/t1");
        assert_eq!(super::with_database("postgres://u@h", "t1"), "postgres://u@h/t1");
        assert_eq!(
            super::with_database("postgres://u@h/db?sslmode=disable", "t1"),
            "postgres://u@h/t1?sslmode=disable"
        );
    }
}

/// The s3s-fs version the test scripts install (`scripts/install-tools.sh`).
pub const S3S_FS_INSTALL: &str = "cargo install s3s-fs --version 0.14.1 --features binary --locked";

/// A private S3-compatible server (s3s-fs) over a temporary directory, with one empty bucket; stopped when dropped.
#[derive(Debug)]
pub struct TestS3 {
    /// An `s3://` blob URL for the bucket, credentials and endpoint included.
    pub url: String,
    /// The server's endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket's name.
    pub bucket: String,
    /// The directory behind the bucket (one file per object).
    pub bucket_dir: std::path::PathBuf,
    _root: tempfile::TempDir,
    _server: tokio::process::Child,
}

impl TestS3 {
    /// Starts s3s-fs (`SMARTFARM_TEST_S3S_FS`, else `s3s-fs` on PATH or in ~/.cargo/bin) and waits until it serves.
    pub async fn start() -> TestS3 {
        let binary = std::env::var("SMARTFARM_TEST_S3S_FS").map(std::path::PathBuf::from).unwrap_or_else(|_| {
            let in_cargo_home = std::env::var("CARGO_HOME")
                .map(std::path::PathBuf::from)
                .or_else(|_| std::env::var("HOME").map(|home| std::path::Path::new(&home).join(".cargo")))
                .map(|home| home.join("bin/s3s-fs"));
            match in_cargo_home {
                Ok(path) if path.exists() => path,
                _ => std::path::PathBuf::from("s3s-fs"),
            }
        });
        let root = tempfile::tempdir().expect("create the s3 root directory");
        let bucket = "smartfarm-test".to_string();
        // s3s-fs keeps a bucket as a directory of its root.
        let bucket_dir = root.path().join(&bucket);
        std::fs::create_dir(&bucket_dir).expect("create the bucket directory");
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("find a free port");
            probe.local_addr().expect("the probe's address").port()
        };
        let (access_key, secret_key) = ("smartfarm-test-key", "smartfarm-test-secret");
        let server = tokio::process::Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", access_key])
            .args(["--secret-key", secret_key])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start {} ({error}): the S3 tests need s3s-fs; install it with `{S3S_FS_INSTALL}` (scripts/install-tools.sh does)", binary.display())
            });
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "s3s-fs did not listen on {endpoint} within 10 s");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let url = format!("s3://{access_key}:{secret_key}@{bucket}?endpoint={endpoint}");
        TestS3 { url, endpoint, bucket, bucket_dir, _root: root, _server: server }
    }
}

/// A private PostgreSQL server (initdb into a temporary directory) that a test may stop hard and start again,
/// which the shared server must never be. Run as the `postgres` user when the test runs as root, since PostgreSQL
/// refuses to run as root. Stopped and deleted when dropped.
#[derive(Debug)]
pub struct PostgresCluster {
    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub url: String,
    pub port: u16,
    bin: std::path::PathBuf,
    data: std::path::PathBuf,
    _root: tempfile::TempDir,
}

impl PostgresCluster {
    /// Creates and starts a cluster on a free port.
    pub fn start() -> PostgresCluster {
        let bin = std::env::var("SMARTFARM_TEST_PG_BIN").map(std::path::PathBuf::from).unwrap_or_else(|_| {
            let mut candidates: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                .map(|dirs| dirs.filter_map(|d| d.ok()).map(|d| d.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
                .unwrap_or_default();
            candidates.sort();
            candidates.pop().unwrap_or_else(|| {
                panic!("this test needs PostgreSQL's server binaries (initdb, pg_ctl): install postgresql (Debian) or set SMARTFARM_TEST_PG_BIN")
            })
        });
        let root = tempfile::tempdir().expect("create the cluster directory");
        let data = root.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("find a free port").local_addr().unwrap().port();
        if is_root() {
            // The postgres user must own the directory and be able to reach it.
            run(
                std::process::Command::new("chown").arg("-R").arg("postgres").arg(root.path()),
                "chown the cluster directory",
            );
            run(std::process::Command::new("chmod").arg("755").arg(root.path()), "open the cluster directory");
        }
        run(
            as_postgres(&bin.join("initdb")).args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(&data),
            "initdb",
        );
        let cluster = PostgresCluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            bin,
            data,
            _root: root,
        };
        cluster.start_again();
        cluster
    }

    /// Starts the server (after [`PostgresCluster::stop_immediately`]) and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on", self.port, self.data.display());
        run(
            as_postgres(&self.bin.join("pg_ctl"))
                .args(["-w", "-t", "30", "-l"])
                .arg(self.data.join("server.log"))
                .arg("-D")
                .arg(&self.data)
                .arg("-o")
                .arg(options)
                .arg("start"),
            "pg_ctl start",
        );
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`: no checkpoint, recovery on next start).
    pub fn stop_immediately(&self) {
        run(
            as_postgres(&self.bin.join("pg_ctl")).arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "stop"]),
            "pg_ctl stop",
        );
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn is_root() -> bool {
    std::process::Command::new("id").arg("-u").output().map(|o| o.stdout.trim_ascii() == b"0").unwrap_or(false)
}

fn as_postgres(program: &std::path::Path) -> std::process::Command {
    if is_root() {
        let mut command = std::process::Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        std::process::Command::new(program)
    }
}

fn run(command: &mut std::process::Command, what: &str) {
    let output = command.output().unwrap_or_else(|error| panic!("{what}: cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
