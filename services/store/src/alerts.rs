//! Alert storage: each farm's rules (with a version that moves on every change, so edge agents know when to take a
//! new snapshot), the alerts they raised, the append-only log of alert events that live streams and webhooks read
//! from (its sequence number is the streams' resume cursor), and the webhooks with their delivery state. Alerts are
//! written by merging ([`Alert::merge`]): the edge's and the cloud's copies of one alert are one row. Every backend
//! implements [`AlertStore`] and passes the same suite (`tests/alert_suite.rs`).
//!
//! Event numbers are gapless in commit order: a reader that has seen event N never later finds a new event below N
//! (on PostgreSQL, writers of events take a lock for that), so a stream resuming after N misses nothing. Retention
//! deletes the log's oldest events up to a horizon; a stream cannot resume from before it.

use std::time::SystemTime;

use uuid::Uuid;

use smartfarm_core::Result;
use smartfarm_core::rules::{Alert, AlertState, Rule, Severity};

pub use smartfarm_core::rules::AlertEventKind;

/// One entry of the alert event log.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertEvent {
    /// Position in the log: increases by one per event, from 1.
    pub sequence: u64,
    pub kind: AlertEventKind,
    /// The alert as it was right after the event.
    pub alert: Alert,
}

/// What one step of alert retention deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlertRetention {
    pub events: u64,
    pub alerts: u64,
}

/// Where one step of retention cuts the event log: after the events that were in it at the newest note older than
/// the retention (`marked`), but not past the first event a webhook is still to be given (`webhooks` is the one
/// before it; a webhook holds back only events of its farm and severity), never at the newest event (`newest`), and
/// at most `limit` past the current `horizon`. `None` when nothing is to be deleted. Every backend decides through
/// this.
pub(crate) fn retention_cut(
    horizon: u64,
    marked: Option<u64>,
    webhooks: Option<u64>,
    newest: u64,
    limit: usize,
) -> Option<u64> {
    let cut = marked?.min(webhooks.unwrap_or(u64::MAX)).min(newest.saturating_sub(1)).min(horizon + limit as u64);
    (cut > horizon).then_some(cut)
}

/// Which alerts `list_alerts` returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AlertFilter {
    pub farm_id: Option<Uuid>,
    /// Any of these states; empty: every state.
    pub states: Vec<AlertState>,
    /// At this severity or higher; `None`: every severity.
    pub min_severity: Option<Severity>,
    /// Opened at or after this time.
    pub opened_from: Option<SystemTime>,
    /// Opened before this time.
    pub opened_before: Option<SystemTime>,
}

/// Whether a webhook delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookState {
    Healthy = 1,
    /// Deliveries failed after every retry; attempts go on.
    Failing = 2,
}

/// A URL that receives a farm's alerts.
#[derive(Clone, Debug, PartialEq)]
pub struct Webhook {
    pub id: Uuid,
    pub farm_id: Uuid,
    pub url: String,
    pub min_severity: Severity,
    /// The HMAC-SHA256 key that signs each body.
    pub secret: String,
    pub state: WebhookState,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub last_success_time: Option<SystemTime>,
    pub create_time: SystemTime,
    /// The last alert event this webhook has been given (delivered, or passed over by its filters); deliveries
    /// resume after it, so none is skipped through restarts.
    pub delivered_sequence: u64,
}

/// The outcome of one delivery attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum DeliveryOutcome {
    /// Every event up to `sequence` is delivered (or not the webhook's): the cursor moves, failures reset.
    Delivered { sequence: u64, at: SystemTime },
    /// An attempt failed: the failure count grows, `error` is kept, and the state becomes failing when
    /// `mark_failing` says so. The cursor stays.
    Failed { error: String, mark_failing: bool },
}

#[async_trait::async_trait]
pub trait AlertStore: Send + Sync + 'static {
    /// Stores a new rule and moves its farm's rules version on; returns the new version. The farm must exist
    /// (`NotFound`).
    async fn create_rule(&self, rule: &Rule) -> Result<u64>;
    /// One rule, or `NotFound`.
    async fn get_rule(&self, id: Uuid) -> Result<Rule>;
    /// A farm's rules, oldest first (by id, which is a v7 UUID), after `after`, at most `limit`.
    async fn list_rules(&self, farm_id: Uuid, after: Option<Uuid>, limit: usize) -> Result<Vec<Rule>>;
    /// Deletes a rule (`NotFound` if absent) and moves its farm's rules version on; returns the deleted rule. Its
    /// alerts stay.
    async fn delete_rule(&self, id: Uuid) -> Result<Rule>;
    /// Every rule of a farm with the farm's rules version (0 and none when the farm never had rules).
    async fn rules_snapshot(&self, farm_id: Uuid) -> Result<(u64, Vec<Rule>)>;

    /// Merges `alert` into the stored copy with its id (inserting it when new) and, when that changed anything,
    /// appends an event; returns the event, or `None` when the alert was already known as it is.
    async fn record_alert(&self, alert: &Alert) -> Result<Option<AlertEvent>>;
    /// [`AlertStore::record_alert`] for several alerts, in order, at once where the backend can (one transaction for
    /// a burst); one result per alert (a refused alert does not keep the others out).
    async fn record_alerts(&self, batch: &[Alert]) -> Vec<Result<Option<AlertEvent>>> {
        let mut results = Vec::with_capacity(batch.len());
        for alert in batch {
            results.push(self.record_alert(alert).await);
        }
        results
    }
    /// One alert, or `NotFound`.
    async fn get_alert(&self, id: Uuid) -> Result<Alert>;
    /// The alerts of a rule on a device (`None`: alerts of no device) that are not resolved, oldest first.
    async fn unresolved_alerts_of(&self, rule_id: Uuid, device_id: Option<Uuid>) -> Result<Vec<Alert>>;
    /// Acknowledges (`Acknowledged`) or resolves (`Resolved`) an alert by hand at `at`, appending an event. Returns
    /// the alert and the event; no event when the alert was already in that state or past it (acknowledging a
    /// resolved alert changes nothing). `NotFound` if absent.
    async fn set_alert_state(&self, id: Uuid, state: AlertState, at: SystemTime)
    -> Result<(Alert, Option<AlertEvent>)>;
    /// Alerts matching `filter`, newest first by (open time, id), strictly after the `after` key, at most `limit`.
    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        after: Option<(SystemTime, Uuid)>,
        limit: usize,
    ) -> Result<Vec<Alert>>;
    /// Events after `sequence`, oldest first, of one farm (or every farm) at `min_severity` or higher, at most
    /// `limit`.
    async fn alert_events_after(
        &self,
        sequence: u64,
        farm_id: Option<Uuid>,
        min_severity: Severity,
        limit: usize,
    ) -> Result<Vec<AlertEvent>>;
    /// The sequence of the newest event (0 when there is none).
    async fn last_alert_event(&self) -> Result<u64>;
    /// One step of retention at `now`. It notes where the event log stands (once per `now`). Then it deletes, oldest
    /// first and at most `limit` of each, the events that were in the log at the newest note taken before `before`,
    /// and the resolved alerts opened before `before`. Events are aged by the notes, so retention run hourly ages
    /// them to the hour. It never deletes the newest event (numbering goes on from it) nor one that a webhook is still
    /// to be given.
    async fn apply_alert_retention(&self, now: SystemTime, before: SystemTime, limit: usize) -> Result<AlertRetention>;
    /// The newest event retention deleted (0 when none was): the log holds the events after it.
    async fn alert_event_horizon(&self) -> Result<u64>;

    /// Stores a new webhook (its `delivered_sequence` is where its deliveries start). The farm must exist.
    async fn create_webhook(&self, webhook: &Webhook) -> Result<()>;
    /// One webhook, or `NotFound`.
    async fn get_webhook(&self, id: Uuid) -> Result<Webhook>;
    /// A farm's webhooks (every farm's when `None`), oldest first by id, after `after`, at most `limit`.
    async fn list_webhooks(&self, farm_id: Option<Uuid>, after: Option<Uuid>, limit: usize) -> Result<Vec<Webhook>>;
    /// Deletes a webhook, or `NotFound`.
    async fn delete_webhook(&self, id: Uuid) -> Result<()>;
    /// Makes `owner` (a process) the webhook's deliverer for `lease` from now, if nobody else holds it (a lease
    /// that ran out is taken over; the holder renews its own). Now is the database's clock where replicas share one
    /// (PostgreSQL), so replicas whose clocks differ still agree on when a lease ran out. Returns whether `owner`
    /// holds it. `NotFound` if absent.
    async fn lease_webhook(&self, id: Uuid, owner: Uuid, lease: std::time::Duration) -> Result<bool>;
    /// Records a delivery attempt; returns the webhook after it (`NotFound` if it was deleted meanwhile).
    async fn record_delivery(&self, id: Uuid, outcome: &DeliveryOutcome) -> Result<Webhook>;
}

/// What merging `incoming` into the stored copy of its alert (`None`: there is none yet) changes: the event and the
/// alert after it, or `None` when nothing changes. Every backend decides through this, so they merge alike. A copy
/// that names another farm or rule than the stored alert is refused: it is not a copy of it (an agent cannot touch
/// another farm's alert by sending its id).
pub(crate) fn merge_change(stored: Option<&Alert>, incoming: &Alert) -> Result<Option<(AlertEventKind, Alert)>> {
    let Some(stored) = stored else { return Ok(Some((AlertEventKind::Opened, incoming.clone()))) };
    if stored.farm_id != incoming.farm_id || stored.rule_id != incoming.rule_id {
        return Err(smartfarm_core::Error::PermissionDenied(format!(
            "alert {} belongs to another farm or rule",
            incoming.id
        )));
    }
    let mut merged = stored.clone();
    Ok(merged.merge(incoming).then(|| (AlertEventKind::of_change(Some(stored), &merged), merged)))
}

/// What acknowledging or resolving `alert` by hand at `at` changes, or `None` when it is in that state or past it
/// already. A time the alert already carries is kept: the earliest one stays, as in a merge.
pub(crate) fn state_change(
    alert: &Alert,
    state: AlertState,
    at: SystemTime,
) -> Result<Option<(AlertEventKind, Alert)>> {
    if state == AlertState::Open {
        return Err(smartfarm_core::Error::invalid("state", "alerts are only acknowledged or resolved by hand"));
    }
    if alert.state >= state {
        return Ok(None);
    }
    let mut changed = alert.clone();
    changed.state = state;
    if state == AlertState::Acknowledged {
        changed.acknowledge_time.get_or_insert(at);
    } else {
        changed.resolve_time.get_or_insert(at);
        changed.resolved_by_hand = true;
    }
    Ok(Some((AlertEventKind::of_change(Some(alert), &changed), changed)))
}
