//! The pipeline: the inference role listens on the bus and takes work from it. A new photo (handed out as work by
//! the image role, so one replica diagnoses it) is diagnosed with the active plant-disease model and the diagnosis
//! saved on it; a diagnosis with at least `inference.disease_alert_confidence` is announced (`DiseaseDetected`
//! when it names a disease, `HealthyDiagnosed`, which clears the camera's disease alerts, when it does not;
//! evidence: the photo). Committed readings
//! are scored with the active anomaly model: each device's metric gets a detector fitted on its own history
//! (`inference.anomaly_history`, refitted after `inference.anomaly_refit`), the new readings are scored with
//! enough earlier ones as context, and each anomalous stretch that reaches into them is announced
//! (`AnomalyDetected`, evidence: the stretch and its peak). The new readings come with the event when this process
//! committed them; otherwise (another replica, or a queue too deep to hold them) they are read back. The context
//! before them is what this process scored last for the series, kept while it has seen every batch since; it is
//! read from the database only when that chain breaks. A batch that another replica committed and scores itself
//! (it runs this role too) is left to it; one committed by a replica without this role is handed out as work on
//! the bus, and scored by the one replica that takes it. Each commit also lists its batch in the store, and the
//! scorer takes it off, or, when the batch holds anomalies, announces the end of its scoring (`BatchScored`) and
//! the alert role takes it off once their alerts are recorded; one still listed after
//! `inference.late_scoring_after` (its announcement or an anomaly's was lost) is scored late from there.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use uuid::Uuid;

use smartfarm_bus::{
    AnomalyDetected, BatchScored, Diagnosis, Event, ImageStored, Job, JobKind, JobTaker, ModelVersion,
    ReadingsCommitted, SeriesSpan, SpanReadings, Work,
};
use smartfarm_core::batch::BatchKey;
use smartfarm_core::{Error, Result};
use smartfarm_ml::anomaly::{self, FittedDetector, MIN_TRAINING_POINTS};
use smartfarm_ml::artifact::ModelKind;
use smartfarm_store::image::{PhotoToDiagnose, VerdictMark};
use smartfarm_store::telemetry::ReadingFilter;

use crate::{InferenceApi, Shutdown, from_seconds, read_series, seconds};

/// Resolves once the process has reached `stage` of its shutdown (never, when nothing can tell it any more).
async fn reached(shutdown: &mut tokio::sync::watch::Receiver<Shutdown>, stage: Shutdown) {
    if shutdown.wait_for(|now| *now >= stage).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What a pipeline worker does next.
enum Next<T> {
    /// Its own process's work.
    Own(T),
    /// A job taken from the bus (boxed: a NATS message is large).
    Job(T, Box<Work>),
    /// Nothing more: the process is stopping, or its own queue closed.
    Stop,
}

/// A worker's next piece of work. A job that already came (on a request a cut-short wait left open) goes first,
/// unless the process is about to stop; otherwise whichever comes first of the process stopping, the process being
/// about to stop (from then on the worker takes no jobs, and hands back one that comes on a request still open),
/// its own process's work (preferred to a job), and a job (the wait is cancel-safe).
async fn next_work<T>(
    jobs: &mut JobTaker,
    own: &mut tokio::sync::mpsc::Receiver<T>,
    shutdown: &mut tokio::sync::watch::Receiver<Shutdown>,
    draining: &mut tokio::sync::watch::Receiver<Shutdown>,
    taking: &mut bool,
    from_job: fn(Work) -> Option<(T, Work)>,
) -> Next<T> {
    loop {
        if *taking
            && *draining.borrow() < Shutdown::Draining
            && let Some(work) = jobs.arrived().await
        {
            match from_job(work) {
                Some((item, work)) => return Next::Job(item, Box::new(work)),
                None => continue,
            }
        }
        tokio::select! {
            biased;
            () = reached(shutdown, Shutdown::Stopping) => return Next::Stop,
            () = reached(draining, Shutdown::Draining), if *taking => {
                *taking = false;
                jobs.close().await;
            }
            item = own.recv() => return item.map_or(Next::Stop, Next::Own),
            work = jobs.next_within(JOB_WAIT), if *taking => {
                if let Some((item, work)) = work.and_then(from_job) {
                    return Next::Job(item, Box::new(work));
                }
            }
        }
    }
}

/// A photo to diagnose from a job (`None` for another kind of job, which goes back to NATS).
fn photo_job(work: Work) -> Option<(ImageStored, Work)> {
    let Job::Diagnose(stored) = work.job() else { return None };
    Some((stored.clone(), work))
}

/// A batch to score from a job, its readings to be read back from the database: the epoch of a job's readings is
/// not this process's (`None` for another kind of job, which goes back to NATS).
fn scoring_job(work: Work) -> Option<((u64, ReadingsCommitted), Work)> {
    let Job::Score(committed) = work.job() else { return None };
    let mut committed = committed.clone();
    committed.series.iter_mut().for_each(|span| span.readings = None);
    Some(((0, committed), work))
}

/// Where a batch to score came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Announced on the bus: this process's own batch, or another replica's (scored here only in the cases
    /// `score_new_readings` says).
    Announced,
    /// Taken as a job from the bus.
    Job,
    /// Claimed from the list of batches nobody confirmed scored: older data than the series may have had scored
    /// since.
    Late,
}

/// Most readings a series' detector learns from.
const MAX_HISTORY_POINTS: usize = 50_000;

/// Per device's metric: the fitted detector (with the model version and when it was fitted), when a series that
/// could not be fitted may be tried again, and the end of the last anomaly announced (so that a stretch still
/// open when the next batch arrives is not announced again).
#[derive(Clone, Default)]
pub(crate) struct Detectors {
    fitted: Arc<Mutex<HashMap<SeriesKey, FittedEntry>>>,
    unfit_until: Arc<Mutex<HashMap<SeriesKey, Instant>>>,
    announced_until: Arc<Mutex<HashMap<SeriesKey, f64>>>,
    recent: Arc<Mutex<HashMap<SeriesKey, RecentReadings>>>,
    /// This process's own batches queued for the scorer and not yet scored: the late scorer leaves them to it.
    queued: Arc<Mutex<HashSet<BatchKey>>>,
}

type SeriesKey = (Uuid, String);

/// The end of a series as this process last scored it: every reading of the series from `from` on (seconds, one
/// per instant, in time order), so that the next batch's context need not be read back from the database. It
/// serves only while this process has seen every batch of the series with its readings: a batch that came without
/// them (committed by another replica, or dropped from a deep queue) forgets it, and after events were missed only
/// what was kept from batches announced since (a later `epoch`) serves.
struct RecentReadings {
    epoch: u64,
    from: f64,
    times: Vec<f64>,
    values: Vec<f64>,
}

/// Most readings kept per series as [`RecentReadings`]; a detector that needs a longer context (a weekly season
/// over fast readings) reads it from the database each time.
const MAX_RECENT_POINTS: usize = 10_000;

/// Events waiting for a pipeline worker; past this, the oldest kind of work is skipped (and counted).
const QUEUE: usize = 1024;

/// Events waiting for the scorer that keep the readings they came with; the others read them from the database.
const QUEUED_WITH_READINGS: usize = 8;

/// How long a worker's request for a job stays open (with NATS): it asks again when it expires. Short, because a
/// worker that turns to its own process's work meanwhile may receive a job on it, which then waits until that
/// work is done.
const JOB_WAIT: Duration = Duration::from_millis(500);

/// How long a job that failed (a photo that could not be read, say) waits before it is offered again.
const JOB_RETRY: Duration = Duration::from_secs(30);

/// Most batches a late scorer claims at once, and how long it holds them: another replica takes them once the claim
/// ends (this one died, say).
const LATE_BATCHES_AT_ONCE: usize = 16;
const LATE_LEASE: Duration = Duration::from_secs(600);
/// How long a stopping process waits for its late scorer to give back its claims (the database may be away).
const LATE_GIVE_BACK_WAIT: Duration = Duration::from_secs(5);

/// Late scorings of one batch before it is given up (logged): a batch that keeps failing is not retried forever.
const LATE_ATTEMPTS: u32 = 3;
/// How far back the late diagnosis looks for photos without a diagnosis: older ones (stored before a model was
/// active, or while diagnosis was switched off) are left alone.
const LATE_PHOTOS_WITHIN: Duration = Duration::from_secs(24 * 3600);
/// Most photos read per round of the late diagnosis.
const LATE_PHOTOS_AT_ONCE: usize = 16;
/// Late tries of one photo before it is left as it is (logged): the first comes `inference.late_scoring_after`
/// after its arrival, and the wait doubles after each, so the last starts about 15 such waits after it.
const LATE_PHOTO_TRIES: u32 = 4;

/// How long a series that is constant or otherwise unfit to learn from waits before it is tried again.
const UNFIT_RETRY: Duration = Duration::from_secs(3600);

#[derive(Clone)]
struct FittedEntry {
    detector: Arc<FittedDetector>,
    model: ModelVersion,
    fitted_at: Instant,
}

impl InferenceApi {
    /// Diagnoses new photos and scores committed readings until the bus closes or the process stops: one worker
    /// for each, so a slow detector fit never holds photos back and the bus is always drained. Shutting down comes
    /// in two steps (see [`InferenceApi::stop_taking_jobs`] and [`InferenceApi::begin_shutdown`]): first the
    /// workers take no new jobs and hand back one that comes on a request still open; then they stop and hand back
    /// the job they hold, and the scorer scores this process's own batches still waiting (no other replica would
    /// score those). Another replica so gets each job at once rather than after NATS's ten minutes. This returns
    /// once both workers have.
    pub async fn run_pipeline(self) {
        // Photos announced by versions that did not hand them out as jobs (every replica diagnoses those, as it
        // did then).
        let (photos, mut photo_queue) = tokio::sync::mpsc::channel::<ImageStored>(QUEUE);
        // Each batch goes with the count of times events were missed before it (see `RecentReadings`).
        let (readings, mut reading_queue) = tokio::sync::mpsc::channel::<(u64, ReadingsCommitted)>(QUEUE);
        let mut workers = Vec::new();
        // Each worker does what its own process announced first, and otherwise waits for one job (see
        // `next_work`): jobs are taken only when a worker is free for them, and until then wait in NATS, where
        // another replica may take them.
        if self.settings.diagnose_new_images {
            let diagnosing = self.clone();
            let mut jobs = self.bus.take_work(JobKind::Diagnose);
            let (mut shutdown, mut draining) = (self.shutting_down.clone(), self.shutting_down.clone());
            workers.push(tokio::spawn(async move {
                let mut taking = true;
                loop {
                    let next =
                        next_work(&mut jobs, &mut photo_queue, &mut shutdown, &mut draining, &mut taking, photo_job);
                    let (stored, work) = match next.await {
                        Next::Own(stored) => (stored, None),
                        Next::Job(stored, work) => (stored, Some(*work)),
                        Next::Stop => return jobs.close().await,
                    };
                    let diagnosed = tokio::select! {
                        biased;
                        () = reached(&mut shutdown, Shutdown::Stopping) => {
                            if let Some(work) = work {
                                work.hand_back().await;
                            }
                            return jobs.close().await;
                        }
                        diagnosed = diagnosing.diagnose_new_image(&stored) => diagnosed,
                    };
                    if let Err(error) = &diagnosed {
                        tracing::warn!(image_id = %stored.image_id, %error, "cannot diagnose a new photo");
                    }
                    match (work, diagnosed) {
                        (Some(work), Ok(())) => work.done().await,
                        // The blob store or the database may be back by then (three tries in all).
                        (Some(work), Err(_)) => work.retry_later(JOB_RETRY).await,
                        (None, _) => {}
                    }
                }
            }));
        }
        if self.settings.score_new_readings {
            let scoring = self.clone();
            let mut jobs = self.bus.take_work(JobKind::Score);
            let (mut shutdown, mut draining) = (self.shutting_down.clone(), self.shutting_down.clone());
            workers.push(tokio::spawn(async move {
                let mut taking = true;
                loop {
                    // The announcements carry the readings of this process's own batches, and the context kept for
                    // the next one.
                    let next = next_work(
                        &mut jobs,
                        &mut reading_queue,
                        &mut shutdown,
                        &mut draining,
                        &mut taking,
                        scoring_job,
                    );
                    let ((epoch, committed), work) = match next.await {
                        Next::Own(announced) => (announced, None),
                        Next::Job(job, work) => (job, Some(*work)),
                        // Closing the taker while the batches still waiting are scored (a closed queue has none).
                        Next::Stop => {
                            tokio::join!(jobs.close(), scoring.score_queued(&mut reading_queue));
                            return;
                        }
                    };
                    // This process's own batches are scored to the end; a job is given back when the process
                    // stops, for another replica to do.
                    let Some(work) = work else {
                        scoring.score_new_readings(&committed, epoch, Source::Announced).await;
                        continue;
                    };
                    tokio::select! {
                        biased;
                        () = reached(&mut shutdown, Shutdown::Stopping) => {
                            work.hand_back().await;
                            tokio::join!(jobs.close(), scoring.score_queued(&mut reading_queue));
                            return;
                        }
                        () = scoring.score_new_readings(&committed, epoch, Source::Job) => work.done().await,
                    }
                }
            }));
        }
        // Ends with the process's stop, or when the bus closes (below).
        let late = self.settings.score_new_readings.then(|| tokio::spawn(self.clone().score_late_batches()));
        let late_photos = self.settings.diagnose_new_images.then(|| tokio::spawn(self.clone().diagnose_late_photos()));
        let mut events = self.bus.subscribe();
        let mut shutdown = self.shutting_down.clone();
        let mut stopping = false;
        let mut epoch = 0;
        loop {
            let event = if stopping {
                // What was published before the stop still goes to the workers (the last batches the links
                // committed among it).
                match events.try_recv() {
                    Ok(event) => Ok(event),
                    Err(TryRecvError::Lagged(missed)) => Err(RecvError::Lagged(missed)),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            } else {
                tokio::select! {
                    biased;
                    () = reached(&mut shutdown, Shutdown::Stopping) => {
                        stopping = true;
                        continue;
                    }
                    event = events.recv() => event,
                }
            };
            let queued = match event {
                Ok(Event::ReadingsCommitted(mut committed)) if self.settings.score_new_readings => {
                    // A batch's readings ride along with its event (up to tens of thousands): past a few waiting,
                    // they are dropped and read back from the database instead, so a slow scorer's queue stays small.
                    if readings.capacity() + QUEUED_WITH_READINGS < QUEUE {
                        for span in &mut committed.series {
                            span.readings = None;
                        }
                    }
                    // Noted before it is queued: the scorer may be done with it (and forget it) at once.
                    let key = committed.batch.filter(|_| committed.published_here);
                    if let Some(key) = key {
                        self.detectors.queued.lock().expect("queued batches").insert(key);
                    }
                    let queued = readings.try_send((epoch, committed)).is_ok();
                    if !queued && let Some(key) = key {
                        self.detectors.queued.lock().expect("queued batches").remove(&key);
                    }
                    queued
                }
                Ok(Event::ImageStored(stored)) if self.settings.diagnose_new_images && !stored.handed_out => {
                    photos.try_send(stored).is_ok()
                }
                Ok(_) => true,
                Err(RecvError::Lagged(missed)) => {
                    epoch += 1;
                    metrics::counter!("smartfarm_inference_events_missed_total").increment(missed);
                    tracing::warn!(
                        missed,
                        "the inference pipeline fell behind the bus; those events were not processed"
                    );
                    true
                }
                Err(RecvError::Closed) => break,
            };
            if !queued {
                epoch += 1;
                metrics::counter!("smartfarm_inference_events_missed_total").increment(1);
                tracing::warn!("the inference pipeline's queue is full; an event was not processed");
            }
        }
        // The workers end when their queues close or the process stops, whichever comes first. The late scorer,
        // at a stop, gives back the batches it claimed and did not score: it is given a moment for that.
        drop((photos, readings));
        if let Some(mut late) = late
            && (!stopping || tokio::time::timeout(LATE_GIVE_BACK_WAIT, &mut late).await.is_err())
        {
            late.abort();
        }
        if let Some(late_photos) = late_photos {
            late_photos.abort();
        }
        for worker in workers {
            let _ = worker.await;
        }
    }

    /// Until the process stops: scores the committed batches that nobody confirmed scored within
    /// `inference.late_scoring_after` of their arrival (their announcement was lost: the process that committed them
    /// died, or stopped before it scored them, or its pipeline fell behind the bus and skipped them). Each is
    /// claimed first, so replicas share them out; their readings are read back from the database. This process's
    /// own batches still queued for its scorer are left to it (not claimed). A claim that comes back full is
    /// followed by the next at once, so a backlog drains as fast as it scores. A batch scored twice (its scorer was
    /// slower than the wait) announces its anomalies again, which the alert role takes for the open alerts they
    /// overlap. A stopping process gives back the claims it has not scored.
    async fn score_late_batches(self) {
        let mut shutdown = self.shutting_down.clone();
        let wait = self.settings.late_scoring_after;
        let mut more_waiting = false;
        // Without an anomaly model there is nothing to score with: the batches wait, unclaimed, for one.
        while self.next_late_round(&mut shutdown, ModelKind::SensorAnomaly, more_waiting).await {
            more_waiting = false;
            let now = SystemTime::now();
            let received_before = now.checked_sub(wait).unwrap_or(SystemTime::UNIX_EPOCH);
            let queued: Vec<BatchKey> = self.detectors.queued.lock().expect("queued batches").iter().copied().collect();
            let claim = self.telemetry.claim_unscored(received_before, now, LATE_LEASE, LATE_BATCHES_AT_ONCE, &queued);
            let claimed = match claim.await {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the batches left unscored");
                    continue;
                }
            };
            more_waiting = claimed.len() == LATE_BATCHES_AT_ONCE;
            let claimed_until = now + LATE_LEASE;
            let mut claimed = claimed.into_iter();
            while let Some(batch) = claimed.next() {
                // A stopping process gives back what it claimed and did not score: another replica takes it at
                // once rather than after the lease.
                if *shutdown.borrow() >= Shutdown::Draining {
                    let left: Vec<BatchKey> =
                        std::iter::once(batch.key).chain(claimed.map(|batch| batch.key)).collect();
                    return self.give_back_late_claims(&left, claimed_until).await;
                }
                let key = batch.key;
                if batch.attempts > LATE_ATTEMPTS {
                    metrics::counter!("smartfarm_inference_late_batches_given_up_total").increment(1);
                    tracing::warn!(
                        gateway_id = %batch.key.gateway_id,
                        last_sequence = batch.key.last_sequence,
                        attempts = batch.attempts - 1,
                        "a committed batch could not be scored; given up"
                    );
                    self.confirm_scored(batch.key).await;
                    continue;
                }
                let committed = ReadingsCommitted {
                    farm_id: batch.farm_id,
                    series: batch
                        .series
                        .into_iter()
                        .map(|span| SeriesSpan {
                            device_id: span.device_id,
                            metric: span.metric,
                            first_time: span.first_time,
                            last_time: span.last_time,
                            readings: None,
                        })
                        .collect(),
                    scored_where_committed: false,
                    handed_out: false,
                    published_here: false,
                    batch: Some(batch.key),
                };
                metrics::counter!("smartfarm_inference_late_batches_total").increment(1);
                tracing::info!(
                    gateway_id = %batch.key.gateway_id,
                    last_sequence = batch.key.last_sequence,
                    "scoring a committed batch nobody confirmed scored"
                );
                tokio::select! {
                    biased;
                    () = reached(&mut shutdown, Shutdown::Stopping) => {
                        // Scored in part: what it found so far may be announced again by the next scorer, which the
                        // alert role folds into the open alerts.
                        let left: Vec<BatchKey> = std::iter::once(key).chain(claimed.map(|batch| batch.key)).collect();
                        return self.give_back_late_claims(&left, claimed_until).await;
                    }
                    () = self.score_new_readings(&committed, 0, Source::Late) => {}
                }
            }
        }
    }

    /// Until the process stops: diagnoses the photos received more than `inference.late_scoring_after` ago (within
    /// the last day) that still have no diagnosis, or whose verdict the alert role did not confirm: their job was
    /// lost (a process on the in-process bus stopped or died with it queued), every try failed, or the verdict was
    /// lost on the bus or not recorded (it is announced again). Each try is counted before it starts, with the time
    /// the next may start, which doubles the wait each time; after `LATE_PHOTO_TRIES` the photo is left as it is
    /// (a photo that cannot be decoded, or a verdict that no alert role confirms). Every replica that runs the
    /// role looks; the count is a claim, so one of them tries a photo.
    async fn diagnose_late_photos(self) {
        let mut shutdown = self.shutting_down.clone();
        let wait = self.settings.late_scoring_after;
        let mut more_waiting = false;
        while self.next_late_round(&mut shutdown, ModelKind::PlantDisease, more_waiting).await {
            more_waiting = false;
            let now = SystemTime::now();
            let received_before = now.checked_sub(wait).unwrap_or(SystemTime::UNIX_EPOCH);
            let received_from = now.checked_sub(LATE_PHOTOS_WITHIN).unwrap_or(SystemTime::UNIX_EPOCH);
            let photos = match self
                .images
                .images_to_diagnose(received_from, received_before, now, LATE_PHOTO_TRIES, LATE_PHOTOS_AT_ONCE)
                .await
            {
                Ok(photos) => photos,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the photos left without a diagnosis");
                    continue;
                }
            };
            // Each photo found is noted as tried, so the next read moves on (unless noting failed).
            more_waiting = photos.len() == LATE_PHOTOS_AT_ONCE;
            for PhotoToDiagnose { image: photo, late_tries } in photos {
                if *shutdown.borrow() >= Shutdown::Draining {
                    return;
                }
                let tries = late_tries + 1;
                let tried_at = SystemTime::now();
                let backoff = wait.saturating_mul(2u32.pow(tries.min(LATE_PHOTO_TRIES)));
                let next_try_after = tried_at.checked_add(backoff).unwrap_or(tried_at + LATE_PHOTOS_WITHIN);
                // Counted before it starts (a try that takes the process down counts too), and only by the replica
                // whose count lands: the others leave the photo to it.
                match self.images.claim_late_try(photo.id, late_tries, tried_at, next_try_after).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(image_id = %photo.id, "a late try counted elsewhere, or no longer needed");
                        continue;
                    }
                    Err(error) => {
                        // Not tried until counted: a photo whose tries cannot be counted could be tried without end.
                        tracing::warn!(image_id = %photo.id, %error, "cannot count a late diagnosis try; trying later");
                        more_waiting = false;
                        continue;
                    }
                }
                metrics::counter!("smartfarm_inference_late_photos_total").increment(1);
                tracing::info!(image_id = %photo.id, tries, "diagnosing a photo left without a diagnosis or a confirmed verdict");
                let stored = ImageStored {
                    handed_out: false,
                    image_id: photo.id,
                    farm_id: photo.farm_id,
                    device_id: photo.device_id,
                    sha256: photo.sha256,
                    content_type: photo.content_type,
                    capture_time: photo.capture_time,
                };
                let diagnosed = tokio::select! {
                    biased;
                    () = reached(&mut shutdown, Shutdown::Stopping) => return,
                    diagnosed = self.diagnose_new_image(&stored) => diagnosed,
                };
                let last = tries >= LATE_PHOTO_TRIES;
                match diagnosed {
                    // A dependency was away or busy: not the photo's fault, so the try is given back (the wait
                    // stays). The day the late diagnosis looks back over still bounds the tries. An internal error
                    // (a decoder that panicked on the photo, say) counts.
                    Err(error @ (Error::Unavailable(_) | Error::ResourceExhausted(_))) => {
                        tracing::warn!(image_id = %photo.id, tries, %error, "cannot diagnose a photo for now; trying later");
                        if let Err(error) = self.images.give_late_try_back(photo.id, tries).await {
                            tracing::warn!(image_id = %photo.id, %error, "cannot give a late diagnosis try back");
                        }
                    }
                    Err(error) if last => {
                        metrics::counter!("smartfarm_inference_late_photos_given_up_total").increment(1);
                        tracing::warn!(image_id = %photo.id, tries, %error, "cannot diagnose a photo; it is left without a diagnosis");
                    }
                    Err(error) => {
                        tracing::warn!(image_id = %photo.id, tries, %error, "cannot diagnose a photo left without a diagnosis; trying later")
                    }
                    Ok(()) if last => {
                        tracing::info!(image_id = %photo.id, tries, "a photo's last late diagnosis: a verdict it announced and nobody confirms is not announced again")
                    }
                    Ok(()) => {}
                }
            }
        }
    }

    /// Waits for the next round of a late task (scoring, diagnosis): at once when the last round left more waiting
    /// (`at_once`), otherwise half of `inference.late_scoring_after` (between half a second and a minute), and then
    /// for as long as no model of `kind` serves. `false` once the process drains.
    async fn next_late_round(
        &self,
        shutdown: &mut tokio::sync::watch::Receiver<Shutdown>,
        kind: ModelKind,
        mut at_once: bool,
    ) -> bool {
        let every = (self.settings.late_scoring_after / 2).clamp(Duration::from_millis(500), Duration::from_secs(60));
        loop {
            if !at_once {
                tokio::select! {
                    biased;
                    () = reached(shutdown, Shutdown::Draining) => return false,
                    () = tokio::time::sleep(every) => {}
                }
            }
            at_once = false;
            if self.serving.active(kind, "").await.is_ok() {
                return true;
            }
        }
    }

    /// Gives back this process's claims (ending at `claimed_until`) on the batches `keys`, which it will not score.
    async fn give_back_late_claims(&self, keys: &[BatchKey], claimed_until: SystemTime) {
        match self.telemetry.release_unscored(keys, claimed_until).await {
            Ok(()) => tracing::info!(batches = keys.len(), "stopping: claims on batches to score given back"),
            // They are taken again once the claim ends.
            Err(error) => tracing::warn!(%error, batches = keys.len(), "cannot give back claims on batches to score"),
        }
    }

    /// Takes `key` off the list of batches still to score.
    async fn confirm_scored(&self, key: BatchKey) {
        if let Err(error) = self.telemetry.forget_unscored(&[key]).await {
            // It stays listed: a late scorer scores it again.
            tracing::warn!(gateway_id = %key.gateway_id, last_sequence = key.last_sequence, %error, "cannot confirm a scored batch");
        }
    }

    /// Scores this process's batches still waiting, until the queue closes (the process is stopping: no other
    /// replica would score them).
    async fn score_queued(&self, queue: &mut tokio::sync::mpsc::Receiver<(u64, ReadingsCommitted)>) {
        while let Some((epoch, committed)) = queue.recv().await {
            self.score_new_readings(&committed, epoch, Source::Announced).await;
        }
    }

    async fn diagnose_new_image(&self, stored: &ImageStored) -> Result<()> {
        let model = self.serving.active(ModelKind::PlantDisease, "").await?;
        let image = self.images.get_image(stored.image_id).await?;
        let bytes = self.blobs.get(&image.original_key).await?;
        let (diagnosis, _) = self.diagnose(&model, bytes).await?;
        // A verdict is announced on the bus, which may lose it: the photo waits for the alert role to confirm it
        // (and is diagnosed again late, announcing it again, if that does not come).
        let announce = diagnosis.confidence >= self.settings.disease_alert_confidence;
        self.images.set_diagnosis(image.id, &diagnosis, VerdictMark::Announced(announce)).await?;
        metrics::counter!("smartfarm_inference_images_diagnosed_total").increment(1);
        tracing::debug!(image_id = %image.id, label = %diagnosis.label, confidence = diagnosis.confidence, "photo diagnosed");
        if announce {
            let healthy = smartfarm_ml::disease::is_healthy(&diagnosis.label);
            let announced = Diagnosis {
                farm_id: image.farm_id,
                device_id: image.device_id,
                image_id: image.id,
                label: diagnosis.label,
                confidence: diagnosis.confidence,
                model: ModelVersion { name: model.name, version: model.version },
                capture_time: image.capture_time,
            };
            if healthy {
                self.bus.publish(Event::HealthyDiagnosed(announced));
            } else {
                metrics::counter!("smartfarm_inference_diseases_detected_total").increment(1);
                self.bus.publish(Event::DiseaseDetected(announced));
            }
        }
        Ok(())
    }

    /// Scores a batch this process committed, one it took as a job or claimed late, or one from a version that
    /// neither scored nor handed out its batches; leaves any other to the replica that scores it.
    async fn score_new_readings(&self, committed: &ReadingsCommitted, epoch: u64, source: Source) {
        let scored_here = source != Source::Announced
            || (committed.scored_where_committed && committed.published_here)
            || (!committed.scored_where_committed && !committed.handed_out);
        if !scored_here {
            // The replica that committed it scores it itself, or one replica takes it as work. What this process
            // kept of those series no longer ends where they end (forgotten here, in turn with the batches before
            // and after it).
            let mut recent = self.detectors.recent.lock().expect("recent readings");
            for span in &committed.series {
                recent.remove(&(span.device_id, span.metric.clone()));
            }
            drop(recent);
            if let Some(key) = committed.batch {
                self.detectors.queued.lock().expect("queued batches").remove(&key);
            }
            metrics::counter!("smartfarm_inference_batches_left_to_their_replica_total").increment(1);
            return;
        }
        let model = match self.serving.active(ModelKind::SensorAnomaly, "").await {
            Ok(model) => model,
            Err(error) => {
                // It stays listed: the late scorer takes it once a model is active again.
                tracing::warn!(%error, "no anomaly model to score new readings with");
                if let Some(key) = committed.batch {
                    self.detectors.queued.lock().expect("queued batches").remove(&key);
                }
                return;
            }
        };
        metrics::counter!("smartfarm_inference_batches_scored_total").increment(1);
        let mut failed = false;
        let scoring = committed.batch.map(|_| Uuid::now_v7());
        let mut stretches = 0;
        for span in &committed.series {
            match self.score_span(committed.farm_id, span, &model, epoch, (source == Source::Late, scoring)).await {
                Ok(found) => {
                    stretches += found;
                    metrics::counter!("smartfarm_inference_anomalies_detected_total").increment(found as u64)
                }
                Err(error) => {
                    failed = true;
                    tracing::warn!(device_id = %span.device_id, metric = %span.metric, %error, "cannot score new readings")
                }
            }
        }
        // A batch that failed stays listed: the late scorer tries it again (the database may be back by then). One
        // with anomalies is confirmed by the alert role once it has recorded their alerts.
        if let (Some(key), Some(scoring)) = (committed.batch, scoring) {
            match (failed, stretches) {
                (true, 0) => {}
                (false, 0) => self.confirm_scored(key).await,
                // The end of a scoring whose stretches the alert role counts (also when it failed: it then
                // forgets them, and leaves the batch listed).
                (failed, stretches) => {
                    self.bus.publish(Event::BatchScored(BatchScored {
                        batch: key,
                        scoring,
                        stretches: u32::try_from(stretches).unwrap_or(u32::MAX),
                        all_scored: !failed,
                    }));
                }
            }
            self.detectors.queued.lock().expect("queued batches").remove(&key);
        }
    }

    /// Scores one series' new readings (announced after `epoch` misses, see [`RecentReadings`]); returns how many
    /// anomalous stretches reached into them.
    async fn score_span(
        &self,
        farm_id: Uuid,
        span: &SeriesSpan,
        model: &smartfarm_store::models::StoredModel,
        epoch: u64,
        (late, scoring_id): (bool, Option<Uuid>),
    ) -> Result<usize> {
        let version = ModelVersion { name: model.name.clone(), version: model.version.clone() };
        let key = (span.device_id, span.metric.clone());
        // Taken out for the time being: whatever way this ends but success, it no longer follows the series. A late
        // batch lies before what the pipeline follows, and leaves it alone.
        let recent = if late { None } else { self.detectors.recent.lock().expect("recent readings").remove(&key) };
        let Some(detector) = self.detector_for(farm_id, span, model, &version).await? else {
            return Ok(0);
        };
        let context_seconds = detector.context_seconds();
        let context = Duration::from_secs_f64(context_seconds);
        let start = span.first_time.checked_sub(context).unwrap_or(SystemTime::UNIX_EPOCH);
        let end = span.last_time + Duration::from_micros(1);
        let filter =
            ReadingFilter { farm_id, device_ids: vec![span.device_id], metrics: vec![span.metric.clone()], start, end };
        let first_time = seconds(span.first_time);
        let (times, values, complete) = match &span.readings {
            // Committed in this process: the new readings came with the event, and the context before them is
            // what was scored last when it reaches back far enough and ends before them (a batch that goes back
            // in time needs the database's view); otherwise it is read from the database.
            Some(SpanReadings(new)) => {
                let start_time = seconds(start);
                let recent = recent.filter(|recent| {
                    recent.epoch == epoch
                        && recent.from <= start_time
                        && recent.times.last().is_some_and(|&last| last < first_time)
                });
                let (mut times, mut values, mut complete) = match recent {
                    Some(recent) => {
                        let skip = recent.times.partition_point(|&t| t < start_time);
                        (recent.times[skip..].to_vec(), recent.values[skip..].to_vec(), true)
                    }
                    None => {
                        metrics::counter!("smartfarm_inference_context_reads_total").increment(1);
                        let context = ReadingFilter { end: span.first_time, ..filter };
                        let (times, values) =
                            read_series(self.telemetry.as_ref(), &context, crate::MAX_SERIES_POINTS).await?;
                        let complete = times.len() < crate::MAX_SERIES_POINTS;
                        (times, values, complete)
                    }
                };
                for &(time, value) in new.iter() {
                    let t = seconds(time);
                    if times.len() >= crate::MAX_SERIES_POINTS {
                        complete = false;
                        break;
                    }
                    // As a read of the table would: one reading per instant, in time order.
                    if times.last().is_none_or(|last| t > *last) {
                        times.push(t);
                        values.push(value);
                    }
                }
                (times, values, complete)
            }
            None => {
                let (times, values) = read_series(self.telemetry.as_ref(), &filter, crate::MAX_SERIES_POINTS).await?;
                (times, values, false)
            }
        };
        let first_new = times.partition_point(|&t| t < first_time);
        if first_new >= times.len() {
            return Ok(0);
        }
        let scoring = detector.clone();
        let (scores_times, scores_values) = (times.clone(), values.clone());
        let events = tokio::task::spawn_blocking(move || {
            let scores = scoring.score(&scores_times, &scores_values);
            anomaly::events(&scores, 0, scoring.params())
        })
        .await
        .map_err(|error| Error::internal("score readings", error))?;
        if complete {
            // What the next batch's context can need: the last context's worth before where this one ends.
            let from = times[times.len() - 1] - context_seconds;
            let keep = times.partition_point(|&t| t < from);
            if times.len() - keep <= MAX_RECENT_POINTS {
                let recent =
                    RecentReadings { epoch, from, times: times[keep..].to_vec(), values: values[keep..].to_vec() };
                self.detectors.recent.lock().expect("recent readings").insert(key.clone(), recent);
            }
        }
        let already = self.detectors.announced_until.lock().expect("announcements").get(&key).copied();
        let mut announced = 0;
        // Stretches that reach into the new readings and began after the last one announced. A late batch's
        // readings are older than what may have been announced since: each stretch reaching into them is announced
        // (one announced already is the same alert to the alert role).
        let new_stretch = |start: usize| late || already.is_none_or(|end| times[start] > end);
        for event in events.iter().filter(|event| event.end >= first_new && new_stretch(event.start)) {
            announced += 1;
            // Only forward: a late batch's stretch must not make a newer one look unannounced.
            let end = times[event.end];
            self.detectors
                .announced_until
                .lock()
                .expect("announcements")
                .entry(key.clone())
                .and_modify(|until| *until = until.max(end))
                .or_insert(end);
            self.bus.publish(Event::AnomalyDetected(AnomalyDetected {
                farm_id,
                device_id: span.device_id,
                metric: span.metric.clone(),
                start_time: from_seconds(times[event.start]),
                end_time: from_seconds(times[event.end]),
                peak_time: from_seconds(times[event.peak]),
                peak_score: event.peak_score,
                peak_value: values[event.peak],
                model: version.clone(),
                scoring: scoring_id,
            }));
        }
        Ok(announced)
    }

    /// The series' fitted detector: cached, or fitted now on the history before its new readings; `None` while the
    /// history is too short to learn from.
    async fn detector_for(
        &self,
        farm_id: Uuid,
        span: &SeriesSpan,
        model: &smartfarm_store::models::StoredModel,
        version: &ModelVersion,
    ) -> Result<Option<Arc<FittedDetector>>> {
        let key: SeriesKey = (span.device_id, span.metric.clone());
        if let Some(entry) = self.detectors.fitted.lock().expect("detector cache").get(&key)
            && entry.model == *version
            && entry.fitted_at.elapsed() < self.settings.anomaly_refit
        {
            return Ok(Some(entry.detector.clone()));
        }
        if self
            .detectors
            .unfit_until
            .lock()
            .expect("unfit series")
            .get(&key)
            .is_some_and(|until| Instant::now() < *until)
        {
            return Ok(None);
        }
        let params = self.serving.detector_params(model)?;
        let start = span.first_time.checked_sub(self.settings.anomaly_history).unwrap_or(SystemTime::UNIX_EPOCH);
        let filter = ReadingFilter {
            farm_id,
            device_ids: vec![span.device_id],
            metrics: vec![span.metric.clone()],
            start,
            end: span.first_time,
        };
        // The newest readings of the history teach it (a fast sensor's two weeks hold more than it learns from).
        let (times, values) = newest_history(self.telemetry.as_ref(), &filter, MAX_HISTORY_POINTS).await?;
        let unfit = |reason: &str| {
            tracing::debug!(device_id = %span.device_id, metric = %span.metric, reason, "cannot learn this series' normal yet; trying again later");
            self.detectors.unfit_until.lock().expect("unfit series").insert(key.clone(), Instant::now() + UNFIT_RETRY);
        };
        // Too short a history is read again with the next batch (it is short); a constant one, or one the
        // detector cannot learn from, waits an hour.
        if times.len() < MIN_TRAINING_POINTS.max(params.window * 2) {
            tracing::debug!(device_id = %span.device_id, metric = %span.metric, points = times.len(), "too little history to learn normal from yet");
            return Ok(None);
        }
        if values.iter().all(|v| *v == values[0]) {
            unfit("a constant history");
            return Ok(None);
        }
        let fitted = tokio::task::spawn_blocking(move || {
            FittedDetector::fit(&times, &values, &params, &smartfarm_ml::training_device())
        })
        .await
        .map_err(|error| Error::internal("fit an anomaly detector", error))?;
        let detector = match fitted {
            Ok(detector) => detector,
            Err(error) => {
                unfit(&error.to_string());
                return Ok(None);
            }
        };
        let detector = Arc::new(detector);
        self.detectors.fitted.lock().expect("detector cache").insert(
            key.clone(),
            FittedEntry { detector: detector.clone(), model: version.clone(), fitted_at: Instant::now() },
        );
        Ok(Some(detector))
    }
}

/// The newest `keep` readings of `filter`'s range (all of them when it holds fewer), in time order, so that a fast
/// sensor's detector learns from its latest weeks, not its oldest. Readings are read forward, at most four times
/// `keep` at once, so the search is for a start from which the rest of the range holds between `keep` and four
/// times that: a start whose read comes back full is too early, one whose read holds fewer than `keep` too late.
/// Each next start is where the density just read puts it, kept strictly between the two bounds (halfway when the
/// guess falls outside), so bursts and sensors that changed pace cannot lead it astray; a few reads at most.
async fn newest_history(
    telemetry: &dyn smartfarm_store::TelemetryStore,
    filter: &ReadingFilter,
    keep: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let keep = keep.max(1);
    let limit = 4 * keep;
    let end = seconds(filter.end);
    let mut filter = filter.clone();
    // Seconds: the latest start known to be too early (its read was full), the earliest known to be too late.
    let mut too_early = seconds(filter.start);
    let mut too_late = end;
    // The newest read that reached the end of the range, while it holds fewer than `keep`.
    let mut newest_short: Option<(Vec<f64>, Vec<f64>)> = None;
    let newest = |(mut times, mut values): (Vec<f64>, Vec<f64>)| {
        let skip = times.len().saturating_sub(keep);
        times.drain(..skip);
        values.drain(..skip);
        (times, values)
    };
    for round in 0..24 {
        let (times, values) = read_series(telemetry, &filter, limit).await?;
        let start = seconds(filter.start);
        let guess = if times.len() >= limit {
            // Too early: where about twice `keep` remain at the density read.
            too_early = start;
            let per_second = times.len() as f64 / (times[times.len() - 1] - times[0]).max(1e-6);
            end - 2.0 * keep as f64 / per_second
        } else if times.len() >= keep || round == 0 {
            // Between `keep` and the limit, or the whole range holds fewer than a full read.
            return Ok(newest((times, values)));
        } else {
            // Too late: a span long enough for about twice `keep` at the density read.
            too_late = start;
            let span = (end - start) * 2.0 * keep as f64 / times.len().max(1) as f64;
            newest_short = Some((times, values));
            end - span
        };
        if too_late - too_early < 1e-3 {
            break;
        }
        let inside = guess > too_early && guess < too_late;
        let next = if inside { guess } else { (too_early + too_late) / 2.0 };
        filter.start = from_seconds(next);
    }
    // The bounds met (a burst of more than four times `keep` within a millisecond): the newest read that reached
    // the end of the range, short as it is.
    Ok(newest_short.map(newest).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use smartfarm_store::model::DeviceKind;
    use smartfarm_store::telemetry::{EdgeBatch, ReadingRow};

    use super::*;

    /// A history longer than what is read at once gives its newest readings, not its oldest.
    #[tokio::test]
    async fn the_newest_history_is_read_however_long_the_range() {
        let test = smartfarm_store::testing::TestDatabase::sqlite().await;
        let (farm_id, devices) = test.farm_with_devices(&[DeviceKind::Gateway, DeviceKind::Sensor]).await;
        let start = smartfarm_core::time::now() - Duration::from_secs(86_400);
        let readings: Vec<ReadingRow> = (0..2_000u64)
            .map(|i| ReadingRow {
                sequence: i + 1,
                device_id: devices[1],
                metric: "flow".into(),
                value: i as f64,
                measure_time: start + Duration::from_secs(i * 10),
            })
            .collect();
        let batch = EdgeBatch {
            gateway_id: devices[0],
            spool_id: Uuid::now_v7(),
            farm_id,
            first_sequence: 1,
            last_sequence: 2_000,
            readings,
            aggregates: Vec::new(),
            receive_time: smartfarm_core::time::now(),
            score_later: false,
        };
        let telemetry = test.database.telemetry();
        telemetry.commit_batch(&batch, &[]).await.unwrap();
        // Then the sensor slows down: 150 readings 100 s apart, the newest of the range.
        let slow_start = start + Duration::from_secs(20_000);
        let slow: Vec<ReadingRow> = (0..150u64)
            .map(|i| ReadingRow {
                sequence: 2_001 + i,
                device_id: devices[1],
                metric: "flow".into(),
                value: 10_000.0 + i as f64,
                measure_time: slow_start + Duration::from_secs(i * 100),
            })
            .collect();
        let later_batch = EdgeBatch { first_sequence: 2_001, last_sequence: 2_150, readings: slow, ..batch.clone() };
        telemetry.commit_batch(&later_batch, &[]).await.unwrap();
        let filter = ReadingFilter {
            farm_id,
            device_ids: vec![devices[1]],
            metrics: vec!["flow".into()],
            start,
            end: start + Duration::from_secs(20_000),
        };
        let slowed = ReadingFilter { end: slow_start + Duration::from_secs(15_000), ..filter.clone() };
        let (_, values) = newest_history(telemetry.as_ref(), &slowed, 100).await.unwrap();
        assert_eq!(values, (50..150).map(|i| 10_000.0 + i as f64).collect::<Vec<_>>(), "the newest 100, sparse ones");
        // Fewer sparse readings than asked for: the rest are the newest dense ones.
        let (_, values) = newest_history(telemetry.as_ref(), &slowed, 200).await.unwrap();
        let expected: Vec<f64> =
            (1_950..2_000).map(|i| i as f64).chain((0..150).map(|i| 10_000.0 + i as f64)).collect();
        assert_eq!(values, expected, "the newest 200: 50 dense, then every sparse one");
        // The dense readings as a burst at the start of a long range (2,000 in 20,000 s against 150 in 15,000 s is
        // no burst; with `keep` 10 the first read holds 40 readings over 390 s).
        let (_, values) = newest_history(telemetry.as_ref(), &slowed, 10).await.unwrap();
        assert_eq!(values, (140..150).map(|i| 10_000.0 + i as f64).collect::<Vec<_>>());

        // A burst: 1,000 readings a millisecond apart, then 50 an hour apart; the newest 100 straddle the two.
        let burst_start = slow_start + Duration::from_secs(20_000);
        let burst: Vec<ReadingRow> = (0..1_050u64)
            .map(|i| ReadingRow {
                sequence: 2_151 + i,
                device_id: devices[1],
                metric: "burst".into(),
                value: i as f64,
                measure_time: if i < 1_000 {
                    burst_start + Duration::from_millis(i)
                } else {
                    burst_start + Duration::from_secs(3_600 * (i - 999))
                },
            })
            .collect();
        let burst_batch = EdgeBatch { first_sequence: 2_151, last_sequence: 3_200, readings: burst, ..batch.clone() };
        telemetry.commit_batch(&burst_batch, &[]).await.unwrap();
        let bursty = ReadingFilter {
            metrics: vec!["burst".into()],
            start: burst_start,
            end: burst_start + Duration::from_secs(3_600 * 51),
            ..filter.clone()
        };
        let (_, values) = newest_history(telemetry.as_ref(), &bursty, 100).await.unwrap();
        assert_eq!(values, (950..1_050).map(|i| i as f64).collect::<Vec<_>>(), "the burst's last 50, then the rest");
        let (times, values) = newest_history(telemetry.as_ref(), &filter, 100).await.unwrap();
        assert_eq!(values, (1_900..2_000).map(|i| i as f64).collect::<Vec<_>>(), "the newest 100");
        assert!(times.windows(2).all(|pair| pair[0] < pair[1]));
        // A range that holds fewer than asked gives all of it.
        let (_, all) = newest_history(telemetry.as_ref(), &filter, 5_000).await.unwrap();
        assert_eq!(all.len(), 2_000);
    }
}
