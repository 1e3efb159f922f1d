//! Command storage: live commands to devices with their TTL and status history. Status only moves forward (queued →
//! sent → delivered → acked, failed or expired, the last three final), so receipts that arrive late or twice change
//! nothing. Every backend implements [`CommandStore`] and passes the same suite (`tests/command_suite.rs`).

use std::time::SystemTime;

use uuid::Uuid;

use smartfarm_core::Result;

/// Where a command is on its way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandStatus {
    Queued = 1,
    Sent = 2,
    Delivered = 3,
    Acked = 4,
    Failed = 5,
    Expired = 6,
}

impl CommandStatus {
    pub fn from_number(value: i64) -> Option<CommandStatus> {
        match value {
            1 => Some(CommandStatus::Queued),
            2 => Some(CommandStatus::Sent),
            3 => Some(CommandStatus::Delivered),
            4 => Some(CommandStatus::Acked),
            5 => Some(CommandStatus::Failed),
            6 => Some(CommandStatus::Expired),
            _ => None,
        }
    }

    /// Acked, failed and expired are final.
    pub fn is_final(self) -> bool {
        matches!(self, CommandStatus::Acked | CommandStatus::Failed | CommandStatus::Expired)
    }

    fn rank(self) -> u8 {
        match self {
            CommandStatus::Queued => 1,
            CommandStatus::Sent => 2,
            CommandStatus::Delivered => 3,
            CommandStatus::Acked | CommandStatus::Failed | CommandStatus::Expired => 4,
        }
    }

    /// Whether a command in this status may move to `next`: forward only, never out of a final status.
    pub fn may_become(self, next: CommandStatus) -> bool {
        !self.is_final() && next.rank() > self.rank()
    }
}

/// One status change.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandReceipt {
    pub status: CommandStatus,
    pub detail: String,
    pub change_time: SystemTime,
}

/// A stored command.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCommand {
    pub id: Uuid,
    pub farm_id: Uuid,
    pub device_id: Uuid,
    pub name: String,
    /// The parameters as a JSON object (storage does not interpret them).
    pub parameters: String,
    /// The client's idempotency key, unique per device when present.
    pub request_id: Option<String>,
    pub create_time: SystemTime,
    pub expire_time: SystemTime,
    pub status: CommandStatus,
    pub status_detail: String,
    /// Every status so far, oldest first (the first is `Queued` at `create_time`).
    pub history: Vec<CommandReceipt>,
}

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
    /// A farm's commands that still have to reach its agent: queued or sent, not expired at `now`, oldest first.
    async fn pending_commands(&self, farm_id: Uuid, now: SystemTime) -> Result<Vec<StoredCommand>>;
    /// Marks every command that is not final and whose expire time is at or before `now` as expired (with a
    /// receipt); returns them after the change.
    async fn expire_commands(&self, now: SystemTime) -> Result<Vec<StoredCommand>>;
}
