//! The alerts-and-commands side of an edge link: the farm's rules pushed down (at connect when the agent's copy is
//! older, and whenever they change) and evaluated on every committed batch with the same evaluator the agent runs,
//! so the cloud raises the same alerts (same ids) from the same readings; alerts the agent raised, sent up at once,
//! merged into the record; the farm's alert changes sent down for its local alert topic; commands sent down (those
//! waiting at connect, then each as it is queued, on whichever replica) and the agent's receipts recorded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use uuid::Uuid;

use smartfarm_bus::{AlertChanged, Event};
use smartfarm_core::commands::CommandStatus;
use smartfarm_core::rules::{Alert, AlertState, Evaluator, Origin};
use smartfarm_core::{Error, Result, time, validate};
use smartfarm_proto::command::v1 as command_pb;
use smartfarm_proto::ingestion::v1 as pb;
use smartfarm_store::commands::StoredCommand;
use smartfarm_store::telemetry::ReadingRow;

use crate::IngestionApi;
use crate::link::{Outbound, send};

/// The farm's rules as this link evaluates them, shared by the session (which reloads them) and its commit task
/// (which evaluates committed readings), and the link's alert recorder.
pub(crate) struct FarmRules {
    farm_id: Uuid,
    evaluator: Mutex<Evaluator>,
    /// Alerts to record: a task records what waits in one transaction, so a burst of alerts costs one commit and the
    /// link reads on while the database writes (it waits only when many of its own copies wait, see [`Recorder`]).
    recorder: Option<Recorder>,
}

/// The recorder's two lanes. The agent's alerts are news (it raised them as the readings arrived) and go first;
/// the copies this link raises from committed batches mostly repeat what the agent sent already, come a batch at a
/// time (hundreds at once after an upload), and must not hold the news up.
struct Recorder {
    /// Bounded (see `link::URGENT_QUEUE`): the agent decides how many it sends.
    agent: mpsc::Sender<(Instant, Alert)>,
    /// A commit queues its copies without waiting (it holds a commit permit that other links need), and the link
    /// takes no new batch while more than [`COPY_QUEUE`] wait ([`FarmRules::wait_for_copy_room`]): a database
    /// slower than the link's commits slows that link (its agent keeps what waits in its spool) instead of filling
    /// memory. So the queue holds at most that plus the copies of the batches the link had taken.
    copies: mpsc::UnboundedSender<(Instant, Alert)>,
    copy_room: Arc<CopyRoom>,
}

/// How many of a link's own copies wait to be recorded beyond which the link takes no new batch: a few batches'
/// worth where a rule fires on every reading, and most copies cost no query (see [`Known::adds_something`]).
const COPY_QUEUE: usize = 8192;

/// The copies waiting in a link's queue, counted by those who queue them and the recorder that takes them.
#[derive(Default)]
struct CopyRoom {
    waiting: std::sync::atomic::AtomicUsize,
    /// Told when the recorder takes a copy and the queue is within [`COPY_QUEUE`].
    made: tokio::sync::Notify,
}

impl CopyRoom {
    fn queued(&self, count: usize) {
        self.waiting.fetch_add(count, std::sync::atomic::Ordering::AcqRel);
    }

    fn taken(&self) {
        let before = self.waiting.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if before <= COPY_QUEUE + 1 {
            // A stored permit when nobody waits: a link that looks next does not wait for a wakeup already given.
            self.made.notify_one();
        }
    }

    fn full(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Acquire) > COPY_QUEUE
    }
}

impl FarmRules {
    /// The rules of the farm whose link sends to `outbound`.
    pub(crate) fn new(api: &IngestionApi, farm_id: Uuid, outbound: Outbound) -> Arc<FarmRules> {
        let recorder = api.alerts.as_ref().map(|alerts| {
            let (agent, agent_queue) = mpsc::channel(crate::link::URGENT_QUEUE);
            let (copies, copy_queue) = mpsc::unbounded_channel();
            let copy_room = Arc::new(CopyRoom::default());
            let (running, api, alerts, room) =
                (api.alert_recorder_running(), api.clone(), alerts.clone(), copy_room.clone());
            tokio::spawn(async move {
                record_forever(api, alerts, agent_queue, (copy_queue, room), outbound).await;
                drop(running);
            });
            Recorder { agent, copies, copy_room }
        });
        Arc::new(FarmRules { farm_id, evaluator: Mutex::new(Evaluator::new(farm_id, Origin::Cloud)), recorder })
    }

    /// Waits, before the link takes a new batch, while more than [`COPY_QUEUE`] of its copies wait to be recorded.
    pub(crate) async fn wait_for_copy_room(&self) {
        let Some(recorder) = &self.recorder else { return };
        if !recorder.copy_room.full() {
            return;
        }
        metrics::counter!("smartfarm_alert_copy_queue_full_total").increment(1);
        while recorder.copy_room.full() && !recorder.copies.is_closed() {
            recorder.copy_room.made.notified().await;
        }
    }

    /// Queues this link's copies of `alerts` for the recorder.
    fn queue_copies(&self, alerts: Vec<Alert>) {
        let Some(recorder) = &self.recorder else { return };
        let now = Instant::now();
        recorder.copy_room.queued(alerts.len());
        for alert in alerts {
            if recorder.copies.send((now, alert)).is_err() {
                recorder.copy_room.taken();
            }
        }
    }
}

/// Most alerts recorded in one transaction.
const MAX_ALERTS_AT_ONCE: usize = 256;

/// Most of this link's own copies recorded in one transaction: an alert from the agent that arrives meanwhile waits
/// for at most that many.
const MAX_COPIES_AT_ONCE: usize = 16;

/// The waits before each new try of alerts the database did not take (it was away or failed: a failover, a
/// timeout). The agent sends an alert up once, so one given up is lost to the cloud until the agent sends it again
/// (after its restart) or, for threshold and rate rules, until this link raises its own copy from the readings.
const RECORD_RETRY_WAITS: [Duration; 3] = [Duration::from_millis(200), Duration::from_secs(1), Duration::from_secs(5)];

/// What recording one alert came to: the stored alert's change, `None` when it held the alert already.
type Recorded = Result<Option<smartfarm_store::alerts::AlertEvent>>;

/// The tries of one write of alerts: the alerts the database failed (not for an error of the alert's own: an
/// invalid one is refused for good) are tried again after each of the waits. Each try gives the outcomes that are
/// final, so the alerts recorded at the first try are passed on while the others wait for their next.
struct Retries<'a> {
    batch: &'a [Alert],
    /// Indices in `batch` of the alerts the next try writes.
    pending: Vec<usize>,
    waits: std::slice::Iter<'a, Duration>,
    /// Before the next try, when it is a retry.
    wait_before: Option<Duration>,
}

impl<'a> Retries<'a> {
    fn new(batch: &'a [Alert], waits: &'a [Duration]) -> Retries<'a> {
        Retries { batch, pending: (0..batch.len()).collect(), waits: waits.iter(), wait_before: None }
    }

    /// Writes the alerts still pending with `record` (after the wait when it is a retry): the index in the batch
    /// and the result of each alert whose outcome is final. `None` once every alert's is.
    async fn next_try<F, Fut>(&mut self, record: F) -> Option<Vec<(usize, Recorded)>>
    where
        F: FnOnce(Vec<Alert>) -> Fut,
        Fut: std::future::Future<Output = Vec<Recorded>>,
    {
        if self.pending.is_empty() {
            return None;
        }
        if let Some(wait) = self.wait_before.take() {
            tokio::time::sleep(wait).await;
        }
        let pending = std::mem::take(&mut self.pending);
        let results = record(pending.iter().map(|&at| self.batch[at].clone()).collect()).await;
        let next_wait = self.waits.next().copied();
        let mut settled = Vec::new();
        for (at, result) in pending.into_iter().zip(results) {
            match result {
                Err(Error::Unavailable(_) | Error::Internal { .. }) if next_wait.is_some() => self.pending.push(at),
                result => settled.push((at, result)),
            }
        }
        if let Some(wait) = next_wait.filter(|_| !self.pending.is_empty()) {
            tracing::warn!(
                alerts = self.pending.len(),
                retry_in_ms = wait.as_millis() as u64,
                "the database did not take alerts; trying again"
            );
            self.wait_before = Some(wait);
        }
        Some(settled)
    }
}

/// Records the link's alerts, what waits at once (the agent's first), until the link ends.
async fn record_forever(
    api: IngestionApi,
    alerts: Arc<dyn smartfarm_store::AlertStore>,
    mut agent: mpsc::Receiver<(Instant, Alert)>,
    (mut copies, copy_room): (mpsc::UnboundedReceiver<(Instant, Alert)>, Arc<CopyRoom>),
    outbound: Outbound,
) {
    let mut known = Known::default();
    loop {
        let first = tokio::select! {
            biased;
            Some(alert) = agent.recv() => alert,
            Some(alert) = copies.recv() => {
                copy_room.taken();
                alert
            }
            else => return,
        };
        let mut batch = Vec::new();
        let mut arrivals = Vec::new();
        let mut copies_taken = 0;
        let mut next = Some(first);
        // In order: an alert resolved earlier in the batch is over for the ones after it, though not yet recorded.
        while let Some((arrived, mut alert)) = next.take() {
            if alert.origin == Origin::Cloud {
                copies_taken += 1;
            }
            join_open_alert(alerts.as_ref(), &mut known, &mut alert).await;
            if known.adds_something(&alert) {
                batch.push(alert);
                arrivals.push(arrived);
            } else {
                metrics::counter!("smartfarm_alert_copies_known_total").increment(1);
            }
            if batch.len() < MAX_ALERTS_AT_ONCE {
                next = match agent.try_recv() {
                    Ok(alert) => Some(alert),
                    Err(_) if copies_taken < MAX_COPIES_AT_ONCE => {
                        copies.try_recv().ok().inspect(|_| copy_room.taken())
                    }
                    Err(_) => None,
                };
            }
        }
        if batch.is_empty() {
            continue;
        }
        let mut retries = Retries::new(&batch, &RECORD_RETRY_WAITS);
        let record = |batch: Vec<Alert>| {
            let alerts = alerts.clone();
            async move { alerts.record_alerts(&batch).await }
        };
        let mut writing = Duration::ZERO;
        loop {
            let started = Instant::now();
            let Some(settled) = retries.next_try(record).await else { break };
            writing += started.elapsed();
            for (at, result) in settled {
                let (alert, arrived) = (&batch[at], arrivals[at]);
                let agent_holds_open = alert.origin == Origin::Edge && alert.state != AlertState::Resolved;
                match result {
                    Ok(Some(event)) => {
                        known.recorded(&event.alert);
                        if agent_holds_open {
                            tell_agent_if_resolved_by_hand(&outbound, &event.alert).await;
                        }
                        let origin = if alert.origin == Origin::Edge { "edge" } else { "cloud" };
                        metrics::counter!("smartfarm_alerts_recorded_total", "origin" => origin).increment(1);
                        metrics::histogram!("smartfarm_alerts_record_seconds", "origin" => origin)
                            .record(arrived.elapsed().as_secs_f64());
                        if let Some(bus) = &api.bus {
                            bus.publish(Event::AlertChanged(AlertChanged {
                                sequence: event.sequence,
                                kind: event.kind,
                                alert: event.alert,
                                by_hand: false,
                            }));
                        }
                    }
                    // The stored alert holds this copy already.
                    Ok(None) => {
                        known.recorded(alert);
                        if agent_holds_open && let Ok(stored) = alerts.get_alert(alert.id).await {
                            tell_agent_if_resolved_by_hand(&outbound, &stored).await;
                        }
                    }
                    Err(error) => {
                        known.forget(alert.id);
                        // See RECORD_RETRY_WAITS for what becomes of it.
                        metrics::counter!("smartfarm_edge_messages_ignored_total", "kind" => "alert_not_recorded")
                            .increment(1);
                        tracing::warn!(alert_id = %alert.id, farm_id = %alert.farm_id, %error, "cannot record an alert");
                    }
                }
            }
        }
        metrics::histogram!("smartfarm_alerts_write_seconds").record(writing.as_secs_f64());
    }
}

/// Sends `stored` down the link when a person resolved it, for an agent that still holds it open: the resolution
/// was made while the link was down (the agent hears of live ones as they happen), and until it hears of it the
/// agent folds the condition's later occurrences into the resolved alert, where the cloud opens new ones.
async fn tell_agent_if_resolved_by_hand(outbound: &Outbound, stored: &Alert) {
    if stored.state == AlertState::Resolved && stored.resolved_by_hand {
        tracing::debug!(alert_id = %stored.id, "the agent holds open an alert a person resolved; telling it");
        let _ = send(outbound, pb::connect_response::Body::Alert(stored.to_proto())).await;
    }
}

/// Loads the farm's rules into the evaluator (what it learnt about unchanged rules stays) and pushes them down when
/// `agent_version`, the version the agent has, differs.
pub(crate) async fn refresh_rules(
    api: &IngestionApi,
    rules: &FarmRules,
    agent_version: &mut u64,
    outbound: &Outbound,
) -> Result<()> {
    let Some(alerts) = &api.alerts else { return Ok(()) };
    let (version, snapshot) = alerts.rules_snapshot(rules.farm_id).await?;
    let ended = rules.evaluator.lock().expect("evaluator lock").set_rules(snapshot.clone(), time::now());
    // This link's copies of alerts of deleted rules: over (DeleteRule resolved the stored ones already; a copy
    // raised since, from readings uploaded late, ends here).
    rules.queue_copies(ended);
    if version != *agent_version {
        let pushed = pb::RuleSnapshot { version, rules: snapshot.iter().map(|rule| rule.to_proto()).collect() };
        tracing::debug!(farm_id = %rules.farm_id, version, rules = snapshot.len(), "rules pushed to the edge");
        send(outbound, pb::connect_response::Body::Rules(pushed)).await?;
        *agent_version = version;
    }
    Ok(())
}

/// Evaluates the farm's rules on a committed group's readings (in sequence order) and records what they raise.
pub(crate) fn evaluate_committed(rules: &FarmRules, readings: &[ReadingRow]) {
    let raised: Vec<Alert> = {
        let mut evaluator = rules.evaluator.lock().expect("evaluator lock");
        if evaluator.rules().is_empty() {
            return;
        }
        readings
            .iter()
            .flat_map(|reading| {
                evaluator.on_reading(reading.device_id, &reading.metric, reading.value, reading.measure_time)
            })
            .collect()
    };
    rules.queue_copies(raised);
}

/// What a link's recorder knows: for [`join_open_alert`], and what it recorded, so that a copy adding nothing to
/// it costs no query.
#[derive(Default)]
struct Known {
    /// Alert ids seen, with the unresolved alert each joined, if any.
    targets: std::collections::HashMap<Uuid, Option<Alert>>,
    /// Alerts this link has passed on as resolved: over, even before the database says so.
    resolved: std::collections::HashSet<Uuid>,
    /// The conditions (origin, rule, device, metric) whose stored alerts were looked up, with the unresolved ones
    /// found. Mostly an evaluator's first alert of a condition on this link continues an alert raised before (the
    /// agent and this link each run one evaluator for the link's life, and a later alert of theirs for the same
    /// condition follows one they resolved). But an agent that restarted sends its alerts again in the order they
    /// changed, so an older alert of the condition may come first; a later one is looked up again only when what was
    /// found could be what it continues. A busy farm's alerts cost no query before they are recorded.
    looked_up: std::collections::HashMap<(Origin, Uuid, Option<Uuid>, String), Vec<Alert>>,
    /// Alert ids that belong to a resolved alert they joined on an earlier link (see [`joined_before`]), with that
    /// alert's id and open time.
    rejoined: std::collections::HashMap<Uuid, (Uuid, std::time::SystemTime)>,
    /// Each alert as this link last recorded it, merged with what it sent since. The stored alert holds at least
    /// that (merges only move forward, and only merges and people change it), so a copy that changes nothing here
    /// changes nothing there either.
    recorded: std::collections::HashMap<Uuid, Alert>,
}

impl Known {
    /// Bounds the memory of a long-lived link; forgetting costs queries, never alerts.
    const MOST: usize = 100_000;

    /// Whether recording `alert` may change the stored one (and, when it may, counts it as sent).
    fn adds_something(&mut self, alert: &Alert) -> bool {
        match self.recorded.get_mut(&alert.id) {
            Some(known) => known.merge(alert),
            None => {
                if self.recorded.len() >= Self::MOST {
                    self.recorded.clear();
                }
                self.recorded.insert(alert.id, alert.clone());
                true
            }
        }
    }

    /// The alert as stored after recording it.
    fn recorded(&mut self, stored: &Alert) {
        match self.recorded.get_mut(&stored.id) {
            Some(known) => {
                known.merge(stored);
            }
            None => {
                self.recorded.insert(stored.id, stored.clone());
            }
        }
    }

    /// After a failed write: what this link sent may not be stored.
    fn forget(&mut self, id: Uuid) {
        self.recorded.remove(&id);
    }
}

/// Gives `alert` the identity of the unresolved alert of the same condition when one is stored (it was raised before
/// an evaluator lost its state: an agent restart, a link that moved), so one condition stays one alert. Looked up
/// for an evaluator's first alert of each condition on the link (see [`Known::looked_up`]).
async fn join_open_alert(alerts: &dyn smartfarm_store::AlertStore, known: &mut Known, alert: &mut Alert) {
    if known.targets.len() >= Known::MOST {
        known.targets.clear();
        known.resolved.clear();
        known.looked_up.clear();
        known.rejoined.clear();
    }
    let Known { targets, resolved, looked_up, rejoined, .. } = known;
    if let Some((id, open_time)) = rejoined.get(&alert.id) {
        alert.id = *id;
        alert.open_time = *open_time;
        if alert.state == AlertState::Resolved {
            resolved.insert(alert.id);
        }
        return;
    }
    let condition = (alert.origin, alert.rule_id, alert.device_id, alert.metric.clone());
    let continues = |alert: &Alert, open: &Alert| !resolved.contains(&open.id) && alert.clone().join(open);
    let open = match targets.entry(alert.id) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        // The condition was looked up for an earlier alert on this link, and nothing unresolved then could be
        // what this one continues: no query.
        std::collections::hash_map::Entry::Vacant(entry)
            if looked_up
                .get(&condition)
                .is_some_and(|unresolved| !unresolved.iter().any(|open| continues(alert, open))) =>
        {
            entry.insert(None)
        }
        std::collections::hash_map::Entry::Vacant(entry) => {
            // Asked (again, when an earlier lookup found a candidate: a person may have resolved it since).
            let open = match alerts.unresolved_alerts_of(alert.rule_id, alert.device_id).await {
                Ok(open) => {
                    let itself_open = open.iter().any(|open| open.id == alert.id);
                    let found = open.iter().find(|open| continues(alert, open)).cloned();
                    looked_up.insert(condition, open);
                    // Itself stored and open: nothing to join (an older one of the same condition is another story).
                    if itself_open { None } else { found }
                }
                Err(error) => {
                    tracing::warn!(alert_id = %alert.id, %error, "cannot look for an open alert of the same condition");
                    return;
                }
            };
            if open.is_none()
                && let Some(stored) = joined_before(alerts, alert).await
            {
                tracing::debug!(joined = %stored.id, "an alert came back for the resolved one it had joined");
                rejoined.insert(alert.id, (stored.id, stored.open_time));
                alert.id = stored.id;
                alert.open_time = stored.open_time;
                if alert.state == AlertState::Resolved {
                    resolved.insert(alert.id);
                }
                return;
            }
            entry.insert(open)
        }
    };
    if let Some(open) = open
        && alert.join(open)
    {
        tracing::debug!(joined = %open.id, "an alert joined the one already open for its condition");
    }
    if alert.state == AlertState::Resolved {
        resolved.insert(alert.id);
    }
}

/// The stored, resolved alert that an alert with no open one of its condition had joined on an earlier link, if
/// it is one such. After an agent lost the last second of its state (a power cut) it raises a condition still
/// holding under a new id, which joins the stored alert. That id comes back after the alert resolved, on a later
/// link: the agent sends it again after a restart (see `alerts_to_resend` in the agent), and this link's
/// evaluator, starting over on a batch uploaded late, raises the same id from the same readings. An id the store
/// does not have whose alert opened while a stored, resolved alert of the same condition was open is that case: a
/// later alert of a condition opens only after the earlier one resolved. Asked once per condition and evaluator on
/// a link, when nothing of the condition is open: two queries, one when the store has the id.
async fn joined_before(alerts: &dyn smartfarm_store::AlertStore, alert: &Alert) -> Option<Alert> {
    // Model verdicts are events, not conditions: they never joined anything (and may overlap in time).
    let verdict = alert.evidence_image_id.is_some()
        || alert.evidence_window.is_some()
        || alert.metric == smartfarm_core::rules::DISEASE_METRIC;
    if verdict {
        return None;
    }
    match alerts.get_alert(alert.id).await {
        Err(Error::NotFound { .. }) => {}
        Ok(_) | Err(_) => return None,
    }
    let filter = smartfarm_store::alerts::AlertFilter {
        farm_id: Some(alert.farm_id),
        states: vec![AlertState::Resolved],
        min_severity: None,
        opened_from: None,
        opened_before: Some(alert.open_time + std::time::Duration::from_nanos(1)),
    };
    // The newest resolved alerts opened up to its opening: the one it joined is among the first of its condition.
    let candidates = alerts.list_alerts(&filter, None, 500).await.ok()?;
    candidates.into_iter().find(|stored| {
        stored.id != alert.id
            && stored.rule_id == alert.rule_id
            && stored.device_id == alert.device_id
            && stored.metric == alert.metric
            && stored.open_time <= alert.open_time
            && stored.resolve_time.is_some_and(|resolved| alert.open_time < resolved)
    })
}

/// An alert the agent raised, sent up the urgent lane, for the recorder (waiting for room in its queue). A bad one
/// is logged and dropped (resending would not fix it).
pub(crate) async fn on_alert(rules: &FarmRules, wire: &smartfarm_proto::alert::v1::Alert) {
    let Some(recorder) = &rules.recorder else {
        metrics::counter!("smartfarm_edge_messages_ignored_total", "kind" => "alert").increment(1);
        return;
    };
    match Alert::from_edge(wire, rules.farm_id) {
        Ok(alert) => {
            let _ = recorder.agent.send((Instant::now(), alert)).await;
        }
        Err(error) => {
            metrics::counter!("smartfarm_edge_messages_ignored_total", "kind" => "bad_alert").increment(1);
            tracing::warn!(farm_id = %rules.farm_id, %error, "an alert from the edge was refused");
        }
    }
}

/// A command receipt from the agent: recorded when it moves the command on (late and repeated receipts change
/// nothing).
pub(crate) async fn on_receipt(api: &IngestionApi, farm_id: Uuid, receipt: &command_pb::CommandReceipt) -> Result<()> {
    let Some(commands) = &api.commands else {
        metrics::counter!("smartfarm_edge_messages_ignored_total", "kind" => "command_receipt").increment(1);
        return Ok(());
    };
    let parsed = (|| -> Result<(Uuid, CommandStatus)> {
        let id = validate::id("command_receipt.command_id", &receipt.command_id)?;
        let status = CommandStatus::from_proto("command_receipt.status", receipt.status)?
            .ok_or_else(|| Error::invalid("command_receipt.status", "is required"))?;
        if receipt.detail.len() > 4096 {
            return Err(Error::invalid("command_receipt.detail", "must be at most 4096 bytes"));
        }
        Ok((id, status))
    })();
    let (id, status) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            tracing::warn!(%farm_id, %error, "a command receipt from the edge was refused");
            return Ok(());
        }
    };
    let command = match commands.get_command(id).await {
        Ok(command) if command.farm_id == farm_id => command,
        Ok(_) | Err(Error::NotFound { .. }) => {
            tracing::warn!(%farm_id, command_id = %id, "a receipt for a command this farm does not have was ignored");
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    let at = receipt
        .change_time
        .as_ref()
        .and_then(|t| time::from_timestamp("change_time", t).ok())
        .map(|t| time::from_unix_micros(time::to_unix_micros(t)))
        .unwrap_or_else(time::now);
    if let Some(updated) = commands.update_command_status(command.id, status, &receipt.detail, at).await? {
        metrics::counter!("smartfarm_commands_total", "status" => format!("{status:?}").to_lowercase()).increment(1);
        tracing::debug!(command_id = %id, status = ?updated.status, "command receipt recorded");
        if let Some(bus) = &api.bus {
            bus.publish(Event::CommandChanged { farm_id, command_id: id });
        }
    }
    Ok(())
}

/// Records one command as sent and sends it down (unless it is finished, or queued past its TTL). Recorded first: a
/// queued command is expired at its expire time, a sent one only when the agent has not reported on it for a long
/// while (see `CommandStore::expire_commands`), so a command the agent may have is never one the cloud expires
/// under it. A command that stays recorded as sent because the link dropped goes again at the next connection,
/// whose agent answers for it.
pub(crate) async fn send_command(api: &IngestionApi, command: &StoredCommand, outbound: &Outbound) -> Result<()> {
    let Some(commands) = &api.commands else { return Ok(()) };
    // A sent or delivered one goes again even past its expire time: the agent says what became of it (it never
    // publishes an expired command).
    let expired_in_the_cloud = command.status == CommandStatus::Queued && command.expired_at(time::now());
    if expired_in_the_cloud || command.status.is_final() {
        return Ok(());
    }
    if command.status == CommandStatus::Queued {
        match commands.update_command_status(command.id, CommandStatus::Sent, "", time::now()).await? {
            Some(_) => {
                if let Some(bus) = &api.bus {
                    bus.publish(Event::CommandChanged { farm_id: command.farm_id, command_id: command.id });
                }
            }
            // It moved on meanwhile (expired, or another link sent it): only an unfinished one goes down.
            None if commands.get_command(command.id).await?.status.is_final() => return Ok(()),
            None => {}
        }
    }
    send(outbound, pb::connect_response::Body::Command(command.to_proto())).await
}

/// Sends the farm's unfinished commands down: at connect every one (a command delivered but unanswered when the
/// last link died goes again, and the agent's command book answers it without running it twice); later, as a
/// safety net for a lost bus message, those the agent has not confirmed yet, and those delivered whose TTL has
/// passed. The agent settles a delivered command by its TTL at the latest, so one still delivered here after it
/// lost its final receipt (the cloud could not record it, on a link that stayed up): the agent answers again from
/// its book, before the cloud would expire it as unconfirmed.
pub(crate) async fn send_pending_commands(
    api: &IngestionApi,
    farm_id: Uuid,
    outbound: &Outbound,
    include_delivered: bool,
) -> Result<()> {
    let Some(commands) = &api.commands else { return Ok(()) };
    let now = time::now();
    for command in commands.pending_commands(farm_id, now).await? {
        if include_delivered || command.status != CommandStatus::Delivered || command.expired_at(now) {
            send_command(api, &command, outbound).await?;
        }
    }
    Ok(())
}

/// What the link does with a bus event: rules, commands and alerts of its farm go down.
pub(crate) async fn on_bus_event(
    api: &IngestionApi,
    (rules, agent_version): (&FarmRules, &mut u64),
    event: Event,
    outbound: &Outbound,
) -> Result<()> {
    let farm_id = rules.farm_id;
    match event {
        Event::RulesChanged { farm_id: changed } if changed == farm_id => {
            refresh_rules(api, rules, agent_version, outbound).await
        }
        Event::CommandQueued { farm_id: target, command_id } if target == farm_id => {
            let Some(commands) = &api.commands else { return Ok(()) };
            let command = commands.get_command(command_id).await?;
            send_command(api, &command, outbound).await
        }
        // What the agent raised itself it has announced already; what the cloud raised, and what people did to any
        // alert, the farm hears from here.
        Event::AlertChanged(changed)
            if changed.alert.farm_id == farm_id && (changed.alert.origin == Origin::Cloud || changed.by_hand) =>
        {
            // A resolution by hand ends the alert for this link's evaluator too (see `Evaluator::resolved_by_hand`).
            if changed.by_hand && changed.alert.state == AlertState::Resolved {
                rules.evaluator.lock().expect("evaluator lock").resolved_by_hand(&changed.alert);
            }
            send(outbound, pb::connect_response::Body::Alert(changed.alert.to_proto())).await
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use smartfarm_core::rules::Severity;
    use smartfarm_store::AlertStore;
    use smartfarm_store::model::DeviceKind;

    use super::*;

    /// A link's recorder on a fresh SQLite database with one farm and sensor; what the link sends down comes out of
    /// the receiver.
    struct Link {
        api: IngestionApi,
        alerts: Arc<dyn AlertStore>,
        rules: Arc<FarmRules>,
        down: mpsc::Receiver<std::result::Result<pb::ConnectResponse, tonic::Status>>,
        farm_id: Uuid,
        sensor: Uuid,
        rule_id: Uuid,
        _test: smartfarm_store::testing::TestDatabase,
    }

    impl Link {
        async fn new() -> Link {
            let test = smartfarm_store::testing::TestDatabase::sqlite().await;
            let (farm_id, devices) = test.farm_with_devices(&[DeviceKind::Sensor]).await;
            let alerts = test.database.alerts();
            let api = IngestionApi::new(test.registry(), test.database.telemetry(), Default::default())
                .with_alerts(alerts.clone());
            let (outbound, down) = mpsc::channel(16);
            let rules = FarmRules::new(&api, farm_id, outbound);
            Link { api, alerts, rules, down, farm_id, sensor: devices[0], rule_id: Uuid::now_v7(), _test: test }
        }

        fn at(seconds: u64) -> SystemTime {
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
        }

        /// An alert of the link's one condition (rule, sensor, temperature) that opened at `open`.
        fn alert(&self, origin: Origin, open: u64) -> Alert {
            let open_time = Link::at(open);
            Alert {
                id: smartfarm_core::rules::alert_id(self.rule_id, Some(self.sensor), "temperature", open_time),
                farm_id: self.farm_id,
                rule_id: self.rule_id,
                device_id: Some(self.sensor),
                metric: "temperature".into(),
                severity: Severity::Critical,
                state: AlertState::Open,
                message: "hot".into(),
                value: Some(45.0),
                open_time,
                last_time: open_time,
                acknowledge_time: None,
                resolve_time: None,
                count: 1,
                origin,
                evidence_image_id: None,
                evidence_window: None,
                resolved_by_hand: false,
            }
        }

        fn resolved(mut alert: Alert, at: u64) -> Alert {
            alert.state = AlertState::Resolved;
            alert.resolve_time = Some(Link::at(at));
            alert.last_time = Link::at(at);
            alert
        }

        fn send_from_agent(&self, alert: Alert) {
            self.rules.recorder.as_ref().unwrap().agent.try_send((Instant::now(), alert)).unwrap();
        }

        fn send_from_batches(&self, alert: Alert) {
            self.rules.queue_copies(vec![alert]);
        }

        /// The farm's stored alerts (id, state), sorted, once the recorder has recorded everything sent through
        /// `lane` so far: a marker alert of another rule goes after it, in order, and is waited for (and left out).
        async fn stored_after(&self, lane: Origin) -> Vec<(Uuid, AlertState)> {
            let mut marker = self.alert(lane, 0);
            marker.rule_id = Uuid::now_v7();
            marker.id = Uuid::now_v7();
            match lane {
                Origin::Edge => self.send_from_agent(marker.clone()),
                Origin::Cloud => self.send_from_batches(marker.clone()),
            }
            let filter = smartfarm_store::alerts::AlertFilter {
                farm_id: Some(self.farm_id),
                states: Vec::new(),
                min_severity: None,
                opened_from: None,
                opened_before: None,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let listed = self.alerts.list_alerts(&filter, None, 100).await.unwrap();
                if listed.iter().any(|alert| alert.id == marker.id) {
                    let mut stored: Vec<(Uuid, AlertState)> = listed
                        .iter()
                        .filter(|alert| alert.id != marker.id)
                        .map(|alert| (alert.id, alert.state))
                        .collect();
                    stored.sort();
                    return stored;
                }
                assert!(Instant::now() < deadline, "the recorder did not get to the marker");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// After a power cut the agent raised a condition still holding under a new id, and sends its alerts again
    /// oldest first: an old resolved alert of the condition comes before the new one, which still joins the alert
    /// the cloud holds open for the condition.
    #[tokio::test]
    async fn a_copy_after_a_restart_joins_the_open_alert_though_an_older_alert_came_first() {
        let link = Link::new().await;
        let old = Link::resolved(link.alert(Origin::Edge, 0), 10);
        let open = link.alert(Origin::Edge, 100);
        link.alerts.record_alert(&old).await.unwrap();
        link.alerts.record_alert(&open).await.unwrap();
        link.send_from_agent(old.clone());
        let mut again = link.alert(Origin::Edge, 150);
        again.last_time = Link::at(160);
        link.send_from_agent(again);
        link.send_from_agent(Link::resolved(link.alert(Origin::Edge, 150), 170));
        let expected = {
            let mut expected = vec![(old.id, AlertState::Resolved), (open.id, AlertState::Resolved)];
            expected.sort();
            expected
        };
        assert_eq!(link.stored_after(Origin::Edge).await, expected);
    }

    /// A delivered command whose final receipt the cloud failed to record is asked about again once its TTL has
    /// passed (the agent answers from its book), not left to expire as unconfirmed; one still within its TTL waits
    /// for the agent.
    #[tokio::test]
    async fn a_delivered_command_past_its_ttl_is_asked_about_again() {
        let test = smartfarm_store::testing::TestDatabase::sqlite().await;
        let (farm_id, devices) = test.farm_with_devices(&[DeviceKind::Gateway, DeviceKind::Actuator]).await;
        let commands = test.database.commands();
        let api = IngestionApi::new(test.registry(), test.database.telemetry(), Default::default())
            .with_commands(commands.clone());
        let now = time::now();
        let mut delivered = Vec::new();
        for ttl in [Duration::from_millis(300), Duration::from_secs(3600)] {
            let command = StoredCommand {
                id: Uuid::now_v7(),
                farm_id,
                device_id: devices[1],
                name: "open_valve".into(),
                parameters: "{}".into(),
                request_id: None,
                create_time: now,
                expire_time: now + ttl,
                status: CommandStatus::Queued,
                status_detail: String::new(),
                history: Vec::new(),
            };
            commands.insert_command(&command).await.unwrap();
            for status in [CommandStatus::Sent, CommandStatus::Delivered] {
                commands.update_command_status(command.id, status, "", now).await.unwrap().unwrap();
            }
            delivered.push(command.id.to_string());
        }
        let (outbound, mut down) = mpsc::channel(16);
        send_pending_commands(&api, farm_id, &outbound, false).await.unwrap();
        assert!(down.try_recv().is_err(), "both are within their TTL: the agent has them");
        tokio::time::sleep(Duration::from_millis(400)).await;
        send_pending_commands(&api, farm_id, &outbound, false).await.unwrap();
        match down.try_recv().unwrap().unwrap().body {
            Some(pb::connect_response::Body::Command(command)) => assert_eq!(command.id, delivered[0]),
            other => panic!("expected the command past its TTL, got {other:?}"),
        }
        assert!(down.try_recv().is_err(), "only the one past its TTL");
    }

    /// A person resolved an alert while the farm's link was down: the agent, which sends it again as open, hears
    /// of the resolution.
    #[tokio::test]
    async fn an_agent_holding_open_an_alert_resolved_by_hand_is_told() {
        let mut link = Link::new().await;
        let open = link.alert(Origin::Edge, 100);
        link.alerts.record_alert(&open).await.unwrap();
        link.alerts.set_alert_state(open.id, AlertState::Resolved, Link::at(200)).await.unwrap();
        link.send_from_agent(open.clone());
        let sent = tokio::time::timeout(Duration::from_secs(10), link.down.recv())
            .await
            .expect("the resolution went down")
            .unwrap()
            .unwrap();
        match sent.body {
            Some(pb::connect_response::Body::Alert(alert)) => {
                assert_eq!(alert.id, open.id.to_string());
                assert!(alert.resolved_by_hand);
            }
            other => panic!("expected the alert, got {other:?}"),
        }
        // An alert nobody resolved by hand is not sent down.
        let other = link.alert(Origin::Edge, 300);
        link.alerts.record_alert(&other).await.unwrap();
        link.send_from_agent(other);
        assert!(tokio::time::timeout(Duration::from_millis(500), link.down.recv()).await.is_err());
    }

    /// A database that fails for a moment does not lose the agent's alerts (it sends each once); an alert refused
    /// for what it is is not tried again; one recorded at the first try is passed on at once, not after the others'
    /// retries.
    #[tokio::test]
    async fn alerts_the_database_did_not_take_are_tried_again() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let link = Link::new().await;
        let (good, bad, first) =
            (link.alert(Origin::Edge, 10), link.alert(Origin::Edge, 20), link.alert(Origin::Edge, 30));
        let batch = [good.clone(), bad.clone(), first.clone()];
        let calls = AtomicUsize::new(0);
        let waits = [Duration::ZERO; 3];
        let mut retries = Retries::new(&batch, &waits);
        // (index, tries made when it settled, outcome)
        let mut settled = Vec::new();
        while let Some(outcomes) = retries
            .next_try(|batch| {
                let call = calls.fetch_add(1, SeqCst);
                let (alerts, bad_id, first_id) = (link.alerts.clone(), bad.id, first.id);
                async move {
                    let mut results = Vec::new();
                    for alert in batch {
                        results.push(if alert.id == bad_id {
                            Err(Error::invalid("alert", "refused for what it is"))
                        } else if call < 2 && alert.id != first_id {
                            Err(Error::Unavailable("the database is away".into()))
                        } else {
                            alerts.record_alert(&alert).await
                        });
                    }
                    results
                }
            })
            .await
        {
            settled.extend(outcomes.into_iter().map(|(at, result)| (at, calls.load(SeqCst), result)));
        }
        assert_eq!(calls.load(SeqCst), 3, "two failures, then recorded");
        let order: Vec<(usize, usize)> = settled.iter().map(|(at, calls, _)| (*at, *calls)).collect();
        assert_eq!(order, vec![(1, 1), (2, 1), (0, 3)], "the refused and the recorded ones settle at the first try");
        assert!(matches!(settled[0].2, Err(Error::InvalidArgument { .. })), "not retried: {:?}", settled[0].2);
        assert_eq!(settled[2].2.as_ref().unwrap().as_ref().unwrap().alert.id, good.id);
        for alert in [&good, &first] {
            assert_eq!(link.alerts.get_alert(alert.id).await.unwrap().state, AlertState::Open);
        }

        // A database away for longer than every wait: the error is what comes back.
        let calls = AtomicUsize::new(0);
        let mut retries = Retries::new(std::slice::from_ref(&good), &waits);
        let mut settled = Vec::new();
        while let Some(outcomes) = retries
            .next_try(|batch| {
                calls.fetch_add(1, SeqCst);
                async move { batch.iter().map(|_| Err(Error::Unavailable("still away".into()))).collect() }
            })
            .await
        {
            settled.extend(outcomes);
        }
        assert_eq!(calls.load(SeqCst), 4, "the first try and one per wait");
        assert!(matches!(settled[..], [(0, Err(Error::Unavailable(_)))]), "{settled:?}");
    }

    /// A link whose copies pile up beyond the limit takes no new batch until the recorder has taken them down to it.
    #[tokio::test]
    async fn a_link_waits_while_its_copies_pile_up() {
        let link = Link::new().await;
        // A recorder that does not run: the test takes the copies.
        let (agent, _agent_queue) = mpsc::channel(1);
        let (copies, mut copy_queue) = mpsc::unbounded_channel();
        let copy_room = Arc::new(CopyRoom::default());
        let recorder = Recorder { agent, copies, copy_room: copy_room.clone() };
        let evaluator = Mutex::new(Evaluator::new(link.farm_id, Origin::Cloud));
        let rules = FarmRules { farm_id: link.farm_id, evaluator, recorder: Some(recorder) };
        rules.queue_copies((0..COPY_QUEUE as u64).map(|n| link.alert(Origin::Cloud, n)).collect());
        tokio::time::timeout(Duration::from_millis(100), rules.wait_for_copy_room()).await.expect("at the limit: room");
        rules.queue_copies(vec![link.alert(Origin::Cloud, COPY_QUEUE as u64)]);
        let waiting = rules.wait_for_copy_room();
        tokio::pin!(waiting);
        assert!(tokio::time::timeout(Duration::from_millis(200), &mut waiting).await.is_err(), "one over: it waits");
        copy_queue.recv().await.unwrap();
        copy_room.taken();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("one taken: room again");
    }

    /// A committed batch that raises more copies than the link's queue holds is queued whole, and none is lost.
    #[tokio::test]
    async fn a_batch_raising_more_copies_than_the_queue_holds_loses_none() {
        let link = Link::new().await;
        let rule = smartfarm_core::rules::Rule {
            id: link.rule_id,
            farm_id: link.farm_id,
            name: "hot".into(),
            severity: Severity::Critical,
            device_id: Some(link.sensor),
            metric: Some("temperature".into()),
            cooldown: Duration::ZERO,
            create_time: Link::at(0),
            condition: smartfarm_core::rules::Condition::Threshold {
                above: true,
                limit: 40.0,
                for_duration: Duration::ZERO,
            },
        };
        link.rules.evaluator.lock().unwrap().set_rules(vec![rule], Link::at(0));
        // Hot, then cool: each pair opens an alert and resolves it, two copies a pair.
        let pairs = COPY_QUEUE / 2 + 100;
        let readings: Vec<ReadingRow> = (0..2 * pairs)
            .map(|n| ReadingRow {
                sequence: n as u64 + 1,
                device_id: link.sensor,
                metric: "temperature".into(),
                value: if n % 2 == 0 { 45.0 } else { 30.0 },
                measure_time: Link::at(10 + n as u64),
            })
            .collect();
        let rules = link.rules.clone();
        tokio::task::spawn_blocking(move || evaluate_committed(&rules, &readings)).await.unwrap();
        let filter = smartfarm_store::alerts::AlertFilter {
            farm_id: Some(link.farm_id),
            states: vec![AlertState::Resolved],
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let resolved = link.alerts.list_alerts(&filter, None, usize::MAX).await.unwrap().len();
            if resolved == pairs {
                break;
            }
            assert!(Instant::now() < deadline, "{resolved} of {pairs} alerts recorded as resolved");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::timeout(Duration::from_secs(10), link.rules.wait_for_copy_room()).await.expect("drained");
    }

    /// A stopping process waits for the recorders of its closed links to record what their agents sent last.
    #[tokio::test]
    async fn a_stopping_process_waits_for_the_alerts_an_agent_sent_last() {
        let link = Link::new().await;
        assert!(!link.api.wait_for_alert_recorders(Duration::from_millis(50)).await, "the link's recorder runs");
        let alerts: Vec<Alert> = (0..50).map(|at| link.alert(Origin::Edge, at)).collect();
        for alert in &alerts {
            link.send_from_agent(alert.clone());
        }
        let Link { api, alerts: store, rules, .. } = link;
        drop(rules); // The link ends.
        assert!(api.wait_for_alert_recorders(Duration::from_secs(10)).await);
        for alert in alerts {
            assert_eq!(
                store.get_alert(alert.id).await.unwrap().state,
                AlertState::Open,
                "recorded before the wait ended"
            );
        }
    }
}
