//! Which model versions serve, loaded and ready: plant-disease classifiers run on a worker thread each that batches
//! the photos waiting for it (up to [`MAX_BATCH`], which the classifier runs in cache-sized slices), and anomaly
//! models are their constants.
//! Every request asks the store which version is active, so an activation on any replica takes effect everywhere
//! at the next request, without a restart; loaded versions are cached by name and version.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};

use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use smartfarm_core::{Error, Result};
use smartfarm_ml::anomaly::{self, DetectorParams};
use smartfarm_ml::artifact::{self, ModelCard, ModelKind};
use smartfarm_ml::disease::{DEFAULT_MODEL, DiseaseClassifier};
use smartfarm_ml::preprocess::InputSpec;
use smartfarm_store::models::{ModelInserted, StoredModel, model_blob_key};
use smartfarm_store::{BlobStore, ModelStore};

/// Most photos in one batch.
pub const MAX_BATCH: usize = 32;

/// Versions kept loaded (each with its thread): the serving ones and a few recent others, for rollbacks.
const MAX_LOADED: usize = 4;

/// Photos waiting for a classifier before callers are told to back off.
const MAX_QUEUED: usize = 256;

/// One photo for a classifier worker.
struct Job {
    input: Vec<f32>,
    reply: oneshot::Sender<Vec<f32>>,
}

/// A loaded classifier on its own thread.
pub struct ClassifierWorker {
    pub card: ModelCard,
    pub input: InputSpec,
    jobs: mpsc::SyncSender<Job>,
}

impl std::fmt::Debug for ClassifierWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifierWorker").field("model", &self.card.reference()).finish()
    }
}

impl ClassifierWorker {
    /// Starts a worker thread for `classifier`; it stops when the worker is dropped.
    fn spawn(classifier: DiseaseClassifier) -> Result<ClassifierWorker> {
        let card = classifier.card().clone();
        let input = classifier.input_spec().clone();
        let (jobs, queue) = mpsc::sync_channel::<Job>(MAX_QUEUED);
        std::thread::Builder::new()
            .name(format!("classify {}", card.reference()))
            .spawn(move || {
                // Take what is waiting, up to a batch, run it, answer each.
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match queue.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    metrics::histogram!("smartfarm_inference_batch_size").record(batch.len() as f64);
                    let inputs: Vec<f32> = batch.iter().flat_map(|job| job.input.iter().copied()).collect();
                    for (job, row) in batch.into_iter().zip(classifier.probabilities(inputs)) {
                        let _ = job.reply.send(row);
                    }
                }
            })
            .map_err(|error| Error::internal("start a classifier thread", error))?;
        Ok(ClassifierWorker { card, input, jobs })
    }

    /// Class probabilities of one preprocessed photo, batched with whatever else is waiting.
    pub async fn probabilities(&self, input: Vec<f32>) -> Result<Vec<f32>> {
        let (reply, answer) = oneshot::channel();
        self.jobs.try_send(Job { input, reply }).map_err(|error| match error {
            mpsc::TrySendError::Full(_) => Error::ResourceExhausted(format!(
                "{MAX_QUEUED} photos are waiting for {}; retry later",
                self.card.reference()
            )),
            mpsc::TrySendError::Disconnected(_) => Error::Unavailable("the classifier stopped".into()),
        })?;
        answer.await.map_err(|_| Error::Unavailable("the classifier stopped".into()))
    }
}

/// Model versions and the loaded ones.
#[derive(Clone)]
pub struct Serving {
    models: Arc<dyn ModelStore>,
    blobs: Arc<dyn BlobStore>,
    classifiers: Arc<Mutex<HashMap<NameVersion, Arc<ClassifierWorker>>>>,
}

/// A model's name and version, as cache keys.
type NameVersion = (String, String);

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").finish_non_exhaustive()
    }
}

impl Serving {
    pub fn new(models: Arc<dyn ModelStore>, blobs: Arc<dyn BlobStore>) -> Self {
        Serving { models, blobs, classifiers: Arc::default() }
    }

    /// Stores a model file as a new version (the blob first, then the row); returns the row.
    pub async fn store_model_file(&self, bytes: &[u8], now: std::time::SystemTime) -> Result<StoredModel> {
        let card = artifact::read_card(bytes)?;
        // Load it once: a file that does not load is refused before anything is stored.
        match card.kind {
            ModelKind::PlantDisease => {
                let bytes = bytes.to_vec();
                tokio::task::spawn_blocking(move || {
                    DiseaseClassifier::from_model_file(&bytes, &smartfarm_ml::inference_device())
                })
                .await
                .map_err(|error| Error::internal("load a model", error))??;
            }
            ModelKind::SensorAnomaly => {
                anomaly::params_of(&card)?;
            }
        }
        let sha256 = hex::encode(Sha256::digest(bytes));
        let blob_key = model_blob_key(&sha256);
        self.blobs.put(&blob_key, bytes).await?;
        let row = StoredModel {
            name: card.name.clone(),
            version: card.version.clone(),
            kind: card.kind.as_str().to_string(),
            sha256,
            size_bytes: bytes.len() as u64,
            blob_key,
            card: artifact::card_json(&card),
            create_time: now,
            activate_time: None,
        };
        Ok(match self.models.insert_model(row).await? {
            ModelInserted::Created(row) | ModelInserted::Existing(row) => row,
        })
    }

    /// Stores the models built into the binary (the default plant-disease LeafNet and the default anomaly
    /// detector) and activates each where its kind has no active model yet.
    pub async fn ensure_builtin_models(&self) -> Result<()> {
        let anomaly_file = anomaly::model_file(&anomaly::default_card())?;
        for file in [DEFAULT_MODEL, anomaly_file.as_slice()] {
            let row = self.store_model_file(file, smartfarm_core::time::now()).await?;
            if self.models.active_model(&row.kind).await?.is_none() {
                self.models.activate_model(&row.name, &row.version, smartfarm_core::time::now()).await?;
                tracing::info!(model = %format!("{}@{}", row.name, row.version), kind = %row.kind, "built-in model activated");
            }
        }
        Ok(())
    }

    /// The serving version of a model: the active one of `name`, or with an empty name the active one of `kind`.
    pub async fn active(&self, kind: ModelKind, name: &str) -> Result<StoredModel> {
        if name.is_empty() {
            return self.models.active_model(kind.as_str()).await?.ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "no {} model is active; activate one with ActivateModel",
                    kind.as_str()
                ))
            });
        }
        artifact::check_token("model_name", name)?;
        let versions = self.models.list_models(None, Some(name)).await?;
        if versions.is_empty() {
            return Err(Error::not_found("model", name));
        }
        let active = versions.into_iter().find(|v| v.activate_time.is_some()).ok_or_else(|| {
            Error::FailedPrecondition(format!("model {name} has no active version; activate one with ActivateModel"))
        })?;
        if active.kind != kind.as_str() {
            return Err(Error::invalid(
                "model_name",
                format!("{name} is a {} model, not a {} one", active.kind, kind.as_str()),
            ));
        }
        Ok(active)
    }

    /// The loaded classifier of a stored plant-disease version (loaded from the blob store on first use).
    pub async fn classifier(&self, model: &StoredModel) -> Result<Arc<ClassifierWorker>> {
        let key = (model.name.clone(), model.version.clone());
        if let Some(worker) = self.classifiers.lock().expect("classifier cache").get(&key) {
            return Ok(worker.clone());
        }
        let bytes = self.model_bytes(model).await?;
        let worker = tokio::task::spawn_blocking(move || {
            DiseaseClassifier::from_model_file(&bytes, &smartfarm_ml::inference_device())
                .and_then(ClassifierWorker::spawn)
        })
        .await
        .map_err(|error| Error::internal("load a model", error))??;
        tracing::info!(model = %worker.card.reference(), "plant-disease model loaded");
        let worker = Arc::new(worker);
        let mut loaded = self.classifiers.lock().expect("classifier cache");
        // Dropping a worker ends its thread once the calls holding it finish.
        while loaded.len() >= MAX_LOADED {
            let Some(evicted) = loaded.keys().find(|k| **k != key).cloned() else { break };
            loaded.remove(&evicted);
        }
        Ok(loaded.entry(key).or_insert(worker).clone())
    }

    /// The constants of a stored anomaly version.
    pub fn detector_params(&self, model: &StoredModel) -> Result<DetectorParams> {
        anomaly::params_of(&card_of(model)?)
    }

    /// A stored version's file, checked against its digest.
    pub async fn model_bytes(&self, model: &StoredModel) -> Result<Vec<u8>> {
        let bytes = self.blobs.get(&model.blob_key).await?;
        if hex::encode(Sha256::digest(&bytes)) != model.sha256 {
            return Err(Error::internal(
                "read a model file",
                std::io::Error::other(format!("{} does not match its sha256", model.blob_key)),
            ));
        }
        Ok(bytes)
    }
}

/// The card stored with a version.
pub fn card_of(model: &StoredModel) -> Result<ModelCard> {
    serde_json::from_str(&model.card).map_err(|error| Error::internal("read a model card", error))
}
