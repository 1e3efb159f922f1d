//! Model verdicts to alerts: the inference role announces diseases on photos (and healthy photos, which clear a
//! camera's disease alerts) and anomalous stretches of sensor series on the bus; here each farm's model-verdict
//! rules turn them into alerts (with the photo or the series window as evidence). The evaluator of a farm is built on first use, and given the farm's rules again before its
//! next verdict once they changed (or once the bus may have lost a change), keeping what it learnt about unchanged
//! rules: a repeat within a rule's cooldown joins the alert it follows even after another rule of the farm changed.
//! An alert a
//! copy of this task on another replica records too is merged into the same row (alert ids are derived), so running
//! it on every replica is harmless.
//!
//! Anomalies come from the scoring of listed batches (see `TelemetryStore::claim_unscored`): once every stretch a
//! scoring announced is recorded, this role takes the batch off the list. A stretch whose alert was not recorded
//! (its event lost, this role behind or down, a database error) leaves the batch listed, and the late scorer
//! announces it again. A photo's verdict is confirmed on the photo in the same way once recorded; an unconfirmed
//! one is diagnosed and announced again (`ImageStore::images_to_diagnose`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;
use uuid::Uuid;

use smartfarm_bus::{Bus, Event};
use smartfarm_core::rules::{
    Alert, AlertState, AnomalyVerdict, Condition, DISEASE_METRIC, DiseaseVerdict, Evaluator, Origin,
};
use smartfarm_core::{Result, time};
use smartfarm_store::{AlertStore, ImageStore, TelemetryStore};

/// Scorings whose end (`Event::BatchScored`) has not arrived yet, at most: a listener that lost those ends forgets
/// what it counted (their batches are scored again).
const SCORINGS_IN_FLIGHT: usize = 4096;

/// What a scoring's stretches came to so far: how many alerts were recorded, and whether one was not.
#[derive(Default)]
struct Tally {
    recorded: u32,
    failed: bool,
}

/// Where the verdicts' sources wait for this role's confirmation (see the module's doc).
#[derive(Clone, Default)]
pub(crate) struct Confirmations {
    pub scored_batches: Option<Arc<dyn TelemetryStore>>,
    pub diagnosed_photos: Option<Arc<dyn ImageStore>>,
}

pub(crate) async fn run(alerts: Arc<dyn AlertStore>, bus: Bus, confirmations: Confirmations) {
    let Confirmations { scored_batches, diagnosed_photos } = confirmations;
    let mut events = bus.subscribe();
    let mut evaluators: HashMap<Uuid, Evaluator> = HashMap::new();
    // Farms whose rules may have changed since their evaluator last read them.
    let mut stale: HashSet<Uuid> = HashSet::new();
    let mut scorings: HashMap<Uuid, Tally> = HashMap::new();
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "the verdict listener fell behind the bus; some verdicts raised no alert");
                // What was missed may have changed rules, or resolved an alert by hand that a later verdict would
                // otherwise be folded into (and lost with it): every farm starts over, from its rules as they are now,
                // read on its next verdict. A repeat then opens a new alert rather than joining one.
                evaluators.clear();
                stale.clear();
                // Some stretches may be among what was missed: none of those scorings confirms its batch.
                scorings.clear();
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // A healthy diagnosis clears the camera's disease alerts.
        let healthy = matches!(event, Event::HealthyDiagnosed(_));
        // The photo and the verdict it is confirmed for (a newer one of the photo stays pending).
        let photo = match &event {
            Event::DiseaseDetected(detected) | Event::HealthyDiagnosed(detected) => {
                Some((detected.image_id, detected.label.clone(), detected.model.version.clone()))
            }
            _ => None,
        };
        let verdict_of = match &event {
            Event::DiseaseDetected(detected) | Event::HealthyDiagnosed(detected) => Some((detected.farm_id, None)),
            Event::AnomalyDetected(detected) => Some((detected.farm_id, detected.scoring)),
            _ => None,
        };
        let result = match event {
            Event::RulesChanged { farm_id } => {
                stale.insert(farm_id);
                Ok(())
            }
            // A verdict alert a person resolved is over: the next verdict opens a new one.
            Event::AlertChanged(changed)
                if changed.by_hand && changed.alert.state == smartfarm_core::rules::AlertState::Resolved =>
            {
                if let Some(evaluator) = evaluators.get_mut(&changed.alert.farm_id) {
                    evaluator.resolved_by_hand(&changed.alert);
                }
                Ok(())
            }
            Event::DiseaseDetected(detected) | Event::HealthyDiagnosed(detected) => {
                let verdict = DiseaseVerdict {
                    camera: detected.device_id,
                    image_id: Some(detected.image_id),
                    healthy,
                    label: detected.label,
                    confidence: detected.confidence,
                    capture_time: detected.capture_time,
                };
                // The camera's disease alerts the farm's evaluator holds: its own verdicts decide when they end.
                let held: Vec<Uuid> = evaluators.get(&detected.farm_id).map_or_else(Vec::new, |evaluator| {
                    evaluator
                        .open_alerts()
                        .into_iter()
                        .filter(|alert| alert.device_id == Some(verdict.camera) && alert.metric == DISEASE_METRIC)
                        .map(|alert| alert.id)
                        .collect()
                });
                let evaluated =
                    evaluate(&*alerts, &bus, (&mut evaluators, &mut stale), detected.farm_id, |evaluator| {
                        evaluator.on_disease(&verdict)
                    })
                    .await;
                if healthy {
                    let (farm_id, camera, healthy_at) = (detected.farm_id, verdict.camera, verdict.capture_time);
                    let stored = resolve_stored_disease_alerts(&*alerts, &bus, farm_id, camera, healthy_at, &held);
                    evaluated.and(stored.await)
                } else {
                    evaluated
                }
            }
            Event::AnomalyDetected(detected) => {
                let verdict = AnomalyVerdict {
                    device: detected.device_id,
                    metric: detected.metric,
                    start_time: detected.start_time,
                    end_time: detected.end_time,
                    peak_value: detected.peak_value,
                    peak_score: detected.peak_score,
                };
                evaluate(&*alerts, &bus, (&mut evaluators, &mut stale), detected.farm_id, |evaluator| {
                    evaluator.on_anomaly(&verdict)
                })
                .await
            }
            Event::BatchScored(scored) => {
                let tally = scorings.remove(&scored.scoring).unwrap_or_default();
                match &scored_batches {
                    Some(telemetry) if scored.all_scored && !tally.failed && tally.recorded == scored.stretches => {
                        let confirmed = telemetry.forget_unscored(&[scored.batch]).await;
                        if confirmed.is_ok() {
                            metrics::counter!("smartfarm_alert_scored_batches_confirmed_total").increment(1);
                        }
                        confirmed
                    }
                    // Left listed: scored again later, its stretches announced again (as is one whose scoring
                    // failed, which its scorer logged).
                    Some(_) if scored.all_scored => {
                        metrics::counter!("smartfarm_alert_scored_batches_left_listed_total").increment(1);
                        tracing::warn!(
                            gateway_id = %scored.batch.gateway_id,
                            last_sequence = scored.batch.last_sequence,
                            stretches = scored.stretches,
                            recorded = tally.recorded,
                            "not every anomaly of a scored batch has its alert; it is scored again later"
                        );
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        };
        // A photo's verdict recorded: the photo is no longer diagnosed again for it.
        if let (Some((image_id, label, model_version)), Some(images), Ok(())) = (photo, &diagnosed_photos, &result) {
            match images.confirm_verdict(image_id, &label, &model_version).await {
                Ok(()) => metrics::counter!("smartfarm_alert_photo_verdicts_confirmed_total").increment(1),
                Err(error) => {
                    tracing::warn!(%image_id, %error, "cannot confirm a photo's verdict; it is diagnosed again later")
                }
            }
        }
        if let Some((farm_id, scoring)) = verdict_of {
            if let Some(scoring) = scoring {
                if scorings.len() >= SCORINGS_IN_FLIGHT && !scorings.contains_key(&scoring) {
                    scorings.clear();
                }
                let tally = scorings.entry(scoring).or_default();
                match &result {
                    Ok(()) => tally.recorded += 1,
                    Err(_) => tally.failed = true,
                }
            }
            if result.is_err() {
                // Its evaluator may hold an alert that was not recorded, and would take the verdict announced again
                // for nothing new: the farm starts over from its rules, as after a lag.
                evaluators.remove(&farm_id);
                stale.remove(&farm_id);
            }
        }
        if let Err(error) = result {
            tracing::warn!(%error, "a model verdict could not be turned into an alert");
        }
    }
}

/// Resolves the camera's disease alerts that are still open in the store although no disease was seen after the
/// healthy photo, except those the farm's evaluator held (`held`, by id), whose end its own verdicts decide: the
/// others it never held, or no longer does (it was built after they opened, when this role restarted or started
/// over after the bus lagged; or a later occurrence replaced them), so its healthy verdict could not clear them.
async fn resolve_stored_disease_alerts(
    alerts: &dyn AlertStore,
    bus: &Bus,
    farm_id: Uuid,
    camera: Uuid,
    healthy_at: SystemTime,
    held: &[Uuid],
) -> Result<()> {
    let (_, rules) = alerts.rules_snapshot(farm_id).await?;
    let verdict_rules = rules.iter().filter(|rule| {
        matches!(rule.condition, Condition::ModelVerdict { .. }) && rule.device_id.is_none_or(|only| only == camera)
    });
    for rule in verdict_rules {
        for mut alert in alerts.unresolved_alerts_of(rule.id, Some(camera)).await? {
            // A disease seen after the healthy photo (it came late) keeps the alert open.
            if alert.metric != DISEASE_METRIC || alert.last_time > healthy_at || held.contains(&alert.id) {
                continue;
            }
            alert.state = AlertState::Resolved;
            // At the precision the evaluators and the store keep.
            alert.resolve_time = Some(time::from_unix_micros(time::to_unix_micros(healthy_at)));
            crate::record(alerts, bus, &alert).await?;
        }
    }
    Ok(())
}

/// Runs a verdict through the farm's evaluator (built, or given the farm's rules again when they are `stale`) and
/// records the alerts it raises.
async fn evaluate(
    alerts: &dyn AlertStore,
    bus: &Bus,
    (evaluators, stale): (&mut HashMap<Uuid, Evaluator>, &mut HashSet<Uuid>),
    farm_id: Uuid,
    run: impl FnOnce(&mut Evaluator) -> Vec<Alert>,
) -> Result<()> {
    if stale.remove(&farm_id)
        && let Some(evaluator) = evaluators.get_mut(&farm_id)
    {
        match alerts.rules_snapshot(farm_id).await {
            Ok((_, rules)) => {
                // Verdict alerts of a deleted rule: over (DeleteRule resolved the stored ones already).
                for ended in evaluator.set_rules(rules, time::now()) {
                    crate::record(alerts, bus, &ended).await?;
                }
            }
            Err(error) => {
                stale.insert(farm_id);
                return Err(error);
            }
        }
    }
    let evaluator = match evaluators.entry(farm_id) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => {
            let (_, rules) = alerts.rules_snapshot(farm_id).await?;
            let mut evaluator = Evaluator::new(farm_id, Origin::Cloud);
            // A new evaluator holds no alert yet: nothing ends.
            let _ = evaluator.set_rules(rules, time::now());
            entry.insert(evaluator)
        }
    };
    let raised = run(evaluator);
    for alert in raised {
        let alert = match alert.metric != DISEASE_METRIC && alert.count == 1 {
            true => join_stored_anomaly(alerts, evaluator, alert).await?,
            false => alert,
        };
        crate::record(alerts, bus, &alert).await?;
    }
    Ok(())
}

/// An anomaly alert the evaluator has just opened may be for a stretch the store already holds: within an
/// unresolved alert of the same rule, device and metric, or within the rule's cooldown after it. The evaluator
/// lost its state (this role restarted, fell behind, or failed a write) and the stretch was announced again, or it
/// is a repeat that the lost state would have folded in. Then the stored alert is what changes (a repeat counted,
/// its end moved on), and the evaluator follows it from now on.
async fn join_stored_anomaly(alerts: &dyn AlertStore, evaluator: &mut Evaluator, raised: Alert) -> Result<Alert> {
    let Some(cooldown) = evaluator.rules().iter().find(|rule| rule.id == raised.rule_id).map(|rule| rule.cooldown)
    else {
        return Ok(raised);
    };
    let stored = alerts.unresolved_alerts_of(raised.rule_id, raised.device_id).await?;
    let holds_it = |alert: &Alert| {
        alert.id != raised.id
            && alert.metric == raised.metric
            && alert.open_time <= raised.open_time
            && raised.open_time <= alert.last_time + cooldown
    };
    // The newest of them (they come oldest first).
    let Some(mut joined) = stored.into_iter().rfind(holds_it) else {
        return Ok(raised);
    };
    if raised.open_time > joined.last_time {
        joined.count += 1;
    }
    if raised.last_time > joined.last_time {
        joined.last_time = raised.last_time;
        joined.value = raised.value;
    }
    evaluator.adopt_anomaly_alert(&raised, joined.clone());
    Ok(joined)
}
