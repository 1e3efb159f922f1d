//! The records the storage layer reads and writes. They mirror the contracts but belong to storage: services
//! convert between these and the protobuf messages, so storage never depends on tonic or prost.

use std::collections::BTreeMap;
use std::time::SystemTime;

use uuid::Uuid;

use smartfarm_core::Error;

/// A farm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Farm {
    pub id: Uuid,
    pub name: String,
    pub create_time: SystemTime,
    /// Increases with every change to the farm's devices; edge agents compare it with their cache.
    pub registry_version: u64,
}

/// What a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Sensor,
    Camera,
    Actuator,
    Gateway,
}

impl DeviceKind {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Sensor => "sensor",
            DeviceKind::Camera => "camera",
            DeviceKind::Actuator => "actuator",
            DeviceKind::Gateway => "gateway",
        }
    }

    /// The inverse of [`DeviceKind::as_str`]; anything else means the database holds what no migration wrote.
    pub fn parse_stored(value: &str) -> Result<DeviceKind, Error> {
        match value {
            "sensor" => Ok(DeviceKind::Sensor),
            "camera" => Ok(DeviceKind::Camera),
            "actuator" => Ok(DeviceKind::Actuator),
            "gateway" => Ok(DeviceKind::Gateway),
            other => Err(corrupt("devices.kind", other)),
        }
    }
}

/// Where a device is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceState {
    /// Registered, never heard from.
    Provisioned,
    /// Heard from at least once.
    Active,
    /// Out of service; no credential.
    Decommissioned,
}

impl DeviceState {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Provisioned => "provisioned",
            DeviceState::Active => "active",
            DeviceState::Decommissioned => "decommissioned",
        }
    }

    /// The inverse of [`DeviceState::as_str`].
    pub fn parse_stored(value: &str) -> Result<DeviceState, Error> {
        match value {
            "provisioned" => Ok(DeviceState::Provisioned),
            "active" => Ok(DeviceState::Active),
            "decommissioned" => Ok(DeviceState::Decommissioned),
            other => Err(corrupt("devices.state", other)),
        }
    }
}

fn corrupt(column: &str, value: &str) -> Error {
    Error::Internal { context: format!("{column} holds unknown value {value:?}"), source: None }
}

/// A device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub id: Uuid,
    pub farm_id: Uuid,
    pub name: String,
    pub kind: DeviceKind,
    pub state: DeviceState,
    pub labels: BTreeMap<String, String>,
    pub last_seen_time: Option<SystemTime>,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
    /// Hex SHA-256 of the device's credential; `None` once decommissioned.
    pub credential_sha256: Option<String>,
}

/// What registering a device stores.
#[derive(Clone, Debug)]
pub struct NewDevice {
    pub id: Uuid,
    pub farm_id: Uuid,
    pub name: String,
    pub kind: DeviceKind,
    pub labels: BTreeMap<String, String>,
    pub credential_sha256: String,
    pub create_time: SystemTime,
}

/// A change to a device; `None` fields stay as they are.
#[derive(Clone, Debug, Default)]
pub struct DeviceUpdate {
    pub name: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
}

/// Which devices a listing returns.
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    pub farm_id: Option<Uuid>,
    pub kind: Option<DeviceKind>,
    pub state: Option<DeviceState>,
}

/// An API key's stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    /// `None` for admin keys.
    pub farm_id: Option<Uuid>,
    pub secret_sha256: String,
    pub create_time: SystemTime,
    pub revoke_time: Option<SystemTime>,
}

/// Where a listing starts and how many items it returns; listings return up to `limit` items with ids above
/// `after`, in id order (ids are UUIDv7, so that is creation order).
#[derive(Clone, Copy, Debug)]
pub struct KeysetPage {
    pub after: Option<Uuid>,
    pub limit: usize,
}
