//! Commands on the farm: the cloud sends a command down the link; the agent writes its id to the command book (an
//! append-only journal on disk, fsynced per change) before it publishes it to `smartfarm/<device>/commands`, and never publishes an id it has in the
//! book again: a command redelivered after a reconnect, or after a kill -9 of the agent, runs at most once. A command
//! whose expire time has passed is never published. The device answers on `smartfarm/<device>/commands/ack` with
//! `{"id": …, "status": "ok" | "error", "detail": …}`; every status change goes up the urgent lane as a receipt. A
//! receipt lost on the way is given again: the cloud sends its unfinished commands down at every connection, and the
//! book answers each from what it remembers.
//!
//! A command for a device that is not subscribed to its command topic waits in the book (published as soon as the
//! device subscribes, checked every second) until its expire time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use smartfarm_core::time::{from_unix_micros, to_timestamp, to_unix_micros};
use smartfarm_proto::command::v1::{self as pb, CommandStatus};

/// How long the book remembers a command after its expire time (redeliveries come well before).
const REMEMBER_AFTER_EXPIRY_MICROS: i64 = 24 * 3600 * 1_000_000;

/// How long after its expire time a published command waits for its device's answer before it is expired. A
/// device must not start a command after its `expire_time`, but one started just before answers once it is done
/// (a valve takes seconds to open): that answer is the truth about the command, and an `EXPIRED` recorded first
/// would be final.
const ANSWER_GRACE_MICROS: i64 = 30 * 1_000_000;

/// What the book keeps of a command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Entry {
    device: Uuid,
    name: String,
    /// The JSON published to the device.
    message: String,
    expire_micros: i64,
    /// Whether the message went to the device (written before it is published).
    published: bool,
    /// `smartfarm.command.v1.CommandStatus` as a number.
    status: i32,
    detail: String,
    change_micros: i64,
}

/// What the agent must do with a command from the cloud.
#[derive(Debug, PartialEq)]
pub enum Arrival {
    /// New: publish `payload` to `topic` (the book has it), and send the receipt.
    Publish { topic: String, payload: Bytes, receipt: pb::CommandReceipt },
    /// New, but its device is not listening yet: it waits in the book; send the receipt.
    Held { receipt: pb::CommandReceipt },
    /// Known already (a redelivery), expired, or not for this farm: only the receipt goes up.
    Answer { receipt: pb::CommandReceipt },
}

/// What [`CommandBook::release`] lets go: messages to publish (topic, payload), and receipts of commands that
/// expired while held.
pub type Released = (Vec<(Uuid, String, Bytes)>, Vec<pb::CommandReceipt>);

/// The cloud's clock, as the last welcome gave it, carried on by the monotonic clock. Command expire times are the
/// cloud's, and a Pi without a battery-backed clock that booted during an outage runs behind (or ahead) until NTP
/// sets it: a command must not run after its TTL by the Pi's slow clock, nor expire early by a fast one. Carried on
/// by `Instant`, it does not jump when NTP sets the Pi's clock later.
#[derive(Debug, Default)]
pub struct CloudClock {
    measured: Mutex<Option<(SystemTime, std::time::Instant)>>,
}

impl CloudClock {
    /// Notes the cloud's time `cloud` (a welcome's), read when the agent's clock said `local`. The link's delay, a
    /// few milliseconds, is well within what a TTL of a second or more means.
    pub fn observe(&self, cloud: SystemTime, local: SystemTime) {
        let ahead = to_unix_micros(cloud).saturating_sub(to_unix_micros(local));
        if ahead.unsigned_abs() > 5_000_000 {
            tracing::warn!(
                cloud_ahead_seconds = ahead as f64 / 1e6,
                "this agent's clock differs from the cloud's; commands expire by the cloud's"
            );
        }
        *self.measured.lock().expect("clock lock") = Some((cloud, std::time::Instant::now()));
    }

    /// Now, on the cloud's clock (the agent's own until a link has told it the cloud's).
    pub fn now(&self) -> SystemTime {
        self.known().unwrap_or_else(SystemTime::now)
    }

    /// Now on the cloud's clock, once a link of this process has told it; `None` before. A Pi without a
    /// battery-backed clock that restarts during an outage starts from a saved time that may be hours behind, so
    /// what decides whether a held command may still run waits for this.
    pub fn known(&self) -> Option<SystemTime> {
        self.measured.lock().expect("clock lock").map(|(cloud, at)| cloud + at.elapsed())
    }
}

/// A device's answer, checked.
#[derive(Debug, PartialEq)]
pub enum AckOutcome {
    /// The receipt to send up.
    Receipt(pb::CommandReceipt),
    /// The ack is bad; the reason goes to the device's errors topic.
    Refused(String),
}

/// The command book: the entries in memory, and the journal (one JSON line per change: the entry as it is after
/// it) they are replayed from at start.
#[derive(Debug)]
pub struct CommandBook {
    path: PathBuf,
    entries: Mutex<HashMap<Uuid, Entry>>,
    journal: Mutex<Option<std::fs::File>>,
    /// Lines appended since the journal was last rewritten.
    appended: std::sync::atomic::AtomicUsize,
    /// An append failed: the journal must be rewritten before the next change.
    broken: std::sync::atomic::AtomicBool,
}

/// One journal line.
#[derive(Serialize, Deserialize)]
struct Line {
    id: Uuid,
    #[serde(flatten)]
    entry: Entry,
}

fn receipt(id: Uuid, status: CommandStatus, detail: &str, at_micros: i64) -> pb::CommandReceipt {
    pb::CommandReceipt {
        command_id: id.to_string(),
        status: status as i32,
        detail: detail.to_string(),
        change_time: Some(to_timestamp(from_unix_micros(at_micros))),
    }
}

impl CommandBook {
    /// Replays `dir/commands.log` and rewrites it, one line per command. A line that does not parse (the
    /// torn last line of a power cut during a write: that change was never confirmed to anyone) is skipped. A journal
    /// that cannot be read is an error: starting with an empty book could run commands again.
    pub fn load(dir: &Path) -> std::io::Result<CommandBook> {
        let path = dir.join("commands.log");
        let mut entries = HashMap::new();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => {
                return Err(std::io::Error::new(
                    error.kind(),
                    format!("cannot read the command journal {}: {error}", path.display()),
                ));
            }
        };
        for (number, line) in bytes.split(|b| *b == b'\n').enumerate().filter(|(_, line)| !line.is_empty()) {
            match serde_json::from_slice::<Line>(line) {
                Ok(line) => {
                    entries.insert(line.id, line.entry);
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), line = number + 1, %error, "command journal line unreadable; skipped")
                }
            }
        }
        // Nothing is forgotten here: expire times are the cloud's, and this Pi's clock may run ahead of it at start
        // (the cloud's is known after the first welcome); an id forgotten too early would be published again.
        // `arrive` forgets by the cloud's clock.
        let book = CommandBook {
            path,
            entries: Mutex::new(HashMap::new()),
            journal: Mutex::new(None),
            appended: std::sync::atomic::AtomicUsize::new(0),
            broken: std::sync::atomic::AtomicBool::new(false),
        };
        book.compact(&entries)?;
        *book.entries.lock().expect("command book lock") = entries;
        Ok(book)
    }

    /// Rewrites the journal with one line per entry.
    fn compact(&self, entries: &HashMap<Uuid, Entry>) -> std::io::Result<()> {
        let mut text = String::new();
        for (id, entry) in entries {
            text.push_str(
                &serde_json::to_string(&Line { id: *id, entry: entry.clone() }).map_err(std::io::Error::other)?,
            );
            text.push('\n');
        }
        *self.journal.lock().expect("journal lock") = None;
        crate::spool::write_file_durably(&self.path, text.as_bytes())?;
        self.appended.store(0, std::sync::atomic::Ordering::Relaxed);
        self.broken.store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Makes entry `id` of `entries` (its new state) durable: one line appended to the journal and fsynced. After a
    /// failed append (a line may be half written) the journal is rewritten whole before anything else goes in.
    fn save(&self, entries: &HashMap<Uuid, Entry>, id: Uuid) -> std::io::Result<()> {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::Relaxed) || self.appended.load(Ordering::Relaxed) > 10_000 + 4 * entries.len() {
            // Also when the journal has become mostly history.
            return self.compact(entries);
        }
        let Some(entry) = entries.get(&id) else { return Ok(()) };
        let mut line = serde_json::to_vec(&Line { id, entry: entry.clone() }).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut journal = self.journal.lock().expect("journal lock");
        let appended = (|| {
            if journal.is_none() {
                *journal = Some(std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?);
            }
            let file = journal.as_mut().expect("opened above");
            file.write_all(&line)?;
            file.sync_data()
        })();
        match appended {
            Ok(()) => {
                self.appended.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                *journal = None;
                self.broken.store(true, Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// Takes a command from the cloud. `device_known` says whether the device is one of the farm's; `listening`
    /// whether it is subscribed to its command topic now.
    pub fn arrive(
        &self,
        command: &pb::Command,
        now: SystemTime,
        device_known: impl Fn(Uuid) -> bool,
        listening: impl Fn(&str) -> bool,
    ) -> std::io::Result<Option<Arrival>> {
        let Ok(id) = Uuid::try_parse(&command.id) else {
            tracing::warn!(command_id = %command.id, "a command without a valid id was ignored");
            return Ok(None);
        };
        let now = to_unix_micros(now);
        let mut entries = self.entries.lock().expect("command book lock");
        entries.retain(|_, entry| entry.expire_micros.saturating_add(REMEMBER_AFTER_EXPIRY_MICROS) > now);
        if let Some(entry) = entries.get(&id) {
            let status = CommandStatus::try_from(entry.status).unwrap_or(CommandStatus::Delivered);
            return Ok(Some(Arrival::Answer { receipt: receipt(id, status, &entry.detail, entry.change_micros) }));
        }
        let expire_micros = command
            .expire_time
            .as_ref()
            .map(|t| t.seconds.saturating_mul(1_000_000).saturating_add(i64::from(t.nanos) / 1000));
        let device = Uuid::try_parse(&command.device_id).ok().filter(|device| device_known(*device));
        let (Some(expire_micros), Some(device)) = (expire_micros, device) else {
            return Ok(Some(Arrival::Answer {
                receipt: receipt(id, CommandStatus::Failed, "the device is not one of this farm's", now),
            }));
        };
        if expire_micros <= now {
            return Ok(Some(Arrival::Answer {
                receipt: receipt(id, CommandStatus::Expired, "the ttl passed before the command reached the farm", now),
            }));
        }
        let message = serde_json::json!({
            "id": command.id,
            "name": command.name,
            "parameters": command.parameters,
            "expire_time": command.expire_time,
        })
        .to_string();
        let topic = format!("smartfarm/{device}/commands");
        let published = listening(&topic);
        let entry = Entry {
            device,
            name: command.name.clone(),
            message: message.clone(),
            expire_micros,
            published,
            status: CommandStatus::Delivered as i32,
            detail: String::new(),
            change_micros: now,
        };
        // On disk before it goes out: after a crash, the book says it went.
        entries.insert(id, entry);
        if let Err(error) = self.save(&entries, id) {
            entries.remove(&id);
            // The cloud is told it failed; a line that reached the disk anyway must not come back at a restart
            // (a held command would then be published): the journal is rewritten without it now, not at the
            // next change.
            if let Err(rewrite) = self.compact(&entries) {
                tracing::error!(command_id = %id, error = %rewrite, "cannot rewrite the command journal");
            }
            return Err(error);
        }
        let receipt = receipt(id, CommandStatus::Delivered, "", now);
        Ok(Some(if published {
            Arrival::Publish { topic, payload: Bytes::from(message), receipt }
        } else {
            Arrival::Held { receipt }
        }))
    }

    /// The held commands whose device now listens (marked published, on disk, before they are returned), and the
    /// receipts of commands whose expire time passed with no answer from their device (held ones were never
    /// published; published ones the device did not answer within [`ANSWER_GRACE_MICROS`] after it). A change the
    /// journal cannot take is undone and the rest waits for the next call; what was saved before it is returned
    /// with the error logged, so a command marked published on disk is never left unpublished.
    pub fn release(&self, now: SystemTime, listening: impl Fn(&str) -> bool) -> std::io::Result<Released> {
        let now = to_unix_micros(now);
        let mut entries = self.entries.lock().expect("command book lock");
        let waiting: Vec<Uuid> = entries
            .iter()
            .filter(|(_, entry)| entry.status == CommandStatus::Delivered as i32)
            .map(|(id, _)| *id)
            .collect();
        /// What releasing one entry gives, once the entry is on disk.
        enum Step {
            Receipt(pb::CommandReceipt),
            Publish(String, Bytes),
        }
        let mut out = Vec::new();
        let mut receipts = Vec::new();
        for id in waiting {
            let entry = entries.get_mut(&id).expect("listed above");
            let before = entry.clone();
            let answer_until = if entry.published {
                entry.expire_micros.saturating_add(ANSWER_GRACE_MICROS)
            } else {
                entry.expire_micros
            };
            let released = if answer_until <= now {
                entry.status = CommandStatus::Expired as i32;
                entry.detail = if entry.published {
                    "the device did not answer before the ttl".into()
                } else {
                    "the ttl passed before the device subscribed to its commands".into()
                };
                entry.change_micros = now;
                Step::Receipt(receipt(id, CommandStatus::Expired, &entry.detail, now))
            } else {
                let topic = format!("smartfarm/{}/commands", entry.device);
                if entry.published || !listening(&topic) {
                    continue;
                }
                entry.published = true;
                Step::Publish(topic, Bytes::from(entry.message.clone()))
            };
            if let Err(error) = self.save(&entries, id) {
                entries.insert(id, before);
                tracing::error!(command_id = %id, %error, "cannot record a held command's release; trying again later");
                break;
            }
            match released {
                Step::Receipt(receipt) => receipts.push(receipt),
                Step::Publish(topic, message) => out.push((id, topic, message)),
            }
        }
        Ok((out, receipts))
    }

    /// A device's acknowledgement on `smartfarm/<device>/commands/ack`.
    pub fn acknowledge(&self, device: Uuid, payload: &[u8], now: SystemTime) -> std::io::Result<AckOutcome> {
        #[derive(Deserialize)]
        struct Ack {
            id: String,
            status: String,
            #[serde(default)]
            detail: Option<String>,
        }
        let ack: Ack = match serde_json::from_slice(payload) {
            Ok(ack) => ack,
            Err(error) => {
                return Ok(AckOutcome::Refused(format!(
                    "not an acknowledgement ({{\"id\": …, \"status\": \"ok\" | \"error\", \"detail\": …}}): {error}"
                )));
            }
        };
        let status = match ack.status.as_str() {
            "ok" => CommandStatus::Acked,
            "error" => CommandStatus::Failed,
            other => return Ok(AckOutcome::Refused(format!("status {other:?} is not \"ok\" or \"error\""))),
        };
        let Ok(id) = Uuid::try_parse(&ack.id) else {
            return Ok(AckOutcome::Refused(format!("{:?} is not a command id", ack.id)));
        };
        let detail: String = ack.detail.unwrap_or_default().chars().take(1000).collect();
        let now = to_unix_micros(now);
        let mut entries = self.entries.lock().expect("command book lock");
        let Some(entry) = entries.get_mut(&id).filter(|entry| entry.device == device) else {
            return Ok(AckOutcome::Refused(format!("command {id} was not sent to this device")));
        };
        if entry.status != CommandStatus::Delivered as i32 {
            // Already final: the first answer counts.
            let status = CommandStatus::try_from(entry.status).unwrap_or(CommandStatus::Delivered);
            return Ok(AckOutcome::Receipt(receipt(id, status, &entry.detail, entry.change_micros)));
        }
        let before = entry.clone();
        entry.status = status as i32;
        entry.detail = detail.clone();
        entry.change_micros = now;
        if let Err(error) = self.save(&entries, id) {
            // Not on disk, so not confirmed: the device sends its answer again, and it must find the command open.
            entries.insert(id, before);
            return Err(error);
        }
        Ok(AckOutcome::Receipt(receipt(id, status, &detail, now)))
    }

    /// A command published when nobody got it (its device went away between the check and the publish, or its
    /// connection's queue was full): it is held again, for [`CommandBook::release`] to publish when its device
    /// listens. Without this the book would say it went, and it would wait for an answer until its TTL.
    pub fn not_delivered(&self, id: Uuid) -> std::io::Result<()> {
        let mut entries = self.entries.lock().expect("command book lock");
        let Some(entry) = entries.get_mut(&id) else { return Ok(()) };
        if entry.status != CommandStatus::Delivered as i32 || !entry.published {
            return Ok(());
        }
        entry.published = false;
        if let Err(error) = self.save(&entries, id) {
            // On disk it still says published: after a restart it would not go again, but until then it may.
            tracing::warn!(command_id = %id, %error, "cannot record that a command reached nobody");
            return Err(error);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn command(device: Uuid, ttl_secs: i64) -> pb::Command {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        pb::Command {
            id: Uuid::now_v7().to_string(),
            device_id: device.to_string(),
            name: "open_valve".into(),
            expire_time: Some(smartfarm_proto::pbjson_types::Timestamp { seconds: now + ttl_secs, nanos: 0 }),
            ..Default::default()
        }
    }

    #[test]
    fn the_cloud_clock_follows_the_last_welcome() {
        let clock = CloudClock::default();
        let drift = |clock: &CloudClock| {
            let now = SystemTime::now();
            let cloud = clock.now();
            (to_unix_micros(cloud) - to_unix_micros(now)) as f64 / 1e6
        };
        assert!(drift(&clock).abs() < 1.0, "the agent's own clock until told");
        assert_eq!(clock.known(), None, "not known until a welcome: held commands wait");
        let local = SystemTime::now();
        clock.observe(local + Duration::from_secs(7200), local);
        assert!((drift(&clock) - 7200.0).abs() < 1.0, "two hours ahead: {}", drift(&clock));
        let known = clock.known().expect("known once a welcome told it");
        assert!(known.duration_since(local).unwrap() >= Duration::from_secs(7200));
        // A command the slow Pi would still take for live has expired by the cloud's clock.
        let dir = tempfile::tempdir().unwrap();
        let book = CommandBook::load(dir.path()).unwrap();
        let expired_an_hour_ago = command(Uuid::now_v7(), 3600 - 7200);
        let late = book.arrive(&expired_an_hour_ago, clock.now(), |_| true, |_| true).unwrap().unwrap();
        assert!(matches!(late, Arrival::Answer { receipt } if receipt.status == CommandStatus::Expired as i32));
    }

    #[test]
    fn a_command_is_published_once_even_after_a_restart_and_its_ack_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let device = Uuid::now_v7();
        let book = CommandBook::load(dir.path()).unwrap();
        let sent = command(device, 60);
        let arrival = book.arrive(&sent, SystemTime::now(), |_| true, |_| true).unwrap().unwrap();
        let Arrival::Publish { topic, payload, receipt } = arrival else { panic!("{arrival:?}") };
        assert_eq!(topic, format!("smartfarm/{device}/commands"));
        assert!(String::from_utf8_lossy(&payload).contains(&sent.id));
        assert_eq!(receipt.status, CommandStatus::Delivered as i32);

        // kill -9 and a redelivery: the book on disk knows the id.
        let book = CommandBook::load(dir.path()).unwrap();
        let again = book.arrive(&sent, SystemTime::now(), |_| true, |_| true).unwrap().unwrap();
        assert!(matches!(again, Arrival::Answer { .. }), "{again:?}");

        let ack = format!(r#"{{"id": "{}", "status": "ok", "detail": "opened"}}"#, sent.id);
        let AckOutcome::Receipt(acked) = book.acknowledge(device, ack.as_bytes(), SystemTime::now()).unwrap() else {
            panic!()
        };
        assert_eq!((acked.status, acked.detail.as_str()), (CommandStatus::Acked as i32, "opened"));
        assert!(matches!(
            book.acknowledge(Uuid::now_v7(), ack.as_bytes(), SystemTime::now()).unwrap(),
            AckOutcome::Refused(_)
        ));
        assert!(matches!(book.acknowledge(device, b"nonsense", SystemTime::now()).unwrap(), AckOutcome::Refused(_)));
    }

    #[test]
    fn an_expired_command_is_never_published_and_a_held_one_waits_for_its_device() {
        let dir = tempfile::tempdir().unwrap();
        let device = Uuid::now_v7();
        let book = CommandBook::load(dir.path()).unwrap();
        let late = book.arrive(&command(device, -1), SystemTime::now(), |_| true, |_| true).unwrap().unwrap();
        assert!(matches!(late, Arrival::Answer { receipt } if receipt.status == CommandStatus::Expired as i32));
        let held = book.arrive(&command(device, 2), SystemTime::now(), |_| true, |_| false).unwrap().unwrap();
        assert!(matches!(held, Arrival::Held { .. }));
        let (out, _) = book.release(SystemTime::now(), |_| true).unwrap();
        assert_eq!(out.len(), 1);
        assert!(book.release(SystemTime::now(), |_| true).unwrap().0.is_empty(), "once");
        let never = book.arrive(&command(device, 1), SystemTime::now(), |_| true, |_| false).unwrap().unwrap();
        assert!(matches!(never, Arrival::Held { .. }));
        let (out, receipts) = book.release(SystemTime::now() + Duration::from_secs(5), |_| true).unwrap();
        assert!(out.is_empty());
        assert_eq!(receipts[0].status, CommandStatus::Expired as i32);
    }

    /// A device that answers a published command just after its expire time (it started it before) is heard: the
    /// command waits for its answer for `ANSWER_GRACE_MICROS` past its expire time, and only then expires.
    #[test]
    fn a_published_command_waits_for_its_answer_a_little_past_its_expire_time() {
        let dir = tempfile::tempdir().unwrap();
        let device = Uuid::now_v7();
        let book = CommandBook::load(dir.path()).unwrap();
        let (answered, silent) = (command(device, 2), command(device, 2));
        for sent in [&answered, &silent] {
            let arrival = book.arrive(sent, SystemTime::now(), |_| true, |_| true).unwrap().unwrap();
            assert!(matches!(arrival, Arrival::Publish { .. }), "{arrival:?}");
        }
        let past_the_ttl = SystemTime::now() + Duration::from_secs(5);
        let (_, receipts) = book.release(past_the_ttl, |_| true).unwrap();
        assert!(receipts.is_empty(), "still waiting for their answers: {receipts:?}");
        let ack = format!(r#"{{"id": "{}", "status": "ok", "detail": "opened"}}"#, answered.id);
        let AckOutcome::Receipt(acked) = book.acknowledge(device, ack.as_bytes(), past_the_ttl).unwrap() else {
            panic!()
        };
        assert_eq!((acked.status, acked.detail.as_str()), (CommandStatus::Acked as i32, "opened"));
        let (_, receipts) = book.release(SystemTime::now() + Duration::from_secs(40), |_| true).unwrap();
        let expired: Vec<_> = receipts.iter().map(|receipt| (receipt.command_id.as_str(), receipt.status)).collect();
        assert_eq!(expired, [(silent.id.as_str(), CommandStatus::Expired as i32)]);
    }

    /// Expire times are the cloud's: a book loaded while this Pi's clock runs days ahead of the cloud's (it has not
    /// heard from the cloud yet) still knows the commands it published, and does not publish them again.
    #[test]
    fn a_pi_clock_ahead_at_start_does_not_make_the_book_forget() {
        let dir = tempfile::tempdir().unwrap();
        let device = Uuid::now_v7();
        let behind = 3 * 24 * 3600;
        let cloud_now = SystemTime::now() - Duration::from_secs(behind as u64);
        let sent = command(device, 60 - behind);
        let arrival = book_arrive(&CommandBook::load(dir.path()).unwrap(), &sent, cloud_now);
        assert!(matches!(arrival, Arrival::Publish { .. }), "{arrival:?}");
        let book = CommandBook::load(dir.path()).unwrap();
        let again = book_arrive(&book, &sent, cloud_now + Duration::from_secs(1));
        assert!(
            matches!(&again, Arrival::Answer { receipt } if receipt.status == CommandStatus::Delivered as i32),
            "{again:?}"
        );
    }

    fn book_arrive(book: &CommandBook, command: &pb::Command, now: SystemTime) -> Arrival {
        book.arrive(command, now, |_| true, |_| true).unwrap().unwrap()
    }

    #[test]
    fn a_command_that_reached_nobody_is_held_again_until_its_device_listens() {
        let dir = tempfile::tempdir().unwrap();
        let device = Uuid::now_v7();
        let book = CommandBook::load(dir.path()).unwrap();
        let sent = command(device, 60);
        let arrival = book.arrive(&sent, SystemTime::now(), |_| true, |_| true).unwrap().unwrap();
        assert!(matches!(arrival, Arrival::Publish { .. }));
        let id = Uuid::try_parse(&sent.id).unwrap();
        assert!(book.release(SystemTime::now(), |_| true).unwrap().0.is_empty(), "published already");
        book.not_delivered(id).unwrap();
        assert!(book.release(SystemTime::now(), |_| false).unwrap().0.is_empty(), "its device does not listen yet");
        // Also across a restart: the book on disk says it waits.
        let book = CommandBook::load(dir.path()).unwrap();
        let (out, _) = book.release(SystemTime::now(), |_| true).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, id);
        // An answered command is not held again.
        let ack = format!(r#"{{"id": "{id}", "status": "ok"}}"#);
        book.acknowledge(device, ack.as_bytes(), SystemTime::now()).unwrap();
        book.not_delivered(id).unwrap();
        assert!(book.release(SystemTime::now(), |_| true).unwrap().0.is_empty());
    }

    /// An answer the journal cannot take is not confirmed to the device, and the command stays open for its
    /// answer sent again.
    #[test]
    fn an_answer_the_journal_cannot_take_leaves_the_command_open() {
        let dir = tempfile::tempdir().unwrap();
        let device = Uuid::now_v7();
        let book = CommandBook::load(dir.path()).unwrap();
        let sent = command(device, 60);
        book.arrive(&sent, SystemTime::now(), |_| true, |_| true).unwrap().unwrap();
        let journal = dir.path().join("commands.log");
        std::fs::remove_file(&journal).unwrap();
        std::fs::create_dir(&journal).unwrap();
        std::fs::write(journal.join("in-the-way"), b"").unwrap();
        book.broken.store(true, std::sync::atomic::Ordering::Relaxed);
        let ack = format!(r#"{{"id": "{}", "status": "ok"}}"#, sent.id);
        assert!(book.acknowledge(device, ack.as_bytes(), SystemTime::now()).is_err());
        assert!(book.acknowledge(device, ack.as_bytes(), SystemTime::now()).is_err(), "still open, still unsaved");
        std::fs::remove_dir_all(&journal).unwrap();
        let AckOutcome::Receipt(acked) = book.acknowledge(device, ack.as_bytes(), SystemTime::now()).unwrap() else {
            panic!()
        };
        assert_eq!(acked.status, CommandStatus::Acked as i32);
        let reloaded = CommandBook::load(dir.path()).unwrap();
        let again = reloaded.arrive(&sent, SystemTime::now(), |_| true, |_| true).unwrap().unwrap();
        assert!(matches!(again, Arrival::Answer { receipt } if receipt.status == CommandStatus::Acked as i32));
    }

    #[test]
    fn a_held_command_the_journal_cannot_release_stays_held_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let device = Uuid::now_v7();
        let book = CommandBook::load(dir.path()).unwrap();
        let held = book.arrive(&command(device, 60), SystemTime::now(), |_| true, |_| false).unwrap().unwrap();
        assert!(matches!(held, Arrival::Held { .. }));
        // The journal cannot be written: its path is now a directory, and the next save rewrites it whole.
        let journal = dir.path().join("commands.log");
        std::fs::remove_file(&journal).unwrap();
        std::fs::create_dir(&journal).unwrap();
        std::fs::write(journal.join("in-the-way"), b"").unwrap();
        book.broken.store(true, std::sync::atomic::Ordering::Relaxed);
        let failed = book.release(SystemTime::now(), |_| true);
        assert!(failed.map_or(true, |(out, _)| out.is_empty()), "not published before it is marked so on disk");

        std::fs::remove_dir_all(&journal).unwrap();
        let (out, _) = book.release(SystemTime::now(), |_| true).unwrap();
        assert_eq!(out.len(), 1, "published once the journal takes it");
    }
}
