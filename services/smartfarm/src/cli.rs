//! The command line: subcommands and the flags that override the config file. Every server flag can also come
//! from a `SMARTFARM_*` environment variable; precedence is flag > environment > config file > default.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use smartfarm_core::config::{LogFormat, ServerConfig};
use smartfarm_core::{Result, Target};

/// smartfarm: the farm IoT platform's cloud. One binary runs every service, or the roles you pick.
#[derive(Debug, Parser)]
#[command(name = "smartfarm", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: every role in one process on one port, or the roles --target names.
    Serve(ServeArgs),
    /// Run the whole product on this machine: the cloud, a farm's edge agent and simulated sensors.
    Demo {
        #[command(flatten)]
        storage: StorageArgs,
        #[command(flatten)]
        demo: crate::demo::DemoArgs,
    },
    /// Apply the database migrations the database lacks, then exit.
    Migrate(StorageArgs),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Train a model (plant disease) with Burn on this machine's CPU.
    Train {
        #[command(subcommand)]
        command: crate::ml::TrainCommand,
    },
    /// Evaluate a model: plant disease on labelled photos, or the anomaly detector on labelled series.
    Eval {
        #[command(subcommand)]
        command: crate::ml::EvalCommand,
    },
    /// Model versions in this installation's store.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Administration.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the documented default configuration (a valid config file).
    Example,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Store a model file (from `smartfarm train`) as a new version; `--activate` makes it serve.
    Add(AddModelArgs),
}

/// Flags of `model add`.
#[derive(Debug, Args)]
pub struct AddModelArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
    /// The model file (safetensors with a smartfarm model card).
    #[arg(long, value_name = "MODEL")]
    pub file: PathBuf,
    /// Make this version the serving one of its model (running servers pick it up at their next request).
    #[arg(long)]
    pub activate: bool,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an API key and print its secret as the last line (admin unless --farm-id is given).
    CreateKey(CreateKeyArgs),
}

/// Flags that say where the data lives; shared by every subcommand that touches storage.
#[derive(Debug, Args)]
pub struct StorageArgs {
    /// A TOML config file (see `smartfarm config example`).
    #[arg(long, env = "SMARTFARM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the embedded database, local blobs and the first admin key.
    #[arg(long, env = "SMARTFARM_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// sqlite://PATH or postgres://USER@HOST:PORT/DB (default: SQLite under the data dir).
    #[arg(long, env = "SMARTFARM_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// file://DIR or s3://[KEY:SECRET@]BUCKET[/PREFIX][?endpoint=URL&region=R] (default: the data dir's blobs/).
    #[arg(long, env = "SMARTFARM_BLOB_URL", value_name = "URL")]
    pub blob_url: Option<String>,
    /// The bus between replicas: nats://HOST:PORT[/NAME] (NATS JetStream); default: within this process.
    #[arg(long, env = "SMARTFARM_BUS_URL", value_name = "URL")]
    pub bus_url: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "SMARTFARM_LOG_FORMAT", value_name = "FORMAT", value_parser = parse_log_format)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or info,smartfarm_store=debug (SMARTFARM_LOG, when set, wins over it).
    #[arg(long, env = "SMARTFARM_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Address to listen on (gRPC, gRPC-web, health, reflection and /metrics share it). Port 0 picks a free one.
    #[arg(long, env = "SMARTFARM_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Roles to run: all, or a comma-separated subset of device,ingestion,image,inference,alert,command.
    #[arg(long, env = "SMARTFARM_TARGET", value_name = "ROLES", value_parser = parse_target)]
    pub target: Option<Target>,
    /// PEM certificate chain; with --tls-key the listener speaks TLS.
    #[arg(long, env = "SMARTFARM_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SMARTFARM_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Once listening, write the bound address (host:port) to this file: how scripts and tests learn the port
    /// when --listen uses port 0.
    #[arg(long, value_name = "FILE")]
    pub addr_file: Option<PathBuf>,
}

/// Flags of `admin create-key`.
#[derive(Debug, Args)]
pub struct CreateKeyArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
    /// What the key is for.
    #[arg(long, default_value = "admin key created on the command line")]
    pub name: String,
    /// Scope the key to this farm instead of making an admin key.
    #[arg(long, value_name = "FARM_ID")]
    pub farm_id: Option<String>,
}

fn parse_log_format(value: &str) -> Result<LogFormat, String> {
    value.parse().map_err(|error: smartfarm_core::Error| error.to_string())
}

fn parse_target(value: &str) -> Result<Target, String> {
    value.parse().map_err(|error: smartfarm_core::Error| error.to_string())
}

impl StorageArgs {
    /// The config file (or defaults) with these flags applied on top, validated.
    pub fn resolve(&self) -> Result<ServerConfig> {
        let config = self.apply()?;
        config.validate()?;
        Ok(config)
    }

    fn apply(&self) -> Result<ServerConfig> {
        let mut config = match &self.config {
            Some(path) => ServerConfig::from_file(path)?,
            None => ServerConfig::default(),
        };
        if let Some(data_dir) = &self.data_dir {
            config.data_dir = data_dir.clone();
        }
        if let Some(url) = &self.database_url {
            config.database_url = url.clone();
        }
        if let Some(url) = &self.blob_url {
            config.blob_url = url.clone();
        }
        if let Some(url) = &self.bus_url {
            config.bus_url = url.clone();
        }
        if let Some(format) = self.log_format {
            config.log_format = format;
        }
        if let Some(filter) = &self.log_level {
            config.log_level = filter.clone();
        }
        Ok(config)
    }
}

impl ServeArgs {
    /// The config file (or defaults) with every serve flag applied on top, validated.
    pub fn resolve(&self) -> Result<ServerConfig> {
        let mut config = self.storage.apply()?;
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(target) = &self.target {
            config.target = target.clone();
        }
        if self.tls_cert.is_some() {
            config.tls_cert = self.tls_cert.clone();
            config.tls_key = self.tls_key.clone();
        }
        config.validate()?;
        config.validate_for_serving()?;
        Ok(config)
    }
}
