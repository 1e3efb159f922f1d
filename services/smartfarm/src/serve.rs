//! `smartfarm serve`: opens storage, makes the first admin key on a fresh installation, wires the enabled roles'
//! services into the gateway, and serves until SIGTERM or ctrl-c.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use smartfarm_bus::Bus;
use smartfarm_core::config::ServerConfig;
use smartfarm_core::{Role, observability};
use smartfarm_gateway::{Authenticator, Services};
use smartfarm_store::{BlobStore, Database, RegistryStore, blob};

/// The file a fresh installation's first admin key is written to, inside the data dir.
const BOOTSTRAP_KEY_FILE: &str = "admin-key";
/// The file of the key that signs image URLs served by this process (local blob storage), inside the data dir.
const URL_SIGNING_KEY_FILE: &str = "url-signing-key";

/// Serves until `stop` resolves.
pub async fn run(
    config: ServerConfig,
    addr_file: Option<PathBuf>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = observability::init_metrics();
    let database = crate::connect(&config).await?;
    let report = database.migrate().await?;
    if !report.applied.is_empty() {
        tracing::info!(applied = ?report.applied, schema_version = report.current_version, "database migrated");
    }
    // Before this process commits anything: a rollup width new to the database starts complete. Only processes
    // that commit readings say which widths are kept; the others' settings may be the defaults.
    if config.target.roles().contains(&smartfarm_core::role::Role::Ingestion) {
        let rollups = database.telemetry().align_rollups(&config.telemetry.rollup_widths).await?;
        if rollups != Default::default() {
            tracing::info!(added = ?rollups.added, dropped = ?rollups.removed, "rollup widths changed");
        }
    }
    // Opened now so that a wrong blob URL fails at start, not at the first upload.
    let blobs = blob::open(&config.effective_blob_url()).await?;
    // Checked here, not with the rest of the config: the blob URL may come from a flag or the environment.
    if !config.images.cold_storage_class.is_empty() && !config.effective_blob_url().starts_with("s3://") {
        anyhow::bail!("images.cold_storage_class needs an s3:// blob_url: local blob storage has no storage classes");
    }
    let registry = database.registry();
    bootstrap_admin_key(&*registry, &config.data_dir).await?;

    let signer = smartfarm_image::UrlSigner::new(&url_signing_key(&config.data_dir)?)?;
    let (services, Running { ingestion, pipeline }) = services_for(&config, &database, &blobs, signer).await?;
    let service_names = services.names().to_vec();
    let (app, health) = smartfarm_gateway::app(services, Authenticator::new(registry), metrics).await?;

    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(smartfarm_gateway::tls::acceptor(cert, key)?),
        _ => None,
    };
    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    // Described before the log line: a future held across the macro's await would not be Send.
    let database_description = database.describe().await;
    tracing::info!(
        listen = %local_addr,
        tls = tls.is_some(),
        roles = %config.target,
        database = %database_description,
        blobs = %blobs.describe(),
        "smartfarm serving"
    );
    // After the log line: whoever waits for the address finds the line that describes the server in the log.
    if let Some(path) = &addr_file {
        write_atomically(path, format!("{local_addr}\n").as_bytes())
            .with_context(|| format!("cannot write the address file {}", path.display()))?;
    }

    let inference = pipeline.as_ref().map(|(inference, _)| inference.clone());
    let links = ingestion.clone();
    let shutdown = async move {
        stop.await;
        if let Some(ingestion) = &ingestion {
            ingestion.begin_shutdown();
        }
        if let Some(inference) = &inference {
            inference.stop_taking_jobs();
        }
        // Health watchers see NOT_SERVING first; then the listener closes and open calls drain.
        health.set_service_status("", ServingStatus::NotServing).await;
        for name in service_names {
            health.set_service_status(name, ServingStatus::NotServing).await;
        }
    };
    smartfarm_gateway::server::serve(listener, tls, app, shutdown).await;
    // The links are closed; what their agents sent up last is recorded before the process exits (the agents do
    // not send an alert twice).
    if let Some(links) = links
        && !links.wait_for_alert_recorders(ALERT_RECORDERS_DRAIN).await
    {
        tracing::warn!(?ALERT_RECORDERS_DRAIN, "alerts from edge links were still being recorded; some were not");
    }
    // The pipeline took no new jobs while the links drained, and went on with what they committed; now it hands
    // back the jobs it holds, so that another replica does them now rather than after NATS's ten minutes (the
    // answers must get out before the runtime stops), and scores this process's batches still waiting.
    if let Some((inference, pipeline)) = pipeline {
        inference.begin_shutdown();
        if tokio::time::timeout(PIPELINE_DRAIN, pipeline).await.is_err() {
            tracing::warn!(
                ?PIPELINE_DRAIN,
                "the inference pipeline did not finish in time: batches of this process left unscored, or a job \
                 left to NATS's ten minutes"
            );
        }
    }
    tracing::info!("smartfarm stopped");
    Ok(())
}

/// How long a stopping process waits for its links' alert recorders (long enough for their tries again after a
/// database error).
const ALERT_RECORDERS_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a stopping process waits for its inference pipeline to hand back its jobs and score its own batches
/// still waiting.
const PIPELINE_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// What shutdown tells that the process is stopping: the ingestion service, which closes its edge links, and the
/// inference service with its pipeline, which takes no new jobs meanwhile and, once the links are closed, hands
/// back its jobs.
struct Running {
    ingestion: Option<smartfarm_ingestion::IngestionApi>,
    pipeline: Option<(smartfarm_inference::InferenceApi, tokio::task::JoinHandle<()>)>,
}

/// The services of the roles this process runs (their background tasks started), and what shutdown tells it is
/// stopping. The inference role stores and activates the built-in models first where none are active.
async fn services_for(
    config: &ServerConfig,
    database: &Database,
    blobs: &Arc<dyn BlobStore>,
    signer: smartfarm_image::UrlSigner,
) -> anyhow::Result<(Services, Running)> {
    let registry = database.registry();
    let bus = match config.bus_url.as_str() {
        "" => Bus::in_process(),
        url => Bus::connect(url).await?,
    };
    let mut services = Services::default();
    let mut running = Running { ingestion: None, pipeline: None };
    for role in config.target.roles() {
        services = match role {
            Role::Device => services.with_service(smartfarm_device::DeviceApi::new(registry.clone()).into_server()),
            Role::Ingestion => {
                let ingestion = smartfarm_ingestion::IngestionApi::new(
                    registry.clone(),
                    database.telemetry(),
                    config.telemetry.clone(),
                )
                .with_bus(bus.clone())
                .with_scoring_here(
                    config.target.roles().contains(&Role::Inference) && config.inference.score_new_readings,
                )
                .with_batches_listed(config.inference.score_new_readings)
                .with_models(database.models())
                .with_alerts(database.alerts())
                .with_commands(database.commands());
                tokio::spawn(ingestion.clone().run_retention());
                running.ingestion = Some(ingestion.clone());
                services.with_service(ingestion.clone().ingestion_server()).with_service(ingestion.telemetry_server())
            }
            Role::Image => {
                let images = smartfarm_image::ImageApi::new(
                    registry.clone(),
                    database.images(),
                    blobs.clone(),
                    bus.clone(),
                    config.images.clone(),
                    signer.clone(),
                );
                tokio::spawn(images.clone().run_sweeper());
                tokio::spawn(images.clone().run_thumbnails());
                services
                    .with_http_routes(smartfarm_image::urls::content_routes(images.clone()))
                    .with_service(images.into_server())
            }
            Role::Inference => {
                let inference = smartfarm_inference::InferenceApi::new(
                    smartfarm_inference::Stores {
                        registry: registry.clone(),
                        images: database.images(),
                        telemetry: database.telemetry(),
                        models: database.models(),
                        blobs: blobs.clone(),
                    },
                    bus.clone(),
                    config.inference.clone(),
                );
                inference.ensure_builtin_models().await?;
                let pipeline = tokio::spawn(inference.clone().run_pipeline());
                running.pipeline = Some((inference.clone(), pipeline));
                services.with_service(inference.into_server())
            }
            Role::Alert => {
                let alerts = smartfarm_alert::AlertApi::new(
                    registry.clone(),
                    database.alerts(),
                    bus.clone(),
                    config.alerts.clone(),
                )
                .with_confirmations(database.telemetry(), database.images());
                tokio::spawn(alerts.clone().run_verdicts());
                tokio::spawn(alerts.clone().run_webhooks());
                tokio::spawn(alerts.clone().run_retention());
                services.with_service(alerts.into_server())
            }
            Role::Command => {
                let commands = smartfarm_command::CommandApi::new(
                    registry.clone(),
                    database.commands(),
                    bus.clone(),
                    config.alerts.clone(),
                );
                tokio::spawn(commands.clone().run_expiry());
                tokio::spawn(commands.clone().run_retention());
                services.with_service(commands.into_server())
            }
        };
    }
    Ok((services, running))
}

/// On a fresh installation (no API key at all), creates an admin key and writes it to a 0600 file in the data dir,
/// so the operator can make the first calls; says where in the log. Replicas that start together on one empty
/// PostgreSQL may each make one; each is a valid admin key, in its own data dir.
async fn bootstrap_admin_key(registry: &dyn RegistryStore, data_dir: &Path) -> anyhow::Result<()> {
    if registry.count_api_keys().await? > 0 {
        return Ok(());
    }
    // The file first, then the key: a key whose secret never reached the disk would lock the operator out, since
    // no later start makes another one.
    let (key, secret) = smartfarm_device::new_api_key("bootstrap admin key", None)?;
    let path = data_dir.join(BOOTSTRAP_KEY_FILE);
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    write_private(&path, format!("{secret}\n").as_bytes())
        .with_context(|| format!("cannot write the first admin key to {}", path.display()))?;
    if let Err(error) = registry.create_api_key(key.clone()).await {
        let _ = std::fs::remove_file(&path);
        return Err(error.into());
    }
    tracing::warn!(api_key_id = %key.id, path = %path.display(), "fresh installation: wrote the first admin api key; keep it secret");
    Ok(())
}

/// The key that signs image URLs on local storage: made once, kept in the data dir (0600) so URLs survive
/// restarts.
fn url_signing_key(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join(URL_SIGNING_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => hex::decode(text.trim())
            .with_context(|| format!("{} is not a hex key; delete it to make a new one", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key)
                .map_err(|error| anyhow::anyhow!("no randomness for the url signing key: {error}"))?;
            std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
            write_private(&path, format!("{}\n", hex::encode(key)).as_bytes())
                .with_context(|| format!("cannot write the url signing key to {}", path.display()))?;
            Ok(key.to_vec())
        }
        Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path)?;
        // `mode` applies only when the file is created; an existing file is narrowed too.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path)?;
        file.write_all(contents)?;
        file.sync_all()
    }
}

/// Writes a file so that readers never see it half-written.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, contents)?;
    std::fs::rename(&temp, path)
}
