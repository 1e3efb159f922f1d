//! Commands to devices as the cloud and the edge agent see them: the status a command moves through (forward only:
//! queued → sent → delivered → acked, failed or expired, the last three final), its receipts, and their contract
//! form. Storage keeps them ([`StoredCommand`]); the edge link carries them down as `smartfarm.command.v1.Command` and
//! the receipts up.

use std::time::SystemTime;

use uuid::Uuid;

use smartfarm_proto::command::v1 as pb;

use crate::error::{Error, Result};
use crate::time::to_timestamp;

/// The longest command name.
pub const MAX_NAME_CHARS: usize = 64;

/// Checks a command name: 1 to 64 of `[a-z0-9_]`.
pub fn check_name(field: &str, name: &str) -> Result<String> {
    if !name.is_empty()
        && name.len() <= MAX_NAME_CHARS
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(name.to_string())
    } else if name.is_empty() {
        Err(Error::invalid(field, "is required: 1 to 64 of a-z, 0-9, '_' (for example open_valve)"))
    } else {
        Err(Error::invalid(
            field,
            format!("{} is not a command name (1 to 64 of a-z, 0-9, '_')", crate::validate::excerpt(name)),
        ))
    }
}

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

impl CommandStatus {
    pub fn to_proto(self) -> pb::CommandStatus {
        match self {
            CommandStatus::Queued => pb::CommandStatus::Queued,
            CommandStatus::Sent => pb::CommandStatus::Sent,
            CommandStatus::Delivered => pb::CommandStatus::Delivered,
            CommandStatus::Acked => pb::CommandStatus::Acked,
            CommandStatus::Failed => pb::CommandStatus::Failed,
            CommandStatus::Expired => pb::CommandStatus::Expired,
        }
    }

    /// From the contract's enum; unspecified is `None`.
    pub fn from_proto(field: &str, value: i32) -> Result<Option<CommandStatus>> {
        match pb::CommandStatus::try_from(value) {
            Ok(pb::CommandStatus::Unspecified) => Ok(None),
            Ok(status) => Ok(CommandStatus::from_number(status as i64)),
            Err(_) => Err(Error::invalid(field, format!("{value} is not a command status"))),
        }
    }
}

impl CommandReceipt {
    pub fn to_proto(&self, command_id: Uuid) -> pb::CommandReceipt {
        pb::CommandReceipt {
            command_id: command_id.to_string(),
            status: self.status.to_proto() as i32,
            detail: self.detail.clone(),
            change_time: Some(to_timestamp(self.change_time)),
        }
    }
}

impl StoredCommand {
    /// The command as the contract's message (with its history).
    pub fn to_proto(&self) -> pb::Command {
        pb::Command {
            id: self.id.to_string(),
            farm_id: self.farm_id.to_string(),
            device_id: self.device_id.to_string(),
            name: self.name.clone(),
            parameters: serde_json::from_str(&self.parameters).ok(),
            create_time: Some(to_timestamp(self.create_time)),
            expire_time: Some(to_timestamp(self.expire_time)),
            status: self.status.to_proto() as i32,
            status_detail: self.status_detail.clone(),
            history: self.history.iter().map(|receipt| receipt.to_proto(self.id)).collect(),
        }
    }

    /// Whether the TTL has passed at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        self.expire_time <= now
    }
}
