//! The alert role's retention through the service: old events and resolved alerts are deleted in chunks, a
//! retention of zero keeps everything, and a stream that asks to resume from a deleted event is refused with
//! `FAILED_PRECONDITION` rather than resumed with a silent gap.

use std::time::{Duration, SystemTime};

use tonic::Request;
use uuid::Uuid;

use smartfarm_alert::AlertApi;
use smartfarm_bus::Bus;
use smartfarm_core::Principal;
use smartfarm_core::config::AlertsConfig;
use smartfarm_core::rules::{Alert, AlertState, Origin, Severity, alert_id};
use smartfarm_proto::alert::v1 as pb;
use smartfarm_proto::alert::v1::alert_service_server::AlertService;
use smartfarm_store::alerts::AlertRetention;
use smartfarm_store::testing::TestDatabase;

const DAY: Duration = Duration::from_secs(86_400);

fn alert(farm_id: Uuid, open_time: SystemTime) -> Alert {
    let (rule_id, device) = (Uuid::now_v7(), Uuid::now_v7());
    Alert {
        id: alert_id(rule_id, Some(device), "temperature", open_time),
        farm_id,
        rule_id,
        device_id: Some(device),
        metric: "temperature".into(),
        severity: Severity::Critical,
        state: AlertState::Open,
        message: "temperature 41 above 40".into(),
        value: Some(41.0),
        open_time,
        last_time: open_time,
        acknowledge_time: None,
        resolve_time: None,
        count: 1,
        origin: Origin::Cloud,
        evidence_image_id: None,
        evidence_window: None,
    }
}

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
