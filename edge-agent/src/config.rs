//! The agent's configuration: a TOML file whose every key is documented in [`EXAMPLE`] (what
//! `smartfarm-edge config example` prints), with command-line flags and `SMARTFARM_EDGE_*` variables on top.
//! Unknown keys are an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spool::{FsyncPolicy, SpoolConfig};

/// The documented default configuration. A test checks that it parses to exactly [`EdgeConfig::default`].
pub const EXAMPLE: &str = r#"# smartfarm-edge configuration. Every key is optional; shown here with its default.
# Precedence: command-line flag > SMARTFARM_EDGE_* environment variable > this file > default.

# The cloud's gRPC address. https:// uses TLS (rustls, with the Mozilla roots and ca_cert if given);
# http:// is refused unless allow_plaintext is true. Flag --cloud.
cloud = "https://127.0.0.1:50051"

# The gateway's credential, as RegisterDevice returned it for a DEVICE_KIND_GATEWAY device.
# Flag --credential, variable SMARTFARM_EDGE_CREDENTIAL (prefer the variable: flags show in `ps`).
credential = ""

# A PEM file of extra CA certificates for the cloud's TLS (a private CA). Flag --ca-cert.
# ca_cert = "/etc/smartfarm/cloud-ca.pem"

# Allow an http:// cloud URL (no TLS). Only for a cloud on the same trusted network or for tests.
allow_plaintext = false

# Where the farm's sensors connect (MQTT 3.1.1 and 5). Flag --mqtt-listen.
mqtt_listen = "0.0.0.0:1883"

# Accept sensors that connect without a username and password. They may still only publish as devices the
# registry knows. Flag --allow-anonymous.
allow_anonymous = false

# Where accepted readings are kept until the cloud acknowledges them, with the registry cache. Flag --spool-dir.
spool_dir = "smartfarm-edge-spool"

# The spool's size cap: past it the oldest data is dropped, counted in smartfarm_edge_spool_dropped_records_total
# and announced on smartfarm/alerts.
spool_max_bytes = 1073741824

# Size at which a spool segment is closed and a new one begun; the cap drops whole segments.
spool_segment_bytes = 4194304

# When the spool is forced to disk: "always" (nothing acknowledged to a sensor is lost in a power cut),
# "interval" (up to fsync_interval of readings can be lost) or "never" (the operating system decides).
fsync = "always"
fsync_interval = "1s"

# How often batches are sent to the cloud; sooner when upload_threshold_bytes are waiting. Flag --upload-interval.
upload_interval = "1h"
upload_threshold_bytes = 8388608

# Largest batch, in records and in bytes before compression (a batch is held in memory while it is built and sent,
# up to 4 at once).
batch_max_records = 10000
batch_max_bytes = 2097152

# What goes up: "raw" readings, "aggregates" (one record per device, metric and window; raw readings are then
# kept only in memory until their window closes) or "both".
upload = "both"

# Aggregation window, aligned to the clock (a 5m window runs 10:00-10:05, 10:05-10:10, ...).
aggregation_window = "5m"

# Readings stamped further than this in the future are refused (a sensor with a wrong clock).
max_future_skew = "5m"

# HTTP/2 keepalive on the cloud link: a ping when idle this long, and the link is dead if no answer in
# keepalive_timeout.
keepalive_interval = "30s"
keepalive_timeout = "20s"

# Reconnects back off exponentially, with jitter, between these bounds.
reconnect_min = "1s"
reconnect_max = "5m"

# Photos wait in the spool's image area (SPOOL_DIR/images) until the cloud has them. Past this cap the oldest are
# dropped, counted in smartfarm_edge_images_dropped_total and announced on smartfarm/alerts.
image_spool_max_bytes = 2147483648

# Raw frames (PNG) are re-encoded to JPEG at reencode_quality ("jpeg"), or kept as they come ("keep"). JPEG and
# WebP photos are kept as they come unless reencode_jpeg is true (re-encoding a JPEG loses detail and can make it
# larger).
reencode = "jpeg"
reencode_quality = 85
reencode_jpeg = false

# Photos go up in chunks of this many bytes; a cut link resumes from the last chunk the cloud kept.
image_chunk_bytes = 1048576

# How often camera directories are scanned. A file is taken once it is complete: renamed in, or unchanged for
# this long; names starting with "." or ending in .tmp/.part/.partial are left alone.
camera_poll_interval = "2s"

# Diagnose every photo on the farm with the plant-disease model (agents built with the `ai` feature): a disease at
# least this confident is announced on smartfarm/alerts at once, with or without the cloud. The model is the one
# built into the agent until the cloud pushes its active version, which is kept in SPOOL_DIR/models/.
diagnose_photos = true
disease_alert_confidence = 0.8

# Cameras, each a DEVICE_KIND_CAMERA device of the registry with one source:
#   dir      = a directory another program drops photos into (taken as they appear; also --camera-dir ID=DIR),
#   http_url = a snapshot URL fetched every interval (http://[user:password@]host[:port]/path),
#   command  = a program run every interval whose standard output is the photo,
#              e.g. ["libcamera-still", "-n", "-o", "-"] or ["fswebcam", "--no-banner", "-"].
# [[cameras]]
# device_id = "01939a6e-8f3c-7d2a-9b1e-1f2d3c4b5a69"
# http_url = "http://192.168.1.20/snapshot.jpg"
# interval = "1h"

# Where /metrics (Prometheus) is served; empty disables it. Flag --metrics-listen.
metrics_listen = "127.0.0.1:9465"

# Log format ("text" or "json") and filter.
log_format = "text"
log_level = "info"
"#;

/// Configuration of the edge agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    pub cloud: String,
    pub credential: String,
    pub ca_cert: Option<PathBuf>,
    pub allow_plaintext: bool,
    pub mqtt_listen: SocketAddr,
    pub allow_anonymous: bool,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub spool_segment_bytes: u64,
    pub fsync: FsyncMode,
    #[serde(with = "duration")]
    pub fsync_interval: Duration,
    #[serde(with = "duration")]
    pub upload_interval: Duration,
    pub upload_threshold_bytes: u64,
    pub batch_max_records: usize,
    pub batch_max_bytes: usize,
    pub upload: UploadMode,
    #[serde(with = "duration")]
    pub aggregation_window: Duration,
    #[serde(with = "duration")]
    pub max_future_skew: Duration,
    #[serde(with = "duration")]
    pub keepalive_interval: Duration,
    #[serde(with = "duration")]
    pub keepalive_timeout: Duration,
    #[serde(with = "duration")]
    pub reconnect_min: Duration,
    #[serde(with = "duration")]
    pub reconnect_max: Duration,
    pub image_spool_max_bytes: u64,
    pub reencode: Reencode,
    pub reencode_quality: u8,
    pub reencode_jpeg: bool,
    pub image_chunk_bytes: usize,
    #[serde(with = "duration")]
    pub camera_poll_interval: Duration,
    pub diagnose_photos: bool,
    pub disease_alert_confidence: f64,
    pub cameras: Vec<CameraConfig>,
    pub metrics_listen: String,
    pub log_format: smartfarm_core::config::LogFormat,
    pub log_level: String,
}

/// The `reencode` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reencode {
    Keep,
    Jpeg,
}

/// One camera and its source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    pub device_id: uuid::Uuid,
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub http_url: Option<String>,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default = "hourly", with = "duration")]
    pub interval: Duration,
}

fn hourly() -> Duration {
    Duration::from_secs(3600)
}

impl CameraConfig {
    /// A camera fed by a directory.
    pub fn dir(device_id: uuid::Uuid, dir: PathBuf) -> CameraConfig {
        CameraConfig { device_id, dir: Some(dir), http_url: None, command: None, interval: hourly() }
    }

    /// Parses `--camera-dir DEVICE_ID=DIR`.
    pub fn parse_dir_flag(value: &str) -> Result<CameraConfig, ConfigError> {
        let (id, dir) =
            value.split_once('=').ok_or_else(|| bad("camera-dir", format!("{value:?} is not CAMERA_DEVICE_ID=DIR")))?;
        let id = uuid::Uuid::try_parse(id).map_err(|_| bad("camera-dir", format!("{id:?} is not a device id")))?;
        if dir.is_empty() {
            return Err(bad("camera-dir", "the directory is empty"));
        }
        Ok(CameraConfig::dir(id, PathBuf::from(dir)))
    }

    /// The source, for logs (without credentials).
    pub fn describe(&self) -> String {
        match (&self.dir, &self.http_url, &self.command) {
            (Some(dir), _, _) => format!("directory {}", dir.display()),
            (None, Some(url), _) => {
                let shown = match url.split_once("://").and_then(|(_, rest)| rest.split_once('@')) {
                    Some((_, host)) => format!("http://…@{host}"),
                    None => url.clone(),
                };
                format!("snapshot {shown} every {}", humantime::format_duration(self.interval))
            }
            (None, None, Some(command)) => {
                format!("command {} every {}", command.join(" "), humantime::format_duration(self.interval))
            }
            (None, None, None) => "no source".into(),
        }
    }
}

/// The `fsync` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    Always,
    Interval,
    Never,
}

/// The `upload` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadMode {
    Raw,
    Aggregates,
    Both,
}

impl UploadMode {
    pub fn raw(self) -> bool {
        matches!(self, UploadMode::Raw | UploadMode::Both)
    }

    pub fn aggregates(self) -> bool {
        matches!(self, UploadMode::Aggregates | UploadMode::Both)
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            cloud: "https://127.0.0.1:50051".into(),
            credential: String::new(),
            ca_cert: None,
            allow_plaintext: false,
            mqtt_listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            allow_anonymous: false,
            spool_dir: PathBuf::from("smartfarm-edge-spool"),
            spool_max_bytes: 1 << 30,
            spool_segment_bytes: 4 << 20,
            fsync: FsyncMode::Always,
            fsync_interval: Duration::from_secs(1),
            upload_interval: Duration::from_secs(3600),
            upload_threshold_bytes: 8 << 20,
            batch_max_records: 10_000,
            batch_max_bytes: 2 << 20,
            upload: UploadMode::Both,
            aggregation_window: Duration::from_secs(300),
            max_future_skew: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(300),
            image_spool_max_bytes: 2 << 30,
            reencode: Reencode::Jpeg,
            reencode_quality: 85,
            reencode_jpeg: false,
            image_chunk_bytes: 1 << 20,
            camera_poll_interval: Duration::from_secs(2),
            diagnose_photos: true,
            disease_alert_confidence: 0.8,
            cameras: Vec::new(),
            metrics_listen: "127.0.0.1:9465".into(),
            log_format: smartfarm_core::config::LogFormat::Text,
            log_level: "info".into(),
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

fn bad(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), reason: reason.into() }
}

impl EdgeConfig {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<EdgeConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| bad("config", format!("cannot read {}: {error}", path.display())))?;
        EdgeConfig::from_toml(&text).map_err(|error| bad("config", format!("{}: {error}", path.display())))
    }

    /// Parses config text.
    pub fn from_toml(text: &str) -> Result<EdgeConfig, ConfigError> {
        toml::from_str(text).map_err(|error| bad("config", error.message()))
    }

    /// Checks what serde cannot, before the agent starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.disease_alert_confidence) {
            return Err(bad("disease_alert_confidence", "must be between 0 and 1"));
        }
        if self.credential.is_empty() {
            return Err(bad("credential", "is required: the gateway credential RegisterDevice returned"));
        }
        match self.cloud.split_once("://") {
            Some(("https", rest)) if !rest.is_empty() => {}
            Some(("http", rest)) if !rest.is_empty() => {
                if !self.allow_plaintext {
                    return Err(bad(
                        "cloud",
                        "an http:// cloud sends the credential unencrypted; use https:// or set allow_plaintext",
                    ));
                }
            }
            _ => return Err(bad("cloud", format!("{:?} is not an http:// or https:// URL", self.cloud))),
        }
        if self.spool_segment_bytes < 4096 || self.spool_max_bytes < 2 * self.spool_segment_bytes {
            return Err(bad("spool_max_bytes", "must hold at least two segments of at least 4096 bytes"));
        }
        if self.batch_max_records == 0 || self.batch_max_bytes < 4096 {
            return Err(bad("batch_max_records", "batches need room for at least one record and 4096 bytes"));
        }
        if self.batch_max_records > smartfarm_core::validate::MAX_RECORDS_PER_BATCH {
            return Err(bad(
                "batch_max_records",
                format!("the cloud takes at most {} records a batch", smartfarm_core::validate::MAX_RECORDS_PER_BATCH),
            ));
        }
        if self.aggregation_window.as_secs() == 0 || self.aggregation_window.subsec_nanos() != 0 {
            return Err(bad("aggregation_window", "must be a whole number of seconds, at least 1s"));
        }
        if self.upload_interval.is_zero() || self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(bad("upload_interval", "intervals must be positive and reconnect_min at most reconnect_max"));
        }
        if self.fsync_interval.is_zero() {
            return Err(bad("fsync_interval", "must be positive"));
        }
        if !(4096..=4 << 20).contains(&self.image_chunk_bytes) {
            return Err(bad("image_chunk_bytes", "must be between 4096 and 4194304 (the cloud's largest chunk)"));
        }
        if !(1..=100).contains(&self.reencode_quality) {
            return Err(bad("reencode_quality", "must be between 1 and 100"));
        }
        if self.image_spool_max_bytes < 1 << 20 {
            return Err(bad("image_spool_max_bytes", "must be at least 1 MiB"));
        }
        if self.camera_poll_interval.is_zero() {
            return Err(bad("camera_poll_interval", "must be positive"));
        }
        let mut seen = std::collections::HashSet::new();
        for camera in &self.cameras {
            let sources = [camera.dir.is_some(), camera.http_url.is_some(), camera.command.is_some()];
            if sources.iter().filter(|set| **set).count() != 1 {
                return Err(bad(
                    "cameras",
                    format!("camera {} needs exactly one of dir, http_url and command", camera.device_id),
                ));
            }
            if let Some(url) = &camera.http_url
                && !url.starts_with("http://")
            {
                return Err(bad("cameras", format!("camera {}: http_url must start with http://", camera.device_id)));
            }
            if camera.command.as_ref().is_some_and(|command| command.is_empty()) {
                return Err(bad("cameras", format!("camera {}: command is empty", camera.device_id)));
            }
            if camera.interval.is_zero() {
                return Err(bad("cameras", format!("camera {}: interval must be positive", camera.device_id)));
            }
            if !seen.insert(camera.device_id) {
                return Err(bad("cameras", format!("camera {} is configured twice", camera.device_id)));
            }
        }
        if !self.metrics_listen.is_empty() && self.metrics_listen.parse::<SocketAddr>().is_err() {
            return Err(bad("metrics_listen", format!("{:?} is not host:port", self.metrics_listen)));
        }
        Ok(())
    }

    /// The spool settings.
    pub fn spool(&self) -> SpoolConfig {
        SpoolConfig {
            dir: self.spool_dir.clone(),
            segment_bytes: self.spool_segment_bytes,
            max_bytes: self.spool_max_bytes,
            fsync: match self.fsync {
                FsyncMode::Always => FsyncPolicy::Always,
                FsyncMode::Interval => FsyncPolicy::Interval(self.fsync_interval),
                FsyncMode::Never => FsyncPolicy::Never,
            },
        }
    }
}

/// Serde for human-written durations ("30s", "1h").
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*duration).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map_err(|error| serde::de::Error::custom(format!("{text:?} is not a duration like \"30s\": {error}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_documents_exactly_the_defaults() {
        assert_eq!(EdgeConfig::from_toml(EXAMPLE).unwrap(), EdgeConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let error = EdgeConfig::from_toml("upload_intervall = \"1h\"").unwrap_err().to_string();
        assert!(error.contains("upload_intervall"), "{error}");
        let error = EdgeConfig::from_toml("fsync = \"sometimes\"").unwrap_err().to_string();
        assert!(error.contains("sometimes"), "{error}");
        let valid = EdgeConfig { credential: "sfd_x".into(), ..Default::default() };
        assert!(valid.validate().is_ok());
        let plaintext = EdgeConfig { cloud: "http://cloud:50051".into(), ..valid.clone() };
        assert!(plaintext.validate().unwrap_err().to_string().contains("allow_plaintext"));
        assert!(EdgeConfig { allow_plaintext: true, ..plaintext }.validate().is_ok());
        assert!(EdgeConfig::default().validate().unwrap_err().to_string().starts_with("credential"));
        let no_interval = EdgeConfig { fsync_interval: Duration::ZERO, ..valid.clone() };
        assert!(no_interval.validate().unwrap_err().to_string().starts_with("fsync_interval"));
    }

    #[test]
    fn cameras_need_one_source_each() {
        let valid = EdgeConfig { credential: "sfd_x".into(), ..Default::default() };
        let config = EdgeConfig::from_toml(
            r#"
            [[cameras]]
            device_id = "01939a6e-8f3c-7d2a-9b1e-1f2d3c4b5a69"
            http_url = "http://user:pw@192.168.1.20/snapshot.jpg"
            interval = "15m"
            "#,
        )
        .unwrap();
        let camera = &config.cameras[0];
        assert_eq!(camera.interval, Duration::from_secs(900));
        assert_eq!(camera.describe(), "snapshot http://…@192.168.1.20/snapshot.jpg every 15m");
        let both = CameraConfig { dir: Some("/tmp/x".into()), ..camera.clone() };
        let error = EdgeConfig { cameras: vec![both], ..valid.clone() }.validate().unwrap_err().to_string();
        assert!(error.contains("exactly one of dir, http_url and command"), "{error}");
        let twice = EdgeConfig { cameras: vec![camera.clone(), camera.clone()], ..valid.clone() };
        assert!(twice.validate().unwrap_err().to_string().contains("configured twice"));
        let flag = CameraConfig::parse_dir_flag("01939a6e-8f3c-7d2a-9b1e-1f2d3c4b5a69=/var/camera").unwrap();
        assert_eq!(flag.dir.as_deref(), Some(Path::new("/var/camera")));
        assert!(CameraConfig::parse_dir_flag("camera-1=/x").unwrap_err().to_string().contains("not a device id"));
        assert!(CameraConfig::parse_dir_flag("/x").unwrap_err().to_string().contains("CAMERA_DEVICE_ID=DIR"));
    }
}
