//! Conversions between the registry's stored records and the contract's messages.

use smartfarm_core::time::to_timestamp;
use smartfarm_core::{Error, Result};
use smartfarm_proto::device::v1 as pb;
use smartfarm_store::model::{ApiKey, Device, DeviceKind, DeviceState, Farm};

pub fn farm(farm: &Farm) -> pb::Farm {
    pb::Farm { id: farm.id.to_string(), name: farm.name.clone(), create_time: Some(to_timestamp(farm.create_time)) }
}

pub fn device(device: &Device) -> pb::Device {
    pb::Device {
        id: device.id.to_string(),
        farm_id: device.farm_id.to_string(),
        name: device.name.clone(),
        kind: kind_to_proto(device.kind) as i32,
        state: state_to_proto(device.state) as i32,
        last_seen_time: device.last_seen_time.map(to_timestamp),
        create_time: Some(to_timestamp(device.create_time)),
        update_time: Some(to_timestamp(device.update_time)),
        labels: device.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

pub fn api_key(key: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id.to_string(),
        name: key.name.clone(),
        farm_id: key.farm_id.map(|id| id.to_string()).unwrap_or_default(),
        create_time: Some(to_timestamp(key.create_time)),
        revoke_time: key.revoke_time.map(to_timestamp),
    }
}

pub fn kind_to_proto(kind: DeviceKind) -> pb::DeviceKind {
    match kind {
        DeviceKind::Sensor => pb::DeviceKind::Sensor,
        DeviceKind::Camera => pb::DeviceKind::Camera,
        DeviceKind::Actuator => pb::DeviceKind::Actuator,
        DeviceKind::Gateway => pb::DeviceKind::Gateway,
    }
}

fn state_to_proto(state: DeviceState) -> pb::DeviceState {
    match state {
        DeviceState::Provisioned => pb::DeviceState::Provisioned,
        DeviceState::Active => pb::DeviceState::Active,
        DeviceState::Decommissioned => pb::DeviceState::Decommissioned,
    }
}

/// A `kind` field: `None` for unspecified (the caller decides whether that is allowed), an error for numbers the
/// contract does not define.
pub fn kind_from_proto(value: i32) -> Result<Option<DeviceKind>> {
    match pb::DeviceKind::try_from(value) {
        Ok(pb::DeviceKind::Unspecified) => Ok(None),
        Ok(pb::DeviceKind::Sensor) => Ok(Some(DeviceKind::Sensor)),
        Ok(pb::DeviceKind::Camera) => Ok(Some(DeviceKind::Camera)),
        Ok(pb::DeviceKind::Actuator) => Ok(Some(DeviceKind::Actuator)),
        Ok(pb::DeviceKind::Gateway) => Ok(Some(DeviceKind::Gateway)),
        Err(_) => Err(Error::invalid("kind", format!("{value} is not a known device kind"))),
    }
}

/// A `state` filter: `None` for unspecified, an error for unknown numbers.
pub fn state_from_proto(value: i32) -> Result<Option<DeviceState>> {
    match pb::DeviceState::try_from(value) {
        Ok(pb::DeviceState::Unspecified) => Ok(None),
        Ok(pb::DeviceState::Provisioned) => Ok(Some(DeviceState::Provisioned)),
        Ok(pb::DeviceState::Active) => Ok(Some(DeviceState::Active)),
        Ok(pb::DeviceState::Decommissioned) => Ok(Some(DeviceState::Decommissioned)),
        Err(_) => Err(Error::invalid("state", format!("{value} is not a known device state"))),
    }
}
