//! smartfarm-command owns live commands to devices: `SendCommand` validates and stores a command with its TTL and
//! announces it on the bus, so whichever process holds the farm's edge link sends it down (the link in
//! smartfarm-ingestion does that and records the agent's receipts); `GetCommand`, `ListCommands` and `WatchCommand`
//! read it back; the expiry task marks commands whose TTL passed before they reached the farm as expired (they never
//! ran; the agent reports itself the expiry of a command its device did not answer in time), and the retention task
//! deletes finished commands past their retention. It holds no SQL.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use smartfarm_bus::{Bus, Event};
use smartfarm_core::commands::check_name;
use smartfarm_core::config::AlertsConfig;
use smartfarm_core::paging::{Page, time_id_key};
use smartfarm_core::principal::STREAM_CREDENTIAL_RECHECK;
use smartfarm_core::{Error, Principal, Result, time, validate};
use smartfarm_proto::command::v1 as pb;
use smartfarm_proto::command::v1::command_service_server::{CommandService, CommandServiceServer};
use smartfarm_store::commands::{CommandFilter, CommandInserted, CommandReceipt, CommandStatus, StoredCommand};
use smartfarm_store::model::DeviceState;
use smartfarm_store::{CommandStore, RegistryStore};

/// The shortest TTL: a command must have a chance to reach the farm.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest TTL: a command older than a week is more likely harm than help.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The largest parameters, as JSON.
pub const MAX_PARAMETERS_BYTES: usize = 64 * 1024;
/// How long after its expire time a command sent to the farm's agent, which the agent never reported on, is expired
/// by the cloud. The agent reports what became of every command it got (delivered, acknowledged, or expired when
/// the device did not answer in time or the command came too late), and may report it after the expire time: it
/// ran just before, or the link dropped before the receipt went up. An agent that stays away that long is not
/// coming back soon.
const UNCONFIRMED_EXPIRY_GRACE: Duration = Duration::from_secs(3600);
/// How often finished commands past their retention are deleted.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// Most commands deleted in one transaction.
const RETENTION_CHUNK: usize = 10_000;
/// How often a watch reads the command again even without news on the bus.
const WATCH_POLL: Duration = Duration::from_secs(1);

/// The `CommandService` implementation, and the command role's expiry task.
#[derive(Clone)]
pub struct CommandApi {
    registry: Arc<dyn RegistryStore>,
    commands: Arc<dyn CommandStore>,
    bus: Bus,
    settings: Arc<AlertsConfig>,
}

impl CommandApi {
    pub fn new(
        registry: Arc<dyn RegistryStore>,
        commands: Arc<dyn CommandStore>,
        bus: Bus,
        settings: AlertsConfig,
    ) -> CommandApi {
        CommandApi { registry, commands, bus, settings: Arc::new(settings) }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> CommandServiceServer<CommandApi> {
        CommandServiceServer::new(self)
    }

    /// Marks commands whose TTL passed as expired, every `command_expiry_interval`, forever; run it in a task of its
    /// own.
    pub async fn run_expiry(self) {
        let mut ticks = tokio::time::interval(self.settings.command_expiry_interval);
        loop {
            ticks.tick().await;
            let now = time::now();
            match self.commands.expire_commands(now, now - UNCONFIRMED_EXPIRY_GRACE).await {
                Ok(expired) => {
                    for command in expired {
                        metrics::counter!("smartfarm_commands_total", "status" => "expired").increment(1);
                        tracing::info!(command_id = %command.id, device_id = %command.device_id, "command expired");
                        self.bus.publish(Event::CommandChanged { farm_id: command.farm_id, command_id: command.id });
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot expire commands; trying again"),
            }
        }
    }

    /// Deletes finished commands past `command_retention` every hour, forever; run it in a task of its own (a first
    /// run over a long history must not hold up expiry).
    pub async fn run_retention(self) {
        let mut ticks = tokio::time::interval(RETENTION_INTERVAL);
        loop {
            ticks.tick().await;
            if let Err(error) = self.apply_retention(time::now()).await {
                tracing::warn!(%error, "cannot delete old commands; trying again in an hour");
            }
        }
    }

    /// Deletes the finished commands sent more than `command_retention` before `now` (none when it is zero), a
    /// chunk at a time so no transaction grows large; returns how many.
    pub async fn apply_retention(&self, now: std::time::SystemTime) -> Result<u64> {
        let retention = self.settings.command_retention;
        if retention.is_zero() {
            return Ok(0);
        }
        let created_before = now.checked_sub(retention).unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        let mut deleted = 0;
        loop {
            let chunk = self.commands.delete_finished_commands(created_before, RETENTION_CHUNK).await?;
            deleted += chunk;
            metrics::counter!("smartfarm_commands_deleted_total").increment(chunk);
            if chunk < RETENTION_CHUNK as u64 {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, ?retention, "finished commands past their retention deleted");
        }
        Ok(deleted)
    }

    async fn authorized_command(&self, principal: &Principal, id: &str) -> Result<StoredCommand> {
        let command = self.commands.get_command(validate::id("command_id", id)?).await?;
        principal.authorize_farm(command.farm_id)?;
        Ok(command)
    }
}

/// The caller of a command RPC: people and integrations (API keys), not gateways.
fn api_caller<T>(request: &Request<T>) -> Result<Principal> {
    let principal = Principal::of(request)?;
    principal.require_api_key()?;
    Ok(principal)
}

fn ttl(value: Option<&smartfarm_proto::pbjson_types::Duration>) -> Result<Duration> {
    let value = value.ok_or_else(|| Error::invalid("ttl", "is required (1 s to 7 days)"))?;
    if value.seconds < 0 || value.nanos < 0 {
        return Err(Error::invalid("ttl", "must not be negative"));
    }
    let ttl = Duration::new(value.seconds as u64, value.nanos.clamp(0, 999_999_999) as u32);
    if ttl < MIN_TTL {
        return Err(Error::invalid("ttl", "must be at least 1 second"));
    }
    if ttl > MAX_TTL {
        return Err(Error::invalid("ttl", "must be at most 7 days"));
    }
    Ok(ttl)
}

#[tonic::async_trait]
impl CommandService for CommandApi {
    type WatchCommandStream = ReceiverStream<Result<pb::WatchCommandResponse, Status>>;

    async fn send_command(
        &self,
        request: Request<pb::SendCommandRequest>,
    ) -> Result<Response<pb::SendCommandResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let device_id = validate::id("device_id", &message.device_id)?;
        let name = check_name("name", &message.name)?;
        let ttl = ttl(message.ttl.as_ref())?;
        let parameters = match &message.parameters {
            Some(parameters) => serde_json::to_string(parameters)
                .map_err(|error| Error::invalid("parameters", format!("cannot be written as JSON: {error}")))?,
            None => "{}".to_string(),
        };
        if parameters.len() > MAX_PARAMETERS_BYTES {
            return Err(Error::invalid("parameters", "must be at most 64 KiB as JSON").into());
        }
        let request_id = match message.request_id.as_str() {
            "" => None,
            id if id.len() > 128 => return Err(Error::invalid("request_id", "must be at most 128 characters").into()),
            id => Some(id.to_string()),
        };
        let device = self.registry.get_device(device_id).await?;
        principal.authorize_farm(device.farm_id)?;
        if device.state == DeviceState::Decommissioned {
            return Err(Error::FailedPrecondition(format!("device {device_id} is decommissioned")).into());
        }
        let now = time::now();
        let command = StoredCommand {
            id: Uuid::now_v7(),
            farm_id: device.farm_id,
            device_id,
            name,
            parameters,
            request_id,
            create_time: now,
            expire_time: now + ttl,
            status: CommandStatus::Queued,
            status_detail: String::new(),
            history: vec![CommandReceipt { status: CommandStatus::Queued, detail: String::new(), change_time: now }],
        };
        let command = match self.commands.insert_command(&command).await? {
            CommandInserted::Created(command) => {
                metrics::counter!("smartfarm_commands_total", "status" => "queued").increment(1);
                tracing::info!(command_id = %command.id, %device_id, name = %command.name, by = %principal.describe(), "command queued");
                self.bus.publish(Event::CommandQueued { farm_id: command.farm_id, command_id: command.id });
                command
            }
            CommandInserted::Existing(command) => command,
        };
        Ok(Response::new(pb::SendCommandResponse { command: Some(command.to_proto()) }))
    }

    async fn get_command(
        &self,
        request: Request<pb::GetCommandRequest>,
    ) -> Result<Response<pb::GetCommandResponse>, Status> {
        let principal = api_caller(&request)?;
        let command = self.authorized_command(&principal, &request.get_ref().command_id).await?;
        Ok(Response::new(pb::GetCommandResponse { command: Some(command.to_proto()) }))
    }

    async fn list_commands(
        &self,
        request: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        let principal = api_caller(&request)?;
        let message = request.get_ref();
        let requested_farm = validate::optional_id("farm_id", &message.farm_id)?;
        let farm_id = match (principal.farm_scope(), requested_farm) {
            (None, requested) => requested,
            (Some(own), None) => Some(own),
            (Some(_), Some(requested)) => {
                principal.authorize_farm(requested)?;
                Some(requested)
            }
        };
        let device_id = validate::optional_id("device_id", &message.device_id)?;
        let status = CommandStatus::from_proto("status", message.status)?;
        let filter = CommandFilter { farm_id, device_id, status };
        let fingerprint = format!("commands;{filter:?}");
        let page = Page::from_request(message.page_size, &message.page_token, &fingerprint)?;
        let after = page.after_time_id()?;
        let commands = self.commands.list_commands(&filter, after, page.fetch_limit()).await?;
        let (commands, next_page_token) =
            page.finish(commands, |command| time_id_key(command.create_time, command.id), &fingerprint);
        Ok(Response::new(pb::ListCommandsResponse {
            commands: commands.iter().map(StoredCommand::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn watch_command(
        &self,
        request: Request<pb::WatchCommandRequest>,
    ) -> Result<Response<Self::WatchCommandStream>, Status> {
        let principal = api_caller(&request)?;
        // Listening starts before the first read, so no change falls between the two.
        let changes = self.bus.subscribe();
        let command = self.authorized_command(&principal, &request.get_ref().command_id).await?;
        let (sender, receiver) = mpsc::channel(16);
        // A watch may last days (a command's TTL, and the hour after it): it ends once its key is revoked.
        let opened_with = (self.registry.clone(), principal.api_key_id().expect("api_caller takes api keys only"));
        tokio::spawn(watch(self.commands.clone(), command, changes, opened_with, sender));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Streams a command's current status, then each change, until a final one, or until the API key it was opened
/// with (`opened_with`) is revoked.
async fn watch(
    commands: Arc<dyn CommandStore>,
    mut command: StoredCommand,
    mut changes: broadcast::Receiver<Event>,
    (registry, api_key_id): (Arc<dyn RegistryStore>, Uuid),
    sender: mpsc::Sender<Result<pb::WatchCommandResponse, Status>>,
) {
    let id = command.id;
    let mut sent = command.history.len();
    let current = command.history.last().cloned().unwrap_or(CommandReceipt {
        status: command.status,
        detail: command.status_detail.clone(),
        change_time: command.create_time,
    });
    if sender.send(Ok(pb::WatchCommandResponse { receipt: Some(current.to_proto(id)) })).await.is_err() {
        return;
    }
    let mut poll = tokio::time::interval(WATCH_POLL);
    // The call that opened the watch was checked just now.
    let mut recheck =
        tokio::time::interval_at(tokio::time::Instant::now() + STREAM_CREDENTIAL_RECHECK, STREAM_CREDENTIAL_RECHECK);
    while !command.status.is_final() {
        tokio::select! {
            _ = sender.closed() => return,
            _ = recheck.tick() => {
                if let Err(error) = registry.api_key_in_force(api_key_id).await {
                    let _ = sender.send(Err(Status::from(error))).await;
                    return;
                }
                continue;
            }
            change = changes.recv() => match change {
                Ok(Event::CommandChanged { command_id, .. }) if command_id == id => {}
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = poll.tick() => {}
        }
        command = match commands.get_command(id).await {
            Ok(command) => command,
            Err(error) => {
                let _ = sender.send(Err(Status::from(error))).await;
                return;
            }
        };
        for receipt in command.history.iter().skip(sent) {
            if sender.send(Ok(pb::WatchCommandResponse { receipt: Some(receipt.to_proto(id)) })).await.is_err() {
                return;
            }
        }
        sent = sent.max(command.history.len());
    }
}
