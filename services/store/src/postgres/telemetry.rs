//! [`TelemetryStore`] on PostgreSQL: binary COPY into the readings table (monthly partitions on plain PostgreSQL,
//! a hypertable with TimescaleDB), the gateway's mark, rollups and latest values, all in one transaction. A reading
//! row names its series (farm, device, metric) by a small integer from `reading_series`, interned like metric names.

use std::collections::{BTreeSet, HashMap};
use std::pin::pin;
use std::time::{Duration, SystemTime};

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use smartfarm_core::time::{from_unix_micros, to_unix_micros};
use smartfarm_core::{Error, Result};

use super::{PostgresStore, pg_error, sql_count};
use smartfarm_core::batch::BatchKey;

use crate::telemetry::{
    BatchOutcome, Bucket, EdgeBatch, ReadingCursor, ReadingFilter, ReadingRow, Retention, RollupsAligned,
    StoredReading, TelemetryStore, UnscoredBatch, batch_series, bucket_bounds, latest_per_series, merge_edge_buckets,
    rollup_increments, series_from_json, series_to_json, usable_rollup,
};

/// How the readings table is laid out, read from the catalog once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadingsLayout {
    /// Plain PostgreSQL: range partitions by month, made on demand.
    Partitioned,
    /// TimescaleDB: a hypertable, chunks managed by the extension.
    Hypertable,
}

impl PostgresStore {
    async fn readings_layout(&self) -> Result<ReadingsLayout> {
        if let Some(layout) = *self.telemetry.layout.lock().expect("layout lock") {
            return Ok(layout);
        }
        let client = self.client().await?;
        let row = client
            .query_one("SELECT relkind::text FROM pg_class WHERE relname = 'readings' AND relnamespace = current_schema()::regnamespace", &[])
            .await
            .map_err(pg_error("inspect the readings table"))?;
        let layout =
            if row.get::<_, String>(0) == "p" { ReadingsLayout::Partitioned } else { ReadingsLayout::Hypertable };
        *self.telemetry.layout.lock().expect("layout lock") = Some(layout);
        Ok(layout)
    }

    /// The ids of these metric names, interning the new ones. Names are never deleted, so the cache stays valid.
    async fn metric_ids(&self, names: &BTreeSet<&str>) -> Result<HashMap<String, i32>> {
        let mut ids = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.telemetry.metric_ids.lock().expect("metric cache lock");
            for name in names {
                match cache.get(*name) {
                    Some(id) => {
                        ids.insert(name.to_string(), *id);
                    }
                    None => missing.push(name.to_string()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(ids);
        }
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO metric_names (name) SELECT unnest($1::text[]) ON CONFLICT (name) DO NOTHING",
                &[&missing],
            )
            .await
            .map_err(pg_error("intern metric names"))?;
        let rows = client
            .query("SELECT id, name FROM metric_names WHERE name = ANY($1)", &[&missing])
            .await
            .map_err(pg_error("read metric ids"))?;
        let mut cache = self.telemetry.metric_ids.lock().expect("metric cache lock");
        for row in rows {
            let (id, name): (i32, String) = (row.get(0), row.get(1));
            cache.insert(name.clone(), id);
            ids.insert(name, id);
        }
        Ok(ids)
    }

    /// The ids of these series of a farm (device, metric id), interning the new ones.
    async fn series_ids(&self, farm_id: Uuid, series: &BTreeSet<(Uuid, i32)>) -> Result<HashMap<(Uuid, i32), i32>> {
        let mut ids = HashMap::new();
        let mut missing_devices = Vec::new();
        let mut missing_metrics = Vec::new();
        {
            let mut cache = self.telemetry.series_ids.lock().expect("series cache lock");
            for &(device_id, metric_id) in series {
                match cache.get(&(farm_id, device_id, metric_id)) {
                    Some(id) => {
                        ids.insert((device_id, metric_id), *id);
                    }
                    None => {
                        missing_devices.push(device_id);
                        missing_metrics.push(metric_id);
                    }
                }
            }
        }
        if missing_devices.is_empty() {
            return Ok(ids);
        }
        let client = self.client().await?;
        let mut found = read_series_ids(&client, farm_id, &missing_devices, &missing_metrics).await?;
        if found.len() < missing_devices.len() {
            // Only the series not found are inserted: an insert that meets a conflict still takes an id from the
            // sequence, and a process reading its series again (after a restart, or once its cache is full) must not
            // use the ids up. The conflict clause is for another writer interning the same series meanwhile; sorted
            // (from a BTreeSet), two such writers take their row locks in one order.
            let (new_devices, new_metrics): (Vec<Uuid>, Vec<i32>) = missing_devices
                .iter()
                .zip(&missing_metrics)
                .filter(|(device_id, metric_id)| !found.contains_key(&(**device_id, **metric_id)))
                .map(|(device_id, metric_id)| (*device_id, *metric_id))
                .unzip();
            client
                .execute(
                    "INSERT INTO reading_series (farm_id, device_id, metric_id)
                     SELECT $1, d, m FROM unnest($2::uuid[], $3::int[]) AS t(d, m)
                     ON CONFLICT (device_id, metric_id, farm_id) DO NOTHING",
                    &[&farm_id, &new_devices, &new_metrics],
                )
                .await
                .map_err(pg_error("intern reading series"))?;
            found.extend(read_series_ids(&client, farm_id, &new_devices, &new_metrics).await?);
        }
        let mut cache = self.telemetry.series_ids.lock().expect("series cache lock");
        for ((device_id, metric_id), id) in found {
            cache.insert((farm_id, device_id, metric_id), id);
            ids.insert((device_id, metric_id), id);
        }
        Ok(ids)
    }

    /// One try at [`TelemetryStore::commit_batch`].
    async fn commit_batch_attempt(&self, batch: &EdgeBatch, rollup_widths: &[Duration]) -> Result<BatchOutcome> {
        let names: BTreeSet<&str> = batch
            .readings
            .iter()
            .map(|r| r.metric.as_str())
            .chain(batch.aggregates.iter().map(|a| a.metric.as_str()))
            .collect();
        let metric_ids = self.metric_ids(&names).await?;
        self.ensure_partitions(batch.readings.iter().map(|r| r.measure_time)).await?;
        let metric_id = |name: &str| {
            metric_ids
                .get(name)
                .copied()
                .ok_or_else(|| Error::Internal { context: format!("metric {name:?} was not interned"), source: None })
        };
        let series: BTreeSet<(Uuid, i32)> =
            batch.readings.iter().map(|r| Ok((r.device_id, metric_id(&r.metric)?))).collect::<Result<_>>()?;
        let series_ids = self.series_ids(batch.farm_id, &series).await?;
        let series_id = |device_id: Uuid, metric: &str| -> Result<i32> {
            let metric = metric_id(metric)?;
            series_ids.get(&(device_id, metric)).copied().ok_or_else(|| Error::Internal {
                context: format!("series ({device_id}, {metric}) was not interned"),
                source: None,
            })
        };
        // The rollup and latest-value rows are worked out before the transaction opens, so the database does not
        // wait on them inside it; only a resend that overlaps the mark needs them again, from the rows it keeps.
        let all_readings: Vec<&ReadingRow> = batch.readings.iter().collect();
        let mut derived = DerivedRows::of(&all_readings, rollup_widths, &metric_id)?;
        // The batch's entry in the list of batches to score, likewise.
        let listed = |readings: &[&ReadingRow]| {
            (batch.score_later && !readings.is_empty()).then(|| series_to_json(&batch_series(readings)))
        };
        let mut listed_series = listed(&all_readings);

        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin batch"))?;
        transaction
            .execute(
                "INSERT INTO edge_streams (gateway_id, spool_id, farm_id, committed_sequence, update_time) VALUES ($1, $2, $3, 0, $4)
                 ON CONFLICT (gateway_id, spool_id) DO NOTHING",
                &[&batch.gateway_id, &batch.spool_id, &batch.farm_id, &batch.receive_time],
            )
            .await
            .map_err(pg_error("register the edge stream"))?;
        // The row lock serialises batches of one gateway (a reconnect racing the old stream), so the mark check
        // and the write cannot interleave.
        let committed: i64 = transaction
            .query_one(
                "SELECT committed_sequence FROM edge_streams WHERE gateway_id = $1 AND spool_id = $2 FOR UPDATE",
                &[&batch.gateway_id, &batch.spool_id],
            )
            .await
            .map_err(pg_error("lock the edge mark"))?
            .get(0);
        let committed = committed as u64;
        if batch.last_sequence <= committed {
            return Ok(BatchOutcome::Duplicate);
        }
        let readings: Vec<_> = batch.readings.iter().filter(|r| r.sequence > committed).collect();
        let aggregates: Vec<_> = batch.aggregates.iter().filter(|a| a.sequence > committed).collect();
        if readings.len() != all_readings.len() {
            derived = DerivedRows::of(&readings, rollup_widths, &metric_id)?;
            listed_series = listed(&readings);
        }

        if !readings.is_empty() {
            let sink = transaction
                .copy_in("COPY readings (time, series_id, value, sequence, receive_time) FROM STDIN (FORMAT binary)")
                .await
                .map_err(pg_error("start copying readings"))?;
            let types = [Type::TIMESTAMPTZ, Type::INT4, Type::FLOAT8, Type::INT8, Type::TIMESTAMPTZ];
            let mut writer = pin!(BinaryCopyInWriter::new(sink, &types));
            for (at, reading) in readings.iter().enumerate() {
                // The writer buffers, so its writes mostly complete at once: without a yield, a group of tens of
                // thousands of readings would hold an async worker for milliseconds, and the alerts and streams
                // waiting on it with it.
                if at % COPY_ROWS_BETWEEN_YIELDS == COPY_ROWS_BETWEEN_YIELDS - 1 {
                    tokio::task::yield_now().await;
                }
                let series = series_id(reading.device_id, &reading.metric)?;
                let sequence = reading.sequence as i64;
                writer
                    .as_mut()
                    .write(&[&reading.measure_time, &series, &reading.value, &sequence, &batch.receive_time])
                    .await
                    .map_err(|error| self.copy_failed("copy a reading", error))?;
            }
            writer.finish().await.map_err(|error| self.copy_failed("finish copying readings", error))?;
        }

        if !aggregates.is_empty() {
            let sink = transaction
                .copy_in(
                    "COPY edge_aggregates (window_start, window_end, farm_id, device_id, metric_id, count, min, max, avg, last, sequence, receive_time) FROM STDIN (FORMAT binary)",
                )
                .await
                .map_err(pg_error("start copying aggregates"))?;
            let types = [
                Type::TIMESTAMPTZ,
                Type::TIMESTAMPTZ,
                Type::UUID,
                Type::UUID,
                Type::INT4,
                Type::INT8,
                Type::FLOAT8,
                Type::FLOAT8,
                Type::FLOAT8,
                Type::FLOAT8,
                Type::INT8,
                Type::TIMESTAMPTZ,
            ];
            let mut writer = pin!(BinaryCopyInWriter::new(sink, &types));
            for aggregate in &aggregates {
                let metric = metric_id(&aggregate.metric)?;
                let (count, sequence) = (aggregate.count as i64, aggregate.sequence as i64);
                writer
                    .as_mut()
                    .write(&[
                        &aggregate.window_start,
                        &aggregate.window_end,
                        &batch.farm_id,
                        &aggregate.device_id,
                        &metric,
                        &count,
                        &aggregate.min,
                        &aggregate.max,
                        &aggregate.avg,
                        &aggregate.last,
                        &sequence,
                        &batch.receive_time,
                    ])
                    .await
                    .map_err(pg_error("copy an aggregate"))?;
            }
            writer.finish().await.map_err(pg_error("finish copying aggregates"))?;
        }

        // Rollups and latest values: one upsert each, with arrays, whatever the batch size.
        let rollups = &derived.rollups;
        if !rollups.widths.is_empty() {
            let params: [&(dyn ToSql + Sync); 9] = [
                &rollups.widths,
                &rollups.buckets,
                &batch.farm_id,
                &rollups.devices,
                &rollups.metrics,
                &rollups.counts,
                &rollups.sums,
                &rollups.mins,
                &rollups.maxes,
            ];
            transaction
                .execute(
                    "INSERT INTO reading_rollups (width, bucket, farm_id, device_id, metric_id, count, sum, min, max)
                     SELECT w, b, $3, d, m, c, s, mn, mx
                     FROM unnest($1::int[], $2::timestamptz[], $4::uuid[], $5::int[], $6::bigint[], $7::float8[], $8::float8[], $9::float8[])
                          AS t(w, b, d, m, c, s, mn, mx)
                     ON CONFLICT (width, device_id, metric_id, bucket) DO UPDATE SET
                         count = reading_rollups.count + excluded.count,
                         sum = reading_rollups.sum + excluded.sum,
                         min = LEAST(reading_rollups.min, excluded.min),
                         max = GREATEST(reading_rollups.max, excluded.max)",
                    &params,
                )
                .await
                .map_err(pg_error("update rollups"))?;
        }
        let latest = &derived.latest;
        if !latest.devices.is_empty() {
            let params: [&(dyn ToSql + Sync); 7] = [
                &latest.devices,
                &latest.metrics,
                &batch.farm_id,
                &latest.times,
                &latest.values,
                &latest.sequences,
                &batch.receive_time,
            ];
            transaction
                .execute(
                    "INSERT INTO latest_readings (device_id, metric_id, farm_id, time, value, sequence, receive_time)
                     SELECT d, m, $3, t, v, s, $7
                     FROM unnest($1::uuid[], $2::int[], $4::timestamptz[], $5::float8[], $6::bigint[]) AS u(d, m, t, v, s)
                     ON CONFLICT (device_id, metric_id) DO UPDATE SET
                         time = excluded.time, value = excluded.value, sequence = excluded.sequence,
                         receive_time = excluded.receive_time, farm_id = excluded.farm_id
                     WHERE (excluded.time, excluded.sequence) > (latest_readings.time, latest_readings.sequence)",
                    &params,
                )
                .await
                .map_err(pg_error("update latest readings"))?;
        }

        let last_sequence = batch.last_sequence as i64;
        let mark: [&(dyn ToSql + Sync); 4] = [&batch.gateway_id, &batch.spool_id, &last_sequence, &batch.receive_time];
        let moved = transaction.execute(
            "UPDATE edge_streams SET committed_sequence = $3, update_time = $4 WHERE gateway_id = $1 AND spool_id = $2",
            &mark,
        );
        if let Some(series) = &listed_series {
            // Pipelined with the mark's move: one round trip for both.
            let listing: [&(dyn ToSql + Sync); 6] =
                [&batch.gateway_id, &batch.spool_id, &last_sequence, &batch.farm_id, series, &batch.receive_time];
            let listed = transaction.execute(
                "INSERT INTO unscored_batches (gateway_id, spool_id, last_sequence, farm_id, series, receive_time)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &listing,
            );
            let (moved, listed) = tokio::join!(moved, listed);
            moved.map_err(pg_error("move the edge mark"))?;
            listed.map_err(pg_error("list the batch for scoring"))?;
        } else {
            moved.await.map_err(pg_error("move the edge mark"))?;
        }
        transaction.commit().await.map_err(pg_error("commit batch"))?;
        Ok(BatchOutcome::Committed { readings: readings.len(), aggregates: aggregates.len(), above: committed })
    }

    /// The error of a failed readings COPY. A row with no partition means another replica's retention dropped a
    /// partition this process still had cached: forget the cache, so the batch's retry makes the partition again.
    fn copy_failed(&self, context: &'static str, error: tokio_postgres::Error) -> Error {
        if error.code() == Some(&SqlState::CHECK_VIOLATION) {
            self.telemetry.partitions.lock().expect("partition cache lock").clear();
            self.telemetry.partition_resets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        pg_error(context)(error)
    }

    /// Makes sure a monthly partition exists for every month the times fall in (plain PostgreSQL only).
    async fn ensure_partitions(&self, times: impl Iterator<Item = SystemTime>) -> Result<()> {
        if self.readings_layout().await? != ReadingsLayout::Partitioned {
            return Ok(());
        }
        let months: BTreeSet<(i32, u32)> = times.map(month_of).collect();
        let missing: Vec<(i32, u32)> = {
            let known = self.telemetry.partitions.lock().expect("partition cache lock");
            months.into_iter().filter(|month| !known.contains(month)).collect()
        };
        for (year, month) in missing {
            let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS readings_p{year:04}{month:02} PARTITION OF readings \
                 FOR VALUES FROM ('{year:04}-{month:02}-01 00:00:00+00') TO ('{next_year:04}-{next_month:02}-01 00:00:00+00')"
            );
            let client = self.client().await?;
            match client.batch_execute(&sql).await {
                Ok(()) => {}
                // Another replica or link made it between our IF NOT EXISTS check and the create (concurrent creates
                // can also collide on the catalog's unique indexes).
                Err(error)
                    if error.code() == Some(&SqlState::DUPLICATE_TABLE)
                        || error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
                Err(error) => return Err(pg_error("create a readings partition")(error)),
            }
            self.telemetry.partitions.lock().expect("partition cache lock").insert((year, month));
        }
        Ok(())
    }
}

/// The rollup increments and latest values of a batch's readings, as the arrays their upserts take.
struct DerivedRows {
    rollups: RollupArrays,
    latest: LatestArrays,
}

#[derive(Default)]
struct RollupArrays {
    widths: Vec<i32>,
    buckets: Vec<SystemTime>,
    devices: Vec<Uuid>,
    metrics: Vec<i32>,
    counts: Vec<i64>,
    sums: Vec<f64>,
    mins: Vec<f64>,
    maxes: Vec<f64>,
}

#[derive(Default)]
struct LatestArrays {
    devices: Vec<Uuid>,
    metrics: Vec<i32>,
    times: Vec<SystemTime>,
    values: Vec<f64>,
    sequences: Vec<i64>,
}

impl DerivedRows {
    fn of(
        readings: &[&ReadingRow],
        rollup_widths: &[Duration],
        metric_id: &impl Fn(&str) -> Result<i32>,
    ) -> Result<DerivedRows> {
        let mut rollups = RollupArrays::default();
        for ((width, device, metric, bucket), increment) in rollup_increments(readings, rollup_widths) {
            rollups.widths.push(width as i32);
            rollups.buckets.push(from_unix_micros(bucket * 1_000_000));
            rollups.devices.push(device);
            rollups.metrics.push(metric_id(metric)?);
            rollups.counts.push(increment.count as i64);
            rollups.sums.push(increment.sum);
            rollups.mins.push(increment.min);
            rollups.maxes.push(increment.max);
        }
        let mut latest = LatestArrays::default();
        for ((device, metric), reading) in latest_per_series(readings) {
            latest.devices.push(device);
            latest.metrics.push(metric_id(metric)?);
            latest.times.push(reading.measure_time);
            latest.values.push(reading.value);
            latest.sequences.push(reading.sequence as i64);
        }
        Ok(DerivedRows { rollups, latest })
    }
}

/// The ids of a farm's series among these (device, metric id) pairs, those that exist.
async fn read_series_ids(
    client: &tokio_postgres::Client,
    farm_id: Uuid,
    devices: &[Uuid],
    metrics: &[i32],
) -> Result<HashMap<(Uuid, i32), i32>> {
    let rows = client
        .query(
            "SELECT s.id, s.device_id, s.metric_id
             FROM reading_series s JOIN unnest($2::uuid[], $3::int[]) AS t(d, m) ON s.device_id = t.d AND s.metric_id = t.m
             WHERE s.farm_id = $1",
            &[&farm_id, &devices, &metrics],
        )
        .await
        .map_err(pg_error("read reading series ids"))?;
    Ok(rows.iter().map(|row| ((row.get(1), row.get(2)), row.get(0))).collect())
}

/// (year, month) of a time, in UTC; times before year 1 or after 9999 are clamped into that range.
fn month_of(time: SystemTime) -> (i32, u32) {
    let days = to_unix_micros(time).div_euclid(86_400_000_000);
    let (year, month, _) = civil_from_days(days);
    (year.clamp(1, 9999), month)
}

/// Howard Hinnant's days-to-civil algorithm: (year, month, day) of a count of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// The first instant of a (year, month), as a time.
fn month_start(year: i32, month: u32) -> SystemTime {
    // Days from civil, the inverse of civil_from_days.
    let (y, m) = if month <= 2 { (year as i64 - 1, month as i64 + 9) } else { (year as i64, month as i64 - 3) };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * m + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    from_unix_micros(days * 86_400_000_000)
}

const READING_COLUMNS: &str = "r.time, r.device_id, m.name, r.value, r.receive_time, r.sequence";

/// How many series ids a process remembers at most: about 100 bytes each with the tables' overhead, so about 25 MB.
const SERIES_CACHE_LIMIT: usize = 250_000;

/// Series ids by (farm, device, metric id), the most recently used up to [`SERIES_CACHE_LIMIT`] (two generations
/// of half the limit each). A lookup moves what it finds into the current generation; when that is full, the older
/// generation is dropped and the current one becomes it. So the series in use stay cached whatever the number of
/// series known, and only those not used for a generation are read again (one round trip for a batch's misses),
/// where clearing everything at the limit would make every batch of every farm miss at once.
#[derive(Default)]
pub(crate) struct SeriesCache {
    current: HashMap<(Uuid, Uuid, i32), i32>,
    older: HashMap<(Uuid, Uuid, i32), i32>,
}

impl SeriesCache {
    fn get(&mut self, key: &(Uuid, Uuid, i32)) -> Option<&i32> {
        if !self.current.contains_key(key) {
            let id = self.older.remove(key)?;
            self.insert(*key, id);
        }
        self.current.get(key)
    }

    fn insert(&mut self, key: (Uuid, Uuid, i32), id: i32) {
        if self.current.len() >= SERIES_CACHE_LIMIT / 2 {
            self.older = std::mem::take(&mut self.current);
        }
        self.current.insert(key, id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.older.len()
    }
}

fn stored_reading(row: &tokio_postgres::Row) -> StoredReading {
    StoredReading {
        measure_time: row.get(0),
        device_id: row.get(1),
        metric: row.get(2),
        value: row.get(3),
        receive_time: row.get(4),
        sequence: row.get::<_, i64>(5) as u64,
    }
}

/// Batch keys as the three arrays an `unnest($1::uuid[], $2::uuid[], $3::bigint[])` takes.
fn key_columns(keys: &[BatchKey]) -> (Vec<Uuid>, Vec<Uuid>, Vec<i64>) {
    (
        keys.iter().map(|key| key.gateway_id).collect(),
        keys.iter().map(|key| key.spool_id).collect(),
        keys.iter().map(|key| key.last_sequence as i64).collect(),
    )
}

#[async_trait::async_trait]
impl TelemetryStore for PostgresStore {
    async fn committed_sequence(&self, gateway_id: Uuid, spool_id: Uuid) -> Result<u64> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT committed_sequence FROM edge_streams WHERE gateway_id = $1 AND spool_id = $2",
                &[&gateway_id, &spool_id],
            )
            .await
            .map_err(pg_error("read the edge mark"))?;
        Ok(row.map(|row| row.get::<_, i64>(0) as u64).unwrap_or(0))
    }

    async fn commit_batch(&self, batch: &EdgeBatch, rollup_widths: &[Duration]) -> Result<BatchOutcome> {
        let resets = self.telemetry.partition_resets.load(std::sync::atomic::Ordering::Relaxed);
        match self.commit_batch_attempt(batch, rollup_widths).await {
            // A partition this process believed in was gone (another replica's retention): once more, making it.
            Err(_) if self.telemetry.partition_resets.load(std::sync::atomic::Ordering::Relaxed) != resets => {
                self.commit_batch_attempt(batch, rollup_widths).await
            }
            outcome => outcome,
        }
    }

    async fn query_readings(
        &self,
        filter: &ReadingFilter,
        cursor: Option<&ReadingCursor>,
        limit: usize,
    ) -> Result<Vec<StoredReading>> {
        let client = self.client().await?;
        let cursor_time = cursor.map(|c| c.measure_time);
        let cursor_device = cursor.map(|c| c.device_id);
        let cursor_metric = cursor.map(|c| c.metric.clone());
        let cursor_sequence = cursor.map(|c| c.sequence as i64);
        let limit = limit as i64;
        let params: [&(dyn ToSql + Sync); 10] = [
            &filter.farm_id,
            &filter.start,
            &filter.end,
            &filter.device_ids,
            &filter.metrics,
            &cursor_time,
            &cursor_device,
            &cursor_metric,
            &cursor_sequence,
            &limit,
        ];
        let rows = client
            .query(
                r#"SELECT r.time, s.device_id, m.name, r.value, r.receive_time, r.sequence
                 FROM readings r JOIN reading_series s ON s.id = r.series_id JOIN metric_names m ON m.id = s.metric_id
                 WHERE s.farm_id = $1 AND r.time >= $2 AND r.time < $3
                   AND (cardinality($4::uuid[]) = 0 OR s.device_id = ANY($4))
                   AND (cardinality($5::text[]) = 0 OR m.name = ANY($5))
                   AND ($6::timestamptz IS NULL
                        OR (r.time, s.device_id, m.name COLLATE "C", r.sequence) > ($6, $7::uuid, $8::text COLLATE "C", $9::bigint))
                 ORDER BY r.time, s.device_id, m.name COLLATE "C", r.sequence
                 LIMIT $10"#,
                &params,
            )
            .await
            .map_err(pg_error("query readings"))?;
        Ok(rows.iter().map(stored_reading).collect())
    }

    async fn query_buckets(
        &self,
        filter: &ReadingFilter,
        width: Option<Duration>,
        rollup_widths: &[Duration],
        limit: usize,
    ) -> Result<Option<Vec<Bucket>>> {
        let client = self.client().await?;
        let width_secs = width.map(|w| w.as_secs().max(1));
        // NULL width groups the whole range into one bucket (index 0).
        let width_param = width_secs.map(|w| w as f64);
        let bucket_expr = |column: &str| {
            format!("CASE WHEN $6::float8 IS NULL THEN 0 ELSE floor(extract(epoch FROM {column}) / $6)::bigint END")
        };
        let filters = "farm_id = $1 AND (cardinality($4::uuid[]) = 0 OR device_id = ANY($4))
                       AND (cardinality($5::text[]) = 0 OR m.name = ANY($5))";
        let main_sql = match usable_rollup(filter, width, rollup_widths) {
            Some(rollup) => format!(
                "SELECT device_id, m.name, {bucket} AS b, sum(count)::bigint, min(min), max(max), sum(sum) / sum(count)
                 FROM reading_rollups JOIN metric_names m ON m.id = metric_id
                 WHERE width = {rollup} AND {filters} AND bucket >= $2 AND bucket < $3
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT $7",
                bucket = bucket_expr("bucket")
            ),
            None => format!(
                "SELECT device_id, m.name, {bucket} AS b, count(*), min(value), max(value), avg(value)
                 FROM readings JOIN reading_series s ON s.id = series_id JOIN metric_names m ON m.id = s.metric_id
                 WHERE {filters} AND time >= $2 AND time < $3
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT $7",
                bucket = bucket_expr("time")
            ),
        };
        let edge_sql = format!(
            "SELECT device_id, m.name, {bucket} AS b, sum(count)::bigint, min(min), max(max), sum(avg * count) / sum(count)
             FROM edge_aggregates JOIN metric_names m ON m.id = metric_id
             WHERE {filters} AND window_start >= $2 AND window_start < $3
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 LIMIT $7",
            bucket = bucket_expr("window_start")
        );
        // One past the limit: enough to know the answer is too large.
        let rows_wanted = sql_count(limit.saturating_add(1));
        let params: [&(dyn ToSql + Sync); 7] = [
            &filter.farm_id,
            &filter.start,
            &filter.end,
            &filter.device_ids,
            &filter.metrics,
            &width_param,
            &rows_wanted,
        ];
        let to_buckets = |rows: Vec<tokio_postgres::Row>| -> Vec<Bucket> {
            rows.iter()
                .map(|row| {
                    let (start, end) = bucket_bounds(filter, width_secs, row.get::<_, i64>(2));
                    Bucket {
                        device_id: row.get(0),
                        metric: row.get(1),
                        start,
                        end,
                        count: row.get::<_, i64>(3) as u64,
                        min: row.get(4),
                        max: row.get(5),
                        avg: row.get(6),
                    }
                })
                .collect()
        };
        let raw = client.query(&main_sql, &params).await.map_err(pg_error("aggregate readings"))?;
        let edge = client.query(&edge_sql, &params).await.map_err(pg_error("aggregate edge aggregates"))?;
        Ok(merge_edge_buckets(to_buckets(raw), to_buckets(edge), limit))
    }

    async fn latest_readings(&self, farm_id: Uuid, device_ids: &[Uuid]) -> Result<Vec<StoredReading>> {
        let client = self.client().await?;
        let device_ids = device_ids.to_vec();
        let rows = client
            .query(
                &format!(
                    "SELECT {READING_COLUMNS} FROM latest_readings r JOIN metric_names m ON m.id = r.metric_id
                     WHERE r.farm_id = $1 AND (cardinality($2::uuid[]) = 0 OR r.device_id = ANY($2))
                     ORDER BY r.device_id, m.name COLLATE \"C\""
                ),
                &[&farm_id, &device_ids],
            )
            .await
            .map_err(pg_error("read latest readings"))?;
        Ok(rows.iter().map(stored_reading).collect())
    }

    async fn apply_retention(&self, retention: Retention, now: SystemTime) -> Result<u64> {
        let raw_cutoff = now.checked_sub(retention.raw).unwrap_or(SystemTime::UNIX_EPOCH);
        let rollup_cutoff = now.checked_sub(retention.rollups).unwrap_or(SystemTime::UNIX_EPOCH);
        let client = self.client().await?;
        let mut deleted = 0u64;
        match self.readings_layout().await? {
            ReadingsLayout::Partitioned => {
                // Whole months only: a partition goes once its last instant is past the cutoff.
                let partitions = client
                    .query(
                        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                         WHERE i.inhparent = 'readings'::regclass",
                        &[],
                    )
                    .await
                    .map_err(pg_error("list readings partitions"))?;
                for row in partitions {
                    let name: String = row.get(0);
                    let Some((year, month)) = parse_partition_name(&name) else { continue };
                    let (next_year, next_month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
                    if month_start(next_year, next_month) > raw_cutoff {
                        continue;
                    }
                    let count = match client.query_one(&format!("SELECT count(*) FROM {name}"), &[]).await {
                        Ok(row) => row.get::<_, i64>(0),
                        // Another replica's retention dropped it first.
                        Err(error) if error.code() == Some(&SqlState::UNDEFINED_TABLE) => continue,
                        Err(error) => return Err(pg_error("count an expired partition")(error)),
                    };
                    client
                        .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                        .await
                        .map_err(pg_error("drop an expired partition"))?;
                    self.telemetry.partitions.lock().expect("partition cache lock").remove(&(year, month));
                    deleted += count as u64;
                }
            }
            ReadingsLayout::Hypertable => {
                let before = client
                    .query_one("SELECT count(*) FROM readings WHERE time < $1", &[&raw_cutoff])
                    .await
                    .map_err(pg_error("count expired readings"))?
                    .get::<_, i64>(0);
                // drop_chunks takes `older_than` as "any": the parameter needs its type spelled out.
                client
                    .execute("SELECT drop_chunks('readings', older_than => $1::timestamptz)", &[&raw_cutoff])
                    .await
                    .map_err(pg_error("drop expired chunks"))?;
                deleted += before as u64;
            }
        }
        client
            .execute("DELETE FROM edge_aggregates WHERE window_end <= $1", &[&raw_cutoff])
            .await
            .map_err(pg_error("delete expired edge aggregates"))?;
        client
            .execute("DELETE FROM reading_rollups WHERE bucket + make_interval(secs => width) <= $1", &[&rollup_cutoff])
            .await
            .map_err(pg_error("delete expired rollups"))?;
        // Their readings are gone: nothing is left to score.
        client
            .execute("DELETE FROM unscored_batches WHERE receive_time <= $1", &[&raw_cutoff])
            .await
            .map_err(pg_error("delete expired batches to score"))?;
        Ok(deleted)
    }

    async fn claim_unscored(
        &self,
        received_before: SystemTime,
        now: SystemTime,
        lease: Duration,
        limit: usize,
        except: &[BatchKey],
    ) -> Result<Vec<UnscoredBatch>> {
        let client = self.client().await?;
        let claimed_until = now + lease;
        let limit = sql_count(limit);
        let (except_gateways, except_spools, except_sequences) = key_columns(except);
        // SKIP LOCKED: replicas claiming at once each take other batches.
        let rows = client
            .query(
                "UPDATE unscored_batches u SET claimed_until = $3, attempts = u.attempts + 1
                 FROM (SELECT gateway_id, spool_id, last_sequence FROM unscored_batches
                       WHERE receive_time < $1 AND (claimed_until IS NULL OR claimed_until <= $2)
                         AND (gateway_id, spool_id, last_sequence) NOT IN
                             (SELECT * FROM unnest($5::uuid[], $6::uuid[], $7::bigint[]))
                       ORDER BY receive_time LIMIT $4 FOR UPDATE SKIP LOCKED) c
                 WHERE (u.gateway_id, u.spool_id, u.last_sequence) = (c.gateway_id, c.spool_id, c.last_sequence)
                 RETURNING u.gateway_id, u.spool_id, u.last_sequence, u.farm_id, u.series, u.receive_time, u.attempts",
                &[&received_before, &now, &claimed_until, &limit, &except_gateways, &except_spools, &except_sequences],
            )
            .await
            .map_err(pg_error("claim batches to score"))?;
        let mut batches = rows
            .iter()
            .map(|row| {
                Ok(UnscoredBatch {
                    key: BatchKey {
                        gateway_id: row.get(0),
                        spool_id: row.get(1),
                        last_sequence: row.get::<_, i64>(2) as u64,
                    },
                    farm_id: row.get(3),
                    series: series_from_json(&row.get::<_, serde_json::Value>(4))?,
                    receive_time: row.get(5),
                    attempts: row.get::<_, i32>(6) as u32,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        batches.sort_by_key(|batch| (batch.receive_time, batch.key.last_sequence));
        Ok(batches)
    }

    async fn forget_unscored(&self, keys: &[BatchKey]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let (gateways, spools, sequences) = key_columns(keys);
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM unscored_batches
                 WHERE (gateway_id, spool_id, last_sequence) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]))",
                &[&gateways, &spools, &sequences],
            )
            .await
            .map_err(pg_error("confirm scored batches"))?;
        Ok(())
    }

    async fn release_unscored(&self, keys: &[BatchKey], claimed_until: SystemTime) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let (gateways, spools, sequences) = key_columns(keys);
        let client = self.client().await?;
        client
            .execute(
                "UPDATE unscored_batches SET claimed_until = NULL, attempts = GREATEST(attempts - 1, 0)
                 WHERE claimed_until = $4
                   AND (gateway_id, spool_id, last_sequence) IN (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]))",
                &[&gateways, &spools, &sequences, &claimed_until],
            )
            .await
            .map_err(pg_error("give back claims on batches to score"))?;
        Ok(())
    }

    async fn align_rollups(&self, widths: &[Duration]) -> Result<RollupsAligned> {
        let wanted: BTreeSet<i32> =
            widths.iter().map(|width| width.as_secs().clamp(1, i32::MAX as u64) as i32).collect();
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error("begin aligning rollups"))?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&ALIGN_ROLLUPS_LOCK_KEY])
            .await
            .map_err(pg_error("take the rollup lock"))?;
        let recorded: BTreeSet<i32> = transaction
            .query("SELECT width FROM rollup_widths", &[])
            .await
            .map_err(pg_error("read the rollup widths"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut aligned = RollupsAligned::default();
        if recorded == wanted {
            return Ok(aligned);
        }
        // Commits upsert rollups (ROW EXCLUSIVE): they wait until this transaction ends, and the readings read
        // below are every one committed before it.
        transaction
            .batch_execute("LOCK TABLE reading_rollups IN SHARE ROW EXCLUSIVE MODE")
            .await
            .map_err(pg_error("lock the rollups"))?;
        for width in recorded.difference(&wanted) {
            // Its rows stay (a replica with another configuration must not destroy what it does not know); they are
            // replaced if the width is configured again.
            transaction
                .execute("DELETE FROM rollup_widths WHERE width = $1", &[width])
                .await
                .map_err(pg_error("forget a rollup width"))?;
            aligned.removed.push(*width as u64);
        }
        for width in wanted.difference(&recorded) {
            // Left over from when the width was kept before (or from before this table): replaced, not added to.
            transaction
                .execute("DELETE FROM reading_rollups WHERE width = $1", &[width])
                .await
                .map_err(pg_error("delete a width's rollups"))?;
            transaction
                .execute(
                    "INSERT INTO reading_rollups (width, bucket, farm_id, device_id, metric_id, count, sum, min, max)
                     SELECT $1::integer, to_timestamp((floor(extract(epoch FROM time) / $1::integer) * $1::integer)::float8),
                            s.farm_id, s.device_id, s.metric_id, count(*), sum(r.value), min(r.value), max(r.value)
                     FROM readings r JOIN reading_series s ON s.id = r.series_id GROUP BY 2, 3, 4, 5",
                    &[width],
                )
                .await
                .map_err(pg_error("fill a new width's rollups"))?;
            transaction
                .execute("INSERT INTO rollup_widths (width) VALUES ($1)", &[width])
                .await
                .map_err(pg_error("record a rollup width"))?;
            aligned.added.push(*width as u64);
        }
        transaction.commit().await.map_err(pg_error("commit the rollup widths"))?;
        Ok(aligned)
    }
}

/// Held by the transaction that aligns the rollups: replicas starting together align one after the other.
const ALIGN_ROLLUPS_LOCK_KEY: i64 = 0x736d_6661_726f_6c6c; // "smfaroll"

fn parse_partition_name(name: &str) -> Option<(i32, u32)> {
    let digits = name.strip_prefix("readings_p")?;
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits[..4].parse().ok()?, digits[4..].parse().ok()?))
}

/// Readings written to a COPY between two yields to the other tasks of the async worker.
const COPY_ROWS_BETWEEN_YIELDS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_series_cache_keeps_the_series_in_use_and_stays_bounded() {
        let mut cache = SeriesCache::default();
        let farm = Uuid::now_v7();
        let key = |n: u32| (farm, Uuid::from_u128(n as u128), 1);
        let hot = key(u32::MAX);
        cache.insert(hot, 7);
        // Four times the limit of series seen once each, the hot one used every thousand.
        for n in 0..4 * SERIES_CACHE_LIMIT as u32 {
            cache.insert(key(n), n as i32);
            if n % 1000 == 0 {
                assert_eq!(cache.get(&hot), Some(&7), "after {n} others");
            }
            assert!(cache.len() <= SERIES_CACHE_LIMIT);
        }
        assert_eq!(cache.get(&key(4 * SERIES_CACHE_LIMIT as u32 - 1)), Some(&(4 * SERIES_CACHE_LIMIT as i32 - 1)));
        assert_eq!(cache.get(&key(0)), None, "one not used for a generation is read again");
    }

    #[test]
    fn months_and_their_starts_agree() {
        for (micros, expected) in [
            (0i64, (1970, 1)),
            (1_733_000_000_000_000, (2024, 11)),
            (-1, (1969, 12)),
            (951_782_400_000_000, (2000, 2)), // 2000-02-29
        ] {
            let month = month_of(from_unix_micros(micros));
            assert_eq!(month, expected, "{micros}");
            assert!(month_start(month.0, month.1) <= from_unix_micros(micros));
        }
        assert_eq!(to_unix_micros(month_start(2026, 12)), 1_796_083_200_000_000); // 2026-12-01T00:00:00Z
        assert_eq!(parse_partition_name("readings_p202612"), Some((2026, 12)));
        assert_eq!(parse_partition_name("readings_default"), None);
    }
}
