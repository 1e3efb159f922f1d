//! Migration 10 moves readings from carrying their farm, device and metric to naming a series: a database an
//! earlier release filled keeps every reading through it, on both backends, and the store goes on writing to the
//! series the migration made.

use std::time::{Duration, SystemTime};

use smartfarm_core::config::PostgresConfig;
use smartfarm_core::time::{from_unix_micros, to_unix_micros};
use smartfarm_store::model::{DeviceKind, NewDevice};
use smartfarm_store::telemetry::{BatchOutcome, EdgeBatch, ReadingFilter, ReadingRow, Retention};
use smartfarm_store::testing::TestPostgres;
use smartfarm_store::{Database, RegistryStore};
use uuid::Uuid;

/// The schema version before readings named their series.
const BEFORE_SERIES: i64 = 9;
const DAY: u64 = 24 * 3600;
/// 2026-05-29 00:00:00 UTC.
const BASE_SECONDS: i64 = 1_780_012_800;

fn at(seconds: u64) -> SystemTime {
    from_unix_micros((BASE_SECONDS + seconds as i64) * 1_000_000)
}

/// A reading as the old layout stored it.
struct OldReading {
    farm: Uuid,
    device: Uuid,
    metric: &'static str,
    seconds: u64,
    value: f64,
    sequence: i64,
}

/// Two farms: the first with a gateway and two sensors, the second with a gateway and one.
struct Fleet {
    farm: Uuid,
    gateway: Uuid,
    sensors: [Uuid; 2],
    other_farm: Uuid,
    other_sensor: Uuid,
}

async fn fleet(registry: &dyn RegistryStore) -> Fleet {
    let mut farms = Vec::new();
    for (name, kinds) in [
        ("before series", &[DeviceKind::Gateway, DeviceKind::Sensor, DeviceKind::Sensor][..]),
        ("next door", &[DeviceKind::Gateway, DeviceKind::Sensor][..]),
    ] {
        let farm = registry.create_farm(Uuid::now_v7(), name, SystemTime::now()).await.unwrap();
        let mut devices = Vec::new();
        for (index, kind) in kinds.iter().enumerate() {
            let device = NewDevice {
                id: Uuid::now_v7(),
                farm_id: farm.id,
                name: format!("device {index}"),
                kind: *kind,
                labels: Default::default(),
                credential_sha256: "00".repeat(32),
                create_time: SystemTime::now(),
            };
            devices.push(registry.create_device(device).await.unwrap().id);
        }
        farms.push((farm.id, devices));
    }
    Fleet {
        farm: farms[0].0,
        gateway: farms[0].1[0],
        sensors: [farms[0].1[1], farms[0].1[2]],
        other_farm: farms[1].0,
        other_sensor: farms[1].1[1],
    }
}

/// What the earlier release had stored: readings in May and in July (two partitions on PostgreSQL), of both farms.
fn old_readings(fleet: &Fleet) -> Vec<OldReading> {
    let [a, b] = fleet.sensors;
    vec![
        OldReading { farm: fleet.farm, device: a, metric: "temperature", seconds: 0, value: 1.0, sequence: 1 },
        OldReading { farm: fleet.farm, device: a, metric: "humidity", seconds: 0, value: 2.0, sequence: 2 },
        OldReading { farm: fleet.farm, device: b, metric: "temperature", seconds: 40 * DAY, value: 3.0, sequence: 3 },
        OldReading {
            farm: fleet.other_farm,
            device: fleet.other_sensor,
            metric: "temperature",
            seconds: 60,
            value: 4.0,
            sequence: 1,
        },
    ]
}

fn everything(farm: Uuid) -> ReadingFilter {
    ReadingFilter { farm_id: farm, device_ids: vec![], metrics: vec![], start: at(0), end: at(400 * DAY) }
}

/// Migrates `database`, which holds `old_readings(fleet)` in the old layout, and checks what it holds after.
async fn check_migration_keeps_readings(database: &Database, fleet: &Fleet) {
    // The series migration, and any made after it.
    let report = database.migrate().await.unwrap();
    assert_eq!(report.applied, ((BEFORE_SERIES + 1)..=report.current_version).collect::<Vec<_>>());
    let telemetry = database.telemetry();
    let [a, b] = fleet.sensors;
    let readings = telemetry.query_readings(&everything(fleet.farm), None, 10).await.unwrap();
    let seen: Vec<_> = readings.iter().map(|r| (r.device_id, r.metric.as_str(), r.value, r.sequence)).collect();
    assert_eq!(seen, vec![(a, "humidity", 2.0, 2), (a, "temperature", 1.0, 1), (b, "temperature", 3.0, 3)]);
    assert_eq!(readings[0].measure_time, at(0));
    assert_eq!(readings[2].measure_time, at(40 * DAY));
    let next_door = telemetry.query_readings(&everything(fleet.other_farm), None, 10).await.unwrap();
    assert_eq!(next_door.iter().map(|r| (r.device_id, r.value)).collect::<Vec<_>>(), vec![(fleet.other_sensor, 4.0)]);

    // The store writes to the series the migration made.
    let batch = EdgeBatch {
        gateway_id: fleet.gateway,
        spool_id: Uuid::now_v7(),
        farm_id: fleet.farm,
        first_sequence: 1,
        last_sequence: 2,
        readings: vec![
            ReadingRow { sequence: 1, device_id: a, metric: "temperature".into(), value: 5.0, measure_time: at(60) },
            ReadingRow { sequence: 2, device_id: b, metric: "soil_moisture".into(), value: 6.0, measure_time: at(60) },
        ],
        aggregates: Vec::new(),
        receive_time: SystemTime::now(),
        score_later: false,
    };
    let outcome = telemetry.commit_batch(&batch, &[Duration::from_secs(3600)]).await.unwrap();
    assert!(matches!(outcome, BatchOutcome::Committed { readings: 2, .. }), "{outcome:?}");
    let temperature =
        ReadingFilter { device_ids: vec![a], metrics: vec!["temperature".into()], ..everything(fleet.farm) };
    let values: Vec<f64> =
        telemetry.query_readings(&temperature, None, 10).await.unwrap().iter().map(|r| r.value).collect();
    assert_eq!(values, vec![1.0, 5.0], "the old reading and the new one, in one series");
}

#[tokio::test]
async fn postgres_readings_survive_the_move_to_series() {
    let postgres = TestPostgres::create().await;
    let database = Database::connect(&postgres.url, &PostgresConfig::default()).await.unwrap();
    database.migrate_to(BEFORE_SERIES).await.unwrap();
    let fleet = fleet(&*database.registry()).await;
    let (client, connection) = tokio_postgres::connect(&postgres.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // The partitions and rows as 0002 laid them out and the earlier store wrote them.
    client
        .batch_execute(
            "CREATE TABLE readings_p202605 PARTITION OF readings FOR VALUES FROM ('2026-05-01 00:00:00+00') TO ('2026-06-01 00:00:00+00');
             CREATE TABLE readings_p202607 PARTITION OF readings FOR VALUES FROM ('2026-07-01 00:00:00+00') TO ('2026-08-01 00:00:00+00');",
        )
        .await
        .unwrap();
    for old in old_readings(&fleet) {
        let metric: i32 = client
            .query_one(
                "INSERT INTO metric_names (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING id",
                &[&old.metric],
            )
            .await
            .unwrap()
            .get(0);
        client
            .execute(
                "INSERT INTO readings (time, farm_id, device_id, metric_id, value, sequence, receive_time)
                 VALUES ($1, $2, $3, $4, $5, $6, now())",
                &[&at(old.seconds), &old.farm, &old.device, &metric, &old.value, &old.sequence],
            )
            .await
            .unwrap();
    }

    check_migration_keeps_readings(&database, &fleet).await;

    // The new table took over the partitions' names and bounds; nothing of the old one is left.
    let partitions: Vec<String> = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'readings'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(partitions, ["readings_p202605", "readings_p202607"]);
    let leftovers: i64 = client
        .query_one("SELECT count(*) FROM pg_class WHERE relname LIKE '%readings_v1%' OR relname LIKE 'v1_%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0);
    let series: i64 = client.query_one("SELECT count(*) FROM reading_series", &[]).await.unwrap().get(0);
    assert_eq!(series, 5, "four from the migration, and the new soil moisture series");
    // Retention drops the migrated partitions as it dropped the old ones: May's and July's readings, 6 in all.
    let retention = Retention { raw: Duration::from_secs(30 * DAY), rollups: Duration::from_secs(3 * 365 * DAY) };
    assert_eq!(database.telemetry().apply_retention(retention, at(200 * DAY)).await.unwrap(), 6);
}

#[tokio::test]
async fn sqlite_readings_survive_the_move_to_series() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("before-series.db");
    let database =
        Database::connect(&format!("sqlite://{}", path.display()), &PostgresConfig::default()).await.unwrap();
    database.migrate_to(BEFORE_SERIES).await.unwrap();
    let fleet = fleet(&*database.registry()).await;
    {
        // The rows as the earlier store wrote them (a second connection; the store's is idle).
        let connection = rusqlite::Connection::open(&path).unwrap();
        for old in old_readings(&fleet) {
            connection.execute("INSERT OR IGNORE INTO metric_names (name) VALUES (?1)", [old.metric]).unwrap();
            connection
                .execute(
                    "INSERT INTO readings (time, farm_id, device_id, metric_id, value, sequence, receive_time)
                     SELECT ?1, ?2, ?3, id, ?4, ?5, ?1 FROM metric_names WHERE name = ?6",
                    rusqlite::params![
                        to_unix_micros(at(old.seconds)),
                        old.farm.to_string(),
                        old.device.to_string(),
                        old.value,
                        old.sequence,
                        old.metric
                    ],
                )
                .unwrap();
        }
    }

    check_migration_keeps_readings(&database, &fleet).await;

    let connection = rusqlite::Connection::open(&path).unwrap();
    let series: i64 = connection.query_row("SELECT count(*) FROM reading_series", [], |row| row.get(0)).unwrap();
    assert_eq!(series, 5, "four from the migration, and the new soil moisture series");
}
