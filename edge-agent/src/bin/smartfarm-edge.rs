//! `smartfarm-edge`: the farm's edge agent. Flags override the config file, which overrides the defaults that
//! `smartfarm-edge config example` prints.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use smartfarm_edge::config::{CameraConfig, EXAMPLE, EdgeConfig};

/// The smartfarm edge agent: an MQTT broker for the farm's sensors, a durable spool, and the link to the cloud.
#[derive(Debug, Parser)]
#[command(name = "smartfarm-edge", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A TOML config file (see `smartfarm-edge config example`).
    #[arg(long, env = "SMARTFARM_EDGE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The cloud's URL, e.g. https://cloud.example.com:50051.
    #[arg(long, env = "SMARTFARM_EDGE_CLOUD", value_name = "URL")]
    cloud: Option<String>,
    /// The gateway credential (prefer the environment variable: flags show in `ps`).
    #[arg(long, env = "SMARTFARM_EDGE_CREDENTIAL", value_name = "TOKEN", hide_env_values = true)]
    credential: Option<String>,
    /// A PEM file of extra CA certificates for the cloud's TLS.
    #[arg(long, env = "SMARTFARM_EDGE_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Allow an http:// cloud URL.
    #[arg(long, env = "SMARTFARM_EDGE_ALLOW_PLAINTEXT")]
    allow_plaintext: bool,
    /// Where sensors connect (MQTT).
    #[arg(long, env = "SMARTFARM_EDGE_MQTT_LISTEN", value_name = "ADDR")]
    mqtt_listen: Option<SocketAddr>,
    /// Accept sensors without a username and password.
    #[arg(long, env = "SMARTFARM_EDGE_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// The spool directory.
    #[arg(long, env = "SMARTFARM_EDGE_SPOOL_DIR", value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// How often batches go up, e.g. 1h or 30s.
    #[arg(long, env = "SMARTFARM_EDGE_UPLOAD_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    upload_interval: Option<Duration>,
    /// Where /metrics is served ("" disables it).
    #[arg(long, env = "SMARTFARM_EDGE_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// A camera fed by a directory: CAMERA_DEVICE_ID=DIR (repeatable; adds to the config file's cameras).
    #[arg(long = "camera-dir", value_name = "CAMERA_DEVICE_ID=DIR")]
    camera_dirs: Vec<String>,
    /// Once listening, write the bound addresses as JSON to this file (for scripts and tests using port 0).
    #[arg(long, value_name = "FILE")]
    addr_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the documented default configuration (a valid config file).
    Example,
}

fn resolve(cli: &Cli) -> anyhow::Result<EdgeConfig> {
    let mut config = match &cli.config {
        Some(path) => EdgeConfig::from_file(path)?,
        None => EdgeConfig::default(),
    };
    if let Some(cloud) = &cli.cloud {
        config.cloud = cloud.clone();
    }
    if let Some(credential) = &cli.credential {
        config.credential = credential.clone();
    }
    if cli.ca_cert.is_some() {
        config.ca_cert = cli.ca_cert.clone();
    }
    config.allow_plaintext |= cli.allow_plaintext;
    if let Some(address) = cli.mqtt_listen {
        config.mqtt_listen = address;
    }
    config.allow_anonymous |= cli.allow_anonymous;
    if let Some(dir) = &cli.spool_dir {
        config.spool_dir = dir.clone();
    }
    if let Some(interval) = cli.upload_interval {
        config.upload_interval = interval;
    }
    if let Some(address) = &cli.metrics_listen {
        config.metrics_listen = address.clone();
    }
    for flag in &cli.camera_dirs {
        config.cameras.push(CameraConfig::parse_dir_flag(flag)?);
    }
    config.validate()?;
    Ok(config)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Config { command: ConfigCommand::Example }) = cli.command {
        print!("{EXAMPLE}");
        return std::process::ExitCode::SUCCESS;
    }
    let config = match resolve(&cli) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(error) = smartfarm_core::observability::init_tracing(config.log_format, &config.log_level) {
        eprintln!("error: {error}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(smartfarm_edge::agent::run(config, cli.addr_file, smartfarm_core::shutdown::signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "smartfarm-edge stopped with an error");
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
