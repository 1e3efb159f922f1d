//! [`AlertStore`] on SQLite. The one connection serialises writers, so appending an event in the transaction that
//! changes its alert is enough for the log to be gapless in commit order.

use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter, types::Value};
use uuid::Uuid;

use smartfarm_core::rules::{Alert, AlertState, Rule, Severity};
use smartfarm_core::time::{from_unix_micros, to_unix_micros};
use smartfarm_core::{Error, Result};

use super::registry::uuid_column;
use super::{SqliteStore, is_foreign_key_violation, is_unique_violation, number_column, sql_count, sql_error};
use crate::alerts::{
    self, AlertEvent, AlertEventKind, AlertFilter, AlertRetention, AlertStore, DeliveryOutcome, Webhook, WebhookState,
};

const WEBHOOK_COLUMNS: &str = "id, farm_id, url, min_severity, secret, state, consecutive_failures, last_error, \
                               last_success_time, create_time, delivered_sequence";

fn rule_json(rule: &Rule) -> Result<String> {
    serde_json::to_string(rule).map_err(|error| Error::internal("encode rule", error))
}

fn parse_rule(text: &str) -> Result<Rule> {
    serde_json::from_str(text).map_err(|error| Error::internal("rules.definition is not a rule", error))
}

fn alert_json(alert: &Alert) -> Result<String> {
    serde_json::to_string(alert).map_err(|error| Error::internal("encode alert", error))
}

fn parse_alert(text: &str) -> Result<Alert> {
    serde_json::from_str(text).map_err(|error| Error::internal("stored alert is not an alert", error))
}

fn load_rule(connection: &Connection, id: Uuid) -> Result<Option<Rule>> {
    let definition: Option<String> = connection
        .query_row("SELECT definition FROM rules WHERE id = ?1", [id.to_string()], |row| row.get(0))
        .optional()
        .map_err(sql_error("read rule"))?;
    definition.as_deref().map(parse_rule).transpose()
}

fn load_alert(connection: &Connection, id: Uuid) -> Result<Option<Alert>> {
    let body: Option<String> = connection
        .query_row("SELECT body FROM alerts WHERE id = ?1", [id.to_string()], |row| row.get(0))
        .optional()
        .map_err(sql_error("read alert"))?;
    body.as_deref().map(parse_alert).transpose()
}

/// Moves a farm's rules version on and returns the new one; `NotFound` when the farm does not exist.
fn bump_rules_version(connection: &Connection, farm_id: Uuid) -> Result<u64> {
    let version: Option<i64> = connection
        .query_row(
            "UPDATE farms SET rules_version = rules_version + 1 WHERE id = ?1 RETURNING rules_version",
            [farm_id.to_string()],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql_error("bump rules version"))?;
    version.map(|version| version as u64).ok_or_else(|| Error::not_found("farm", farm_id))
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<(i64, AlertEventKind, String)> {
    Ok((row.get(0)?, number_column(row, 1, AlertEventKind::from_number)?, row.get(2)?))
}

fn decode_event((sequence, kind, alert): (i64, AlertEventKind, String)) -> Result<AlertEvent> {
    Ok(AlertEvent { sequence: sequence as u64, kind, alert: parse_alert(&alert)? })
}

fn webhook_from_row(row: &Row<'_>) -> rusqlite::Result<Webhook> {
    Ok(Webhook {
        id: uuid_column(row, 0)?,
        farm_id: uuid_column(row, 1)?,
        url: row.get(2)?,
        min_severity: number_column(row, 3, Severity::from_number)?,
        secret: row.get(4)?,
        state: number_column(row, 5, webhook_state)?,
        consecutive_failures: u32::try_from(row.get::<_, i64>(6)?).unwrap_or(u32::MAX),
        last_error: row.get(7)?,
        last_success_time: row.get::<_, Option<i64>>(8)?.map(from_unix_micros),
        create_time: from_unix_micros(row.get(9)?),
        delivered_sequence: row.get::<_, i64>(10)? as u64,
    })
}

fn webhook_state(value: i64) -> Option<WebhookState> {
    match value {
        1 => Some(WebhookState::Healthy),
        2 => Some(WebhookState::Failing),
        _ => None,
    }
}

/// Applies `change` to the stored copy of alert `id` (`None` when there is none) and, when it changes anything,
/// writes the alert and appends its event in one transaction. Returns the alert as stored afterwards and the event.
fn change_alert(
    connection: &mut Connection,
    id: Uuid,
    change: impl FnOnce(Option<&Alert>) -> Result<Option<(AlertEventKind, Alert)>>,
) -> Result<(Option<Alert>, Option<AlertEvent>)> {
    let transaction = connection.transaction().map_err(sql_error("begin alert change"))?;
    let changed = change_alert_in(&transaction, id, change)?;
    if changed.1.is_some() {
        transaction.commit().map_err(sql_error("commit alert change"))?;
    }
    Ok(changed)
}

/// Records several alerts in one transaction (one commit for a burst); any failure undoes them all.
fn record_alerts_at_once(connection: &mut Connection, batch: &[Alert]) -> Result<Vec<Option<AlertEvent>>> {
    let transaction = connection.transaction().map_err(sql_error("begin alert changes"))?;
    let mut events = Vec::with_capacity(batch.len());
    for alert in batch {
        let (_, event) = change_alert_in(&transaction, alert.id, |stored| alerts::merge_change(stored, alert))?;
        events.push(event);
    }
    transaction.commit().map_err(sql_error("commit alert changes"))?;
    Ok(events)
}

/// [`change_alert`] within a transaction the caller commits.
fn change_alert_in(
    transaction: &rusqlite::Transaction<'_>,
    id: Uuid,
    change: impl FnOnce(Option<&Alert>) -> Result<Option<(AlertEventKind, Alert)>>,
) -> Result<(Option<Alert>, Option<AlertEvent>)> {
    let stored = load_alert(transaction, id)?;
    let Some((kind, alert)) = change(stored.as_ref())? else { return Ok((stored, None)) };
    let body = alert_json(&alert)?;
    let columns = params![
        alert.id.to_string(),
        alert.farm_id.to_string(),
        alert.rule_id.to_string(),
        alert.device_id.map(|id| id.to_string()),
        alert.severity as i64,
        alert.state as i64,
        to_unix_micros(alert.open_time),
        body,
    ];
    if stored.is_none() {
        transaction
            .execute(
                "INSERT INTO alerts (id, farm_id, rule_id, device_id, severity, state, open_time, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                columns,
            )
            .map_err(|error| {
                if is_foreign_key_violation(&error) {
                    Error::not_found("farm", alert.farm_id)
                } else {
                    sql_error("insert alert")(error)
                }
            })?;
    } else {
        transaction
            .execute(
                "UPDATE alerts SET farm_id = ?2, rule_id = ?3, device_id = ?4, severity = ?5, state = ?6,
                                   open_time = ?7, body = ?8
                 WHERE id = ?1",
                columns,
            )
            .map_err(sql_error("update alert"))?;
    }
    let sequence: i64 = transaction
        .query_row(
            "INSERT INTO alert_events (farm_id, severity, kind, alert) VALUES (?1, ?2, ?3, ?4) RETURNING sequence",
            params![alert.farm_id.to_string(), alert.severity as i64, kind as i64, body],
            |row| row.get(0),
        )
        .map_err(sql_error("append alert event"))?;
    let event = AlertEvent { sequence: sequence as u64, kind, alert: alert.clone() };
    Ok((Some(alert), Some(event)))
}

#[async_trait::async_trait]
impl AlertStore for SqliteStore {
    async fn create_rule(&self, rule: &Rule) -> Result<u64> {
        let rule = rule.clone();
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin rule creation"))?;
            let version = bump_rules_version(&transaction, rule.farm_id)?;
            transaction
                .execute(
                    "INSERT INTO rules (id, farm_id, create_time, definition) VALUES (?1, ?2, ?3, ?4)",
                    params![
                        rule.id.to_string(),
                        rule.farm_id.to_string(),
                        to_unix_micros(rule.create_time),
                        rule_json(&rule)?
                    ],
                )
                .map_err(|error| {
                    if is_unique_violation(&error) {
                        Error::AlreadyExists(format!("rule {} already exists", rule.id))
                    } else {
                        sql_error("insert rule")(error)
                    }
                })?;
            transaction.commit().map_err(sql_error("commit rule creation"))?;
            Ok(version)
        })
        .await
    }

    async fn get_rule(&self, id: Uuid) -> Result<Rule> {
        self.run(move |connection| load_rule(connection, id)?.ok_or_else(|| Error::not_found("rule", id))).await
    }

    async fn list_rules(&self, farm_id: Uuid, after: Option<Uuid>, limit: usize) -> Result<Vec<Rule>> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT definition FROM rules WHERE farm_id = ?1 AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3",
                )
                .map_err(sql_error("prepare rule listing"))?;
            let rows = statement
                .query_map(params![farm_id.to_string(), after.map(|id| id.to_string()), sql_count(limit)], |row| {
                    row.get::<_, String>(0)
                })
                .map_err(sql_error("list rules"))?;
            let definitions = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read rule row"))?;
            definitions.iter().map(|definition| parse_rule(definition)).collect()
        })
        .await
    }

    async fn delete_rule(&self, id: Uuid) -> Result<Rule> {
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin rule deletion"))?;
            let rule = load_rule(&transaction, id)?.ok_or_else(|| Error::not_found("rule", id))?;
            transaction
                .execute("DELETE FROM rules WHERE id = ?1", [id.to_string()])
                .map_err(sql_error("delete rule"))?;
            bump_rules_version(&transaction, rule.farm_id)?;
            transaction.commit().map_err(sql_error("commit rule deletion"))?;
            Ok(rule)
        })
        .await
    }

    async fn rules_snapshot(&self, farm_id: Uuid) -> Result<(u64, Vec<Rule>)> {
        self.run(move |connection| {
            // One statement, so the version and the rules are of one moment.
            let mut statement = connection
                .prepare_cached(
                    "SELECT farms.rules_version, rules.definition FROM farms
                     LEFT JOIN rules ON rules.farm_id = farms.id
                     WHERE farms.id = ?1 ORDER BY rules.id",
                )
                .map_err(sql_error("prepare rules snapshot"))?;
            let rows = statement
                .query_map([farm_id.to_string()], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Option<String>>(1)?)))
                .map_err(sql_error("read rules snapshot"))?;
            let rows = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read rules snapshot row"))?;
            let version = rows.first().map_or(0, |(version, _)| *version as u64);
            let rules = rows.iter().filter_map(|(_, definition)| definition.as_deref()).map(parse_rule);
            Ok((version, rules.collect::<Result<Vec<_>>>()?))
        })
        .await
    }

    async fn record_alerts(&self, batch: &[Alert]) -> Vec<Result<Option<AlertEvent>>> {
        let alerts = batch.to_vec();
        let at_once = self.run(move |connection| record_alerts_at_once(connection, &alerts)).await;
        match at_once {
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
        let alert = alert.clone();
        self.run(move |connection| {
            let (_, event) = change_alert(connection, alert.id, |stored| alerts::merge_change(stored, &alert))?;
            Ok(event)
        })
        .await
    }

    async fn get_alert(&self, id: Uuid) -> Result<Alert> {
        self.run(move |connection| load_alert(connection, id)?.ok_or_else(|| Error::not_found("alert", id))).await
    }

    async fn unresolved_alerts_of(&self, rule_id: Uuid, device_id: Option<Uuid>) -> Result<Vec<Alert>> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT body FROM alerts WHERE rule_id = ?1 AND device_id IS ?2 AND state < 3
                     ORDER BY open_time, id",
                )
                .map_err(sql_error("prepare unresolved alerts"))?;
            let bodies = statement
                .query_map(params![rule_id.to_string(), device_id.map(|id| id.to_string())], |row| {
                    row.get::<_, String>(0)
                })
                .map_err(sql_error("read unresolved alerts"))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(sql_error("read unresolved alerts"))?;
            bodies.iter().map(|body| parse_alert(body)).collect()
        })
        .await
    }

    async fn set_alert_state(
        &self,
        id: Uuid,
        state: AlertState,
        at: SystemTime,
    ) -> Result<(Alert, Option<AlertEvent>)> {
        self.run(move |connection| {
            let (alert, event) = change_alert(connection, id, |stored| {
                let stored = stored.ok_or_else(|| Error::not_found("alert", id))?;
                alerts::state_change(stored, state, at)
            })?;
            Ok((alert.expect("the alert was found"), event))
        })
        .await
    }

    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        after: Option<(SystemTime, Uuid)>,
        limit: usize,
    ) -> Result<Vec<Alert>> {
        let filter = filter.clone();
        self.run(move |connection| {
            let mut sql = String::from("SELECT body FROM alerts WHERE 1 = 1");
            let mut values: Vec<Value> = Vec::new();
            if let Some(farm_id) = filter.farm_id {
                values.push(Value::Text(farm_id.to_string()));
                sql.push_str(&format!(" AND farm_id = ?{}", values.len()));
            }
            if !filter.states.is_empty() {
                let mut placeholders = Vec::new();
                for state in &filter.states {
                    values.push(Value::Integer(*state as i64));
                    placeholders.push(format!("?{}", values.len()));
                }
                sql.push_str(&format!(" AND state IN ({})", placeholders.join(", ")));
            }
            if let Some(severity) = filter.min_severity {
                values.push(Value::Integer(severity as i64));
                sql.push_str(&format!(" AND severity >= ?{}", values.len()));
            }
            if let Some(from) = filter.opened_from {
                values.push(Value::Integer(to_unix_micros(from)));
                sql.push_str(&format!(" AND open_time >= ?{}", values.len()));
            }
            if let Some(before) = filter.opened_before {
                values.push(Value::Integer(to_unix_micros(before)));
                sql.push_str(&format!(" AND open_time < ?{}", values.len()));
            }
            if let Some((open_time, id)) = after {
                values.push(Value::Integer(to_unix_micros(open_time)));
                values.push(Value::Text(id.to_string()));
                sql.push_str(&format!(" AND (open_time, id) < (?{}, ?{})", values.len() - 1, values.len()));
            }
            values.push(Value::Integer(sql_count(limit)));
            sql.push_str(&format!(" ORDER BY open_time DESC, id DESC LIMIT ?{}", values.len()));
            let mut statement = connection.prepare(&sql).map_err(sql_error("prepare alert listing"))?;
            let rows = statement
                .query_map(params_from_iter(values), |row| row.get::<_, String>(0))
                .map_err(sql_error("list alerts"))?;
            let bodies = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read alert row"))?;
            bodies.iter().map(|body| parse_alert(body)).collect()
        })
        .await
    }

    async fn alert_events_after(
        &self,
        sequence: u64,
        farm_id: Option<Uuid>,
        min_severity: Severity,
        limit: usize,
    ) -> Result<Vec<AlertEvent>> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT sequence, kind, alert FROM alert_events
                     WHERE sequence > ?1 AND (?2 IS NULL OR farm_id = ?2) AND severity >= ?3
                     ORDER BY sequence LIMIT ?4",
                )
                .map_err(sql_error("prepare alert event listing"))?;
            let rows = statement
                .query_map(
                    params![
                        sql_count(sequence),
                        farm_id.map(|id| id.to_string()),
                        min_severity as i64,
                        sql_count(limit)
                    ],
                    event_from_row,
                )
                .map_err(sql_error("list alert events"))?;
            let events = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read alert event row"))?;
            events.into_iter().map(decode_event).collect()
        })
        .await
    }

    async fn last_alert_event(&self) -> Result<u64> {
        self.run(|connection| {
            connection
                .query_row("SELECT COALESCE(MAX(sequence), 0) FROM alert_events", [], |row| row.get::<_, i64>(0))
                .map(|sequence| sequence as u64)
                .map_err(sql_error("read the last alert event"))
        })
        .await
    }

    async fn apply_alert_retention(&self, now: SystemTime, before: SystemTime, limit: usize) -> Result<AlertRetention> {
        let (now, before, limit) = (to_unix_micros(now), to_unix_micros(before), sql_count(limit));
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin alert retention"))?;
            transaction
                .execute(
                    "INSERT OR IGNORE INTO alert_event_marks (mark_time, sequence)
                     SELECT ?1, COALESCE(MAX(sequence), 0) FROM alert_events",
                    params![now],
                )
                .map_err(sql_error("note where the alert log stands"))?;
            let (horizon, marked, webhooks, newest) = transaction
                .query_row(
                    "SELECT (SELECT sequence FROM alert_event_horizon WHERE id = 1),
                            (SELECT MAX(sequence) FROM alert_event_marks WHERE mark_time < ?1),
                            (SELECT MIN((SELECT MIN(e.sequence) FROM alert_events e
                                         WHERE e.farm_id = w.farm_id AND e.severity >= w.min_severity
                                           AND e.sequence > w.delivered_sequence)) - 1
                             FROM webhooks w),
                            (SELECT COALESCE(MAX(sequence), 0) FROM alert_events)",
                    params![before],
                    |row| {
                        Ok((
                            row.get::<_, Option<i64>>(0)?,
                            row.get::<_, Option<i64>>(1)?,
                            row.get::<_, Option<i64>>(2)?,
                            row.get::<_, Option<i64>>(3)?,
                        ))
                    },
                )
                .map_err(sql_error("read the alert log's retention state"))?;
            let number = |value: Option<i64>| value.map(|value| value.max(0) as u64);
            let horizon = number(horizon).unwrap_or(0);
            let mut deleted = AlertRetention::default();
            if let Some(cut) = alerts::retention_cut(
                horizon,
                number(marked),
                number(webhooks),
                number(newest).unwrap_or(0),
                limit as usize,
            ) {
                deleted.events = transaction
                    .execute(
                        "DELETE FROM alert_events WHERE sequence > ?1 AND sequence <= ?2",
                        params![sql_count(horizon), sql_count(cut)],
                    )
                    .map_err(sql_error("delete old alert events"))? as u64;
                transaction
                    .execute("UPDATE alert_event_horizon SET sequence = ?1 WHERE id = 1", params![sql_count(cut)])
                    .map_err(sql_error("move the alert log's horizon"))?;
                // Notes the cut has passed cannot move a later cut.
                transaction
                    .execute(
                        "DELETE FROM alert_event_marks WHERE sequence <= ?1 AND mark_time < ?2",
                        params![sql_count(cut), before],
                    )
                    .map_err(sql_error("delete old alert log notes"))?;
            }
            deleted.alerts = transaction
                .execute(
                    // Resolved before `before` (an alert resolves after it opens, so the open time narrows the
                    // search).
                    "DELETE FROM alerts WHERE id IN (
                         SELECT id FROM alerts
                         WHERE state = 3 AND open_time < ?1
                           AND COALESCE(json_extract(body, '$.resolve_time.secs_since_epoch'), 0) < ?3
                         ORDER BY open_time LIMIT ?2)",
                    params![before, limit, before.div_euclid(1_000_000)],
                )
                .map_err(sql_error("delete old resolved alerts"))? as u64;
            transaction.commit().map_err(sql_error("commit alert retention"))?;
            Ok(deleted)
        })
        .await
    }

    async fn alert_event_horizon(&self) -> Result<u64> {
        self.run(|connection| {
            connection
                .query_row("SELECT sequence FROM alert_event_horizon WHERE id = 1", [], |row| row.get::<_, i64>(0))
                .map(|sequence| sequence.max(0) as u64)
                .map_err(sql_error("read the alert log's horizon"))
        })
        .await
    }

    async fn create_webhook(&self, webhook: &Webhook) -> Result<()> {
        let webhook = webhook.clone();
        self.run(move |connection| {
            connection
                .execute(
                    &format!(
                        "INSERT INTO webhooks ({WEBHOOK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
                    ),
                    params![
                        webhook.id.to_string(),
                        webhook.farm_id.to_string(),
                        webhook.url,
                        webhook.min_severity as i64,
                        webhook.secret,
                        webhook.state as i64,
                        i64::from(webhook.consecutive_failures),
                        webhook.last_error,
                        webhook.last_success_time.map(to_unix_micros),
                        to_unix_micros(webhook.create_time),
                        sql_count(webhook.delivered_sequence),
                    ],
                )
                .map_err(|error| {
                    if is_foreign_key_violation(&error) {
                        Error::not_found("farm", webhook.farm_id)
                    } else if is_unique_violation(&error) {
                        Error::AlreadyExists(format!("webhook {} already exists", webhook.id))
                    } else {
                        sql_error("insert webhook")(error)
                    }
                })?;
            Ok(())
        })
        .await
    }

    async fn get_webhook(&self, id: Uuid) -> Result<Webhook> {
        self.run(move |connection| {
            connection
                .query_row(
                    &format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?1"),
                    [id.to_string()],
                    webhook_from_row,
                )
                .optional()
                .map_err(sql_error("read webhook"))?
                .ok_or_else(|| Error::not_found("webhook", id))
        })
        .await
    }

    async fn list_webhooks(&self, farm_id: Option<Uuid>, after: Option<Uuid>, limit: usize) -> Result<Vec<Webhook>> {
        self.run(move |connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {WEBHOOK_COLUMNS} FROM webhooks
                     WHERE (?1 IS NULL OR farm_id = ?1) AND (?2 IS NULL OR id > ?2)
                     ORDER BY id LIMIT ?3"
                ))
                .map_err(sql_error("prepare webhook listing"))?;
            let rows = statement
                .query_map(
                    params![farm_id.map(|id| id.to_string()), after.map(|id| id.to_string()), sql_count(limit)],
                    webhook_from_row,
                )
                .map_err(sql_error("list webhooks"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read webhook row"))
        })
        .await
    }

    async fn delete_webhook(&self, id: Uuid) -> Result<()> {
        self.run(move |connection| {
            let deleted = connection
                .execute("DELETE FROM webhooks WHERE id = ?1", [id.to_string()])
                .map_err(sql_error("delete webhook"))?;
            if deleted == 0 {
                return Err(Error::not_found("webhook", id));
            }
            Ok(())
        })
        .await
    }

    async fn lease_webhook(&self, id: Uuid, owner: Uuid, lease: std::time::Duration) -> Result<bool> {
        // One process holds a SQLite file: its clock is the only one.
        let now = smartfarm_core::time::now();
        let until = now + lease;
        self.run(move |connection| {
            let taken = connection
                .execute(
                    "UPDATE webhooks SET lease_owner = ?2, lease_until = ?4
                     WHERE id = ?1 AND (lease_owner IS NULL OR lease_owner = ?2 OR lease_until <= ?3)",
                    params![id.to_string(), owner.to_string(), to_unix_micros(now), to_unix_micros(until)],
                )
                .map_err(sql_error("lease webhook"))?;
            if taken == 1 {
                return Ok(true);
            }
            let exists = connection
                .query_row("SELECT 1 FROM webhooks WHERE id = ?1", [id.to_string()], |_| Ok(()))
                .optional()
                .map_err(sql_error("read webhook"))?;
            match exists {
                Some(()) => Ok(false),
                None => Err(Error::not_found("webhook", id)),
            }
        })
        .await
    }

    async fn record_delivery(&self, id: Uuid, outcome: &DeliveryOutcome) -> Result<Webhook> {
        let outcome = outcome.clone();
        self.run(move |connection| {
            // One statement each: the change is computed from the row as it is, so concurrent outcomes compose.
            let updated = match &outcome {
                DeliveryOutcome::Delivered { sequence, at } => connection.query_row(
                    &format!(
                        "UPDATE webhooks SET delivered_sequence = max(delivered_sequence, ?2), consecutive_failures = 0,
                                             last_error = NULL, last_success_time = ?3, state = ?4
                         WHERE id = ?1 RETURNING {WEBHOOK_COLUMNS}"
                    ),
                    params![id.to_string(), sql_count(*sequence), to_unix_micros(*at), WebhookState::Healthy as i64],
                    webhook_from_row,
                ),
                DeliveryOutcome::Failed { error, mark_failing } => connection.query_row(
                    &format!(
                        "UPDATE webhooks SET consecutive_failures = consecutive_failures + 1, last_error = ?2,
                                             state = CASE WHEN ?3 THEN ?4 ELSE state END
                         WHERE id = ?1 RETURNING {WEBHOOK_COLUMNS}"
                    ),
                    params![id.to_string(), error, mark_failing, WebhookState::Failing as i64],
                    webhook_from_row,
                ),
            };
            updated
                .optional()
                .map_err(sql_error("record webhook delivery"))?
                .ok_or_else(|| Error::not_found("webhook", id))
        })
        .await
    }
}
