//! The alert role's retention through the service: old events and resolved alerts are deleted in chunks, a
//! retention of zero keeps everything, and a stream that asks to resume from a deleted event is refused with
//! `FAILED_PRECONDITION` rather than resumed with a silent gap, also when retention deletes the events it resumes
//! from after the stream opened and before it read them; a stream's heartbeats carry a cursor that keeps up with the
//! log, so a client filtered to a quiet farm can resume after retention.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tonic::Request;
use uuid::Uuid;

use smartfarm_alert::AlertApi;
use smartfarm_bus::Bus;
use smartfarm_core::Principal;
use smartfarm_core::Result;
use smartfarm_core::config::AlertsConfig;
use smartfarm_core::rules::{Alert, AlertState, Rule, Severity};
use smartfarm_proto::alert::v1 as pb;
use smartfarm_proto::alert::v1::alert_service_server::AlertService;
use smartfarm_store::AlertStore;
use smartfarm_store::alerts::{AlertEvent, AlertFilter, AlertRetention, DeliveryOutcome, Webhook};
use smartfarm_store::testing::TestDatabase;
use tokio_stream::StreamExt;

mod common;

use common::alert;

const DAY: Duration = Duration::from_secs(86_400);

fn subscribe_from(cursor: u64) -> Request<pb::SubscribeRequest> {
    let mut request = Request::new(pb::SubscribeRequest { cursor: cursor.to_string(), ..Default::default() });
    request.extensions_mut().insert(Principal::Admin { api_key_id: Uuid::now_v7() });
    request
}

#[tokio::test]
async fn retention_deletes_old_alerts_and_a_cursor_behind_it_is_refused() {
    let test = TestDatabase::sqlite().await;
    let store = test.database.alerts();
    let now = SystemTime::now();
    let farm_id = test.database.registry().create_farm(Uuid::now_v7(), "retention", now - 800 * DAY).await.unwrap().id;
    let api = |retention| {
        let settings = AlertsConfig { retention, ..AlertsConfig::default() };
        AlertApi::new(test.database.registry(), store.clone(), Bus::in_process(), settings)
    };
    // Three alerts opened and resolved 400 days ago: events 1 to 6.
    for _ in 0..3 {
        let old = alert(farm_id, now - 400 * DAY);
        store.record_alert(&old).await.unwrap();
        store.set_alert_state(old.id, AlertState::Resolved, now - 399 * DAY).await.unwrap();
    }

    assert_eq!(api(Duration::ZERO).apply_retention(now).await.unwrap(), AlertRetention::default(), "zero keeps all");
    let year = api(365 * DAY);
    // The first run notes where the log stands; the events are old from the next run a year on.
    assert_eq!(year.apply_retention(now).await.unwrap(), AlertRetention { events: 0, alerts: 3 });
    assert_eq!(year.apply_retention(now + 366 * DAY).await.unwrap(), AlertRetention { events: 5, alerts: 0 });

    let refused = year.subscribe(subscribe_from(4)).await.expect_err("a cursor behind the horizon is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("retention"), "{refused:?}");
    assert!(year.subscribe(subscribe_from(5)).await.is_ok(), "the horizon itself resumes");
}

#[tokio::test]
async fn heartbeats_keep_a_quiet_farms_stream_at_a_cursor_retention_does_not_overtake() {
    let test = TestDatabase::sqlite().await;
    let store = test.database.alerts();
    let now = SystemTime::now();
    let registry = test.database.registry();
    let quiet = registry.create_farm(Uuid::now_v7(), "quiet", now - 800 * DAY).await.unwrap().id;
    let busy = registry.create_farm(Uuid::now_v7(), "busy", now - 800 * DAY).await.unwrap().id;
    let settings =
        AlertsConfig { retention: 365 * DAY, stream_heartbeat: Duration::from_millis(100), ..AlertsConfig::default() };
    let api = AlertApi::new(registry, store.clone(), Bus::in_process(), settings);
    // The quiet farm's only alert, 400 days ago: events 1 and 2. Its client last heard of event 2.
    let old = alert(quiet, now - 400 * DAY);
    store.record_alert(&old).await.unwrap();
    store.set_alert_state(old.id, AlertState::Resolved, now - 399 * DAY).await.unwrap();

    let mut request = subscribe_from(2);
    request.get_mut().farm_id = quiet.to_string();
    let mut stream = api.subscribe(request).await.unwrap().into_inner();
    // The busy farm's alerts follow (events 3 to 8); the quiet farm's stream sends none of them, only heartbeats,
    // whose cursor moves past them.
    for _ in 0..3 {
        let other = alert(busy, now - 400 * DAY);
        store.record_alert(&other).await.unwrap();
        store.set_alert_state(other.id, AlertState::Resolved, now - 399 * DAY).await.unwrap();
    }
    let mut cursor = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cursor != "8" {
        let message = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no heartbeat past event 8 within 10 s; the last cursor was {cursor:?}"))
            .expect("the stream goes on")
            .expect("a message, not an error");
        assert_eq!(message.event_type, pb::AlertEventType::Heartbeat as i32, "only heartbeats: {message:?}");
        assert_eq!(message.alert, None, "a heartbeat carries no alert");
        cursor = message.cursor;
    }
    drop(stream);

    // Retention a year on deletes events up to 7. The client's last event cursor is refused; its heartbeat's resumes.
    api.apply_retention(now).await.unwrap();
    assert_eq!(api.apply_retention(now + 366 * DAY).await.unwrap().events, 7);
    let mut stale = subscribe_from(2);
    stale.get_mut().farm_id = quiet.to_string();
    let refused = api.subscribe(stale).await.expect_err("the last event's cursor is behind the horizon");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    let mut fresh = subscribe_from(8);
    fresh.get_mut().farm_id = quiet.to_string();
    assert!(api.subscribe(fresh).await.is_ok(), "the heartbeat's cursor resumes");
}

/// What runs on the store beneath before one of a stream's reads of events.
type BeforeRead = Box<dyn FnOnce(Arc<dyn AlertStore>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// An alert store that runs the next of `before_reads`, while any is left, before each read of events: what other
/// processes do (retention, new alerts) slipped in between a stream's reads.
struct BetweenReads {
    inner: Arc<dyn AlertStore>,
    before_reads: Mutex<VecDeque<BeforeRead>>,
}

#[async_trait::async_trait]
impl AlertStore for BetweenReads {
    async fn alert_events_after(
        &self,
        sequence: u64,
        farm_id: Option<Uuid>,
        min_severity: Severity,
        limit: usize,
    ) -> Result<Vec<AlertEvent>> {
        let before = self.before_reads.lock().unwrap().pop_front();
        if let Some(before) = before {
            before(self.inner.clone()).await;
        }
        self.inner.alert_events_after(sequence, farm_id, min_severity, limit).await
    }

    async fn create_rule(&self, rule: &Rule) -> Result<u64> {
        self.inner.create_rule(rule).await
    }
    async fn get_rule(&self, id: Uuid) -> Result<Rule> {
        self.inner.get_rule(id).await
    }
    async fn list_rules(&self, farm_id: Uuid, after: Option<Uuid>, limit: usize) -> Result<Vec<Rule>> {
        self.inner.list_rules(farm_id, after, limit).await
    }
    async fn delete_rule(&self, id: Uuid) -> Result<Rule> {
        self.inner.delete_rule(id).await
    }
    async fn rules_snapshot(&self, farm_id: Uuid) -> Result<(u64, Vec<Rule>)> {
        self.inner.rules_snapshot(farm_id).await
    }
    async fn record_alert(&self, alert: &Alert) -> Result<Option<AlertEvent>> {
        self.inner.record_alert(alert).await
    }
    async fn get_alert(&self, id: Uuid) -> Result<Alert> {
        self.inner.get_alert(id).await
    }
    async fn unresolved_alerts_of(&self, rule_id: Uuid, device_id: Option<Uuid>) -> Result<Vec<Alert>> {
        self.inner.unresolved_alerts_of(rule_id, device_id).await
    }
    async fn set_alert_state(
        &self,
        id: Uuid,
        state: AlertState,
        at: SystemTime,
    ) -> Result<(Alert, Option<AlertEvent>)> {
        self.inner.set_alert_state(id, state, at).await
    }
    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        after: Option<(SystemTime, Uuid)>,
        limit: usize,
    ) -> Result<Vec<Alert>> {
        self.inner.list_alerts(filter, after, limit).await
    }
    async fn last_alert_event(&self) -> Result<u64> {
        self.inner.last_alert_event().await
    }
    async fn apply_alert_retention(&self, now: SystemTime, before: SystemTime, limit: usize) -> Result<AlertRetention> {
        self.inner.apply_alert_retention(now, before, limit).await
    }
    async fn alert_event_horizon(&self) -> Result<u64> {
        self.inner.alert_event_horizon().await
    }
    async fn create_webhook(&self, webhook: &Webhook) -> Result<()> {
        self.inner.create_webhook(webhook).await
    }
    async fn get_webhook(&self, id: Uuid) -> Result<Webhook> {
        self.inner.get_webhook(id).await
    }
    async fn list_webhooks(&self, farm_id: Option<Uuid>, after: Option<Uuid>, limit: usize) -> Result<Vec<Webhook>> {
        self.inner.list_webhooks(farm_id, after, limit).await
    }
    async fn delete_webhook(&self, id: Uuid) -> Result<()> {
        self.inner.delete_webhook(id).await
    }
    async fn lease_webhook(&self, id: Uuid, owner: Uuid, lease: Duration) -> Result<bool> {
        self.inner.lease_webhook(id, owner, lease).await
    }
    async fn record_delivery(&self, id: Uuid, outcome: &DeliveryOutcome) -> Result<Webhook> {
        self.inner.record_delivery(id, outcome).await
    }
}

#[tokio::test]
async fn a_stream_that_retention_overtakes_before_it_reads_ends_instead_of_skipping() {
    let test = TestDatabase::sqlite().await;
    let store = test.database.alerts();
    let now = SystemTime::now();
    let farm_id = test.database.registry().create_farm(Uuid::now_v7(), "overtaken", now - 800 * DAY).await.unwrap().id;
    // Events 1 to 6, 400 days old; retention notes where the log stands.
    for _ in 0..3 {
        let old = alert(farm_id, now - 400 * DAY);
        store.record_alert(&old).await.unwrap();
        store.set_alert_state(old.id, AlertState::Resolved, now - 399 * DAY).await.unwrap();
    }
    store.apply_alert_retention(now, now - 365 * DAY, 1000).await.unwrap();
    let retention: BeforeRead = Box::new(move |store| {
        Box::pin(async move {
            let deleted = store.apply_alert_retention(now + 366 * DAY, now + DAY, 1000).await.unwrap();
            assert_eq!(deleted.events, 5, "retention deletes the old events before the stream reads them");
        })
    });
    let overtaking = BetweenReads { inner: store.clone(), before_reads: Mutex::new(VecDeque::from([retention])) };
    let settings = AlertsConfig { retention: 365 * DAY, ..AlertsConfig::default() };
    let api = AlertApi::new(test.database.registry(), Arc::new(overtaking), Bus::in_process(), settings);

    // Cursor 4 is above the horizon (0) when the stream opens; retention then deletes events up to 5 before the
    // stream's first read, which finds event 6 alone.
    let mut stream =
        api.subscribe(subscribe_from(4)).await.expect("the cursor is kept when the stream opens").into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("the stream answers");
    let ended = first.expect("an answer, not the end").expect_err("event 5 is gone: the stream ends, not skips it");
    assert_eq!(ended.code(), tonic::Code::FailedPrecondition, "{ended:?}");
    assert!(ended.message().contains("retention"), "{ended:?}");
}

/// A stream that reads full pages goes past the newest event there was when its catch-up began; retention that
/// overtakes it there, between two pages, ends it too.
#[tokio::test]
async fn a_stream_that_retention_overtakes_between_full_pages_ends_instead_of_skipping() {
    let test = TestDatabase::sqlite().await;
    let store = test.database.alerts();
    let now = SystemTime::now();
    let farm_id = test.database.registry().create_farm(Uuid::now_v7(), "busy", now - 800 * DAY).await.unwrap().id;
    // Events 1 to 6, noted by a run of retention 400 days ago.
    for _ in 0..3 {
        let old = alert(farm_id, now - 400 * DAY);
        store.record_alert(&old).await.unwrap();
        store.set_alert_state(old.id, AlertState::Resolved, now - 399 * DAY).await.unwrap();
    }
    store.apply_alert_retention(now - 400 * DAY, now - 800 * DAY, 1000).await.unwrap();
    // Before the first page: 500 more events (7 to 506), noted by a run 300 days ago. Before the second: a run
    // now, with a retention of 100 days, deletes what that note saw but the newest (1 to 505).
    let more: BeforeRead = Box::new(move |store| {
        Box::pin(async move {
            let alerts: Vec<Alert> = (0..500).map(|_| alert(farm_id, now - 301 * DAY)).collect();
            assert!(store.record_alerts(&alerts).await.iter().all(|recorded| recorded.is_ok()));
            store.apply_alert_retention(now - 300 * DAY, now - 800 * DAY, 1000).await.unwrap();
        })
    });
    let retention: BeforeRead = Box::new(move |store| {
        Box::pin(async move {
            let deleted = store.apply_alert_retention(now, now - 100 * DAY, 1000).await.unwrap();
            assert_eq!(deleted.events, 505, "retention deletes the noted events but the newest");
        })
    });
    let overtaking = BetweenReads { inner: store.clone(), before_reads: Mutex::new(VecDeque::from([more, retention])) };
    let settings = AlertsConfig { retention: 100 * DAY, ..AlertsConfig::default() };
    let api = AlertApi::new(test.database.registry(), Arc::new(overtaking), Bus::in_process(), settings);

    // The catch-up begins with event 6 the newest; its first page (events 2 to 501) is full, and takes it past 6.
    let mut stream = api.subscribe(subscribe_from(1)).await.expect("the cursor is kept").into_inner();
    let mut cursors = Vec::new();
    let ended = loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("the stream neither ended nor went on after {:?}", cursors.last()))
            .expect("an answer, not the end");
        match message {
            Ok(message) => cursors.push(message.cursor.parse::<u64>().unwrap()),
            Err(status) => break status,
        }
    };
    assert_eq!(cursors, (2..=501).collect::<Vec<_>>(), "the first page, then the end: events 502 to 505 are gone");
    assert_eq!(ended.code(), tonic::Code::FailedPrecondition, "{ended:?}");
    assert!(ended.message().contains("retention"), "{ended:?}");
}
