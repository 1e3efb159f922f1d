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
    self, AlertEvent, AlertEventKind, AlertFilter, AlertRetention, AlertStore, DeliveryOutcome, Webhook, WebhookState,
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

/// Whole seconds since 1970 (as alert bodies hold their times).
fn unix_seconds(time: SystemTime) -> i64 {
    smartfarm_core::time::to_unix_micros(time).div_euclid(1_000_000)
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

    /// Records several alerts in one transaction under the event lock (one commit for a burst), in two round trips
    /// whatever the burst's size: the transaction begins, takes the lock and reads the stored copies in one
    /// pipelined exchange; the copies are merged here in order (an alert may come twice); then the alerts and their
    /// events are written in one statement, pipelined with the commit. Any failure undoes them all.
    async fn record_alerts_at_once(&self, batch: &[Alert]) -> Result<Vec<Option<AlertEvent>>> {
        let mut connection = InTransaction(Some(self.client().await?));
        let client = connection.client();
        let (lock, read, write) = tokio::try_join!(
            client.prepare_cached("SELECT pg_advisory_xact_lock($1)"),
            client.prepare_cached(READ_ALERTS_FOR_BURST),
            client.prepare_cached(WRITE_BURST),
        )
        .map_err(pg_error("prepare alert changes"))?;
        let ids: Vec<Uuid> = batch.iter().map(|alert| alert.id).collect();
        let (lock_key, read_ids): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) =
            ([&ALERT_EVENT_LOCK_KEY], [&ids]);
        // Pipelined, but run one after the other: the read's snapshot is taken once the lock is held, so it sees
        // every change committed by the lock's previous holders (read committed).
        let (begun, locked, rows) = tokio::join!(
            client.batch_execute("BEGIN"),
            client.execute(&lock, &lock_key),
            client.query(&read, &read_ids),
        );
        begun.map_err(pg_error("begin alert changes"))?;
        let merged = locked
            .map_err(pg_error("take the alert event lock"))
            .and_then(|_| rows.map_err(pg_error("read alerts")))
            .and_then(|rows| merge_burst(&rows, batch));
        let Burst { events, columns, log } = match merged {
            Ok(Some(burst)) => burst,
            // Nothing changes, or something is refused: nothing to write.
            outcome => {
                connection.finish("ROLLBACK").await?;
                return outcome.map(|_| vec![None; batch.len()]);
            }
        };
        let (rows, events_log) = (columns.parameters(), log.parameters());
        let parameters: Vec<&(dyn ToSql + Sync)> = rows.into_iter().chain(events_log).collect();
        let (written, committed) = tokio::join!(
            client.execute(&write, &parameters),
            // After a failed statement PostgreSQL answers COMMIT by rolling back: the transaction ends either way.
            client.batch_execute("COMMIT"),
        );
        committed.map_err(pg_error("commit alert changes"))?;
        connection.done();
        written.map_err(|error| {
            if is_foreign_key_violation(&error) {
                Error::not_found("farm", "of an alert in the burst")
            } else {
                pg_error("write alerts and their events")(error)
            }
        })?;
        Ok(events)
    }
}

/// The newest event's sequence, and the stored copies of the alerts `$1` (a row with a null body when none is).
const READ_ALERTS_FOR_BURST: &str = "SELECT (SELECT COALESCE(MAX(sequence), 0) FROM alert_events), alerts.body
                                     FROM (SELECT 1) AS one LEFT JOIN alerts ON alerts.id = ANY($1)";

/// Writes a burst's alerts (the columns of [`AlertColumns`]) and appends its events (those of [`EventColumns`]).
const WRITE_BURST: &str = "WITH written AS (
        INSERT INTO alerts (id, farm_id, rule_id, device_id, severity, state, open_time, body)
        SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::smallint[], $6::smallint[],
                             $7::timestamptz[], $8::jsonb[])
        ON CONFLICT (id) DO UPDATE SET farm_id = EXCLUDED.farm_id, rule_id = EXCLUDED.rule_id,
            device_id = EXCLUDED.device_id, severity = EXCLUDED.severity, state = EXCLUDED.state,
            open_time = EXCLUDED.open_time, body = EXCLUDED.body
        RETURNING 1)
    INSERT INTO alert_events (sequence, farm_id, severity, kind, alert)
    SELECT * FROM UNNEST($9::bigint[], $10::uuid[], $11::smallint[], $12::smallint[], $13::jsonb[])";

/// What a burst changes, given what [`READ_ALERTS_FOR_BURST`] read, or `None` when nothing changes. Each alert is
/// merged into what precedes it, so one that comes twice is merged twice; events are numbered on from the newest.
fn merge_burst(rows: &[Row], batch: &[Alert]) -> Result<Option<Burst>> {
    let last_sequence = rows.first().map_or(0, |row| row.get::<_, i64>(0));
    let mut current: std::collections::HashMap<Uuid, Alert> = std::collections::HashMap::new();
    for row in rows {
        if let Some(body) = row.get::<_, Option<serde_json::Value>>(1) {
            let alert = parse_alert(body)?;
            current.insert(alert.id, alert);
        }
    }
    let mut events = Vec::with_capacity(batch.len());
    let mut log = EventColumns::default();
    let mut changed = Vec::new();
    for incoming in batch {
        let Some((kind, merged)) = alerts::merge_change(current.get(&incoming.id), incoming)? else {
            events.push(None);
            continue;
        };
        let sequence = last_sequence + log.sequences.len() as i64 + 1;
        log.push(sequence, kind, &merged)?;
        events.push(Some(AlertEvent { sequence: sequence as u64, kind, alert: merged.clone() }));
        if !changed.contains(&merged.id) {
            changed.push(merged.id);
        }
        current.insert(merged.id, merged);
    }
    if changed.is_empty() {
        return Ok(None);
    }
    let mut columns = AlertColumns::default();
    for id in changed {
        columns.push(&current[&id])?;
    }
    Ok(Some(Burst { events, columns, log }))
}

/// What a burst writes: the event of each alert (`None` where it changes nothing), the alerts' rows and the events'.
struct Burst {
    events: Vec<Option<AlertEvent>>,
    columns: AlertColumns,
    log: EventColumns,
}

/// A pooled connection inside a transaction begun by hand (so that its first statements can be pipelined with
/// the BEGIN). It goes back to the pool only once the transaction has ended; dropped before (an error on the way,
/// a future dropped midway) it is closed instead, which ends the transaction too.
struct InTransaction(Option<deadpool_postgres::Object>);

impl InTransaction {
    fn client(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("a connection until done")
    }

    /// Ends the transaction with `statement` (COMMIT or ROLLBACK) and pools the connection.
    async fn finish(&mut self, statement: &str) -> Result<()> {
        self.client().batch_execute(statement).await.map_err(pg_error("end alert changes"))?;
        self.done();
        Ok(())
    }

    /// The transaction ended: the connection goes back to the pool.
    fn done(&mut self) {
        self.0.take();
    }
}

impl Drop for InTransaction {
    fn drop(&mut self) {
        if let Some(connection) = self.0.take() {
            // Mid-transaction or in an unknown state: closed, never pooled.
            drop(deadpool_postgres::Object::take(connection));
        }
    }
}

/// The `alerts` rows of a burst, a column each (for `UNNEST`).
#[derive(Default)]
struct AlertColumns {
    ids: Vec<Uuid>,
    farm_ids: Vec<Uuid>,
    rule_ids: Vec<Uuid>,
    device_ids: Vec<Option<Uuid>>,
    severities: Vec<i16>,
    states: Vec<i16>,
    open_times: Vec<SystemTime>,
    bodies: Vec<serde_json::Value>,
}

impl AlertColumns {
    fn push(&mut self, alert: &Alert) -> Result<()> {
        self.ids.push(alert.id);
        self.farm_ids.push(alert.farm_id);
        self.rule_ids.push(alert.rule_id);
        self.device_ids.push(alert.device_id);
        self.severities.push(alert.severity as i16);
        self.states.push(alert.state as i16);
        self.open_times.push(alert.open_time);
        self.bodies.push(alert_json(alert)?);
        Ok(())
    }

    fn parameters(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.ids,
            &self.farm_ids,
            &self.rule_ids,
            &self.device_ids,
            &self.severities,
            &self.states,
            &self.open_times,
            &self.bodies,
        ]
    }
}

/// The `alert_events` rows of a burst, a column each.
#[derive(Default)]
struct EventColumns {
    sequences: Vec<i64>,
    farm_ids: Vec<Uuid>,
    severities: Vec<i16>,
    kinds: Vec<i16>,
    bodies: Vec<serde_json::Value>,
}

impl EventColumns {
    fn push(&mut self, sequence: i64, kind: AlertEventKind, alert: &Alert) -> Result<()> {
        self.sequences.push(sequence);
        self.farm_ids.push(alert.farm_id);
        self.severities.push(alert.severity as i16);
        self.kinds.push(kind as i16);
        self.bodies.push(alert_json(alert)?);
        Ok(())
    }

    fn parameters(&self) -> [&(dyn ToSql + Sync); 5] {
        [&self.sequences, &self.farm_ids, &self.severities, &self.kinds, &self.bodies]
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

    async fn apply_alert_retention(&self, now: SystemTime, before: SystemTime, limit: usize) -> Result<AlertRetention> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin alert retention"))?;
        transaction
            .execute(
                "INSERT INTO alert_event_marks (mark_time, sequence)
                 SELECT $1, COALESCE(MAX(sequence), 0) FROM alert_events
                 ON CONFLICT (mark_time) DO NOTHING",
                &[&now],
            )
            .await
            .map_err(pg_error("note where the alert log stands"))?;
        // The horizon's row lock makes retention runs on several replicas take turns. Appending writers never wait
        // for it: the newest event, which they number from, is never deleted.
        let row = transaction
            .query_one(
                "SELECT (SELECT sequence FROM alert_event_horizon WHERE id = 1 FOR UPDATE),
                        (SELECT MAX(sequence) FROM alert_event_marks WHERE mark_time < $1),
                        (SELECT MIN((SELECT MIN(e.sequence) FROM alert_events e
                                     WHERE e.farm_id = w.farm_id AND e.severity >= w.min_severity
                                       AND e.sequence > w.delivered_sequence)) - 1
                         FROM webhooks w),
                        (SELECT COALESCE(MAX(sequence), 0) FROM alert_events)",
                &[&before],
            )
            .await
            .map_err(pg_error("read the alert log's retention state"))?;
        let number = |index: usize| row.get::<_, Option<i64>>(index).map(|value| value.max(0) as u64);
        let horizon = number(0).unwrap_or(0);
        let mut deleted = AlertRetention::default();
        if let Some(cut) = alerts::retention_cut(horizon, number(1), number(2), number(3).unwrap_or(0), limit) {
            deleted.events = transaction
                .execute(
                    "DELETE FROM alert_events WHERE sequence > $1 AND sequence <= $2",
                    &[&sql_count(horizon), &sql_count(cut)],
                )
                .await
                .map_err(pg_error("delete old alert events"))?;
            transaction
                .execute("UPDATE alert_event_horizon SET sequence = $1 WHERE id = 1", &[&sql_count(cut)])
                .await
                .map_err(pg_error("move the alert log's horizon"))?;
            // Notes the cut has passed cannot move a later cut.
            transaction
                .execute(
                    "DELETE FROM alert_event_marks WHERE sequence <= $1 AND mark_time < $2",
                    &[&sql_count(cut), &before],
                )
                .await
                .map_err(pg_error("delete old alert log notes"))?;
        }
        deleted.alerts = transaction
            .execute(
                // Resolved before `before` (an alert resolves after it opens, so the open time narrows the search).
                "DELETE FROM alerts WHERE id IN (
                     SELECT id FROM alerts
                     WHERE state = 3 AND open_time < $1
                       AND COALESCE((body->'resolve_time'->>'secs_since_epoch')::bigint, 0) < $3
                     ORDER BY open_time LIMIT $2)",
                &[&before, &sql_count(limit), &unix_seconds(before)],
            )
            .await
            .map_err(pg_error("delete old resolved alerts"))?;
        transaction.commit().await.map_err(pg_error("commit alert retention"))?;
        Ok(deleted)
    }

    async fn alert_event_horizon(&self) -> Result<u64> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT sequence FROM alert_event_horizon WHERE id = 1", &[])
            .await
            .map_err(pg_error("read the alert log's horizon"))?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
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

    async fn lease_webhook(&self, id: Uuid, owner: Uuid, lease: std::time::Duration) -> Result<bool> {
        let client = self.client().await?;
        let taken = client
            .execute(
                "UPDATE webhooks SET lease_owner = $2, lease_until = now() + make_interval(secs => $3)
                 WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until <= now())",
                &[&id, &owner, &lease.as_secs_f64()],
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
