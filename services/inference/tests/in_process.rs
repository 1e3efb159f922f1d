//! The inference service in one process, over SQLite and local files, behind a real tonic server: the built-in
//! models are listed and serve; photos are classified from bytes and by id (the diagnosis saved on the photo);
//! bad photos and series get clear errors; a new photo on the bus is diagnosed and a confident disease announced;
//! series are scored from values and from stored readings, and committed readings are scored by the pipeline
//! (with the readings that come with their event and the context it kept, read back only when that chain breaks,
//! and not at all when another replica scores them); a version is activated and rolled back without a restart, by
//! an admin only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tonic::Code;
use uuid::Uuid;

use smartfarm_bus::{Bus, Event, ImageStored, Job, ReadingsCommitted, SeriesSpan, SpanReadings};
use smartfarm_core::Principal;
use smartfarm_core::batch::BatchKey;
use smartfarm_core::config::{InferenceConfig, PostgresConfig};
use smartfarm_core::time::to_timestamp;
use smartfarm_inference::{InferenceApi, Stores};
use smartfarm_ml::anomaly::nab;
use smartfarm_ml::disease::{DEFAULT_MODEL, DiseaseClassifier};
use smartfarm_proto::common::v1 as common;
use smartfarm_proto::inference::v1 as pb;
use smartfarm_proto::inference::v1::inference_service_client::InferenceServiceClient;
use smartfarm_store::image::{ImageRecord, ThumbnailState};
use smartfarm_store::model::{DeviceKind, NewDevice};
use smartfarm_store::telemetry::{
    BatchOutcome, Bucket, EdgeBatch, ReadingCursor, ReadingFilter, ReadingRow, Retention, RollupsAligned,
    StoredReading, TelemetryStore, UnscoredBatch,
};
use smartfarm_store::{Database, blob};

type Client = InferenceServiceClient<tonic::transport::Channel>;

fn ml_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ml/fixtures")
}

/// A photo of a class from the ml crate's fixtures.
fn leaf(class: &str) -> Vec<u8> {
    let dir = ml_fixtures().join("plants").join(class);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    std::fs::read(&files[0]).unwrap()
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 90]));
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

/// The database's telemetry store, noting the filter of every read of readings. A read waits while the test holds
/// `read_gate`.
struct NotingReads {
    store: Arc<dyn TelemetryStore>,
    reads: Arc<Mutex<Vec<ReadingFilter>>>,
    read_gate: Arc<tokio::sync::Mutex<()>>,
}

#[async_trait::async_trait]
impl TelemetryStore for NotingReads {
    async fn committed_sequence(&self, gateway_id: Uuid, spool_id: Uuid) -> smartfarm_core::Result<u64> {
        self.store.committed_sequence(gateway_id, spool_id).await
    }

    async fn commit_batch(&self, batch: &EdgeBatch, widths: &[Duration]) -> smartfarm_core::Result<BatchOutcome> {
        self.store.commit_batch(batch, widths).await
    }

    async fn query_readings(
        &self,
        filter: &ReadingFilter,
        cursor: Option<&ReadingCursor>,
        limit: usize,
    ) -> smartfarm_core::Result<Vec<StoredReading>> {
        self.reads.lock().unwrap().push(filter.clone());
        drop(self.read_gate.lock().await);
        self.store.query_readings(filter, cursor, limit).await
    }

    async fn query_buckets(
        &self,
        filter: &ReadingFilter,
        width: Option<Duration>,
        widths: &[Duration],
        limit: usize,
    ) -> smartfarm_core::Result<Option<Vec<Bucket>>> {
        self.store.query_buckets(filter, width, widths, limit).await
    }

    async fn latest_readings(&self, farm_id: Uuid, devices: &[Uuid]) -> smartfarm_core::Result<Vec<StoredReading>> {
        self.store.latest_readings(farm_id, devices).await
    }

    async fn apply_retention(&self, retention: Retention, now: SystemTime) -> smartfarm_core::Result<u64> {
        self.store.apply_retention(retention, now).await
    }

    async fn align_rollups(&self, widths: &[Duration]) -> smartfarm_core::Result<RollupsAligned> {
        self.store.align_rollups(widths).await
    }

    async fn claim_unscored(
        &self,
        received_before: SystemTime,
        now: SystemTime,
        lease: Duration,
        limit: usize,
        except: &[BatchKey],
    ) -> smartfarm_core::Result<Vec<UnscoredBatch>> {
        self.store.claim_unscored(received_before, now, lease, limit, except).await
    }

    async fn forget_unscored(&self, keys: &[BatchKey]) -> smartfarm_core::Result<()> {
        self.store.forget_unscored(keys).await
    }

    async fn release_unscored(&self, keys: &[BatchKey], claimed_until: SystemTime) -> smartfarm_core::Result<()> {
        self.store.release_unscored(keys, claimed_until).await
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    database: Database,
    /// The filters of the reads of readings the service made.
    reads: Arc<Mutex<Vec<ReadingFilter>>>,
    /// Held, it holds the service's reads of readings (once noted).
    read_gate: Arc<tokio::sync::Mutex<()>>,
    api: InferenceApi,
    bus: Bus,
    farm_id: Uuid,
    camera: Uuid,
    gateway: Uuid,
    sensor: Uuid,
    admin: Client,
    farm_key: Client,
}

async fn serve(api: InferenceApi, principal: Principal) -> Client {
    let server = tonic::service::interceptor::InterceptedService::new(
        api.into_server(),
        move |mut request: tonic::Request<()>| {
            request.extensions_mut().insert(principal.clone());
            Ok(request)
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    InferenceServiceClient::new(channel).max_encoding_message_size(64 << 20)
}

async fn setup() -> Setup {
    setup_with(InferenceConfig::default()).await
}

async fn setup_with(settings: InferenceConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let database =
        Database::connect(&format!("sqlite://{}", dir.path().join("db").display()), &PostgresConfig::default())
            .await
            .unwrap();
    database.migrate().await.unwrap();
    let registry = database.registry();
    let farm = registry.create_farm(Uuid::now_v7(), "farm", SystemTime::now()).await.unwrap();
    let mut ids = Vec::new();
    for (name, kind) in
        [("camera", DeviceKind::Camera), ("gateway", DeviceKind::Gateway), ("probe", DeviceKind::Sensor)]
    {
        let device = registry
            .create_device(NewDevice {
                id: Uuid::now_v7(),
                farm_id: farm.id,
                name: name.into(),
                kind,
                labels: BTreeMap::new(),
                credential_sha256: "00".repeat(32),
                create_time: SystemTime::now(),
            })
            .await
            .unwrap();
        ids.push(device.id);
    }
    let blobs = blob::open(&format!("file://{}", dir.path().join("blobs").display())).await.unwrap();
    let bus = Bus::in_process();
    let reads = Arc::new(Mutex::new(Vec::new()));
    let read_gate = Arc::new(tokio::sync::Mutex::new(()));
    let stores = Stores {
        registry,
        images: database.images(),
        telemetry: Arc::new(NotingReads {
            store: database.telemetry(),
            reads: reads.clone(),
            read_gate: read_gate.clone(),
        }),
        models: database.models(),
        blobs,
    };
    let api = InferenceApi::new(stores, bus.clone(), settings);
    api.ensure_builtin_models().await.unwrap();
    tokio::spawn(api.clone().run_pipeline());
    let admin = serve(api.clone(), Principal::Admin { api_key_id: Uuid::now_v7() }).await;
    let farm_key = serve(api.clone(), Principal::FarmKey { api_key_id: Uuid::now_v7(), farm_id: farm.id }).await;
    Setup {
        _dir: dir,
        database,
        reads,
        read_gate,
        api,
        bus,
        farm_id: farm.id,
        camera: ids[0],
        gateway: ids[1],
        sensor: ids[2],
        admin,
        farm_key,
    }
}

/// Stores a photo as the image role would (blob, then row) and returns its row.
async fn store_photo(setup: &Setup, bytes: &[u8]) -> ImageRecord {
    let sha256 = hex::encode(Sha256::digest(bytes));
    let key = format!("images/{}/{sha256}", setup.farm_id.simple());
    let blobs = blob::open(&format!("file://{}", setup._dir.path().join("blobs").display())).await.unwrap();
    blobs.put(&key, bytes).await.unwrap();
    let record = ImageRecord {
        id: Uuid::now_v7(),
        farm_id: setup.farm_id,
        device_id: setup.camera,
        capture_time: SystemTime::now(),
        receive_time: SystemTime::now(),
        original_key: key,
        sha256,
        size_bytes: bytes.len() as u64,
        content_type: "image/jpeg".into(),
        width: 256,
        height: 256,
        labels: BTreeMap::new(),
        original_available: true,
        thumbnail_state: ThumbnailState::Pending,
        thumbnail_key: None,
        storage_class: None,
        diagnosis: None,
    };
    // As an upload stores it: behind the intent for its blob.
    let images = setup.database.images();
    images.add_blob_intent(&record.original_key, record.receive_time).await.unwrap();
    images.insert_image(record.clone(), None).await.unwrap();
    record
}

/// Stores the first fixture photo of `class` and hands it out to be diagnosed, as the image role does; its id.
async fn hand_out_leaf(setup: &Setup, class: &str) -> Uuid {
    let photo = store_photo(setup, &leaf(class)).await;
    setup.bus.hand_out(Job::Diagnose(ImageStored {
        handed_out: true,
        image_id: photo.id,
        farm_id: setup.farm_id,
        device_id: setup.camera,
        sha256: photo.sha256.clone(),
        content_type: "image/jpeg".into(),
        capture_time: photo.capture_time,
    }));
    photo.id
}

/// The first event on the bus that `pick` takes, within 20 s.
async fn next_event<T>(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    pick: impl Fn(Event) -> Option<T>,
) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(picked) = pick(events.recv().await.unwrap()) {
                return picked;
            }
        }
    })
    .await
    .ok()
}

fn classify(source: pb::classify_image_request::Source) -> pb::ClassifyImageRequest {
    pb::ClassifyImageRequest { source: Some(source), model_name: String::new(), top_k: 0 }
}

/// A photo stored whose job was lost (never handed out here: a process on the in-process bus died with it queued)
/// is diagnosed late, and its disease announced until the verdict is confirmed; one whose original cannot be read
/// is tried 4 times, ever further apart, and left without a diagnosis.
#[tokio::test]
async fn a_photo_whose_job_was_lost_is_diagnosed_late() {
    let late_scoring_after = Duration::from_secs(1);
    let setup = setup_with(InferenceConfig { late_scoring_after, ..InferenceConfig::default() }).await;
    let mut events = setup.bus.subscribe();
    let lost = store_photo(&setup, &leaf("Apple___Black_rot")).await;
    let unreadable = store_photo(&setup, b"not a photo at all").await;
    let images = setup.database.images();
    // The unreadable photo's late tries as they are counted, watched from the start: (count, when first seen).
    let counted = {
        let (images, unreadable) = (images.clone(), unreadable.id);
        tokio::spawn(async move {
            let count = || async {
                let far = SystemTime::now() + Duration::from_secs(3600);
                let found = images.images_to_diagnose(SystemTime::UNIX_EPOCH, far, far, u32::MAX, 10).await.unwrap();
                found.into_iter().find(|photo| photo.image.id == unreadable).map_or(0, |photo| photo.late_tries)
            };
            let mut seen: Vec<(u32, std::time::Instant)> = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(40);
            while std::time::Instant::now() < deadline {
                let tries = count().await;
                if seen.last().is_none_or(|(last, _)| *last != tries) {
                    seen.push((tries, std::time::Instant::now()));
                }
                if tries >= 4 {
                    // Long enough for a fifth try, were there one.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    seen.push((count().await, std::time::Instant::now()));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };
    let diagnosed = || async { images.get_image(lost.id).await.unwrap().diagnosis.is_some() };
    assert!(eventually(diagnosed).await, "the photo whose job was lost was not diagnosed");
    let announced = next_event(&mut events, |event| match event {
        Event::DiseaseDetected(detected) if detected.image_id == lost.id => Some(detected),
        _ => None,
    })
    .await
    .expect("its disease announced");
    assert_eq!(announced.label, "Apple___Black_rot");
    assert_eq!(images.get_image(unreadable.id).await.unwrap().diagnosis, None);

    // Nobody confirmed the verdict (no alert role here): the photo is diagnosed and announced again, until the
    // verdict is confirmed.
    let again = next_event(&mut events, |event| match event {
        Event::DiseaseDetected(detected) if detected.image_id == lost.id => Some(detected),
        _ => None,
    })
    .await;
    assert!(again.is_some(), "an unconfirmed verdict is announced again");
    images.confirm_verdict(lost.id, &announced.label, &announced.model.version).await.unwrap();
    // What was in hand when it was confirmed may still come; after that, nothing for two seconds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut events = setup.bus.subscribe();
    let later = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Ok(Event::DiseaseDetected(detected)) = events.recv().await
                && detected.image_id == lost.id
            {
                return detected;
            }
        }
    })
    .await;
    assert!(later.is_err(), "a confirmed verdict was announced again: {later:?}");

    // The unreadable photo is tried 4 times, the wait after each twice the one before (2, 4 and 8 s here), and
    // then left.
    let seen = counted.await.unwrap();
    let counts: Vec<u32> = seen.iter().map(|(tries, _)| *tries).collect();
    assert_eq!(counts, [0, 1, 2, 3, 4, 4], "the unreadable photo's late tries as counted");
    let gap = |from: usize| seen[from + 1].1 - seen[from].1;
    assert!(gap(3) > gap(1) * 2, "the wait doubles: {:?} between tries 1 and 2, {:?} between 3 and 4", gap(1), gap(3));
    assert_eq!(images.get_image(unreadable.id).await.unwrap().diagnosis, None);
}

/// ClassifyImage on a stored photo the pipeline has not diagnosed yet saves the diagnosis and leaves the photo
/// waiting for its verdict, which the late diagnosis then announces; while the verdict is pending it saves nothing;
/// on a photo whose verdict is confirmed it changes nothing of that.
#[tokio::test]
async fn classifying_a_stored_photo_leaves_its_verdict_to_the_pipeline() {
    let setup = setup().await;
    let lost = store_photo(&setup, &leaf("Apple___Black_rot")).await;
    let request = classify(pb::classify_image_request::Source::ImageId(lost.id.to_string()));
    setup.admin.clone().classify_image(request).await.unwrap();
    let images = setup.database.images();
    assert!(images.get_image(lost.id).await.unwrap().diagnosis.is_some());
    let soon = SystemTime::now() + Duration::from_secs(3600);
    let waiting = images.images_to_diagnose(SystemTime::UNIX_EPOCH, soon, soon, 4, 10).await.unwrap();
    assert_eq!(waiting.iter().map(|photo| photo.image.id).collect::<Vec<_>>(), vec![lost.id], "its verdict is to come");
    let diagnosis = images.get_image(lost.id).await.unwrap().diagnosis.unwrap();
    // Asked again while the verdict is pending: answered, and the pending verdict's diagnosis kept.
    let request = classify(pb::classify_image_request::Source::ImageId(lost.id.to_string()));
    setup.admin.clone().classify_image(request).await.unwrap();
    assert_eq!(images.get_image(lost.id).await.unwrap().diagnosis, Some(diagnosis.clone()));
    images.confirm_verdict(lost.id, &diagnosis.label, &diagnosis.model_version).await.unwrap();
    let request = classify(pb::classify_image_request::Source::ImageId(lost.id.to_string()));
    setup.admin.clone().classify_image(request).await.unwrap();
    assert!(images.images_to_diagnose(SystemTime::UNIX_EPOCH, soon, soon, 4, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn photos_are_classified_and_new_ones_diagnosed_by_the_active_model() {
    let mut setup = setup().await;
    let models = setup.admin.list_models(pb::ListModelsRequest::default()).await.unwrap().into_inner().models;
    assert_eq!(models.len(), 2, "{models:?}");
    let leafnet = models.iter().find(|m| m.kind == pb::ModelKind::PlantDisease as i32).unwrap();
    assert!(leafnet.active);
    assert_eq!(leafnet.r#ref.as_ref().unwrap().name, "leafnet-plantvillage7");
    assert_eq!(leafnet.class_labels.len(), 7);
    assert!(leafnet.metrics["validation_accuracy"] >= 0.97);

    // From bytes.
    let answer = setup
        .admin
        .classify_image(classify(pb::classify_image_request::Source::ImageData(leaf("Apple___Cedar_apple_rust"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.label, "Apple___Cedar_apple_rust");
    assert_eq!(answer.top_classes.len(), 3);
    assert_eq!(answer.model.as_ref().unwrap().name, "leafnet-plantvillage7");

    // By id: the diagnosis is saved on the photo.
    let photo = store_photo(&setup, &leaf("Potato___Early_blight")).await;
    let answer = setup
        .farm_key
        .classify_image(classify(pb::classify_image_request::Source::ImageId(photo.id.to_string())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.label, "Potato___Early_blight");
    let saved = setup.database.images().get_image(photo.id).await.unwrap().diagnosis.unwrap();
    assert_eq!((saved.label.as_str(), saved.model_name.as_str()), ("Potato___Early_blight", "leafnet-plantvillage7"));

    // A new photo handed out by the image role is diagnosed; a confident disease is announced for alerts.
    let mut events = setup.bus.subscribe();
    let photo = hand_out_leaf(&setup, "Apple___Black_rot").await;
    let disease = next_event(&mut events, |event| match event {
        Event::DiseaseDetected(disease) => Some(disease),
        _ => None,
    })
    .await
    .expect("a disease is announced");
    assert_eq!((disease.image_id, disease.label.as_str()), (photo, "Apple___Black_rot"));
    assert!(disease.confidence >= 0.8);
    assert_eq!(setup.database.images().get_image(photo).await.unwrap().diagnosis.unwrap().label, "Apple___Black_rot");
    // A confidently healthy photo is announced too: it clears the camera's disease alerts.
    let photo = hand_out_leaf(&setup, "Apple___healthy").await;
    let healthy = next_event(&mut events, |event| match event {
        Event::HealthyDiagnosed(healthy) => Some(healthy),
        _ => None,
    })
    .await
    .expect("a healthy photo is announced");
    assert_eq!((healthy.image_id, healthy.label.as_str()), (photo, "Apple___healthy"));
    assert!(healthy.confidence >= 0.8);

    // Bad photos: each gets its reason, and the service stays up.
    let bad = [
        (b"just some text".to_vec(), Code::InvalidArgument, "not a JPEG, PNG or WebP photo (text)"),
        (png(1, 1), Code::InvalidArgument, "1×1 pixels"),
        (vec![0xff; 21 * 1024 * 1024], Code::InvalidArgument, "at most 20971520 are accepted"),
        (vec![0xff; 50 * 1024 * 1024], Code::OutOfRange, "too large"),
    ];
    for (bytes, code, reason) in bad {
        let error = setup
            .admin
            .classify_image(classify(pb::classify_image_request::Source::ImageData(bytes)))
            .await
            .unwrap_err();
        assert_eq!(error.code(), code, "{error:?}");
        assert!(error.message().contains(reason), "{error:?}");
    }
    let error = setup.admin.classify_image(pb::ClassifyImageRequest::default()).await.unwrap_err();
    assert!(error.message().contains("give image_data"), "{error:?}");
    let mut unknown = classify(pb::classify_image_request::Source::ImageData(leaf("Apple___healthy")));
    unknown.model_name = "no-such-model".into();
    assert_eq!(setup.admin.classify_image(unknown).await.unwrap_err().code(), Code::NotFound);
    let still_up =
        setup.admin.classify_image(classify(pb::classify_image_request::Source::ImageData(leaf("Apple___healthy"))));
    assert_eq!(still_up.await.unwrap().into_inner().label, "Apple___healthy");

    // A second version is activated without a restart, then rolled back; only an admin may.
    let mut next = DiseaseClassifier::from_model_file(DEFAULT_MODEL, &smartfarm_ml::inference_device()).unwrap();
    let mut card = next.card().clone();
    card.version = "next".into();
    next.set_card(card).unwrap();
    setup.api.serving().store_model_file(&next.to_model_file().unwrap(), SystemTime::now()).await.unwrap();
    let activate = |version: &str| pb::ActivateModelRequest {
        model: Some(common::ModelRef { name: "leafnet-plantvillage7".into(), version: version.into() }),
    };
    assert_eq!(setup.farm_key.activate_model(activate("next")).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(setup.admin.activate_model(activate("missing")).await.unwrap_err().code(), Code::NotFound);
    let served_by = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            let request = classify(pb::classify_image_request::Source::ImageData(leaf("Apple___healthy")));
            client.classify_image(request).await.unwrap().into_inner().model.unwrap().version
        }
    };
    setup.admin.activate_model(activate("next")).await.unwrap();
    assert_eq!(served_by(&mut setup.admin).await, "next");
    setup.admin.activate_model(activate("2026-12-05")).await.unwrap();
    assert_eq!(served_by(&mut setup.admin).await, "2026-12-05");
}

/// What the bus carries between the second and the third batch of [`score_as_committed`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Between {
    Nothing,
    /// A batch of the same series that another replica committed and scores itself.
    AnotherReplica,
    /// More events than the bus holds for a subscriber, published at once once the second batch is scored.
    MissedEvents,
}

/// Polls `condition` every 50 ms for up to 10 s.
async fn eventually<F, Fut>(condition: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// `series` as the sensor's readings (sequence numbers from 1), and where the second and the third of the three
/// batches the pipeline tests commit begin: the first 30 % teaches the detector what normal is; the second ends in
/// the middle of the stretch the detector finds in the second labelled window (22:51 to 22:56 on 2014-03-18), and
/// the third begins at 22:53.
fn three_batches(setup: &Setup, series: &nab::NabSeries) -> (Vec<ReadingRow>, usize, usize) {
    let at = |t: f64| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(t);
    let rows: Vec<ReadingRow> = series
        .times
        .iter()
        .zip(&series.values)
        .enumerate()
        .map(|(i, (&t, &value))| ReadingRow {
            sequence: i as u64 + 1,
            device_id: setup.sensor,
            metric: "latency".into(),
            value,
            measure_time: at(t),
        })
        .collect();
    let split = rows.len() * 3 / 10;
    let third = series.times.partition_point(|&t| t < nab::parse_time("2014-03-18 22:53:00").unwrap());
    (rows, split, third)
}

/// `part` as one batch of the gateway's spool `spool_id`.
fn edge_batch(setup: &Setup, spool_id: Uuid, part: &[ReadingRow], score_later: bool) -> EdgeBatch {
    EdgeBatch {
        gateway_id: setup.gateway,
        spool_id,
        farm_id: setup.farm_id,
        first_sequence: part[0].sequence,
        last_sequence: part[part.len() - 1].sequence,
        readings: part.to_vec(),
        aggregates: Vec::new(),
        receive_time: SystemTime::now(),
        score_later,
    }
}

/// The announcement of `part` as the process that committed it (and scores it) publishes it, with its readings
/// when `with_readings`.
fn committed(setup: &Setup, part: &[ReadingRow], with_readings: bool, batch: Option<BatchKey>) -> Event {
    let readings = with_readings.then(|| SpanReadings(part.iter().map(|row| (row.measure_time, row.value)).collect()));
    Event::ReadingsCommitted(ReadingsCommitted {
        farm_id: setup.farm_id,
        series: vec![SeriesSpan {
            device_id: setup.sensor,
            metric: "latency".into(),
            first_time: part[0].measure_time,
            last_time: part[part.len() - 1].measure_time,
            readings,
        }],
        scored_where_committed: true,
        handed_out: false,
        published_here: true,
        batch,
    })
}

/// Stores `series` as the sensor's readings, committed in three batches, and publishes each as committed, as the edge
/// link does; returns the rows, where the second batch starts, and the anomalies the pipeline announced. The first
/// batch teaches the pipeline's detector what normal is, the others are scored as they are committed. The second
/// ends in the middle of the stretch the detector finds in the second labelled window (22:51 to 22:56 on
/// 2014-03-18): it is announced when it begins and not again when the third batch completes it.
///
/// With `readings_in_the_events`, each event carries its batch's readings, as in the process that committed them,
/// and the third batch is not written to the database at all: only the event's readings can show what is in it.
/// The third batch's first row is at `rows[inside_anomaly]` (the third value returned). `between` says what else
/// the bus carries between the second batch and the third.
async fn score_as_committed(
    setup: &Setup,
    series: &nab::NabSeries,
    readings_in_the_events: bool,
    between: Between,
) -> (Vec<ReadingRow>, usize, usize, Vec<smartfarm_bus::AnomalyDetected>) {
    let (rows, split, inside_anomaly) = three_batches(setup, series);
    let spool_id = Uuid::now_v7();
    let telemetry = setup.database.telemetry();
    let mut events = setup.bus.subscribe();
    for (index, part) in [&rows[..split], &rows[split..inside_anomaly], &rows[inside_anomaly..]].into_iter().enumerate()
    {
        if !(readings_in_the_events && index == 2) {
            telemetry.commit_batch(&edge_batch(setup, spool_id, part, false), &[]).await.unwrap();
        }
        setup.bus.publish(committed(setup, part, readings_in_the_events, None));
        if between == Between::MissedEvents && index == 1 {
            // Once the second batch is scored, more events than the bus holds for a subscriber, at once: the
            // pipeline misses some.
            let second_scored =
                || async { setup.reads.lock().unwrap().iter().any(|read| read.end == part[0].measure_time) };
            assert!(eventually(second_scored).await, "the second batch was not scored");
            tokio::time::sleep(Duration::from_millis(500)).await;
            for _ in 0..=smartfarm_bus::CAPACITY {
                setup.bus.publish(Event::RulesChanged { farm_id: setup.farm_id });
            }
        }
        if between == Between::AnotherReplica && index == 1 {
            let at_the_end = part[part.len() - 1].measure_time;
            setup.bus.publish(Event::ReadingsCommitted(ReadingsCommitted {
                farm_id: setup.farm_id,
                series: vec![SeriesSpan {
                    device_id: setup.sensor,
                    metric: "latency".into(),
                    first_time: at_the_end,
                    last_time: at_the_end,
                    readings: None,
                }],
                scored_where_committed: true,
                handed_out: false,
                published_here: false,
                batch: None,
            }));
        }
    }
    let mut announced = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Ok(Event::AnomalyDetected(anomaly))) => announced.push(anomaly),
            // This subscriber misses the flood of `Between::MissedEvents` too.
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    (rows, split, inside_anomaly, announced)
}

#[tokio::test]
async fn readings_that_come_with_their_event_are_scored_without_reading_them_back() {
    let setup = setup().await;
    let series = nab::read_series(&ml_fixtures().join("nab/ec2_request_latency_system_failure.csv")).unwrap();
    let (_, _, _, from_the_database) = score_as_committed(&setup, &series, false, Between::Nothing).await;
    let setup = self::setup().await;
    let (rows, split, third, from_the_events) = score_as_committed(&setup, &series, true, Between::Nothing).await;
    // The second batch's context was read (it follows readings the pipeline never scored), the third's was not:
    // it is the end of the second, as the pipeline scored it.
    let reads = setup.reads.lock().unwrap().clone();
    assert!(reads.iter().any(|read| read.end == rows[split].measure_time), "{reads:#?}");
    assert!(reads.iter().all(|read| read.end != rows[third].measure_time), "{reads:#?}");
    // The third anomaly lies in the batch the database never got: the events' readings found it, the same as the
    // database's readings did.
    assert_eq!(from_the_events.len(), 3, "{from_the_events:#?}");
    let stretches = |announced: &[smartfarm_bus::AnomalyDetected]| {
        announced.iter().map(|anomaly| (anomaly.start_time, anomaly.end_time, anomaly.peak_time)).collect::<Vec<_>>()
    };
    assert_eq!(stretches(&from_the_events), stretches(&from_the_database));
}

#[tokio::test]
async fn a_batch_another_replica_scores_is_left_to_it() {
    let setup = setup().await;
    let series = nab::read_series(&ml_fixtures().join("nab/ec2_request_latency_system_failure.csv")).unwrap();
    let (rows, _, third, announced) = score_as_committed(&setup, &series, true, Between::AnotherReplica).await;
    // Not scored here: its readings were not read (a scoring reads up to just past the span's last reading).
    let reads = setup.reads.lock().unwrap().clone();
    let past_its_end = rows[third - 1].measure_time + Duration::from_micros(1);
    assert!(reads.iter().all(|read| read.end != past_its_end), "{reads:#?}");
    // What this process kept of the series ends before the other replica's batch: the third batch's context is
    // read from the database, and the anomalies are the same.
    assert!(reads.iter().any(|read| read.end == rows[third].measure_time), "{reads:#?}");
    assert_eq!(announced.len(), 3, "{announced:#?}");
}

#[tokio::test]
async fn after_missed_events_the_context_is_read_again() {
    let setup = setup().await;
    let series = nab::read_series(&ml_fixtures().join("nab/ec2_request_latency_system_failure.csv")).unwrap();
    let (rows, _, third, announced) = score_as_committed(&setup, &series, true, Between::MissedEvents).await;
    // What the pipeline kept of the second batch may miss a batch among the events it missed: the third batch's
    // context is read from the database.
    let reads = setup.reads.lock().unwrap().clone();
    assert!(reads.iter().any(|read| read.end == rows[third].measure_time), "{reads:#?}");
    // The third batch's anomaly came after the flood, and the stretch begun in the second batch was not announced
    // again. (Whether the test's subscriber saw the second batch's announcements depends on whether the pipeline
    // published them before the flood: on a loaded machine its scoring can take longer than the test waits.)
    let in_the_third = announced.iter().filter(|anomaly| anomaly.start_time >= rows[third].measure_time).count();
    assert_eq!(in_the_third, 1, "{announced:#?}");
    let mut stretches: Vec<SystemTime> = announced.iter().map(|anomaly| anomaly.start_time).collect();
    stretches.dedup();
    assert_eq!(stretches.len(), announced.len(), "each stretch announced once: {announced:#?}");
}

/// A committed batch whose announcement was lost (the process that committed it died before publishing it) is
/// scored late, from the list its commit wrote, and each batch leaves the list once scored: the two announced ones
/// by the pipeline as they came (the late scorer leaves them to it while they wait in its queue), the lost one by
/// the late scorer. The lost batch is committed once the first two are scored, so the detector is the one the
/// other tests fit (on the first batch).
#[tokio::test]
async fn a_batch_whose_announcement_was_lost_is_scored_late() {
    let late_scoring_after = Duration::from_secs(1);
    let setup = setup_with(InferenceConfig { late_scoring_after, ..InferenceConfig::default() }).await;
    let series = nab::read_series(&ml_fixtures().join("nab/ec2_request_latency_system_failure.csv")).unwrap();
    let (rows, split, third) = three_batches(&setup, &series);
    let spool_id = Uuid::now_v7();
    let telemetry = setup.database.telemetry();
    // Nothing is listed for scoring any more (polled for up to two minutes: the first fit can take a while). The
    // check claims with a clock an hour ahead, so it also sees the batches a scorer holds, and holds what it sees
    // until then. That changes nothing here: each batch it can see is in a scorer's hands, which confirms it.
    let nothing_listed = || async {
        for _ in 0..1200 {
            let later = SystemTime::now() + Duration::from_secs(3600);
            if telemetry.claim_unscored(later, later, Duration::ZERO, 10, &[]).await.unwrap().is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    // The alert role's part: a batch with anomalies leaves the list once their alerts are recorded (here, at once).
    tokio::spawn(confirm_scored_batches(setup.bus.subscribe(), telemetry.clone()));
    let mut events = setup.bus.subscribe();
    for (index, part) in [&rows[..split], &rows[split..third], &rows[third..]].into_iter().enumerate() {
        if index == 2 {
            assert!(nothing_listed().await, "the announced batches were not confirmed scored");
        }
        let batch = edge_batch(&setup, spool_id, part, true);
        telemetry.commit_batch(&batch, &[]).await.unwrap();
        if index == 2 {
            break;
        }
        let key = BatchKey { gateway_id: setup.gateway, spool_id, last_sequence: batch.last_sequence };
        setup.bus.publish(committed(&setup, part, true, Some(key)));
    }
    // The lost batch's anomaly, announced once it is scored late (the first batch's fit can take a while).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut announced = Vec::new();
    let in_the_third = |anomaly: &&smartfarm_bus::AnomalyDetected| anomaly.start_time >= rows[third].measure_time;
    while !announced.iter().any(|anomaly| in_the_third(&anomaly)) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(Event::AnomalyDetected(anomaly))) => announced.push(anomaly),
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) | Err(_) => panic!("the batch whose announcement was lost was not scored: {announced:#?}"),
        }
    }
    // And only once: what else comes within two seconds.
    while let Ok(event) = tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
        match event {
            Ok(Event::AnomalyDetected(anomaly)) => announced.push(anomaly),
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    assert_eq!(announced.iter().filter(in_the_third).count(), 1, "{announced:#?}");
    // It was read back from the database: the late scorer has no readings but the stored ones.
    let reads = setup.reads.lock().unwrap().clone();
    let past_its_end = rows[rows.len() - 1].measure_time + Duration::from_micros(1);
    assert!(reads.iter().any(|read| read.end == past_its_end), "{reads:#?}");
    assert!(nothing_listed().await, "the batch scored late is still listed for scoring");
}

/// A process that stops while it scores a batch it claimed late gives the claim back: the batch can be claimed
/// at once (not after the lease), and the attempt is not counted.
#[tokio::test]
async fn a_stopping_process_gives_back_the_late_batch_it_was_scoring() {
    let late_scoring_after = Duration::from_secs(1);
    let setup = setup_with(InferenceConfig { late_scoring_after, ..InferenceConfig::default() }).await;
    let series = nab::read_series(&ml_fixtures().join("nab/ec2_request_latency_system_failure.csv")).unwrap();
    let (rows, split, _) = three_batches(&setup, &series);
    let telemetry = setup.database.telemetry();
    let holding_reads = setup.read_gate.lock().await;
    // Committed, its announcement lost: the late scorer claims it and reads its readings.
    let batch = edge_batch(&setup, Uuid::now_v7(), &rows[..split], true);
    telemetry.commit_batch(&batch, &[]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while setup.reads.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the late scorer did not take the batch");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = SystemTime::now();
    assert!(telemetry.claim_unscored(now, now, Duration::ZERO, 10, &[]).await.unwrap().is_empty(), "claimed");

    setup.api.stop_taking_jobs();
    setup.api.begin_shutdown();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let given_back = loop {
        let now = SystemTime::now();
        let claimed = telemetry.claim_unscored(now, now, Duration::ZERO, 10, &[]).await.unwrap();
        if !claimed.is_empty() {
            break claimed;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stopping process kept its claim");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(holding_reads);
    let key = BatchKey { gateway_id: setup.gateway, spool_id: batch.spool_id, last_sequence: batch.last_sequence };
    assert_eq!(
        given_back.iter().map(|batch| (batch.key, batch.attempts)).collect::<Vec<_>>(),
        [(key, 1)],
        "the attempt cut short is not counted"
    );
}

/// Takes each batch whose scoring ended (`BatchScored`) off the list, as the alert role does once it has recorded
/// the alerts of the batch's stretches.
async fn confirm_scored_batches(
    mut events: tokio::sync::broadcast::Receiver<Event>,
    telemetry: Arc<dyn smartfarm_store::TelemetryStore>,
) {
    loop {
        match events.recv().await {
            Ok(Event::BatchScored(scored)) => telemetry.forget_unscored(&[scored.batch]).await.unwrap(),
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// A batch whose scoring found anomalies is not taken off the list by its scorer: it announces the end of the
/// scoring with how many stretches it announced, each carrying the scoring's id, and the batch waits for the alert
/// role to record their alerts (a lost stretch leaves it listed, to be scored and announced again).
#[tokio::test]
async fn a_batch_with_anomalies_stays_listed_until_the_alert_role_confirms_it() {
    let setup = setup().await;
    let series = nab::read_series(&ml_fixtures().join("nab/ec2_request_latency_system_failure.csv")).unwrap();
    let (rows, split, third) = three_batches(&setup, &series);
    let (telemetry, spool_id) = (setup.database.telemetry(), Uuid::now_v7());
    let mut events = setup.bus.subscribe();
    let mut keys = Vec::new();
    for part in [&rows[..split], &rows[split..third]] {
        let batch = edge_batch(&setup, spool_id, part, true);
        telemetry.commit_batch(&batch, &[]).await.unwrap();
        let key = BatchKey { gateway_id: setup.gateway, spool_id, last_sequence: batch.last_sequence };
        setup.bus.publish(committed(&setup, part, true, Some(key)));
        keys.push(key);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut announced = Vec::new();
    let scored = loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(Event::AnomalyDetected(anomaly))) => announced.push(anomaly),
            Ok(Ok(Event::BatchScored(scored))) => break scored,
            Ok(Ok(_)) => {}
            Ok(Err(error)) => panic!("{error}"),
            Err(_) => panic!("no batch announced the end of its scoring: {announced:#?}"),
        }
    };
    assert_eq!(scored.batch, keys[1], "the second batch holds the anomalies");
    let its_own = announced.iter().filter(|anomaly| anomaly.scoring == Some(scored.scoring)).count();
    assert!(its_own > 0);
    assert_eq!(scored.stretches as usize, its_own, "{announced:#?}");
    // Still listed (a claim whose lease ends at once holds nothing back), and the first batch, without anomalies,
    // is not.
    let later = SystemTime::now() + Duration::from_secs(3600);
    let listed = telemetry.claim_unscored(later, later, Duration::ZERO, 10, &[]).await.unwrap();
    assert_eq!(listed.iter().map(|batch| batch.key).collect::<Vec<_>>(), vec![keys[1]]);
}

/// A late batch can be older than what was scored since. The detector is fitted on the first half of the first
/// batch; the third batch is committed and scored first, and announces a stretch; only then is the second batch
/// committed (from another spool, as after an agent's spool was recreated) and its announcement lost. Scored late,
/// it still announces the stretches that lie wholly inside it, though they begin before the third's.
#[tokio::test]
async fn a_late_batch_older_than_one_scored_since_announces_its_own_stretches() {
    let late_scoring_after = Duration::from_secs(1);
    let setup = setup_with(InferenceConfig { late_scoring_after, ..InferenceConfig::default() }).await;
    let series = nab::read_series(&ml_fixtures().join("nab/ec2_request_latency_system_failure.csv")).unwrap();
    let (rows, split, third) = three_batches(&setup, &series);
    let half = split / 2;
    let telemetry = setup.database.telemetry();
    let mut events = setup.bus.subscribe();
    let spool_id = Uuid::now_v7();
    for (index, part) in [&rows[..half], &rows[half..split], &rows[third..]].into_iter().enumerate() {
        let batch = edge_batch(&setup, spool_id, part, true);
        telemetry.commit_batch(&batch, &[]).await.unwrap();
        let key = BatchKey { gateway_id: setup.gateway, spool_id, last_sequence: batch.last_sequence };
        setup.bus.publish(committed(&setup, part, true, Some(key)));
        if index == 1 {
            // The detector is fitted on the first half before the rest comes.
            let fitted =
                || async { setup.reads.lock().unwrap().iter().any(|read| read.end == rows[half].measure_time) };
            assert!(eventually(fitted).await, "the detector was not fitted");
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut announced = Vec::new();
    let in_the_second = |anomaly: &smartfarm_bus::AnomalyDetected| {
        anomaly.start_time >= rows[split].measure_time && anomaly.end_time < rows[third].measure_time
    };
    let mut second_committed = false;
    while !announced.iter().any(in_the_second) {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(Event::AnomalyDetected(anomaly))) => announced.push(anomaly),
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) | Err(_) => panic!("no stretch of the late batch was announced: {announced:#?}"),
        }
        if !second_committed && announced.iter().any(|anomaly| anomaly.start_time >= rows[third].measure_time) {
            // The third batch announced its stretch: now the second batch is committed, its announcement lost.
            second_committed = true;
            let part = &rows[split..third];
            telemetry.commit_batch(&edge_batch(&setup, Uuid::now_v7(), part, true), &[]).await.unwrap();
        }
    }
    assert!(second_committed, "{announced:#?}");
}

#[tokio::test]
async fn series_are_scored_from_values_from_stored_readings_and_as_they_are_committed() {
    let mut setup = setup().await;
    let series = nab::read_series(&ml_fixtures().join("nab/ec2_request_latency_system_failure.csv")).unwrap();
    let request = |times: &[f64], values: &[f64]| pb::DetectAnomaliesRequest {
        source: Some(pb::detect_anomalies_request::Source::Series(pb::Series {
            times: times.iter().map(|&t| to_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(t))).collect(),
            values: values.to_vec(),
        })),
        model_name: String::new(),
    };
    let answer = setup.admin.detect_anomalies(request(&series.times, &series.values)).await.unwrap().into_inner();
    assert_eq!(answer.scores.len(), series.values.len());
    assert_eq!(answer.events.len(), 3, "{:?}", answer.events);
    assert_eq!(answer.model.unwrap().name, "window-autoencoder");

    // Bad series.
    let mut with_nan = series.values.clone();
    with_nan[7] = f64::NAN;
    let constant = vec![3.5; series.values.len()];
    for (values, reason) in [(with_nan, "value 7 is NaN"), (constant, "is constant")] {
        let error = setup.admin.detect_anomalies(request(&series.times, &values)).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(error.message().contains(reason), "{error:?}");
    }
    let error = setup.admin.detect_anomalies(request(&[], &[])).await.unwrap_err();
    assert!(error.message().contains("is empty"), "{error:?}");
    let error = setup.admin.detect_anomalies(request(&series.times[..5], &series.values[..4])).await.unwrap_err();
    assert!(error.message().contains("5 times but 4 values"), "{error:?}");

    // The same series stored as a sensor's readings, committed in three batches and scored as they are.
    let (rows, split, _, announced) = score_as_committed(&setup, &series, false, Between::Nothing).await;
    assert_eq!(announced.len(), 3, "the three labelled anomalies, once each: {announced:#?}");
    for anomaly in &announced {
        assert_eq!((anomaly.device_id, anomaly.metric.as_str()), (setup.sensor, "latency"));
        assert!(anomaly.start_time >= rows[split].measure_time && anomaly.peak_score >= 3.0, "{anomaly:?}");
        assert_eq!(anomaly.model.name, "window-autoencoder");
    }
    assert!(announced.windows(2).all(|pair| pair[0].end_time < pair[1].start_time), "{announced:#?}");
    let at = |t: f64| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(t);

    // Stored readings scored on request, with the caller's farm checked.
    let device_series = |device: Uuid| pb::DetectAnomaliesRequest {
        source: Some(pb::detect_anomalies_request::Source::DeviceSeries(pb::DeviceSeries {
            device_id: device.to_string(),
            metric: "latency".into(),
            time_range: Some(common::TimeRange {
                start_time: Some(to_timestamp(at(series.times[0]))),
                end_time: Some(to_timestamp(at(series.times[series.times.len() - 1] + 1.0))),
            }),
        })),
        model_name: String::new(),
    };
    let answer = setup.farm_key.detect_anomalies(device_series(setup.sensor)).await.unwrap().into_inner();
    assert_eq!(answer.scores.len(), series.values.len());
    assert_eq!(answer.events.len(), 3);
    assert_eq!(setup.admin.detect_anomalies(device_series(Uuid::now_v7())).await.unwrap_err().code(), Code::NotFound);
}
