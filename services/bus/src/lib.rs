//! smartfarm-bus owns the events one role tells the others ("a photo was stored", so the inference role diagnoses
//! it; "readings were committed", so it scores them; "an alert changed", for live streams, webhooks and the farm's
//! link; "a command was queued", for whichever process holds the farm's link): their types and their delivery. The
//! in-process bus is the default and what one process needs; with `nats://…` events go through a NATS JetStream
//! stream that every replica follows, so replicas hear each other. Either way delivery to a subscriber is best
//! effort: one that falls behind by more than [`CAPACITY`] events is told how many it missed, and the database stays
//! the record of what happened (every consumer can catch up from it; the bus only says that something moved).

#![forbid(unsafe_code)]

mod nats;

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

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
    DiseaseDetected(DiseaseDetected),
    /// The anomaly detector found an anomalous stretch in a device's metric.
    AnomalyDetected(AnomalyDetected),
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
    /// The process that committed the batch scores it itself (it runs the inference role): the other replicas'
    /// pipelines leave it alone, so a batch is scored once however many replicas run the role. Absent (false) in
    /// events from versions that did not say.
    #[serde(default)]
    pub scored_where_committed: bool,
    /// True in the process that published the event, false where it arrived through NATS (it does not travel).
    #[serde(skip)]
    pub published_here: bool,
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

/// A disease diagnosed on a photo: the evidence is the photo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiseaseDetected {
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
}

/// A photo newly stored, with what a consumer needs to fetch and diagnose it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageStored {
    pub image_id: Uuid,
    pub farm_id: Uuid,
    pub device_id: Uuid,
    pub sha256: String,
    pub content_type: String,
    pub capture_time: SystemTime,
}

/// The bus: cheap to clone, every clone publishes to the same subscribers.
#[derive(Clone, Debug)]
pub struct Bus {
    /// This process's subscribers.
    sender: broadcast::Sender<Event>,
    /// With NATS: where published events go (to the stream, from which the other replicas' subscribers get them).
    nats: Option<mpsc::Sender<Event>>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus::in_process()
    }
}

impl Bus {
    /// A bus within this process.
    pub fn in_process() -> Bus {
        Bus { sender: broadcast::channel(CAPACITY).0, nats: None }
    }

    /// A bus through NATS JetStream at `url` (`nats://HOST:PORT[/NAME]`): events published here reach the
    /// subscribers of every process connected with the same URL.
    pub async fn connect(url: &str) -> Result<Bus, smartfarm_core::Error> {
        let sender = broadcast::channel(CAPACITY).0;
        let outbound = nats::connect(url, sender.clone()).await?;
        Ok(Bus { sender, nats: Some(outbound) })
    }

    /// Publishes an event to every current subscriber (of every replica, with NATS); returns how many subscribers
    /// this process has.
    pub fn publish(&self, event: Event) -> usize {
        if let Some(nats) = &self.nats
            && nats.try_send(event.clone()).is_err()
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_receive_what_is_published_after_they_subscribe() {
        let bus = Bus::in_process();
        let event = Event::ImageStored(ImageStored {
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
}
