//! `smartfarm-sim`: simulated farm sensors and cameras. `provision` registers sensors with the cloud; `run` connects
//! them to an edge agent and publishes, then prints (and optionally writes) a JSON report of what was sent and
//! acknowledged; `camera` drops photos into a camera directory of an agent (`--camera-dir`), as a camera program
//! would.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use smartfarm_edge::sim::{self, RunOptions, SensorCredentials};

/// Simulated sensors for a smartfarm edge agent.
#[derive(Debug, Parser)]
#[command(name = "smartfarm-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register simulated sensors on a farm and write their credentials to a JSON file.
    Provision {
        /// The cloud's URL.
        #[arg(long)]
        cloud: String,
        /// An API key that may register devices on the farm.
        #[arg(long, env = "SMARTFARM_API_KEY", hide_env_values = true)]
        api_key: String,
        /// The farm.
        #[arg(long)]
        farm_id: String,
        /// How many sensors.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Device names are <prefix>-<n>.
        #[arg(long, default_value = "sim-sensor")]
        prefix: String,
        /// Where to write the credentials.
        #[arg(long)]
        out: PathBuf,
    },
    /// Connect the sensors to an edge agent and publish.
    Run {
        /// The edge agent's MQTT address, host:port.
        #[arg(long)]
        mqtt: String,
        /// The credentials file `provision` wrote.
        #[arg(long)]
        sensors: PathBuf,
        /// Messages per second, all sensors together (each message carries two readings).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Messages each sensor sends.
        #[arg(long, default_value_t = 10)]
        messages_per_sensor: u64,
        /// A SIMPaCT soil-moisture CSV to replay (e.g. edge-agent/fixtures/soil_moisture_simpact.csv).
        #[arg(long)]
        replay: Option<PathBuf>,
        /// MQTT quality of service: 0, 1 or 2.
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// How long to wait for outstanding acknowledgements at the end.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
        /// Also write the report here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Drop leaf photos (each one distinct) into a camera directory the agent watches.
    Camera {
        /// The directory (the agent's `--camera-dir CAMERA_ID=DIR`).
        #[arg(long)]
        dir: PathBuf,
        /// How many photos.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Time between photos.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = smartfarm_core::observability::init_tracing(smartfarm_core::config::LogFormat::Text, "warn");
    match Cli::parse().command {
        Command::Provision { cloud, api_key, farm_id, count, prefix, out } => {
            let sensors = sim::provision(&cloud, &api_key, &farm_id, count, &prefix).await?;
            std::fs::write(&out, serde_json::to_vec_pretty(&sensors)?)?;
            println!("registered {} sensors; credentials in {}", sensors.len(), out.display());
        }
        Command::Run { mqtt, sensors, rate, messages_per_sensor, replay, qos, drain_timeout, report } => {
            let sensors: Vec<SensorCredentials> = serde_json::from_slice(&std::fs::read(&sensors)?)?;
            let replay = match replay {
                Some(path) => sim::read_replay(&path)?,
                None => Vec::new(),
            };
            let options = RunOptions { mqtt, rate, messages_per_sensor, replay, qos, drain_timeout };
            let result = sim::run(&sensors, options).await?;
            let json = serde_json::to_string_pretty(&result)?;
            if let Some(path) = report {
                std::fs::write(path, &json)?;
            }
            println!(
                "{}",
                serde_json::to_string(&serde_json::json!({
                    "sensors": result.sensors,
                    "messages_sent": result.messages_sent,
                    "messages_acked": result.messages_acked,
                    "readings_acked": result.readings_acked,
                    "connection_errors": result.connection_errors,
                    "elapsed_seconds": result.elapsed_seconds,
                }))?
            );
        }
        Command::Camera { dir, count, interval } => {
            let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let mut bytes = 0;
            for shot in 0..count {
                if shot > 0 {
                    tokio::time::sleep(interval).await;
                }
                let photo = sim::camera_shot(started + shot);
                bytes += photo.len();
                sim::drop_photos(&dir, &[(&format!("shot-{}.jpg", started + shot), &photo)])?;
            }
            println!("{}", serde_json::json!({ "photos": count, "bytes": bytes, "dir": dir.display().to_string() }));
        }
    }
    Ok(())
}
