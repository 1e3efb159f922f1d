//! Inference replicas that stop, on NATS JetStream (127.0.0.1:4222 where the project is tested;
//! `SMARTFARM_TEST_NATS_URL` points elsewhere): one about to stop takes no new job, and goes on with the photo it
//! diagnoses; stopped, it hands that job back, its pipeline ends at once, and another replica gets the job then,
//! not after NATS's ten minutes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use uuid::Uuid;

use smartfarm_bus::{Bus, ImageStored, Job, JobKind};
use smartfarm_core::config::{InferenceConfig, PostgresConfig};
use smartfarm_inference::{InferenceApi, Stores};
use smartfarm_store::image::{ImageRecord, ThumbnailState};
use smartfarm_store::model::{DeviceKind, NewDevice};
use smartfarm_store::{BlobStore, Database, blob};

/// A blob store whose photos never finish reading (a stalled S3, say): a diagnosis waits on it for ever. Model
/// weights read as usual.
struct StalledPhotos {
    store: Arc<dyn BlobStore>,
    /// Set once a photo's read has begun.
    reading: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl BlobStore for StalledPhotos {
    async fn put(&self, key: &str, bytes: &[u8]) -> smartfarm_core::Result<()> {
        self.store.put(key, bytes).await
    }

    async fn get(&self, key: &str) -> smartfarm_core::Result<Vec<u8>> {
        if key.starts_with("images/") {
            self.reading.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.store.get(key).await
    }

    async fn exists(&self, key: &str) -> smartfarm_core::Result<bool> {
        self.store.exists(key).await
    }

    async fn delete(&self, key: &str) -> smartfarm_core::Result<()> {
        self.store.delete(key).await
    }

    async fn list(&self, prefix: &str) -> smartfarm_core::Result<Vec<String>> {
        self.store.list(prefix).await
    }

    async fn presigned_url(&self, key: &str, expires_in: Duration) -> smartfarm_core::Result<Option<String>> {
        self.store.presigned_url(key, expires_in).await
    }

    async fn set_storage_class(&self, key: &str, storage_class: &str) -> smartfarm_core::Result<()> {
        self.store.set_storage_class(key, storage_class).await
    }

    fn describe(&self) -> String {
        "stalled photos".into()
    }
}

/// Replica A's inference service (not started), with a stalled photo stored, and replica B's bus, on a NATS stream
/// of the test's own.
struct Replicas {
    _dir: tempfile::TempDir,
    a: InferenceApi,
    b: Bus,
    /// The photo's job, as the image role hands it out.
    job: Job,
    /// Set once A has begun to read the photo.
    reading: Arc<AtomicBool>,
}

async fn replicas() -> Replicas {
    let dir = tempfile::tempdir().unwrap();
    let database =
        Database::connect(&format!("sqlite://{}", dir.path().join("db").display()), &PostgresConfig::default())
            .await
            .unwrap();
    database.migrate().await.unwrap();
    let registry = database.registry();
    let farm = registry.create_farm(Uuid::now_v7(), "farm", SystemTime::now()).await.unwrap();
    let camera = registry
        .create_device(NewDevice {
            id: Uuid::now_v7(),
            farm_id: farm.id,
            name: "camera".into(),
            kind: DeviceKind::Camera,
            labels: BTreeMap::new(),
            credential_sha256: "00".repeat(32),
            create_time: SystemTime::now(),
        })
        .await
        .unwrap();
    let files = blob::open(&format!("file://{}", dir.path().join("blobs").display())).await.unwrap();
    let reading = Arc::new(AtomicBool::new(false));
    let blobs: Arc<dyn BlobStore> = Arc::new(StalledPhotos { store: files.clone(), reading: reading.clone() });

    // A photo, stored as the image role stores one.
    let bytes = b"a photo whose read never ends".to_vec();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let key = format!("images/{}/{sha256}", farm.id.simple());
    files.put(&key, &bytes).await.unwrap();
    let photo = ImageRecord {
        id: Uuid::now_v7(),
        farm_id: farm.id,
        device_id: camera.id,
        capture_time: SystemTime::now(),
        receive_time: SystemTime::now(),
        original_key: key,
        sha256: sha256.clone(),
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
    let images = database.images();
    images.add_blob_intent(&photo.original_key, photo.receive_time).await.unwrap();
    images.insert_image(photo.clone(), None).await.unwrap();

    let url = smartfarm_bus::testing::bus_url("inference-test");
    let a = InferenceApi::new(
        Stores {
            registry,
            images: database.images(),
            telemetry: database.telemetry(),
            models: database.models(),
            blobs,
        },
        Bus::connect(&url).await.unwrap(),
        InferenceConfig::default(),
    );
    a.ensure_builtin_models().await.unwrap();
    let job = Job::Diagnose(ImageStored {
        handed_out: true,
        image_id: photo.id,
        farm_id: farm.id,
        device_id: camera.id,
        sha256,
        content_type: "image/jpeg".into(),
        capture_time: photo.capture_time,
    });
    Replicas { _dir: dir, a, b: Bus::connect(&url).await.unwrap(), job, reading }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_hands_back_the_photo_it_is_diagnosing() {
    let Replicas { _dir, a, b, job, reading } = replicas().await;
    let pipeline = tokio::spawn(a.clone().run_pipeline());
    b.hand_out(job.clone());
    let mut waited = 0;
    while !reading.load(Ordering::SeqCst) {
        waited += 1;
        assert!(waited < 300, "replica A did not start on the photo's job");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A is about to stop: it goes on with the job it holds.
    a.stop_taking_jobs();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pipeline.is_finished(), "the pipeline goes on while the links drain");
    // A stops mid-diagnosis: its pipeline ends at once, and B gets the job at once.
    a.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), pipeline)
        .await
        .expect("the pipeline ends when the process stops, without waiting for the diagnosis")
        .unwrap();
    let mut taken_by_b = b.take_work(JobKind::Diagnose);
    let work = taken_by_b.next_within(Duration::from_secs(5)).await.expect("B gets the job A handed back");
    assert_eq!(work.job(), &job);
    work.done().await;
    b.remove_streams().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_about_to_stop_takes_no_new_job() {
    let Replicas { _dir, a, b, job, reading } = replicas().await;
    let pipeline = tokio::spawn(a.clone().run_pipeline());
    // A's diagnoser waits for jobs; then its process is about to stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.stop_taking_jobs();
    b.hand_out(job.clone());
    // B gets the job (at once, even if it came on a request A still had open), and A never started on it.
    let mut taken_by_b = b.take_work(JobKind::Diagnose);
    let work = taken_by_b.next_within(Duration::from_secs(5)).await.expect("B gets the job A did not take");
    assert_eq!(work.job(), &job);
    assert!(!reading.load(Ordering::SeqCst), "A took a job while about to stop");
    work.done().await;
    a.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), pipeline).await.expect("the pipeline ends").unwrap();
    b.remove_streams().await.unwrap();
}
