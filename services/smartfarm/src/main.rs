//! The `smartfarm` binary: parses the command line and runs the subcommand. `serve` wires the enabled roles'
//! services into the gateway; everything with behaviour lives in the library crates.

#![forbid(unsafe_code)]

mod cli;
mod demo;
mod ml;
mod serve;

use clap::Parser;

/// mimalloc keeps freed memory for reuse: the models' tensors (tens of megabytes each) would otherwise be handed
/// back to the kernel and page-faulted in again for every layer.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use smartfarm_core::config::{EXAMPLE, ServerConfig};
use smartfarm_core::observability;
use smartfarm_store::Database;

use cli::{AdminCommand, Cli, Command, ConfigCommand, ModelCommand};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "smartfarm stopped with an error");
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.resolve()?;
            init_logs(&config)?;
            serve::run(config, args.addr_file, smartfarm_core::shutdown::signal()).await
        }
        Command::Demo { storage, demo } => {
            let config = storage.resolve()?;
            init_logs(&config)?;
            demo::run(demo, config).await
        }
        Command::Migrate(args) => {
            let config = args.resolve()?;
            init_logs(&config)?;
            let database = connect(&config).await?;
            let report = database.migrate().await?;
            tracing::info!(applied = ?report.applied, schema_version = report.current_version, database = %database.describe().await, "migrations done");
            println!("schema version {} (applied now: {:?})", report.current_version, report.applied);
            Ok(())
        }
        // Training and evaluation are CPU-bound: they run on a blocking thread, not on the async workers.
        Command::Train { command } => tokio::task::spawn_blocking(move || ml::train(command)).await?,
        Command::Eval { command } => tokio::task::spawn_blocking(move || ml::eval(command)).await?,
        Command::Config { command: ConfigCommand::Example } => {
            print!("{EXAMPLE}");
            Ok(())
        }
        Command::Model { command: ModelCommand::Add(args) } => {
            let config = args.storage.resolve()?;
            init_logs(&config)?;
            let bytes = std::fs::read(&args.file)
                .map_err(|error| anyhow::anyhow!("cannot read the model file {}: {error}", args.file.display()))?;
            let database = connect(&config).await?;
            database.migrate().await?;
            let blobs = smartfarm_store::blob::open(&config.effective_blob_url()).await?;
            let serving = smartfarm_inference::Serving::new(database.models(), blobs);
            let mut stored = serving.store_model_file(&bytes, smartfarm_core::time::now()).await?;
            if args.activate {
                stored = database
                    .models()
                    .activate_model(&stored.name, &stored.version, smartfarm_core::time::now())
                    .await?;
            }
            println!(
                "{}",
                serde_json::json!({
                    "model": format!("{}@{}", stored.name, stored.version),
                    "kind": stored.kind,
                    "sha256": stored.sha256,
                    "active": stored.activate_time.is_some(),
                })
            );
            Ok(())
        }
        Command::Admin { command: AdminCommand::CreateKey(args) } => {
            let config = args.storage.resolve()?;
            init_logs(&config)?;
            let farm_id = args.farm_id.as_deref().map(|id| smartfarm_core::validate::id("farm-id", id)).transpose()?;
            let name = smartfarm_core::validate::name("name", &args.name)?;
            let database = connect(&config).await?;
            database.migrate().await?;
            let (key, secret) = smartfarm_device::create_api_key(&*database.registry(), &name, farm_id).await?;
            let scope = key.farm_id.map(|id| format!("farm {id}")).unwrap_or_else(|| "admin".to_string());
            println!("created api key {} ({scope}); the secret is shown only once:", key.id);
            println!("{secret}");
            Ok(())
        }
    }
}

fn init_logs(config: &ServerConfig) -> anyhow::Result<()> {
    observability::init_tracing(config.log_format, &config.log_level)?;
    Ok(())
}

/// Connects to the configured database.
pub(crate) async fn connect(config: &ServerConfig) -> anyhow::Result<Database> {
    Ok(Database::connect(&config.effective_database_url(), &config.postgres).await?)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn json_is_a_log_format() {
        assert_eq!(
            "json".parse::<smartfarm_core::config::LogFormat>().unwrap(),
            smartfarm_core::config::LogFormat::Json
        );
    }
}
