//! [`TelemetryStore`] on SQLite: the batch's rows, the gateway's mark, rollups and latest values in one
//! transaction; times as microseconds since the epoch. A reading row names its series (farm, device, metric) by a
//! small integer from `reading_series`, interned like metric names.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use rusqlite::{OptionalExtension, Row, Transaction, params, params_from_iter, types::Value};
use uuid::Uuid;

use smartfarm_core::Result;
use smartfarm_core::batch::BatchKey;
use smartfarm_core::time::{from_unix_micros, to_unix_micros};

use super::{SqliteStore, sql_error};
use crate::telemetry::{
    BatchOutcome, Bucket, EdgeBatch, ReadingCursor, ReadingFilter, ReadingRow, Retention, RollupsAligned,
    StoredReading, TelemetryStore, UnscoredBatch, batch_series, bucket_bounds, latest_per_series, merge_edge_buckets,
    rollup_increments, series_from_json, series_to_json, usable_rollup,
};

/// The id of a metric name, interning it if new.
fn metric_id(transaction: &Transaction<'_>, cache: &mut HashMap<String, i64>, name: &str) -> Result<i64> {
    if let Some(id) = cache.get(name) {
        return Ok(*id);
    }
    transaction
        .execute("INSERT OR IGNORE INTO metric_names (name) VALUES (?1)", [name])
        .map_err(sql_error("intern a metric name"))?;
    let id: i64 = transaction
        .query_row("SELECT id FROM metric_names WHERE name = ?1", [name], |row| row.get(0))
        .map_err(sql_error("read a metric id"))?;
    cache.insert(name.to_string(), id);
    Ok(id)
}

/// The id of a farm's series (device, metric id), interning it if new.
fn series_id(
    transaction: &Transaction<'_>,
    cache: &mut HashMap<(Uuid, i64), i64>,
    farm: &str,
    device_id: Uuid,
    metric_id: i64,
) -> Result<i64> {
    if let Some(id) = cache.get(&(device_id, metric_id)) {
        return Ok(*id);
    }
    let device = device_id.to_string();
    transaction
        .prepare_cached("INSERT OR IGNORE INTO reading_series (farm_id, device_id, metric_id) VALUES (?1, ?2, ?3)")
        .and_then(|mut insert| insert.execute(params![farm, device, metric_id]))
        .map_err(sql_error("intern a reading series"))?;
    let id: i64 = transaction
        .prepare_cached("SELECT id FROM reading_series WHERE device_id = ?1 AND metric_id = ?2 AND farm_id = ?3")
        .and_then(|mut select| select.query_row(params![device, metric_id, farm], |row| row.get(0)))
        .map_err(sql_error("read a reading series id"))?;
    cache.insert((device_id, metric_id), id);
    Ok(id)
}

fn uuid_text(row: &Row<'_>, index: usize) -> rusqlite::Result<Uuid> {
    let text: String = row.get(index)?;
    Uuid::try_parse(&text)
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(error)))
}

fn stored_reading(row: &Row<'_>) -> rusqlite::Result<StoredReading> {
    Ok(StoredReading {
        measure_time: from_unix_micros(row.get(0)?),
        device_id: uuid_text(row, 1)?,
        metric: row.get(2)?,
        value: row.get(3)?,
        receive_time: from_unix_micros(row.get(4)?),
        sequence: row.get::<_, i64>(5)? as u64,
    })
}

/// `AND device_id IN (…) AND m.name IN (…)` for the filter, with its values appended to `values`.
fn filter_clause(filter: &ReadingFilter, values: &mut Vec<Value>) -> String {
    let mut clause = String::new();
    if !filter.device_ids.is_empty() {
        let placeholders: Vec<String> = filter
            .device_ids
            .iter()
            .map(|id| {
                values.push(Value::Text(id.to_string()));
                format!("?{}", values.len())
            })
            .collect();
        clause.push_str(&format!(" AND device_id IN ({})", placeholders.join(", ")));
    }
    if !filter.metrics.is_empty() {
        let placeholders: Vec<String> = filter
            .metrics
            .iter()
            .map(|name| {
                values.push(Value::Text(name.clone()));
                format!("?{}", values.len())
            })
            .collect();
        clause.push_str(&format!(" AND m.name IN ({})", placeholders.join(", ")));
    }
    clause
}

#[async_trait::async_trait]
impl TelemetryStore for SqliteStore {
    async fn committed_sequence(&self, gateway_id: Uuid, spool_id: Uuid) -> Result<u64> {
        self.run(move |connection| {
            let committed: Option<i64> = connection
                .query_row(
                    "SELECT committed_sequence FROM edge_streams WHERE gateway_id = ?1 AND spool_id = ?2",
                    [gateway_id.to_string(), spool_id.to_string()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sql_error("read the edge mark"))?;
            Ok(committed.unwrap_or(0) as u64)
        })
        .await
    }

    async fn commit_batch(&self, batch: &EdgeBatch, rollup_widths: &[Duration]) -> Result<BatchOutcome> {
        let batch = batch.clone();
        let rollup_widths = rollup_widths.to_vec();
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin batch"))?;
            let gateway = batch.gateway_id.to_string();
            let spool = batch.spool_id.to_string();
            let farm = batch.farm_id.to_string();
            let receive = to_unix_micros(batch.receive_time);
            let committed: Option<i64> = transaction
                .query_row(
                    "SELECT committed_sequence FROM edge_streams WHERE gateway_id = ?1 AND spool_id = ?2",
                    [&gateway, &spool],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sql_error("read the edge mark"))?;
            let committed = committed.unwrap_or(0) as u64;
            if batch.last_sequence <= committed {
                return Ok(BatchOutcome::Duplicate);
            }
            let readings: Vec<&ReadingRow> = batch.readings.iter().filter(|r| r.sequence > committed).collect();
            let aggregates: Vec<_> = batch.aggregates.iter().filter(|a| a.sequence > committed).collect();
            let mut metric_ids = HashMap::new();
            let mut series_ids = HashMap::new();
            {
                let mut insert = transaction
                    .prepare_cached(
                        "INSERT INTO readings (time, series_id, value, sequence, receive_time)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(sql_error("prepare the reading insert"))?;
                for reading in &readings {
                    let metric = metric_id(&transaction, &mut metric_ids, &reading.metric)?;
                    let series = series_id(&transaction, &mut series_ids, &farm, reading.device_id, metric)?;
                    insert
                        .execute(params![
                            to_unix_micros(reading.measure_time),
                            series,
                            reading.value,
                            reading.sequence as i64,
                            receive
                        ])
                        .map_err(sql_error("insert a reading"))?;
                }
                let mut insert = transaction
                    .prepare_cached(
                        "INSERT INTO edge_aggregates (window_start, window_end, farm_id, device_id, metric_id, count, min, max, avg, last, sequence, receive_time)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    )
                    .map_err(sql_error("prepare the aggregate insert"))?;
                for aggregate in &aggregates {
                    let metric = metric_id(&transaction, &mut metric_ids, &aggregate.metric)?;
                    insert
                        .execute(params![
                            to_unix_micros(aggregate.window_start),
                            to_unix_micros(aggregate.window_end),
                            farm,
                            aggregate.device_id.to_string(),
                            metric,
                            aggregate.count as i64,
                            aggregate.min,
                            aggregate.max,
                            aggregate.avg,
                            aggregate.last,
                            aggregate.sequence as i64,
                            receive
                        ])
                        .map_err(sql_error("insert an aggregate"))?;
                }
                let mut upsert = transaction
                    .prepare_cached(
                        "INSERT INTO reading_rollups (width, bucket, farm_id, device_id, metric_id, count, sum, min, max)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                         ON CONFLICT (width, device_id, metric_id, bucket) DO UPDATE SET
                             count = count + excluded.count, sum = sum + excluded.sum,
                             min = MIN(min, excluded.min), max = MAX(max, excluded.max)",
                    )
                    .map_err(sql_error("prepare the rollup upsert"))?;
                for ((width, device, metric, bucket), increment) in rollup_increments(&readings, &rollup_widths) {
                    let metric = metric_id(&transaction, &mut metric_ids, metric)?;
                    upsert
                        .execute(params![
                            width as i64,
                            bucket * 1_000_000,
                            farm,
                            device.to_string(),
                            metric,
                            increment.count as i64,
                            increment.sum,
                            increment.min,
                            increment.max
                        ])
                        .map_err(sql_error("update a rollup"))?;
                }
                let latest = latest_per_series(&readings);
                let mut upsert = transaction
                    .prepare_cached(
                        "INSERT INTO latest_readings (device_id, metric_id, farm_id, time, value, sequence, receive_time)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                         ON CONFLICT (device_id, metric_id) DO UPDATE SET
                             time = excluded.time, value = excluded.value, sequence = excluded.sequence,
                             receive_time = excluded.receive_time, farm_id = excluded.farm_id
                         WHERE (excluded.time, excluded.sequence) > (latest_readings.time, latest_readings.sequence)",
                    )
                    .map_err(sql_error("prepare the latest upsert"))?;
                for ((device, metric), reading) in latest {
                    let metric = metric_id(&transaction, &mut metric_ids, metric)?;
                    upsert
                        .execute(params![
                            device.to_string(),
                            metric,
                            farm,
                            to_unix_micros(reading.measure_time),
                            reading.value,
                            reading.sequence as i64,
                            receive
                        ])
                        .map_err(sql_error("update a latest reading"))?;
                }
            }
            transaction
                .execute(
                    "INSERT INTO edge_streams (gateway_id, spool_id, farm_id, committed_sequence, update_time) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (gateway_id, spool_id) DO UPDATE SET committed_sequence = excluded.committed_sequence,
                         update_time = excluded.update_time",
                    params![gateway, spool, farm, batch.last_sequence as i64, receive],
                )
                .map_err(sql_error("move the edge mark"))?;
            if batch.score_later && !readings.is_empty() {
                transaction
                    .execute(
                        "INSERT INTO unscored_batches (gateway_id, spool_id, last_sequence, farm_id, series, receive_time)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                        params![
                            gateway,
                            spool,
                            batch.last_sequence as i64,
                            farm,
                            series_to_json(&batch_series(&readings)).to_string(),
                            receive
                        ],
                    )
                    .map_err(sql_error("list the batch for scoring"))?;
            }
            transaction.commit().map_err(sql_error("commit batch"))?;
            Ok(BatchOutcome::Committed { readings: readings.len(), aggregates: aggregates.len(), above: committed })
        })
        .await
    }

    async fn query_readings(
        &self,
        filter: &ReadingFilter,
        cursor: Option<&ReadingCursor>,
        limit: usize,
    ) -> Result<Vec<StoredReading>> {
        let filter = filter.clone();
        let cursor = cursor.cloned();
        self.run(move |connection| {
            let mut values = vec![
                Value::Text(filter.farm_id.to_string()),
                Value::Integer(to_unix_micros(filter.start)),
                Value::Integer(to_unix_micros(filter.end)),
            ];
            let mut sql = String::from(
                "SELECT r.time, s.device_id, m.name, r.value, r.receive_time, r.sequence
                 FROM readings r JOIN reading_series s ON s.id = r.series_id JOIN metric_names m ON m.id = s.metric_id
                 WHERE s.farm_id = ?1 AND r.time >= ?2 AND r.time < ?3",
            );
            sql.push_str(&filter_clause(&filter, &mut values).replace("device_id", "s.device_id"));
            if let Some(cursor) = &cursor {
                let base = values.len();
                values.push(Value::Integer(to_unix_micros(cursor.measure_time)));
                values.push(Value::Text(cursor.device_id.to_string()));
                values.push(Value::Text(cursor.metric.clone()));
                values.push(Value::Integer(cursor.sequence as i64));
                sql.push_str(&format!(
                    " AND (r.time, s.device_id, m.name, r.sequence) > (?{}, ?{}, ?{}, ?{})",
                    base + 1,
                    base + 2,
                    base + 3,
                    base + 4
                ));
            }
            values.push(Value::Integer(limit as i64));
            sql.push_str(&format!(" ORDER BY r.time, s.device_id, m.name, r.sequence LIMIT ?{}", values.len()));
            let mut statement = connection.prepare(&sql).map_err(sql_error("prepare the reading query"))?;
            let rows =
                statement.query_map(params_from_iter(values), stored_reading).map_err(sql_error("query readings"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read a reading"))
        })
        .await
    }

    async fn query_buckets(
        &self,
        filter: &ReadingFilter,
        width: Option<Duration>,
        rollup_widths: &[Duration],
        limit: usize,
    ) -> Result<Option<Vec<Bucket>>> {
        let filter = filter.clone();
        // One past the limit: enough to know the answer is too large.
        let rows_wanted = limit.saturating_add(1).min(i64::MAX as usize);
        let rollup = usable_rollup(&filter, width, rollup_widths);
        let width_secs = width.map(|w| w.as_secs().max(1));
        self.run(move |connection| {
            // Integer bucket index: floor division that also floors before the epoch.
            let bucket = |column: &str| match width_secs {
                None => "0".to_string(),
                Some(w) => {
                    let w = w as i64 * 1_000_000;
                    format!("(CASE WHEN {column} >= 0 THEN {column} / {w} ELSE -((-{column} - 1) / {w}) - 1 END)")
                }
            };
            let run = |sql: String| -> Result<Vec<Bucket>> {
                let mut values = vec![
                    Value::Text(filter.farm_id.to_string()),
                    Value::Integer(to_unix_micros(filter.start)),
                    Value::Integer(to_unix_micros(filter.end)),
                ];
                let sql = sql.replace("{filters}", &filter_clause(&filter, &mut values));
                let mut statement = connection.prepare(&sql).map_err(sql_error("prepare the bucket query"))?;
                let rows = statement
                    .query_map(params_from_iter(values), |row| {
                        Ok((
                            uuid_text(row, 0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, i64>(2)?,
                            row.get::<_, i64>(3)?,
                            row.get::<_, f64>(4)?,
                            row.get::<_, f64>(5)?,
                            row.get::<_, f64>(6)?,
                        ))
                    })
                    .map_err(sql_error("aggregate readings"))?;
                let rows = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read a bucket"))?;
                Ok(rows
                    .into_iter()
                    .map(|(device_id, metric, index, count, min, max, avg)| {
                        let (start, end) = bucket_bounds(&filter, width_secs, index);
                        Bucket { device_id, metric, start, end, count: count as u64, min, max, avg }
                    })
                    .collect())
            };
            let main = match rollup {
                Some(rollup) => format!(
                    "SELECT device_id, m.name, {b} AS b, SUM(count), MIN(min), MAX(max), SUM(sum) / SUM(count)
                     FROM reading_rollups JOIN metric_names m ON m.id = metric_id
                     WHERE width = {rollup} AND farm_id = ?1 AND bucket >= ?2 AND bucket < ?3 {{filters}}
                     GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT {rows_wanted}",
                    b = bucket("bucket")
                ),
                None => format!(
                    "SELECT device_id, m.name, {b} AS b, COUNT(*), MIN(value), MAX(value), AVG(value)
                     FROM readings JOIN reading_series s ON s.id = series_id JOIN metric_names m ON m.id = s.metric_id
                     WHERE s.farm_id = ?1 AND time >= ?2 AND time < ?3 {{filters}}
                     GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT {rows_wanted}",
                    b = bucket("time")
                ),
            };
            let edge = format!(
                "SELECT device_id, m.name, {b} AS b, SUM(count), MIN(min), MAX(max), SUM(avg * count) / SUM(count)
                 FROM edge_aggregates JOIN metric_names m ON m.id = metric_id
                 WHERE farm_id = ?1 AND window_start >= ?2 AND window_start < ?3 {{filters}}
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT {rows_wanted}",
                b = bucket("window_start")
            );
            Ok(merge_edge_buckets(run(main)?, run(edge)?, limit))
        })
        .await
    }

    async fn latest_readings(&self, farm_id: Uuid, device_ids: &[Uuid]) -> Result<Vec<StoredReading>> {
        let filter = ReadingFilter {
            farm_id,
            device_ids: device_ids.to_vec(),
            metrics: Vec::new(),
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
        };
        self.run(move |connection| {
            let mut values = vec![Value::Text(farm_id.to_string())];
            let sql = format!(
                "SELECT r.time, r.device_id, m.name, r.value, r.receive_time, r.sequence
                 FROM latest_readings r JOIN metric_names m ON m.id = r.metric_id
                 WHERE r.farm_id = ?1 {} ORDER BY r.device_id, m.name",
                filter_clause(&filter, &mut values).replace("device_id", "r.device_id")
            );
            let mut statement = connection.prepare(&sql).map_err(sql_error("prepare the latest query"))?;
            let rows = statement
                .query_map(params_from_iter(values), stored_reading)
                .map_err(sql_error("read latest readings"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_error("read a latest reading"))
        })
        .await
    }

    async fn apply_retention(&self, retention: Retention, now: SystemTime) -> Result<u64> {
        let raw_cutoff = to_unix_micros(now.checked_sub(retention.raw).unwrap_or(SystemTime::UNIX_EPOCH));
        let rollup_cutoff = to_unix_micros(now.checked_sub(retention.rollups).unwrap_or(SystemTime::UNIX_EPOCH));
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin retention"))?;
            let deleted = transaction
                .execute("DELETE FROM readings WHERE time < ?1", [raw_cutoff])
                .map_err(sql_error("delete expired readings"))?;
            transaction
                .execute("DELETE FROM edge_aggregates WHERE window_end <= ?1", [raw_cutoff])
                .map_err(sql_error("delete expired edge aggregates"))?;
            transaction
                .execute("DELETE FROM reading_rollups WHERE bucket + width * 1000000 <= ?1", [rollup_cutoff])
                .map_err(sql_error("delete expired rollups"))?;
            // Their readings are gone: nothing is left to score.
            transaction
                .execute("DELETE FROM unscored_batches WHERE receive_time <= ?1", [raw_cutoff])
                .map_err(sql_error("delete expired batches to score"))?;
            transaction.commit().map_err(sql_error("commit retention"))?;
            Ok(deleted as u64)
        })
        .await
    }

    async fn claim_unscored(
        &self,
        received_before: SystemTime,
        now: SystemTime,
        lease: Duration,
        limit: usize,
        except: &[BatchKey],
    ) -> Result<Vec<UnscoredBatch>> {
        let (received_before, now_micros) = (to_unix_micros(received_before), to_unix_micros(now));
        let claimed_until = to_unix_micros(now + lease);
        let except: std::collections::HashSet<BatchKey> = except.iter().copied().collect();
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin a claim of batches to score"))?;
            let rows = {
                let mut statement = transaction
                    .prepare(
                        "SELECT gateway_id, spool_id, last_sequence, farm_id, series, receive_time, attempts
                         FROM unscored_batches
                         WHERE receive_time < ?1 AND (claimed_until IS NULL OR claimed_until <= ?2)
                         ORDER BY receive_time, last_sequence",
                    )
                    .map_err(sql_error("prepare the claim of batches to score"))?;
                let rows = statement
                    .query_map(params![received_before, now_micros], |row| {
                        Ok((
                            uuid_text(row, 0)?,
                            uuid_text(row, 1)?,
                            row.get::<_, i64>(2)?,
                            uuid_text(row, 3)?,
                            row.get::<_, String>(4)?,
                            row.get::<_, i64>(5)?,
                            row.get::<_, i64>(6)?,
                        ))
                    })
                    .map_err(sql_error("read batches to score"))?;
                let mut kept = Vec::new();
                for row in rows {
                    let row = row.map_err(sql_error("read a batch to score"))?;
                    let key = BatchKey { gateway_id: row.0, spool_id: row.1, last_sequence: row.2 as u64 };
                    if except.contains(&key) {
                        continue;
                    }
                    kept.push(row);
                    if kept.len() == limit {
                        break;
                    }
                }
                kept
            };
            let mut batches = Vec::with_capacity(rows.len());
            for (gateway, spool, last_sequence, farm, series, receive_time, attempts) in rows {
                transaction
                    .execute(
                        "UPDATE unscored_batches SET claimed_until = ?4, attempts = attempts + 1
                         WHERE gateway_id = ?1 AND spool_id = ?2 AND last_sequence = ?3",
                        params![gateway.to_string(), spool.to_string(), last_sequence, claimed_until],
                    )
                    .map_err(sql_error("claim a batch to score"))?;
                let series: serde_json::Value = serde_json::from_str(&series)
                    .map_err(|error| smartfarm_core::Error::internal("read a stored batch's series list", error))?;
                batches.push(UnscoredBatch {
                    key: BatchKey { gateway_id: gateway, spool_id: spool, last_sequence: last_sequence as u64 },
                    farm_id: farm,
                    series: series_from_json(&series)?,
                    receive_time: from_unix_micros(receive_time),
                    attempts: attempts as u32 + 1,
                });
            }
            transaction.commit().map_err(sql_error("commit a claim of batches to score"))?;
            Ok(batches)
        })
        .await
    }

    async fn forget_unscored(&self, keys: &[BatchKey]) -> Result<()> {
        let keys = keys.to_vec();
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin confirming scored batches"))?;
            for key in keys {
                transaction
                    .execute(
                        "DELETE FROM unscored_batches WHERE gateway_id = ?1 AND spool_id = ?2 AND last_sequence = ?3",
                        params![key.gateway_id.to_string(), key.spool_id.to_string(), key.last_sequence as i64],
                    )
                    .map_err(sql_error("confirm a scored batch"))?;
            }
            transaction.commit().map_err(sql_error("commit confirming scored batches"))
        })
        .await
    }

    async fn release_unscored(&self, keys: &[BatchKey], claimed_until: SystemTime) -> Result<()> {
        let (keys, claimed_until) = (keys.to_vec(), to_unix_micros(claimed_until));
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin giving back claims to score"))?;
            for key in keys {
                transaction
                    .execute(
                        "UPDATE unscored_batches SET claimed_until = NULL, attempts = MAX(attempts - 1, 0)
                         WHERE gateway_id = ?1 AND spool_id = ?2 AND last_sequence = ?3 AND claimed_until = ?4",
                        params![
                            key.gateway_id.to_string(),
                            key.spool_id.to_string(),
                            key.last_sequence as i64,
                            claimed_until
                        ],
                    )
                    .map_err(sql_error("give back a claim to score"))?;
            }
            transaction.commit().map_err(sql_error("commit giving back claims to score"))
        })
        .await
    }

    async fn align_rollups(&self, widths: &[Duration]) -> Result<RollupsAligned> {
        let wanted: std::collections::BTreeSet<i64> =
            widths.iter().map(|width| width.as_secs().clamp(1, i64::MAX as u64 / 1_000_000) as i64).collect();
        // One connection: commits wait for this transaction.
        self.run(move |connection| {
            let transaction = connection.transaction().map_err(sql_error("begin aligning rollups"))?;
            let recorded: std::collections::BTreeSet<i64> = {
                let mut statement =
                    transaction.prepare("SELECT width FROM rollup_widths").map_err(sql_error("read rollup widths"))?;
                let rows = statement.query_map([], |row| row.get(0)).map_err(sql_error("read rollup widths"))?;
                rows.collect::<rusqlite::Result<_>>().map_err(sql_error("read a rollup width"))?
            };
            let mut aligned = RollupsAligned::default();
            for width in recorded.difference(&wanted) {
                // Its rows stay (a replica with another configuration must not destroy what it does not know); they
                // are replaced if the width is configured again.
                transaction
                    .execute("DELETE FROM rollup_widths WHERE width = ?1", [width])
                    .map_err(sql_error("forget a rollup width"))?;
                aligned.removed.push(*width as u64);
            }
            for width in wanted.difference(&recorded) {
                // Left over from when the width was kept before (or from before this table): replaced, not added to.
                transaction
                    .execute("DELETE FROM reading_rollups WHERE width = ?1", [width])
                    .map_err(sql_error("delete a width's rollups"))?;
                // Bucket starts in microseconds, floored before the epoch too.
                transaction
                    .execute(
                        "INSERT INTO reading_rollups (width, bucket, farm_id, device_id, metric_id, count, sum, min, max)
                         SELECT ?1, (CASE WHEN time >= 0 THEN time / (?1 * 1000000)
                                          ELSE -((-time - 1) / (?1 * 1000000)) - 1 END) * ?1 * 1000000,
                                s.farm_id, s.device_id, s.metric_id, COUNT(*), SUM(value), MIN(value), MAX(value)
                         FROM readings JOIN reading_series s ON s.id = series_id GROUP BY 2, 3, 4, 5",
                        [width],
                    )
                    .map_err(sql_error("fill a new width's rollups"))?;
                transaction
                    .execute("INSERT INTO rollup_widths (width) VALUES (?1)", [width])
                    .map_err(sql_error("record a rollup width"))?;
                aligned.added.push(*width as u64);
            }
            transaction.commit().map_err(sql_error("commit the rollup widths"))?;
            Ok(aligned)
        })
        .await
    }
}
