//! The cloud side of the edge link, spoken by a test client over real gRPC: hello and the committed mark, registry
//! pushes, exactly-once batch commits, refusals, and the telemetry queries over what was committed.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use smartfarm_core::time::to_timestamp;
use smartfarm_e2e::{Backend, Bearer, Cloud, CloudData, CloudOptions, bootstrap_admin_key};
use smartfarm_proto::common::v1::{Reading, TimeRange};
use smartfarm_proto::device::v1::{self as device_pb, DeviceKind};
use smartfarm_proto::ingestion::v1::{self as pb, connect_request, connect_response};

/// A farm with a gateway and a sensor, registered through the API.
struct Farm {
    id: String,
    gateway: String,
    gateway_credential: String,
    sensor: String,
    admin_key: String,
}

async fn farm(cloud: &Cloud, data: &CloudData) -> Farm {
    let admin_key = bootstrap_admin_key(data);
    let mut admin = cloud.device_client(&admin_key).await;
    let farm = admin
        .create_farm(device_pb::CreateFarmRequest { name: "link farm".into() })
        .await
        .unwrap()
        .into_inner()
        .farm
        .unwrap();
    let register = |name: &str, kind: DeviceKind| device_pb::RegisterDeviceRequest {
        farm_id: farm.id.clone(),
        name: name.into(),
        kind: kind as i32,
        labels: HashMap::new(),
    };
    let gateway = admin.register_device(register("gateway", DeviceKind::Gateway)).await.unwrap().into_inner();
    let sensor = admin.register_device(register("probe", DeviceKind::Sensor)).await.unwrap().into_inner();
    Farm {
        id: farm.id,
        gateway: gateway.device.unwrap().id,
        gateway_credential: gateway.credential,
        sensor: sensor.device.unwrap().id,
        admin_key,
    }
}

/// An open edge link: what the test sends up, and what comes down.
struct Link {
    up: mpsc::Sender<pb::ConnectRequest>,
    down: tonic::Streaming<pb::ConnectResponse>,
}

impl Link {
    async fn open(cloud: &Cloud, credential: &str, spool_id: uuid::Uuid) -> Result<Link, tonic::Status> {
        let mut client = pb::ingestion_service_client::IngestionServiceClient::with_interceptor(
            cloud.channel().await,
            Bearer::new(credential),
        );
        let (up, receiver) = mpsc::channel(16);
        up.send(pb::ConnectRequest {
            body: Some(connect_request::Body::Hello(pb::EdgeHello {
                agent_version: "test".into(),
                spool_id: spool_id.to_string(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let down = client.connect(ReceiverStream::new(receiver)).await?.into_inner();
        Ok(Link { up, down })
    }

    async fn next(&mut self) -> connect_response::Body {
        let message =
            tokio::time::timeout(Duration::from_secs(10), self.down.message()).await.expect("a message within 10 s");
        message.expect("the link stays up").expect("the link is open").body.expect("a body")
    }

    async fn send_batch(&self, batch: pb::ReadingBatch) {
        self.up.send(pb::ConnectRequest { body: Some(connect_request::Body::Batch(batch)) }).await.unwrap();
    }
}

fn readings(device: &str, sequences: std::ops::RangeInclusive<u64>, base: SystemTime) -> Vec<pb::SpoolRecord> {
    sequences
        .map(|sequence| pb::SpoolRecord {
            sequence,
            body: Some(pb::spool_record::Body::Reading(Reading {
                device_id: device.to_string(),
                metric: "soil_moisture".into(),
                value: sequence as f64 / 10.0,
                measure_time: Some(to_timestamp(base + Duration::from_secs(sequence))),
                receive_time: None,
            })),
        })
        .collect()
}

async fn exactly_once_over_the_link(backend: Backend) {
    let data = CloudData::new(backend).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let farm = farm(&cloud, &data).await;
    let base = SystemTime::now() - Duration::from_secs(3600);
    let spool = uuid::Uuid::now_v7();

    let mut link = Link::open(&cloud, &farm.gateway_credential, spool).await.unwrap();
    let connect_response::Body::Welcome(welcome) = link.next().await else { panic!("welcome first") };
    assert_eq!(welcome.committed_sequence, 0);
    assert!(welcome.max_in_flight_batches >= 1);
    let connect_response::Body::Registry(registry) = link.next().await else { panic!("then the registry") };
    assert_eq!(registry.devices.len(), 2, "gateway and sensor, with credential hashes");
    assert!(registry.devices.iter().all(|d| d.credential_sha256.len() == 64));
    // Then the plant-disease model version the farm's agent should run.
    let connect_response::Body::ModelUpdate(models) = link.next().await else { panic!("then the model to run") };
    let names: Vec<(&str, &str)> = models.models.iter().map(|m| (m.name.as_str(), m.version.as_str())).collect();
    assert_eq!(names, [("leafnet-plantvillage7", "2026-12-05")]);

    let first = smartfarm_ingestion::batch::encode(readings(&farm.sensor, 1..=100, base), 1, 100);
    link.send_batch(first.clone()).await;
    let connect_response::Body::BatchAck(ack) = link.next().await else { panic!("an ack") };
    assert_eq!((ack.last_sequence, ack.duplicate), (100, false));
    link.send_batch(first).await;
    let connect_response::Body::BatchAck(ack) = link.next().await else { panic!("an ack") };
    assert_eq!((ack.last_sequence, ack.duplicate), (100, true), "a resent batch is acknowledged, not written");

    let mut garbage = smartfarm_ingestion::batch::encode(readings(&farm.sensor, 101..=101, base), 101, 101);
    garbage.payload = b"definitely not zstd".to_vec();
    link.send_batch(garbage).await;
    let connect_response::Body::BatchReject(reject) = link.next().await else { panic!("a refusal") };
    assert_eq!((reject.first_sequence, reject.last_sequence), (101, 101));
    assert!(reject.reason.contains("zstd"), "{}", reject.reason);
    drop(link);

    // A reconnect learns the mark and resends only what is above it; overlapping records are not duplicated.
    let mut link = Link::open(&cloud, &farm.gateway_credential, spool).await.unwrap();
    let connect_response::Body::Welcome(welcome) = link.next().await else { panic!("welcome first") };
    assert_eq!(welcome.committed_sequence, 100);
    let _registry = link.next().await;
    let _models = link.next().await;
    link.send_batch(smartfarm_ingestion::batch::encode(readings(&farm.sensor, 90..=150, base), 90, 150)).await;
    let connect_response::Body::BatchAck(ack) = link.next().await else { panic!("an ack") };
    assert_eq!((ack.last_sequence, ack.duplicate), (150, false));

    // Every reading exactly once, through the query API.
    let mut telemetry = pb::telemetry_service_client::TelemetryServiceClient::with_interceptor(
        cloud.channel().await,
        Bearer::new(&farm.admin_key),
    );
    let range = TimeRange { start_time: Some(to_timestamp(base)), end_time: Some(to_timestamp(SystemTime::now())) };
    let mut sequences = Vec::new();
    let mut token = String::new();
    loop {
        let page = telemetry
            .query_readings(pb::QueryReadingsRequest {
                farm_id: farm.id.clone(),
                time_range: Some(range),
                page_size: 40,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        sequences.extend(page.readings.iter().map(|r| (r.value * 10.0).round() as u64));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(sequences, (1..=150).collect::<Vec<_>>());
    let buckets = telemetry
        .query_aggregates(pb::QueryAggregatesRequest {
            farm_id: farm.id.clone(),
            time_range: Some(range),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .buckets;
    assert_eq!(buckets.len(), 1);
    assert_eq!((buckets[0].count, buckets[0].min, buckets[0].max), (150, 0.1, 15.0));
    let latest = telemetry
        .get_latest_readings(pb::GetLatestReadingsRequest { farm_id: farm.id.clone(), device_ids: vec![] })
        .await
        .unwrap()
        .into_inner()
        .readings;
    assert_eq!(latest.len(), 1);
    assert_eq!(latest[0].value, 15.0);

    // The sensor counts as seen now.
    let mut admin = cloud.device_client(&farm.admin_key).await;
    let sensor = admin
        .get_device(device_pb::GetDeviceRequest { device_id: farm.sensor.clone() })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    assert_eq!(sensor.state, device_pb::DeviceState::Active as i32);

    // A second series: one-second buckets over a day are fine for one series, too many for two in one response.
    let mut humidity = readings(&farm.sensor, 151..=151, base);
    if let Some(pb::spool_record::Body::Reading(reading)) = &mut humidity[0].body {
        reading.metric = "humidity".into();
    }
    link.send_batch(smartfarm_ingestion::batch::encode(humidity, 151, 151)).await;
    let connect_response::Body::BatchAck(_) = link.next().await else { panic!("an ack") };
    let day = TimeRange {
        start_time: Some(to_timestamp(base - Duration::from_secs(12 * 3600))),
        end_time: Some(to_timestamp(base + Duration::from_secs(12 * 3600))),
    };
    let by_second = |metrics: Vec<String>| pb::QueryAggregatesRequest {
        farm_id: farm.id.clone(),
        time_range: Some(day),
        bucket_width: Some(smartfarm_proto::pbjson_types::Duration { seconds: 1, nanos: 0 }),
        metrics,
        ..Default::default()
    };
    let buckets = telemetry.query_aggregates(by_second(vec!["humidity".into()])).await.unwrap().into_inner().buckets;
    assert_eq!(buckets.len(), 1, "one non-empty bucket");
    let status = telemetry.query_aggregates(by_second(vec![])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("more than the 100000 a response holds"), "{status:?}");

    // A window of batches sent without waiting, as the agent sends them: acknowledged and refused in order, each
    // reading stored once, however the cloud groups the batches into transactions. Nothing behind a refused batch
    // commits and the link ends: the mark must not pass over records the agent still holds.
    let encode = |range: std::ops::RangeInclusive<u64>| {
        smartfarm_ingestion::batch::encode(readings(&farm.sensor, range.clone(), base), *range.start(), *range.end())
    };
    let mut garbage = encode(252..=252);
    garbage.payload = b"not zstd either".to_vec();
    for batch in [encode(152..=200), encode(201..=251), garbage, encode(253..=300)] {
        link.send_batch(batch).await;
    }
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(match link.next().await {
            connect_response::Body::BatchAck(ack) => (ack.last_sequence, Some(ack.duplicate)),
            connect_response::Body::BatchReject(reject) => (reject.last_sequence, None),
            other => panic!("an ack or a refusal, not {other:?}"),
        });
    }
    assert_eq!(answers, [(200, Some(false)), (251, Some(false)), (252, None)]);
    let ended = tokio::time::timeout(Duration::from_secs(10), link.down.message()).await.expect("the link ends");
    assert!(!matches!(ended, Ok(Some(_))), "nothing more after a refusal: {ended:?}");
    drop(link);
    let mut link = Link::open(&cloud, &farm.gateway_credential, spool).await.unwrap();
    let connect_response::Body::Welcome(welcome) = link.next().await else { panic!("welcome first") };
    assert_eq!(welcome.committed_sequence, 251, "the batch behind the refused one was not committed");
    let _registry = link.next().await;
    let _models = link.next().await;
    // The refused batch's records are skipped here by sending what follows them; a resend inside the window is a
    // duplicate.
    link.send_batch(encode(253..=300)).await;
    link.send_batch(encode(253..=300)).await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        let connect_response::Body::BatchAck(ack) = link.next().await else { panic!("an ack") };
        answers.push((ack.last_sequence, ack.duplicate));
    }
    assert_eq!(answers, [(300, false), (300, true)]);
    let soil = telemetry
        .query_aggregates(pb::QueryAggregatesRequest {
            farm_id: farm.id.clone(),
            time_range: Some(range),
            metrics: vec!["soil_moisture".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .buckets;
    assert_eq!(soil[0].count, 150 + 100 + 48, "every reading of the window once");

    // Records the cloud does not store are told to the agent with the acknowledgement, by reason (not again on a
    // duplicate): here a time three days ahead, a NaN and a device of no farm of this cloud.
    let mut dropped = readings(&farm.sensor, 301..=304, base);
    let mut edit = |index: usize, change: &dyn Fn(&mut Reading)| {
        if let Some(pb::spool_record::Body::Reading(reading)) = &mut dropped[index].body {
            change(reading);
        }
    };
    edit(1, &|reading| reading.measure_time = Some(to_timestamp(SystemTime::now() + Duration::from_secs(3 * 86400))));
    edit(2, &|reading| reading.value = f64::NAN);
    edit(3, &|reading| reading.device_id = uuid::Uuid::now_v7().to_string());
    let dropped = smartfarm_ingestion::batch::encode(dropped, 301, 304);
    link.send_batch(dropped.clone()).await;
    link.send_batch(dropped).await;
    let connect_response::Body::BatchAck(ack) = link.next().await else { panic!("an ack") };
    let told: Vec<(&str, u64)> = ack.dropped.iter().map(|dropped| (dropped.reason.as_str(), dropped.count)).collect();
    assert_eq!(told, [("foreign_device", 1), ("bad_value", 1), ("bad_time", 1)]);
    let connect_response::Body::BatchAck(ack) = link.next().await else { panic!("an ack") };
    assert!(ack.duplicate && ack.dropped.is_empty(), "{ack:?}");
    cloud.stop().await;
}

/// A stream opened with a credential that is replaced before the agent says hello does not become a link: the link
/// holds on to the credential the stream signed in with, not to the device's current one.
async fn a_credential_replaced_before_hello_opens_no_link(backend: Backend) {
    let data = CloudData::new(backend).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let farm = farm(&cloud, &data).await;
    let mut client = pb::ingestion_service_client::IngestionServiceClient::with_interceptor(
        cloud.channel().await,
        Bearer::new(&farm.gateway_credential),
    );
    let (up, receiver) = mpsc::channel(4);
    let mut down = client.connect(ReceiverStream::new(receiver)).await.expect("signed in").into_inner();
    let mut admin = cloud.device_client(&farm.admin_key).await;
    let rotate = device_pb::RotateDeviceCredentialRequest { device_id: farm.gateway.clone() };
    admin.rotate_device_credential(rotate).await.unwrap();
    let hello = pb::EdgeHello {
        agent_version: "test".into(),
        spool_id: uuid::Uuid::now_v7().to_string(),
        ..Default::default()
    };
    up.send(pb::ConnectRequest { body: Some(connect_request::Body::Hello(hello)) }).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), down.message()).await.expect("an answer within 10 s");
    let status = answer.expect_err("no welcome for a replaced credential");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    cloud.stop().await;
}

async fn only_gateways_open_links_and_queries_stay_in_the_farm(backend: Backend) {
    let data = CloudData::new(backend).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let farm = farm(&cloud, &data).await;

    let mut link = match Link::open(&cloud, &farm.admin_key, uuid::Uuid::now_v7()).await {
        Err(status) => {
            assert_eq!(status.code(), Code::PermissionDenied);
            None
        }
        Ok(link) => Some(link),
    };
    if let Some(link) = link.as_mut() {
        let status = link.down.message().await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "an api key cannot open an edge link");
    }

    let mut admin = cloud.device_client(&farm.admin_key).await;
    let other = admin
        .create_farm(device_pb::CreateFarmRequest { name: "other".into() })
        .await
        .unwrap()
        .into_inner()
        .farm
        .unwrap();
    let other_key = admin
        .create_api_key(device_pb::CreateApiKeyRequest { name: "other".into(), farm_id: other.id })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut telemetry = pb::telemetry_service_client::TelemetryServiceClient::with_interceptor(
        cloud.channel().await,
        Bearer::new(&other_key),
    );
    let range = TimeRange {
        start_time: Some(to_timestamp(SystemTime::UNIX_EPOCH)),
        end_time: Some(to_timestamp(SystemTime::now())),
    };
    let status = telemetry
        .query_readings(pb::QueryReadingsRequest {
            farm_id: farm.id.clone(),
            time_range: Some(range),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut admin_telemetry = pb::telemetry_service_client::TelemetryServiceClient::with_interceptor(
        cloud.channel().await,
        Bearer::new(&farm.admin_key),
    );
    let status = admin_telemetry
        .query_readings(pb::QueryReadingsRequest { farm_id: farm.id.clone(), time_range: None, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("time_range: is required"), "{status:?}");
    let status = admin_telemetry
        .query_aggregates(pb::QueryAggregatesRequest {
            farm_id: farm.id.clone(),
            time_range: Some(range),
            bucket_width: Some(smartfarm_proto::pbjson_types::Duration { seconds: 1, nanos: 0 }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("bucket_width: is too small"), "{status:?}");
    let status = admin_telemetry
        .query_aggregates(pb::QueryAggregatesRequest {
            farm_id: farm.id.clone(),
            time_range: Some(range),
            bucket_width: Some(smartfarm_proto::pbjson_types::Duration { seconds: 200 * 366 * 86_400, nanos: 0 }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("at most 100 years"), "{status:?}");
    cloud.stop().await;
}

macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $test() { super::$test(smartfarm_e2e::Backend::Sqlite).await; } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $test() { super::$test(smartfarm_e2e::Backend::Postgres).await; } )*
        }
    };
}

on_every_backend!(exactly_once_over_the_link, only_gateways_open_links_and_queries_stay_in_the_farm);

#[tokio::test]
async fn a_credential_replaced_before_hello_opens_no_link_on_sqlite() {
    a_credential_replaced_before_hello_opens_no_link(Backend::Sqlite).await;
}

/// An anomalous stretch in a series that came up the link becomes an alert of the farm's anomaly rule, with the
/// stretch as its evidence, and its batch leaves the list of batches to score only once the alert role has
/// recorded it. The series is NAB's EC2 latency fixture (services/ml/fixtures), moved to the last two weeks: its
/// first 30 % is the history the detector learns from, the next batch holds the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anomaly_in_readings_from_the_link_raises_the_farm_s_anomaly_rule() {
    use smartfarm_ml::anomaly::nab;
    use smartfarm_proto::alert::v1 as alert_pb;

    let data = CloudData::new(Backend::Sqlite).await;
    let cloud = Cloud::start(&data, CloudOptions::default()).await;
    let farm = farm(&cloud, &data).await;
    let alerts = smartfarm_proto::alert::v1::alert_service_client::AlertServiceClient::with_interceptor(
        cloud.channel().await,
        Bearer::new(&farm.admin_key),
    );
    let rule = alert_pb::Rule {
        farm_id: farm.id.clone(),
        name: "latency anomalies".into(),
        severity: smartfarm_proto::common::v1::Severity::Warning as i32,
        condition: Some(alert_pb::rule::Condition::ModelVerdict(alert_pb::ModelVerdictCondition {
            disease_labels: vec![],
            min_confidence: 0.8,
            on_sensor_anomaly: true,
        })),
        ..Default::default()
    };
    let request = alert_pb::CreateRuleRequest { rule: Some(rule) };
    let rule_id = alerts.clone().create_rule(request).await.expect("create the rule").into_inner().rule.unwrap().id;

    let fixture =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../services/ml/fixtures/nab/ec2_request_latency_system_failure.csv");
    let series = nab::read_series(std::path::Path::new(fixture)).unwrap();
    let shift = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
        - series.times[series.times.len() - 1]
        - 3600.0;
    let records: Vec<pb::SpoolRecord> = series
        .times
        .iter()
        .zip(&series.values)
        .enumerate()
        .map(|(index, (&time, &value))| pb::SpoolRecord {
            sequence: index as u64 + 1,
            body: Some(pb::spool_record::Body::Reading(Reading {
                device_id: farm.sensor.clone(),
                metric: "latency".into(),
                value,
                measure_time: Some(to_timestamp(
                    SystemTime::UNIX_EPOCH + Duration::from_secs_f64((time + shift).round()),
                )),
                receive_time: None,
            })),
        })
        .collect();
    let split = records.len() * 3 / 10;
    let failure = series.times.partition_point(|&t| t < nab::parse_time("2014-03-18 22:53:00").unwrap());

    let mut link = Link::open(&cloud, &farm.gateway_credential, uuid::Uuid::now_v7()).await.unwrap();
    for (first, last) in [(1, split), (split + 1, failure)] {
        let batch = records[first - 1..last].to_vec();
        link.send_batch(smartfarm_ingestion::batch::encode(batch, first as u64, last as u64)).await;
        loop {
            if let connect_response::Body::BatchAck(ack) = link.next().await {
                assert_eq!(ack.last_sequence, last as u64);
                break;
            }
        }
    }

    let listed = || async {
        let request = alert_pb::ListAlertsRequest { farm_id: farm.id.clone(), ..Default::default() };
        alerts.clone().list_alerts(request).await.unwrap().into_inner().alerts
    };
    let raised =
        smartfarm_e2e::edge::eventually(Duration::from_secs(120), || async { !listed().await.is_empty() }).await;
    assert!(raised, "no anomaly alert\n{}", cloud.log());
    let alert = listed().await.remove(0);
    assert_eq!((alert.rule_id.as_str(), alert.metric.as_str()), (rule_id.as_str(), "latency"));
    assert!(alert.evidence_window.is_some(), "{alert:?}");
    // The batch with the failure is off the list because the alert role recorded its stretches.
    let confirmed = || async { cloud.metric("smartfarm_alert_scored_batches_confirmed_total").await >= 1.0 };
    assert!(smartfarm_e2e::edge::eventually(Duration::from_secs(20), confirmed).await, "{}", cloud.log());
    assert_eq!(cloud.metric("smartfarm_alert_scored_batches_left_listed_total").await, 0.0);
    cloud.stop().await;
}
