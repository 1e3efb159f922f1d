//! The server's configuration: a TOML file whose every key is documented in [`EXAMPLE`] (what
//! `smartfarm config example` prints), overridden by `SMARTFARM_*` environment variables and command-line flags.
//! Unknown keys are an error, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::role::Target;

/// The documented default configuration. A test checks that it parses to exactly [`ServerConfig::default`].
pub const EXAMPLE: &str = r#"# smartfarm server configuration. Every key is optional; shown here with its default.
# Precedence: command-line flag > SMARTFARM_* environment variable > this file > default.

# Address of the one listener that serves gRPC, gRPC-web, health, reflection and /metrics.
# Flag --listen, variable SMARTFARM_LISTEN. Port 0 picks a free port (see --addr-file).
listen = "127.0.0.1:50051"

# Directory for the embedded database, local blobs and the first admin key.
# Flag --data-dir, variable SMARTFARM_DATA_DIR.
data_dir = "smartfarm-data"

# Where metadata and time series live: "sqlite://PATH" or "postgres://USER@HOST:PORT/DB".
# Empty means "sqlite://<data_dir>/smartfarm.db". Flag --database-url, variable SMARTFARM_DATABASE_URL.
database_url = ""

# Where blobs (photos, models) live: "file://DIR", or
# "s3://[ACCESS_KEY:SECRET_KEY@]BUCKET[/PREFIX][?endpoint=URL&region=REGION&path_style=true]" for AWS S3, MinIO
# and other S3-compatible stores (credentials not in the URL come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY).
# Empty means "file://<data_dir>/blobs". Flag --blob-url, variable SMARTFARM_BLOB_URL.
blob_url = ""

# How the roles of several processes tell each other what happened (new photos, committed readings, alerts, rules,
# commands): "" keeps it within this process (one process, or replicas that need not talk); "nats://HOST:PORT"
# uses NATS JetStream, so a command sent through one replica reaches the agent connected to another and an alert
# raised on one reaches subscribers on all. "nats://HOST:PORT/NAME" names the JetStream stream (default
# "smartfarm"), to keep deployments sharing a NATS server apart. Flag --bus-url, variable SMARTFARM_BUS_URL.
bus_url = ""

# Which roles this process runs: "all", or a comma-separated subset of
# device, ingestion, image, inference, alert, command. Flag --target, variable SMARTFARM_TARGET.
target = "all"

# Log format: "text" for people, "json" for log collectors. Flag --log-format, variable SMARTFARM_LOG_FORMAT.
log_format = "text"

# Log filter in tracing-subscriber syntax, e.g. "info" or "info,smartfarm_store=debug".
# Flag --log-level, variable SMARTFARM_LOG_LEVEL; SMARTFARM_LOG (or RUST_LOG), when set, wins over all of them.
log_level = "info"

# TLS for the listener: PEM certificate chain and PEM private key (both or neither). Without them the listener
# speaks plaintext. Flags --tls-cert/--tls-key, variables SMARTFARM_TLS_CERT/SMARTFARM_TLS_KEY.
# tls_cert = "/etc/smartfarm/tls.crt"
# tls_key = "/etc/smartfarm/tls.key"

# Telemetry from edge agents (the ingestion role).
[telemetry]
# Rollups kept beside the raw readings, one per width; aggregate queries aligned to a width read them.
rollup_widths = ["1h", "1d"]
# Delete raw readings (and edge aggregates) older than this.
raw_retention = "365days"
# Delete rollups older than this.
rollup_retention = "5years"
# How often the retention task runs.
retention_interval = "1h"
# Batches an edge agent may have unacknowledged at once (told to it when it connects): backpressure, not drops.
max_in_flight_batches = 4
# The largest batch accepted, compressed, in bytes; agents keep theirs below it.
max_batch_bytes = 16777216
# How often an open edge link checks for registry changes to push down, and that its gateway is still valid.
registry_refresh_interval = "30s"

# Crop photos (the image role).
[images]
# The largest photo accepted, in bytes (20 MiB).
max_image_bytes = 20971520
# Longest side of the thumbnails made for the dashboard, in pixels.
thumbnail_size = 320
# Delete originals captured longer ago than this; thumbnails, metadata and diagnoses stay. "0s" keeps them forever.
retention = "0s"
# Move originals captured longer ago than cold_after to this S3 storage class, e.g. "STANDARD_IA" or "GLACIER_IR"
# ("" leaves them where they are; needs an s3:// blob_url).
cold_storage_class = ""
cold_after = "30days"
# How often the sweeper runs: orphaned blobs, abandoned uploads, retention, storage classes, missing thumbnails.
sweep_interval = "1m"
# A blob whose write began this long ago without its row committing was orphaned by a crash and is deleted.
# Keep it longer than any single blob write can take.
orphan_grace = "15m"
# An upload cut short and not resumed for this long is abandoned; its partial bytes are deleted.
upload_expiry = "24h"
# The base URL clients reach this server at (e.g. "https://farm.example.com"), for GetImageUrl on file:// storage;
# empty makes those URLs paths relative to the server.
public_url = ""

# Retention per farm, overriding images.retention: farm id = age.
[images.farm_retention]
# "01939a6e-8f3c-7d2a-9b1e-1f2d3c4b5a69" = "90days"

# Models (the inference role): plant disease on photos, anomalies in sensor series.
[inference]
# Diagnose every new photo with the active plant-disease model; the diagnosis is saved on the photo.
diagnose_new_images = true
# A diagnosis at least this confident is announced for alerts: a disease raises the farm's model-verdict rules, a
# healthy class resolves the camera's disease alerts.
disease_alert_confidence = 0.8
# Score every committed telemetry batch with the active anomaly model; anomalous stretches are announced.
score_new_readings = true
# The detector learns each device's metric from this much of its past (it needs about 700 readings).
anomaly_history = "14days"
# A series' learned detector is relearned after this long.
anomaly_refit = "1day"
# A committed batch not confirmed scored this long after it arrived (its process died or stopped first, or its
# pipeline fell behind) is scored late by a replica that runs this role; so is a photo received this long ago
# (within the last day) and still without a diagnosis, or whose verdict is unconfirmed, diagnosed late.
late_scoring_after = "5m"

# Alerts and commands (the alert and command roles).
[alerts]
# A webhook delivery is retried with exponential backoff from this wait ...
webhook_retry_min = "1s"
# ... up to this wait between attempts; attempts go on until the endpoint answers.
webhook_retry_max = "5m"
# After this many failed attempts in a row the webhook is marked failing (visible in ListWebhooks).
webhook_max_failures = 5
# Give up on one delivery attempt after this long.
webhook_timeout = "10s"
# Commands whose TTL passed are marked expired this often.
command_expiry_interval = "1s"
# Delete finished commands (acknowledged, failed, expired) with their history this long after they were sent
# (checked hourly); "0s" keeps them forever. A request id is free again once its command is deleted.
command_retention = "90days"
# Delete alert events this long after they were recorded, and resolved alerts opened this long ago (checked hourly,
# so events are aged to the hour); "0s" keeps them forever. An event a webhook has not been given yet is kept.
retention = "365days"
# A Subscribe stream that sent nothing for this long sends a heartbeat with its cursor: a client filtered to a quiet
# farm keeps a cursor retention does not overtake, and proxies do not close the stream as idle.
stream_heartbeat = "30s"

# PostgreSQL connection pool (used when database_url is postgres://).
[postgres]
# Most connections the process keeps open.
max_connections = 16
# Give up connecting to the server after this long.
connect_timeout = "10s"
# Give up waiting for a free pooled connection after this long.
pool_wait_timeout = "5s"
# Cancel any single statement that runs longer than this.
statement_timeout = "30s"
# Send TCP keepalives after the connection has been idle this long, so a dead server or a dropped NAT entry is
# noticed instead of hanging.
keepalive_idle = "60s"
"#;

/// Configuration of `smartfarm serve` and the other server subcommands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the one listener (gRPC, gRPC-web, health, reflection, /metrics).
    pub listen: SocketAddr,
    /// Directory for the embedded database, local blobs and the first admin key.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://…`; empty means SQLite under `data_dir`.
    pub database_url: String,
    /// `file://DIR` or `s3://…`; empty means `data_dir/blobs`.
    pub blob_url: String,
    /// `""` (in-process) or `nats://HOST:PORT[/NAME]`.
    pub bus_url: String,
    /// The roles to run.
    pub target: Target,
    /// Log output format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// PEM certificate chain for TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    pub tls_key: Option<PathBuf>,
    /// Telemetry ingestion and storage settings.
    pub telemetry: TelemetryConfig,
    /// Photo storage settings.
    pub images: ImagesConfig,
    /// Model serving settings.
    pub inference: InferenceConfig,
    /// Alert fan-out and command settings.
    pub alerts: AlertsConfig,
    /// PostgreSQL pool settings.
    pub postgres: PostgresConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("smartfarm-data"),
            database_url: String::new(),
            blob_url: String::new(),
            bus_url: String::new(),
            target: Target::all(),
            log_format: LogFormat::Text,
            log_level: "info".to_string(),
            tls_cert: None,
            tls_key: None,
            telemetry: TelemetryConfig::default(),
            images: ImagesConfig::default(),
            inference: InferenceConfig::default(),
            alerts: AlertsConfig::default(),
            postgres: PostgresConfig::default(),
        }
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(Error::invalid("log_format", format!("{other:?} is not one of text, json"))),
        }
    }
}

/// Telemetry ingestion and storage settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Widths of the rollups kept beside raw readings.
    #[serde(with = "humantime_serde_list")]
    pub rollup_widths: Vec<Duration>,
    /// Age at which raw readings are deleted.
    #[serde(with = "humantime_serde")]
    pub raw_retention: Duration,
    /// Age at which rollups are deleted.
    #[serde(with = "humantime_serde")]
    pub rollup_retention: Duration,
    /// How often retention runs.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// Unacknowledged batches an agent may have in flight.
    pub max_in_flight_batches: u32,
    /// Largest compressed batch accepted, in bytes.
    pub max_batch_bytes: usize,
    /// How often an open edge link refreshes the registry it pushes down.
    #[serde(with = "humantime_serde")]
    pub registry_refresh_interval: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        TelemetryConfig {
            rollup_widths: vec![Duration::from_secs(3600), Duration::from_secs(DAY)],
            raw_retention: Duration::from_secs(365 * DAY),
            // humantime counts a year as 365.25 days.
            rollup_retention: Duration::from_secs(5 * 31_557_600),
            retention_interval: Duration::from_secs(3600),
            max_in_flight_batches: 4,
            max_batch_bytes: 16 * 1024 * 1024,
            registry_refresh_interval: Duration::from_secs(30),
        }
    }
}

/// Photo storage settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// The largest photo accepted, in bytes.
    pub max_image_bytes: u64,
    /// Longest side of thumbnails, in pixels.
    pub thumbnail_size: u32,
    /// Age at which originals are deleted; zero keeps them.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Per-farm retention overrides: farm id to age (checked by [`ServerConfig::validate`]).
    pub farm_retention: std::collections::BTreeMap<String, String>,
    /// The S3 storage class old originals move to; empty: none.
    pub cold_storage_class: String,
    /// Age at which originals move to `cold_storage_class`.
    #[serde(with = "humantime_serde")]
    pub cold_after: Duration,
    /// How often the sweeper runs.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Age of a blob intent after which its blob, if unreferenced, is an orphan.
    #[serde(with = "humantime_serde")]
    pub orphan_grace: Duration,
    /// Idle time after which an unfinished upload is abandoned.
    #[serde(with = "humantime_serde")]
    pub upload_expiry: Duration,
    /// The base URL of this server for file:// image URLs; empty: relative URLs.
    pub public_url: String,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        ImagesConfig {
            max_image_bytes: 20 * 1024 * 1024,
            thumbnail_size: 320,
            retention: Duration::ZERO,
            farm_retention: Default::default(),
            cold_storage_class: String::new(),
            cold_after: Duration::from_secs(30 * DAY),
            sweep_interval: Duration::from_secs(60),
            orphan_grace: Duration::from_secs(15 * 60),
            upload_expiry: Duration::from_secs(DAY),
            public_url: String::new(),
        }
    }
}

impl ImagesConfig {
    /// The per-farm retention overrides, parsed.
    pub fn farm_retention(&self) -> Result<std::collections::BTreeMap<uuid::Uuid, Duration>> {
        self.farm_retention
            .iter()
            .map(|(farm, age)| {
                let farm_id = uuid::Uuid::try_parse(farm).map_err(|_| {
                    Error::invalid("images.farm_retention", format!("{farm:?} is not a farm id (a UUID)"))
                })?;
                let age = humantime::parse_duration(age).map_err(|error| {
                    Error::invalid(
                        "images.farm_retention",
                        format!("{age:?} is not a duration like \"90days\": {error}"),
                    )
                })?;
                Ok((farm_id, age))
            })
            .collect()
    }
}

/// Model serving settings (the inference role).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Diagnose every new photo with the active plant-disease model and save the diagnosis on it.
    pub diagnose_new_images: bool,
    /// Announce a photo's diagnosis (for alerts) when it is at least this confident: a disease raises the farm's
    /// model-verdict rules, a healthy class resolves the camera's disease alerts.
    pub disease_alert_confidence: f64,
    /// Score every committed telemetry batch with the active anomaly model.
    pub score_new_readings: bool,
    /// How much of a series' past the anomaly detector learns normal from.
    #[serde(with = "humantime_serde")]
    pub anomaly_history: Duration,
    /// A series' fitted detector is relearned when older than this.
    #[serde(with = "humantime_serde")]
    pub anomaly_refit: Duration,
    /// A committed batch still unconfirmed this long after it arrived is scored late (see
    /// `TelemetryStore::claim_unscored`), and a photo still without a diagnosis, or whose verdict the alert role
    /// has not confirmed, is diagnosed late (see `ImageStore::images_to_diagnose`).
    #[serde(with = "humantime_serde")]
    pub late_scoring_after: Duration,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            diagnose_new_images: true,
            disease_alert_confidence: 0.8,
            score_new_readings: true,
            anomaly_history: Duration::from_secs(14 * 86_400),
            anomaly_refit: Duration::from_secs(86_400),
            late_scoring_after: Duration::from_secs(300),
        }
    }
}

/// Alert fan-out and command settings (the alert and command roles).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// The first wait before a failed webhook delivery is retried; it doubles per failure.
    #[serde(with = "humantime_serde")]
    pub webhook_retry_min: Duration,
    /// The longest wait between webhook delivery attempts.
    #[serde(with = "humantime_serde")]
    pub webhook_retry_max: Duration,
    /// Failed attempts in a row after which a webhook is marked failing.
    pub webhook_max_failures: u32,
    /// Time limit of one delivery attempt.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// How often commands past their TTL are marked expired.
    #[serde(with = "humantime_serde")]
    pub command_expiry_interval: Duration,
    /// How long finished commands are kept after they were sent; zero keeps them forever.
    #[serde(with = "humantime_serde")]
    pub command_retention: Duration,
    /// How long alert events are kept, and resolved alerts after they opened; zero keeps them forever.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// A `Subscribe` stream that sent nothing for this long sends a heartbeat carrying its cursor.
    #[serde(with = "humantime_serde")]
    pub stream_heartbeat: Duration,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook_retry_min: Duration::from_secs(1),
            webhook_retry_max: Duration::from_secs(300),
            webhook_max_failures: 5,
            webhook_timeout: Duration::from_secs(10),
            command_expiry_interval: Duration::from_secs(1),
            command_retention: Duration::from_secs(90 * 86_400),
            retention: Duration::from_secs(365 * 86_400),
            stream_heartbeat: Duration::from_secs(30),
        }
    }
}

/// PostgreSQL connection pool settings. tokio-postgres sets no timeouts or keepalives by default; these do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Most open connections.
    pub max_connections: usize,
    /// Connection timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long to wait for a pooled connection.
    #[serde(with = "humantime_serde")]
    pub pool_wait_timeout: Duration,
    /// Per-statement timeout.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// TCP keepalive idle time.
    #[serde(with = "humantime_serde")]
    pub keepalive_idle: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            max_connections: 16,
            connect_timeout: Duration::from_secs(10),
            pool_wait_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            keepalive_idle: Duration::from_secs(60),
        }
    }
}

impl ServerConfig {
    /// Reads a config file. Unknown keys and bad values are errors that name the file and the key.
    pub fn from_file(path: &Path) -> Result<ServerConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| Error::invalid("config", format!("cannot read {}: {error}", path.display())))?;
        ServerConfig::from_toml(&text)
            .map_err(|error| Error::invalid("config", format!("{}: {}", path.display(), error_reason(&error))))
    }

    /// Parses config text.
    pub fn from_toml(text: &str) -> Result<ServerConfig> {
        let config: ServerConfig = toml::from_str(text).map_err(|error| Error::invalid("config", error.message()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules that serde cannot express.
    pub fn validate(&self) -> Result<()> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::invalid("tls_cert", "tls_cert and tls_key must be set together"));
        }
        let telemetry = &self.telemetry;
        if telemetry.rollup_widths.iter().any(|w| w.as_secs() == 0 || w.subsec_nanos() != 0) {
            return Err(Error::invalid(
                "telemetry.rollup_widths",
                "each width must be a whole number of seconds, at least 1s",
            ));
        }
        // A width given twice ("1h" and "60m") would add every reading to its rollup twice.
        let mut widths = telemetry.rollup_widths.clone();
        widths.sort();
        if let Some(pair) = widths.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(Error::invalid(
                "telemetry.rollup_widths",
                format!("{} s is given twice; each width may appear once", pair[0].as_secs()),
            ));
        }
        if telemetry.max_in_flight_batches == 0 {
            return Err(Error::invalid("telemetry.max_in_flight_batches", "must be at least 1"));
        }
        if telemetry.max_batch_bytes < 64 * 1024 {
            return Err(Error::invalid("telemetry.max_batch_bytes", "must be at least 65536"));
        }
        if telemetry.retention_interval.is_zero() || telemetry.registry_refresh_interval.is_zero() {
            return Err(Error::invalid("telemetry", "intervals must be longer than zero"));
        }
        let inference = &self.inference;
        if !(0.0..=1.0).contains(&inference.disease_alert_confidence) {
            return Err(Error::invalid("inference.disease_alert_confidence", "must be between 0 and 1"));
        }
        if inference.anomaly_history.is_zero() || inference.anomaly_refit.is_zero() {
            return Err(Error::invalid("inference", "anomaly_history and anomaly_refit must be above zero"));
        }
        if inference.late_scoring_after < Duration::from_secs(1) {
            return Err(Error::invalid("inference.late_scoring_after", "must be at least 1s"));
        }
        let alerts = &self.alerts;
        if alerts.webhook_retry_min.is_zero()
            || alerts.webhook_retry_max < alerts.webhook_retry_min
            || alerts.webhook_timeout.is_zero()
            || alerts.command_expiry_interval.is_zero()
            || alerts.stream_heartbeat.is_zero()
        {
            return Err(Error::invalid(
                "alerts",
                "webhook_retry_min, webhook_timeout, command_expiry_interval and stream_heartbeat must be above zero, webhook_retry_max at least webhook_retry_min",
            ));
        }
        if alerts.webhook_max_failures == 0 {
            return Err(Error::invalid("alerts.webhook_max_failures", "must be at least 1"));
        }
        let images = &self.images;
        if images.max_image_bytes < 1024 || images.max_image_bytes > 1 << 30 {
            return Err(Error::invalid("images.max_image_bytes", "must be between 1024 bytes and 1 GiB"));
        }
        if !(16..=2048).contains(&images.thumbnail_size) {
            return Err(Error::invalid("images.thumbnail_size", "must be between 16 and 2048 pixels"));
        }
        if images.sweep_interval.is_zero() || images.upload_expiry.is_zero() || images.orphan_grace.is_zero() {
            return Err(Error::invalid(
                "images",
                "sweep_interval, orphan_grace and upload_expiry must be longer than zero",
            ));
        }
        images.farm_retention()?;
        let public_url_ok = images.public_url.is_empty()
            || images.public_url.starts_with("http://")
            || images.public_url.starts_with("https://");
        if !public_url_ok {
            return Err(Error::invalid("images.public_url", "must start with http:// or https://"));
        }
        if self.postgres.max_connections == 0 {
            return Err(Error::invalid("postgres.max_connections", "must be at least 1"));
        }
        Ok(())
    }

    /// Checks what a serving process needs of settings that may come from several places (file, environment,
    /// flags): call it once they are all applied.
    pub fn validate_for_serving(&self) -> Result<()> {
        // Replicas that hear each other must share one database: events carry its alert-log sequence numbers, and
        // a replica on its own SQLite file would number its events over another's (live streams would skip some).
        if !self.bus_url.is_empty() && !self.effective_database_url().starts_with("postgres") {
            return Err(Error::invalid(
                "bus_url",
                "a bus across replicas needs a database they share: set database_url to postgres://… (SQLite is one process's own)",
            ));
        }
        Ok(())
    }

    /// The database URL to use, with the embedded default filled in.
    pub fn effective_database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("smartfarm.db").display())
        } else {
            self.database_url.clone()
        }
    }

    /// The blob URL to use, with the embedded default filled in.
    pub fn effective_blob_url(&self) -> String {
        if self.blob_url.is_empty() {
            format!("file://{}", self.data_dir.join("blobs").display())
        } else {
            self.blob_url.clone()
        }
    }
}

fn error_reason(error: &Error) -> String {
    match error {
        Error::InvalidArgument { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Serde for lists of human-written durations.
mod humantime_serde_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(durations: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(durations.iter().map(|d| humantime::format_duration(*d).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .into_iter()
            .map(|text| {
                humantime::parse_duration(&text).map_err(|error| {
                    serde::de::Error::custom(format!("{text:?} is not a duration like \"1h\": {error}"))
                })
            })
            .collect()
    }
}

/// Serde for durations written the human way ("10s", "5m", "1h 30m").
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*duration).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map_err(|error| serde::de::Error::custom(format!("{text:?} is not a duration like \"10s\": {error}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_documents_exactly_the_defaults() {
        assert_eq!(ServerConfig::from_toml(EXAMPLE).unwrap(), ServerConfig::default());
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let error = ServerConfig::from_toml("listen = \"127.0.0.1:1\"\nlisten_port = 5").unwrap_err().to_string();
        assert!(error.contains("listen_port"), "{error}");
        let error = ServerConfig::from_toml("[postgres]\nmax_conections = 5").unwrap_err().to_string();
        assert!(error.contains("max_conections"), "{error}");
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let error = ServerConfig::from_toml("[postgres]\nconnect_timeout = \"soon\"").unwrap_err().to_string();
        assert!(error.contains("\"soon\" is not a duration"), "{error}");
        let error = ServerConfig::from_toml("target = \"all,weather\"").unwrap_err().to_string();
        assert!(error.contains("unknown role"), "{error}");
        let error = ServerConfig::from_toml("tls_cert = \"/x.pem\"").unwrap_err().to_string();
        assert!(error.contains("tls_key must be set together"), "{error}");
        let error = ServerConfig::from_toml("[telemetry]\nrollup_widths = [\"1h\", \"60m\"]").unwrap_err().to_string();
        assert!(error.contains("3600 s is given twice"), "{error}");
        // The database may come from the environment or a flag: the bus is checked once everything is applied.
        let mut config = ServerConfig::from_toml("bus_url = \"nats://127.0.0.1:4222\"").unwrap();
        let error = config.validate_for_serving().unwrap_err().to_string();
        assert!(error.starts_with("bus_url:") && error.contains("postgres://"), "{error}");
        config.database_url = "postgres://db/smartfarm".into();
        config.validate_for_serving().unwrap();
    }

    #[test]
    fn per_farm_image_retention_names_farms_by_id() {
        let farm = "01939a6e-8f3c-7d2a-9b1e-1f2d3c4b5a69";
        let config = ServerConfig::from_toml(&format!("[images.farm_retention]\n\"{farm}\" = \"90days\"")).unwrap();
        let retention = config.images.farm_retention().unwrap();
        assert_eq!(retention[&uuid::Uuid::parse_str(farm).unwrap()], Duration::from_secs(90 * 86_400));
        let error = ServerConfig::from_toml("[images.farm_retention]\n\"north farm\" = \"90days\"").unwrap_err();
        assert!(error.to_string().contains("\"north farm\" is not a farm id"), "{error}");
        let error = ServerConfig::from_toml(&format!("[images.farm_retention]\n\"{farm}\" = \"a while\"")).unwrap_err();
        assert!(error.to_string().contains("is not a duration"), "{error}");
        let error = ServerConfig::from_toml("[images]\npublic_url = \"farm.example.com\"").unwrap_err();
        assert!(error.to_string().contains("images.public_url"), "{error}");
    }

    #[test]
    fn embedded_defaults_live_under_the_data_dir() {
        let config = ServerConfig { data_dir: PathBuf::from("/var/lib/smartfarm"), ..Default::default() };
        assert_eq!(config.effective_database_url(), "sqlite:///var/lib/smartfarm/smartfarm.db");
        assert_eq!(config.effective_blob_url(), "file:///var/lib/smartfarm/blobs");
    }
}
