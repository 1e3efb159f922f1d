//! Telemetry storage: the readings edge agents send, committed exactly once per edge sequence number, and the
//! queries over them. Every backend implements [`TelemetryStore`] and passes the same suite
//! (`tests/telemetry_suite.rs`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use smartfarm_core::batch::BatchKey;
use smartfarm_core::{Error, Result};

/// What [`TelemetryStore::align_rollups`] changed, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RollupsAligned {
    pub added: Vec<u64>,
    pub removed: Vec<u64>,
}

/// One reading of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadingRow {
    /// The edge sequence number of the record that carried it.
    pub sequence: u64,
    pub device_id: Uuid,
    pub metric: String,
    pub value: f64,
    pub measure_time: SystemTime,
}

/// One edge-computed aggregate of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct AggregateRow {
    pub sequence: u64,
    pub device_id: Uuid,
    pub metric: String,
    pub window_start: SystemTime,
    pub window_end: SystemTime,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub last: f64,
}

/// A batch from one gateway's spool: records `first_sequence..=last_sequence` (some of which may have been dropped
/// on the edge; the range still moves the mark).
#[derive(Clone, Debug)]
pub struct EdgeBatch {
    pub gateway_id: Uuid,
    /// The spool's lifetime: sequence numbers, and the mark, count within one spool.
    pub spool_id: Uuid,
    pub farm_id: Uuid,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub readings: Vec<ReadingRow>,
    pub aggregates: Vec<AggregateRow>,
    /// When the cloud received the batch; stored with every row.
    pub receive_time: SystemTime,
    /// The inference role scores the readings: the commit also lists the batch among those still to score (see
    /// [`TelemetryStore::claim_unscored`]), until a scorer confirms it.
    pub score_later: bool,
}

/// A device's metric in a committed batch, with the first and last measurement time (as stored) it added.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchSeries {
    pub device_id: Uuid,
    pub metric: String,
    pub first_time: SystemTime,
    pub last_time: SystemTime,
}

/// A committed batch that no scorer has confirmed yet, claimed by a late scorer.
#[derive(Clone, Debug, PartialEq)]
pub struct UnscoredBatch {
    pub key: BatchKey,
    pub farm_id: Uuid,
    pub series: Vec<BatchSeries>,
    pub receive_time: SystemTime,
    /// Late scorings begun, this one included.
    pub attempts: u32,
}

/// What committing a batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The rows above the old mark (`above`) were written and the mark moved to the batch's last sequence. A batch
    /// that overlapped the mark (resent after a reconnect together with new records) wrote only its records above
    /// it.
    Committed { readings: usize, aggregates: usize, above: u64 },
    /// The whole batch was at or below the mark: nothing was written.
    Duplicate,
}

/// Which readings a query reads.
#[derive(Clone, Debug)]
pub struct ReadingFilter {
    pub farm_id: Uuid,
    /// Empty: every device of the farm.
    pub device_ids: Vec<Uuid>,
    /// Empty: every metric.
    pub metrics: Vec<String>,
    /// Inclusive.
    pub start: SystemTime,
    /// Exclusive.
    pub end: SystemTime,
}

/// A stored reading.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredReading {
    pub device_id: Uuid,
    pub metric: String,
    pub value: f64,
    pub measure_time: SystemTime,
    pub receive_time: SystemTime,
    pub sequence: u64,
}

/// Where a page of readings starts: after this (time, device, metric, sequence), the order pages are sorted in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadingCursor {
    pub measure_time: SystemTime,
    pub device_id: Uuid,
    pub metric: String,
    pub sequence: u64,
}

impl ReadingCursor {
    /// The cursor that continues after `reading`.
    pub fn after(reading: &StoredReading) -> ReadingCursor {
        ReadingCursor {
            measure_time: reading.measure_time,
            device_id: reading.device_id,
            metric: reading.metric.clone(),
            sequence: reading.sequence,
        }
    }
}

/// Statistics of one device's metric in one bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    pub device_id: Uuid,
    pub metric: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
}

/// How old data may get before the retention task deletes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Raw readings and edge aggregates.
    pub raw: Duration,
    /// Rollups.
    pub rollups: Duration,
}

/// Storage of telemetry.
#[async_trait::async_trait]
pub trait TelemetryStore: Send + Sync + 'static {
    /// The highest sequence number committed for this gateway's spool (0 if none).
    async fn committed_sequence(&self, gateway_id: Uuid, spool_id: Uuid) -> Result<u64>;

    /// Writes the batch's rows above the gateway's mark and moves the mark to `last_sequence`, in one
    /// transaction, updating the configured rollups in it too. A batch at or below the mark writes nothing.
    async fn commit_batch(&self, batch: &EdgeBatch, rollup_widths: &[Duration]) -> Result<BatchOutcome>;

    /// Readings matching `filter`, ordered by (measure time, device, metric, sequence), after `cursor`, at most
    /// `limit`.
    async fn query_readings(
        &self,
        filter: &ReadingFilter,
        cursor: Option<&ReadingCursor>,
        limit: usize,
    ) -> Result<Vec<StoredReading>>;

    /// Count, min, max and average per device, metric and bucket of `width` aligned to the Unix epoch (`None`: one
    /// bucket spanning the filter's range), ordered by device, metric, bucket. Reads the rollup of that width when
    /// one is kept and the range is aligned to it. Devices whose range holds no raw readings are summarised from the
    /// edge's own aggregates (farms that upload only aggregates). `None` when there are more than `limit` buckets:
    /// the database stops there, so a query too large to answer costs no more memory than one that fits.
    async fn query_buckets(
        &self,
        filter: &ReadingFilter,
        width: Option<Duration>,
        rollup_widths: &[Duration],
        limit: usize,
    ) -> Result<Option<Vec<Bucket>>>;

    /// The newest reading per device and metric of a farm (kept current by `commit_batch`, so this reads one row
    /// per device and metric).
    async fn latest_readings(&self, farm_id: Uuid, device_ids: &[Uuid]) -> Result<Vec<StoredReading>>;

    /// Deletes what is older than the retention allows; returns how many raw rows went.
    async fn apply_retention(&self, retention: Retention, now: SystemTime) -> Result<u64>;

    /// Records `widths` (the configured ones) as the widths kept, before any commit of this process: a width new to
    /// the database is filled from the raw readings it holds (commits wait meanwhile); one no longer configured is
    /// no longer recorded (its rows stay, unused), so that if it is configured again it is filled anew rather than
    /// trusted with the gap. Without this, a new width would answer aligned queries with only what was committed
    /// since. Raw readings past their retention are gone, so a new width covers what is still kept. Returns the
    /// widths added and dropped.
    async fn align_rollups(&self, widths: &[Duration]) -> Result<RollupsAligned>;

    /// Batches committed with `score_later` that no scorer has confirmed ([`TelemetryStore::forget_unscored`]),
    /// received before `received_before`, not claimed at `now` (never, or the claim has ended) and not among
    /// `except` (those the caller has in hand), oldest first, at most `limit`. Each is claimed until `now + lease`,
    /// so no other caller takes it meanwhile, and its attempts counted. Retention deletes those older than the raw
    /// readings kept.
    async fn claim_unscored(
        &self,
        received_before: SystemTime,
        now: SystemTime,
        lease: Duration,
        limit: usize,
        except: &[BatchKey],
    ) -> Result<Vec<UnscoredBatch>>;

    /// Confirms that these batches were scored (or given up): they leave the list. Unknown keys are ignored.
    async fn forget_unscored(&self, keys: &[BatchKey]) -> Result<()>;

    /// Gives back the claims on these batches that a [`TelemetryStore::claim_unscored`] made until `claimed_until`
    /// (its `now + lease`) and that were not scored (the process is stopping): the next claim takes them at once
    /// instead of after the lease, and the attempt the claim counted is taken back. A claim that has ended and
    /// been made anew by another caller, and unknown keys, are left as they are.
    async fn release_unscored(&self, keys: &[BatchKey], claimed_until: SystemTime) -> Result<()>;
}

/// Each device's metric in `readings` with the first and last measurement time as stored (microseconds), for the
/// list of batches to score.
pub(crate) fn batch_series(readings: &[&ReadingRow]) -> Vec<BatchSeries> {
    let mut spans: BTreeMap<(Uuid, &str), (SystemTime, SystemTime)> = BTreeMap::new();
    for reading in readings {
        let time = smartfarm_core::time::from_unix_micros(smartfarm_core::time::to_unix_micros(reading.measure_time));
        spans
            .entry((reading.device_id, reading.metric.as_str()))
            .and_modify(|(first, last)| {
                *first = (*first).min(time);
                *last = (*last).max(time);
            })
            .or_insert((time, time));
    }
    spans
        .into_iter()
        .map(|((device_id, metric), (first_time, last_time))| BatchSeries {
            device_id,
            metric: metric.to_string(),
            first_time,
            last_time,
        })
        .collect()
}

/// `series` as stored in the list of batches to score: `[{"device_id", "metric", "first", "last"}]`, times in
/// microseconds since the epoch.
pub(crate) fn series_to_json(series: &[BatchSeries]) -> serde_json::Value {
    series
        .iter()
        .map(|span| {
            serde_json::json!({
                "device_id": span.device_id.to_string(),
                "metric": span.metric,
                "first": smartfarm_core::time::to_unix_micros(span.first_time),
                "last": smartfarm_core::time::to_unix_micros(span.last_time),
            })
        })
        .collect()
}

/// The reverse of [`series_to_json`].
pub(crate) fn series_from_json(value: &serde_json::Value) -> Result<Vec<BatchSeries>> {
    let bad = || Error::Internal { context: "a stored batch's series list is malformed".into(), source: None };
    value
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|span| {
            let device_id = span["device_id"].as_str().and_then(|id| Uuid::try_parse(id).ok()).ok_or_else(bad)?;
            let metric = span["metric"].as_str().ok_or_else(bad)?.to_string();
            let first = span["first"].as_i64().ok_or_else(bad)?;
            let last = span["last"].as_i64().ok_or_else(bad)?;
            Ok(BatchSeries {
                device_id,
                metric,
                first_time: smartfarm_core::time::from_unix_micros(first),
                last_time: smartfarm_core::time::from_unix_micros(last),
            })
        })
        .collect()
}

/// Sums a batch's readings per (width, device, metric, bucket start in seconds), for the rollup upserts.
pub(crate) fn rollup_increments<'a>(
    readings: &[&'a ReadingRow],
    rollup_widths: &[Duration],
) -> BTreeMap<(u64, Uuid, &'a str, i64), RollupIncrement> {
    // Keys borrow the metric names: a batch has tens of thousands of readings and a handful of names.
    let mut increments: BTreeMap<(u64, Uuid, &str, i64), RollupIncrement> = BTreeMap::new();
    for width in rollup_widths {
        let width_secs = width.as_secs().max(1);
        for reading in readings {
            let bucket = bucket_start_secs(reading.measure_time, width_secs);
            increments
                .entry((width_secs, reading.device_id, reading.metric.as_str(), bucket))
                .and_modify(|inc| inc.add(reading.value))
                .or_insert_with(|| RollupIncrement::first(reading.value));
        }
    }
    increments
}

/// The newest reading (by measurement time, then sequence) of each device and metric, for the latest-value upserts.
pub(crate) fn latest_per_series<'a>(readings: &[&'a ReadingRow]) -> BTreeMap<(Uuid, &'a str), &'a ReadingRow> {
    let mut latest: BTreeMap<(Uuid, &str), &ReadingRow> = BTreeMap::new();
    for reading in readings {
        let entry = latest.entry((reading.device_id, reading.metric.as_str())).or_insert(reading);
        if (reading.measure_time, reading.sequence) > (entry.measure_time, entry.sequence) {
            *entry = reading;
        }
    }
    latest
}

/// Adds to `raw` the edge-aggregate buckets of every (device, metric) that has no raw bucket, keeping the order by
/// device, metric and bucket start; `None` when either list, or the result, is longer than `limit` (the queries
/// stop one past it).
pub(crate) fn merge_edge_buckets(mut raw: Vec<Bucket>, edge: Vec<Bucket>, limit: usize) -> Option<Vec<Bucket>> {
    if raw.len() > limit || edge.len() > limit {
        return None;
    }
    let covered: std::collections::BTreeSet<(Uuid, String)> =
        raw.iter().map(|bucket| (bucket.device_id, bucket.metric.clone())).collect();
    raw.extend(edge.into_iter().filter(|bucket| !covered.contains(&(bucket.device_id, bucket.metric.clone()))));
    raw.sort_by(|a, b| (a.device_id, &a.metric, a.start).cmp(&(b.device_id, &b.metric, b.start)));
    (raw.len() <= limit).then_some(raw)
}

/// The bounds of bucket `index` of `width` (seconds), or the filter's range when there is no width.
pub(crate) fn bucket_bounds(filter: &ReadingFilter, width_secs: Option<u64>, index: i64) -> (SystemTime, SystemTime) {
    match width_secs {
        None => (filter.start, filter.end),
        Some(width) => {
            let start = index * width as i64 * 1_000_000;
            (
                smartfarm_core::time::from_unix_micros(start),
                smartfarm_core::time::from_unix_micros(start + width as i64 * 1_000_000),
            )
        }
    }
}

/// Count, sum, min and max of some values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RollupIncrement {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl RollupIncrement {
    fn first(value: f64) -> RollupIncrement {
        RollupIncrement { count: 1, sum: value, min: value, max: value }
    }

    fn add(&mut self, value: f64) {
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }
}

/// The start (Unix seconds) of the bucket of `width_secs` that holds `time`; floors before the epoch too.
pub(crate) fn bucket_start_secs(time: SystemTime, width_secs: u64) -> i64 {
    let micros = smartfarm_core::time::to_unix_micros(time);
    let seconds = micros.div_euclid(1_000_000);
    seconds.div_euclid(width_secs as i64) * width_secs as i64
}

/// The rollup width to answer a bucket query from, if a kept rollup fits: the bucket width is a multiple of it and
/// the range starts and ends on its boundaries.
pub(crate) fn usable_rollup(
    filter: &ReadingFilter,
    width: Option<Duration>,
    rollup_widths: &[Duration],
) -> Option<u64> {
    let start = smartfarm_core::time::to_unix_micros(filter.start);
    let end = smartfarm_core::time::to_unix_micros(filter.end);
    rollup_widths
        .iter()
        .map(|w| w.as_secs())
        .filter(|w| *w > 0)
        .filter(|w| {
            let w_micros = *w as i64 * 1_000_000;
            let bucket_ok = match width {
                Some(width) => width.as_secs() > 0 && width.subsec_nanos() == 0 && width.as_secs() % w == 0,
                None => true,
            };
            bucket_ok && start.rem_euclid(w_micros) == 0 && end.rem_euclid(w_micros) == 0
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> SystemTime {
        smartfarm_core::time::from_unix_micros(seconds * 1_000_000)
    }

    #[test]
    fn buckets_floor_on_both_sides_of_the_epoch() {
        assert_eq!(bucket_start_secs(at(7_205), 3600), 7_200);
        assert_eq!(bucket_start_secs(at(-1), 3600), -3600);
        assert_eq!(bucket_start_secs(at(3600), 3600), 3600);
    }

    #[test]
    fn a_rollup_is_used_only_when_it_fits() {
        let filter = |start, end| ReadingFilter {
            farm_id: Uuid::nil(),
            device_ids: vec![],
            metrics: vec![],
            start: at(start),
            end: at(end),
        };
        let kept = [Duration::from_secs(3600), Duration::from_secs(86_400)];
        assert_eq!(usable_rollup(&filter(0, 86_400), Some(Duration::from_secs(86_400)), &kept), Some(86_400));
        assert_eq!(usable_rollup(&filter(3600, 7200), Some(Duration::from_secs(3600)), &kept), Some(3600));
        assert_eq!(usable_rollup(&filter(3600, 7200), None, &kept), Some(3600));
        assert_eq!(usable_rollup(&filter(3600, 7201), Some(Duration::from_secs(3600)), &kept), None);
        assert_eq!(usable_rollup(&filter(0, 7200), Some(Duration::from_secs(1800)), &kept), None);
    }
}
