//! The sweeper against a blob store that fails now and then: what it cannot delete it finds again at its next pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use smartfarm_bus::Bus;
use smartfarm_core::config::ImagesConfig;
use smartfarm_image::{ImageApi, UrlSigner};
use smartfarm_store::blob;
use smartfarm_store::blob::BlobStore;
use smartfarm_store::image::UploadState;
use smartfarm_store::model::DeviceKind;
use smartfarm_store::testing::TestDatabase;

/// A blob store whose next delete fails when armed, as a store that is briefly unreachable does.
struct FlakyDeletes {
    inner: Arc<dyn BlobStore>,
    fail_next_delete: AtomicBool,
}

#[async_trait::async_trait]
impl BlobStore for FlakyDeletes {
    async fn put(&self, key: &str, bytes: &[u8]) -> smartfarm_core::Result<()> {
        self.inner.put(key, bytes).await
    }
    async fn get(&self, key: &str) -> smartfarm_core::Result<Vec<u8>> {
        self.inner.get(key).await
    }
    async fn exists(&self, key: &str) -> smartfarm_core::Result<bool> {
        self.inner.exists(key).await
    }
    async fn delete(&self, key: &str) -> smartfarm_core::Result<()> {
        if self.fail_next_delete.swap(false, Ordering::SeqCst) {
            return Err(smartfarm_core::Error::Unavailable("the blob store is unreachable (test)".into()));
        }
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> smartfarm_core::Result<Vec<String>> {
        self.inner.list(prefix).await
    }
    async fn presigned_url(&self, key: &str, expires_in: Duration) -> smartfarm_core::Result<Option<String>> {
        self.inner.presigned_url(key, expires_in).await
    }
    async fn set_storage_class(&self, key: &str, storage_class: &str) -> smartfarm_core::Result<()> {
        self.inner.set_storage_class(key, storage_class).await
    }
    fn describe(&self) -> String {
        format!("flaky {}", self.inner.describe())
    }
}

/// The part of an abandoned upload whose delete fails is deleted by the next sweep: the upload's row, which is how
/// the sweeper finds parts, stays until its parts are gone.
#[tokio::test]
async fn a_part_whose_delete_failed_is_deleted_by_the_next_sweep() {
    let test = TestDatabase::sqlite().await;
    let (farm_id, devices) = test.farm_with_devices(&[DeviceKind::Camera]).await;
    let camera = devices[0];
    let dir = tempfile::tempdir().unwrap();
    let files = blob::open(&format!("file://{}", dir.path().join("blobs").display())).await.unwrap();
    let blobs = Arc::new(FlakyDeletes { inner: files, fail_next_delete: AtomicBool::new(false) });
    let images = test.database.images();
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let abandoned = UploadState {
        device_id: camera,
        upload_id: "photo-1".into(),
        farm_id,
        sha256: "ab".repeat(32),
        size_bytes: 5000,
        received_bytes: 3000,
        start_time: an_hour_ago,
        update_time: an_hour_ago,
        image_id: None,
    };
    images.save_upload(&abandoned, None).await.unwrap();
    let part = format!("{}000000000000", abandoned.part_prefix());
    blobs.put(&part, &[7; 3000]).await.unwrap();

    let settings = ImagesConfig { upload_expiry: Duration::from_secs(60), ..ImagesConfig::default() };
    let signer = UrlSigner::new(&[1; 32]).unwrap();
    let api = ImageApi::new(test.registry(), images.clone(), blobs.clone(), Bus::in_process(), settings, signer);
    blobs.fail_next_delete.store(true, Ordering::SeqCst);
    let first = api.sweep().await.unwrap();
    assert_eq!(first.uploads_expired, 0, "its part could not be deleted");
    assert!(blobs.exists(&part).await.unwrap());
    assert!(images.get_upload(camera, "photo-1").await.unwrap().is_some(), "the row that finds the part stays");

    let second = api.sweep().await.unwrap();
    assert_eq!(second.uploads_expired, 1);
    assert!(blobs.list("uploads/").await.unwrap().is_empty(), "no part left behind");
    assert!(images.get_upload(camera, "photo-1").await.unwrap().is_none());
}
