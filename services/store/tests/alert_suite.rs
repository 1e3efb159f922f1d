//! The behaviour every [`AlertStore`] backend must have, written once and run on SQLite and PostgreSQL.

use std::time::{Duration, SystemTime};

use smartfarm_core::Error;
use smartfarm_core::rules::{Alert, AlertState, Condition, Origin, Rule, Severity, alert_id};
use smartfarm_core::time::from_unix_micros;
use smartfarm_store::Database;
use smartfarm_store::alerts::{
    AlertEvent, AlertEventKind, AlertFilter, AlertRetention, DeliveryOutcome, Webhook, WebhookState,
};
use smartfarm_store::testing::TestDatabase as Harness;
use uuid::Uuid;

fn at(seconds: u64) -> SystemTime {
    from_unix_micros(1_780_012_800_000_000) + Duration::from_secs(seconds)
}

async fn farm(database: &Database, name: &str) -> Uuid {
    database.registry().create_farm(Uuid::now_v7(), name, at(0)).await.unwrap().id
}

fn rule(farm_id: Uuid, name: &str, condition: Condition) -> Rule {
    Rule {
        id: Uuid::now_v7(),
        farm_id,
        name: name.into(),
        severity: Severity::Warning,
        device_id: None,
        metric: Some("temperature".into()),
        cooldown: Duration::from_secs(300),
        create_time: at(1),
        condition,
    }
}

fn threshold() -> Condition {
    Condition::Threshold { above: true, limit: 40.0, for_duration: Duration::from_secs(60) }
}

/// A new alert raised in the cloud on a device of its own, opened at `open` seconds.
fn alert(farm_id: Uuid, severity: Severity, open: u64) -> Alert {
    let (rule_id, device) = (Uuid::now_v7(), Uuid::now_v7());
    Alert {
        id: alert_id(rule_id, Some(device), "temperature", at(open)),
        farm_id,
        rule_id,
        device_id: Some(device),
        metric: "temperature".into(),
        severity,
        state: AlertState::Open,
        message: "temperature 41 above 40 for 1m".into(),
        value: Some(41.0),
        open_time: at(open),
        last_time: at(open),
        acknowledge_time: None,
        resolve_time: None,
        count: 1,
        origin: Origin::Cloud,
        evidence_image_id: None,
        evidence_window: None,
        resolved_by_hand: false,
    }
}

fn ids(alerts: &[Alert]) -> Vec<Uuid> {
    alerts.iter().map(|alert| alert.id).collect()
}

fn sequences(events: &[AlertEvent]) -> Vec<u64> {
    events.iter().map(|event| event.sequence).collect()
}

async fn rules_move_their_farms_version_and_snapshot_together(database: &Database) {
    let store = database.alerts();
    let (farm_a, farm_b) = (farm(database, "alpha").await, farm(database, "bravo").await);
    assert_eq!(store.rules_snapshot(farm_a).await.unwrap(), (0, vec![]));
    assert_eq!(store.rules_snapshot(Uuid::now_v7()).await.unwrap(), (0, vec![]), "an unknown farm has no rules");

    let hot = rule(farm_a, "hot", threshold());
    let mut silent = rule(farm_a, "silent", Condition::DeviceSilent { silent_for: Duration::from_secs(600) });
    silent.metric = None;
    silent.device_id = Some(Uuid::now_v7());
    let mut sick = rule(
        farm_a,
        "sick",
        Condition::ModelVerdict {
            disease_labels: vec!["Apple___Black_rot".into()],
            min_confidence: 0.8,
            on_sensor_anomaly: true,
        },
    );
    sick.severity = Severity::Critical;
    assert_eq!(store.create_rule(&hot).await.unwrap(), 1);
    assert_eq!(store.create_rule(&silent).await.unwrap(), 2);
    assert_eq!(store.create_rule(&sick).await.unwrap(), 3);
    let elsewhere = rule(farm_b, "hot", threshold());
    assert_eq!(store.create_rule(&elsewhere).await.unwrap(), 1, "each farm has its own version");

    let unknown_farm = store.create_rule(&rule(Uuid::now_v7(), "lost", threshold())).await.unwrap_err();
    assert!(matches!(unknown_farm, Error::NotFound { resource: "farm", .. }), "{unknown_farm:?}");
    let duplicate = store.create_rule(&hot).await.unwrap_err();
    assert!(matches!(duplicate, Error::AlreadyExists(_)), "{duplicate:?}");
    assert_eq!(store.rules_snapshot(farm_a).await.unwrap().0, 3, "a refused create does not move the version");

    assert_eq!(store.get_rule(silent.id).await.unwrap(), silent);
    assert!(matches!(store.get_rule(Uuid::now_v7()).await, Err(Error::NotFound { resource: "rule", .. })));
    assert_eq!(store.list_rules(farm_a, None, 2).await.unwrap(), vec![hot.clone(), silent.clone()]);
    assert_eq!(store.list_rules(farm_a, Some(silent.id), 2).await.unwrap(), vec![sick.clone()]);
    assert_eq!(store.list_rules(farm_a, Some(sick.id), 2).await.unwrap(), vec![]);
    assert_eq!(store.rules_snapshot(farm_a).await.unwrap(), (3, vec![hot.clone(), silent.clone(), sick.clone()]));

    assert_eq!(store.delete_rule(silent.id).await.unwrap(), silent);
    assert_eq!(store.rules_snapshot(farm_a).await.unwrap(), (4, vec![hot.clone(), sick.clone()]));
    assert!(matches!(store.delete_rule(silent.id).await, Err(Error::NotFound { resource: "rule", .. })));
    assert!(matches!(store.get_rule(silent.id).await, Err(Error::NotFound { .. })));
    assert_eq!(store.rules_snapshot(farm_a).await.unwrap().0, 4, "a refused delete does not move the version");
    store.delete_rule(hot.id).await.unwrap();
    store.delete_rule(sick.id).await.unwrap();
    assert_eq!(store.rules_snapshot(farm_a).await.unwrap(), (6, vec![]), "no rules left, the version stays");
    assert_eq!(store.rules_snapshot(farm_b).await.unwrap(), (1, vec![elsewhere]));
}

async fn copies_of_one_alert_merge_into_one_row_with_an_event_per_change(database: &Database) {
    let store = database.alerts();
    let farm_id = farm(database, "charlie").await;
    assert_eq!(store.last_alert_event().await.unwrap(), 0);

    let cloud = alert(farm_id, Severity::Warning, 10);
    let opened = store.record_alert(&cloud).await.unwrap().expect("a new alert is an event");
    assert_eq!(opened, AlertEvent { sequence: 1, kind: AlertEventKind::Opened, alert: cloud.clone() });
    assert_eq!(store.record_alert(&cloud).await.unwrap(), None, "the same alert again changes nothing");
    assert_eq!(store.get_alert(cloud.id).await.unwrap(), cloud);

    // The edge's copy of the same alert: it saw more repeats, later.
    let mut edge = cloud.clone();
    edge.origin = Origin::Edge;
    edge.count = 3;
    edge.last_time = at(40);
    edge.value = Some(44.5);
    let updated = store.record_alert(&edge).await.unwrap().expect("the repeats change it");
    assert_eq!((updated.sequence, updated.kind), (2, AlertEventKind::Updated));
    let mut expected = cloud.clone();
    expected.count = 3;
    expected.last_time = at(40);
    expected.value = Some(44.5);
    assert_eq!(updated.alert, expected, "merged, and the first origin stays");
    assert_eq!(store.get_alert(cloud.id).await.unwrap(), expected);

    let mut resolution = edge.clone();
    resolution.state = AlertState::Resolved;
    resolution.resolve_time = Some(at(50));
    let resolved = store.record_alert(&resolution).await.unwrap().expect("the resolution changes it");
    assert_eq!((resolved.sequence, resolved.kind), (3, AlertEventKind::Resolved));
    assert_eq!((resolved.alert.state, resolved.alert.resolve_time), (AlertState::Resolved, Some(at(50))));
    assert_eq!(store.record_alert(&cloud).await.unwrap(), None, "an older copy never moves it back");
    assert_eq!(store.record_alert(&edge).await.unwrap(), None);
    assert_eq!(store.get_alert(cloud.id).await.unwrap(), resolved.alert);

    let listed = store.list_alerts(&AlertFilter::default(), None, 10).await.unwrap();
    assert_eq!(listed, vec![resolved.alert.clone()], "the edge's and the cloud's copies are one row");
    assert_eq!(store.last_alert_event().await.unwrap(), 3);
    assert!(matches!(store.get_alert(Uuid::now_v7()).await, Err(Error::NotFound { resource: "alert", .. })));
    let lost = store.record_alert(&alert(Uuid::now_v7(), Severity::Info, 10)).await.unwrap_err();
    assert!(matches!(lost, Error::NotFound { resource: "farm", .. }), "{lost:?}");
    assert_eq!(store.last_alert_event().await.unwrap(), 3, "a refused alert appends nothing");
    // Another farm's agent sending this alert's id: not a copy of it.
    let other_farm = farm(database, "charlie's neighbour").await;
    let mut forged = edge.clone();
    forged.farm_id = other_farm;
    forged.count = 99;
    let refused = store.record_alert(&forged).await.unwrap_err();
    assert!(matches!(refused, Error::PermissionDenied(_)), "{refused:?}");
    assert_eq!(store.get_alert(cloud.id).await.unwrap(), resolved.alert, "untouched");
}

async fn a_burst_is_recorded_at_once_and_a_refused_alert_keeps_no_other_out(database: &Database) {
    let store = database.alerts();
    let farm_id = farm(database, "lima").await;
    let first = alert(farm_id, Severity::Critical, 10);
    let mut repeat = first.clone();
    repeat.count = 2;
    let second = alert(farm_id, Severity::Warning, 11);
    let events = store.record_alerts(&[first.clone(), repeat.clone(), second.clone(), first.clone()]).await;
    let events: Vec<Option<AlertEvent>> = events.into_iter().map(Result::unwrap).collect();
    let kinds: Vec<Option<(u64, AlertEventKind)>> =
        events.iter().map(|event| event.as_ref().map(|event| (event.sequence, event.kind))).collect();
    assert_eq!(
        kinds,
        vec![
            Some((1, AlertEventKind::Opened)),
            Some((2, AlertEventKind::Updated)),
            Some((3, AlertEventKind::Opened)),
            None
        ],
        "in order, one event per change, an old copy none"
    );
    assert_eq!(events[1].as_ref().unwrap().alert, repeat, "each event carries the alert as of that event");
    assert_eq!(store.get_alert(first.id).await.unwrap(), repeat, "the row holds the last change");
    // A later burst changes an alert recorded before it.
    let mut resolved = repeat.clone();
    resolved.state = AlertState::Resolved;
    let events = store.record_alerts(std::slice::from_ref(&resolved)).await;
    let event = events[0].as_ref().unwrap().as_ref().unwrap();
    assert_eq!((event.sequence, event.kind), (4, AlertEventKind::Resolved));
    assert_eq!(store.get_alert(first.id).await.unwrap(), resolved);
    // A burst with an alert of a farm that does not exist: the others are recorded all the same.
    let third = alert(farm_id, Severity::Info, 12);
    let results = store.record_alerts(&[alert(Uuid::now_v7(), Severity::Info, 12), third.clone()]).await;
    assert!(matches!(results[0], Err(Error::NotFound { resource: "farm", .. })), "{:?}", results[0]);
    assert_eq!(results[1].as_ref().unwrap().as_ref().map(|event| event.sequence), Some(5));
    assert_eq!(store.get_alert(third.id).await.unwrap(), third);
    assert_eq!(store.last_alert_event().await.unwrap(), 5, "the refused alert appended nothing");
}

async fn the_unresolved_alerts_of_a_rule_on_a_device_are_found(database: &Database) {
    let store = database.alerts();
    let farm_id = farm(database, "mike").await;
    let first = alert(farm_id, Severity::Critical, 10);
    let mut later = first.clone();
    later.id = Uuid::now_v7();
    later.open_time = at(20);
    let mut elsewhere = first.clone();
    elsewhere.id = Uuid::now_v7();
    elsewhere.device_id = Some(Uuid::now_v7());
    for alert in [&later, &first, &elsewhere] {
        store.record_alert(alert).await.unwrap();
    }
    let found = store.unresolved_alerts_of(first.rule_id, first.device_id).await.unwrap();
    assert_eq!(found.iter().map(|alert| alert.id).collect::<Vec<_>>(), vec![first.id, later.id], "oldest first");
    store.set_alert_state(first.id, AlertState::Resolved, at(30)).await.unwrap();
    let found = store.unresolved_alerts_of(first.rule_id, first.device_id).await.unwrap();
    assert_eq!(found.iter().map(|alert| alert.id).collect::<Vec<_>>(), vec![later.id], "resolved ones are over");
    assert!(store.unresolved_alerts_of(first.rule_id, None).await.unwrap().is_empty());
}

async fn people_acknowledge_and_resolve_alerts_once(database: &Database) {
    let store = database.alerts();
    let farm_id = farm(database, "delta").await;
    let open = alert(farm_id, Severity::Critical, 10);
    store.record_alert(&open).await.unwrap();

    let (acknowledged, event) = store.set_alert_state(open.id, AlertState::Acknowledged, at(20)).await.unwrap();
    assert_eq!((acknowledged.state, acknowledged.acknowledge_time), (AlertState::Acknowledged, Some(at(20))));
    let event = event.expect("acknowledging an open alert is an event");
    assert_eq!((event.sequence, event.kind, &event.alert), (2, AlertEventKind::Acknowledged, &acknowledged));
    let (again, event) = store.set_alert_state(open.id, AlertState::Acknowledged, at(30)).await.unwrap();
    assert_eq!((again, event), (acknowledged.clone(), None), "acknowledged once; the first time stays");

    let (resolved, event) = store.set_alert_state(open.id, AlertState::Resolved, at(40)).await.unwrap();
    assert_eq!(
        (resolved.state, resolved.acknowledge_time, resolved.resolve_time),
        (AlertState::Resolved, Some(at(20)), Some(at(40)))
    );
    assert_eq!(event.map(|event| (event.sequence, event.kind)), Some((3, AlertEventKind::Resolved)));
    for state in [AlertState::Acknowledged, AlertState::Resolved] {
        let (unchanged, event) = store.set_alert_state(open.id, state, at(50)).await.unwrap();
        assert_eq!((unchanged, event), (resolved.clone(), None), "{state:?} after the resolution changes nothing");
    }
    assert_eq!(store.record_alert(&open).await.unwrap(), None, "the evaluator's open copy does not reopen it");
    assert_eq!(store.get_alert(open.id).await.unwrap(), resolved);

    let other = alert(farm_id, Severity::Info, 60);
    store.record_alert(&other).await.unwrap();
    let (resolved, event) = store.set_alert_state(other.id, AlertState::Resolved, at(70)).await.unwrap();
    assert_eq!((resolved.acknowledge_time, resolved.resolve_time), (None, Some(at(70))));
    assert_eq!(event.map(|event| (event.sequence, event.kind)), Some((5, AlertEventKind::Resolved)));

    let reopen = store.set_alert_state(other.id, AlertState::Open, at(80)).await.unwrap_err();
    assert!(matches!(reopen, Error::InvalidArgument { .. }), "{reopen:?}");
    let missing = store.set_alert_state(Uuid::now_v7(), AlertState::Resolved, at(80)).await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { resource: "alert", .. }), "{missing:?}");
    assert_eq!(store.last_alert_event().await.unwrap(), 5);
}

async fn alerts_are_listed_newest_first_by_filter_and_keyset(database: &Database) {
    let store = database.alerts();
    let (farm_a, farm_b) = (farm(database, "echo").await, farm(database, "foxtrot").await);
    let warning_early = alert(farm_a, Severity::Warning, 10);
    let critical = alert(farm_a, Severity::Critical, 20);
    let info = alert(farm_a, Severity::Info, 30);
    let warning_late = alert(farm_a, Severity::Warning, 40);
    let elsewhere = alert(farm_b, Severity::Critical, 25);
    // Two alerts opened in the same microsecond: the id breaks the tie.
    let (mut tied_high, mut tied_low) = (alert(farm_b, Severity::Info, 50), alert(farm_b, Severity::Info, 50));
    if tied_high.id < tied_low.id {
        std::mem::swap(&mut tied_high, &mut tied_low);
    }
    for alert in [&warning_early, &critical, &info, &warning_late, &elsewhere, &tied_high, &tied_low] {
        store.record_alert(alert).await.unwrap();
    }
    let (critical, _) = store.set_alert_state(critical.id, AlertState::Acknowledged, at(60)).await.unwrap();
    let (warning_late, _) = store.set_alert_state(warning_late.id, AlertState::Resolved, at(60)).await.unwrap();

    let every = AlertFilter::default();
    assert_eq!(
        store.list_alerts(&every, None, 10).await.unwrap(),
        vec![
            tied_high.clone(),
            tied_low.clone(),
            warning_late.clone(),
            info.clone(),
            elsewhere.clone(),
            critical.clone(),
            warning_early.clone()
        ]
    );
    let on_b = AlertFilter { farm_id: Some(farm_b), ..Default::default() };
    let first = store.list_alerts(&on_b, None, 1).await.unwrap();
    assert_eq!(ids(&first), vec![tied_high.id]);
    let rest = store.list_alerts(&on_b, Some((tied_high.open_time, tied_high.id)), 10).await.unwrap();
    assert_eq!(ids(&rest), vec![tied_low.id, elsewhere.id], "strictly after the key, through a tie");

    let on_a = AlertFilter { farm_id: Some(farm_a), ..Default::default() };
    let page = store.list_alerts(&on_a, None, 2).await.unwrap();
    assert_eq!(ids(&page), vec![warning_late.id, info.id]);
    let page = store.list_alerts(&on_a, Some((info.open_time, info.id)), 2).await.unwrap();
    assert_eq!(ids(&page), vec![critical.id, warning_early.id]);
    let page = store.list_alerts(&on_a, Some((warning_early.open_time, warning_early.id)), 2).await.unwrap();
    assert!(page.is_empty());

    let open_on_a = AlertFilter { states: vec![AlertState::Open], ..on_a.clone() };
    assert_eq!(ids(&store.list_alerts(&open_on_a, None, 10).await.unwrap()), vec![info.id, warning_early.id]);
    let handled = AlertFilter { states: vec![AlertState::Acknowledged, AlertState::Resolved], ..on_a.clone() };
    assert_eq!(ids(&store.list_alerts(&handled, None, 10).await.unwrap()), vec![warning_late.id, critical.id]);
    let serious_on_a = AlertFilter { min_severity: Some(Severity::Warning), ..on_a.clone() };
    assert_eq!(
        ids(&store.list_alerts(&serious_on_a, None, 10).await.unwrap()),
        vec![warning_late.id, critical.id, warning_early.id]
    );
    let critical_anywhere = AlertFilter { min_severity: Some(Severity::Critical), ..Default::default() };
    assert_eq!(ids(&store.list_alerts(&critical_anywhere, None, 10).await.unwrap()), vec![elsewhere.id, critical.id]);
    let window = AlertFilter { opened_from: Some(at(20)), opened_before: Some(at(40)), ..on_a.clone() };
    assert_eq!(
        ids(&store.list_alerts(&window, None, 10).await.unwrap()),
        vec![info.id, critical.id],
        "from is inclusive, before is exclusive"
    );
    let nothing = AlertFilter { states: vec![AlertState::Resolved], min_severity: Some(Severity::Critical), ..on_a };
    assert!(store.list_alerts(&nothing, None, 10).await.unwrap().is_empty());
}

async fn the_event_log_is_gapless_filtered_and_resumable(database: &Database) {
    let store = database.alerts();
    let (farm_a, farm_b) = (farm(database, "golf").await, farm(database, "hotel").await);
    let warning = alert(farm_a, Severity::Warning, 10);
    let critical = alert(farm_b, Severity::Critical, 20);
    let info = alert(farm_a, Severity::Info, 30);
    store.record_alert(&warning).await.unwrap();
    store.record_alert(&critical).await.unwrap();
    store.record_alert(&info).await.unwrap();
    let mut repeated = warning.clone();
    repeated.count = 2;
    repeated.last_time = at(15);
    store.record_alert(&repeated).await.unwrap();
    store.set_alert_state(critical.id, AlertState::Resolved, at(40)).await.unwrap();

    let all = store.alert_events_after(0, None, Severity::Info, 100).await.unwrap();
    assert_eq!(sequences(&all), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        all.iter().map(|event| (event.kind, event.alert.id)).collect::<Vec<_>>(),
        vec![
            (AlertEventKind::Opened, warning.id),
            (AlertEventKind::Opened, critical.id),
            (AlertEventKind::Opened, info.id),
            (AlertEventKind::Updated, warning.id),
            (AlertEventKind::Resolved, critical.id),
        ]
    );
    assert_eq!(all[0].alert, warning, "each event keeps the alert as it was then");
    assert_eq!(all[3].alert.count, 2);
    assert_eq!(store.last_alert_event().await.unwrap(), 5);

    assert_eq!(
        sequences(&store.alert_events_after(0, Some(farm_a), Severity::Info, 100).await.unwrap()),
        vec![1, 3, 4]
    );
    assert_eq!(
        sequences(&store.alert_events_after(0, Some(farm_a), Severity::Warning, 100).await.unwrap()),
        vec![1, 4]
    );
    assert_eq!(sequences(&store.alert_events_after(0, None, Severity::Critical, 100).await.unwrap()), vec![2, 5]);
    assert_eq!(sequences(&store.alert_events_after(2, None, Severity::Info, 2).await.unwrap()), vec![3, 4]);
    assert_eq!(sequences(&store.alert_events_after(4, None, Severity::Info, 2).await.unwrap()), vec![5]);
    assert!(store.alert_events_after(5, None, Severity::Info, 2).await.unwrap().is_empty());
    assert!(store.alert_events_after(0, Some(Uuid::now_v7()), Severity::Info, 100).await.unwrap().is_empty());
}

/// Writers racing: every change gets the next number, and two writers of one new alert open it once.
async fn concurrent_writers_number_events_without_gaps(database: &Database) {
    let store = database.alerts();
    let farm_id = farm(database, "india").await;
    let shared = alert(farm_id, Severity::Warning, 5);
    let mut writers = tokio::task::JoinSet::new();
    for index in 0..24u64 {
        let store = store.clone();
        let alert = if index % 4 == 0 { shared.clone() } else { alert(farm_id, Severity::Info, 10 + index) };
        writers.spawn(async move { store.record_alert(&alert).await.unwrap() });
    }
    let mut recorded: Vec<AlertEvent> = writers.join_all().await.into_iter().flatten().collect();
    recorded.sort_by_key(|event| event.sequence);
    assert_eq!(recorded.len(), 19, "18 distinct alerts and one shared alert opened once");
    assert_eq!(recorded.iter().filter(|event| event.alert.id == shared.id).count(), 1);
    assert_eq!(sequences(&recorded), (1..=19).collect::<Vec<_>>());
    let logged = store.alert_events_after(0, None, Severity::Info, 100).await.unwrap();
    assert_eq!(logged, recorded);
    assert_eq!(store.last_alert_event().await.unwrap(), 19);
}

/// Two processes on one database (replicas): each writer's idea of an alert can be out of date, and what it
/// records is still merged with what is stored, never written over it.
async fn a_writer_whose_copy_is_out_of_date_merges_with_what_is_stored(harness: &Harness) {
    let (here, elsewhere) = (harness.database.alerts(), harness.reopen().await.alerts());
    let farm_id = farm(&harness.database, "mike").await;
    let open = alert(farm_id, Severity::Critical, 10);
    let opened = here.record_alerts(std::slice::from_ref(&open)).await.remove(0).unwrap().unwrap();
    assert_eq!(opened.sequence, 1);

    // Acknowledged through the other process; then a repeat arrives here, where the alert was last seen open.
    let (acknowledged, _) = elsewhere.set_alert_state(open.id, AlertState::Acknowledged, at(20)).await.unwrap();
    let mut repeat = open.clone();
    repeat.count = 2;
    repeat.last_time = at(30);
    let updated = here.record_alerts(std::slice::from_ref(&repeat)).await.remove(0).unwrap().unwrap();
    assert_eq!((updated.sequence, updated.kind), (3, AlertEventKind::Updated));
    assert_eq!(updated.alert.state, AlertState::Acknowledged, "the acknowledgement stays");
    assert_eq!(updated.alert.acknowledge_time, acknowledged.acknowledge_time);
    assert_eq!(updated.alert.count, 2);
    assert_eq!(here.get_alert(open.id).await.unwrap(), updated.alert);

    // An alert the other process recorded first, and this one has never seen: a copy of it is merged too.
    let theirs = alert(farm_id, Severity::Warning, 40);
    elsewhere.record_alerts(std::slice::from_ref(&theirs)).await.remove(0).unwrap().unwrap();
    let mut resolution = theirs.clone();
    resolution.state = AlertState::Resolved;
    resolution.resolve_time = Some(at(50));
    let resolved = here.record_alerts(std::slice::from_ref(&resolution)).await.remove(0).unwrap().unwrap();
    assert_eq!((resolved.sequence, resolved.kind), (5, AlertEventKind::Resolved));
    assert_eq!(resolved.alert, resolution);

    // Up to date again, this process goes on; the log has every event once, numbered without a gap.
    let mut closed = updated.alert.clone();
    closed.state = AlertState::Resolved;
    closed.resolve_time = Some(at(60));
    let last = here.record_alerts(&[closed.clone(), alert(farm_id, Severity::Info, 70)]).await;
    let last: Vec<u64> = last.into_iter().map(|event| event.unwrap().unwrap().sequence).collect();
    assert_eq!(last, vec![6, 7]);
    let logged = elsewhere.alert_events_after(0, None, Severity::Info, 100).await.unwrap();
    assert_eq!(sequences(&logged), (1..=7).collect::<Vec<_>>());
    assert_eq!(logged[5].alert, closed);
    assert_eq!(elsewhere.get_alert(open.id).await.unwrap(), closed);
}

async fn a_resolved_alert_is_kept_until_it_resolved_a_retention_ago(database: &Database) {
    let store = database.alerts();
    let farm_id = farm(database, "november").await;
    let long = alert(farm_id, Severity::Critical, 10);
    store.record_alert(&long).await.unwrap().unwrap();
    store.set_alert_state(long.id, AlertState::Resolved, at(180)).await.unwrap();
    store.apply_alert_retention(at(100), at(5), 10).await.unwrap();
    // Opened before the retention's start (150) but resolved after it: kept (an agent that resends it after a
    // restart must find it, not open it again).
    let step = store.apply_alert_retention(at(200), at(150), 10).await.unwrap();
    assert_eq!(step.alerts, 0);
    assert_eq!(store.get_alert(long.id).await.unwrap().state, AlertState::Resolved);
    let step = store.apply_alert_retention(at(400), at(190), 10).await.unwrap();
    assert_eq!(step.alerts, 1, "resolved a retention ago");
    assert!(matches!(store.get_alert(long.id).await, Err(Error::NotFound { .. })));
}

async fn retention_deletes_old_events_and_resolved_alerts_but_not_what_a_webhook_awaits(database: &Database) {
    let store = database.alerts();
    let farm_id = farm(database, "lima").await;
    let retained = |after| async move {
        sequences(&database.alerts().alert_events_after(after, None, Severity::Info, 100).await.unwrap())
    };
    let (old_resolved, old_open) = (alert(farm_id, Severity::Critical, 10), alert(farm_id, Severity::Critical, 11));
    store.record_alert(&old_resolved).await.unwrap().unwrap();
    store.record_alert(&old_open).await.unwrap().unwrap();
    store.set_alert_state(old_resolved.id, AlertState::Resolved, at(20)).await.unwrap();
    assert_eq!(store.last_alert_event().await.unwrap(), 3);

    // The first step notes where the log stands at 100; nothing was noted before, so no event is old yet.
    assert_eq!(store.apply_alert_retention(at(100), at(5), 10).await.unwrap(), AlertRetention::default());
    let recent = alert(farm_id, Severity::Critical, 500);
    store.record_alert(&recent).await.unwrap().unwrap();
    store.set_alert_state(recent.id, AlertState::Resolved, at(510)).await.unwrap();
    let hook = webhook(farm_id, "https://hooks.example.com/lima", 1);
    store.create_webhook(&hook).await.unwrap();
    // A webhook of a farm with no events holds nothing back.
    let quiet = farm(database, "mike").await;
    store.create_webhook(&webhook(quiet, "https://hooks.example.com/mike", 0)).await.unwrap();

    // Events 1 to 3 were in the log at the note of 100, but the webhook has been given only event 1. The resolved
    // alert opened at 10 goes; the open one stays whatever its age.
    let step = store.apply_alert_retention(at(200), at(150), 10).await.unwrap();
    assert_eq!(step, AlertRetention { events: 1, alerts: 1 });
    assert_eq!((store.alert_event_horizon().await.unwrap(), retained(0).await), (1, vec![2, 3, 4, 5]));
    assert!(matches!(store.get_alert(old_resolved.id).await, Err(Error::NotFound { .. })));
    assert_eq!(store.get_alert(old_open.id).await.unwrap().state, AlertState::Open);

    // Once the webhook has everything, the limit bounds each step.
    store.record_delivery(hook.id, &DeliveryOutcome::Delivered { sequence: 5, at: at(520) }).await.unwrap();
    let step = store.apply_alert_retention(at(300), at(150), 1).await.unwrap();
    assert_eq!((step, retained(0).await), (AlertRetention { events: 1, alerts: 0 }, vec![3, 4, 5]));
    let step = store.apply_alert_retention(at(300), at(150), 10).await.unwrap();
    assert_eq!((step, retained(0).await), (AlertRetention { events: 1, alerts: 0 }, vec![4, 5]));

    // Much later every event is old, but the newest stays: numbering goes on from it.
    let step = store.apply_alert_retention(at(1000), at(900), 10).await.unwrap();
    assert_eq!((step, retained(0).await), (AlertRetention { events: 1, alerts: 1 }, vec![5]));
    assert_eq!(store.apply_alert_retention(at(1000), at(900), 10).await.unwrap(), AlertRetention::default());
    assert_eq!(store.alert_event_horizon().await.unwrap(), 4);
    let next = store.record_alert(&alert(farm_id, Severity::Critical, 1100)).await.unwrap().unwrap();
    assert_eq!(next.sequence, 6);
    assert_eq!(retained(4).await, vec![5, 6]);
}

fn webhook(farm_id: Uuid, url: &str, delivered_sequence: u64) -> Webhook {
    Webhook {
        id: Uuid::now_v7(),
        farm_id,
        url: url.into(),
        min_severity: Severity::Warning,
        secret: "s3cr3t-hmac-key".into(),
        state: WebhookState::Healthy,
        consecutive_failures: 0,
        last_error: None,
        last_success_time: None,
        create_time: at(1),
        delivered_sequence,
    }
}

async fn webhooks_are_stored_and_track_their_deliveries(database: &Database) {
    let store = database.alerts();
    let (farm_a, farm_b) = (farm(database, "juliet").await, farm(database, "kilo").await);
    let first = webhook(farm_a, "https://hooks.example.com/a", 3);
    let second = webhook(farm_a, "https://hooks.example.com/b", 0);
    let other = webhook(farm_b, "https://hooks.example.com/c", 0);
    for hook in [&first, &second, &other] {
        store.create_webhook(hook).await.unwrap();
    }
    let lost = store.create_webhook(&webhook(Uuid::now_v7(), "https://x.example.com", 0)).await.unwrap_err();
    assert!(matches!(lost, Error::NotFound { resource: "farm", .. }), "{lost:?}");
    assert!(matches!(store.create_webhook(&first).await, Err(Error::AlreadyExists(_))));

    assert_eq!(store.get_webhook(first.id).await.unwrap(), first);
    assert_eq!(store.list_webhooks(None, None, 10).await.unwrap(), vec![first.clone(), second.clone(), other.clone()]);
    assert_eq!(store.list_webhooks(Some(farm_a), None, 10).await.unwrap(), vec![first.clone(), second.clone()]);
    assert_eq!(store.list_webhooks(None, Some(first.id), 1).await.unwrap(), vec![second.clone()]);
    assert_eq!(store.list_webhooks(Some(farm_b), Some(other.id), 10).await.unwrap(), vec![]);

    let failed = DeliveryOutcome::Failed { error: "connection refused".into(), mark_failing: false };
    let after = store.record_delivery(first.id, &failed).await.unwrap();
    assert_eq!(
        (after.state, after.consecutive_failures, after.last_error.as_deref(), after.delivered_sequence),
        (WebhookState::Healthy, 1, Some("connection refused"), 3)
    );
    let gave_up = DeliveryOutcome::Failed { error: "http 503".into(), mark_failing: true };
    let after = store.record_delivery(first.id, &gave_up).await.unwrap();
    assert_eq!(
        (after.state, after.consecutive_failures, after.last_error.as_deref(), after.delivered_sequence),
        (WebhookState::Failing, 2, Some("http 503"), 3)
    );
    let after = store.record_delivery(first.id, &failed).await.unwrap();
    assert_eq!((after.state, after.consecutive_failures), (WebhookState::Failing, 3), "failing stays failing");

    let delivered = store.record_delivery(first.id, &DeliveryOutcome::Delivered { sequence: 9, at: at(100) }).await;
    let delivered = delivered.unwrap();
    assert_eq!(
        (delivered.state, delivered.consecutive_failures, delivered.last_error, delivered.last_success_time),
        (WebhookState::Healthy, 0, None, Some(at(100)))
    );
    assert_eq!(delivered.delivered_sequence, 9);
    let late = store.record_delivery(first.id, &DeliveryOutcome::Delivered { sequence: 7, at: at(110) }).await;
    let late = late.unwrap();
    assert_eq!((late.delivered_sequence, late.last_success_time), (9, Some(at(110))), "the cursor never goes back");
    assert_eq!(store.get_webhook(first.id).await.unwrap(), late);
    assert_eq!(store.get_webhook(second.id).await.unwrap(), second, "other webhooks are untouched");

    // One deliverer at a time: the holder renews its lease, another process takes it over only once it ran out
    // (by the store's clock).
    let (one, two) = (Uuid::now_v7(), Uuid::now_v7());
    let (long, short) = (Duration::from_secs(30), Duration::from_millis(500));
    assert!(store.lease_webhook(first.id, one, long).await.unwrap());
    assert!(!store.lease_webhook(first.id, two, long).await.unwrap(), "held by another");
    assert!(store.lease_webhook(first.id, one, short).await.unwrap(), "renewed by its holder, for less");
    assert!(!store.lease_webhook(first.id, two, long).await.unwrap(), "still held");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(store.lease_webhook(first.id, two, long).await.unwrap(), "taken over once it ran out");
    assert!(!store.lease_webhook(first.id, one, long).await.unwrap());
    let missing = store.lease_webhook(Uuid::now_v7(), one, long).await.unwrap_err();
    assert!(matches!(missing, Error::NotFound { resource: "webhook", .. }), "{missing:?}");

    store.delete_webhook(second.id).await.unwrap();
    assert!(matches!(store.get_webhook(second.id).await, Err(Error::NotFound { resource: "webhook", .. })));
    assert!(matches!(store.delete_webhook(second.id).await, Err(Error::NotFound { .. })));
    assert!(matches!(store.record_delivery(second.id, &failed).await, Err(Error::NotFound { .. })));
    assert_eq!(ids_of(&store.list_webhooks(Some(farm_a), None, 10).await.unwrap()), vec![first.id]);
}

fn ids_of(webhooks: &[Webhook]) -> Vec<Uuid> {
    webhooks.iter().map(|hook| hook.id).collect()
}

async fn alerts_survive_a_reopen(harness: &Harness) {
    let database = &harness.database;
    let farm_id = farm(database, "lima").await;
    let rule = rule(farm_id, "hot", threshold());
    database.alerts().create_rule(&rule).await.unwrap();
    let open = alert(farm_id, Severity::Critical, 10);
    database.alerts().record_alert(&open).await.unwrap();

    let reopened = harness.reopen().await;
    let store = reopened.alerts();
    assert_eq!(store.rules_snapshot(farm_id).await.unwrap(), (1, vec![rule]));
    assert_eq!(store.get_alert(open.id).await.unwrap(), open);
    let next = store.record_alert(&alert(farm_id, Severity::Info, 20)).await.unwrap().unwrap();
    assert_eq!(next.sequence, 2, "numbering goes on after a restart");
    // The registry still reads farms that now carry a rules version.
    assert_eq!(reopened.registry().get_farm(farm_id).await.unwrap().registry_version, 0);
}

macro_rules! alert_suite {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn a_resolved_alert_is_kept_until_it_resolved_a_retention_ago() {
                super::a_resolved_alert_is_kept_until_it_resolved_a_retention_ago(&Harness::$backend().await.database)
                    .await;
            }

            #[tokio::test]
            async fn retention_deletes_old_events_and_resolved_alerts_but_not_what_a_webhook_awaits() {
                super::retention_deletes_old_events_and_resolved_alerts_but_not_what_a_webhook_awaits(
                    &Harness::$backend().await.database,
                )
                .await;
            }

            #[tokio::test]
            async fn rules_move_their_farms_version_and_snapshot_together() {
                super::rules_move_their_farms_version_and_snapshot_together(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn copies_of_one_alert_merge_into_one_row_with_an_event_per_change() {
                super::copies_of_one_alert_merge_into_one_row_with_an_event_per_change(
                    &Harness::$backend().await.database,
                )
                .await;
            }

            #[tokio::test]
            async fn a_burst_is_recorded_at_once_and_a_refused_alert_keeps_no_other_out() {
                super::a_burst_is_recorded_at_once_and_a_refused_alert_keeps_no_other_out(
                    &Harness::$backend().await.database,
                )
                .await;
            }

            #[tokio::test]
            async fn the_unresolved_alerts_of_a_rule_on_a_device_are_found() {
                super::the_unresolved_alerts_of_a_rule_on_a_device_are_found(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn people_acknowledge_and_resolve_alerts_once() {
                super::people_acknowledge_and_resolve_alerts_once(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn alerts_are_listed_newest_first_by_filter_and_keyset() {
                super::alerts_are_listed_newest_first_by_filter_and_keyset(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn the_event_log_is_gapless_filtered_and_resumable() {
                super::the_event_log_is_gapless_filtered_and_resumable(&Harness::$backend().await.database).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_writers_number_events_without_gaps() {
                super::concurrent_writers_number_events_without_gaps(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn webhooks_are_stored_and_track_their_deliveries() {
                super::webhooks_are_stored_and_track_their_deliveries(&Harness::$backend().await.database).await;
            }

            #[tokio::test]
            async fn a_writer_whose_copy_is_out_of_date_merges_with_what_is_stored() {
                super::a_writer_whose_copy_is_out_of_date_merges_with_what_is_stored(&Harness::$backend().await).await;
            }

            #[tokio::test]
            async fn alerts_survive_a_reopen() {
                super::alerts_survive_a_reopen(&Harness::$backend().await).await;
            }
        }
    };
}

alert_suite!(sqlite);
alert_suite!(postgres);
