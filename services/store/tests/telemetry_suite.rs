//! The behaviour every [`TelemetryStore`] backend must have, written once and run on SQLite and PostgreSQL.

use std::time::{Duration, SystemTime};

use smartfarm_core::batch::BatchKey;
use smartfarm_core::config::PostgresConfig;
use smartfarm_core::time::from_unix_micros;
use smartfarm_store::model::{DeviceKind, NewDevice};
use smartfarm_store::telemetry::{
    AggregateRow, BatchOutcome, BatchSeries, EdgeBatch, ReadingCursor, ReadingFilter, ReadingRow, Retention,
    RollupsAligned,
};
use smartfarm_store::testing::TestDatabase as Harness;
use smartfarm_store::{Database, RegistryStore};
use uuid::Uuid;

const HOUR: u64 = 3600;
/// 2026-05-29 00:00:00 UTC: a midnight, so day-aligned ranges can be answered from the daily rollup.
const BASE_SECONDS: i64 = 1_780_012_800;

/// A farm with a gateway and two sensors.
struct Farm {
    id: Uuid,
    gateway: Uuid,
    spool: Uuid,
    sensors: [Uuid; 2],
}

async fn farm(registry: &dyn RegistryStore, name: &str) -> Farm {
    let farm = registry.create_farm(Uuid::now_v7(), name, SystemTime::now()).await.unwrap();
    let mut ids = Vec::new();
    for (device, kind) in
        [("gateway", DeviceKind::Gateway), ("probe a", DeviceKind::Sensor), ("probe b", DeviceKind::Sensor)]
    {
        let device = registry
            .create_device(NewDevice {
                id: Uuid::now_v7(),
                farm_id: farm.id,
                name: device.to_string(),
                kind,
                labels: Default::default(),
                credential_sha256: "00".repeat(32),
                create_time: SystemTime::now(),
            })
            .await
            .unwrap();
        ids.push(device.id);
    }
    Farm { id: farm.id, gateway: ids[0], spool: Uuid::now_v7(), sensors: [ids[1], ids[2]] }
}

/// Seconds since the epoch as a time; tests use times around 2026 so several months and partitions are crossed.
fn at(seconds: u64) -> SystemTime {
    from_unix_micros((BASE_SECONDS + seconds as i64) * 1_000_000)
}

fn reading(sequence: u64, device_id: Uuid, metric: &str, value: f64, seconds: u64) -> ReadingRow {
    ReadingRow { sequence, device_id, metric: metric.to_string(), value, measure_time: at(seconds) }
}

fn batch(farm: &Farm, first: u64, last: u64, readings: Vec<ReadingRow>) -> EdgeBatch {
    EdgeBatch {
        gateway_id: farm.gateway,
        spool_id: farm.spool,
        farm_id: farm.id,
        first_sequence: first,
        last_sequence: last,
        readings,
        aggregates: Vec::new(),
        receive_time: SystemTime::now(),
        score_later: false,
    }
}

fn everything(farm: &Farm) -> ReadingFilter {
    ReadingFilter { farm_id: farm.id, device_ids: vec![], metrics: vec![], start: at(0), end: at(400 * 24 * HOUR) }
}

const ROLLUPS: [Duration; 2] = [Duration::from_secs(HOUR), Duration::from_secs(24 * HOUR)];

async fn batches_commit_once(database: &Database) {
    let (registry, telemetry) = (database.registry(), database.telemetry());
    let farm = farm(&*registry, "exactly once").await;
    let [a, b] = farm.sensors;
    assert_eq!(telemetry.committed_sequence(farm.gateway, farm.spool).await.unwrap(), 0);

    let first = batch(
        &farm,
        1,
        3,
        vec![
            reading(1, a, "temperature", 20.0, 10),
            reading(2, a, "humidity", 60.0, 10),
            reading(3, b, "temperature", 18.0, 20),
        ],
    );
    assert_eq!(
        telemetry.commit_batch(&first, &ROLLUPS).await.unwrap(),
        BatchOutcome::Committed { readings: 3, aggregates: 0, above: 0 }
    );
    assert_eq!(telemetry.committed_sequence(farm.gateway, farm.spool).await.unwrap(), 3);
    assert_eq!(
        telemetry.commit_batch(&first, &ROLLUPS).await.unwrap(),
        BatchOutcome::Duplicate,
        "a resent batch writes nothing"
    );

    // A batch that overlaps the mark writes only what is above it.
    let overlapping = batch(
        &farm,
        3,
        5,
        vec![
            reading(3, b, "temperature", 18.0, 20),
            reading(4, b, "temperature", 19.0, 30),
            reading(5, a, "temperature", 21.0, 40),
        ],
    );
    assert_eq!(
        telemetry.commit_batch(&overlapping, &ROLLUPS).await.unwrap(),
        BatchOutcome::Committed { readings: 2, aggregates: 0, above: 3 },
        "and says from where"
    );
    // Its rollups count only what it wrote: the hourly rollup answers as the rows do.
    let first_hour = ReadingFilter { start: at(0), end: at(HOUR), ..everything(&farm) };
    let hourly = |rollups: &'static [Duration]| {
        let (telemetry, filter) = (telemetry.clone(), first_hour.clone());
        async move {
            let buckets = telemetry
                .query_buckets(&filter, Some(Duration::from_secs(HOUR)), rollups, 1000)
                .await
                .unwrap()
                .unwrap();
            buckets.iter().map(|b| (b.device_id, b.metric.clone(), b.count, b.min, b.max)).collect::<Vec<_>>()
        }
    };
    assert_eq!(hourly(&ROLLUPS).await, hourly(&[]).await);

    // Records dropped on the edge leave a gap; the range still moves the mark.
    let after_gap = batch(&farm, 9, 10, vec![reading(10, a, "temperature", 22.0, 50)]);
    telemetry.commit_batch(&after_gap, &ROLLUPS).await.unwrap();
    assert_eq!(telemetry.committed_sequence(farm.gateway, farm.spool).await.unwrap(), 10);

    // A new spool on the same gateway (a wiped disk) numbers from 1 again and has a mark of its own.
    let new_spool = Farm { spool: Uuid::now_v7(), ..farm };
    assert_eq!(telemetry.committed_sequence(new_spool.gateway, new_spool.spool).await.unwrap(), 0);
    let fresh = batch(&new_spool, 1, 1, vec![reading(1, a, "temperature", 23.0, 60)]);
    assert_eq!(
        telemetry.commit_batch(&fresh, &ROLLUPS).await.unwrap(),
        BatchOutcome::Committed { readings: 1, aggregates: 0, above: 0 }
    );
    assert_eq!(
        telemetry.committed_sequence(new_spool.gateway, farm.spool).await.unwrap(),
        10,
        "the old spool's mark stays"
    );
    let farm = new_spool;

    let all = telemetry.query_readings(&everything(&farm), None, 100).await.unwrap();
    let sequences: Vec<u64> = all.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, vec![2, 1, 3, 4, 5, 10, 1], "every reading exactly once, by time, then device and metric");
    assert_eq!(all[0].metric, "humidity", "same time: ordered by device, then metric");
}

async fn readings_page_and_filter(database: &Database) {
    let (registry, telemetry) = (database.registry(), database.telemetry());
    let farm = farm(&*registry, "paging").await;
    let other = self::farm(&*registry, "paging elsewhere").await;
    let [a, b] = farm.sensors;
    let mut rows = Vec::new();
    for i in 0..50u64 {
        rows.push(reading(2 * i + 1, a, "temperature", i as f64, i * 60));
        rows.push(reading(2 * i + 2, b, if i % 2 == 0 { "humidity" } else { "temperature" }, i as f64, i * 60));
    }
    telemetry.commit_batch(&batch(&farm, 1, 100, rows), &ROLLUPS).await.unwrap();
    let [x, _] = other.sensors;
    telemetry.commit_batch(&batch(&other, 1, 1, vec![reading(1, x, "temperature", 99.0, 0)]), &ROLLUPS).await.unwrap();

    let mut seen = Vec::new();
    let mut cursor: Option<ReadingCursor> = None;
    loop {
        let page = telemetry.query_readings(&everything(&farm), cursor.as_ref(), 7).await.unwrap();
        if page.is_empty() {
            break;
        }
        cursor = Some(ReadingCursor::after(page.last().unwrap()));
        seen.extend(page.into_iter().map(|r| r.sequence));
    }
    assert_eq!(seen.len(), 100, "pages cover every reading of the farm once, none of the other farm's");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 100);

    let only_b_humidity = ReadingFilter { device_ids: vec![b], metrics: vec!["humidity".into()], ..everything(&farm) };
    let filtered = telemetry.query_readings(&only_b_humidity, None, 1000).await.unwrap();
    assert_eq!(filtered.len(), 25);
    assert!(filtered.iter().all(|r| r.device_id == b && r.metric == "humidity"));

    let window = ReadingFilter { start: at(600), end: at(1200), ..everything(&farm) };
    let in_window = telemetry.query_readings(&window, None, 1000).await.unwrap();
    assert_eq!(in_window.len(), 20, "start inclusive, end exclusive");
    assert!(in_window.iter().all(|r| r.measure_time >= at(600) && r.measure_time < at(1200)));
}

async fn buckets_agree_between_raw_rows_and_rollups(database: &Database) {
    let (registry, telemetry) = (database.registry(), database.telemetry());
    let farm = farm(&*registry, "buckets").await;
    let [a, b] = farm.sensors;
    // Three days of 10-minute readings for a, split over several batches.
    let mut sequence = 0;
    for day in 0..3u64 {
        let mut rows = Vec::new();
        let first = sequence + 1;
        for step in 0..144u64 {
            sequence += 1;
            let seconds = day * 24 * HOUR + step * 600;
            rows.push(reading(sequence, a, "temperature", (step % 37) as f64 - 5.0, seconds));
        }
        telemetry.commit_batch(&batch(&farm, first, sequence, rows), &ROLLUPS).await.unwrap();
    }
    // b uploads only edge aggregates.
    let aggregate = AggregateRow {
        sequence: sequence + 1,
        device_id: b,
        metric: "temperature".into(),
        window_start: at(0),
        window_end: at(HOUR),
        count: 12,
        min: 1.0,
        max: 3.0,
        avg: 2.0,
        last: 2.5,
    };
    let mut only_aggregates = batch(&farm, sequence + 1, sequence + 1, vec![]);
    only_aggregates.aggregates.push(aggregate);
    assert_eq!(
        telemetry.commit_batch(&only_aggregates, &ROLLUPS).await.unwrap(),
        BatchOutcome::Committed { readings: 0, aggregates: 1, above: sequence }
    );

    // The range starts on a day boundary (the base time is midnight UTC), so the daily rollup answers.
    let range = ReadingFilter { device_ids: vec![a], start: at(0), end: at(3 * 24 * HOUR), ..everything(&farm) };
    let daily =
        telemetry.query_buckets(&range, Some(Duration::from_secs(24 * HOUR)), &ROLLUPS, 1000).await.unwrap().unwrap();
    let daily_raw =
        telemetry.query_buckets(&range, Some(Duration::from_secs(24 * HOUR)), &[], 1000).await.unwrap().unwrap();
    assert_eq!(daily.len(), daily_raw.len());
    for (rollup, raw) in daily.iter().zip(&daily_raw) {
        assert_eq!((rollup.start, rollup.end, rollup.count), (raw.start, raw.end, raw.count));
        assert_eq!((rollup.min, rollup.max), (raw.min, raw.max));
        assert!((rollup.avg - raw.avg).abs() < 1e-9, "{} vs {}", rollup.avg, raw.avg);
    }
    assert_eq!(daily_raw.iter().map(|b| b.count).sum::<u64>(), 432);

    let whole = telemetry.query_buckets(&range, None, &ROLLUPS, 1000).await.unwrap().unwrap();
    assert_eq!(whole.len(), 1, "no width: one bucket spanning the range");
    // Past the limit the store answers nothing: it read no more than one bucket past it.
    let hours = Some(Duration::from_secs(HOUR));
    assert_eq!(telemetry.query_buckets(&range, hours, &ROLLUPS, 10).await.unwrap(), None);
    let all_of_them = telemetry.query_buckets(&range, hours, &ROLLUPS, 1000).await.unwrap().unwrap();
    let exactly = all_of_them.len();
    assert_eq!(telemetry.query_buckets(&range, hours, &ROLLUPS, exactly).await.unwrap(), Some(all_of_them));
    assert_eq!(telemetry.query_buckets(&range, hours, &ROLLUPS, exactly - 1).await.unwrap(), None);
    assert_eq!((whole[0].start, whole[0].end, whole[0].count), (at(0), at(3 * 24 * HOUR), 432));
    assert_eq!((whole[0].min, whole[0].max), (-5.0, 31.0));

    let hourly = telemetry
        .query_buckets(
            &ReadingFilter { start: at(0), end: at(2 * HOUR), ..everything(&farm) },
            Some(Duration::from_secs(HOUR)),
            &ROLLUPS,
            1000,
        )
        .await
        .unwrap()
        .unwrap();
    // Edge aggregates count against the limit as well (a farm that uploads only aggregates).
    let b_only = ReadingFilter { device_ids: vec![b], start: at(0), end: at(2 * HOUR), ..everything(&farm) };
    let hours = Some(Duration::from_secs(HOUR));
    assert_eq!(telemetry.query_buckets(&b_only, hours, &ROLLUPS, 1).await.unwrap().map(|b| b.len()), Some(1));
    assert_eq!(telemetry.query_buckets(&b_only, hours, &ROLLUPS, 0).await.unwrap(), None);
    let b_buckets: Vec<_> = hourly.iter().filter(|bucket| bucket.device_id == b).collect();
    assert_eq!(b_buckets.len(), 1, "a device with only edge aggregates is answered from them");
    assert_eq!((b_buckets[0].count, b_buckets[0].min, b_buckets[0].max, b_buckets[0].avg), (12, 1.0, 3.0, 2.0));
    assert_eq!(hourly.iter().filter(|bucket| bucket.device_id == a).map(|b| b.count).sum::<u64>(), 12);
}

async fn latest_readings_keep_the_newest(database: &Database) {
    let (registry, telemetry) = (database.registry(), database.telemetry());
    let farm = farm(&*registry, "latest").await;
    let [a, b] = farm.sensors;
    telemetry
        .commit_batch(
            &batch(
                &farm,
                1,
                3,
                vec![
                    reading(1, a, "temperature", 20.0, 100),
                    reading(2, a, "temperature", 21.0, 200),
                    reading(3, b, "humidity", 50.0, 100),
                ],
            ),
            &ROLLUPS,
        )
        .await
        .unwrap();
    // A late batch with an older measurement must not replace the newer value.
    telemetry.commit_batch(&batch(&farm, 4, 4, vec![reading(4, a, "temperature", 5.0, 150)]), &ROLLUPS).await.unwrap();
    let latest = telemetry.latest_readings(farm.id, &[]).await.unwrap();
    let summary: Vec<(Uuid, String, f64)> = latest.iter().map(|r| (r.device_id, r.metric.clone(), r.value)).collect();
    assert_eq!(summary, vec![(a, "temperature".to_string(), 21.0), (b, "humidity".to_string(), 50.0)]);
    assert_eq!(telemetry.latest_readings(farm.id, &[b]).await.unwrap().len(), 1);
}

async fn retention_deletes_what_is_old(database: &Database) {
    let (registry, telemetry) = (database.registry(), database.telemetry());
    let farm = farm(&*registry, "retention").await;
    let [a, _] = farm.sensors;
    // Two readings a year apart (different partitions on PostgreSQL).
    telemetry
        .commit_batch(
            &batch(
                &farm,
                1,
                2,
                vec![reading(1, a, "temperature", 1.0, 0), reading(2, a, "temperature", 2.0, 365 * 24 * HOUR)],
            ),
            &ROLLUPS,
        )
        .await
        .unwrap();
    let now = at(365 * 24 * HOUR + HOUR);
    let retention =
        Retention { raw: Duration::from_secs(90 * 24 * HOUR), rollups: Duration::from_secs(3 * 365 * 24 * HOUR) };
    assert_eq!(telemetry.apply_retention(retention, now).await.unwrap(), 1);
    let left = telemetry.query_readings(&everything(&farm), None, 10).await.unwrap();
    assert_eq!(left.iter().map(|r| r.value).collect::<Vec<_>>(), vec![2.0]);
    let rollups_kept = telemetry
        .query_buckets(&ReadingFilter { start: at(0), end: at(24 * HOUR), ..everything(&farm) }, None, &ROLLUPS, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rollups_kept.iter().map(|b| b.count).sum::<u64>(), 1, "rollups outlive raw rows");
}

/// A width added to the configuration starts complete (filled from the raw readings), one removed is deleted, and a
/// width configured again later starts complete again: aligned queries agree with the raw rows throughout.
async fn a_new_rollup_width_starts_complete(database: &Database) {
    let (registry, telemetry) = (database.registry(), database.telemetry());
    let farm = farm(&*registry, "widths").await;
    let hourly = [Duration::from_secs(HOUR)];
    assert_eq!(telemetry.align_rollups(&hourly).await.unwrap(), RollupsAligned { added: vec![HOUR], removed: vec![] });
    assert_eq!(telemetry.align_rollups(&hourly).await.unwrap(), RollupsAligned::default(), "nothing to change");
    // Two hours of readings, one every 5 minutes.
    let rows = (0..24u64).map(|step| reading(step + 1, farm.sensors[0], "flow", step as f64, step * 300)).collect();
    telemetry.commit_batch(&batch(&farm, 1, 24, rows), &hourly).await.unwrap();

    let quarters = ReadingFilter { start: at(0), end: at(2 * HOUR), ..everything(&farm) };
    let quarter = Some(Duration::from_secs(900));
    let from_raw = telemetry.query_buckets(&quarters, quarter, &[], 100).await.unwrap().unwrap();
    assert_eq!(from_raw.len(), 8);
    let with_quarters = [Duration::from_secs(HOUR), Duration::from_secs(900)];
    let aligned = telemetry.align_rollups(&with_quarters).await.unwrap();
    assert_eq!(aligned, RollupsAligned { added: vec![900], removed: vec![] });
    let from_rollup = telemetry.query_buckets(&quarters, quarter, &with_quarters, 100).await.unwrap().unwrap();
    assert_eq!(from_rollup, from_raw, "the new width's rollup holds what was committed before it");

    // Removed, then configured again: its rollups are made again from the raw rows, not left stale.
    let quarters_only = [Duration::from_secs(900)];
    assert_eq!(
        telemetry.align_rollups(&quarters_only).await.unwrap(),
        RollupsAligned { added: vec![], removed: vec![HOUR] }
    );
    let more = (24..36u64).map(|step| reading(step + 1, farm.sensors[0], "flow", step as f64, step * 300)).collect();
    telemetry.commit_batch(&batch(&farm, 25, 36, more), &quarters_only).await.unwrap();
    assert_eq!(telemetry.align_rollups(&with_quarters).await.unwrap().added, vec![HOUR]);
    let hours = ReadingFilter { start: at(0), end: at(3 * HOUR), ..everything(&farm) };
    let hour = Some(Duration::from_secs(HOUR));
    let from_raw = telemetry.query_buckets(&hours, hour, &[], 100).await.unwrap().unwrap();
    let from_rollup = telemetry.query_buckets(&hours, hour, &with_quarters, 100).await.unwrap().unwrap();
    assert_eq!(from_raw.iter().map(|b| b.count).collect::<Vec<_>>(), [12, 12, 12]);
    assert_eq!(from_rollup, from_raw);
}

/// A commit that asks for it lists its batch for scoring, with each series' span of what it wrote (above the mark);
/// a claim takes what arrived before the given time, except what the caller has in hand, and holds it for the
/// lease, counting attempts, unless the claimer gives it back; a confirmed batch leaves the list; retention drops
/// what is older than the raw readings kept.
async fn batches_are_listed_for_scoring_until_confirmed(database: &Database) {
    let (registry, telemetry) = (database.registry(), database.telemetry());
    let farm = farm(&*registry, "scoring list").await;
    let [a, b] = farm.sensors;
    let received = SystemTime::now();
    let key = |last_sequence| BatchKey { gateway_id: farm.gateway, spool_id: farm.spool, last_sequence };
    let minute = Duration::from_secs(60);
    let later = received + minute;

    let unlisted =
        batch(&farm, 1, 2, vec![reading(1, a, "temperature", 1.0, 10), reading(2, a, "temperature", 2.0, 20)]);
    telemetry.commit_batch(&unlisted, &[]).await.unwrap();
    assert!(telemetry.claim_unscored(later, later, minute, 10, &[]).await.unwrap().is_empty(), "not asked to list it");

    // Overlapping the mark: only sequences 3 to 5 are written, and listed.
    let rows = vec![
        reading(2, a, "temperature", 2.0, 20),
        reading(3, b, "humidity", 50.0, 40),
        reading(4, a, "temperature", 3.0, 35),
        reading(5, b, "humidity", 51.0, 30),
    ];
    let listed = EdgeBatch { score_later: true, receive_time: received, ..batch(&farm, 2, 5, rows) };
    telemetry.commit_batch(&listed, &[]).await.unwrap();
    assert_eq!(telemetry.commit_batch(&listed, &[]).await.unwrap(), BatchOutcome::Duplicate);
    let only_aggregates = EdgeBatch { score_later: true, ..batch(&farm, 6, 6, vec![]) };
    telemetry.commit_batch(&only_aggregates, &[]).await.unwrap();

    assert!(
        telemetry.claim_unscored(received, later, minute, 10, &[]).await.unwrap().is_empty(),
        "only what arrived before the given time is claimed"
    );
    assert!(
        telemetry.claim_unscored(later, later, minute, 10, &[key(5)]).await.unwrap().is_empty(),
        "a batch the caller has in hand is not claimed"
    );
    let claimed = telemetry.claim_unscored(later, later, minute, 10, &[]).await.unwrap();
    assert_eq!(claimed.len(), 1, "one listed batch: a commit without readings is not listed");
    let claim = &claimed[0];
    assert_eq!((claim.key, claim.farm_id, claim.attempts), (key(5), farm.id, 1));
    let mut expected = vec![
        BatchSeries { device_id: a, metric: "temperature".into(), first_time: at(35), last_time: at(35) },
        BatchSeries { device_id: b, metric: "humidity".into(), first_time: at(30), last_time: at(40) },
    ];
    expected.sort_by_key(|span| (span.device_id, span.metric.clone()));
    let mut series = claim.series.clone();
    series.sort_by_key(|span| (span.device_id, span.metric.clone()));
    assert_eq!(series, expected);

    assert!(
        telemetry.claim_unscored(later, later + minute / 2, minute, 10, &[]).await.unwrap().is_empty(),
        "a claimed batch is left alone while the claim lasts"
    );
    let again = telemetry.claim_unscored(later, later + minute, minute, 10, &[]).await.unwrap();
    assert_eq!(again.iter().map(|batch| (batch.key, batch.attempts)).collect::<Vec<_>>(), [(key(5), 2)]);

    // A stopping claimer gives its claim back: only the claim it made (another's, made after its own ended, stays).
    telemetry.release_unscored(&[key(5)], later + minute).await.unwrap();
    assert!(
        telemetry.claim_unscored(later, later + minute, minute, 10, &[]).await.unwrap().is_empty(),
        "a claim that ends at another time is not this claimer's to give back"
    );
    telemetry.release_unscored(&[key(5), key(99)], later + 2 * minute).await.unwrap();
    let released = telemetry.claim_unscored(later, later + minute, minute, 10, &[]).await.unwrap();
    assert_eq!(
        released.iter().map(|batch| (batch.key, batch.attempts)).collect::<Vec<_>>(),
        [(key(5), 2)],
        "claimed again at once, the given-back attempt not counted"
    );

    telemetry.forget_unscored(&[key(5), key(99)]).await.unwrap();
    assert!(
        telemetry.claim_unscored(later, later + 10 * minute, minute, 10, &[]).await.unwrap().is_empty(),
        "confirmed"
    );

    // Retention: a listed batch whose readings are past the raw retention goes with them.
    let old = EdgeBatch {
        score_later: true,
        receive_time: at(100),
        ..batch(&farm, 7, 7, vec![reading(7, a, "temperature", 4.0, 100)])
    };
    telemetry.commit_batch(&old, &[]).await.unwrap();
    let retention = Retention { raw: Duration::from_secs(24 * HOUR), rollups: Duration::from_secs(24 * HOUR) };
    telemetry.apply_retention(retention, at(100 + 48 * HOUR)).await.unwrap();
    assert!(telemetry.claim_unscored(later, later + 10 * minute, minute, 10, &[]).await.unwrap().is_empty());
}

macro_rules! telemetry_suite {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn batches_commit_once() {
                super::batches_commit_once(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn readings_page_and_filter() {
                super::readings_page_and_filter(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn buckets_agree_between_raw_rows_and_rollups() {
                super::buckets_agree_between_raw_rows_and_rollups(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn latest_readings_keep_the_newest() {
                super::latest_readings_keep_the_newest(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn retention_deletes_what_is_old() {
                super::retention_deletes_what_is_old(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn a_new_rollup_width_starts_complete() {
                super::a_new_rollup_width_starts_complete(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn batches_are_listed_for_scoring_until_confirmed() {
                super::batches_are_listed_for_scoring_until_confirmed(&Harness::$backend().await.database).await;
            }
        }
    };
}

telemetry_suite!(sqlite);
telemetry_suite!(postgres);

/// Two replicas share a database: one's retention drops a month's partition that the other still has cached, and
/// a late reading of that month arrives through the other.
#[tokio::test]
async fn a_partition_dropped_by_another_replica_is_made_again() {
    let harness = Harness::postgres().await;
    let url = harness.url.clone();
    let other_replica = Database::connect(&url, &PostgresConfig::default()).await.unwrap();
    let farm = farm(&*harness.database.registry(), "replicas").await;
    let [a, _] = farm.sensors;
    let telemetry = harness.database.telemetry();
    let first = batch(&farm, 1, 1, vec![reading(1, a, "temperature", 1.0, 0)]);
    telemetry.commit_batch(&first, &ROLLUPS).await.unwrap();

    let retention =
        Retention { raw: Duration::from_secs(90 * 24 * HOUR), rollups: Duration::from_secs(3 * 365 * 24 * HOUR) };
    assert_eq!(other_replica.telemetry().apply_retention(retention, at(365 * 24 * HOUR)).await.unwrap(), 1);

    let late = batch(&farm, 2, 2, vec![reading(2, a, "temperature", 2.0, HOUR)]);
    let outcome = telemetry.commit_batch(&late, &ROLLUPS).await.unwrap();
    assert!(matches!(outcome, BatchOutcome::Committed { readings: 1, .. }), "{outcome:?}");
    let left = telemetry.query_readings(&everything(&farm), None, 10).await.unwrap();
    assert_eq!(left.iter().map(|r| r.value).collect::<Vec<_>>(), vec![2.0]);
}

/// A process starting with no series cached reads the series it finds instead of inserting them again: an insert
/// that meets a conflict would take a series id each time, and a cloud restarting or cycling its cache through
/// millions of series would run out of them.
#[tokio::test]
async fn series_ids_are_not_used_up_by_a_restart() {
    let harness = Harness::postgres().await;
    let farm = farm(&*harness.database.registry(), "restarts").await;
    let [a, b] = farm.sensors;
    let first = batch(&farm, 1, 2, vec![reading(1, a, "temperature", 1.0, 0), reading(2, b, "temperature", 2.0, 0)]);
    harness.database.telemetry().commit_batch(&first, &ROLLUPS).await.unwrap();

    let restarted = harness.reopen().await;
    let second = batch(
        &farm,
        3,
        5,
        vec![
            reading(3, a, "temperature", 3.0, 60),
            reading(4, b, "temperature", 4.0, 60),
            reading(5, a, "humidity", 5.0, 60),
        ],
    );
    restarted.telemetry().commit_batch(&second, &ROLLUPS).await.unwrap();

    let (client, connection) = tokio_postgres::connect(&harness.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client.query_one("SELECT count(*), max(id)::bigint FROM reading_series", &[]).await.unwrap();
    let (series, highest_id): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((series, highest_id), (3, 3), "three series, and no id taken but theirs");
    let readings = restarted.telemetry().query_readings(&everything(&farm), None, 10).await.unwrap();
    assert_eq!(readings.iter().map(|r| r.value).collect::<Vec<_>>(), vec![1.0, 2.0, 5.0, 3.0, 4.0]);
}
