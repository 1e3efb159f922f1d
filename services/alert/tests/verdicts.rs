//! Model verdicts to alerts through the alert role's verdict listener: a diagnosis repeated within its rule's
//! cooldown joins the alert it follows, even after another rule of the farm changed in between, and a healthy photo
//! of the camera resolves it.

use std::time::{Duration, SystemTime};

use tonic::Request;
use uuid::Uuid;

use smartfarm_alert::AlertApi;
use smartfarm_bus::{Bus, Diagnosis, Event, ModelVersion};
use smartfarm_core::Principal;
use smartfarm_core::config::AlertsConfig;
use smartfarm_core::rules::AlertState;
use smartfarm_proto::alert::v1 as pb;
use smartfarm_proto::alert::v1::alert_service_server::AlertService;
use smartfarm_proto::pbjson_types;
use smartfarm_store::alerts::AlertFilter;
use smartfarm_store::testing::TestDatabase;

fn as_admin<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Principal::Admin { api_key_id: Uuid::now_v7() });
    request
}

fn rule(farm_id: Uuid, name: &str, condition: pb::rule::Condition) -> pb::CreateRuleRequest {
    pb::CreateRuleRequest {
        rule: Some(pb::Rule {
            farm_id: farm_id.to_string(),
            name: name.into(),
            severity: 3,
            cooldown: Some(pbjson_types::Duration { seconds: 3600, nanos: 0 }),
            condition: Some(condition),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn a_repeat_within_the_cooldown_joins_its_alert_across_a_change_of_another_rule() {
    let test = TestDatabase::sqlite().await;
    let store = test.database.alerts();
    let farm_id = test.database.registry().create_farm(Uuid::now_v7(), "orchard", SystemTime::now()).await.unwrap().id;
    let bus = Bus::in_process();
    let api = AlertApi::new(test.database.registry(), store.clone(), bus.clone(), AlertsConfig::default());
    let verdict = pb::rule::Condition::ModelVerdict(pb::ModelVerdictCondition {
        disease_labels: vec![],
        min_confidence: 0.8,
        on_sensor_anomaly: false,
    });
    api.create_rule(as_admin(rule(farm_id, "disease", verdict))).await.unwrap();
    tokio::spawn(api.clone().run_verdicts());
    tokio::time::sleep(Duration::from_millis(100)).await; // The listener is subscribed.

    let camera = Uuid::now_v7();
    let diagnosis = |capture_time: SystemTime| {
        Event::DiseaseDetected(Diagnosis {
            farm_id,
            device_id: camera,
            image_id: Uuid::now_v7(),
            label: "Apple___Black_rot".into(),
            confidence: 0.95,
            model: ModelVersion { name: "leafnet".into(), version: "1".into() },
            capture_time,
        })
    };
    let alerts = || async {
        let filter = AlertFilter { farm_id: Some(farm_id), ..AlertFilter::default() };
        store.list_alerts(&filter, None, 100).await.unwrap()
    };
    let settled = |count: u64| async move {
        for _ in 0..100 {
            let listed = alerts().await;
            if listed.iter().map(|alert| alert.count).sum::<u64>() >= count {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        alerts().await
    };
    let ten = SystemTime::now() - Duration::from_secs(1800);
    bus.publish(diagnosis(ten));
    assert_eq!(settled(1).await.len(), 1, "the diagnosis opened an alert");

    // Another rule of the farm changes; the disease rule stays as it was.
    let threshold =
        pb::rule::Condition::Threshold(pb::ThresholdCondition { direction: 1, limit: 40.0, for_duration: None });
    let mut hot = rule(farm_id, "hot", threshold);
    hot.rule.as_mut().unwrap().metric = "temperature".into();
    api.create_rule(as_admin(hot)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    bus.publish(diagnosis(ten + Duration::from_secs(1200)));
    let listed = settled(2).await;
    assert_eq!(listed.len(), 1, "twenty minutes later, within the hour's cooldown: one alert, {listed:?}");
    assert_eq!(listed[0].count, 2, "{listed:?}");

    // A healthy photo of the camera clears the alert; the next disease opens a new one.
    bus.publish(Event::HealthyDiagnosed(Diagnosis {
        farm_id,
        device_id: camera,
        image_id: Uuid::now_v7(),
        label: "Apple___healthy".into(),
        confidence: 0.97,
        model: ModelVersion { name: "leafnet".into(), version: "1".into() },
        capture_time: ten + Duration::from_secs(1500),
    }));
    let mut resolved = false;
    for _ in 0..100 {
        if alerts().await[0].state == AlertState::Resolved {
            resolved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resolved, "the healthy photo resolved the alert: {:?}", alerts().await);
    bus.publish(diagnosis(ten + Duration::from_secs(1600)));
    let listed = settled(3).await;
    assert_eq!(listed.len(), 2, "a disease after the healthy photo is a new alert: {listed:?}");
}

#[tokio::test]
async fn a_healthy_photo_resolves_a_disease_alert_the_listener_learnt_before_it_restarted() {
    let test = TestDatabase::sqlite().await;
    let store = test.database.alerts();
    let farm_id = test.database.registry().create_farm(Uuid::now_v7(), "orchard", SystemTime::now()).await.unwrap().id;
    let bus = Bus::in_process();
    let api = AlertApi::new(test.database.registry(), store.clone(), bus.clone(), AlertsConfig::default());
    let verdict = pb::rule::Condition::ModelVerdict(pb::ModelVerdictCondition {
        disease_labels: vec![],
        min_confidence: 0.8,
        on_sensor_anomaly: false,
    });
    api.create_rule(as_admin(rule(farm_id, "disease", verdict))).await.unwrap();
    let listener = tokio::spawn(api.clone().run_verdicts());
    tokio::time::sleep(Duration::from_millis(100)).await; // The listener is subscribed.

    let camera = Uuid::now_v7();
    let diagnosis = |label: &str, capture_time: SystemTime| Diagnosis {
        farm_id,
        device_id: camera,
        image_id: Uuid::now_v7(),
        label: label.into(),
        confidence: 0.95,
        model: ModelVersion { name: "leafnet".into(), version: "1".into() },
        capture_time,
    };
    let alerts = || async {
        let filter = AlertFilter { farm_id: Some(farm_id), ..AlertFilter::default() };
        store.list_alerts(&filter, None, 100).await.unwrap()
    };
    let opened = SystemTime::now() - Duration::from_secs(600);
    bus.publish(Event::DiseaseDetected(diagnosis("Apple___Black_rot", opened)));
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = alerts().await;
        if !listed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((listed.len(), listed[0].state), (1, AlertState::Open), "{listed:?}");

    // The listener restarts (a deploy): its evaluators start empty. A healthy photo still resolves the alert.
    listener.abort();
    tokio::spawn(api.clone().run_verdicts());
    tokio::time::sleep(Duration::from_millis(100)).await;
    bus.publish(Event::HealthyDiagnosed(diagnosis("Apple___healthy", opened + Duration::from_secs(300))));
    let mut resolved = None;
    for _ in 0..100 {
        let listed = alerts().await;
        if listed[0].state == AlertState::Resolved {
            resolved = Some(listed[0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resolved = resolved.unwrap_or_else(|| panic!("the healthy photo did not resolve it: {:?}", listed));
    assert_eq!(resolved.resolve_time, Some(opened + Duration::from_secs(300)), "resolved when the photo was taken");
    assert!(!resolved.resolved_by_hand);
}
