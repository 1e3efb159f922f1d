//! The NATS JetStream backend. Events are JSON messages on one subject of one stream (file storage, a day of
//! history), each with the id of the process that published it: a publisher task writes them in order and waits for
//! JetStream's acknowledgement (retrying a few times while NATS is away), and every process follows the stream with
//! an ordered consumer from "new" on, handing the other processes' events to its local subscribers (its own reached
//! them when published). Events NATS does not take after the retries, or that find the bounded queue full, are
//! dropped, counted and logged; consumers catch up from the database.
//!
//! Jobs (see [`crate::Bus::hand_out`]) go to a second stream, `<NAME>-work`, a work queue (a job is deleted once
//! done), on a subject per kind of job. Each kind has one durable consumer that every replica taking that kind
//! pulls from: NATS gives each job to one of them, and gives it again to another if its taker says nothing for
//! [`WORK_ACK_WAIT`] (it died), at most [`WORK_MAX_DELIVER`] times in all.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;

use smartfarm_core::Error;

use crate::{Event, Job, JobKind, Work};

/// How many times a publish is tried before the event is dropped.
const PUBLISH_ATTEMPTS: u32 = 8;
/// Events waiting for NATS at most.
const QUEUE: usize = 10_000;
/// How long a taker may go without a word on a job (taken, started, done) before NATS hands it to another.
const WORK_ACK_WAIT: Duration = Duration::from_secs(600);
/// How many times a job is handed out before NATS gives up on it (a job that crashes its taker every time).
pub(crate) const WORK_MAX_DELIVER: i64 = 3;
/// The longest wait between attempts to take jobs while NATS fails.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long past its expiry a request for a job is waited on for NATS's word that it is over (as async-nats does).
const REQUEST_GRACE: Duration = Duration::from_secs(5);
/// How long a job this version cannot read waits before NATS offers it again (to a newer replica, perhaps).
const UNREADABLE_JOB_DELAY: Duration = Duration::from_secs(60);

/// Where an outgoing message goes: to every replica, or as a job to one.
pub(crate) enum Outgoing {
    Event(Event),
    Job(crate::Job),
}

/// A connected NATS bus: where to publish, and how to take work.
pub(crate) struct Connected {
    pub outbound: mpsc::Sender<Outgoing>,
    pub context: jetstream::Context,
    pub stream_name: String,
}

/// An event as it travels: with the process that published it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope {
    origin: uuid::Uuid,
    event: Event,
}

/// Splits `nats://HOST:PORT[/NAME]` into the server URL and the stream name.
fn parse(url: &str) -> Result<(String, String), Error> {
    let rest = url.strip_prefix("nats://").ok_or_else(|| {
        Error::invalid("bus_url", format!("{url:?} is not a bus url: expected nats://HOST:PORT[/NAME]"))
    })?;
    let (server, name) = match rest.split_once('/') {
        Some((server, name)) => (server, name.trim_end_matches('/')),
        None => (rest, ""),
    };
    if server.is_empty() {
        return Err(Error::invalid("bus_url", "names no NATS server: expected nats://HOST:PORT[/NAME]"));
    }
    let name = if name.is_empty() { "smartfarm" } else { name };
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') || name.len() > 64 {
        return Err(Error::invalid("bus_url", "the stream name must be 1 to 64 of A-Z, a-z, 0-9, '-', '_'"));
    }
    Ok((format!("nats://{server}"), name.to_string()))
}

/// Connects, makes sure the stream exists, starts following it into `local` and returns where to publish.
pub(crate) async fn connect(url: &str, local: broadcast::Sender<Event>) -> Result<Connected, Error> {
    let (server, name) = parse(url)?;
    let me = uuid::Uuid::now_v7();
    let client = async_nats::ConnectOptions::new()
        .name("smartfarm")
        .connection_timeout(Duration::from_secs(10))
        .connect(&server)
        .await
        .map_err(|error| Error::Unavailable(format!("cannot connect to NATS at {server}: {error}")))?;
    // Asked of the server the client is connected to now, per message: after a reconnect it may be another, with
    // another limit.
    let server_info = client.clone();
    let context = jetstream::new(client);
    let subject = format!("{name}.events");
    let stream = context
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 1 << 30,
            ..Default::default()
        })
        .await
        .map_err(|error| {
            Error::Unavailable(format!("cannot set up the JetStream stream {name} on {server}: {error}"))
        })?;
    work_stream(&context, &name).await.map_err(|error| {
        Error::Unavailable(format!("cannot set up the JetStream stream {name}-work on {server}: {error}"))
    })?;
    // Where the stream stood before this process followed it. The client rebuilds a consumer that broke (NATS
    // restarted, the link was away past the consumer's lifetime) from the last message it saw, and from the
    // stream's beginning when it saw none: a day of old events. What is at or below this mark is passed over.
    let followed_from = stream.cached_info().state.last_sequence;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: followed_from + 1 },
            filter_subject: subject.clone(),
            ..Default::default()
        })
        .await
        .map_err(|error| Error::Unavailable(format!("cannot follow the JetStream stream {name}: {error}")))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|error| Error::Unavailable(format!("cannot follow the JetStream stream {name}: {error}")))?;
    tracing::info!(%server, stream = %name, "bus on NATS JetStream");

    tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) if message.info().is_ok_and(|info| info.stream_sequence <= followed_from) => {
                    metrics::counter!("smartfarm_bus_events_replayed_total").increment(1);
                }
                Ok(message) => match serde_json::from_slice::<Envelope>(&message.payload) {
                    Ok(envelope) if envelope.origin == me => {}
                    Ok(envelope) => {
                        let _ = local.send(envelope.event);
                    }
                    Err(error) => {
                        metrics::counter!("smartfarm_bus_events_unreadable_total").increment(1);
                        tracing::warn!(%error, "an event on the bus is not one this version reads; skipped");
                    }
                },
                Err(error) => tracing::warn!(%error, "following the bus stream failed; the consumer resumes"),
            }
        }
        tracing::error!("the bus stream ended: this process no longer hears the others");
    });

    let (outbound, mut queue) = mpsc::channel::<Outgoing>(QUEUE);
    let (publisher, stream_name) = (context.clone(), name.clone());
    tokio::spawn(async move {
        while let Some(outgoing) = queue.recv().await {
            // What a dropped message is counted as: an event, or a job (whose batch or photo is then done late).
            let (subject, payload, dropped) = match outgoing {
                Outgoing::Event(event) => (
                    subject.clone(),
                    serde_json::to_vec(&Envelope { origin: me, event }),
                    "smartfarm_bus_events_dropped_total",
                ),
                Outgoing::Job(job) => (
                    job_subject(&stream_name, job.kind()),
                    serde_json::to_vec(&job),
                    "smartfarm_bus_jobs_dropped_total",
                ),
            };
            // What the server takes in one message: a larger one is refused every time, so it is not tried again.
            let max_payload = server_info.server_info().max_payload;
            let payload = match payload {
                Ok(payload) if max_payload > 0 && payload.len() > max_payload => {
                    // Retrying would hold every message behind it up for seconds, to the same end.
                    metrics::counter!(dropped).increment(1);
                    tracing::error!(
                        bytes = payload.len(),
                        max_payload,
                        %subject,
                        "a message is larger than NATS takes; dropped (consumers catch up from the database)"
                    );
                    continue;
                }
                Ok(payload) => bytes::Bytes::from(payload),
                Err(error) => {
                    tracing::error!(%error, "a message cannot be written as JSON; dropped");
                    continue;
                }
            };
            let mut wait = Duration::from_millis(50);
            let mut attempt = 1;
            // One id for all the tries: a try whose acknowledgement was lost though the server stored the message
            // is not stored again (JetStream's duplicate window), so a job is not handed out twice.
            let message_id = uuid::Uuid::now_v7().to_string();
            loop {
                let message =
                    jetstream::message::PublishMessage::build().payload(payload.clone()).message_id(&message_id);
                let published = match publisher.send_publish(subject.clone(), message).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|error| error.to_string()),
                    Err(error) => Err(error.to_string()),
                };
                match published {
                    Ok(()) => break,
                    Err(error) if attempt >= PUBLISH_ATTEMPTS => {
                        metrics::counter!(dropped).increment(1);
                        tracing::error!(%error, "cannot publish an event to NATS; dropped (consumers catch up from the database)");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, attempt, "publishing an event to NATS failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                        attempt += 1;
                    }
                }
            }
        }
    });
    Ok(Connected { outbound, context, stream_name: name })
}

/// The subject of a kind of job, in the stream named `name`.
fn job_subject(name: &str, kind: JobKind) -> String {
    format!("{name}.work.{}", kind.as_str())
}

/// Makes sure the jobs' stream of the bus named `name` exists: a work queue, so a job is deleted once done.
async fn work_stream(context: &jetstream::Context, name: &str) -> Result<stream::Stream, String> {
    context
        .get_or_create_stream(stream::Config {
            name: format!("{name}-work"),
            subjects: vec![format!("{name}.work.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(24 * 3600),
            // Jobs are small (a batch's series, a photo's id): this holds hundreds of thousands.
            max_bytes: 256 << 20,
            ..Default::default()
        })
        .await
        .map_err(|error| error.to_string())
}

/// Deletes the events stream `name` and its work stream (what is missing already is not an error).
pub(crate) async fn remove_streams(context: &jetstream::Context, name: &str) -> Result<(), Error> {
    for stream in [name.to_string(), format!("{name}-work")] {
        match context.delete_stream(&stream).await {
            Ok(_) => {}
            // A stream already gone is what was asked for.
            Err(error)
                if matches!(error.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(refused)
                    if refused.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
            Err(error) => {
                return Err(Error::Unavailable(format!("cannot delete the JetStream stream {stream}: {error}")));
            }
        }
    }
    Ok(())
}

/// Takes the jobs of one kind from their durable consumer, which every replica taking that kind shares, one job
/// at a time when asked; sets the stream and the consumer up again when NATS lost them or was away.
pub(crate) struct Taker {
    context: jetstream::Context,
    name: String,
    kind: JobKind,
    consumer: Option<jetstream::consumer::PullConsumer>,
    /// The request for a job not yet answered: kept when a call is cut short, so that a job NATS sends it is read
    /// later instead of lost to a closed inbox (where it would wait for [`WORK_ACK_WAIT`]).
    open_request: Option<OpenRequest>,
    /// After a failure, no pull before this (the wait doubles per failure in a row, up to 30 s).
    retry_at: Option<(tokio::time::Instant, Duration)>,
}

impl Taker {
    pub(crate) fn new(context: jetstream::Context, name: String, kind: JobKind) -> Taker {
        Taker { context, name, kind, consumer: None, open_request: None, retry_at: None }
    }

    /// Notes a failure: the consumer is set up again, after a wait that grows while failures go on.
    fn failed(&mut self, error: &str) {
        let backoff = self.retry_at.map_or(Duration::from_secs(1), |(_, backoff)| (backoff * 2).min(MAX_BACKOFF));
        tracing::warn!(%error, stream = %self.name, kind = self.kind.as_str(), ?backoff, "cannot take jobs from NATS");
        self.consumer = None;
        self.retry_at = Some((tokio::time::Instant::now() + backoff, backoff));
    }

    async fn consumer(&mut self) -> Result<jetstream::consumer::PullConsumer, String> {
        if let Some(consumer) = &self.consumer {
            return Ok(consumer.clone());
        }
        let consumer_name = format!("jobs-{}", self.kind.as_str());
        let consumer = work_stream(&self.context, &self.name)
            .await?
            .get_or_create_consumer(
                &consumer_name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(consumer_name.clone()),
                    filter_subject: job_subject(&self.name, self.kind),
                    // Jobs handed out before any replica took their kind wait for the first that does.
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: WORK_ACK_WAIT,
                    max_deliver: WORK_MAX_DELIVER,
                    ..Default::default()
                },
            )
            .await
            .map_err(|error| error.to_string())?;
        self.consumer = Some(consumer.clone());
        Ok(consumer)
    }

    /// One job if NATS has one within `wait` (a request for a single job, asked only now). Cancel-safe: a call
    /// cut short leaves its request open, and the next call (or [`Taker::arrived`], or [`Taker::close`]) reads its
    /// answer (the request expires after `wait`).
    pub(crate) async fn next_within(&mut self, wait: Duration) -> Option<Work> {
        if self.open_request.is_none() {
            // NATS counts zero as "never expires".
            let wait = wait.max(Duration::from_millis(100));
            // While NATS is away, or after a failure, no request at all: requests queued now would go out together
            // on reconnecting, and a job sent to one given up on meanwhile would wait ten minutes.
            let connected = self.context.client().connection_state() == async_nats::connection::State::Connected;
            if !connected || self.retry_at.is_some_and(|(at, _)| tokio::time::Instant::now() < at) {
                tokio::time::sleep(wait).await;
                return None;
            }
            match self.request(wait).await {
                Ok(request) => self.open_request = Some(request),
                Err(error) => {
                    self.failed(&error);
                    return None;
                }
            }
        }
        // NATS ends the request at its expiry (a 408); some time more for that word to come (a job NATS sends after
        // the inbox is gone would wait ten minutes).
        let deadline = self.open_request.as_ref()?.expires + REQUEST_GRACE;
        self.answer(Some(deadline)).await
    }

    /// Asks NATS for one job within `wait`, on an inbox of this taker's own (read only by it, whenever it comes
    /// back for the answer). Each step is all or nothing when cut short: the inbox is subscribed before the
    /// request goes out, and the request is queued whole or not at all.
    async fn request(&mut self, wait: Duration) -> Result<OpenRequest, String> {
        let consumer = self.consumer().await?;
        let client = self.context.client();
        let subject = client.new_inbox();
        let inbox = client.subscribe(subject.clone()).await.map_err(|error| error.to_string())?;
        let one_job = jetstream::consumer::pull::BatchConfig { batch: 1, expires: Some(wait), ..Default::default() };
        consumer.request_batch(one_job, subject.into()).await.map_err(|error| error.to_string())?;
        Ok(OpenRequest { inbox, expires: tokio::time::Instant::now() + wait })
    }

    /// The job that already came on the open request, if one did; never waits, never asks.
    pub(crate) async fn arrived(&mut self) -> Option<Work> {
        self.answer(None).await
    }

    /// Waits for the open request's end (its expiry, and a second for NATS's word on it: shorter than
    /// [`REQUEST_GRACE`], as the process is stopping) and returns the job that came on it, if one did.
    pub(crate) async fn close(&mut self) -> Option<Work> {
        let deadline = self.open_request.as_ref()?.expires + Duration::from_secs(1);
        self.answer(Some(deadline)).await
    }

    /// The open request's answer: waiting for it until `deadline`, or only reading what is already there (`None`).
    /// What came is read even past the deadline. A job, or the request's end, closes the request.
    async fn answer(&mut self, deadline: Option<tokio::time::Instant>) -> Option<Work> {
        loop {
            let request = self.open_request.as_mut()?;
            let message = match deadline {
                // No word from NATS by the deadline: the request is taken for over.
                Some(deadline) => tokio::time::timeout_at(deadline, request.inbox.next()).await.ok().flatten(),
                None => {
                    let ready = std::future::poll_fn(|context| {
                        std::task::Poll::Ready(tokio_stream::Stream::poll_next(
                            std::pin::Pin::new(&mut request.inbox),
                            context,
                        ))
                    })
                    .await;
                    match ready {
                        std::task::Poll::Ready(message) => message,
                        std::task::Poll::Pending => return None,
                    }
                }
            };
            let Some(message) = message else {
                // Over without a word, or the connection's inbox closed.
                self.open_request = None;
                return None;
            };
            match message.status {
                None | Some(async_nats::StatusCode::OK) => {
                    self.open_request = None;
                    self.retry_at = None;
                    let message = jetstream::Message { context: self.context.clone(), message };
                    return self.job_from(message).await;
                }
                Some(async_nats::StatusCode::IDLE_HEARTBEAT) => continue,
                // Expired with no job for it.
                Some(async_nats::StatusCode::TIMEOUT | async_nats::StatusCode::NOT_FOUND) => {
                    self.open_request = None;
                    self.retry_at = None;
                    return None;
                }
                Some(status) => {
                    self.open_request = None;
                    let description = message.description.unwrap_or_default();
                    self.failed(&format!("NATS ended a request for a job: {status} {description}"));
                    return None;
                }
            }
        }
    }

    /// The job a message carries; one this version cannot read goes back to NATS for a newer replica.
    async fn job_from(&self, message: jetstream::Message) -> Option<Work> {
        match serde_json::from_slice::<Job>(&message.payload) {
            Ok(job) if job.kind() == self.kind => Some(Work { job, message: Some(message) }),
            Ok(_) | Err(_) => {
                metrics::counter!("smartfarm_bus_events_unreadable_total").increment(1);
                tracing::warn!(kind = self.kind.as_str(), "a job is not one this version reads; offered again later");
                let _ = message.ack_with(jetstream::AckKind::Nak(Some(UNREADABLE_JOB_DELAY))).await;
                None
            }
        }
    }
}

/// A request for one job, open in NATS: the inbox its answer comes to, and when NATS lets it expire.
pub(crate) struct OpenRequest {
    inbox: async_nats::Subscriber,
    expires: tokio::time::Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_urls_name_a_server_and_a_stream() {
        assert_eq!(parse("nats://127.0.0.1:4222").unwrap(), ("nats://127.0.0.1:4222".into(), "smartfarm".into()));
        assert_eq!(parse("nats://nats:4222/farm-a/").unwrap(), ("nats://nats:4222".into(), "farm-a".into()));
        assert!(parse("redis://127.0.0.1").unwrap_err().to_string().starts_with("bus_url:"));
        assert!(parse("nats:///x").is_err());
        assert!(parse("nats://h:1/a.b").is_err());
    }
}
