//! smartfarm-inference serves the models of `smartfarm-ml`: `InferenceService` (classify a photo, find anomalies in
//! a series, list model versions, activate one without a restart) and the pipeline behind it: every new photo is
//! diagnosed and the diagnosis saved on it, every committed telemetry batch is scored, and a confident disease or
//! an anomalous stretch is announced on the bus for the alert role, with its evidence. Every result names the
//! model version that produced it.

#![forbid(unsafe_code)]

pub mod pipeline;
pub mod serving;

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use smartfarm_bus::Bus;
use smartfarm_core::config::InferenceConfig;
use smartfarm_core::time::{from_timestamp, to_timestamp};
use smartfarm_core::{Error, Principal, Result, validate};
use smartfarm_ml::anomaly;
use smartfarm_ml::artifact::ModelKind;
use smartfarm_ml::preprocess;
use smartfarm_proto::common::v1 as common;
use smartfarm_proto::inference::v1 as pb;
use smartfarm_proto::inference::v1::inference_service_server::{InferenceService, InferenceServiceServer};
use smartfarm_store::image::{StoredDiagnosis, VerdictMark};
use smartfarm_store::models::StoredModel;
use smartfarm_store::telemetry::{ReadingCursor, ReadingFilter};
use smartfarm_store::{BlobStore, ImageStore, ModelStore, RegistryStore, TelemetryStore};

pub use serving::Serving;

/// 2200-01-01 in seconds since 1970: series times past it are refused.
const LATEST_SERIES_SECONDS: f64 = 7_258_118_400.0;

/// Most points one DetectAnomalies call scores.
pub const MAX_SERIES_POINTS: usize = 200_000;

/// The `InferenceService` implementation and the pipeline's state.
#[derive(Clone)]
pub struct InferenceApi {
    registry: Arc<dyn RegistryStore>,
    images: Arc<dyn ImageStore>,
    telemetry: Arc<dyn TelemetryStore>,
    models: Arc<dyn ModelStore>,
    blobs: Arc<dyn BlobStore>,
    bus: Bus,
    settings: Arc<InferenceConfig>,
    serving: Serving,
    detectors: pipeline::Detectors,
    /// DetectAnomalies trains an autoencoder per call: at most one call per core at a time.
    detecting: Arc<tokio::sync::Semaphore>,
    /// Photos being decoded: at most one per core. A photo of a few hundred kB can decode to hundreds of MB, so
    /// without a bound concurrent requests could take the process's memory.
    decoding: Arc<tokio::sync::Semaphore>,
    /// How far the process is in shutting down: the pipeline takes no new jobs once it is draining, and hands
    /// back what it holds and ends once it is stopping.
    shutting_down: tokio::sync::watch::Receiver<Shutdown>,
    shutdown_sender: Arc<tokio::sync::watch::Sender<Shutdown>>,
}

/// How far a process is in shutting down, as the pipeline sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Shutdown {
    Running,
    /// About to stop: no new jobs.
    Draining,
    /// Stopping: jobs held go back, and the pipeline ends.
    Stopping,
}

/// The cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl std::fmt::Debug for InferenceApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceApi").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// The stores the service reads and writes.
pub struct Stores {
    pub registry: Arc<dyn RegistryStore>,
    pub images: Arc<dyn ImageStore>,
    pub telemetry: Arc<dyn TelemetryStore>,
    pub models: Arc<dyn ModelStore>,
    pub blobs: Arc<dyn BlobStore>,
}

impl InferenceApi {
    /// The service over the given stores; call [`InferenceApi::ensure_builtin_models`] before serving.
    pub fn new(stores: Stores, bus: Bus, settings: InferenceConfig) -> Self {
        let (shutdown_sender, shutting_down) = tokio::sync::watch::channel(Shutdown::Running);
        InferenceApi {
            serving: Serving::new(stores.models.clone(), stores.blobs.clone()),
            registry: stores.registry,
            images: stores.images,
            telemetry: stores.telemetry,
            models: stores.models,
            blobs: stores.blobs,
            bus,
            settings: Arc::new(settings),
            detectors: pipeline::Detectors::default(),
            detecting: Arc::new(tokio::sync::Semaphore::new(cores())),
            decoding: Arc::new(tokio::sync::Semaphore::new(cores())),
            shutting_down,
            shutdown_sender: Arc::new(shutdown_sender),
        }
    }

    /// Tells the pipeline the process is about to stop (its edge links are closing): it takes no new jobs, hands
    /// back one that comes on a request still open, and goes on with the jobs it holds and this process's own work.
    pub fn stop_taking_jobs(&self) {
        self.shutdown_sender.send_if_modified(|stage| {
            let earlier = *stage < Shutdown::Draining;
            *stage = (*stage).max(Shutdown::Draining);
            earlier
        });
    }

    /// Tells the pipeline the process is stopping ([`InferenceApi::run_pipeline`] then returns once it has handed
    /// back the job it holds and scored this process's batches still waiting).
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown_sender.send(Shutdown::Stopping);
    }

    /// The tonic server for this service: it takes photos up to the models' limit and 2 MiB more, so a
    /// photo somewhat over it gets the limit's own error, and anything much larger is refused by the transport.
    pub fn into_server(self) -> InferenceServiceServer<InferenceApi> {
        InferenceServiceServer::new(self).max_decoding_message_size(preprocess::MAX_PHOTO_BYTES + 2 * 1024 * 1024)
    }

    /// Stores the built-in models and activates them where nothing of their kind is active.
    pub async fn ensure_builtin_models(&self) -> Result<()> {
        self.serving.ensure_builtin_models().await
    }

    /// Model versions and their loaded forms.
    pub fn serving(&self) -> &Serving {
        &self.serving
    }

    async fn classify_image(
        &self,
        principal: &Principal,
        request: pb::ClassifyImageRequest,
    ) -> Result<pb::ClassifyImageResponse> {
        let (bytes, image) = match request.source {
            Some(pb::classify_image_request::Source::ImageData(bytes)) => (bytes, None),
            Some(pb::classify_image_request::Source::ImageId(id)) => {
                let image_id = validate::id("image_id", &id)?;
                let image = self.images.get_image(image_id).await?;
                principal.authorize_farm(image.farm_id)?;
                if !image.original_available {
                    return Err(Error::FailedPrecondition(format!(
                        "image {image_id}'s original was deleted by retention; its last diagnosis is kept on it"
                    )));
                }
                (self.blobs.get(&image.original_key).await?, Some(image))
            }
            None => return Err(Error::invalid("source", "give image_data (the photo's bytes) or image_id")),
        };
        let model = self.serving.active(ModelKind::PlantDisease, &request.model_name).await?;
        let (diagnosis, ranked) = self.diagnose(&model, bytes).await?;
        if let Some(image) = image {
            // Asked for, not announced: whatever verdict the photo is waiting on stays as it is, and so does the
            // diagnosis of a pending verdict (the store does not save this one over it: the verdict's confirmation
            // names its label and version). A photo the pipeline has not diagnosed yet (its job lost, say) is left
            // to it for its verdict: the late diagnosis finds it waiting for one. The store decides which applies,
            // from the row as it is when this is saved.
            let pending_if_first = diagnosis.confidence >= self.settings.disease_alert_confidence;
            let mark = VerdictMark::AskedFor { pending_if_first };
            if !self.images.set_diagnosis(image.id, &diagnosis, mark).await? {
                tracing::debug!(image_id = %image.id, "a photo waiting for its verdict keeps that verdict's diagnosis");
            }
        }
        let top_k = match request.top_k {
            0 => 3,
            k => k as usize,
        };
        Ok(pb::ClassifyImageResponse {
            label: diagnosis.label.clone(),
            confidence: diagnosis.confidence,
            top_classes: ranked
                .into_iter()
                .take(top_k)
                .map(|(label, probability)| pb::ClassScore { label, probability: f64::from(probability) })
                .collect(),
            model: Some(model_ref(&model)),
        })
    }

    /// Decodes, preprocesses and classifies one photo with a stored plant-disease version.
    pub(crate) async fn diagnose(
        &self,
        model: &StoredModel,
        bytes: Vec<u8>,
    ) -> Result<(StoredDiagnosis, Vec<(String, f32)>)> {
        let worker = self.serving.classifier(model).await?;
        let spec = worker.input.clone();
        let permit =
            self.decoding.clone().acquire_owned().await.map_err(|_| Error::Unavailable("shutting down".into()))?;
        let input = tokio::task::spawn_blocking(move || {
            // Held by the decoding itself, which a cancelled request does not stop.
            let _permit = permit;
            preprocess::decode_photo("image_data", &bytes).map(|photo| preprocess::model_input(&photo, &spec))
        })
        .await
        .map_err(|error| Error::internal("preprocess a photo", error))??;
        let probabilities = worker.probabilities(input).await?;
        let mut ranked: Vec<(String, f32)> = worker.card.class_labels.iter().cloned().zip(probabilities).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let diagnosis = StoredDiagnosis {
            label: ranked[0].0.clone(),
            confidence: f64::from(ranked[0].1),
            model_name: model.name.clone(),
            model_version: model.version.clone(),
            diagnose_time: smartfarm_core::time::now(),
        };
        Ok((diagnosis, ranked))
    }

    async fn detect_anomalies(
        &self,
        principal: &Principal,
        request: pb::DetectAnomaliesRequest,
    ) -> Result<pb::DetectAnomaliesResponse> {
        let (times, values) = match request.source {
            Some(pb::detect_anomalies_request::Source::Series(series)) => {
                if series.times.len() != series.values.len() {
                    return Err(Error::invalid(
                        "series",
                        format!("has {} times but {} values", series.times.len(), series.values.len()),
                    ));
                }
                if series.values.len() > MAX_SERIES_POINTS {
                    return Err(Error::invalid("series", format!("at most {MAX_SERIES_POINTS} points per call")));
                }
                let times = series
                    .times
                    .iter()
                    .enumerate()
                    .map(|(index, t)| {
                        let seconds = from_timestamp("series.times", t).map(seconds)?;
                        if !(0.0..LATEST_SERIES_SECONDS).contains(&seconds) {
                            return Err(Error::invalid(
                                "series.times",
                                format!("time {index} is not between 1970 and 2200"),
                            ));
                        }
                        Ok(seconds)
                    })
                    .collect::<Result<Vec<f64>>>()?;
                (times, series.values)
            }
            Some(pb::detect_anomalies_request::Source::DeviceSeries(device_series)) => {
                self.stored_series(principal, &device_series).await?
            }
            None => return Err(Error::invalid("source", "give series (times and values) or device_series")),
        };
        let model = self.serving.active(ModelKind::SensorAnomaly, &request.model_name).await?;
        let params = self.serving.detector_params(&model)?;
        let (times_for_events, values_for_events) = (times.clone(), values.clone());
        let permit =
            self.detecting.clone().acquire_owned().await.map_err(|_| Error::Unavailable("shutting down".into()))?;
        let detection = tokio::task::spawn_blocking(move || {
            // Held by the training itself: a caller that gives up (a deadline, a reset) does not stop it, and must
            // not free its core for another.
            let _permit = permit;
            anomaly::detect(&times, &values, &params, &smartfarm_ml::training_device())
        })
        .await
        .map_err(|error| Error::internal("detect anomalies", error))??;
        let at = |index: usize| Some(to_timestamp(from_seconds(times_for_events[index])));
        Ok(pb::DetectAnomaliesResponse {
            events: detection
                .events
                .iter()
                .map(|event| pb::AnomalyEvent {
                    start_time: at(event.start),
                    end_time: at(event.end),
                    peak_score: event.peak_score,
                    peak_value: values_for_events[event.peak],
                })
                .collect(),
            scores: detection.scores,
            threshold: detection.threshold,
            model: Some(model_ref(&model)),
        })
    }

    /// A device's stored readings of one metric over a time range, as seconds and values.
    async fn stored_series(&self, principal: &Principal, request: &pb::DeviceSeries) -> Result<(Vec<f64>, Vec<f64>)> {
        let device_id = validate::id("device_series.device_id", &request.device_id)?;
        let device = self.registry.get_device(device_id).await?;
        principal.authorize_farm(device.farm_id)?;
        let metric = validate::metric_name("device_series.metric", &request.metric)?;
        let (start, end) = smartfarm_core::time::required_range(request.time_range.as_ref())?;
        let filter =
            ReadingFilter { farm_id: device.farm_id, device_ids: vec![device_id], metrics: vec![metric], start, end };
        let readings = read_series(self.telemetry.as_ref(), &filter, MAX_SERIES_POINTS).await?;
        if readings.0.len() >= MAX_SERIES_POINTS {
            return Err(Error::invalid(
                "device_series.time_range",
                format!("holds more than {MAX_SERIES_POINTS} readings; narrow it"),
            ));
        }
        Ok(readings)
    }

    async fn list_models(&self, request: pb::ListModelsRequest) -> Result<pb::ListModelsResponse> {
        let kind = match pb::ModelKind::try_from(request.kind) {
            Ok(pb::ModelKind::Unspecified) => None,
            Ok(pb::ModelKind::PlantDisease) => Some(ModelKind::PlantDisease.as_str()),
            Ok(pb::ModelKind::SensorAnomaly) => Some(ModelKind::SensorAnomaly.as_str()),
            Err(_) => return Err(Error::invalid("kind", format!("{} is not a model kind", request.kind))),
        };
        let name = (!request.name.is_empty()).then_some(request.name.as_str());
        let models = self.models.list_models(kind, name).await?;
        Ok(pb::ListModelsResponse { models: models.iter().map(model_to_proto).collect::<Result<Vec<_>>>()? })
    }

    async fn activate_model(
        &self,
        principal: &Principal,
        request: pb::ActivateModelRequest,
    ) -> Result<pb::ActivateModelResponse> {
        principal.require_admin()?;
        let reference = request.model.ok_or_else(|| Error::invalid("model", "is required (name and version)"))?;
        smartfarm_ml::artifact::check_token("model.name", &reference.name)?;
        smartfarm_ml::artifact::check_token("model.version", &reference.version)?;
        let stored = self.models.get_model(&reference.name, &reference.version).await?;
        // Load it before it serves: a version whose file is gone or broken is refused, the old one keeps serving.
        if stored.kind == ModelKind::PlantDisease.as_str() {
            self.serving.classifier(&stored).await?;
        } else {
            self.serving.detector_params(&stored)?;
        }
        let active =
            self.models.activate_model(&reference.name, &reference.version, smartfarm_core::time::now()).await?;
        tracing::info!(model = %format!("{}@{}", active.name, active.version), kind = %active.kind, "model activated");
        Ok(pb::ActivateModelResponse { model: Some(model_to_proto(&active)?) })
    }
}

impl InferenceApi {
    async fn get_model_file(&self, request: pb::GetModelFileRequest) -> Result<pb::GetModelFileResponse> {
        let reference = request.model.ok_or_else(|| Error::invalid("model", "is required (name and version)"))?;
        smartfarm_ml::artifact::check_token("model.name", &reference.name)?;
        smartfarm_ml::artifact::check_token("model.version", &reference.version)?;
        let stored = self.models.get_model(&reference.name, &reference.version).await?;
        let model_file = self.serving.model_bytes(&stored).await?;
        let kind = match stored.kind.as_str() {
            "plant_disease" => pb::ModelKind::PlantDisease,
            _ => pb::ModelKind::SensorAnomaly,
        };
        Ok(pb::GetModelFileResponse { model_file, sha256: stored.sha256, kind: kind as i32 })
    }
}

/// Reads a filter's readings (at most `limit`) as seconds and values, in time order.
pub(crate) async fn read_series(
    telemetry: &dyn TelemetryStore,
    filter: &ReadingFilter,
    limit: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut times = Vec::new();
    let mut values = Vec::new();
    let mut cursor: Option<ReadingCursor> = None;
    loop {
        let page = telemetry.query_readings(filter, cursor.as_ref(), 10_000.min(limit - times.len())).await?;
        let full = page.len() == 10_000.min(limit - times.len());
        for reading in &page {
            let t = seconds(reading.measure_time);
            // Two readings at one instant (a resend under another sequence number): the first counts.
            if times.last().is_some_and(|last| t <= *last) {
                continue;
            }
            times.push(t);
            values.push(reading.value);
        }
        match page.last() {
            Some(last) if full && times.len() < limit => {
                cursor = Some(ReadingCursor {
                    measure_time: last.measure_time,
                    device_id: last.device_id,
                    metric: last.metric.clone(),
                    sequence: last.sequence,
                });
            }
            _ => return Ok((times, values)),
        }
    }
}

/// Seconds since 1970 (negative before).
pub(crate) fn seconds(time: SystemTime) -> f64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => after.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

pub(crate) fn from_seconds(seconds: f64) -> SystemTime {
    if seconds >= 0.0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs_f64(seconds)
    } else {
        SystemTime::UNIX_EPOCH - std::time::Duration::from_secs_f64(-seconds)
    }
}

fn model_ref(model: &StoredModel) -> common::ModelRef {
    common::ModelRef { name: model.name.clone(), version: model.version.clone() }
}

fn model_to_proto(model: &StoredModel) -> Result<pb::Model> {
    let card = serving::card_of(model)?;
    Ok(pb::Model {
        r#ref: Some(model_ref(model)),
        kind: match card.kind {
            ModelKind::PlantDisease => pb::ModelKind::PlantDisease as i32,
            ModelKind::SensorAnomaly => pb::ModelKind::SensorAnomaly as i32,
        },
        active: model.activate_time.is_some(),
        create_time: Some(to_timestamp(model.create_time)),
        size_bytes: model.size_bytes,
        sha256: model.sha256.clone(),
        metrics: card.metrics.into_iter().collect(),
        class_labels: card.class_labels,
    })
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn classify_image(
        &self,
        request: Request<pb::ClassifyImageRequest>,
    ) -> Result<Response<pb::ClassifyImageResponse>, Status> {
        let principal = Principal::of(&request)?;
        Ok(Response::new(InferenceApi::classify_image(self, &principal, request.into_inner()).await?))
    }

    async fn detect_anomalies(
        &self,
        request: Request<pb::DetectAnomaliesRequest>,
    ) -> Result<Response<pb::DetectAnomaliesResponse>, Status> {
        let principal = Principal::of(&request)?;
        Ok(Response::new(InferenceApi::detect_anomalies(self, &principal, request.into_inner()).await?))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Principal::of(&request)?;
        Ok(Response::new(InferenceApi::list_models(self, request.into_inner()).await?))
    }

    async fn get_model_file(
        &self,
        request: Request<pb::GetModelFileRequest>,
    ) -> Result<Response<pb::GetModelFileResponse>, Status> {
        // Model files are not farm data: any authenticated caller (edge agents above all) may fetch them.
        Principal::of(&request)?;
        Ok(Response::new(InferenceApi::get_model_file(self, request.into_inner()).await?))
    }

    async fn activate_model(
        &self,
        request: Request<pb::ActivateModelRequest>,
    ) -> Result<Response<pb::ActivateModelResponse>, Status> {
        let principal = Principal::of(&request)?;
        Ok(Response::new(InferenceApi::activate_model(self, &principal, request.into_inner()).await?))
    }
}
