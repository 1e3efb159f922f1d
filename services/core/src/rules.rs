//! Alert rules and the alerts they raise, as both the cloud and the edge agent see them: the rule definition with its
//! validation, the evaluator that turns readings and model verdicts into alerts, and how two copies of one alert
//! merge. The same evaluator runs on the Pi (on every accepted reading, link or no link) and in the cloud (on every
//! committed batch, in sequence order), and an alert's id is derived from the rule, the device, the metric and the
//! measurement time at which the condition began, so the two copies of one event are one alert.
//!
//! Lifecycle: an alert opens when its condition holds (for `for_duration` on threshold rules); it resolves by itself
//! once the condition has stayed clear for the rule's cooldown (at once without one). A repeat of the condition within
//! that time is folded into the open alert: its count grows. People acknowledge and resolve alerts by hand in the
//! cloud; a merge never moves an alert back (open < acknowledged < resolved).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use smartfarm_proto::alert::v1 as pb;
use smartfarm_proto::pbjson_types;

use crate::error::{Error, Result};
use crate::time::{from_timestamp, from_unix_micros, to_timestamp, to_unix_micros};
use crate::validate;

/// The longest cooldown, hold or window a rule may name: longer ones are typos, and evaluators keep state that long.
pub const MAX_RULE_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most readings a rate-of-change window spans per series: beyond, the oldest leave it early (a window of an hour
/// at one reading a second is exact).
const MAX_RATE_WINDOW_READINGS: u64 = 4096;

/// How bad an alert is; ordered, so "at least warning" is a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    Info = 1,
    Warning = 2,
    Critical = 3,
}

impl Severity {
    /// From the contract's enum; `field` names it in the error.
    pub fn from_proto(field: &str, value: i32) -> Result<Severity> {
        match smartfarm_proto::common::v1::Severity::try_from(value) {
            Ok(smartfarm_proto::common::v1::Severity::Info) => Ok(Severity::Info),
            Ok(smartfarm_proto::common::v1::Severity::Warning) => Ok(Severity::Warning),
            Ok(smartfarm_proto::common::v1::Severity::Critical) => Ok(Severity::Critical),
            _ => Err(Error::invalid(field, "must be SEVERITY_INFO, SEVERITY_WARNING or SEVERITY_CRITICAL")),
        }
    }

    /// A filter's minimum severity: unspecified means every severity.
    pub fn minimum_from_proto(field: &str, value: i32) -> Result<Severity> {
        if value == 0 { Ok(Severity::Info) } else { Severity::from_proto(field, value) }
    }

    pub fn to_proto(self) -> i32 {
        self as i32
    }

    /// The contract's name, as JSON messages on the farm's alert topic carry it.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "SEVERITY_INFO",
            Severity::Warning => "SEVERITY_WARNING",
            Severity::Critical => "SEVERITY_CRITICAL",
        }
    }

    /// The inverse of `as i32`, for storage.
    pub fn from_number(value: i64) -> Option<Severity> {
        match value {
            1 => Some(Severity::Info),
            2 => Some(Severity::Warning),
            3 => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// What raises a rule's alerts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Condition {
    /// A value strictly above (or below) `limit` for at least `for_duration`.
    Threshold { above: bool, limit: f64, for_duration: Duration },
    /// Values moving by more than `max_change` (largest minus smallest) within `window`.
    RateOfChange { max_change: f64, window: Duration },
    /// No reading from a device for `silent_for`.
    DeviceSilent { silent_for: Duration },
    /// A plant-disease diagnosis (of one of `disease_labels`, or any unhealthy class when empty) at `min_confidence`
    /// or more; with `on_sensor_anomaly`, sensor anomaly events too.
    ModelVerdict { disease_labels: Vec<String>, min_confidence: f64, on_sensor_anomaly: bool },
}

/// A rule of a farm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: Uuid,
    pub farm_id: Uuid,
    pub name: String,
    pub severity: Severity,
    /// Only this device; `None`: every device of the farm.
    pub device_id: Option<Uuid>,
    /// Only this metric; `None`: every metric (threshold and rate rules need one).
    pub metric: Option<String>,
    pub cooldown: Duration,
    pub create_time: SystemTime,
    pub condition: Condition,
}

fn duration_from_proto(field: &str, value: Option<&pbjson_types::Duration>) -> Result<Duration> {
    let Some(value) = value else { return Ok(Duration::ZERO) };
    if value.seconds < 0 || value.nanos < 0 || value.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    let duration = Duration::new(value.seconds as u64, value.nanos as u32);
    if duration > MAX_RULE_DURATION {
        return Err(Error::invalid(field, "must be at most 30 days"));
    }
    Ok(duration)
}

/// A `Duration` as the contract's.
pub fn duration_to_proto(duration: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration { seconds: duration.as_secs() as i64, nanos: duration.subsec_nanos() as i32 }
}

fn finite(field: &str, value: f64) -> Result<f64> {
    if value.is_finite() { Ok(value) } else { Err(Error::invalid(field, "must be a finite number")) }
}

impl Rule {
    /// Checks a rule as a client sent it (`CreateRule`) and gives it `id` and `create_time`. Every error names the
    /// field as the contract spells it.
    pub fn from_request(rule: &pb::Rule, id: Uuid, create_time: SystemTime) -> Result<Rule> {
        let farm_id = validate::id("rule.farm_id", &rule.farm_id)?;
        let name = validate::name("rule.name", &rule.name)?;
        let severity = Severity::from_proto("rule.severity", rule.severity)?;
        let device_id = validate::optional_id("rule.device_id", &rule.device_id)?;
        let metric = match rule.metric.as_str() {
            "" => None,
            metric => Some(validate::metric_name("rule.metric", metric)?),
        };
        let cooldown = duration_from_proto("rule.cooldown", rule.cooldown.as_ref())?;
        use pb::rule::Condition as Wire;
        let condition = match &rule.condition {
            None => {
                return Err(Error::invalid(
                    "rule.condition",
                    "is required: one of threshold, rate_of_change, device_silent, model_verdict",
                ));
            }
            Some(Wire::Threshold(threshold)) => {
                let above = match pb::ThresholdDirection::try_from(threshold.direction) {
                    Ok(pb::ThresholdDirection::Above) => true,
                    Ok(pb::ThresholdDirection::Below) => false,
                    _ => {
                        return Err(Error::invalid(
                            "rule.threshold.direction",
                            "must be THRESHOLD_DIRECTION_ABOVE or THRESHOLD_DIRECTION_BELOW",
                        ));
                    }
                };
                Condition::Threshold {
                    above,
                    limit: finite("rule.threshold.limit", threshold.limit)?,
                    for_duration: duration_from_proto("rule.threshold.for_duration", threshold.for_duration.as_ref())?,
                }
            }
            Some(Wire::RateOfChange(rate)) => {
                let max_change = finite("rule.rate_of_change.max_change", rate.max_change)?;
                if max_change <= 0.0 {
                    return Err(Error::invalid("rule.rate_of_change.max_change", "must be above zero"));
                }
                let window = duration_from_proto("rule.rate_of_change.window", rate.window.as_ref())?;
                if window.is_zero() {
                    return Err(Error::invalid("rule.rate_of_change.window", "must be at least one second"));
                }
                Condition::RateOfChange { max_change, window }
            }
            Some(Wire::DeviceSilent(silent)) => {
                let silent_for = duration_from_proto("rule.device_silent.silent_for", silent.silent_for.as_ref())?;
                if silent_for < Duration::from_secs(1) {
                    return Err(Error::invalid("rule.device_silent.silent_for", "must be at least one second"));
                }
                Condition::DeviceSilent { silent_for }
            }
            Some(Wire::ModelVerdict(verdict)) => {
                let min_confidence = finite("rule.model_verdict.min_confidence", verdict.min_confidence)?;
                if !(0.0..=1.0).contains(&min_confidence) {
                    return Err(Error::invalid("rule.model_verdict.min_confidence", "must be between 0 and 1"));
                }
                for label in &verdict.disease_labels {
                    if label.is_empty() || label.len() > 200 {
                        return Err(Error::invalid(
                            "rule.model_verdict.disease_labels",
                            "each label must be 1 to 200 characters",
                        ));
                    }
                }
                Condition::ModelVerdict {
                    disease_labels: verdict.disease_labels.clone(),
                    min_confidence,
                    on_sensor_anomaly: verdict.on_sensor_anomaly,
                }
            }
        };
        if matches!(condition, Condition::Threshold { .. } | Condition::RateOfChange { .. }) && metric.is_none() {
            return Err(Error::invalid("rule.metric", "is required for threshold and rate-of-change rules"));
        }
        Ok(Rule { id, farm_id, name, severity, device_id, metric, cooldown, create_time, condition })
    }

    /// A new rule from a `CreateRule` request: [`Rule::from_request`], and what only new rules are held to (rules
    /// stored before these checks still load, and still reach the agents).
    pub fn from_create_request(rule: &pb::Rule, id: Uuid, create_time: SystemTime) -> Result<Rule> {
        let rule = Rule::from_request(rule, id, create_time)?;
        if matches!(rule.condition, Condition::DeviceSilent { .. }) && rule.metric.is_some() {
            return Err(Error::invalid(
                "rule.metric",
                "must be empty for device-silent rules: a device is silent when none of its metrics is heard",
            ));
        }
        Ok(rule)
    }

    /// The rule as the contract's message.
    pub fn to_proto(&self) -> pb::Rule {
        use pb::rule::Condition as Wire;
        let condition = match &self.condition {
            Condition::Threshold { above, limit, for_duration } => Wire::Threshold(pb::ThresholdCondition {
                direction: if *above { pb::ThresholdDirection::Above } else { pb::ThresholdDirection::Below } as i32,
                limit: *limit,
                for_duration: Some(duration_to_proto(*for_duration)),
            }),
            Condition::RateOfChange { max_change, window } => Wire::RateOfChange(pb::RateOfChangeCondition {
                max_change: *max_change,
                window: Some(duration_to_proto(*window)),
            }),
            Condition::DeviceSilent { silent_for } => {
                Wire::DeviceSilent(pb::DeviceSilentCondition { silent_for: Some(duration_to_proto(*silent_for)) })
            }
            Condition::ModelVerdict { disease_labels, min_confidence, on_sensor_anomaly } => {
                Wire::ModelVerdict(pb::ModelVerdictCondition {
                    disease_labels: disease_labels.clone(),
                    min_confidence: *min_confidence,
                    on_sensor_anomaly: *on_sensor_anomaly,
                })
            }
        };
        pb::Rule {
            id: self.id.to_string(),
            farm_id: self.farm_id.to_string(),
            name: self.name.clone(),
            severity: self.severity.to_proto(),
            device_id: self.device_id.map(|id| id.to_string()).unwrap_or_default(),
            metric: self.metric.clone().unwrap_or_default(),
            cooldown: Some(duration_to_proto(self.cooldown)),
            create_time: Some(to_timestamp(self.create_time)),
            condition: Some(condition),
        }
    }

    /// A rule the cloud pushed (already validated there): the agent takes it as is, with an id and a farm.
    pub fn from_pushed(rule: &pb::Rule) -> Result<Rule> {
        let id = validate::id("rule.id", &rule.id)?;
        let create_time = match &rule.create_time {
            Some(time) => from_timestamp("rule.create_time", time)?,
            None => SystemTime::UNIX_EPOCH,
        };
        Rule::from_request(rule, id, create_time)
    }

    fn applies_to(&self, device: Uuid, metric: Option<&str>) -> bool {
        self.device_id.is_none_or(|only| only == device)
            && match (&self.metric, metric) {
                (Some(only), Some(metric)) => only == metric,
                (Some(_), None) => false,
                (None, _) => true,
            }
    }
}

/// Where an alert is in its life; ordered: a merge keeps the later state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AlertState {
    Open = 1,
    Acknowledged = 2,
    Resolved = 3,
}

impl AlertState {
    pub fn from_number(value: i64) -> Option<AlertState> {
        match value {
            1 => Some(AlertState::Open),
            2 => Some(AlertState::Acknowledged),
            3 => Some(AlertState::Resolved),
            _ => None,
        }
    }

    /// From the contract's enum, for filters; `field` names it in the error.
    pub fn from_proto(field: &str, value: i32) -> Result<AlertState> {
        match pb::AlertState::try_from(value) {
            Ok(pb::AlertState::Open) => Ok(AlertState::Open),
            Ok(pb::AlertState::Acknowledged) => Ok(AlertState::Acknowledged),
            Ok(pb::AlertState::Resolved) => Ok(AlertState::Resolved),
            _ => {
                Err(Error::invalid(field, "must be ALERT_STATE_OPEN, ALERT_STATE_ACKNOWLEDGED or ALERT_STATE_RESOLVED"))
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AlertState::Open => "open",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Resolved => "resolved",
        }
    }
}

/// The metric of plant-disease alerts (a camera has no sensor metric).
pub const DISEASE_METRIC: &str = "disease";

/// Where an alert was first raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Origin {
    Edge = 1,
    Cloud = 2,
}

impl Origin {
    pub fn from_number(value: i64) -> Option<Origin> {
        match value {
            1 => Some(Origin::Edge),
            2 => Some(Origin::Cloud),
            _ => None,
        }
    }
}

/// An alert: one occurrence of a rule's condition on one device (and metric), with its repeats folded in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: Uuid,
    pub farm_id: Uuid,
    pub rule_id: Uuid,
    pub device_id: Option<Uuid>,
    /// The metric, or for disease verdicts the class; empty when none.
    pub metric: String,
    pub severity: Severity,
    pub state: AlertState,
    pub message: String,
    pub value: Option<f64>,
    pub open_time: SystemTime,
    pub last_time: SystemTime,
    pub acknowledge_time: Option<SystemTime>,
    pub resolve_time: Option<SystemTime>,
    pub count: u64,
    pub origin: Origin,
    pub evidence_image_id: Option<Uuid>,
    pub evidence_window: Option<(SystemTime, SystemTime)>,
    /// A person resolved it, rather than its condition clearing (absent in alerts stored before it was kept).
    #[serde(default)]
    pub resolved_by_hand: bool,
}

/// The id of the alert a rule raises on a device's metric for a condition that began at `began` (microseconds, the
/// precision every store keeps): the same on the Pi and in the cloud.
pub fn alert_id(rule: Uuid, device: Option<Uuid>, metric: &str, began: SystemTime) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"smartfarm-alert\0");
    hash.update(rule.as_bytes());
    hash.update(device.unwrap_or_default().as_bytes());
    hash.update(metric.as_bytes());
    hash.update(b"\0");
    hash.update(to_unix_micros(began).to_be_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

impl Alert {
    /// Folds another copy of the same alert (the edge's and the cloud's, or a later snapshot) into this one; returns
    /// whether anything changed. States only move forward, counts and times only grow, and the first origin stays.
    pub fn merge(&mut self, other: &Alert) -> bool {
        let before = self.clone();
        self.state = self.state.max(other.state);
        self.count = self.count.max(other.count);
        if other.last_time > self.last_time {
            self.last_time = other.last_time;
            if other.value.is_some() {
                self.value = other.value;
            }
        }
        self.open_time = self.open_time.min(other.open_time);
        self.acknowledge_time = earliest(self.acknowledge_time, other.acknowledge_time);
        // Who resolved it goes with the resolution that stands: the earliest.
        if other.resolve_time.is_some_and(|theirs| self.resolve_time.is_none_or(|mine| theirs < mine)) {
            self.resolved_by_hand = other.resolved_by_hand;
        }
        self.resolve_time = earliest(self.resolve_time, other.resolve_time);
        if self.evidence_image_id.is_none() {
            self.evidence_image_id = other.evidence_image_id;
        }
        if self.evidence_window.is_none() {
            self.evidence_window = other.evidence_window;
        }
        *self != before
    }

    /// Becomes `open` when that is an unresolved alert of the same farm, rule, device and metric that began no
    /// later: a copy raised after an evaluator lost its state (an agent restarted, a link moved) sees the condition
    /// begin at its first reading since, and gets another id, but it is the same condition, so the same alert.
    /// Model verdicts (disease alerts, alerts with evidence) are events, not conditions, and never join. Returns
    /// whether it joined.
    pub fn join(&mut self, open: &Alert) -> bool {
        let same_condition = self.farm_id == open.farm_id
            && self.rule_id == open.rule_id
            && self.device_id == open.device_id
            && self.metric == open.metric;
        if self.id == open.id || !same_condition || self.is_verdict() || open.state == AlertState::Resolved {
            return false;
        }
        // A copy that began earlier is an occurrence of its own (an older one, coming back with a batch uploaded
        // late): only the evaluator that lost what it had seen sees the condition begin later.
        if self.open_time < open.open_time {
            return false;
        }
        self.id = open.id;
        self.open_time = open.open_time;
        true
    }

    /// Whether it is a model verdict (a disease on a photo, an anomalous stretch): an event, not a condition that
    /// holds. (The agent's disease alerts carry no evidence: it has no stored photo to point at.)
    pub fn is_verdict(&self) -> bool {
        self.evidence_image_id.is_some() || self.evidence_window.is_some() || self.metric == DISEASE_METRIC
    }

    /// The alert as the contract's message.
    pub fn to_proto(&self) -> pb::Alert {
        pb::Alert {
            id: self.id.to_string(),
            farm_id: self.farm_id.to_string(),
            rule_id: self.rule_id.to_string(),
            device_id: self.device_id.map(|id| id.to_string()).unwrap_or_default(),
            metric: self.metric.clone(),
            severity: self.severity.to_proto(),
            state: match self.state {
                AlertState::Open => pb::AlertState::Open,
                AlertState::Acknowledged => pb::AlertState::Acknowledged,
                AlertState::Resolved => pb::AlertState::Resolved,
            } as i32,
            message: self.message.clone(),
            value: self.value,
            open_time: Some(to_timestamp(self.open_time)),
            last_time: Some(to_timestamp(self.last_time)),
            acknowledge_time: self.acknowledge_time.map(to_timestamp),
            resolve_time: self.resolve_time.map(to_timestamp),
            count: self.count,
            origin: match self.origin {
                Origin::Edge => pb::AlertOrigin::Edge,
                Origin::Cloud => pb::AlertOrigin::Cloud,
            } as i32,
            evidence_image_id: self.evidence_image_id.map(|id| id.to_string()).unwrap_or_default(),
            evidence_window: self.evidence_window.map(|(start, end)| smartfarm_proto::common::v1::TimeRange {
                start_time: Some(to_timestamp(start)),
                end_time: Some(to_timestamp(end)),
            }),
            resolved_by_hand: self.resolved_by_hand,
        }
    }

    /// An alert an edge agent sent up its link, checked: it must belong to the agent's farm (`farm_id`).
    pub fn from_edge(alert: &pb::Alert, farm_id: Uuid) -> Result<Alert> {
        let time = |field: &str, value: &Option<pbjson_types::Timestamp>| -> Result<Option<SystemTime>> {
            value.as_ref().map(|t| from_timestamp(field, t).map(truncate)).transpose()
        };
        let alert_farm = validate::id("alert.farm_id", &alert.farm_id)?;
        if alert_farm != farm_id {
            return Err(Error::PermissionDenied("an agent may only raise alerts of its own farm".into()));
        }
        let open_time = time("alert.open_time", &alert.open_time)?
            .ok_or_else(|| Error::invalid("alert.open_time", "is required"))?;
        let state = AlertState::from_proto("alert.state", alert.state)?;
        if state == AlertState::Acknowledged {
            return Err(Error::invalid("alert.state", "agents do not acknowledge alerts"));
        }
        if alert.message.len() > 1000 {
            return Err(Error::invalid("alert.message", "must be at most 1000 bytes"));
        }
        if alert.metric.len() > 200 {
            return Err(Error::invalid("alert.metric", "must be at most 200 bytes"));
        }
        let evidence_window = match &alert.evidence_window {
            None => None,
            Some(range) => Some(crate::time::required_range(Some(range))?),
        };
        Ok(Alert {
            id: validate::id("alert.id", &alert.id)?,
            farm_id,
            rule_id: validate::id("alert.rule_id", &alert.rule_id)?,
            device_id: validate::optional_id("alert.device_id", &alert.device_id)?,
            metric: alert.metric.clone(),
            severity: Severity::from_proto("alert.severity", alert.severity)?,
            state,
            message: alert.message.clone(),
            value: alert.value.filter(|v| v.is_finite()),
            open_time,
            last_time: time("alert.last_time", &alert.last_time)?.unwrap_or(open_time),
            acknowledge_time: None,
            resolve_time: time("alert.resolve_time", &alert.resolve_time)?,
            count: alert.count.max(1),
            origin: Origin::Edge,
            evidence_image_id: validate::optional_id("alert.evidence_image_id", &alert.evidence_image_id)?,
            evidence_window,
            // Agents do not resolve alerts by hand: only the cloud's copy says so.
            resolved_by_hand: false,
        })
    }
}

/// What happened to an alert, as the alert event log and live streams say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlertEventKind {
    /// A new alert.
    Opened = 1,
    /// A repeat was folded in or details changed.
    Updated = 2,
    /// Someone acknowledged it.
    Acknowledged = 3,
    /// It was resolved (by its condition clearing, or by hand).
    Resolved = 4,
}

impl AlertEventKind {
    pub fn from_number(value: i64) -> Option<AlertEventKind> {
        match value {
            1 => Some(AlertEventKind::Opened),
            2 => Some(AlertEventKind::Updated),
            3 => Some(AlertEventKind::Acknowledged),
            4 => Some(AlertEventKind::Resolved),
            _ => None,
        }
    }

    /// The kind of event that takes an alert from `before` (absent: new) to `after`.
    pub fn of_change(before: Option<&Alert>, after: &Alert) -> AlertEventKind {
        match before {
            None => AlertEventKind::Opened,
            Some(before) if before.state != after.state => match after.state {
                AlertState::Resolved => AlertEventKind::Resolved,
                AlertState::Acknowledged => AlertEventKind::Acknowledged,
                AlertState::Open => AlertEventKind::Updated,
            },
            Some(_) => AlertEventKind::Updated,
        }
    }
}

fn earliest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Times at the precision every store keeps, so the Pi's and the cloud's copies compare equal.
fn truncate(time: SystemTime) -> SystemTime {
    from_unix_micros(to_unix_micros(time))
}

fn format_duration(duration: Duration) -> String {
    humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
}

/// A plant-disease diagnosis, as the evaluator needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct DiseaseVerdict {
    pub camera: Uuid,
    pub image_id: Option<Uuid>,
    pub label: String,
    pub confidence: f64,
    /// Whether the class is a healthy one (which clears open disease alerts of the camera).
    pub healthy: bool,
    pub capture_time: SystemTime,
}

/// A sensor anomaly event, as the evaluator needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct AnomalyVerdict {
    pub device: Uuid,
    pub metric: String,
    pub start_time: SystemTime,
    pub end_time: SystemTime,
    pub peak_value: f64,
    pub peak_score: f64,
}

fn new_alert(
    (farm_id, origin): (Uuid, Origin),
    rule: &Rule,
    device: Uuid,
    metric: &str,
    began: SystemTime,
    message: String,
) -> Alert {
    Alert {
        id: alert_id(rule.id, Some(device), metric, began),
        farm_id,
        rule_id: rule.id,
        device_id: Some(device),
        metric: metric.to_string(),
        severity: rule.severity,
        state: AlertState::Open,
        message,
        value: None,
        open_time: began,
        last_time: began,
        acknowledge_time: None,
        resolve_time: None,
        count: 1,
        origin,
        evidence_image_id: None,
        evidence_window: None,
        resolved_by_hand: false,
    }
}

/// The evaluation state of one rule on one device's metric.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Track {
    /// The measurement time since which the condition holds without a break.
    breach_since: Option<SystemTime>,
    /// The newest time evaluated: older readings (late arrivals) do not drive the state.
    newest: Option<SystemTime>,
    /// The alert raised and not yet resolved, and since when its condition is clear.
    active: Option<(Alert, Option<SystemTime>)>,
    /// The extremes of the recent readings, for rate-of-change rules (absent in state written before they were
    /// kept: such a window starts over).
    #[serde(default)]
    window: RateWindow,
}

/// The smallest and largest of a series' readings within a rate-of-change rule's window (at most
/// [`MAX_RATE_WINDOW_READINGS`] of them), kept as the two queues of a sliding-window minimum and maximum: each
/// reading that may still become the smallest (or largest) once older ones leave the window, in time order. The
/// extremes are those of every reading in the window, found in constant time per reading. Readings that go up and
/// down leave a few entries rather than the whole window, which is what makes it cheap to keep across restarts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RateWindow {
    /// How many readings it was given: numbers them, for the cap on how many the window spans.
    taken: u64,
    /// (number, time in Unix microseconds, value) with values rising from the front: the front is the smallest in
    /// the window. Times as plain numbers keep the state written every second small.
    lows: VecDeque<(u64, i64, f64)>,
    /// The same with values falling from the front: the front is the largest.
    highs: VecDeque<(u64, i64, f64)>,
}

impl RateWindow {
    /// Adds a reading (measured at `time`, no earlier than the last) and returns the largest minus the smallest of
    /// the readings within `window` of it, or minus infinity when none is a number.
    fn push(&mut self, time: SystemTime, value: f64, window: Duration) -> f64 {
        let number = self.taken;
        self.taken += 1;
        let (time, window) = (to_unix_micros(time), i64::try_from(window.as_micros()).unwrap_or(i64::MAX));
        // A value that is not a number is neither smallest nor largest (as with f64::min and max).
        if !value.is_nan() {
            // An older reading no smaller than this one can never be the smallest again: this one outlives it.
            while self.lows.back().is_some_and(|(_, _, low)| *low >= value) {
                self.lows.pop_back();
            }
            self.lows.push_back((number, time, value));
            while self.highs.back().is_some_and(|(_, _, high)| *high <= value) {
                self.highs.pop_back();
            }
            self.highs.push_back((number, time, value));
        }
        let left_the_window = |(taken, at, _): &(u64, i64, f64)| {
            number - taken >= MAX_RATE_WINDOW_READINGS || time.saturating_sub(*at) > window
        };
        while self.lows.front().is_some_and(left_the_window) {
            self.lows.pop_front();
        }
        while self.highs.front().is_some_and(left_the_window) {
            self.highs.pop_front();
        }
        let low = self.lows.front().map_or(f64::INFINITY, |(_, _, low)| *low);
        let high = self.highs.front().map_or(f64::NEG_INFINITY, |(_, _, high)| *high);
        high - low
    }
}

/// What an evaluator has learnt (when conditions began, the alerts open, when devices were last heard), to carry it
/// across a restart: the alerts it raises after one keep their ids, and the open ones still resolve.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct EvaluatorState {
    tracks: Vec<(Uuid, Uuid, String, Track)>,
    last_seen: Vec<(Uuid, SystemTime)>,
    /// Alerts resolved recently (see [`Evaluator::recently_resolved`]); absent in state written before they were.
    #[serde(default)]
    resolved: Vec<Alert>,
}

/// How long a resolved alert stays in [`Evaluator::recently_resolved`], and how many at most.
const RECENTLY_RESOLVED_FOR: Duration = Duration::from_secs(24 * 3600);
const RECENTLY_RESOLVED_AT_MOST: usize = 256;

/// What the condition looked like at one moment.
struct Observation<'a> {
    time: SystemTime,
    beyond: bool,
    hold: Duration,
    value: Option<f64>,
    /// Describes the alert when it opens.
    message: &'a dyn Fn(SystemTime) -> String,
}

/// Evaluates a farm's rules. Feed it every reading in order; it returns the alerts that opened, changed (a repeat
/// folded in) or resolved. It is deterministic in the readings it is fed, which is what makes the Pi's and the
/// cloud's alerts one.
#[derive(Debug)]
pub struct Evaluator {
    farm_id: Uuid,
    origin: Origin,
    rules: Vec<Rule>,
    tracks: HashMap<(Uuid, Uuid, String), Track>,
    /// The newest measurement time of each device (for device-silent rules).
    last_seen: HashMap<Uuid, SystemTime>,
    /// The alerts it resolved lately, oldest first.
    resolved: VecDeque<Alert>,
}

impl Evaluator {
    pub fn new(farm_id: Uuid, origin: Origin) -> Evaluator {
        Evaluator {
            farm_id,
            origin,
            rules: Vec::new(),
            tracks: HashMap::new(),
            last_seen: HashMap::new(),
            resolved: VecDeque::new(),
        }
    }

    /// What it has learnt, to be given back to [`Evaluator::restore`] after a restart.
    pub fn state(&self) -> EvaluatorState {
        EvaluatorState {
            tracks: self
                .tracks
                .iter()
                .map(|((rule, device, metric), track)| (*rule, *device, metric.clone(), track.clone()))
                .collect(),
            last_seen: self.last_seen.iter().map(|(device, time)| (*device, *time)).collect(),
            resolved: self.resolved.iter().cloned().collect(),
        }
    }

    /// Takes back what an earlier run learnt, for the rules it evaluates now (call after [`Evaluator::set_rules`]).
    pub fn restore(&mut self, state: EvaluatorState) {
        for (rule, device, metric, track) in state.tracks {
            if self.rules.iter().any(|known| known.id == rule) {
                self.tracks.insert((rule, device, metric), track);
            }
        }
        for (device, time) in state.last_seen {
            let seen = self.last_seen.entry(device).or_insert(time);
            *seen = (*seen).max(time);
        }
        for alert in state.resolved {
            self.remember_resolved(alert);
        }
    }

    /// The alerts an agent's evaluator resolved in the last day by `now` (at most [`RECENTLY_RESOLVED_AT_MOST`]),
    /// kept across restarts with the rest of its state: an agent restarted before it could tell the cloud of an
    /// alert that opened and resolved during an outage sends them again (the cloud merges what it already has).
    /// The cloud's evaluators keep none.
    pub fn recently_resolved(&self, now: SystemTime) -> Vec<Alert> {
        let recent = |alert: &&Alert| {
            let resolved = alert.resolve_time.unwrap_or(alert.last_time);
            now.duration_since(resolved).unwrap_or_default() <= RECENTLY_RESOLVED_FOR
        };
        self.resolved.iter().filter(recent).cloned().collect()
    }

    fn remember_resolved(&mut self, alert: Alert) {
        if self.origin != Origin::Edge {
            return;
        }
        let newest = alert.resolve_time.unwrap_or(alert.last_time);
        self.resolved.push_back(alert);
        while self.resolved.len() > RECENTLY_RESOLVED_AT_MOST
            || self.resolved.front().is_some_and(|oldest| {
                let resolved = oldest.resolve_time.unwrap_or(oldest.last_time);
                newest.duration_since(resolved).unwrap_or_default() > RECENTLY_RESOLVED_FOR
            })
        {
            self.resolved.pop_front();
        }
    }

    /// The farm's devices that send readings, from the registry: device-silent rules without a device filter watch
    /// each of them, from `now` for those not heard yet (a sensor that never sent anything is silent too); a device
    /// no longer in the farm and named by no rule is forgotten.
    pub fn set_devices(&mut self, devices: &[Uuid], now: SystemTime) {
        let named: std::collections::HashSet<Uuid> = self.rules.iter().filter_map(|rule| rule.device_id).collect();
        self.last_seen.retain(|device, _| devices.contains(device) || named.contains(device));
        for device in devices {
            self.last_seen.entry(*device).or_insert(truncate(now));
        }
    }

    /// The alerts it raised that are not resolved, as it last raised them.
    pub fn open_alerts(&self) -> Vec<Alert> {
        self.tracks.values().filter_map(|track| track.active.as_ref().map(|(alert, _)| alert.clone())).collect()
    }

    /// A person resolved `resolved`. If this evaluator holds it open (by id, or, for a condition rather than a
    /// verdict, as the same rule, device and metric begun no later than the resolution: the copy an evaluator
    /// raised after losing its state, which the store joined to the resolved alert), it is over: the condition's
    /// next occurrence, from readings measured at or after the resolution, opens a new alert rather than folding
    /// into the resolved one, and readings measured before it are no longer evaluated for that rule and device.
    /// Every evaluator that hears of the resolution (the agent's, the cloud's) thus raises the same new alert from
    /// the same readings. Returns whether it held the alert.
    pub fn resolved_by_hand(&mut self, resolved: &Alert) -> bool {
        let Some(resolved_at) = resolved.resolve_time else { return false };
        let condition = (!resolved.is_verdict()).then_some((resolved.rule_id, resolved.device_id, &resolved.metric));
        let mut held = false;
        for ((rule, device, metric), track) in self.tracks.iter_mut() {
            let same = |active: &Alert| {
                active.id == resolved.id
                    || condition == Some((*rule, Some(*device), metric)) && active.open_time <= resolved_at
            };
            if track.active.as_ref().is_some_and(|(active, _)| same(active)) {
                track.active = None;
                track.breach_since = None;
                track.newest = Some(track.newest.map_or(resolved_at, |newest| newest.max(resolved_at)));
                held = true;
            }
        }
        held
    }

    /// Makes `stored` the open alert that later stretches of its rule, device and metric fold into, in place of
    /// `raised`, the anomaly alert this evaluator had just opened: the store already held that stretch, in an alert
    /// this evaluator no longer knew (it lost its state). Nothing changes unless `raised` is still the open one.
    pub fn adopt_anomaly_alert(&mut self, raised: &Alert, stored: Alert) {
        let Some(device) = raised.device_id else { return };
        if let Some(track) = self.tracks.get_mut(&(raised.rule_id, device, raised.metric.clone()))
            && track.active.as_ref().is_some_and(|(active, _)| active.id == raised.id)
        {
            track.active = Some((stored, None));
        }
    }

    /// The farm whose rules these are.
    pub fn farm_id(&self) -> Uuid {
        self.farm_id
    }

    /// The rules evaluated.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Replaces the rules; what was learnt about rules that remain (identical) is kept. `now` starts the silence
    /// clock of devices that device-silent rules name and that have not been heard yet. Returns the alerts it held
    /// open for rules that are gone, resolved at `now` as a person's doing (deleting the rule): nothing would ever
    /// resolve them otherwise, and a farm's siren must hear that they are over.
    pub fn set_rules(&mut self, rules: Vec<Rule>, now: SystemTime) -> Vec<Alert> {
        let kept: HashMap<Uuid, &Rule> = rules.iter().map(|rule| (rule.id, rule)).collect();
        let old: HashMap<Uuid, Rule> = self.rules.drain(..).map(|rule| (rule.id, rule)).collect();
        let mut ended = Vec::new();
        self.tracks.retain(|(rule, _, _), track| {
            let keep = kept.get(rule).is_some_and(|new| old.get(rule) == Some(*new));
            if !keep && let Some((mut alert, _)) = track.active.take() {
                alert.state = AlertState::Resolved;
                alert.resolve_time = Some(truncate(now).max(alert.last_time));
                alert.resolved_by_hand = true;
                ended.push(alert);
            }
            keep
        });
        for alert in &ended {
            self.remember_resolved(alert.clone());
        }
        for rule in &rules {
            if let (Condition::DeviceSilent { .. }, Some(device)) = (&rule.condition, rule.device_id) {
                self.last_seen.entry(device).or_insert(truncate(now));
            }
        }
        self.rules = rules.into_iter().filter(|rule| rule.farm_id == self.farm_id).collect();
        ended
    }

    /// Moves one track's state machine by one observation; returns the alert when it opened, grew or resolved.
    fn step(&mut self, rule_index: usize, device: Uuid, metric: &str, seen: Observation<'_>) -> Option<Alert> {
        let rule = self.rules[rule_index].clone();
        let identity = (self.farm_id, self.origin);
        let key = (rule.id, device, metric.to_string());
        let time = seen.time;
        let track = self.tracks.entry(key.clone()).or_default();
        if track.newest.is_some_and(|newest| time < newest) {
            return None;
        }
        track.newest = Some(time);
        if seen.beyond {
            let since = *track.breach_since.get_or_insert(time);
            let held = time.duration_since(since).unwrap_or_default() >= seen.hold;
            match &mut track.active {
                Some((alert, clear_since)) => {
                    alert.last_time = time;
                    if seen.value.is_some() {
                        alert.value = seen.value;
                    }
                    if clear_since.is_some() && held {
                        // A repeat within the cooldown: folded into the open alert.
                        *clear_since = None;
                        alert.count += 1;
                        return Some(alert.clone());
                    }
                    None
                }
                None if held => {
                    let message = (seen.message)(since);
                    let mut alert = new_alert(identity, &rule, device, metric, since, message);
                    alert.last_time = time;
                    alert.value = seen.value;
                    let track = self.tracks.get_mut(&key).expect("the track was just used");
                    track.active = Some((alert.clone(), None));
                    Some(alert)
                }
                None => None,
            }
        } else {
            track.breach_since = None;
            let (alert, clear_since) = track.active.as_mut()?;
            let since = *clear_since.get_or_insert(time);
            if time.duration_since(since).unwrap_or_default() < rule.cooldown {
                return None;
            }
            alert.state = AlertState::Resolved;
            alert.resolve_time = Some(time);
            let resolved = alert.clone();
            track.active = None;
            self.remember_resolved(resolved.clone());
            Some(resolved)
        }
    }

    /// Evaluates one accepted reading.
    pub fn on_reading(&mut self, device: Uuid, metric: &str, value: f64, time: SystemTime) -> Vec<Alert> {
        let time = truncate(time);
        let mut changed = Vec::new();
        for index in 0..self.rules.len() {
            let rule = &self.rules[index];
            match &rule.condition {
                Condition::Threshold { above, limit, for_duration } if rule.applies_to(device, Some(metric)) => {
                    let (above, limit, hold) = (*above, *limit, *for_duration);
                    let beyond = if above { value > limit } else { value < limit };
                    let side = if above { "above" } else { "below" };
                    let message = move |_: SystemTime| {
                        if hold.is_zero() {
                            format!("{metric} {value} {side} {limit}")
                        } else {
                            format!("{metric} {value} {side} {limit} for {}", format_duration(hold))
                        }
                    };
                    let seen = Observation { time, beyond, hold, value: Some(value), message: &message };
                    changed.extend(self.step(index, device, metric, seen));
                }
                Condition::RateOfChange { max_change, window } if rule.applies_to(device, Some(metric)) => {
                    let (max_change, window) = (*max_change, *window);
                    let key = (rule.id, device, metric.to_string());
                    let track = self.tracks.entry(key).or_default();
                    if track.newest.is_some_and(|newest| time < newest) {
                        continue;
                    }
                    let change = track.window.push(time, value, window);
                    let message = move |_: SystemTime| {
                        format!("{metric} moved by {change} within {} (limit {max_change})", format_duration(window))
                    };
                    let seen = Observation {
                        time,
                        beyond: change > max_change,
                        hold: Duration::ZERO,
                        value: Some(value),
                        message: &message,
                    };
                    changed.extend(self.step(index, device, metric, seen));
                }
                // Device-silent rules: see on_heard.
                _ => {}
            }
        }
        changed
    }

    /// A message from `device` arrived at `at` (the agent's clock): it is not silent. Device-silent rules count
    /// from arrivals, not from the times readings carry, so a sensor whose clock is off (or that sends what it
    /// buffered) is neither taken for silent nor kept silent: the silence begins and ends on the clock that notices
    /// it. Any message ends a silence, whatever metric the rule names (rules stored before metrics were refused
    /// here may name one): the silence was raised for the device as a whole.
    pub fn on_heard(&mut self, device: Uuid, at: SystemTime) -> Vec<Alert> {
        let at = truncate(at);
        let newest = self.last_seen.entry(device).or_insert(at);
        *newest = (*newest).max(at);
        let mut changed = Vec::new();
        for index in 0..self.rules.len() {
            let rule = &self.rules[index];
            if !matches!(rule.condition, Condition::DeviceSilent { .. })
                || rule.device_id.is_some_and(|only| only != device)
            {
                continue;
            }
            let message = |_: SystemTime| String::new();
            let seen = Observation { time: at, beyond: false, hold: Duration::ZERO, value: None, message: &message };
            changed.extend(self.step(index, device, "", seen));
        }
        changed
    }

    /// Raises device-silent alerts for devices unheard for their rule's time by `now`. Call it every few seconds.
    pub fn on_tick(&mut self, now: SystemTime) -> Vec<Alert> {
        let mut changed = Vec::new();
        for index in 0..self.rules.len() {
            let rule = &self.rules[index];
            let Condition::DeviceSilent { silent_for } = rule.condition else { continue };
            let devices: Vec<(Uuid, SystemTime)> = self
                .last_seen
                .iter()
                .filter(|(device, _)| rule.device_id.is_none_or(|only| only == **device))
                .map(|(device, seen)| (*device, *seen))
                .collect();
            for (device, last_seen) in devices {
                // The silence counts from the last reading: the moment it began is the same wherever it is noticed.
                let began = last_seen + silent_for;
                if now < began {
                    continue;
                }
                let message = move |_: SystemTime| format!("no data for {}", format_duration(silent_for));
                let seen = Observation {
                    time: truncate(began),
                    beyond: true,
                    hold: Duration::ZERO,
                    value: None,
                    message: &message,
                };
                changed.extend(self.step(index, device, "", seen));
            }
        }
        changed
    }

    /// Evaluates a plant-disease diagnosis of a camera's photo.
    pub fn on_disease(&mut self, verdict: &DiseaseVerdict) -> Vec<Alert> {
        let time = truncate(verdict.capture_time);
        let identity = (self.farm_id, self.origin);
        let mut changed = Vec::new();
        for rule in &self.rules {
            let Condition::ModelVerdict { disease_labels, min_confidence, .. } = &rule.condition else { continue };
            // A photo has no metric: a rule's metric picks which sensor anomalies it takes, not which diagnoses.
            if rule.device_id.is_some_and(|only| only != verdict.camera) {
                continue;
            }
            let matches = !verdict.healthy
                && verdict.confidence >= *min_confidence
                && (disease_labels.is_empty() || disease_labels.contains(&verdict.label));
            let track = self.tracks.entry((rule.id, verdict.camera, DISEASE_METRIC.to_string())).or_default();
            // An older photo changes nothing; nor does the newest announced again (diagnosed again late because its
            // verdict was not confirmed): it is not a repeat of itself.
            if track.newest.is_some_and(|newest| time <= newest) {
                continue;
            }
            track.newest = Some(time);
            // A diagnosis is an event, not a level: a matching one within the cooldown of the last is a repeat of
            // that alert; after it, a new alert (even if the last was never cleared: nothing clears a photo).
            match (&mut track.active, matches) {
                (Some((alert, _)), true)
                    if alert.state != AlertState::Resolved
                        && time.duration_since(alert.last_time).unwrap_or_default() <= rule.cooldown =>
                {
                    alert.count += 1;
                    alert.last_time = time;
                    alert.value = Some(verdict.confidence);
                    changed.push(alert.clone());
                }
                (_, true) => {
                    let message = format!("{} diagnosed ({:.0}% sure)", verdict.label, verdict.confidence * 100.0);
                    let mut alert = new_alert(identity, rule, verdict.camera, DISEASE_METRIC, time, message);
                    alert.value = Some(verdict.confidence);
                    alert.evidence_image_id = verdict.image_id;
                    track.active = Some((alert.clone(), None));
                    changed.push(alert);
                }
                // A healthy photo of the camera clears its disease alert.
                (Some((alert, _)), false) if verdict.healthy => {
                    alert.state = AlertState::Resolved;
                    alert.resolve_time = Some(time);
                    changed.push(alert.clone());
                    track.active = None;
                }
                _ => {}
            }
        }
        for alert in changed.iter().filter(|alert| alert.state == AlertState::Resolved) {
            self.remember_resolved(alert.clone());
        }
        changed
    }

    /// Evaluates a sensor anomaly event. Anomaly alerts stay open until someone resolves them: an event has no
    /// clearing reading.
    pub fn on_anomaly(&mut self, verdict: &AnomalyVerdict) -> Vec<Alert> {
        let identity = (self.farm_id, self.origin);
        let start = truncate(verdict.start_time);
        let end = truncate(verdict.end_time).max(start);
        let mut changed = Vec::new();
        for rule in &self.rules {
            let Condition::ModelVerdict { on_sensor_anomaly: true, .. } = rule.condition else { continue };
            if !rule.applies_to(verdict.device, Some(&verdict.metric)) {
                continue;
            }
            let track = self.tracks.entry((rule.id, verdict.device, verdict.metric.clone())).or_default();
            // A stretch is an event. One that overlaps the open alert's is that alert (reported again, as a
            // pipeline that restarted or another replica's does); one that begins within the rule's cooldown after
            // it is a repeat, folded in with its count; a later one is a new alert (nothing clears an anomaly but a
            // person). One that ended before the alert began (scored late) is not folded into it: it is an alert of
            // its own, named by its own start, so announcing it again changes nothing, and the evaluator goes on
            // following the newer alert.
            let message = || {
                format!("{} anomalous (peak {} at score {:.2})", verdict.metric, verdict.peak_value, verdict.peak_score)
            };
            match &mut track.active {
                Some((alert, _)) if end < alert.open_time => {
                    let mut older = new_alert(identity, rule, verdict.device, &verdict.metric, start, message());
                    older.value = Some(verdict.peak_value);
                    older.last_time = end;
                    older.evidence_window = Some((start, end));
                    changed.push(older);
                }
                Some((alert, _)) if start <= alert.last_time => {
                    if end > alert.last_time {
                        alert.last_time = end;
                        changed.push(alert.clone());
                    }
                }
                Some((alert, _)) if start.duration_since(alert.last_time).unwrap_or_default() <= rule.cooldown => {
                    alert.count += 1;
                    alert.last_time = end;
                    alert.value = Some(verdict.peak_value);
                    changed.push(alert.clone());
                }
                _ => {
                    let mut alert = new_alert(identity, rule, verdict.device, &verdict.metric, start, message());
                    alert.value = Some(verdict.peak_value);
                    alert.last_time = end;
                    alert.evidence_window = Some((start, end));
                    track.active = Some((alert.clone(), None));
                    changed.push(alert);
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    fn threshold_rule(farm: Uuid, for_secs: u64, cooldown_secs: u64) -> Rule {
        Rule {
            id: Uuid::now_v7(),
            farm_id: farm,
            name: "hot".into(),
            severity: Severity::Critical,
            device_id: None,
            metric: Some("temperature".into()),
            cooldown: Duration::from_secs(cooldown_secs),
            create_time: at(0),
            condition: Condition::Threshold { above: true, limit: 40.0, for_duration: Duration::from_secs(for_secs) },
        }
    }

    #[test]
    fn a_threshold_held_for_its_duration_opens_once_and_resolves_when_clear() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let rule = threshold_rule(farm, 60, 0);
        let mut evaluator = Evaluator::new(farm, Origin::Edge);
        evaluator.set_rules(vec![rule.clone()], at(0));
        assert!(evaluator.on_reading(device, "temperature", 41.0, at(10)).is_empty());
        assert!(evaluator.on_reading(device, "humidity", 99.0, at(20)).is_empty(), "another metric");
        assert!(evaluator.on_reading(device, "temperature", 42.0, at(40)).is_empty(), "held 30 s of 60");
        let opened = evaluator.on_reading(device, "temperature", 43.0, at(70));
        assert_eq!(opened.len(), 1);
        let alert = &opened[0];
        assert_eq!(alert.id, alert_id(rule.id, Some(device), "temperature", at(10)));
        assert_eq!((alert.state, alert.count, alert.value, alert.open_time), (AlertState::Open, 1, Some(43.0), at(10)));
        assert_eq!(alert.message, "temperature 43 above 40 for 1m");
        assert!(evaluator.on_reading(device, "temperature", 44.0, at(80)).is_empty(), "still open: nothing new");
        assert_eq!(evaluator.open_alerts().iter().map(|open| open.id).collect::<Vec<_>>(), vec![alert.id]);
        let resolved = evaluator.on_reading(device, "temperature", 30.0, at(90));
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            (resolved[0].id, resolved[0].state, resolved[0].resolve_time),
            (alert.id, AlertState::Resolved, Some(at(90)))
        );
        assert!(evaluator.open_alerts().is_empty(), "resolved: no longer open");
    }

    #[test]
    fn repeats_within_the_cooldown_fold_into_one_alert() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let mut evaluator = Evaluator::new(farm, Origin::Cloud);
        evaluator.set_rules(vec![threshold_rule(farm, 0, 300)], at(0));
        let opened = evaluator.on_reading(device, "temperature", 45.0, at(0));
        assert_eq!(opened[0].count, 1);
        assert!(evaluator.on_reading(device, "temperature", 20.0, at(10)).is_empty(), "clear, within the cooldown");
        let repeat = evaluator.on_reading(device, "temperature", 46.0, at(20));
        assert_eq!((repeat[0].id, repeat[0].count, repeat[0].state), (opened[0].id, 2, AlertState::Open));
        assert!(evaluator.on_reading(device, "temperature", 20.0, at(30)).is_empty());
        let resolved = evaluator.on_reading(device, "temperature", 20.0, at(330));
        assert_eq!((resolved[0].state, resolved[0].count), (AlertState::Resolved, 2));
        let again = evaluator.on_reading(device, "temperature", 47.0, at(400));
        assert_ne!(again[0].id, opened[0].id, "after it resolved, a new occurrence is a new alert");
    }

    #[test]
    fn two_evaluators_fed_the_same_readings_raise_the_same_alert() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let rule = threshold_rule(farm, 5, 0);
        let mut edge = Evaluator::new(farm, Origin::Edge);
        let mut cloud = Evaluator::new(farm, Origin::Cloud);
        edge.set_rules(vec![rule.clone()], at(0));
        cloud.set_rules(vec![rule], at(999));
        let readings = [(39.0, 0), (41.5, 3), (41.7, 6), (41.9, 9), (10.0, 12)];
        let run = |evaluator: &mut Evaluator| -> Vec<Alert> {
            readings
                .iter()
                .flat_map(|(value, second)| {
                    evaluator.on_reading(device, "temperature", *value, at(*second) + Duration::from_nanos(1234))
                })
                .collect()
        };
        let (from_edge, from_cloud) = (run(&mut edge), run(&mut cloud));
        assert_eq!(from_edge.len(), 2);
        let mut merged = from_cloud[0].clone();
        assert_eq!(merged.id, from_edge[0].id);
        assert!(!merged.merge(&from_edge[0]) || merged.origin == Origin::Cloud);
        assert!(merged.merge(&from_edge[1]), "the edge's resolution moves the cloud's copy on");
        assert_eq!(merged.state, AlertState::Resolved);
        let mut back = from_edge[1].clone();
        assert!(!back.merge(&from_cloud[0]), "an older snapshot never moves an alert back");
    }

    #[test]
    fn a_restored_evaluator_keeps_the_alert_it_had_open() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let rule = threshold_rule(farm, 0, 0);
        let mut before = Evaluator::new(farm, Origin::Edge);
        before.set_rules(vec![rule.clone()], at(0));
        let open = before.on_reading(device, "temperature", 45.0, at(10)).remove(0);
        let saved = serde_json::to_string(&before.state()).unwrap();
        let mut after = Evaluator::new(farm, Origin::Edge);
        after.set_rules(vec![rule], at(0));
        after.restore(serde_json::from_str(&saved).unwrap());
        assert!(after.on_reading(device, "temperature", 46.0, at(20)).is_empty(), "still the same alert");
        let resolved = after.on_reading(device, "temperature", 20.0, at(30)).remove(0);
        assert_eq!((resolved.id, resolved.state), (open.id, AlertState::Resolved));
    }

    #[test]
    fn a_rate_window_gives_the_extremes_of_every_reading_in_it() {
        // Readings going up and down, a step of 1 to 4 s, some not numbers; checked against the whole window kept
        // (as evaluators kept it before), the short window by time and the long one by the cap on readings.
        let mut seed = 7_u64;
        let mut random = move || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            seed >> 33
        };
        for window in [Duration::from_secs(60), Duration::from_secs(24 * 3600)] {
            let mut kept = RateWindow::default();
            let mut whole: VecDeque<(SystemTime, f64)> = VecDeque::new();
            let mut time = at(0);
            let mut largest_kept = 0;
            for step in 0..10_000 {
                time += Duration::from_secs(1 + random() % 4);
                let value = if step % 97 == 0 { f64::NAN } else { (random() % 1000) as f64 / 10.0 };
                whole.push_back((time, value));
                while whole.len() as u64 > MAX_RATE_WINDOW_READINGS
                    || whole.front().is_some_and(|(t, _)| time.duration_since(*t).unwrap() > window)
                {
                    whole.pop_front();
                }
                let (low, high) = whole
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), (_, v)| (low.min(*v), high.max(*v)));
                assert_eq!(kept.push(time, value, window), high - low, "reading {step}, window {window:?}");
                largest_kept = largest_kept.max(kept.lows.len() + kept.highs.len());
            }
            assert!(largest_kept < 100, "kept {largest_kept} entries for a window of up to 4096 readings");
        }
    }

    #[test]
    fn a_rate_condition_that_holds_across_a_restart_stays_one_alert() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let mut rule = threshold_rule(farm, 0, 0);
        rule.condition = Condition::RateOfChange { max_change: 5.0, window: Duration::from_secs(120) };
        // Warming fast, then steady: the change within two minutes stays over 5 until the rise leaves the window.
        let readings: Vec<(u64, f64)> =
            (0..40).map(|n| (n * 10, if n < 15 { 20.0 + n as f64 } else { 34.0 })).collect();
        let mut never_stopped = Evaluator::new(farm, Origin::Edge);
        never_stopped.set_rules(vec![rule.clone()], at(0));
        let mut restarted = Evaluator::new(farm, Origin::Edge);
        restarted.set_rules(vec![rule.clone()], at(0));
        let (mut expected, mut got) = (Vec::new(), Vec::new());
        for (index, (second, value)) in readings.into_iter().enumerate() {
            expected.extend(never_stopped.on_reading(device, "temperature", value, at(second)));
            if index == 12 || index == 20 {
                // The agent restarts with the condition holding, its state written and read back.
                let state = serde_json::to_string(&restarted.state()).unwrap();
                restarted = Evaluator::new(farm, Origin::Edge);
                restarted.set_rules(vec![rule.clone()], at(0));
                restarted.restore(serde_json::from_str(&state).unwrap());
            }
            got.extend(restarted.on_reading(device, "temperature", value, at(second)));
        }
        let states: Vec<_> = expected.iter().map(|alert| (alert.id, alert.state)).collect();
        assert_eq!(states.len(), 2, "one alert opened and resolved: {expected:?}");
        assert_eq!((states[0].1, states[1].1), (AlertState::Open, AlertState::Resolved));
        assert_eq!(states[0].0, states[1].0);
        assert_eq!(got, expected, "the restarted evaluator raised what the one that never stopped did");
    }

    #[test]
    fn resolved_alerts_are_remembered_for_a_day_across_restarts() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let rule = threshold_rule(farm, 0, 0);
        let mut before = Evaluator::new(farm, Origin::Edge);
        before.set_rules(vec![rule.clone()], at(0));
        before.on_reading(device, "temperature", 45.0, at(10));
        let first = before.on_reading(device, "temperature", 20.0, at(20)).remove(0);
        // State written before resolved alerts were kept still loads.
        let mut old_state = serde_json::to_value(before.state()).unwrap();
        old_state.as_object_mut().unwrap().remove("resolved");
        let mut upgraded = Evaluator::new(farm, Origin::Edge);
        upgraded.set_rules(vec![rule.clone()], at(0));
        upgraded.restore(serde_json::from_value(old_state).unwrap());
        assert!(upgraded.recently_resolved(at(30)).is_empty());
        // Written and read back: the resolved alert is there, as it was resolved.
        let mut after = Evaluator::new(farm, Origin::Edge);
        after.set_rules(vec![rule], at(0));
        after.restore(serde_json::from_str(&serde_json::to_string(&before.state()).unwrap()).unwrap());
        assert_eq!(after.recently_resolved(at(30)), vec![first.clone()]);
        // A day later another resolution pushes it out.
        let day = 24 * 3600;
        after.on_reading(device, "temperature", 45.0, at(day + 30));
        let second = after.on_reading(device, "temperature", 20.0, at(day + 40)).remove(0);
        assert_eq!(after.recently_resolved(at(day + 50)), vec![second.clone()], "{first:?} is more than a day older");
        assert!(after.recently_resolved(at(2 * day + 50)).is_empty(), "a day after the last one");
        // The cloud's evaluators have no use for them.
        let mut cloud = Evaluator::new(farm, Origin::Cloud);
        cloud.set_rules(vec![threshold_rule(farm, 0, 0)], at(0));
        cloud.on_reading(device, "temperature", 45.0, at(10));
        assert_eq!(cloud.on_reading(device, "temperature", 20.0, at(20)).len(), 1);
        assert!(cloud.recently_resolved(at(30)).is_empty());
    }

    #[test]
    fn a_copy_raised_after_a_restart_joins_the_alert_still_open() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let rule = threshold_rule(farm, 0, 0);
        let mut before = Evaluator::new(farm, Origin::Cloud);
        before.set_rules(vec![rule.clone()], at(0));
        let open = before.on_reading(device, "temperature", 45.0, at(10)).remove(0);
        // The evaluator restarts while the condition holds: it sees the condition begin later.
        let mut after = Evaluator::new(farm, Origin::Cloud);
        after.set_rules(vec![rule], at(0));
        let mut again = after.on_reading(device, "temperature", 46.0, at(20)).remove(0);
        assert_ne!(again.id, open.id);
        assert!(again.join(&open));
        assert_eq!((again.id, again.open_time), (open.id, open.open_time));
        let mut resolved = open.clone();
        resolved.state = AlertState::Resolved;
        let mut later = after.on_reading(device, "temperature", 10.0, at(30)).remove(0);
        later.state = AlertState::Open;
        assert!(!later.clone().join(&resolved), "a resolved alert is over");
        let mut other_device = again.clone();
        other_device.device_id = Some(Uuid::now_v7());
        other_device.id = Uuid::now_v7();
        assert!(!other_device.join(&open));
        // Disease alerts are events: a later one never joins an earlier one, with evidence or without (the agent's).
        let mut disease = open.clone();
        disease.metric = DISEASE_METRIC.into();
        let mut later_disease = disease.clone();
        later_disease.id = Uuid::now_v7();
        later_disease.open_time = at(40);
        assert!(!later_disease.join(&disease));
    }

    /// A deleted rule's open alerts are over: nothing would ever evaluate them again.
    #[test]
    fn deleting_a_rule_resolves_its_open_alerts() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let (hot, other) = (threshold_rule(farm, 0, 0), threshold_rule(farm, 0, 0));
        let mut evaluator = Evaluator::new(farm, Origin::Edge);
        assert!(evaluator.set_rules(vec![hot.clone(), other.clone()], at(0)).is_empty());
        let raised = evaluator.on_reading(device, "temperature", 45.0, at(10));
        assert_eq!(raised.len(), 2);
        assert!(evaluator.set_rules(vec![hot.clone(), other.clone()], at(20)).is_empty(), "the same rules: kept");
        let ended = evaluator.set_rules(vec![hot.clone()], at(30));
        assert_eq!(ended.len(), 1);
        let ended = &ended[0];
        assert_eq!((ended.rule_id, ended.state), (other.id, AlertState::Resolved));
        assert_eq!((ended.resolve_time, ended.resolved_by_hand), (Some(at(30)), true));
        assert!(raised.iter().any(|alert| alert.id == ended.id));
        assert_eq!(evaluator.open_alerts().len(), 1, "the kept rule's alert stays open");
        assert!(
            evaluator.recently_resolved(at(40)).iter().any(|alert| alert.id == ended.id),
            "sent again after a restart"
        );
        assert!(evaluator.set_rules(vec![hot], at(50)).is_empty(), "ended once");
    }

    #[test]
    fn a_silent_device_raises_one_alert_from_its_last_reading_and_clears_when_heard() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let mut rule = threshold_rule(farm, 0, 0);
        rule.metric = None;
        rule.condition = Condition::DeviceSilent { silent_for: Duration::from_secs(60) };
        let mut evaluator = Evaluator::new(farm, Origin::Edge);
        evaluator.set_rules(vec![rule.clone()], at(0));
        evaluator.on_heard(device, at(5));
        assert!(evaluator.on_tick(at(60)).is_empty());
        let silent = evaluator.on_tick(at(66));
        assert_eq!(silent.len(), 1);
        assert_eq!(silent[0].id, alert_id(rule.id, Some(device), "", at(65)));
        assert!(evaluator.on_tick(at(90)).is_empty(), "one alert per silence");
        let heard = evaluator.on_heard(device, at(100));
        assert_eq!(heard[0].state, AlertState::Resolved);
    }

    /// A sensor whose clock runs two minutes behind: its silence is judged by when its readings arrive.
    #[test]
    fn silence_follows_arrivals_not_the_times_a_sensor_s_clock_gives() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let mut rule = threshold_rule(farm, 0, 0);
        rule.metric = None;
        rule.condition = Condition::DeviceSilent { silent_for: Duration::from_secs(60) };
        let mut evaluator = Evaluator::new(farm, Origin::Edge);
        let _ = evaluator.set_rules(vec![rule.clone()], at(0));
        let heard = |evaluator: &mut Evaluator, arrival: u64| {
            let mut changed = evaluator.on_heard(device, at(arrival));
            changed.extend(evaluator.on_reading(device, "temperature", 20.0, at(arrival - 120)));
            changed
        };
        assert!(heard(&mut evaluator, 1000).is_empty());
        assert!(evaluator.on_tick(at(1030)).is_empty(), "heard 30 s ago");
        let silent = evaluator.on_tick(at(1070));
        assert_eq!(silent.len(), 1, "a minute after it was last heard");
        assert_eq!(silent[0].id, alert_id(rule.id, Some(device), "", at(1060)));
        let back = heard(&mut evaluator, 1080);
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].id, back[0].state), (silent[0].id, AlertState::Resolved), "heard again: over");
        assert!(evaluator.on_tick(at(1100)).is_empty());
        // Readings from a clock ahead do not postpone the silence.
        assert!(evaluator.on_reading(device, "temperature", 20.0, at(5000)).is_empty());
        assert_eq!(evaluator.on_tick(at(1141)).len(), 1, "a minute after it was last heard (1080)");
    }

    #[test]
    fn a_silence_rule_that_names_a_metric_is_refused_and_a_stored_one_still_clears() {
        let farm = Uuid::now_v7();
        let request = pb::Rule {
            farm_id: farm.to_string(),
            name: "quiet".into(),
            severity: 2,
            metric: "temperature".into(),
            condition: Some(pb::rule::Condition::DeviceSilent(pb::DeviceSilentCondition {
                silent_for: Some(pbjson_types::Duration { seconds: 60, nanos: 0 }),
            })),
            ..Default::default()
        };
        let refused = Rule::from_create_request(&request, Uuid::now_v7(), at(0)).unwrap_err();
        assert!(refused.to_string().starts_with("rule.metric:"), "{refused}");

        // A rule stored with a metric before that still reaches the agent, and its alert clears when the device is
        // heard again.
        let device = Uuid::now_v7();
        let mut rule = threshold_rule(farm, 0, 0);
        rule.condition = Condition::DeviceSilent { silent_for: Duration::from_secs(60) };
        assert_eq!(Rule::from_pushed(&rule.to_proto()).unwrap(), rule);
        let mut evaluator = Evaluator::new(farm, Origin::Edge);
        evaluator.set_rules(vec![rule], at(0));
        evaluator.on_heard(device, at(5));
        assert_eq!(evaluator.on_tick(at(66)).len(), 1);
        let heard = evaluator.on_heard(device, at(100));
        assert_eq!(heard.first().map(|alert| alert.state), Some(AlertState::Resolved), "{heard:?}");
    }

    #[test]
    fn a_farm_wide_silence_rule_watches_the_registry_s_sensors_even_unheard_ones() {
        let farm = Uuid::now_v7();
        let (heard, unheard, gone) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut rule = threshold_rule(farm, 0, 0);
        rule.metric = None;
        rule.condition = Condition::DeviceSilent { silent_for: Duration::from_secs(60) };
        let mut evaluator = Evaluator::new(farm, Origin::Edge);
        evaluator.set_rules(vec![rule.clone()], at(0));
        evaluator.on_heard(gone, at(0));
        evaluator.set_devices(&[heard, unheard], at(10));
        evaluator.on_heard(heard, at(50));
        let silent = evaluator.on_tick(at(75));
        assert_eq!(
            silent.iter().map(|alert| alert.device_id).collect::<Vec<_>>(),
            vec![Some(unheard)],
            "silent since it was listed; the heard one is not, the decommissioned one is forgotten"
        );
        assert_eq!(silent[0].id, alert_id(rule.id, Some(unheard), "", at(70)));
    }

    #[test]
    fn rate_of_change_and_verdicts() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let mut rate = threshold_rule(farm, 0, 0);
        rate.condition = Condition::RateOfChange { max_change: 5.0, window: Duration::from_secs(60) };
        let mut disease = threshold_rule(farm, 0, 0);
        disease.metric = None;
        disease.condition =
            Condition::ModelVerdict { disease_labels: vec![], min_confidence: 0.8, on_sensor_anomaly: true };
        let mut evaluator = Evaluator::new(farm, Origin::Cloud);
        evaluator.set_rules(vec![rate, disease.clone()], at(0));
        assert!(evaluator.on_reading(device, "temperature", 20.0, at(0)).is_empty());
        assert!(evaluator.on_reading(device, "temperature", 24.0, at(30)).is_empty());
        assert_eq!(evaluator.on_reading(device, "temperature", 26.0, at(50)).len(), 1, "6 within 60 s");
        let verdict = |label: &str, confidence: f64, healthy: bool, second: u64| DiseaseVerdict {
            camera: device,
            image_id: Some(Uuid::now_v7()),
            label: label.into(),
            confidence,
            healthy,
            capture_time: at(second),
        };
        assert!(evaluator.on_disease(&verdict("Apple___Black_rot", 0.5, false, 100)).is_empty(), "not sure enough");
        let sick = evaluator.on_disease(&verdict("Apple___Black_rot", 0.95, false, 110));
        assert_eq!(sick.len(), 1);
        assert!(sick[0].evidence_image_id.is_some());
        let healed = evaluator.on_disease(&verdict("Apple___healthy", 0.99, true, 120));
        assert_eq!(healed[0].state, AlertState::Resolved);
        // Diagnoses are events: the same disease later (past the cooldown) is a new alert, even unhealed.
        let monday = evaluator.on_disease(&verdict("Apple___scab", 0.9, false, 1000));
        let friday = evaluator.on_disease(&verdict("Apple___scab", 0.9, false, 5000));
        assert_eq!((monday.len(), friday.len()), (1, 1));
        assert_ne!(monday[0].id, friday[0].id);
        let anomaly = evaluator.on_anomaly(&AnomalyVerdict {
            device,
            metric: "temperature".into(),
            start_time: at(200),
            end_time: at(260),
            peak_value: 80.0,
            peak_score: 9.0,
        });
        assert_eq!(anomaly.len(), 1);
        assert_eq!(anomaly[0].id, alert_id(disease.id, Some(device), "temperature", at(200)));
    }

    #[test]
    fn after_a_resolution_by_hand_the_condition_s_return_is_a_new_alert() {
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let rule = threshold_rule(farm, 0, 600);
        let mut evaluator = Evaluator::new(farm, Origin::Edge);
        evaluator.set_rules(vec![rule.clone()], at(0));
        let opened = evaluator.on_reading(device, "temperature", 45.0, at(10));
        assert_eq!(opened.len(), 1);
        assert!(evaluator.on_reading(device, "temperature", 30.0, at(20)).is_empty(), "clear, within the cooldown");

        let resolved = |alert: &Alert| Alert {
            state: AlertState::Resolved,
            resolve_time: Some(at(30)),
            resolved_by_hand: true,
            ..alert.clone()
        };
        assert!(evaluator.resolved_by_hand(&resolved(&opened[0])));
        assert!(evaluator.open_alerts().is_empty());
        assert!(evaluator.on_reading(device, "temperature", 46.0, at(25)).is_empty(), "measured before: not evaluated");
        let again = evaluator.on_reading(device, "temperature", 47.0, at(40));
        assert_eq!(again.len(), 1, "back within the cooldown: a new alert, not a repeat of the resolved one");
        assert_ne!(again[0].id, opened[0].id);
        assert_eq!((again[0].state, again[0].count), (AlertState::Open, 1));
        assert_eq!(again[0].id, alert_id(rule.id, Some(device), "temperature", at(40)));
        let other = Alert { id: Uuid::now_v7(), rule_id: Uuid::now_v7(), ..resolved(&again[0]) };
        assert!(!evaluator.resolved_by_hand(&other), "an alert it does not hold changes nothing");
        // The same condition under another id (this evaluator's copy began later than the stored alert it was
        // joined to): begun no later than the resolution, it ends too.
        let stored = Alert { id: Uuid::now_v7(), resolve_time: Some(at(41)), ..resolved(&again[0]) };
        assert!(evaluator.resolved_by_hand(&stored));
        assert!(evaluator.open_alerts().is_empty());
        let later = Alert { id: Uuid::now_v7(), resolve_time: Some(at(39)), ..resolved(&again[0]) };
        let third = evaluator.on_reading(device, "temperature", 48.0, at(50));
        assert_eq!(third.len(), 1);
        assert!(!evaluator.resolved_by_hand(&later), "a resolution before the alert began is not about it");
    }

    #[test]
    fn who_resolved_an_alert_follows_the_resolution_that_stands() {
        let (farm, device) = (Uuid::now_v7(), Uuid::now_v7());
        let rule = threshold_rule(farm, 0, 600);
        let mut evaluator = Evaluator::new(farm, Origin::Edge);
        evaluator.set_rules(vec![rule], at(0));
        let open = evaluator.on_reading(device, "temperature", 45.0, at(10)).remove(0);
        let by_hand =
            Alert { state: AlertState::Resolved, resolve_time: Some(at(20)), resolved_by_hand: true, ..open.clone() };
        let cleared = Alert { state: AlertState::Resolved, resolve_time: Some(at(30)), ..open.clone() };
        let mut stored = by_hand.clone();
        assert!(!stored.merge(&cleared), "the later automatic resolution changes nothing");
        assert!(stored.resolved_by_hand);
        let mut stored = cleared.clone();
        assert!(stored.merge(&by_hand));
        assert_eq!((stored.resolve_time, stored.resolved_by_hand), (Some(at(20)), true));
        assert!(stored.to_proto().resolved_by_hand);
    }

    /// The same photo's diagnosis announced twice (diagnosed again late) is not a repeat of itself.
    #[test]
    fn a_photo_announced_again_is_not_counted_twice() {
        let (farm, camera) = (Uuid::now_v7(), Uuid::now_v7());
        let mut rule = threshold_rule(farm, 0, 600);
        rule.condition =
            Condition::ModelVerdict { disease_labels: vec![], min_confidence: 0.8, on_sensor_anomaly: false };
        let mut evaluator = Evaluator::new(farm, Origin::Cloud);
        let _ = evaluator.set_rules(vec![rule], at(0));
        let photo = |taken: u64| DiseaseVerdict {
            camera,
            image_id: Some(Uuid::now_v7()),
            healthy: false,
            label: "Apple___Black_rot".into(),
            confidence: 0.95,
            capture_time: at(taken),
        };
        let first = photo(100);
        assert_eq!(evaluator.on_disease(&first).remove(0).count, 1);
        assert!(evaluator.on_disease(&first).is_empty(), "the same photo again");
        assert_eq!(evaluator.on_disease(&photo(200)).remove(0).count, 2, "a later photo within the cooldown");
    }

    /// A farm's anomaly rule (a cooldown of 600 s) and an evaluator that holds it; the device the tests use.
    fn anomaly_rule_and_evaluator() -> (Rule, Evaluator, Uuid) {
        let (farm, device) = (Uuid::now_v7(), Uuid::now_v7());
        let mut rule = threshold_rule(farm, 0, 600);
        rule.condition =
            Condition::ModelVerdict { disease_labels: vec![], min_confidence: 0.8, on_sensor_anomaly: true };
        let mut evaluator = Evaluator::new(farm, Origin::Cloud);
        let _ = evaluator.set_rules(vec![rule.clone()], at(0));
        (rule, evaluator, device)
    }

    /// An anomalous stretch of `device`'s temperature from `start` to `end` (seconds, see `at`).
    fn stretch_of(device: Uuid, start: u64, end: u64) -> AnomalyVerdict {
        AnomalyVerdict {
            device,
            metric: "temperature".into(),
            start_time: at(start),
            end_time: at(end),
            peak_value: 80.0,
            peak_score: 9.0,
        }
    }

    /// Anomalous stretches are events: a stretch reported again as it grows is one alert; one that begins within
    /// the rule's cooldown after it is a repeat, counted; a later one is a new alert.
    #[test]
    fn anomalies_within_the_cooldown_fold_into_one_alert() {
        let (rule, mut evaluator, device) = anomaly_rule_and_evaluator();
        let stretch = |start: u64, end: u64| stretch_of(device, start, end);
        let first = evaluator.on_anomaly(&stretch(200, 260)).remove(0);
        assert_eq!(first.id, alert_id(rule.id, Some(device), "temperature", at(200)));
        let grown = evaluator.on_anomaly(&stretch(200, 300)).remove(0);
        assert_eq!((grown.id, grown.count, grown.last_time), (first.id, 1, at(300)), "the same stretch, grown");
        assert!(evaluator.on_anomaly(&stretch(200, 300)).is_empty(), "reported again as it was: nothing new");
        let repeat = evaluator.on_anomaly(&stretch(500, 520)).remove(0);
        assert_eq!((repeat.id, repeat.count, repeat.last_time), (first.id, 2, at(520)), "within the cooldown");
        let later = evaluator.on_anomaly(&stretch(2000, 2010)).remove(0);
        assert_ne!(later.id, first.id, "past the cooldown: a new alert");
        assert_eq!(later.count, 1);
        // Resolved by hand: the next stretch, even within the cooldown, is a new alert.
        let mut resolved = later.clone();
        resolved.state = AlertState::Resolved;
        resolved.resolve_time = Some(at(2020));
        assert!(evaluator.resolved_by_hand(&resolved));
        let after = evaluator.on_anomaly(&stretch(2030, 2040)).remove(0);
        assert_ne!(after.id, later.id);
    }

    /// A stretch scored late, ended before the open alert began, is an alert of its own: not a repeat counted
    /// into the newer alert, and announcing it again changes nothing.
    #[test]
    fn an_anomaly_older_than_the_open_alert_is_an_alert_of_its_own() {
        let (rule, mut evaluator, device) = anomaly_rule_and_evaluator();
        let stretch = |start: u64, end: u64| stretch_of(device, start, end);
        let newer = evaluator.on_anomaly(&stretch(5000, 5060)).remove(0);
        let older = evaluator.on_anomaly(&stretch(4700, 4760));
        assert_eq!(older.len(), 1);
        assert_eq!(older[0].id, alert_id(rule.id, Some(device), "temperature", at(4700)), "named by its own start");
        assert_eq!(
            (older[0].count, older[0].last_time, older[0].evidence_window),
            (1, at(4760), Some((at(4700), at(4760))))
        );
        assert_eq!(evaluator.on_anomaly(&stretch(4700, 4760)), older, "announced again: the same alert, as it was");
        // The newer alert is untouched and still the one that repeats fold into.
        let repeat = evaluator.on_anomaly(&stretch(5200, 5210)).remove(0);
        assert_eq!((repeat.id, repeat.count, repeat.last_time), (newer.id, 2, at(5210)));
    }

    #[test]
    fn a_verdict_rule_s_metric_picks_anomalies_not_diagnoses() {
        let (farm, camera) = (Uuid::now_v7(), Uuid::now_v7());
        let mut rule = threshold_rule(farm, 0, 0);
        rule.condition =
            Condition::ModelVerdict { disease_labels: vec![], min_confidence: 0.8, on_sensor_anomaly: true };
        let mut evaluator = Evaluator::new(farm, Origin::Cloud);
        evaluator.set_rules(vec![rule], at(0));
        let sick = evaluator.on_disease(&DiseaseVerdict {
            camera,
            image_id: Some(Uuid::now_v7()),
            label: "Apple___Black_rot".into(),
            confidence: 0.95,
            healthy: false,
            capture_time: at(10),
        });
        assert_eq!(sick.len(), 1, "a diagnosis has no metric to match");
        let anomaly = |metric: &str| AnomalyVerdict {
            device: camera,
            metric: metric.into(),
            start_time: at(200),
            end_time: at(260),
            peak_value: 80.0,
            peak_score: 9.0,
        };
        assert!(evaluator.on_anomaly(&anomaly("humidity")).is_empty(), "another metric's anomaly");
        assert_eq!(evaluator.on_anomaly(&anomaly("temperature")).len(), 1);
    }

    #[test]
    fn bad_rules_are_refused_with_the_field_named() {
        let farm = Uuid::now_v7();
        let good = pb::Rule {
            farm_id: farm.to_string(),
            name: "hot".into(),
            severity: 3,
            metric: "temperature".into(),
            condition: Some(pb::rule::Condition::Threshold(pb::ThresholdCondition {
                direction: 1,
                limit: 40.0,
                for_duration: None,
            })),
            ..Default::default()
        };
        let rule = Rule::from_request(&good, Uuid::now_v7(), at(0)).unwrap();
        assert_eq!(Rule::from_pushed(&rule.to_proto()).unwrap(), rule);
        let refusal = |change: &dyn Fn(&mut pb::Rule)| {
            let mut bad = good.clone();
            change(&mut bad);
            Rule::from_request(&bad, Uuid::now_v7(), at(0)).unwrap_err().to_string()
        };
        assert!(refusal(&|r| r.metric = "Temp-C".into()).starts_with("rule.metric:"));
        assert!(refusal(&|r| r.metric = String::new()).starts_with("rule.metric:"));
        assert!(refusal(&|r| r.severity = 0).starts_with("rule.severity:"));
        assert!(refusal(&|r| r.name = String::new()).starts_with("rule.name:"));
        assert!(refusal(&|r| r.condition = None).starts_with("rule.condition:"));
        assert!(refusal(&|r| r.device_id = "nope".into()).starts_with("rule.device_id:"));
        assert!(
            refusal(&|r| r.cooldown = Some(pbjson_types::Duration { seconds: 400 * 24 * 3600, nanos: 0 }))
                .starts_with("rule.cooldown:")
        );
    }
}
