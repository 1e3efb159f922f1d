//! The farm's alert rules on the Pi: the snapshot the cloud last pushed, cached on disk next to the spool (so rules
//! work offline and after a reboot), and the evaluator shared with the cloud, fed every accepted reading. What it
//! raises goes to the farm's alert topic at once and up the link's urgent lane; the cloud, evaluating the same rules
//! on the same readings, derives the same alert ids, so a farm's alert is one alert wherever it was noticed first.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use smartfarm_core::rules::{Alert, Evaluator, EvaluatorState, Origin, Rule};
use smartfarm_proto::ingestion::v1::RuleSnapshot;

use crate::payload::Measurement;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cached {
    version: u64,
    farm_id: Option<Uuid>,
    rules: Vec<Rule>,
}

/// The rules cache and its evaluator.
#[derive(Debug)]
pub struct EdgeRules {
    path: PathBuf,
    state: Mutex<(u64, Option<Evaluator>)>,
    /// Where what the evaluator learnt is kept (`rules-state.json`), so an agent restarted while a condition holds
    /// keeps its alert (same id, not announced again, resolved when the condition clears).
    state_path: PathBuf,
    /// Whether the evaluator learnt something since it was last written.
    dirty: std::sync::atomic::AtomicBool,
}

impl EdgeRules {
    /// Loads `dir/rules.json` (no rules when it is missing or unreadable: the cloud pushes them at the next
    /// connection).
    pub fn load(dir: &Path) -> EdgeRules {
        let path = dir.join("rules.json");
        let cached: Cached = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(path = %path.display(), %error, "rules cache unreadable; waiting for the cloud's");
                Cached::default()
            }),
            Err(_) => Cached::default(),
        };
        let state_path = dir.join("rules-state.json");
        let learnt: Option<EvaluatorState> = std::fs::read(&state_path).ok().and_then(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|error| tracing::warn!(path = %state_path.display(), %error, "rule state unreadable; starting over"))
                .ok()
        });
        let evaluator = cached.farm_id.map(|farm_id| {
            let mut evaluator = Evaluator::new(farm_id, Origin::Edge);
            // A new evaluator holds no alert yet: nothing ends.
            let _ = evaluator.set_rules(cached.rules, SystemTime::now());
            if let Some(learnt) = learnt {
                evaluator.restore(learnt);
            }
            evaluator
        });
        EdgeRules {
            path,
            state: Mutex::new((cached.version, evaluator)),
            state_path,
            dirty: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Writes what the evaluator learnt, if anything since the last time (called every second). Not fsynced: a
    /// power cut loses at most the last second, after which alerts may be raised and announced again.
    pub fn save_state(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let learnt = match &self.state.lock().expect("rules lock").1 {
            Some(evaluator) => evaluator.state(),
            None => return Ok(()),
        };
        let bytes = serde_json::to_vec(&learnt).map_err(std::io::Error::other)?;
        let temp = self.state_path.with_extension("tmp");
        std::fs::write(&temp, bytes)?;
        std::fs::rename(&temp, &self.state_path)
    }

    /// The cached version (0: none yet), for the hello.
    pub fn version(&self) -> u64 {
        self.state.lock().expect("rules lock").0
    }

    /// How many rules are evaluated.
    pub fn len(&self) -> usize {
        self.state.lock().expect("rules lock").1.as_ref().map_or(0, |evaluator| evaluator.rules().len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the cloud's snapshot: evaluates it from now on (what was learnt about unchanged rules stays) and writes
    /// it to disk (atomically). Rules that do not parse are left out and reported. Returns the alerts that were open
    /// for rules now gone, resolved (see [`Evaluator::set_rules`]), for the caller to announce.
    pub fn apply(&self, snapshot: &RuleSnapshot) -> std::io::Result<Vec<Alert>> {
        let mut rules = Vec::new();
        for wire in &snapshot.rules {
            match Rule::from_pushed(wire) {
                Ok(rule) => rules.push(rule),
                Err(error) => tracing::error!(rule_id = %wire.id, %error, "a pushed rule is not understood; left out"),
            }
        }
        let mut state = self.state.lock().expect("rules lock");
        // An empty snapshot names no farm: the evaluator there was keeps its farm and loses its rules.
        let farm_id = rules.first().map(|rule| rule.farm_id).or_else(|| state.1.as_ref().map(Evaluator::farm_id));
        let cached = Cached { version: snapshot.version, farm_id, rules: rules.clone() };
        let bytes = serde_json::to_vec(&cached).map_err(std::io::Error::other)?;
        crate::spool::write_file_durably(&self.path, &bytes)?;
        let ended = match farm_id {
            Some(farm_id) => {
                state.1.get_or_insert_with(|| Evaluator::new(farm_id, Origin::Edge)).set_rules(rules, SystemTime::now())
            }
            None => Vec::new(),
        };
        if !ended.is_empty() {
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        state.0 = snapshot.version;
        Ok(ended)
    }

    /// Evaluates a device's accepted readings, arrived now; returns the alerts that opened, grew or resolved.
    pub fn on_readings(&self, device: Uuid, measurements: &[Measurement]) -> Vec<Alert> {
        let mut state = self.state.lock().expect("rules lock");
        let Some(evaluator) = &mut state.1 else { return Vec::new() };
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut changed = evaluator.on_heard(device, SystemTime::now());
        changed.extend(measurements.iter().flat_map(|m| evaluator.on_reading(device, &m.metric, m.value, m.time)));
        changed
    }

    /// An alert the cloud says a person resolved (see [`Evaluator::resolved_by_hand`]).
    pub fn resolved_by_hand(&self, resolved: &smartfarm_core::rules::Alert) {
        let mut state = self.state.lock().expect("rules lock");
        if let Some(evaluator) = &mut state.1
            && evaluator.resolved_by_hand(resolved)
        {
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The farm's sensors, from the registry (see [`Evaluator::set_devices`]).
    pub fn set_devices(&self, devices: &[Uuid]) {
        let mut state = self.state.lock().expect("rules lock");
        if let Some(evaluator) = &mut state.1 {
            evaluator.set_devices(devices, SystemTime::now());
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// What to send the cloud again after a restart: the alerts raised here and not resolved, and those resolved in
    /// the last day (both kept across restarts with the rest of the evaluator's state). The urgent lane lives in
    /// memory, so an alert only the agent raises (a device gone silent) that opened, or opened and resolved, during
    /// an outage would otherwise be lost with a restart before the link returned; the cloud merges repeats into what
    /// it has, so the ones it knows change nothing.
    pub fn alerts_to_resend(&self) -> Vec<Alert> {
        let state = self.state.lock().expect("rules lock");
        let Some(evaluator) = &state.1 else { return Vec::new() };
        // In the order things happened (an alert by when it last changed state): an alert that resolved during the
        // outage comes before the next alert of its condition, so the cloud, which still holds the first open,
        // does not take the second for a copy of it (see `join_open_alert` in the ingestion service).
        let mut alerts = evaluator.open_alerts();
        alerts.extend(evaluator.recently_resolved(SystemTime::now()));
        alerts.sort_by_key(|alert| alert.resolve_time.unwrap_or(alert.open_time));
        alerts
    }

    /// Evaluates the model-verdict rules on a diagnosis of a camera's photo made on the farm.
    pub fn on_disease(&self, verdict: &smartfarm_core::rules::DiseaseVerdict) -> Vec<Alert> {
        let mut state = self.state.lock().expect("rules lock");
        let Some(evaluator) = &mut state.1 else { return Vec::new() };
        let raised = evaluator.on_disease(verdict);
        if !raised.is_empty() {
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        raised
    }

    /// Raises device-silent alerts due by `now`.
    pub fn on_tick(&self, now: SystemTime) -> Vec<Alert> {
        let mut state = self.state.lock().expect("rules lock");
        match &mut state.1 {
            Some(evaluator) => {
                let raised = evaluator.on_tick(now);
                if !raised.is_empty() {
                    self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                raised
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An agent's rules in `dir`, given one rule of `farm` (on `metric`, every device) by a snapshot.
    fn agent_with(
        dir: &Path,
        farm: Uuid,
        metric: Option<&str>,
        condition: smartfarm_core::rules::Condition,
    ) -> EdgeRules {
        let rule = Rule {
            id: Uuid::now_v7(),
            farm_id: farm,
            name: "a rule".into(),
            severity: smartfarm_core::rules::Severity::Critical,
            device_id: None,
            metric: metric.map(str::to_string),
            cooldown: Duration::ZERO,
            create_time: SystemTime::now(),
            condition,
        };
        let rules = EdgeRules::load(dir);
        assert!(rules.apply(&RuleSnapshot { version: 1, rules: vec![rule.to_proto()] }).unwrap().is_empty());
        rules
    }

    /// Temperature above 40 °C, at once.
    fn hot() -> smartfarm_core::rules::Condition {
        smartfarm_core::rules::Condition::Threshold { above: true, limit: 40.0, for_duration: Duration::ZERO }
    }

    /// After a restart the agent sends its alerts again in the order they changed: an alert that resolved during the
    /// outage before the next one of its condition opened comes first, so the cloud, which still holds the first
    /// open, does not take the second for a copy of it.
    #[test]
    fn alerts_are_sent_again_in_the_order_they_changed() {
        let dir = tempfile::tempdir().unwrap();
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        let rules = agent_with(dir.path(), farm, Some("temperature"), hot());
        let start = SystemTime::now() - Duration::from_secs(600);
        let reading = |value: f64, seconds: u64| {
            let measurement =
                Measurement { metric: "temperature".into(), value, time: start + Duration::from_secs(seconds) };
            rules.on_readings(device, &[measurement])
        };
        let first = reading(45.0, 0).remove(0);
        assert_eq!(reading(20.0, 10)[0].state, smartfarm_core::rules::AlertState::Resolved);
        let second = reading(46.0, 20).remove(0);
        let resent: Vec<(Uuid, smartfarm_core::rules::AlertState)> =
            rules.alerts_to_resend().iter().map(|alert| (alert.id, alert.state)).collect();
        assert_eq!(
            resent,
            [
                (first.id, smartfarm_core::rules::AlertState::Resolved),
                (second.id, smartfarm_core::rules::AlertState::Open)
            ]
        );
    }

    /// A sensor whose clock runs an hour behind is not taken for silent: its readings arrive.
    #[test]
    fn a_sensor_with_a_slow_clock_is_not_silent() {
        let dir = tempfile::tempdir().unwrap();
        let farm = Uuid::now_v7();
        let device = Uuid::now_v7();
        // Every device of the farm: the silence clock starts at the device's first reading.
        let silent = smartfarm_core::rules::Condition::DeviceSilent { silent_for: Duration::from_secs(300) };
        let rules = agent_with(dir.path(), farm, None, silent);
        let an_hour_behind = SystemTime::now() - Duration::from_secs(3600);
        let measurement = Measurement { metric: "temperature".into(), value: 20.0, time: an_hour_behind };
        assert!(rules.on_readings(device, &[measurement]).is_empty());
        assert!(rules.on_tick(SystemTime::now()).is_empty(), "heard just now");
        assert_eq!(rules.on_tick(SystemTime::now() + Duration::from_secs(301)).len(), 1, "silent five minutes on");
    }

    /// A snapshot without a rule ends the alerts the agent held open for it, for the caller to announce.
    #[test]
    fn a_snapshot_without_a_rule_ends_its_open_alerts() {
        let dir = tempfile::tempdir().unwrap();
        let farm = Uuid::now_v7();
        let rules = agent_with(dir.path(), farm, Some("temperature"), hot());
        let measurement = Measurement { metric: "temperature".into(), value: 45.0, time: SystemTime::now() };
        let open = rules.on_readings(Uuid::now_v7(), &[measurement]).remove(0);
        let ended = rules.apply(&RuleSnapshot { version: 2, rules: Vec::new() }).unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!((ended[0].id, ended[0].state), (open.id, smartfarm_core::rules::AlertState::Resolved));
        assert!(
            rules.alerts_to_resend().iter().all(|alert| alert.state == smartfarm_core::rules::AlertState::Resolved)
        );
    }
}
