//! The urgent lane: alerts raised on the farm and command receipts wait here for the link, and go up at once while
//! it is up (not with the next hourly batch). The queue is bounded; past the bound the oldest message is dropped and
//! counted. It lives in memory: an alert lost with it is raised again by the cloud from the spooled readings (same
//! id), and a command receipt lost with it is given again from the command book when the cloud sends the command
//! again (it sends its unfinished commands down at every connection).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::Notify;

use smartfarm_proto::ingestion::v1::connect_request::Body;

/// Messages kept while the link is down.
const MAX_WAITING: usize = 10_000;

#[derive(Debug, Default)]
pub struct UrgentQueue {
    /// Each message with when it was queued (for `smartfarm_edge_urgent_wait_seconds`).
    waiting: Mutex<VecDeque<(Instant, Body)>>,
    news: Notify,
}

impl UrgentQueue {
    /// Queues a message for the link.
    pub fn push(&self, message: Body) {
        let mut waiting = self.waiting.lock().expect("urgent lock");
        if waiting.len() >= MAX_WAITING {
            waiting.pop_front();
            metrics::counter!("smartfarm_edge_urgent_dropped_total").increment(1);
        }
        waiting.push_back((Instant::now(), message));
        drop(waiting);
        self.news.notify_one();
    }

    /// Takes every waiting message, oldest first, with when it was queued.
    pub fn take(&self) -> Vec<(Instant, Body)> {
        self.waiting.lock().expect("urgent lock").drain(..).collect()
    }

    /// Puts back, in front and in order, messages taken but not sent (the link died meanwhile).
    pub fn put_back(&self, unsent: Vec<(Instant, Body)>) {
        let mut waiting = self.waiting.lock().expect("urgent lock");
        for message in unsent.into_iter().rev() {
            waiting.push_front(message);
        }
        while waiting.len() > MAX_WAITING {
            waiting.pop_back();
            metrics::counter!("smartfarm_edge_urgent_dropped_total").increment(1);
        }
    }

    /// Completes when something was queued since the last call.
    pub async fn news(&self) {
        self.news.notified().await
    }
}
