//! smartfarm-bus owns the events one role tells the others ("a photo was stored", so the inference role diagnoses
//! it; "readings were committed", so it scores them; "an alert changed", for live streams, webhooks and the farm's
//! link; "a command was queued", for whichever process holds the farm's link): their types and their delivery. The
//! in-process bus is the default and what one process needs; with `nats://…` events go through a NATS JetStream
//! stream that every replica follows, so replicas hear each other. Either way delivery to a subscriber is best
//! effort: one that falls behind by more than [`CAPACITY`] events is told how many it missed, and the database stays
//! the record of what happened (every consumer can catch up from it; the bus only says that something moved).
//! Jobs are the other kind of message: handed out ([`Bus::hand_out`]) to one of the processes that take jobs of
//! their kind ([`Bus::take_work`]), so that a job is done once however many replicas could do it (at least once:
//! with NATS, a job whose taker dies is handed to another).

#![forbid(unsafe_code)]

mod nats;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use smartfarm_core::batch::BatchKey;
use smartfarm_core::rules::{Alert, AlertEventKind};

/// Events a subscriber may fall behind by before it misses some.
pub const CAPACITY: usize = 4096;

/// Something one role tells the others.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A new photo was stored (not a duplicate).
    ImageStored(ImageStored),
    /// An edge batch's readings were committed (not a duplicate).
    ReadingsCommitted(ReadingsCommitted),
    /// A model diagnosed a disease on a photo with at least the configured confidence.
    DiseaseDetected(Diagnosis),
    /// A model found a photo healthy with at least the configured confidence: the camera's disease alerts clear.
    HealthyDiagnosed(Diagnosis),
    /// The anomaly detector found an anomalous stretch in a device's metric.
    AnomalyDetected(AnomalyDetected),
    /// A listed batch was scored, every stretch found in it announced (published after them), or its scoring
    /// failed after announcing some (`all_scored` false); sent when it found any stretch. The alert role
    /// takes the batch off the list of batches to score once it has recorded them all, so a stretch whose alert
    /// was not recorded (lost on the way, a replica that died, a database error) is announced again when the batch
    /// is scored late.
    BatchScored(BatchScored),
    /// An alert was recorded: opened, changed, acknowledged or resolved (live streams, webhooks and the farm's edge
    /// link pass it on).
    AlertChanged(AlertChanged),
    /// A farm's rules changed: its edge link pushes the new snapshot.
    RulesChanged { farm_id: Uuid },
    /// A command was queued: whichever process holds the farm's edge link sends it down.
    CommandQueued { farm_id: Uuid, command_id: Uuid },
    /// A command's status changed (watchers read it again).
    CommandChanged { farm_id: Uuid, command_id: Uuid },
}

/// An alert event, as the alert log recorded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AlertChanged {
    /// The event's position in the alert log (the streams' resume cursor).
    pub sequence: u64,
    pub kind: AlertEventKind,
    /// The alert right after the event.
    pub alert: Alert,
    /// Whether a person made the change (acknowledged or resolved it by hand), rather than an evaluator.
    #[serde(default)]
    pub by_hand: bool,
}

/// The series an edge batch added readings to, so the inference role can score them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadingsCommitted {
    pub farm_id: Uuid,
    /// Each device's metric the batch touched, with the first and last measurement time it added.
    pub series: Vec<SeriesSpan>,
    /// The process that committed the batch scores it itself (it runs the inference role). Otherwise the batch is
    /// also handed out as work ([`Bus::hand_out`]), to one of the processes that run the role. Either way the
    /// announcement is scored nowhere else.
    #[serde(default)]
    pub scored_where_committed: bool,
    /// The batch was handed out as a job (`Job::Score`). False in announcements from versions that did not hand
    /// batches out: when `scored_where_committed` is false too, every replica that runs the role scores it, as
    /// those versions did.
    #[serde(default)]
    pub handed_out: bool,
    /// True in the process that published the event, false where it arrived through NATS (it does not travel).
    #[serde(skip)]
    pub published_here: bool,
    /// The batch as listed among those still to score: the scorer confirms it there once scored. `None` when the
    /// commit did not list it (nothing scores, or a version that did not list batches).
    #[serde(default)]
    pub batch: Option<BatchKey>,
}

/// A device's metric and a time span of new readings in it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeriesSpan {
    pub device_id: Uuid,
    pub metric: String,
    pub first_time: SystemTime,
    pub last_time: SystemTime,
    /// The span's readings (measurement time as stored, value), in time order and one per instant (the lowest
    /// sequence number's), when the event was published in this process: a subscriber here need not read them back
    /// from the database. They do not travel through NATS (`None` there) and a subscriber may drop them to bound its
    /// memory.
    #[serde(skip)]
    pub readings: Option<SpanReadings>,
}

/// A span's readings, shared by every subscriber of the event; its `Debug` shows only how many there are.
#[derive(Clone, PartialEq)]
pub struct SpanReadings(pub Arc<[(SystemTime, f64)]>);

impl std::fmt::Debug for SpanReadings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{} readings", self.0.len())
    }
}

/// A model's name and version, as results carry them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub name: String,
    pub version: String,
}

/// A photo's diagnosis (a disease, or a healthy class): the evidence is the photo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub farm_id: Uuid,
    /// The camera.
    pub device_id: Uuid,
    pub image_id: Uuid,
    pub label: String,
    pub confidence: f64,
    pub model: ModelVersion,
    pub capture_time: SystemTime,
}

/// An anomalous stretch of a device's metric: the evidence is the series window and its peak.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnomalyDetected {
    pub farm_id: Uuid,
    pub device_id: Uuid,
    pub metric: String,
    pub start_time: SystemTime,
    pub end_time: SystemTime,
    pub peak_time: SystemTime,
    pub peak_score: f64,
    pub peak_value: f64,
    pub model: ModelVersion,
    /// The scoring of a listed batch that found it (see [`Event::BatchScored`]); `None` for a batch not listed, and
    /// from versions that did not say.
    #[serde(default)]
    pub scoring: Option<Uuid>,
}

/// The end of a listed batch's scoring that found anomalous stretches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchScored {
    pub batch: BatchKey,
    /// The scoring (its stretches carry the same id).
    pub scoring: Uuid,
    /// How many stretches it announced.
    pub stretches: u32,
    /// Every series of the batch was scored. When one failed the batch stays listed (the alert role does not
    /// confirm it) and is scored again late.
    pub all_scored: bool,
}

/// A photo newly stored, with what a consumer needs to fetch and diagnose it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageStored {
    /// The photo was handed out as a job (`Job::Diagnose`) too. False in announcements from versions that did not
    /// hand photos out: every replica that runs the inference role diagnoses those, as those versions did.
    #[serde(default)]
    pub handed_out: bool,
    pub image_id: Uuid,
    pub farm_id: Uuid,
    pub device_id: Uuid,
    pub sha256: String,
    pub content_type: String,
    pub capture_time: SystemTime,
}

/// A job for one of the replicas that run a role, handed out with [`Bus::hand_out`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Job {
    /// Diagnose a new photo (the inference role).
    Diagnose(ImageStored),
    /// Score a committed batch's readings for anomalies (the inference role).
    Score(ReadingsCommitted),
}

/// The kinds of job: each has its own queue, so a process takes only the jobs it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    Diagnose,
    Score,
}

impl Job {
    pub fn kind(&self) -> JobKind {
        match self {
            Job::Diagnose(_) => JobKind::Diagnose,
            Job::Score(_) => JobKind::Score,
        }
    }
}

impl JobKind {
    /// The name of its queue.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Diagnose => "diagnose",
            JobKind::Score => "score",
        }
    }
}

/// A job taken from the bus (see [`JobTaker`]): do it, then say it is done ([`Work::done`]) or that it should be
/// tried again later ([`Work::retry_later`]). Dropped without either while the process runs, it is offered again
/// at once.
pub struct Work {
    job: Job,
    /// With NATS: the message to answer (until then NATS hands the job to another replica after ten minutes).
    message: Option<async_nats::jetstream::Message>,
}

impl Work {
    /// What is to be done.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Says the job is done; with NATS, once the server confirms it, the job is not handed out again.
    pub async fn done(mut self) {
        if let Some(message) = self.message.take()
            && let Err(error) = message.double_ack().await
        {
            tracing::warn!(%error, "NATS did not confirm a job as done; it may be handed out again");
        }
    }

    /// Says the job failed for now: with NATS it is offered again after `delay`, three tries in all, after which
    /// it is given up (and logged); without NATS it is dropped.
    pub async fn retry_later(mut self, delay: Duration) {
        let Some(message) = self.message.take() else { return };
        if let Err(error) = answer_undone(&message, &self.job, Some(delay), "it failed").await {
            tracing::warn!(%error, "cannot answer NATS for a failed job; it is offered again in ten minutes");
        }
    }

    /// Gives the job back undone (this process is stopping): with NATS it is offered to another replica at once.
    /// The answer is flushed before this returns, so it gets out before the runtime stops. It counts as a try, so
    /// a job handed back on its third is given up (and logged).
    pub async fn hand_back(mut self) {
        let Some(message) = self.message.take() else { return };
        let answered = match answer_undone(&message, &self.job, None, "its replicas stopped").await {
            Ok(()) => message.context.client().flush().await.map_err(|error| error.to_string()),
            Err(error) => Err(error),
        };
        if let Err(error) = answered {
            tracing::warn!(%error, "cannot hand a job back to NATS; it is offered again in ten minutes");
        }
    }
}

/// Answers NATS for a job not done: offered again after `delay` (at once for `None`), or, when this was its last
/// try, given up, counted and logged with `why` it was not done.
async fn answer_undone(
    message: &async_nats::jetstream::Message,
    job: &Job,
    delay: Option<Duration>,
    why: &str,
) -> Result<(), String> {
    let tries = message.info().map_or(0, |info| info.delivered);
    let answer = if tries >= nats::WORK_MAX_DELIVER {
        metrics::counter!("smartfarm_bus_jobs_given_up_total").increment(1);
        tracing::error!(?job, tries, why, "a job was not done in any of its tries; given up");
        async_nats::jetstream::AckKind::Term
    } else {
        async_nats::jetstream::AckKind::Nak(delay)
    };
    message.ack_with(answer).await.map_err(|error| error.to_string())
}

impl Drop for Work {
    fn drop(&mut self) {
        // Neither done nor handed back: offer it again now rather than in ten minutes, or, when its worker
        // panicked on it, in a minute (a job that crashes every replica should not go round them at once). When
        // the process is stopping, the answer may not get out: the job then waits for NATS's ten minutes.
        if let Some(message) = self.message.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let delay = std::thread::panicking().then_some(Duration::from_secs(60));
            runtime.spawn(async move {
                let _ = message.ack_with(async_nats::jetstream::AckKind::Nak(delay)).await;
            });
        }
    }
}

impl std::fmt::Debug for Work {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Work").field("job", &self.job).finish_non_exhaustive()
    }
}

/// Jobs waiting for a taker in one process, at most.
const WORK_QUEUE: usize = 1024;

/// Where a process takes the jobs of one kind from ([`Bus::take_work`]).
pub struct JobTaker {
    kind: JobKind,
    source: JobSource,
}

enum JobSource {
    /// This process's jobs (the in-process bus).
    Local(broadcast::Receiver<Job>),
    /// The kind's durable consumer on NATS (boxed: a consumer's handle is large).
    Nats(Box<nats::Taker>),
}

impl JobTaker {
    /// The next job, if one comes within `wait`. With NATS the job is asked for only now, one at a time, so jobs
    /// wait in NATS, where any replica may take them, until this one is free. Cancel-safe: with NATS a call cut
    /// short leaves its request open until `wait` has passed, and a job that answers it is returned by the next
    /// call (so a worker that leaves the wait for other work holds one job at most, until it asks again).
    pub async fn next_within(&mut self, wait: Duration) -> Option<Work> {
        match &mut self.source {
            JobSource::Nats(taker) => taker.next_within(wait).await,
            JobSource::Local(jobs) => {
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    match tokio::time::timeout_at(deadline, jobs.recv()).await {
                        Err(_) => return None,
                        Ok(Err(broadcast::error::RecvError::Closed)) => {
                            tokio::time::sleep_until(deadline).await;
                            return None;
                        }
                        Ok(Ok(job)) if job.kind() == self.kind => return Some(Work { job, message: None }),
                        Ok(Ok(_)) => {}
                        Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                            metrics::counter!("smartfarm_bus_jobs_dropped_total").increment(missed);
                            tracing::warn!(missed, "jobs were handed out faster than they were taken; some dropped");
                        }
                    }
                }
            }
        }
    }

    /// A job NATS already sent to this taker's open request (one a cut-short wait left open), without waiting or
    /// asking for one: take it before other work, rather than hold it while NATS's clock runs.
    pub async fn arrived(&mut self) -> Option<Work> {
        match &mut self.source {
            JobSource::Nats(taker) => taker.arrived().await,
            // In-process jobs wait in the queue, where nothing holds them from anyone.
            JobSource::Local(_) => None,
        }
    }

    /// Ends taking (this process is about to stop, or stopping): waits for the end of the request a cut-short wait
    /// left open (at most the wait it was asked with, and a second), and hands back a job that comes on it, so
    /// none waits ten minutes.
    pub async fn close(&mut self) {
        if let JobSource::Nats(taker) = &mut self.source
            && let Some(work) = taker.close().await
        {
            work.hand_back().await;
        }
    }
}

/// The bus: cheap to clone, every clone publishes to the same subscribers.
#[derive(Clone)]
pub struct Bus {
    /// This process's subscribers.
    sender: broadcast::Sender<Event>,
    /// Without NATS: jobs handed out in this process, for its takers.
    local_work: broadcast::Sender<Job>,
    /// With NATS: where published events and work go, and where work is taken from.
    nats: Option<Arc<nats::Connected>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Bus").field("nats", &self.nats.as_ref().map(|nats| &nats.stream_name)).finish()
    }
}

impl Default for Bus {
    fn default() -> Self {
        Bus::in_process()
    }
}

impl Bus {
    /// A bus within this process.
    pub fn in_process() -> Bus {
        Bus { sender: broadcast::channel(CAPACITY).0, local_work: broadcast::channel(WORK_QUEUE).0, nats: None }
    }

    /// A bus through NATS JetStream at `url` (`nats://HOST:PORT[/NAME]`): events published here reach the
    /// subscribers of every process connected with the same URL.
    pub async fn connect(url: &str) -> Result<Bus, smartfarm_core::Error> {
        let sender = broadcast::channel(CAPACITY).0;
        let connected = nats::connect(url, sender.clone()).await?;
        Ok(Bus { sender, local_work: broadcast::channel(1).0, nats: Some(Arc::new(connected)) })
    }

    /// Publishes an event to every current subscriber (of every replica, with NATS); returns how many subscribers
    /// this process has.
    pub fn publish(&self, event: Event) -> usize {
        if let Some(nats) = &self.nats
            && nats.outbound.try_send(nats::Outgoing::Event(event.clone())).is_err()
        {
            // NATS has been away long enough for the queue to fill: the other replicas catch up from the database.
            metrics::counter!("smartfarm_bus_events_dropped_total").increment(1);
        }
        // This process's subscribers hear it at once, not after a round trip through NATS.
        let receivers = self.sender.send(event).unwrap_or(0);
        tracing::debug!(receivers, "event published");
        receivers
    }

    /// Receives every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    /// Hands `job` out: one of the processes that take its kind of job gets it (with NATS, one of the replicas';
    /// without, this process, whose takers all see it: a process has one taker of each kind). With NATS a job
    /// handed out while no replica takes its kind waits (a day at most) for the first one that does; without, it
    /// is dropped.
    pub fn hand_out(&self, job: Job) {
        match &self.nats {
            Some(nats) => {
                if nats.outbound.try_send(nats::Outgoing::Job(job)).is_err() {
                    metrics::counter!("smartfarm_bus_jobs_dropped_total").increment(1);
                    tracing::warn!("NATS has been away too long: a job handed out was dropped");
                }
            }
            None => {
                if self.local_work.send(job).is_err() {
                    // One process, and it takes no jobs (it does not run the role that would): nobody can do it.
                    tracing::debug!("a job handed out with no taker in this process");
                }
            }
        }
    }

    /// Deletes this bus's NATS streams, with the events and jobs they hold: for an installation taken down for
    /// good, and for tests, whose streams would otherwise go on reserving their room in NATS (a gigabyte and a
    /// quarter each). Without NATS there is nothing to delete.
    pub async fn remove_streams(&self) -> Result<(), smartfarm_core::Error> {
        match &self.nats {
            Some(nats) => nats::remove_streams(&nats.context, &nats.stream_name).await,
            None => Ok(()),
        }
    }

    /// Takes the jobs of `kind`: those handed out from now on, and with NATS those waiting there.
    pub fn take_work(&self, kind: JobKind) -> JobTaker {
        let source = match &self.nats {
            Some(nats) => {
                JobSource::Nats(Box::new(nats::Taker::new(nats.context.clone(), nats.stream_name.clone(), kind)))
            }
            None => JobSource::Local(self.local_work.subscribe()),
        };
        JobTaker { kind, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_receive_what_is_published_after_they_subscribe() {
        let bus = Bus::in_process();
        let event = Event::ImageStored(ImageStored {
            handed_out: true,
            image_id: Uuid::now_v7(),
            farm_id: Uuid::now_v7(),
            device_id: Uuid::now_v7(),
            sha256: "ab".repeat(32),
            content_type: "image/jpeg".into(),
            capture_time: SystemTime::now(),
        });
        assert_eq!(bus.publish(event.clone()), 0, "nobody listens yet");
        let mut first = bus.subscribe();
        let mut second = bus.clone().subscribe();
        assert_eq!(bus.publish(event.clone()), 2);
        assert_eq!(first.recv().await.unwrap(), event);
        assert_eq!(second.recv().await.unwrap(), event);
    }

    #[tokio::test]
    async fn jobs_go_to_a_taker_of_their_kind_in_the_process_and_are_dropped_without_one() {
        let bus = Bus::in_process();
        let job = |n: u128| {
            Job::Score(ReadingsCommitted {
                farm_id: Uuid::from_u128(n),
                series: Vec::new(),
                scored_where_committed: false,
                handed_out: true,
                published_here: true,
                batch: None,
            })
        };
        bus.hand_out(job(1));
        let mut scoring = bus.take_work(JobKind::Score);
        let mut diagnosing = bus.take_work(JobKind::Diagnose);
        bus.hand_out(job(2));
        let work = scoring.next_within(Duration::from_secs(5)).await.expect("the job handed out after taking");
        assert_eq!(work.job(), &job(2), "what was handed out before anyone took jobs is gone");
        work.done().await;
        assert!(scoring.next_within(Duration::from_millis(100)).await.is_none(), "and nothing else came");
        assert!(
            diagnosing.next_within(Duration::from_millis(100)).await.is_none(),
            "a job of another kind goes to its own takers only"
        );
    }
}
