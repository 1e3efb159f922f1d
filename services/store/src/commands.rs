//! Command storage: live commands to devices with their TTL and status history. Status only moves forward (queued →
//! sent → delivered → acked, failed or expired, the last three final), so receipts that arrive late or twice change
//! nothing. Every backend implements [`CommandStore`] and passes the same suite (`tests/command_suite.rs`).

use std::time::SystemTime;

use uuid::Uuid;

use smartfarm_core::Result;

pub use smartfarm_core::commands::{CommandReceipt, CommandStatus, StoredCommand};

/// What [`CommandStore::insert_command`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum CommandInserted {
    Created(StoredCommand),
    /// A command with the same device and request id exists: it is returned instead.
    Existing(StoredCommand),
}

/// Which commands `list_commands` returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommandFilter {
    pub farm_id: Option<Uuid>,
    pub device_id: Option<Uuid>,
    pub status: Option<CommandStatus>,
}

#[async_trait::async_trait]
pub trait CommandStore: Send + Sync + 'static {
    /// Stores a new command (status `Queued`, its history the one queued receipt at `create_time`), unless the same
    /// device already has a command with the same request id.
    async fn insert_command(&self, command: &StoredCommand) -> Result<CommandInserted>;
    /// One command with its history, or `NotFound`.
    async fn get_command(&self, id: Uuid) -> Result<StoredCommand>;
    /// Commands matching `filter`, newest first by (create time, id), strictly after the `after` key, at most
    /// `limit`, each with its history.
    async fn list_commands(
        &self,
        filter: &CommandFilter,
        after: Option<(SystemTime, Uuid)>,
        limit: usize,
    ) -> Result<Vec<StoredCommand>>;
    /// Moves a command to `status` with a receipt, when [`CommandStatus::may_become`] allows it; returns the command
    /// after the change, or `None` when the change was refused as stale (the command is unchanged). `NotFound` if
    /// absent.
    async fn update_command_status(
        &self,
        id: Uuid,
        status: CommandStatus,
        detail: &str,
        at: SystemTime,
    ) -> Result<Option<StoredCommand>>;
    /// A farm's commands that are not final, oldest first: queued ones not expired at `now`, and every sent or
    /// delivered one, past its expire time too (the agent answers for those: from its command book when it had
    /// the command, as expired when it never did). What a (re)connecting agent is sent.
    async fn pending_commands(&self, farm_id: Uuid, now: SystemTime) -> Result<Vec<StoredCommand>>;
    /// Marks as expired (with a receipt) every queued command whose expire time is at or before `now` (no link took
    /// it, so it never reached the farm), and every sent or delivered one whose expire time is at or before
    /// `unconfirmed_before`: the agent may have it, may have run it just before its expire time, and reports what
    /// became of it itself (its receipts can come after the expire time, or after a reconnect), so the cloud
    /// expires it only when the agent has not said for a long while. Returns them after the change, oldest first.
    async fn expire_commands(&self, now: SystemTime, unconfirmed_before: SystemTime) -> Result<Vec<StoredCommand>>;
    /// Deletes finished commands (acknowledged, failed or expired) created before `created_before`, with their
    /// history, at most `limit` of them, oldest first; returns how many. Unfinished commands stay whatever their age.
    async fn delete_finished_commands(&self, created_before: SystemTime, limit: usize) -> Result<u64>;
}
