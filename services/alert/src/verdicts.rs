//! Model verdicts to alerts: the inference role announces diseases on photos and anomalous stretches of sensor
//! series on the bus; here each farm's model-verdict rules turn them into alerts (with the photo or the series
//! window as evidence). The evaluator of a farm is built on first use and given the farm's rules again when they
//! change (or when the bus may have lost a change), keeping what it learnt about unchanged rules: a repeat within a
//! rule's cooldown joins the alert it follows even after another rule of the farm changed. An alert a
//! copy of this task on another replica records too is merged into the same row (alert ids are derived), so running
//! it on every replica is harmless.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::broadcast;
use uuid::Uuid;

use smartfarm_bus::{Bus, Event};
use smartfarm_core::rules::{AnomalyVerdict, DiseaseVerdict, Evaluator, Origin};
use smartfarm_core::{Result, time};
use smartfarm_store::AlertStore;

pub(crate) async fn run(alerts: Arc<dyn AlertStore>, bus: Bus) {
    let mut events = bus.subscribe();
    let mut evaluators: HashMap<Uuid, Evaluator> = HashMap::new();
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "the verdict listener fell behind the bus; some verdicts raised no alert");
                // What was missed may have changed rules.
                let farms: Vec<Uuid> = evaluators.keys().copied().collect();
                for farm_id in farms {
                    reload_rules(&*alerts, &mut evaluators, farm_id).await;
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let result = match event {
            Event::RulesChanged { farm_id } => {
                reload_rules(&*alerts, &mut evaluators, farm_id).await;
                Ok(())
            }
            Event::DiseaseDetected(detected) => {
                let verdict = DiseaseVerdict {
                    camera: detected.device_id,
                    image_id: Some(detected.image_id),
                    label: detected.label,
                    confidence: detected.confidence,
                    healthy: false,
                    capture_time: detected.capture_time,
                };
                evaluate(&*alerts, &bus, &mut evaluators, detected.farm_id, |evaluator| evaluator.on_disease(&verdict))
                    .await
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
                evaluate(&*alerts, &bus, &mut evaluators, detected.farm_id, |evaluator| evaluator.on_anomaly(&verdict))
                    .await
            }
            _ => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "a model verdict could not be turned into an alert");
        }
    }
}

/// Gives a farm's evaluator, if it has one, the farm's rules as stored now; one that cannot be given them is
/// dropped, to be built afresh on its next use.
async fn reload_rules(alerts: &dyn AlertStore, evaluators: &mut HashMap<Uuid, Evaluator>, farm_id: Uuid) {
    let Some(evaluator) = evaluators.get_mut(&farm_id) else { return };
    match alerts.rules_snapshot(farm_id).await {
        Ok((_, rules)) => evaluator.set_rules(rules, time::now()),
        Err(error) => {
            tracing::warn!(%farm_id, %error, "cannot read the farm's rules; its verdict evaluator starts over");
            evaluators.remove(&farm_id);
        }
    }
}

async fn evaluate(
    alerts: &dyn AlertStore,
    bus: &Bus,
    evaluators: &mut HashMap<Uuid, Evaluator>,
    farm_id: Uuid,
    run: impl FnOnce(&mut Evaluator) -> Vec<smartfarm_core::rules::Alert>,
) -> Result<()> {
    let evaluator = match evaluators.entry(farm_id) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => {
            let (_, rules) = alerts.rules_snapshot(farm_id).await?;
            let mut evaluator = Evaluator::new(farm_id, Origin::Cloud);
            evaluator.set_rules(rules, time::now());
            entry.insert(evaluator)
        }
    };
    let raised = run(evaluator);
    for alert in raised {
        crate::record(alerts, bus, &alert).await?;
    }
    Ok(())
}
