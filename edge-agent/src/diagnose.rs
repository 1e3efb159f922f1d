//! Plant-disease diagnosis on the farm (feature `ai`): every photo a camera delivers is classified with the same
//! model file the cloud serves, and a disease at least `disease_alert_confidence` sure becomes a local alert on
//! `smartfarm/alerts` at once, with or without a link to the cloud (`disease_detected`), and goes to the farm's
//! model-verdict rules, as the cloud's diagnosis of the same photo does there: the rule's alert is raised on the farm
//! and sent up the urgent lane, and the cloud's copy (which adds the stored photo as evidence) is the same alert. The model is the one built into the agent
//! until the cloud pushes the version it serves (a `ModelUpdate` down the edge link): the agent fetches that file
//! with `InferenceService.GetModelFile`, checks its digest and card, keeps it in `SPOOL_DIR/models/` (so it
//! survives restarts and outages) and switches to it.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use smartfarm_core::rules::DiseaseVerdict;
use smartfarm_ml::artifact::ModelKind;
use smartfarm_ml::disease::{DEFAULT_MODEL, DiseaseClassifier};
use smartfarm_ml::preprocess;
use smartfarm_proto::common::v1::ModelRef;
use smartfarm_proto::inference::v1::GetModelFileRequest;
use smartfarm_proto::inference::v1::inference_service_client::InferenceServiceClient;

use crate::config::EdgeConfig;
use crate::image_uplink::Authorize;
use crate::ingest::{LocalAlert, RaisedAlerts};
use crate::rules::EdgeRules;
use crate::uplink::bearer;

/// The model in use and what to do with its verdicts.
#[derive(Clone)]
pub struct Diagnoser {
    model: Arc<RwLock<Arc<DiseaseClassifier>>>,
    config: EdgeConfig,
    alerts: mpsc::UnboundedSender<LocalAlert>,
    /// The farm's rules, and where their alerts go.
    rules: (Arc<EdgeRules>, RaisedAlerts),
}

impl std::fmt::Debug for Diagnoser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Diagnoser").field("model", &self.current().card().reference()).finish()
    }
}

/// Where the pushed model is kept.
fn model_path(config: &EdgeConfig) -> PathBuf {
    config.spool_dir.join("models").join("plant_disease.safetensors")
}

impl Diagnoser {
    /// The model kept from the cloud's last push, or the built-in one.
    pub fn load(
        config: &EdgeConfig,
        alerts: mpsc::UnboundedSender<LocalAlert>,
        rules: (Arc<EdgeRules>, RaisedAlerts),
    ) -> anyhow::Result<Diagnoser> {
        let device = smartfarm_ml::inference_device();
        let kept = std::fs::read(model_path(config)).ok().and_then(|bytes| match DiseaseClassifier::from_model_file(&bytes, &device) {
            Ok(classifier) => Some(classifier),
            Err(error) => {
                tracing::warn!(%error, path = %model_path(config).display(), "the kept model does not load; using the built-in one");
                None
            }
        });
        let classifier = match kept {
            Some(classifier) => classifier,
            None => DiseaseClassifier::from_model_file(DEFAULT_MODEL, &device)?,
        };
        set_model_metric(classifier.card(), 1.0);
        tracing::info!(model = %classifier.card().reference(), "plant-disease model loaded");
        Ok(Diagnoser { model: Arc::new(RwLock::new(Arc::new(classifier))), config: config.clone(), alerts, rules })
    }

    fn current(&self) -> Arc<DiseaseClassifier> {
        self.model.read().expect("model lock").clone()
    }

    /// Diagnoses photos (camera, capture time, bytes) as cameras deliver them, until the agent stops.
    pub async fn run(
        self,
        mut photos: mpsc::Receiver<(Uuid, SystemTime, Vec<u8>)>,
        mut stopping: watch::Receiver<bool>,
    ) {
        loop {
            let (camera, capture_time, bytes) = tokio::select! {
                photo = photos.recv() => match photo {
                    Some(photo) => photo,
                    None => return,
                },
                _ = stopping.wait_for(|stop| *stop) => return,
            };
            let classifier = self.current();
            let result = tokio::task::spawn_blocking(move || {
                preprocess::decode_photo("photo", &bytes)
                    .map(|image| (classifier.classify(&[image]).remove(0), classifier.card().reference()))
            })
            .await;
            match result {
                Ok(Ok((prediction, model))) => {
                    metrics::counter!("smartfarm_edge_photos_diagnosed_total").increment(1);
                    let confidence = f64::from(prediction.confidence);
                    tracing::info!(%camera, label = %prediction.label, confidence, %model, "photo diagnosed");
                    let healthy = smartfarm_ml::disease::is_healthy(&prediction.label);
                    if confidence >= self.config.disease_alert_confidence {
                        // What the cloud's pipeline hands its rules for the same photo (a disease, or a healthy
                        // class that clears the camera's disease alerts, at the same confidence bar), so both
                        // raise, and resolve, the same alert.
                        let verdict = DiseaseVerdict {
                            camera,
                            image_id: None,
                            label: prediction.label.clone(),
                            confidence,
                            healthy,
                            capture_time,
                        };
                        let (rules, raised) = &self.rules;
                        for alert in rules.on_disease(&verdict) {
                            raised.raise(alert);
                        }
                    }
                    if !healthy && confidence >= self.config.disease_alert_confidence {
                        metrics::counter!("smartfarm_edge_diseases_detected_total").increment(1);
                        let _ = self.alerts.send(LocalAlert::DiseaseDetected {
                            camera,
                            label: prediction.label,
                            confidence,
                            model,
                        });
                    }
                }
                Ok(Err(error)) => tracing::warn!(%camera, %error, "cannot diagnose a photo"),
                Err(error) => tracing::warn!(%camera, %error, "the diagnosis worker failed"),
            }
        }
    }

    /// Follows the cloud's model updates: fetches, checks, keeps and switches to each new version. A fetch that
    /// fails is tried again with backoff (30 s, doubling, at most 10 min) until it works or a newer update comes:
    /// the cloud says which version serves only when it changes, so waiting for its next word could take forever.
    /// The current model keeps working meanwhile.
    pub async fn follow_updates(self, mut updates: mpsc::Receiver<Vec<ModelRef>>, mut stopping: watch::Receiver<bool>) {
        const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(30);
        const RETRY_LONGEST: std::time::Duration = std::time::Duration::from_secs(600);
        let mut wanted: Vec<ModelRef> = Vec::new();
        let mut retry_in = RETRY_FIRST;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                update = updates.recv() => match update {
                    Some(models) => {
                        wanted = models;
                        retry_in = RETRY_FIRST;
                    }
                    None => return,
                },
                () = retry => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            retry_at = None;
            let mut failed = false;
            for model in &wanted {
                let card = self.current().card().clone();
                if card.name == model.name && card.version == model.version {
                    continue;
                }
                if let Err(error) = self.fetch(model).await {
                    let model = format!("{}@{}", model.name, model.version);
                    tracing::warn!(%model, %error, retry_in_s = retry_in.as_secs(), "cannot switch to the cloud's model");
                    failed = true;
                }
            }
            if failed {
                retry_at = Some(tokio::time::Instant::now() + retry_in);
                retry_in = (retry_in * 2).min(RETRY_LONGEST);
            }
        }
    }

    async fn fetch(&self, wanted: &ModelRef) -> anyhow::Result<()> {
        let channel = crate::uplink::connect(&self.config).await?;
        let mut client = InferenceServiceClient::with_interceptor(channel, Authorize(bearer(&self.config)?))
            .max_decoding_message_size(smartfarm_ml::artifact::MAX_MODEL_BYTES + 1024);
        let request = client.get_model_file(GetModelFileRequest { model: Some(wanted.clone()) });
        let file = tokio::time::timeout(std::time::Duration::from_secs(120), request)
            .await
            .map_err(|_| anyhow::anyhow!("the model file did not arrive within 120 s"))??
            .into_inner();
        anyhow::ensure!(
            hex::encode(Sha256::digest(&file.model_file)) == file.sha256,
            "the model file does not match its sha256"
        );
        let bytes = file.model_file;
        let (classifier, bytes) = tokio::task::spawn_blocking(move || {
            DiseaseClassifier::from_model_file(&bytes, &smartfarm_ml::inference_device())
                .map(|classifier| (classifier, bytes))
        })
        .await??;
        let card = classifier.card().clone();
        anyhow::ensure!(card.kind == ModelKind::PlantDisease, "{} is not a plant-disease model", card.reference());
        anyhow::ensure!(
            card.name == wanted.name && card.version == wanted.version,
            "the file holds {}",
            card.reference()
        );
        // Kept before it is used: a restart (perhaps offline) comes back with the same model.
        let path = model_path(&self.config);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let temporary = path.with_extension("tmp");
            std::fs::create_dir_all(path.parent().expect("a models dir"))?;
            std::fs::write(&temporary, &bytes)?;
            std::fs::File::open(&temporary)?.sync_all()?;
            std::fs::rename(&temporary, &path)
        })
        .await??;
        let previous = std::mem::replace(&mut *self.model.write().expect("model lock"), Arc::new(classifier));
        set_model_metric(previous.card(), 0.0);
        set_model_metric(&card, 1.0);
        tracing::info!(model = %card.reference(), previous = %previous.card().reference(), "switched to the cloud's plant-disease model");
        Ok(())
    }
}

/// `smartfarm_edge_model_info{name, version}`: 1 for the model in use.
fn set_model_metric(card: &smartfarm_ml::artifact::ModelCard, value: f64) {
    metrics::gauge!("smartfarm_edge_model_info", "name" => card.name.clone(), "version" => card.version.clone())
        .set(value);
}
