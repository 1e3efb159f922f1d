//! Model version storage: which versions of which models exist (their weights are blobs, content-addressed), their
//! cards, and which version of each model serves. At most one version per model name is active; a service asked
//! for "the active model of a kind" gets the most recently activated one. Every backend implements [`ModelStore`]
//! and passes the same suite (`tests/model_suite.rs`).

use std::time::SystemTime;

use smartfarm_core::Result;

/// One stored model version.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredModel {
    pub name: String,
    pub version: String,
    /// `plant_disease` or `sensor_anomaly`.
    pub kind: String,
    /// SHA-256 of the model file, hex.
    pub sha256: String,
    pub size_bytes: u64,
    /// Where the model file is in the blob store.
    pub blob_key: String,
    /// The model card as JSON (storage does not interpret it).
    pub card: String,
    pub create_time: SystemTime,
    /// When this version was made the serving one; `None` when it does not serve.
    pub activate_time: Option<SystemTime>,
}

/// The blob key of a model file: content-addressed, so writing the same model twice is harmless.
pub fn model_blob_key(sha256: &str) -> String {
    format!("models/{sha256}.safetensors")
}

/// What [`ModelStore::insert_model`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelInserted {
    /// A new version was stored.
    Created(StoredModel),
    /// The same name, version and bytes were there already.
    Existing(StoredModel),
}

#[async_trait::async_trait]
pub trait ModelStore: Send + Sync + 'static {
    /// Stores a version. The same name and version with other bytes is `AlreadyExists`.
    async fn insert_model(&self, model: StoredModel) -> Result<ModelInserted>;
    /// One version, or `NotFound`.
    async fn get_model(&self, name: &str, version: &str) -> Result<StoredModel>;
    /// Versions, optionally of one kind and one name: by name, newest first.
    async fn list_models(&self, kind: Option<&str>, name: Option<&str>) -> Result<Vec<StoredModel>>;
    /// Makes a version the serving one of its name (the previous one stops serving); returns it.
    async fn activate_model(&self, name: &str, version: &str, at: SystemTime) -> Result<StoredModel>;
    /// The most recently activated serving version of a kind.
    async fn active_model(&self, kind: &str) -> Result<Option<StoredModel>>;
}
