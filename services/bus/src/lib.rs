//! smartfarm-bus owns the events one role tells the others about ("a photo was stored", so the inference role
//! diagnoses it; "readings were committed", so it scores them; "a disease was diagnosed", for the alert role): their types and their delivery. The in-process bus here is the default and what one process
//! needs; the NATS JetStream backend for several replicas is the alerts-and-commands issue's. Delivery is best
//! effort to live subscribers: a subscriber that falls behind by more than [`CAPACITY`] events is told how many it
//! missed and must catch up from the database, which stays the record of what happened.

#![forbid(unsafe_code)]

use std::time::SystemTime;

use tokio::sync::broadcast;
use uuid::Uuid;

/// Events a subscriber may fall behind by before it misses some.
pub const CAPACITY: usize = 4096;

/// Something one role tells the others.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A new photo was stored (not a duplicate).
    ImageStored(ImageStored),
    /// An edge batch's readings were committed (not a duplicate).
    ReadingsCommitted(ReadingsCommitted),
    /// A model diagnosed a disease on a photo with at least the configured confidence.
    DiseaseDetected(DiseaseDetected),
    /// The anomaly detector found an anomalous stretch in a device's metric.
    AnomalyDetected(AnomalyDetected),
}

/// The series an edge batch added readings to, so the inference role can score them.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadingsCommitted {
    pub farm_id: Uuid,
    /// Each device's metric the batch touched, with the first and last measurement time it added.
    pub series: Vec<SeriesSpan>,
}

/// A device's metric and a time span of new readings in it.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesSpan {
    pub device_id: Uuid,
    pub metric: String,
    pub first_time: SystemTime,
    pub last_time: SystemTime,
}

/// A model's name and version, as results carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelVersion {
    pub name: String,
    pub version: String,
}

/// A disease diagnosed on a photo: the evidence is the photo.
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Debug, PartialEq)]
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
    sender: broadcast::Sender<Event>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus::in_process()
    }
}

impl Bus {
    /// A bus within this process.
    pub fn in_process() -> Bus {
        Bus { sender: broadcast::channel(CAPACITY).0 }
    }

    /// Publishes an event to every current subscriber; returns how many there were.
    pub fn publish(&self, event: Event) -> usize {
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
