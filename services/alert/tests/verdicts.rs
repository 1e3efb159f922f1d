//! Model verdicts to alerts through the alert role's verdict listener: a diagnosis repeated within its rule's
//! cooldown joins the alert it follows, even after another rule of the farm changed in between, and a healthy photo
//! of the camera resolves it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::Request;
use uuid::Uuid;

use smartfarm_alert::AlertApi;
use smartfarm_bus::{Bus, Diagnosis, Event, ModelVersion};
use smartfarm_core::Principal;
use smartfarm_core::config::AlertsConfig;
use smartfarm_core::rules::{Alert, AlertState};
use smartfarm_proto::alert::v1 as pb;
use smartfarm_proto::alert::v1::alert_service_server::AlertService;
use smartfarm_proto::pbjson_types;
use smartfarm_store::AlertStore;
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

/// A farm with a rule on any disease at 80 % or more, its alert role over SQLite and an in-process bus.
struct Orchard {
    _database: TestDatabase,
    store: Arc<dyn AlertStore>,
    farm_id: Uuid,
    bus: Bus,
    api: AlertApi,
}

async fn orchard() -> Orchard {
    let database = TestDatabase::sqlite().await;
    let store = database.database.alerts();
    let registry = database.database.registry();
    let farm_id = registry.create_farm(Uuid::now_v7(), "orchard", SystemTime::now()).await.unwrap().id;
    let bus = Bus::in_process();
    let api = AlertApi::new(registry, store.clone(), bus.clone(), AlertsConfig::default());
    let verdict = pb::rule::Condition::ModelVerdict(pb::ModelVerdictCondition {
        disease_labels: vec![],
        min_confidence: 0.8,
        on_sensor_anomaly: false,
    });
    api.create_rule(as_admin(rule(farm_id, "disease", verdict))).await.unwrap();
    Orchard { _database: database, store, farm_id, bus, api }
}

impl Orchard {
    /// Starts the verdict listener (which subscribes to the bus when it starts: the 100 ms wait gives it time).
    async fn listen(&self) -> tokio::task::JoinHandle<()> {
        let listener = tokio::spawn(self.api.clone().run_verdicts());
        tokio::time::sleep(Duration::from_millis(100)).await;
        listener
    }

    /// A confident diagnosis of a photo `camera` took at `capture_time`.
    fn diagnosis(&self, camera: Uuid, label: &str, capture_time: SystemTime) -> Diagnosis {
        Diagnosis {
            farm_id: self.farm_id,
            device_id: camera,
            image_id: Uuid::now_v7(),
            label: label.into(),
            confidence: 0.95,
            model: ModelVersion { name: "leafnet".into(), version: "1".into() },
            capture_time,
        }
    }

    /// The farm's alerts once there are some and `done` holds of them, or as they are after 5 s.
    async fn alerts_once(&self, done: impl Fn(&[Alert]) -> bool) -> Vec<Alert> {
        let filter = AlertFilter { farm_id: Some(self.farm_id), ..AlertFilter::default() };
        for _ in 0..100 {
            let listed = self.store.list_alerts(&filter, None, 100).await.unwrap();
            if !listed.is_empty() && done(&listed) {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.store.list_alerts(&filter, None, 100).await.unwrap()
    }
}

/// An anomalous minute of `sensor`'s latency from `start`, found by `scoring`.
fn anomaly(farm_id: Uuid, sensor: Uuid, start: SystemTime, scoring: Option<Uuid>) -> Event {
    Event::AnomalyDetected(smartfarm_bus::AnomalyDetected {
        farm_id,
        device_id: sensor,
        metric: "latency".into(),
        start_time: start,
        end_time: start + Duration::from_secs(60),
        peak_time: start + Duration::from_secs(30),
        peak_score: 9.0,
        peak_value: 80.0,
        model: ModelVersion { name: "anomaly".into(), version: "1".into() },
        scoring,
    })
}

/// Whether the alerts' counts add up to `count` or more.
fn counted(count: u64) -> impl Fn(&[Alert]) -> bool {
    move |alerts| alerts.iter().map(|alert| alert.count).sum::<u64>() >= count
}

#[tokio::test]
async fn a_repeat_within_the_cooldown_joins_its_alert_across_a_change_of_another_rule() {
    let orchard = orchard().await;
    orchard.listen().await;
    let camera = Uuid::now_v7();
    let black_rot = |at| Event::DiseaseDetected(orchard.diagnosis(camera, "Apple___Black_rot", at));
    let ten = SystemTime::now() - Duration::from_secs(1800);
    orchard.bus.publish(black_rot(ten));
    assert_eq!(orchard.alerts_once(counted(1)).await.len(), 1, "the diagnosis opened an alert");

    // Another rule of the farm changes; the disease rule stays as it was.
    let threshold =
        pb::rule::Condition::Threshold(pb::ThresholdCondition { direction: 1, limit: 40.0, for_duration: None });
    let mut hot = rule(orchard.farm_id, "hot", threshold);
    hot.rule.as_mut().unwrap().metric = "temperature".into();
    orchard.api.create_rule(as_admin(hot)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    orchard.bus.publish(black_rot(ten + Duration::from_secs(1200)));
    let listed = orchard.alerts_once(counted(2)).await;
    assert_eq!(listed.len(), 1, "twenty minutes later, within the hour's cooldown: one alert, {listed:?}");
    assert_eq!(listed[0].count, 2, "{listed:?}");

    // A healthy photo of the camera clears the alert; the next disease opens a new one.
    let healthy = orchard.diagnosis(camera, "Apple___healthy", ten + Duration::from_secs(1500));
    orchard.bus.publish(Event::HealthyDiagnosed(healthy));
    let listed = orchard.alerts_once(|alerts| alerts[0].state == AlertState::Resolved).await;
    assert_eq!(listed[0].state, AlertState::Resolved, "the healthy photo resolved the alert: {listed:?}");
    orchard.bus.publish(black_rot(ten + Duration::from_secs(1600)));
    let listed = orchard.alerts_once(counted(3)).await;
    assert_eq!(listed.len(), 2, "a disease after the healthy photo is a new alert: {listed:?}");
}

#[tokio::test]
async fn a_healthy_photo_resolves_a_disease_alert_the_listener_learnt_before_it_restarted() {
    let orchard = orchard().await;
    let listener = orchard.listen().await;
    let camera = Uuid::now_v7();
    // Whole seconds: times the store keeps as they are.
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let opened = SystemTime::UNIX_EPOCH + Duration::from_secs(now - 600);
    let seen_again = opened + Duration::from_secs(200);
    for at in [opened, seen_again] {
        orchard.bus.publish(Event::DiseaseDetected(orchard.diagnosis(camera, "Apple___Black_rot", at)));
    }
    let listed = orchard.alerts_once(counted(2)).await;
    assert_eq!((listed.len(), listed[0].state, listed[0].count), (1, AlertState::Open, 2), "{listed:?}");

    // The listener restarts (a deploy): its evaluators start empty. A healthy photo taken before the disease was
    // seen again (it arrives late) leaves the alert open; one taken after resolves it.
    listener.abort();
    orchard.listen().await;
    let early = opened + Duration::from_secs(100);
    orchard.bus.publish(Event::HealthyDiagnosed(orchard.diagnosis(camera, "Apple___healthy", early)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed = orchard.alerts_once(|_| true).await;
    assert_eq!(listed[0].state, AlertState::Open, "a healthy photo older than the last disease: {listed:?}");
    let healed = opened + Duration::from_secs(300);
    orchard.bus.publish(Event::HealthyDiagnosed(orchard.diagnosis(camera, "Apple___healthy", healed)));
    let listed = orchard.alerts_once(|alerts| alerts[0].state == AlertState::Resolved).await;
    assert_eq!(listed[0].state, AlertState::Resolved, "the healthy photo did not resolve it: {listed:?}");
    assert_eq!(listed[0].resolve_time, Some(healed), "resolved when the photo was taken");
    assert!(!listed[0].resolved_by_hand);
}

#[tokio::test]
async fn a_healthy_photo_resolves_an_older_disease_alert_a_later_one_replaced() {
    let orchard = orchard().await;
    orchard.listen().await;
    let camera = Uuid::now_v7();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let first = SystemTime::UNIX_EPOCH + Duration::from_secs(now - 4 * 3600);
    // Two hours apart, past the rule's hour of cooldown: two alerts, the evaluator holding the second.
    for at in [first, first + Duration::from_secs(2 * 3600)] {
        orchard.bus.publish(Event::DiseaseDetected(orchard.diagnosis(camera, "Apple___Black_rot", at)));
    }
    let listed = orchard.alerts_once(|alerts| alerts.len() == 2).await;
    assert_eq!(listed.len(), 2, "{listed:?}");

    let healed = first + Duration::from_secs(3 * 3600);
    orchard.bus.publish(Event::HealthyDiagnosed(orchard.diagnosis(camera, "Apple___healthy", healed)));
    let listed = orchard.alerts_once(|alerts| alerts.iter().all(|alert| alert.state == AlertState::Resolved)).await;
    assert!(listed.iter().all(|alert| alert.state == AlertState::Resolved), "both resolved: {listed:?}");
}

/// The alert role takes a scored batch off the list once every stretch its scoring announced has its alert
/// recorded; a batch one of whose stretches never arrived stays listed, to be scored and announced again.
#[tokio::test]
async fn a_scored_batch_leaves_the_list_once_every_stretch_has_its_alert() {
    use smartfarm_bus::BatchScored;
    use smartfarm_core::batch::BatchKey;
    use smartfarm_store::model::DeviceKind;
    use smartfarm_store::telemetry::{EdgeBatch, ReadingRow};

    let database = TestDatabase::sqlite().await;
    let (farm_id, devices) = database.farm_with_devices(&[DeviceKind::Gateway, DeviceKind::Sensor]).await;
    let (gateway, sensor) = (devices[0], devices[1]);
    let (store, telemetry) = (database.database.alerts(), database.database.telemetry());
    let bus = Bus::in_process();
    let api = AlertApi::new(database.registry(), store.clone(), bus.clone(), AlertsConfig::default())
        .with_confirmations(telemetry.clone(), database.database.images());
    let anomalies = pb::rule::Condition::ModelVerdict(pb::ModelVerdictCondition {
        disease_labels: vec![],
        min_confidence: 0.8,
        on_sensor_anomaly: true,
    });
    api.create_rule(as_admin(rule(farm_id, "anomalies", anomalies))).await.unwrap();
    tokio::spawn(api.clone().run_verdicts());
    tokio::time::sleep(Duration::from_millis(100)).await;

    let spool_id = Uuid::now_v7();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let at = |seconds: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(now - 86_400 + seconds);
    let mut keys = Vec::new();
    for sequence in [1, 2] {
        let reading = ReadingRow {
            sequence,
            device_id: sensor,
            metric: "latency".into(),
            value: 1.0,
            measure_time: at(sequence),
        };
        let batch = EdgeBatch {
            gateway_id: gateway,
            spool_id,
            farm_id,
            first_sequence: sequence,
            last_sequence: sequence,
            readings: vec![reading],
            aggregates: Vec::new(),
            receive_time: SystemTime::now(),
            score_later: true,
        };
        telemetry.commit_batch(&batch, &[]).await.unwrap();
        keys.push(BatchKey { gateway_id: gateway, spool_id, last_sequence: sequence });
    }
    let stretch = |scoring: Uuid, start: u64| anomaly(farm_id, sensor, at(start), Some(scoring));
    // The first batch's scoring announced two stretches, both arrive. The second's announced two; one was lost.
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    bus.publish(stretch(first, 1000));
    bus.publish(stretch(first, 10_000));
    bus.publish(Event::BatchScored(BatchScored { batch: keys[0], scoring: first, stretches: 2, all_scored: true }));
    bus.publish(stretch(second, 20_000));
    bus.publish(Event::BatchScored(BatchScored { batch: keys[1], scoring: second, stretches: 2, all_scored: true }));

    let later = SystemTime::now() + Duration::from_secs(3600);
    let filter = AlertFilter { farm_id: Some(farm_id), ..AlertFilter::default() };
    let (mut listed, mut recorded) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        // A claim whose lease ends at once holds nothing back (what it counts as an attempt is of no matter here).
        listed = telemetry.claim_unscored(later, later, Duration::ZERO, 10, &[]).await.unwrap();
        recorded = store.list_alerts(&filter, None, 100).await.unwrap();
        if listed.len() == 1 && recorded.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(listed.iter().map(|batch| batch.key).collect::<Vec<_>>(), vec![keys[1]]);
    assert_eq!(recorded.len(), 3, "every stretch that arrived has its alert: {recorded:?}");
    // The second batch's end arrived after its one stretch: nothing confirms it later either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = telemetry.claim_unscored(later, later, Duration::ZERO, 10, &[]).await.unwrap();
    assert_eq!(listed.iter().map(|batch| batch.key).collect::<Vec<_>>(), vec![keys[1]]);
}

/// A repeat within the cooldown joins the stored anomaly alert even after the listener lost what it learnt (it
/// restarted), and a stretch announced again changes nothing: no second alert for one condition.
#[tokio::test]
async fn an_anomaly_repeat_after_a_restart_joins_the_stored_alert() {
    let orchard = orchard().await;
    let anomalies = pb::rule::Condition::ModelVerdict(pb::ModelVerdictCondition {
        disease_labels: vec![],
        min_confidence: 0.8,
        on_sensor_anomaly: true,
    });
    orchard.api.create_rule(as_admin(rule(orchard.farm_id, "anomalies", anomalies))).await.unwrap();
    let listener = orchard.listen().await;
    let sensor = Uuid::now_v7();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let at = |seconds: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(now - 86_400 + seconds);
    let stretch = |start: u64| anomaly(orchard.farm_id, sensor, at(start), None);
    orchard.bus.publish(stretch(1000));
    assert_eq!(orchard.alerts_once(counted(1)).await.len(), 1);

    // The listener restarts: what it learnt is gone. Twenty minutes later, within the hour's cooldown, a repeat.
    listener.abort();
    orchard.listen().await;
    orchard.bus.publish(stretch(2200));
    let listed = orchard.alerts_once(counted(2)).await;
    assert_eq!(listed.len(), 1, "one alert for one condition: {listed:?}");
    assert_eq!((listed[0].count, listed[0].last_time), (2, at(2260)), "{listed:?}");
    // Both stretches announced again (scored late): nothing changes. A stretch past the cooldown is a new alert.
    orchard.bus.publish(stretch(1000));
    orchard.bus.publish(stretch(2200));
    orchard.bus.publish(stretch(9000));
    let listed = orchard.alerts_once(|alerts| alerts.len() == 2).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let first = listed.iter().find(|alert| alert.open_time == at(1000)).expect("the first alert");
    assert_eq!((first.count, first.last_time), (2, at(2260)), "{listed:?}");
}
