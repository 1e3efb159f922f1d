//! `AlertService.Subscribe`: a live stream of alert events that resumes from a cursor without gaps. The alert event
//! log is the record and its sequence number is the cursor: a stream first catches up from the log after the
//! cursor, then follows the bus. An event that arrives in order goes out at once; a gap (an event written by another
//! process, a bus that lagged) is filled from the log; and the log is read a second after the last event in order
//! anyway, so nothing committed waits much longer than that even if a bus message is lost. A cursor older than what
//! retention kept is refused (`FAILED_PRECONDITION`) rather than resumed with a silent gap, and a stream that retention
//! overtakes while it reads ends the same way. A stream that sent nothing for `alerts.stream_heartbeat` sends a
//! heartbeat with its cursor, so that a client filtered to a quiet farm holds a recent cursor, one that retention does
//! not overtake. A stream whose API key is revoked ends (`UNAUTHENTICATED`) within seconds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uuid::Uuid;

use smartfarm_bus::{Bus, Event};
use smartfarm_core::principal::STREAM_CREDENTIAL_RECHECK;
use smartfarm_core::rules::{AlertEventKind, Severity};
use smartfarm_core::{Error, Result};
use smartfarm_proto::alert::v1 as pb;
use smartfarm_store::AlertStore;
use smartfarm_store::alerts::AlertEvent;

/// What `Subscribe` returns.
pub type Stream = ReceiverStream<Result<pb::SubscribeResponse, Status>>;

/// Events read from the log at once while catching up.
const CATCH_UP_PAGE: usize = 500;
/// How long after the last event in order the log is read, even without news on the bus.
const POLL: Duration = Duration::from_secs(1);

/// The API key a stream was opened with, to look up again.
pub(crate) struct OpenedWith {
    pub registry: Arc<dyn smartfarm_store::RegistryStore>,
    pub api_key_id: Uuid,
}

impl OpenedWith {
    /// `Unauthenticated` once the key is revoked or gone.
    async fn still_valid(&self) -> Result<()> {
        self.registry.api_key_in_force(self.api_key_id).await
    }
}

struct Follower {
    alerts: Arc<dyn AlertStore>,
    opened_with: OpenedWith,
    farm_id: Option<Uuid>,
    min_severity: Severity,
    /// The last event sent (or passed over).
    last: u64,
    /// A heartbeat goes out after this long without a message.
    heartbeat: Duration,
    /// When the last message went out (or the stream opened).
    last_message: tokio::time::Instant,
    sender: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
}

/// Opens a stream of the events after `cursor` (after the newest event when `None`).
pub(crate) async fn open(
    alerts: Arc<dyn AlertStore>,
    opened_with: OpenedWith,
    bus: &Bus,
    farm_id: Option<Uuid>,
    min_severity: Severity,
    cursor: Option<u64>,
    heartbeat: Duration,
) -> Result<Stream> {
    // Listening starts before the starting point is read, so no event falls between the two.
    let changes = bus.subscribe();
    let newest = alerts.last_alert_event().await?;
    let last = match cursor {
        Some(cursor) if cursor > newest => {
            return Err(Error::invalid("cursor", "is ahead of the alert log: not a cursor of this server"));
        }
        Some(cursor) => {
            let horizon = alerts.alert_event_horizon().await?;
            if cursor < horizon {
                return Err(Error::FailedPrecondition(format!(
                    "cursor {cursor} is older than the alert events kept: retention (alerts.retention) deleted the \
                     events up to {horizon}; read the current alerts with ListAlerts, then subscribe without a cursor"
                )));
            }
            cursor
        }
        None => newest,
    };
    let (sender, receiver) = mpsc::channel(256);
    let follower = Follower {
        alerts,
        opened_with,
        farm_id,
        min_severity,
        last,
        heartbeat,
        last_message: tokio::time::Instant::now(),
        sender,
    };
    tokio::spawn(follower.run(changes));
    Ok(ReceiverStream::new(receiver))
}

pub(crate) fn event_type(kind: AlertEventKind) -> pb::AlertEventType {
    match kind {
        AlertEventKind::Opened => pb::AlertEventType::Opened,
        AlertEventKind::Updated => pb::AlertEventType::Updated,
        AlertEventKind::Acknowledged => pb::AlertEventType::Acknowledged,
        AlertEventKind::Resolved => pb::AlertEventType::Resolved,
    }
}

impl Follower {
    async fn run(mut self, mut changes: broadcast::Receiver<Event>) {
        metrics::gauge!("smartfarm_alert_subscribers").increment(1.0);
        if let Err(error) = self.follow(&mut changes).await {
            tracing::warn!(%error, "alert stream ended");
            let _ = self.sender.send(Err(Status::from(error))).await;
        }
        metrics::gauge!("smartfarm_alert_subscribers").decrement(1.0);
    }

    async fn follow(&mut self, changes: &mut broadcast::Receiver<Event>) -> Result<()> {
        if !self.catch_up().await? {
            return Ok(());
        }
        let mut poll = tokio::time::interval(POLL);
        // The call that opened the stream was checked just now.
        let mut recheck = tokio::time::interval_at(
            tokio::time::Instant::now() + STREAM_CREDENTIAL_RECHECK,
            STREAM_CREDENTIAL_RECHECK,
        );
        loop {
            let open = tokio::select! {
                _ = self.sender.closed() => return Ok(()),
                _ = recheck.tick() => {
                    self.opened_with.still_valid().await?;
                    true
                }
                change = changes.recv() => match change {
                    Ok(Event::AlertChanged(changed)) if changed.sequence <= self.last => true,
                    Ok(Event::AlertChanged(changed)) if changed.sequence == self.last + 1 => {
                        // The bus is keeping up: the log is read a second after its last news, not while events
                        // arrive (a read in flight would hold them up).
                        poll.reset();
                        let event = AlertEvent { sequence: changed.sequence, kind: changed.kind, alert: changed.alert };
                        self.send(event).await
                    }
                    Ok(Event::AlertChanged(_)) => {
                        metrics::counter!("smartfarm_alert_stream_log_reads_total", "reason" => "gap").increment(1);
                        self.catch_up().await?
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        metrics::counter!("smartfarm_alert_stream_log_reads_total", "reason" => "lagged").increment(1);
                        self.catch_up().await?
                    }
                    Ok(_) => true,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = poll.tick() => {
                    metrics::counter!("smartfarm_alert_stream_log_reads_total", "reason" => "poll").increment(1);
                    self.catch_up().await?
                }
                _ = tokio::time::sleep_until(self.last_message + self.heartbeat) => self.send_heartbeat().await,
            };
            if !open {
                return Ok(());
            }
        }
    }

    /// Sends what the log holds after the last event sent; `false` when the client went away. The cursor then moves
    /// to the end of the log as it was before the read (events commit in sequence order, so every event up to there
    /// was in the read), so a stream filtered to one farm is not sent back to the log by every other farm's event.
    ///
    /// Retention may delete events after the cursor between the check when the stream opened and a read (a stream
    /// resumed from just above the horizon, or one that fell more than the retention behind). The horizon is read
    /// again after each page that starts behind the newest event, and the stream ends with `FAILED_PRECONDITION`
    /// rather than go on past a gap. The horizon moves in the same transaction as the deletion, so a read that
    /// missed deleted events is always followed by a horizon past its starting point. A stream at the newest event
    /// (the idle one, polling) has nothing to fear: retention never deletes the newest event. A full page that
    /// takes the stream past the newest event there was at the start (events kept coming) has the newest read
    /// again, so the pages after it are checked too.
    async fn catch_up(&mut self) -> Result<bool> {
        let mut end = self.alerts.last_alert_event().await?;
        loop {
            let from = self.last;
            let events = self.alerts.alert_events_after(from, self.farm_id, self.min_severity, CATCH_UP_PAGE).await?;
            let horizon = if from < end { self.alerts.alert_event_horizon().await? } else { 0 };
            if horizon > from {
                return Err(Error::FailedPrecondition(format!(
                    "retention (alerts.retention) deleted the events up to {horizon} while this stream was reading \
                     after {from}: read the current alerts with ListAlerts, then subscribe without a cursor"
                )));
            }
            let full = events.len() == CATCH_UP_PAGE;
            for event in events {
                if !self.send(event).await {
                    return Ok(false);
                }
            }
            if !full {
                self.last = self.last.max(end);
                return Ok(true);
            }
            if self.last >= end {
                end = self.alerts.last_alert_event().await?;
            }
        }
    }

    /// Sends one event if the stream's filters take it, and moves the cursor past it; `false` when the client went
    /// away.
    async fn send(&mut self, event: AlertEvent) -> bool {
        self.last = self.last.max(event.sequence);
        let wanted =
            self.farm_id.is_none_or(|farm| farm == event.alert.farm_id) && event.alert.severity >= self.min_severity;
        if !wanted {
            return true;
        }
        let response = pb::SubscribeResponse {
            cursor: event.sequence.to_string(),
            event_type: event_type(event.kind) as i32,
            alert: Some(event.alert.to_proto()),
        };
        self.last_message = tokio::time::Instant::now();
        self.sender.send(Ok(response)).await.is_ok()
    }

    /// Tells the client where the stream stands: every event up to `last` was sent or left out by the filters (a
    /// catch-up moves `last` only past events it read). `false` when the client went away.
    async fn send_heartbeat(&mut self) -> bool {
        let response = pb::SubscribeResponse {
            cursor: self.last.to_string(),
            event_type: pb::AlertEventType::Heartbeat as i32,
            alert: None,
        };
        self.last_message = tokio::time::Instant::now();
        metrics::counter!("smartfarm_alert_stream_heartbeats_total").increment(1);
        self.sender.send(Ok(response)).await.is_ok()
    }
}
