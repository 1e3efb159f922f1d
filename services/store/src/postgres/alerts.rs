//! [`AlertStore`] on PostgreSQL. Every transaction that appends an alert event holds [`ALERT_EVENT_LOCK_KEY`] from
//! before it reads the alert until it commits: alert writers take turns, each event is numbered one past the last
//! committed one, and events commit in sequence order, so a reader that has seen event N never later finds one
//! below N.

use std::time::SystemTime;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use smartfarm_core::rules::{Alert, AlertState, Rule, Severity};
use smartfarm_core::{Error, Result};

use super::{PostgresStore, is_foreign_key_violation, is_unique_violation, pg_error, sql_count, stored_number};
use crate::alerts::{
    self, AlertEvent, AlertEventKind, AlertFilter, AlertStore, DeliveryOutcome, Webhook, WebhookState,
};

/// Advisory lock key held by every transaction that appends an alert event.
const ALERT_EVENT_LOCK_KEY: i64 = 0x736d_6661_616c_6576; // "smfaalev"

const WEBHOOK_COLUMNS: &str = "id, farm_id, url, min_severity, secret, state, consecutive_failures, last_error, \
                               last_success_time, create_time, delivered_sequence";

fn rule_json(rule: &Rule) -> Result<serde_json::Value> {
    serde_json::to_value(rule).map_err(|error| Error::internal("encode rule", error))
}

fn parse_rule(value: serde_json::Value) -> Result<Rule> {
    serde_json::from_value(value).map_err(|error| Error::internal("rules.definition is not a rule", error))
}

fn alert_json(alert: &Alert) -> Result<serde_json::Value> {
    serde_json::to_value(alert).map_err(|error| Error::internal("encode alert", error))
}

fn parse_alert(value: serde_json::Value) -> Result<Alert> {
    serde_json::from_value(value).map_err(|error| Error::internal("stored alert is not an alert", error))
}

async fn load_alert(client: &impl GenericClient, id: Uuid) -> Result<Option<Alert>> {
    let row =
        client.query_opt("SELECT body FROM alerts WHERE id = $1", &[&id]).await.map_err(pg_error("read alert"))?;
    row.map(|row| parse_alert(row.get(0))).transpose()
}

/// Moves a farm's rules version on and returns the new one; `NotFound` when the farm does not exist. The farm's row
/// stays locked until the transaction ends, so changes to one farm's rules take turns.
async fn bump_rules_version(client: &impl GenericClient, farm_id: Uuid) -> Result<u64> {
    let row = client
        .query_opt(
            "UPDATE farms SET rules_version = rules_version + 1 WHERE id = $1 RETURNING rules_version",
            &[&farm_id],
        )
        .await
        .map_err(pg_error("bump rules version"))?;
    row.map(|row| row.get::<_, i64>(0) as u64).ok_or_else(|| Error::not_found("farm", farm_id))
}

fn event_from_row(row: &Row) -> Result<AlertEvent> {
    Ok(AlertEvent {
        sequence: row.get::<_, i64>(0) as u64,
        kind: stored_number("alert_events.kind", row.get(1), AlertEventKind::from_number)?,
        alert: parse_alert(row.get(2))?,
    })
}

fn webhook_state(value: i64) -> Option<WebhookState> {
    match value {
        1 => Some(WebhookState::Healthy),
        2 => Some(WebhookState::Failing),
        _ => None,
    }
}

fn webhook_from_row(row: &Row) -> Result<Webhook> {
    Ok(Webhook {
        id: row.get(0),
        farm_id: row.get(1),
        url: row.get(2),
        min_severity: stored_number("webhooks.min_severity", row.get(3), Severity::from_number)?,
        secret: row.get(4),
        state: stored_number("webhooks.state", row.get(5), webhook_state)?,
        consecutive_failures: u32::try_from(row.get::<_, i64>(6)).unwrap_or(u32::MAX),
        last_error: row.get(7),
        last_success_time: row.get(8),
        create_time: row.get(9),
        delivered_sequence: row.get::<_, i64>(10) as u64,
    })
}

impl PostgresStore {
    /// Applies `change` to the stored copy of alert `id` (`None` when there is none) and, when it changes anything,
    /// writes the alert and appends its event in one transaction. Returns the alert as stored afterwards and the
    /// event. Whether anything changes is first decided without the event lock, so repeats of known alerts (an edge
    /// agent replaying its spool) do not queue behind writers; a change is decided again under the lock.
    async fn change_alert<F>(&self, id: Uuid, change: F) -> Result<(Option<Alert>, Option<AlertEvent>)>
    where
        F: Fn(Option<&Alert>) -> Result<Option<(AlertEventKind, Alert)>>,
    {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin alert change"))?;
        let stored = load_alert(&transaction, id).await?;
        if change(stored.as_ref())?.is_none() {
            return Ok((stored, None));
        }
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&ALERT_EVENT_LOCK_KEY])
            .await
            .map_err(pg_error("take the alert event lock"))?;
        let changed = change_alert_in(&transaction, id, change).await?;
        if changed.1.is_some() {
            transaction.commit().await.map_err(pg_error("commit alert change"))?;
        }
        Ok(changed)
    }

    /// Records several alerts in one transaction under the event lock (one commit for a burst); any failure undoes
    /// them all.
    async fn record_alerts_at_once(&self, batch: &[Alert]) -> Result<Vec<Option<AlertEvent>>> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin alert changes"))?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&ALERT_EVENT_LOCK_KEY])
            .await
            .map_err(pg_error("take the alert event lock"))?;
        let mut events = Vec::with_capacity(batch.len());
        for alert in batch {
            let (_, event) =
                change_alert_in(&transaction, alert.id, |stored| alerts::merge_change(stored, alert)).await?;
            events.push(event);
        }
        transaction.commit().await.map_err(pg_error("commit alert changes"))?;
        Ok(events)
    }
}

/// Applies `change` to alert `id` within a transaction that holds the event lock and that the caller commits.
async fn change_alert_in<F>(
    transaction: &deadpool_postgres::Transaction<'_>,
    id: Uuid,
    change: F,
) -> Result<(Option<Alert>, Option<AlertEvent>)>
where
    F: Fn(Option<&Alert>) -> Result<Option<(AlertEventKind, Alert)>>,
{
    // Read committed: this statement sees every change committed by the lock's previous holders.
    let stored = load_alert(transaction, id).await?;
    let Some((kind, alert)) = change(stored.as_ref())? else { return Ok((stored, None)) };
    let body = alert_json(&alert)?;
    let (severity, state) = (alert.severity as i16, alert.state as i16);
    let columns: [&(dyn ToSql + Sync); 8] =
        [&alert.id, &alert.farm_id, &alert.rule_id, &alert.device_id, &severity, &state, &alert.open_time, &body];
    if stored.is_none() {
        transaction
            .execute(
                "INSERT INTO alerts (id, farm_id, rule_id, device_id, severity, state, open_time, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &columns,
            )
            .await
            .map_err(|error| {
                if is_foreign_key_violation(&error) {
                    Error::not_found("farm", alert.farm_id)
                } else {
                    pg_error("insert alert")(error)
                }
            })?;
    } else {
        transaction
            .execute(
                "UPDATE alerts SET farm_id = $2, rule_id = $3, device_id = $4, severity = $5, state = $6,
                                   open_time = $7, body = $8
                 WHERE id = $1",
                &columns,
            )
            .await
            .map_err(pg_error("update alert"))?;
    }
    let sequence: i64 = transaction
        .query_one(
            "INSERT INTO alert_events (sequence, farm_id, severity, kind, alert)
             SELECT COALESCE(MAX(sequence), 0) + 1, $1, $2, $3, $4 FROM alert_events
             RETURNING sequence",
            &[&alert.farm_id, &severity, &(kind as i16), &body],
        )
        .await
        .map_err(pg_error("append alert event"))?
        .get(0);
    let event = AlertEvent { sequence: sequence as u64, kind, alert: alert.clone() };
    Ok((Some(alert), Some(event)))
}

#[async_trait::async_trait]
impl AlertStore for PostgresStore {
    async fn create_rule(&self, rule: &Rule) -> Result<u64> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin rule creation"))?;
        let version = bump_rules_version(&transaction, rule.farm_id).await?;
        transaction
            .execute(
                "INSERT INTO rules (id, farm_id, create_time, definition) VALUES ($1, $2, $3, $4)",
                &[&rule.id, &rule.farm_id, &rule.create_time, &rule_json(rule)?],
            )
            .await
            .map_err(|error| {
                if is_unique_violation(&error) {
                    Error::AlreadyExists(format!("rule {} already exists", rule.id))
                } else {
                    pg_error("insert rule")(error)
                }
            })?;
        transaction.commit().await.map_err(pg_error("commit rule creation"))?;
        Ok(version)
    }

    async fn get_rule(&self, id: Uuid) -> Result<Rule> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT definition FROM rules WHERE id = $1", &[&id])
            .await
            .map_err(pg_error("read rule"))?;
        parse_rule(row.ok_or_else(|| Error::not_found("rule", id))?.get(0))
    }

    async fn list_rules(&self, farm_id: Uuid, after: Option<Uuid>, limit: usize) -> Result<Vec<Rule>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT definition FROM rules WHERE farm_id = $1 AND ($2::uuid IS NULL OR id > $2)
                 ORDER BY id LIMIT $3",
                &[&farm_id, &after, &sql_count(limit)],
            )
            .await
            .map_err(pg_error("list rules"))?;
        rows.iter().map(|row| parse_rule(row.get(0))).collect()
    }

    async fn delete_rule(&self, id: Uuid) -> Result<Rule> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin rule deletion"))?;
        let row = transaction
            .query_opt("DELETE FROM rules WHERE id = $1 RETURNING definition", &[&id])
            .await
            .map_err(pg_error("delete rule"))?;
        let rule = parse_rule(row.ok_or_else(|| Error::not_found("rule", id))?.get(0))?;
        bump_rules_version(&transaction, rule.farm_id).await?;
        transaction.commit().await.map_err(pg_error("commit rule deletion"))?;
        Ok(rule)
    }

    async fn rules_snapshot(&self, farm_id: Uuid) -> Result<(u64, Vec<Rule>)> {
        let client = self.client().await?;
        // One statement, so the version and the rules are of one moment.
        let rows = client
            .query(
                "SELECT farms.rules_version, rules.definition FROM farms
                 LEFT JOIN rules ON rules.farm_id = farms.id
                 WHERE farms.id = $1 ORDER BY rules.id",
                &[&farm_id],
            )
            .await
            .map_err(pg_error("read rules snapshot"))?;
        let version = rows.first().map_or(0, |row| row.get::<_, i64>(0) as u64);
        let rules = rows.iter().filter_map(|row| row.get::<_, Option<serde_json::Value>>(1)).map(parse_rule);
        Ok((version, rules.collect::<Result<Vec<_>>>()?))
    }

    async fn record_alerts(&self, batch: &[Alert]) -> Vec<Result<Option<AlertEvent>>> {
        match self.record_alerts_at_once(batch).await {
            Ok(events) => events.into_iter().map(Ok).collect(),
            // One of them is refused: each on its own, so the others are recorded.
            Err(_) => {
                let mut results = Vec::with_capacity(batch.len());
                for alert in batch {
                    results.push(self.record_alert(alert).await);
                }
                results
            }
        }
    }

    async fn record_alert(&self, alert: &Alert) -> Result<Option<AlertEvent>> {
        let (_, event) = self.change_alert(alert.id, |stored| alerts::merge_change(stored, alert)).await?;
        Ok(event)
    }

    async fn get_alert(&self, id: Uuid) -> Result<Alert> {
        let client = self.client().await?;
        load_alert(&client, id).await?.ok_or_else(|| Error::not_found("alert", id))
    }

    async fn unresolved_alerts_of(&self, rule_id: Uuid, device_id: Option<Uuid>) -> Result<Vec<Alert>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT body FROM alerts WHERE rule_id = $1 AND device_id IS NOT DISTINCT FROM $2 AND state < 3
                 ORDER BY open_time, id",
                &[&rule_id, &device_id],
            )
            .await
            .map_err(pg_error("read unresolved alerts"))?;
        rows.iter().map(|row| parse_alert(row.get(0))).collect()
    }

    async fn set_alert_state(
        &self,
        id: Uuid,
        state: AlertState,
        at: SystemTime,
    ) -> Result<(Alert, Option<AlertEvent>)> {
        let (alert, event) = self
            .change_alert(id, |stored| {
                let stored = stored.ok_or_else(|| Error::not_found("alert", id))?;
                alerts::state_change(stored, state, at)
            })
            .await?;
        Ok((alert.expect("the alert was found"), event))
    }

    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        after: Option<(SystemTime, Uuid)>,
        limit: usize,
    ) -> Result<Vec<Alert>> {
        let client = self.client().await?;
        let states: Vec<i16> = filter.states.iter().map(|state| *state as i16).collect();
        let min_severity = filter.min_severity.map_or(Severity::Info, |severity| severity) as i16;
        let (after_time, after_id) = (after.map(|(time, _)| time), after.map(|(_, id)| id));
        let limit = sql_count(limit);
        let params: [&(dyn ToSql + Sync); 8] = [
            &filter.farm_id,
            &states,
            &min_severity,
            &filter.opened_from,
            &filter.opened_before,
            &after_time,
            &after_id,
            &limit,
        ];
        let rows = client
            .query(
                "SELECT body FROM alerts
                 WHERE ($1::uuid IS NULL OR farm_id = $1)
                   AND (cardinality($2::smallint[]) = 0 OR state = ANY ($2))
                   AND severity >= $3
                   AND ($4::timestamptz IS NULL OR open_time >= $4)
                   AND ($5::timestamptz IS NULL OR open_time < $5)
                   AND ($6::timestamptz IS NULL OR (open_time, id) < ($6, $7::uuid))
                 ORDER BY open_time DESC, id DESC LIMIT $8",
                &params,
            )
            .await
            .map_err(pg_error("list alerts"))?;
        rows.iter().map(|row| parse_alert(row.get(0))).collect()
    }

    async fn alert_events_after(
        &self,
        sequence: u64,
        farm_id: Option<Uuid>,
        min_severity: Severity,
        limit: usize,
    ) -> Result<Vec<AlertEvent>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT sequence, kind, alert FROM alert_events
                 WHERE sequence > $1 AND ($2::uuid IS NULL OR farm_id = $2) AND severity >= $3
                 ORDER BY sequence LIMIT $4",
                &[&sql_count(sequence), &farm_id, &(min_severity as i16), &sql_count(limit)],
            )
            .await
            .map_err(pg_error("list alert events"))?;
        rows.iter().map(event_from_row).collect()
    }

    async fn last_alert_event(&self) -> Result<u64> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COALESCE(MAX(sequence), 0) FROM alert_events", &[])
            .await
            .map_err(pg_error("read the last alert event"))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn create_webhook(&self, webhook: &Webhook) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                &format!(
                    "INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                ),
                &[
                    &webhook.id,
                    &webhook.farm_id,
                    &webhook.url,
                    &(webhook.min_severity as i16),
                    &webhook.secret,
                    &(webhook.state as i16),
                    &i64::from(webhook.consecutive_failures),
                    &webhook.last_error,
                    &webhook.last_success_time,
                    &webhook.create_time,
                    &sql_count(webhook.delivered_sequence),
                ],
            )
            .await
            .map_err(|error| {
                if is_foreign_key_violation(&error) {
                    Error::not_found("farm", webhook.farm_id)
                } else if is_unique_violation(&error) {
                    Error::AlreadyExists(format!("webhook {} already exists", webhook.id))
                } else {
                    pg_error("insert webhook")(error)
                }
            })?;
        Ok(())
    }

    async fn get_webhook(&self, id: Uuid) -> Result<Webhook> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1"), &[&id])
            .await
            .map_err(pg_error("read webhook"))?;
        webhook_from_row(&row.ok_or_else(|| Error::not_found("webhook", id))?)
    }

    async fn list_webhooks(&self, farm_id: Option<Uuid>, after: Option<Uuid>, limit: usize) -> Result<Vec<Webhook>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks
                     WHERE ($1::uuid IS NULL OR farm_id = $1) AND ($2::uuid IS NULL OR id > $2)
                     ORDER BY id LIMIT $3"
                ),
                &[&farm_id, &after, &sql_count(limit)],
            )
            .await
            .map_err(pg_error("list webhooks"))?;
        rows.iter().map(webhook_from_row).collect()
    }

    async fn delete_webhook(&self, id: Uuid) -> Result<()> {
        let client = self.client().await?;
        let deleted =
            client.execute("DELETE FROM webhooks WHERE id = $1", &[&id]).await.map_err(pg_error("delete webhook"))?;
        if deleted == 0 {
            return Err(Error::not_found("webhook", id));
        }
        Ok(())
    }

    async fn lease_webhook(&self, id: Uuid, owner: Uuid, now: SystemTime, until: SystemTime) -> Result<bool> {
        let client = self.client().await?;
        let taken = client
            .execute(
                "UPDATE webhooks SET lease_owner = $2, lease_until = $4
                 WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until <= $3)",
                &[&id, &owner, &now, &until],
            )
            .await
            .map_err(pg_error("lease webhook"))?;
        if taken == 1 {
            return Ok(true);
        }
        let exists =
            client.query_opt("SELECT 1 FROM webhooks WHERE id = $1", &[&id]).await.map_err(pg_error("read webhook"))?;
        match exists {
            Some(_) => Ok(false),
            None => Err(Error::not_found("webhook", id)),
        }
    }

    async fn record_delivery(&self, id: Uuid, outcome: &DeliveryOutcome) -> Result<Webhook> {
        let client = self.client().await?;
        // One statement each: the change is computed from the row as it is, so concurrent outcomes compose.
        let row = match outcome {
            DeliveryOutcome::Delivered { sequence, at } => {
                client
                    .query_opt(
                        &format!(
                            "UPDATE webhooks SET delivered_sequence = GREATEST(delivered_sequence, $2),
                                                 consecutive_failures = 0, last_error = NULL,
                                                 last_success_time = $3, state = $4
                             WHERE id = $1 RETURNING {WEBHOOK_COLUMNS}"
                        ),
                        &[&id, &sql_count(*sequence), at, &(WebhookState::Healthy as i16)],
                    )
                    .await
            }
            DeliveryOutcome::Failed { error, mark_failing } => {
                client
                    .query_opt(
                        &format!(
                            "UPDATE webhooks SET consecutive_failures = consecutive_failures + 1, last_error = $2,
                                                 state = CASE WHEN $3 THEN $4 ELSE state END
                             WHERE id = $1 RETURNING {WEBHOOK_COLUMNS}"
                        ),
                        &[&id, error, mark_failing, &(WebhookState::Failing as i16)],
                    )
                    .await
            }
        };
        let row = row.map_err(pg_error("record webhook delivery"))?;
        webhook_from_row(&row.ok_or_else(|| Error::not_found("webhook", id))?)
    }
}
