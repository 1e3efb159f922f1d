//! Blob storage for large immutable objects (photos, model weights): the [`BlobStore`] trait and its backends,
//! picked by URL. Keys are content addresses or other stable names chosen by the caller; an object is written once
//! and never modified in place.

mod file;
mod s3;

use std::sync::Arc;

use smartfarm_core::{Error, Result};

pub use file::FileBlobStore;
pub use s3::{S3BlobStore, S3Settings};

/// Storage of immutable objects by key.
///
/// Keys are 1 to 512 characters of `[A-Za-z0-9._/-]`, with no empty, `.` or `..` segment, so every backend can
/// use them as paths without escaping.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `bytes` under `key` durably before returning. Writing an existing key replaces it atomically.
    async fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Reads the object under `key`; `NotFound` if there is none.
    async fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Whether an object exists under `key`.
    async fn exists(&self, key: &str) -> Result<bool>;
    /// Deletes the object under `key`; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// The keys that start with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// A URL that lets anyone holding it read the object for `expires_in`, if the backend can make one (S3
    /// presigns); `None` where it cannot (`file://`: the gateway serves the object instead).
    async fn presigned_url(&self, key: &str, expires_in: std::time::Duration) -> Result<Option<String>>;
    /// Moves the object to a cheaper storage class (S3's `STANDARD_IA`, `GLACIER_IR`, …). `FailedPrecondition`
    /// where the backend has no storage classes.
    async fn set_storage_class(&self, key: &str, storage_class: &str) -> Result<()>;
    /// A description for logs, without secrets.
    fn describe(&self) -> String;
}

/// Opens the blob store a URL names: `file://DIR` or `s3://…` (see [`S3Settings`] for its form).
pub async fn open(url: &str) -> Result<Arc<dyn BlobStore>> {
    if let Some(path) = url.strip_prefix("file://") {
        if path.is_empty() {
            return Err(Error::invalid("blob_url", "file:// needs a directory, e.g. file:///var/lib/smartfarm/blobs"));
        }
        return Ok(Arc::new(FileBlobStore::open(std::path::Path::new(path)).await?));
    }
    if url.starts_with("s3://") {
        return Ok(Arc::new(S3BlobStore::connect(S3Settings::from_url(url)?).await?));
    }
    Err(Error::invalid("blob_url", format!("{url:?} is not a blob url: expected file://DIR or s3://BUCKET")))
}

/// Checks a key against the rules of [`BlobStore`].
pub(crate) fn check_key(key: &str) -> Result<()> {
    let valid_chars = key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    let valid_segments = key.split('/').all(|segment| !segment.is_empty() && segment != "." && segment != "..");
    if key.is_empty() || key.len() > 512 || !valid_chars || !valid_segments {
        return Err(Error::invalid("key", format!("{key:?} is not a valid blob key")));
    }
    Ok(())
}
