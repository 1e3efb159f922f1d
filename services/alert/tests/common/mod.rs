//! What the alert role's tests share.

use std::time::SystemTime;

use uuid::Uuid;

use smartfarm_core::rules::{Alert, AlertState, Origin, Severity, alert_id};

/// A critical temperature alert of a new rule on a new device, opened at `open_time`.
pub fn alert(farm_id: Uuid, open_time: SystemTime) -> Alert {
    let (rule_id, device) = (Uuid::now_v7(), Uuid::now_v7());
    Alert {
        id: alert_id(rule_id, Some(device), "temperature", open_time),
        farm_id,
        rule_id,
        device_id: Some(device),
        metric: "temperature".into(),
        severity: Severity::Critical,
        state: AlertState::Open,
        message: "temperature 41 above 40".into(),
        value: Some(41.0),
        open_time,
        last_time: open_time,
        acknowledge_time: None,
        resolve_time: None,
        count: 1,
        origin: Origin::Cloud,
        evidence_image_id: None,
        evidence_window: None,
        resolved_by_hand: false,
    }
}
