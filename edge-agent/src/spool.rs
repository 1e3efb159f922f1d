//! The durable spool: every record the agent accepts is appended here, with the next per-edge sequence number,
//! before the sensor gets its acknowledgement; it leaves only when the cloud has acknowledged it (or, past the size
//! cap, when the oldest segment is dropped, which is counted and alerted, never silent).
//!
//! Layout of the spool directory:
//! - `segments/<first sequence, 20 digits>.seg`: append-only files of records `[len: u32 LE][crc32: u32 LE][a
//!   SpoolRecord protobuf of len bytes]`. Sequence numbers inside one segment are contiguous.
//! - `state`: the spool's id (a UUID made when the spool is created: the cloud keeps one mark per spool, so a wiped
//!   disk that numbers from 1 again is not taken for duplicates) and the highest sequence the cloud acknowledged,
//!   written atomically (temp file, fsync, rename, fsync of the directory) before any acknowledged segment is deleted.
//!
//! Recovery on open reads every segment, cuts a torn tail (a record cut short or failing its CRC, what a power cut
//! during a write leaves), fsyncs what it keeps, and resumes numbering after the highest sequence found or
//! acknowledged. Only records known to be on disk are handed to the uplink, so the cloud never holds a mark beyond
//! what survives a power cut, and a number the cloud has seen is never given to another record.
//!
//! What a power cut can lose depends on the fsync policy: `always` (the default) loses nothing that was
//! acknowledged to a sensor, since the acknowledgement follows the fsync; `interval` can lose what arrived within
//! the last interval; `never` leaves it to the operating system (Linux writes dirty pages back within about 30 s).
//! Under every policy a segment is fsynced when it is closed and before its records are uploaded.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prost::Message;

use smartfarm_proto::ingestion::v1::{SpoolRecord, spool_record};

/// Bytes before each record: its length and its CRC-32.
const RECORD_HEADER_BYTES: usize = 8;
/// A length field above this is corruption, not a record.
const MAX_RECORD_BYTES: usize = 1 << 20;

/// When appended records are forced to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every append, before anyone is told the records are stored.
    Always,
    /// At most this long after an append, by a background task.
    Interval(Duration),
    /// Never explicitly; the operating system decides.
    Never,
}

/// How the spool behaves.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it holds this many bytes.
    pub segment_bytes: u64,
    /// Past this many bytes on disk the oldest segment is dropped, acknowledged or not.
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
}

/// What opening the spool found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments read.
    pub segments: usize,
    /// Records found after the acknowledged mark (they will be sent).
    pub pending_records: u64,
    /// Bytes cut from segment tails because a record there was torn or corrupt.
    pub truncated_bytes: u64,
}

/// What one append did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The sequence numbers given to the records, first to last.
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// Records not yet acknowledged by the cloud that the size cap pushed out to make room.
    pub dropped_records: u64,
}

/// The spool's figures, for metrics and health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolStats {
    pub bytes: u64,
    /// About how many of those bytes hold records the cloud has not acknowledged (a segment partly acknowledged
    /// counts in proportion).
    pub pending_bytes: u64,
    /// Records waiting for the cloud's acknowledgement.
    pub pending_records: u64,
    pub acked_sequence: u64,
    pub last_sequence: u64,
    /// When the oldest segment holding unacknowledged records was started.
    pub oldest_pending_since: Option<SystemTime>,
    /// Unacknowledged records dropped by the size cap since the spool was opened.
    pub dropped_records: u64,
}

/// Spool errors are I/O errors with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool: cannot {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// An fsync of written records failed earlier. The kernel may have dropped those pages' error and marked them
    /// clean, so a second fsync proves nothing: what was written since the last good one may not be on disk.
    #[error(
        "spool: the disk failed an fsync or a write ({0}); nothing more is accepted until the agent restarts and \
         recovery reads what is on disk"
    )]
    FsyncFailed(String),
}

impl SpoolError {
    /// Whether the disk (or the agent's quota on it) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let context = context.into();
    move |source| SpoolError::Io { context, source }
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    first: u64,
    /// Records in it (their sequences are `first..first + records`).
    records: u64,
    bytes: u64,
    path: PathBuf,
    created: SystemTime,
}

impl Segment {
    fn last(&self) -> u64 {
        self.first + self.records.saturating_sub(1)
    }
}

struct Inner {
    id: uuid::Uuid,
    segments: VecDeque<Segment>,
    /// The last segment's file, open for appending.
    active: Option<File>,
    next_sequence: u64,
    acked: u64,
    dropped_records: u64,
    /// Appends not yet fsynced (interval and never policies).
    dirty: bool,
    /// The highest sequence known to be on disk: what may be uploaded.
    synced: u64,
    /// Where the last read stopped: (next sequence, first sequence of the segment it stopped in, byte offset in
    /// that segment), so draining a backlog reads each segment once instead of from its start every batch.
    read_position: Option<(u64, u64, u64)>,
    /// Set by a failed fsync of records already appended: from then on the synced mark stays where it was (only
    /// what was on disk before goes up) and appends are refused.
    fsync_failed: Option<String>,
    /// The oldest segment, when the cap could not remove it: logged once, not on every append.
    cap_blocked_at: Option<u64>,
    /// The reserve (see [`RESERVE_BYTES`]) is not on disk: used, or it could not be made. Made again after an ack.
    reserve_missing: bool,
    /// The cloud's mark an ack is writing (without the lock), above `acked` until it is written: what it covers is
    /// counted as acknowledged (a segment the cap drops meanwhile is not unsent records, nor pending bytes).
    marking_to: Option<u64>,
}

impl Inner {
    /// The sequence up to which the cloud holds everything, as far as the spool knows: its mark, or the one being
    /// written.
    fn covered(&self) -> u64 {
        self.acked.max(self.marking_to.unwrap_or(0))
    }
}

/// Bytes kept on disk (the file `reserve` in the spool's directory) for writing the cloud's mark when the disk is
/// full: without the mark, nothing the cloud has acknowledged could be removed (see [`Spool::ack`]).
const RESERVE_BYTES: usize = 64 * 1024;

/// The spool.
pub struct Spool {
    config: SpoolConfig,
    inner: Mutex<Inner>,
    /// Held through a whole [`Spool::sync`]: a sync that finds `dirty` cleared must know that the fsync which
    /// cleared it has finished, not take records another caller is still writing for ones on disk.
    syncing: Mutex<()>,
    /// Held through a whole [`Spool::ack`]: marks are written one at a time, in order, without the spool's lock
    /// (a mark costs two fsyncs, which appends must not wait for).
    marking: Mutex<()>,
    /// Tests pause an ack here, in the middle of writing the cloud's mark (waiting twice: started, then released).
    #[cfg(test)]
    pause_in_mark_write: Mutex<Option<std::sync::Arc<std::sync::Barrier>>>,
    /// Tests pause a sync here, between clearing `dirty` and its fsync (waiting twice: started, then released).
    #[cfg(test)]
    pause_before_fsync: Mutex<Option<std::sync::Arc<std::sync::Barrier>>>,
    /// Tests hold the next append here until told whether it succeeds (`false`: it fails as a full disk would).
    #[cfg(test)]
    pub(crate) hold_next_append: Mutex<Option<std::sync::mpsc::Receiver<bool>>>,
    /// Tests make the next fsync of [`Spool::sync`] fail, as a failing disk would.
    #[cfg(test)]
    fail_next_fsync: std::sync::atomic::AtomicBool,
    /// Tests make the next append fail once its records are written, and the cut of them fail too.
    #[cfg(test)]
    fail_next_append_and_cut: std::sync::atomic::AtomicBool,
    /// Tests fill the disk for the cloud's mark and the reserve: `FULL_UNTIL_FREED` until the spool removes a file,
    /// `FULL` whatever it removes, 0 not full.
    #[cfg(test)]
    disk_full: std::sync::atomic::AtomicU8,
}

#[cfg(test)]
const FULL_UNTIL_FREED: u8 = 1;
#[cfg(test)]
const FULL: u8 = 2;

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.config.dir).finish_non_exhaustive()
    }
}

fn segment_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    segment_dir(dir).join(format!("{first:020}.seg"))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("sync directory {}", dir.display())))
}

/// Encodes one record with its header.
fn encode_record(record: &SpoolRecord, out: &mut Vec<u8>) {
    let body = record.encode_to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Reads the next record from a stream: the record and its size with header, or `None` at the end or at a torn or
/// corrupt record. `frame` is a reusable buffer.
fn read_record(reader: &mut impl Read, frame: &mut Vec<u8>) -> Option<(SpoolRecord, usize)> {
    let mut header = [0u8; RECORD_HEADER_BYTES];
    reader.read_exact(&mut header).ok()?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    if len > MAX_RECORD_BYTES {
        return None;
    }
    frame.clear();
    frame.extend_from_slice(&header);
    frame.resize(RECORD_HEADER_BYTES + len, 0);
    reader.read_exact(&mut frame[RECORD_HEADER_BYTES..]).ok()?;
    decode_record(frame)
}

/// Decodes the record at the start of `bytes`: the record and its size with header, or `None` if what is there is
/// torn or corrupt.
fn decode_record(bytes: &[u8]) -> Option<(SpoolRecord, usize)> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return None;
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
    if len > MAX_RECORD_BYTES || bytes.len() < RECORD_HEADER_BYTES + len {
        return None;
    }
    let body = &bytes[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len];
    if crc32fast::hash(body) != crc {
        return None;
    }
    let record = SpoolRecord::decode(body).ok()?;
    Some((record, RECORD_HEADER_BYTES + len))
}

impl Spool {
    /// Opens (creating if needed) the spool and recovers what a crash left.
    pub fn open(config: SpoolConfig) -> Result<(Spool, Recovery), SpoolError> {
        let segments_dir = segment_dir(&config.dir);
        fs::create_dir_all(&segments_dir).map_err(io(format!("create {}", segments_dir.display())))?;
        let (id, acked) = match read_state(&config.dir)? {
            Some(state) => state,
            None => {
                let id = uuid::Uuid::now_v7();
                write_state(&config.dir, id, 0)?;
                (id, 0)
            }
        };

        let mut firsts: Vec<u64> = fs::read_dir(&segments_dir)
            .map_err(io(format!("list {}", segments_dir.display())))?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .collect();
        firsts.sort_unstable();

        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        // An empty segment's name still says how far the numbering went: `first` was the next number when it was
        // made. Without it, a restart whose records all lie below the mark on disk would number on from that mark.
        // The newest empty one is kept where it still gives the next number, so a second restart before an append
        // finds it too.
        let mut numbered_to = 0;
        let mut newest_empty: Option<Segment> = None;
        for first in firsts {
            let path = segment_path(&config.dir, first);
            let (segment, truncated) = recover_segment(&path, first)?;
            recovery.segments += 1;
            recovery.truncated_bytes += truncated;
            if truncated > 0 {
                tracing::warn!(segment = %path.display(), truncated_bytes = truncated, "cut a torn spool tail");
            }
            if segment.records == 0 {
                numbered_to = numbered_to.max(first.saturating_sub(1));
                if let Some(older) = newest_empty.replace(segment) {
                    fs::remove_file(&older.path).map_err(io(format!("remove {}", older.path.display())))?;
                }
                continue;
            }
            if segment.last() <= acked {
                fs::remove_file(&path).map_err(io(format!("remove {}", path.display())))?;
                continue;
            }
            segments.push_back(segment);
        }
        let last_found = segments.back().map(Segment::last).unwrap_or(0);
        let next_sequence = last_found.max(acked).max(numbered_to) + 1;
        if let Some(empty) = newest_empty {
            if empty.first == next_sequence {
                // The active segment: the next append writes its records into it, under its name.
                segments.push_back(empty);
            } else {
                fs::remove_file(&empty.path).map_err(io(format!("remove {}", empty.path.display())))?;
            }
        }
        let mut inner = Inner {
            id,
            segments,
            active: None,
            next_sequence,
            acked,
            dropped_records: 0,
            dirty: false,
            // Recovery fsynced every segment it kept.
            synced: next_sequence - 1,
            read_position: None,
            fsync_failed: None,
            cap_blocked_at: None,
            reserve_missing: true,
            marking_to: None,
        };
        recovery.pending_records = pending(&inner).0;
        if let Some(last) = inner.segments.back() {
            let file = OpenOptions::new()
                .append(true)
                .open(&last.path)
                .map_err(io(format!("open {}", last.path.display())))?;
            inner.active = Some(file);
        }
        let spool = Spool {
            config,
            inner: Mutex::new(inner),
            syncing: Mutex::new(()),
            marking: Mutex::new(()),
            #[cfg(test)]
            pause_in_mark_write: Mutex::new(None),
            #[cfg(test)]
            pause_before_fsync: Mutex::new(None),
            #[cfg(test)]
            hold_next_append: Mutex::new(None),
            #[cfg(test)]
            fail_next_fsync: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_next_append_and_cut: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            disk_full: std::sync::atomic::AtomicU8::new(0),
        };
        spool.keep_reserve(&mut spool.lock());
        Ok((spool, recovery))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves files consistent (writes are whole appends), so keep going.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends records, numbering them; durable when it returns under the `always` policy.
    pub fn append(&self, bodies: Vec<spool_record::Body>) -> Result<Appended, SpoolError> {
        #[cfg(test)]
        let hold = self.hold_next_append.lock().unwrap().take_if(|_| !bodies.is_empty());
        #[cfg(test)]
        if let Some(hold) = hold
            && !hold.recv().unwrap_or(true)
        {
            let full = std::io::Error::new(std::io::ErrorKind::StorageFull, "the test filled the disk");
            return Err(io("append to the active segment")(full));
        }
        let mut inner = self.lock();
        if let Some(failure) = &inner.fsync_failed {
            return Err(SpoolError::FsyncFailed(failure.clone()));
        }
        let first_sequence = inner.next_sequence;
        if bodies.is_empty() {
            return Ok(Appended {
                first_sequence,
                last_sequence: first_sequence.saturating_sub(1),
                dropped_records: 0,
            });
        }
        let needs_new_segment = inner.segments.back().is_none_or(|segment| segment.bytes >= self.config.segment_bytes)
            || inner.active.is_none();
        if needs_new_segment {
            self.start_segment(&mut inner, first_sequence)?;
        }
        let mut buffer = Vec::with_capacity(bodies.len() * 64);
        let count = bodies.len() as u64;
        for (offset, body) in bodies.into_iter().enumerate() {
            encode_record(&SpoolRecord { sequence: first_sequence + offset as u64, body: Some(body) }, &mut buffer);
        }
        let good_length = inner.segments.back().expect("the active segment is the last one").bytes;
        let file = inner.active.as_mut().expect("a segment is active after start_segment");
        let mut written = file.write_all(&buffer).map_err(io("append to the active segment"));
        if written.is_ok() && self.config.fsync == FsyncPolicy::Always {
            written = file.sync_data().map_err(io("fsync the active segment"));
        }
        #[cfg(test)]
        let fail_the_cut = self.fail_next_append_and_cut.swap(false, std::sync::atomic::Ordering::SeqCst);
        #[cfg(test)]
        if fail_the_cut {
            written = written.and(Err(io("append to the active segment")(std::io::Error::other("the test failed it"))));
        }
        if let Err(error) = written {
            // Nobody was told these records are stored, and their numbers are given again: cut whatever part of
            // them reached the file, so the segment stays an unbroken run of records.
            let cut = file.set_len(good_length);
            #[cfg(test)]
            let cut = if fail_the_cut { Err(std::io::Error::other("the test failed the cut")) } else { cut };
            if let Err(cut) = cut {
                // What reached the file stays there, numbered as the next records would be: numbering on would give
                // two records one number (sent twice, or one of them skipped). As after a failed fsync, nothing
                // more is taken until a restart, whose recovery numbers on after what the disk holds.
                let failure = io("cut a failed append from the active segment")(cut);
                tracing::error!(error = %failure, "the spool's disk failed; refusing new records until a restart");
                inner.fsync_failed = Some(failure.to_string());
                inner.active = None;
            }
            return Err(error);
        }
        if self.config.fsync != FsyncPolicy::Always {
            inner.dirty = true;
        }
        let segment = inner.segments.back_mut().expect("the active segment is the last one");
        segment.records += count;
        segment.bytes += buffer.len() as u64;
        inner.next_sequence += count;
        if self.config.fsync == FsyncPolicy::Always {
            inner.synced = inner.next_sequence - 1;
        }
        // The records are stored and numbered whatever happens next: a failure to drop an old segment must not
        // report them failed (their senders would send them again, stored twice).
        let dropped_records = self.enforce_cap(&mut inner);
        Ok(Appended { first_sequence, last_sequence: first_sequence + count - 1, dropped_records })
    }

    fn start_segment(&self, inner: &mut Inner, first: u64) -> Result<(), SpoolError> {
        if let Some(previous) = inner.active.take() {
            // What the old segment holds is settled now; make it durable under every policy (once per segment is
            // cheap, and the synced mark then only has the active segment to account for).
            if let Err(error) = previous.sync_data() {
                let error = io("fsync a finished segment")(error);
                tracing::error!(%error, "the spool's disk failed an fsync; refusing new records until a restart");
                inner.fsync_failed = Some(error.to_string());
                return Err(SpoolError::FsyncFailed(error.to_string()));
            }
        }
        // A segment left empty (its only append failed) would share the new one's name: drop it first.
        if inner.segments.back().is_some_and(|segment| segment.records == 0) {
            let empty = inner.segments.pop_back().expect("checked: a last segment");
            fs::remove_file(&empty.path).map_err(io(format!("remove {}", empty.path.display())))?;
        }
        let path = segment_path(&self.config.dir, first);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(format!("create {}", path.display())))?;
        sync_dir(&segment_dir(&self.config.dir))?;
        inner.segments.push_back(Segment { first, records: 0, bytes: 0, path, created: SystemTime::now() });
        inner.active = Some(file);
        Ok(())
    }

    /// Drops the oldest segments while the spool is over its cap (never the active one). Returns how many
    /// unacknowledged records went. A segment that cannot be removed stays (logged; tried again with the next
    /// append).
    fn enforce_cap(&self, inner: &mut Inner) -> u64 {
        let mut dropped = 0;
        while total_bytes(inner) > self.config.max_bytes && inner.segments.len() > 1 {
            let oldest = inner.segments.front().expect("more than one segment");
            let covered = inner.covered();
            let unacked = if oldest.last() > covered {
                oldest.records - covered.saturating_sub(oldest.first - 1).min(oldest.records)
            } else {
                0
            };
            // Gone already (a person cleared space by hand) is as good as removed.
            if let Err(error) = fs::remove_file(&oldest.path).or_else(|error| match error.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(error),
            }) {
                if inner.cap_blocked_at != Some(oldest.first) {
                    tracing::error!(segment = %oldest.path.display(), %error, "spool over its size cap: cannot drop the oldest segment; the spool grows until it can");
                    inner.cap_blocked_at = Some(oldest.first);
                }
                break;
            }
            let oldest = inner.segments.pop_front().expect("more than one segment");
            dropped += unacked;
            inner.read_position = None;
            tracing::error!(
                first = oldest.first,
                last = oldest.last(),
                unacked,
                "spool over its size cap: dropped the oldest segment"
            );
        }
        inner.dropped_records += dropped;
        dropped
    }

    /// Why the spool refuses new records, once an fsync failed (see [`SpoolError::FsyncFailed`]).
    pub fn failure(&self) -> Option<String> {
        self.lock().fsync_failed.as_ref().map(|failure| SpoolError::FsyncFailed(failure.clone()).to_string())
    }

    /// Forces appended records to disk (the `interval` policy's background task and the uplink call this).
    /// The fsync runs outside the lock, on a second handle of the active segment, so that appends arriving
    /// meanwhile do not wait for the disk; the synced mark moves only to what was written before it began. Syncs
    /// take turns (the housekeeping task and the uplink both call this): one that finds nothing dirty while another
    /// is still in its fsync would otherwise mark as on disk what that fsync has not finished writing, the cloud
    /// could commit it, and after a power cut the agent would number new readings with sequences the cloud already
    /// holds.
    pub fn sync(&self) -> Result<(), SpoolError> {
        let _turn = self.syncing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (file, written) = {
            let mut inner = self.lock();
            let written = inner.next_sequence - 1;
            // After a failed fsync nothing more counts as on disk; what was before still goes up.
            if inner.fsync_failed.is_some() {
                return Ok(());
            }
            if !inner.dirty {
                inner.synced = inner.synced.max(written);
                return Ok(());
            }
            let file =
                inner.active.as_ref().map(File::try_clone).transpose().map_err(io("reopen the active segment"))?;
            inner.dirty = false;
            (file, written)
        };
        #[cfg(test)]
        if let Some(pause) = self.pause_before_fsync.lock().unwrap().take() {
            pause.wait();
            pause.wait();
        }
        let fsynced = file.map_or(Ok(()), |file| file.sync_data());
        #[cfg(test)]
        let fsynced =
            fsynced.and_then(|()| match self.fail_next_fsync.swap(false, std::sync::atomic::Ordering::SeqCst) {
                true => Err(std::io::Error::other("the test failed the fsync")),
                false => Ok(()),
            });
        if let Err(error) = fsynced {
            let error = io("fsync the active segment")(error);
            tracing::error!(%error, "the spool's disk failed an fsync; refusing new records until a restart");
            self.lock().fsync_failed = Some(error.to_string());
            return Err(SpoolError::FsyncFailed(error.to_string()));
        }
        let mut inner = self.lock();
        inner.synced = inner.synced.max(written);
        Ok(())
    }

    /// Up to `max_records` records (and about `max_bytes` of them) with sequence numbers above `after`, in order,
    /// among those known to be on disk (see [`Spool::sync`]).
    pub fn read_after(&self, after: u64, max_records: usize, max_bytes: usize) -> Result<Vec<SpoolRecord>, SpoolError> {
        let mut inner = self.lock();
        let synced = inner.synced;
        let mut records = Vec::new();
        let mut bytes_read = 0usize;
        let mut next_position = None;
        let start_hint = inner.read_position.filter(|(sequence, _, _)| *sequence == after + 1);
        for segment in inner.segments.iter().filter(|segment| segment.records > 0 && segment.last() > after) {
            // The offset is only good in the very segment it was measured in.
            let offset = match start_hint {
                Some((_, segment_first, offset)) if segment_first == segment.first => offset,
                _ => 0,
            };
            // Streamed from the offset, a record at a time: a Pi should not hold whole segments in memory to send a
            // batch.
            let file = File::open(&segment.path).map_err(io(format!("open {}", segment.path.display())))?;
            let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
            std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(offset)).map_err(io("seek in a segment"))?;
            let mut position = offset as usize;
            let mut frame = Vec::new();
            while let Some((record, size)) = read_record(&mut reader, &mut frame) {
                position += size;
                if record.sequence <= after {
                    continue;
                }
                if record.sequence > synced {
                    break;
                }
                bytes_read += size;
                records.push(record);
                if records.len() >= max_records || bytes_read >= max_bytes {
                    let next = records.last().map(|r| r.sequence + 1).unwrap_or(after + 1);
                    next_position = Some((next, segment.first, position as u64));
                    break;
                }
            }
            if next_position.is_some() || segment.last() > synced {
                break;
            }
        }
        inner.read_position = next_position;
        Ok(records)
    }

    /// Records that the cloud has everything up to `sequence`: persists the mark, then deletes segments it covers.
    pub fn ack(&self, sequence: u64) -> Result<(), SpoolError> {
        let _turn = self.marking.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut inner = self.lock();
        if sequence <= inner.acked {
            return Ok(());
        }
        if sequence >= inner.next_sequence {
            // The cloud holds numbers this disk no longer has (only possible if synced data was lost, or the spool
            // restored from an old copy). Numbering on below its mark would make the cloud take new records for
            // duplicates, so it continues after the mark; what the disk holds is all covered by it.
            tracing::error!(
                cloud_mark = sequence,
                local_last = inner.next_sequence - 1,
                "the cloud has committed more of this spool than the disk holds; numbering continues after its mark"
            );
            self.persist_mark(&mut inner, sequence)?;
            for segment in inner.segments.drain(..) {
                fs::remove_file(&segment.path).map_err(io(format!("remove {}", segment.path.display())))?;
            }
            inner.active = None;
            inner.read_position = None;
            inner.acked = sequence;
            inner.next_sequence = sequence + 1;
            inner.synced = sequence;
            self.keep_reserve(&mut inner);
            return Ok(());
        }
        // The mark is written without the spool's lock, so appends go on meanwhile: only acks change what it
        // covers (the acknowledged segments), and they take turns. A full disk needs segments freed: that is done
        // under the lock.
        let id = inner.id;
        inner.marking_to = Some(sequence);
        drop(inner);
        let written = self.write_mark(id, sequence);
        let mut inner = self.lock();
        inner.marking_to = None;
        match written {
            Ok(()) => {}
            Err(error) if error.is_disk_full() => self.free_space_for_mark(&mut inner, sequence, error)?,
            Err(error) => return Err(error),
        }
        inner.acked = sequence;
        while let Some(oldest) = inner.segments.front() {
            let is_active = inner.segments.len() == 1;
            if oldest.last() > sequence || oldest.records == 0 {
                break;
            }
            if is_active {
                // The active segment is fully acknowledged: close it, the next append starts a new one.
                inner.active = None;
            }
            let oldest = inner.segments.pop_front().expect("checked above");
            fs::remove_file(&oldest.path).map_err(io(format!("remove {}", oldest.path.display())))?;
        }
        self.keep_reserve(&mut inner);
        Ok(())
    }

    /// Writes the cloud's mark `sequence`, freeing space first if the disk is full: there nothing would be freed
    /// until the mark is written. First the reserve goes; should that not do (it was used already), the segments
    /// the mark covers, which are the cloud's already, all but the newest that holds records: it keeps the
    /// numbering's place should the agent stop before the mark is written (a restart numbers on from the last
    /// record it finds, else from the mark on disk, and below what the cloud holds new records would be taken for
    /// ones it has).
    fn persist_mark(&self, inner: &mut Inner, sequence: u64) -> Result<(), SpoolError> {
        match self.write_mark(inner.id, sequence) {
            Ok(()) => Ok(()),
            Err(error) if error.is_disk_full() => self.free_space_for_mark(inner, sequence, error),
            Err(error) => Err(error),
        }
    }

    /// The rest of [`Spool::persist_mark`] once writing the mark found the disk full (`error`).
    fn free_space_for_mark(&self, inner: &mut Inner, sequence: u64, error: SpoolError) -> Result<(), SpoolError> {
        tracing::warn!(%error, "the disk is full: freeing space to write the cloud's mark");
        let reserve = self.config.dir.join("reserve");
        let mut last_error = error;
        match fs::remove_file(&reserve) {
            Ok(()) => {
                inner.reserve_missing = true;
                self.space_freed();
                match self.write_mark(inner.id, sequence) {
                    Ok(()) => return Ok(()),
                    Err(error) if error.is_disk_full() => last_error = error,
                    Err(error) => return Err(error),
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => inner.reserve_missing = true,
            Err(error) => tracing::warn!(%error, "cannot remove the spool's reserve"),
        }
        let mut removed = 0;
        while inner.segments.front().is_some_and(|oldest| oldest.records > 0 && oldest.last() <= sequence)
            && inner.segments.iter().skip(1).any(|later| later.records > 0)
        {
            let oldest = inner.segments.pop_front().expect("checked above");
            fs::remove_file(&oldest.path).map_err(io(format!("remove {}", oldest.path.display())))?;
            inner.read_position = None;
            removed += 1;
            self.space_freed();
        }
        if removed == 0 {
            return Err(last_error);
        }
        tracing::warn!(segments = removed, "removed acknowledged segments before writing the cloud's mark");
        self.write_mark(inner.id, sequence)
    }

    /// Makes the reserve again where it is missing; a disk still full leaves that to the next ack.
    fn keep_reserve(&self, inner: &mut Inner) {
        if !inner.reserve_missing {
            return;
        }
        let path = self.config.dir.join("reserve");
        let made = (|| {
            #[cfg(test)]
            if self.disk_full.load(std::sync::atomic::Ordering::SeqCst) != 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "the test filled the disk"));
            }
            if fs::metadata(&path).is_ok_and(|metadata| metadata.len() >= RESERVE_BYTES as u64) {
                return Ok(());
            }
            // Written, not set_len: a sparse file would reserve nothing. Not zeros, which a compressing file
            // system would not store either.
            let mut file = File::create(&path)?;
            file.write_all(&[0xa5; RESERVE_BYTES])?;
            file.sync_all()
        })();
        match made {
            Ok(()) => inner.reserve_missing = false,
            Err(error) => {
                // A part written would hold space without being counted on.
                let _ = fs::remove_file(&path);
                tracing::debug!(%error, "cannot make the spool's reserve yet");
            }
        }
    }

    /// Persists the cloud's mark.
    fn write_mark(&self, id: uuid::Uuid, acked: u64) -> Result<(), SpoolError> {
        #[cfg(test)]
        if let Some(pause) = self.pause_in_mark_write.lock().unwrap().take() {
            pause.wait();
            pause.wait();
        }
        #[cfg(test)]
        if self.disk_full.load(std::sync::atomic::Ordering::SeqCst) != 0 {
            let full = std::io::Error::new(std::io::ErrorKind::StorageFull, "the test filled the disk");
            return Err(io("replace the state file")(full));
        }
        write_state(&self.config.dir, id, acked)
    }

    /// Tests: a file was removed, so a disk full until then has room.
    fn space_freed(&self) {
        #[cfg(test)]
        let _ = self.disk_full.compare_exchange(
            FULL_UNTIL_FREED,
            0,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// The spool's figures.
    pub fn stats(&self) -> SpoolStats {
        let inner = self.lock();
        let (pending_records, pending_bytes) = pending(&inner);
        SpoolStats {
            bytes: total_bytes(&inner),
            pending_bytes,
            pending_records,
            acked_sequence: inner.acked,
            last_sequence: inner.next_sequence - 1,
            oldest_pending_since: inner
                .segments
                .iter()
                .find(|s| s.records > 0 && s.last() > inner.covered())
                .map(|s| s.created),
            dropped_records: inner.dropped_records,
        }
    }

    /// The spool's id: sequence numbers count within it.
    pub fn id(&self) -> uuid::Uuid {
        self.lock().id
    }

    /// The lowest sequence still held that the cloud has not acknowledged (or the next to be numbered).
    pub fn first_pending_sequence(&self) -> u64 {
        let inner = self.lock();
        inner
            .segments
            .iter()
            .find(|s| s.records > 0 && s.last() > inner.covered())
            .map(|s| s.first.max(inner.covered() + 1))
            .unwrap_or(inner.next_sequence)
    }
}

fn total_bytes(inner: &Inner) -> u64 {
    inner.segments.iter().map(|segment| segment.bytes).sum()
}

/// Records above the acknowledged mark and their bytes. Exact in records because sequences within a segment are
/// contiguous; bytes are prorated within the segment that holds the mark.
fn pending(inner: &Inner) -> (u64, u64) {
    let covered = inner.covered();
    inner.segments.iter().fold((0, 0), |(records, bytes), segment| {
        let unacked = if segment.records == 0 || segment.last() <= covered {
            0
        } else if segment.first > covered {
            segment.records
        } else {
            segment.last() - covered
        };
        let unacked_bytes = match unacked {
            0 => 0,
            n if n == segment.records => segment.bytes,
            n => (segment.bytes as u128 * n as u128 / segment.records as u128) as u64,
        };
        (records + unacked, bytes + unacked_bytes)
    })
}

/// Reads a segment, cutting it at the first record that is torn, corrupt or out of sequence.
fn recover_segment(path: &Path, first: u64) -> Result<(Segment, u64), SpoolError> {
    let mut contents = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut contents))
        .map_err(io(format!("read {}", path.display())))?;
    let mut position = 0usize;
    let mut records = 0u64;
    while position < contents.len() {
        match decode_record(&contents[position..]) {
            Some((record, size)) if record.sequence == first + records => {
                position += size;
                records += 1;
            }
            _ => break,
        }
    }
    let truncated = (contents.len() - position) as u64;
    let file = OpenOptions::new().write(true).open(path).map_err(io(format!("open {}", path.display())))?;
    if truncated > 0 {
        file.set_len(position as u64).map_err(io(format!("truncate {}", path.display())))?;
    }
    // What a killed process wrote may still be only in the page cache: make it durable before it can be uploaded.
    file.sync_all().map_err(io(format!("fsync {}", path.display())))?;
    let created =
        fs::metadata(path).and_then(|m| m.created().or_else(|_| m.modified())).unwrap_or_else(|_| SystemTime::now());
    Ok((Segment { first, records, bytes: position as u64, path: path.to_path_buf(), created }, truncated))
}

fn read_state(dir: &Path) -> Result<Option<(uuid::Uuid, u64)>, SpoolError> {
    let path = dir.join("state");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(SpoolError::Io { context: format!("read {}", path.display()), source: error }),
    };
    let mut id = None;
    let mut acked = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("spool_id", value)) => id = uuid::Uuid::try_parse(value).ok(),
            Some(("acked", value)) => acked = value.parse().ok(),
            _ => {}
        }
    }
    match (id, acked) {
        (Some(id), Some(acked)) => Ok(Some((id, acked))),
        _ => Err(SpoolError::Io {
            context: format!("parse {}", path.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected contents {text:?}")),
        }),
    }
}

fn write_state(dir: &Path, id: uuid::Uuid, acked: u64) -> Result<(), SpoolError> {
    let path = dir.join("state");
    write_file_durably(&path, format!("spool_id={id}\nacked={acked}\n").as_bytes())
        .map_err(io(format!("replace {}", path.display())))
}

/// Replaces a file's contents so that a crash leaves either the old or the new version on disk: a temporary file,
/// fsync, rename over the old one, fsync of the directory (without which the rename itself may not survive).
pub(crate) fn write_file_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension("tmp");
    let mut file = File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temp, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smartfarm_proto::common::v1::Reading;

    fn config(dir: &Path) -> SpoolConfig {
        SpoolConfig { dir: dir.to_path_buf(), segment_bytes: 4096, max_bytes: 1 << 30, fsync: FsyncPolicy::Always }
    }

    fn body(value: f64) -> spool_record::Body {
        spool_record::Body::Reading(Reading {
            device_id: "0193a4b2-0000-7000-8000-000000000001".into(),
            metric: "temperature".into(),
            value,
            measure_time: None,
            receive_time: None,
        })
    }

    fn values(records: &[SpoolRecord]) -> Vec<f64> {
        records
            .iter()
            .map(|r| match &r.body {
                Some(spool_record::Body::Reading(reading)) => reading.value,
                _ => f64::NAN,
            })
            .collect()
    }

    #[test]
    fn records_are_numbered_read_back_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, recovery) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(recovery, Recovery::default());
        let appended = spool.append((0..100).map(|i| body(i as f64)).collect()).unwrap();
        assert_eq!((appended.first_sequence, appended.last_sequence), (1, 100));
        let more = spool.append(vec![body(100.0)]).unwrap();
        assert_eq!(more.first_sequence, 101);
        drop(spool);

        let (spool, recovery) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(recovery.pending_records, 101);
        assert!(recovery.segments > 1, "4 KiB segments roll");
        let records = spool.read_after(0, 1000, usize::MAX).unwrap();
        assert_eq!(records.iter().map(|r| r.sequence).collect::<Vec<_>>(), (1..=101).collect::<Vec<_>>());
        assert_eq!(values(&records)[..3], [0.0, 1.0, 2.0]);
        assert_eq!(spool.append(vec![body(0.0)]).unwrap().first_sequence, 102, "numbers continue after a reopen");
    }

    #[test]
    fn reads_come_in_batches_and_acks_delete_what_they_cover() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        for i in 0..300 {
            spool.append(vec![body(i as f64)]).unwrap();
        }
        let first = spool.read_after(0, 120, usize::MAX).unwrap();
        assert_eq!((first[0].sequence, first.last().unwrap().sequence), (1, 120));
        let second = spool.read_after(120, 120, usize::MAX).unwrap();
        assert_eq!((second[0].sequence, second.last().unwrap().sequence), (121, 240));
        let bytes_before = spool.stats().bytes;
        spool.ack(240).unwrap();
        let stats = spool.stats();
        assert_eq!((stats.acked_sequence, stats.pending_records), (240, 60));
        assert!(stats.bytes < bytes_before, "acknowledged segments are deleted");
        assert_eq!(spool.read_after(240, 1000, usize::MAX).unwrap().len(), 60);

        let id = spool.id();
        drop(spool);
        let (spool, recovery) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(recovery.pending_records, 60, "the mark survives a restart");
        assert_eq!(spool.id(), id, "and so does the spool's id");
        assert_eq!(spool.first_pending_sequence(), 241);
        spool.ack(300).unwrap();
        assert_eq!(spool.stats().pending_records, 0);
        assert_eq!(spool.append(vec![body(1.0)]).unwrap().first_sequence, 301, "numbers never go back");
        drop(spool);
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(spool.append(vec![body(1.0)]).unwrap().first_sequence, 302);
    }

    #[test]
    fn batches_that_end_on_a_segment_boundary_continue_at_the_next_segments_start() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(SpoolConfig { segment_bytes: 1, ..config(dir.path()) }).unwrap();
        // One append per segment: segments of exactly 10 records.
        for round in 0..5 {
            spool.append((0..10).map(|i| body((round * 10 + i) as f64)).collect()).unwrap();
        }
        let mut after = 0;
        let mut seen = Vec::new();
        for batch_size in [10, 10, 7, 13, 10, 5] {
            let batch = spool.read_after(after, batch_size, usize::MAX).unwrap();
            if batch.is_empty() {
                break;
            }
            after = batch.last().unwrap().sequence;
            seen.extend(batch.into_iter().map(|r| r.sequence));
        }
        assert_eq!(seen, (1..=50).collect::<Vec<_>>(), "every record once, in order, across segment boundaries");
    }

    #[test]
    fn a_torn_tail_is_cut_and_everything_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        spool.append((0..10).map(|i| body(i as f64)).collect()).unwrap();
        drop(spool);
        // A power cut in the middle of the last record: drop its last 5 bytes.
        let segment = segment_path(dir.path(), 1);
        let length = fs::metadata(&segment).unwrap().len();
        OpenOptions::new().write(true).open(&segment).unwrap().set_len(length - 5).unwrap();

        let (spool, recovery) = Spool::open(config(dir.path())).unwrap();
        assert!(recovery.truncated_bytes > 0);
        assert_eq!(recovery.pending_records, 9);
        let records = spool.read_after(0, 100, usize::MAX).unwrap();
        assert_eq!(values(&records), (0..9).map(|i| i as f64).collect::<Vec<_>>());
        assert_eq!(spool.append(vec![body(42.0)]).unwrap().first_sequence, 10, "the torn record's number is reused");

        // Garbage after valid records (a CRC mismatch) is cut the same way.
        drop(spool);
        let mut file = OpenOptions::new().append(true).open(segment_path(dir.path(), 1)).unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9]).unwrap();
        drop(file);
        let (spool, recovery) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(recovery.truncated_bytes, 11);
        assert_eq!(spool.read_after(0, 100, usize::MAX).unwrap().len(), 10);
    }

    #[test]
    fn the_cap_drops_the_oldest_segment_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig { max_bytes: 16 * 1024, ..config(dir.path()) };
        let (spool, _) = Spool::open(config).unwrap();
        let mut dropped = 0;
        for i in 0..2000 {
            dropped += spool.append(vec![body(i as f64)]).unwrap().dropped_records;
        }
        let stats = spool.stats();
        assert!(stats.bytes <= 16 * 1024 + 4096, "stays near its cap: {}", stats.bytes);
        assert!(dropped > 0);
        assert_eq!(stats.dropped_records, dropped, "every drop is counted");
        assert_eq!(stats.pending_records + dropped, 2000, "what is left plus what was dropped is everything");
        let records = spool.read_after(0, 10_000, usize::MAX).unwrap();
        assert_eq!(records.last().unwrap().sequence, 2000, "the newest records are kept");
        assert_eq!(records.first().unwrap().sequence, dropped + 1, "oldest first out");
    }

    #[test]
    fn a_segment_the_cap_cannot_remove_stays_and_the_append_still_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig { max_bytes: 16 * 1024, ..config(dir.path()) };
        let (spool, _) = Spool::open(config).unwrap();
        let mut appended = 0;
        while spool.stats().bytes < 12 * 1024 {
            spool.append(vec![body(appended as f64)]).unwrap();
            appended += 1;
        }
        // The oldest segment's file cannot be removed (a directory stands in its place).
        let oldest = segment_path(dir.path(), 1);
        fs::remove_file(&oldest).unwrap();
        fs::create_dir(&oldest).unwrap();
        for _ in 0..200 {
            let stored = spool.append(vec![body(appended as f64)]).expect("stored and numbered: not an error");
            assert_eq!(stored.dropped_records, 0, "nothing could be dropped");
            appended += 1;
        }
        assert!(spool.stats().bytes > 16 * 1024, "over its cap while the segment stays");
        assert_eq!(spool.stats().dropped_records, 0);
        // Once it is gone the cap applies again.
        fs::remove_dir(&oldest).unwrap();
        let dropped = spool.append(vec![body(appended as f64)]).unwrap().dropped_records;
        assert!(dropped > 0);
        assert_eq!(spool.stats().dropped_records, dropped);
    }

    #[test]
    fn a_failed_fsync_refuses_new_records_and_keeps_the_rest_from_the_cloud_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig { fsync: FsyncPolicy::Interval(Duration::from_secs(3600)), ..config(dir.path()) };
        let (spool, _) = Spool::open(config.clone()).unwrap();
        spool.append((0..5).map(|i| body(i as f64)).collect()).unwrap();
        spool.sync().unwrap();
        spool.append((5..8).map(|i| body(i as f64)).collect()).unwrap();
        spool.fail_next_fsync.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(spool.sync(), Err(SpoolError::FsyncFailed(_))));
        // Later syncs leave the mark where it was: on Linux a second fsync would succeed and prove nothing.
        spool.sync().unwrap();
        let readable = spool.read_after(0, 100, usize::MAX).unwrap();
        assert_eq!(readable.len(), 5, "only what an fsync that succeeded covered may go up");
        let refused = spool.append(vec![body(8.0)]).unwrap_err();
        assert!(refused.to_string().contains("failed an fsync"), "{refused}");
        assert_eq!(spool.failure(), Some(refused.to_string()), "what the farm's alert topic is told");
        // A restart reads what is on disk, fsyncs it, and goes on.
        drop(spool);
        let (spool, _) = Spool::open(config).unwrap();
        assert_eq!(spool.read_after(0, 100, usize::MAX).unwrap().len(), 8);
        assert_eq!(spool.append(vec![body(8.0)]).unwrap().first_sequence, 9);
    }

    /// An append that fails, and whose records cannot be cut from the segment either, stops the spool: the next
    /// records would take the numbers of those left on disk. After a restart, numbering goes on after them, and no
    /// number is read twice.
    #[test]
    fn an_append_that_cannot_be_cut_stops_the_spool_instead_of_numbering_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        spool.append((0..3).map(|i| body(i as f64)).collect()).unwrap();
        spool.fail_next_append_and_cut.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(spool.append((3..5).map(|i| body(i as f64)).collect()).is_err());
        let refused = spool.append(vec![body(5.0)]).unwrap_err();
        assert!(matches!(refused, SpoolError::FsyncFailed(_)), "{refused}");
        drop(spool);
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        let next = spool.append(vec![body(5.0)]).unwrap().first_sequence;
        spool.sync().unwrap();
        let sequences: Vec<u64> =
            spool.read_after(0, 100, usize::MAX).unwrap().iter().map(|record| record.sequence).collect();
        assert_eq!(sequences, (1..=next).collect::<Vec<_>>(), "each number once, in order");
    }

    fn set_disk(spool: &Spool, state: u8) {
        spool.disk_full.store(state, std::sync::atomic::Ordering::SeqCst);
    }

    /// A caught-up agent on a full disk: the mark covers only the active segment, which cannot go before the mark
    /// is written. The reserve makes room for it, and is made again once the segment is gone.
    #[test]
    fn an_ack_on_a_full_disk_writes_the_mark_in_the_reserve_s_room() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        let reserve = dir.path().join("reserve");
        assert_eq!(fs::metadata(&reserve).unwrap().len(), RESERVE_BYTES as u64, "made at open");
        spool.append((0..10).map(|i| body(i as f64)).collect()).unwrap();
        set_disk(&spool, FULL_UNTIL_FREED);
        spool.ack(10).expect("the mark is written once the reserve is freed");
        assert_eq!(read_state(dir.path()).unwrap().unwrap().1, 10);
        assert!(spool.lock().segments.is_empty(), "the acknowledged segment is gone");
        assert_eq!(fs::metadata(&reserve).unwrap().len(), RESERVE_BYTES as u64, "made again");

        // A disk that stays full: the reserve is used up and the ack fails; it is made again by a later ack.
        spool.append((10..20).map(|i| body(i as f64)).collect()).unwrap();
        set_disk(&spool, FULL);
        assert!(spool.ack(20).unwrap_err().is_disk_full());
        assert!(!reserve.exists());
        set_disk(&spool, 0);
        spool.ack(20).unwrap();
        assert!(reserve.exists());
    }

    /// With the reserve used already, the segments the mark covers go first, all but the newest that holds
    /// records. Should the mark still not be written, a restart numbers after what the cloud holds, even when the
    /// newest segment is empty (its only append failed).
    #[test]
    fn an_ack_on_a_full_disk_frees_the_acknowledged_segments_before_writing_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        let mut appended = 0u64;
        while spool.lock().segments.len() < 5 {
            spool.append(vec![body(appended as f64)]).unwrap();
            appended += 1;
        }
        let segments = |spool: &Spool| spool.lock().segments.iter().map(|segment| segment.first).collect::<Vec<_>>();
        let firsts = segments(&spool);
        // The reserve is gone (used by an earlier ack); the cloud has everything in the first three segments.
        fs::remove_file(dir.path().join("reserve")).unwrap();
        let mark = firsts[3] - 1;
        set_disk(&spool, FULL_UNTIL_FREED);
        spool.ack(mark).expect("the mark is written once space is freed");
        assert_eq!(segments(&spool), firsts[3..].to_vec());
        assert_eq!(read_state(dir.path()).unwrap().unwrap().1, mark);

        // The newest segment is empty, and the disk stays full: the newest with records stays, the mark is not
        // written, the ack fails.
        {
            let mut inner = spool.lock();
            let next = inner.next_sequence;
            spool.start_segment(&mut inner, next).unwrap();
        }
        set_disk(&spool, FULL);
        assert!(spool.ack(appended).unwrap_err().is_disk_full());
        assert_eq!(segments(&spool), vec![firsts[4], appended + 1], "the newest segment with records stays");
        drop(spool);
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(spool.append(vec![body(0.0)]).unwrap().first_sequence, appended + 1);
        spool.ack(appended).unwrap();
        assert_eq!(spool.first_pending_sequence(), appended + 1, "only the new record is pending");

        // Only an empty segment left above an old mark: its name still gives the numbering.
        drop(spool);
        for entry in fs::read_dir(segment_dir(dir.path())).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        File::create(segment_path(dir.path(), appended + 50)).unwrap();
        // Twice: a second restart before any append still finds the name.
        drop(Spool::open(config(dir.path())).unwrap());
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(spool.append(vec![body(0.0)]).unwrap().first_sequence, appended + 50);
        assert_eq!(spool.append(vec![body(1.0)]).unwrap().first_sequence, appended + 51);
        drop(spool);
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(spool.read_after(appended + 49, 10, usize::MAX).unwrap().len(), 2, "both records read back");
    }

    /// Appends do not wait for the cloud's mark to be written (two fsyncs); the ack then removes what it covers,
    /// and a second ack waits for the first's mark.
    #[test]
    fn appends_go_on_while_the_cloud_mark_is_written() {
        let dir = tempfile::tempdir().unwrap();
        // A segment per append: each ack has segments to remove.
        let spool = std::sync::Arc::new(Spool::open(SpoolConfig { segment_bytes: 1, ..config(dir.path()) }).unwrap().0);
        for value in 0..3 {
            spool.append(vec![body(value as f64)]).unwrap();
        }
        let pause = std::sync::Arc::new(std::sync::Barrier::new(2));
        *spool.pause_in_mark_write.lock().unwrap() = Some(pause.clone());
        let first = std::thread::spawn({
            let spool = spool.clone();
            move || spool.ack(2)
        });
        pause.wait(); // The first ack is writing its mark.
        assert_eq!(spool.stats().pending_records, 1, "what the mark being written covers is not pending");
        let (appended, append_returned) = std::sync::mpsc::channel();
        std::thread::spawn({
            let spool = spool.clone();
            move || appended.send(spool.append(vec![body(3.0)]).unwrap().first_sequence).unwrap()
        });
        assert_eq!(append_returned.recv_timeout(Duration::from_secs(10)), Ok(4), "the append waited for the mark");
        let (acked, second_returned) = std::sync::mpsc::channel();
        let second = std::thread::spawn({
            let spool = spool.clone();
            move || acked.send(spool.ack(3)).unwrap()
        });
        assert!(second_returned.recv_timeout(Duration::from_millis(300)).is_err(), "acks take turns");
        pause.wait(); // The first mark is written.
        first.join().unwrap().unwrap();
        second_returned.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        second.join().unwrap();
        assert_eq!(spool.stats().acked_sequence, 3);
        assert_eq!(
            spool.read_after(0, 10, usize::MAX).unwrap().iter().map(|r| r.sequence).collect::<Vec<_>>(),
            vec![4]
        );
        drop(spool);
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(spool.stats().acked_sequence, 3, "the later mark is the one on disk");
    }

    #[test]
    fn a_sync_waits_for_the_fsync_another_sync_has_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig { fsync: FsyncPolicy::Interval(Duration::from_secs(3600)), ..config(dir.path()) };
        let spool = std::sync::Arc::new(Spool::open(config).unwrap().0);
        spool.append((0..5).map(|i| body(i as f64)).collect()).unwrap();
        let pause = std::sync::Arc::new(std::sync::Barrier::new(2));
        *spool.pause_before_fsync.lock().unwrap() = Some(pause.clone());
        let first = std::thread::spawn({
            let spool = spool.clone();
            move || spool.sync()
        });
        pause.wait(); // The first sync has cleared `dirty` and not yet fsynced.
        let (readable, read) = std::sync::mpsc::channel();
        let second = std::thread::spawn({
            let spool = spool.clone();
            move || {
                spool.sync().unwrap();
                readable.send(spool.read_after(0, 100, usize::MAX).unwrap().len()).unwrap();
            }
        });
        assert!(
            read.recv_timeout(Duration::from_millis(300)).is_err(),
            "the second sync returned while the first one's fsync was still to come: its records could go up"
        );
        pause.wait(); // The fsync goes ahead.
        first.join().unwrap().unwrap();
        assert_eq!(read.recv_timeout(Duration::from_secs(10)).unwrap(), 5, "then every record is on disk");
        second.join().unwrap();
    }

    #[test]
    fn only_records_on_disk_are_read_for_upload() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig { fsync: FsyncPolicy::Interval(Duration::from_secs(3600)), ..config(dir.path()) };
        let (spool, _) = Spool::open(config.clone()).unwrap();
        spool.append((0..5).map(|i| body(i as f64)).collect()).unwrap();
        assert!(spool.read_after(0, 100, usize::MAX).unwrap().is_empty(), "not fsynced yet: not for the cloud");
        spool.sync().unwrap();
        spool.append(vec![body(5.0)]).unwrap();
        let records = spool.read_after(0, 100, usize::MAX).unwrap();
        assert_eq!(records.iter().map(|r| r.sequence).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(spool.stats().pending_bytes, spool.stats().bytes, "nothing acknowledged: every byte pending");
        spool.ack(5).unwrap();
        assert!(spool.stats().pending_bytes < spool.stats().bytes / 2, "one record of six pending");

        // A restart fsyncs what it recovers, so the rest may go up.
        drop(spool);
        let (spool, _) = Spool::open(config).unwrap();
        assert_eq!(spool.read_after(5, 100, usize::MAX).unwrap().len(), 1);
    }

    #[test]
    fn a_cloud_mark_beyond_the_disk_moves_numbering_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(config(dir.path())).unwrap();
        spool.append((0..3).map(|i| body(i as f64)).collect()).unwrap();
        // The cloud committed up to 10: records 4 to 10 were lost here (say, a disk restored from an old copy).
        spool.ack(10).unwrap();
        assert_eq!(spool.stats().pending_records, 0);
        assert_eq!(
            spool.append(vec![body(1.0)]).unwrap().first_sequence,
            11,
            "new records are not taken for duplicates"
        );
        assert_eq!(spool.read_after(10, 100, usize::MAX).unwrap().len(), 1);
        drop(spool);
        let (spool, recovery) = Spool::open(config(dir.path())).unwrap();
        assert_eq!(recovery.pending_records, 1);
        assert_eq!(spool.append(vec![body(2.0)]).unwrap().first_sequence, 12);
    }
}
