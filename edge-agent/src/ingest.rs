//! From an accepted MQTT payload to durable spool records: parsing, aggregation windows, and the spool writer that
//! commits concurrent appends in groups (one fsync for everything that arrived meanwhile), so every sensor waits
//! only for its own durability and thousands of sensors share the cost of each fsync.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use smartfarm_core::time::{from_unix_micros, to_timestamp, to_unix_micros};
use smartfarm_proto::common::v1::Reading;
use smartfarm_proto::ingestion::v1::{Aggregate, spool_record::Body};

use crate::config::UploadMode;
use crate::payload::{self, Measurement, Rejection};
use crate::spool::{Appended, Spool};

/// Something the agent announces on the farm's local alert topic.
#[derive(Clone, Debug, PartialEq)]
pub enum LocalAlert {
    /// The spool passed its cap and dropped the oldest unacknowledged records.
    SpoolOverflow { dropped_records: u64 },
    /// An fsync of the spool failed: it takes no new records until the agent restarts.
    SpoolFailed { reason: String },
    /// The cloud refused a batch for good; its records stay in the spool.
    BatchRefused { first_sequence: u64, last_sequence: u64, reason: String },
    /// The cloud committed a batch without some of its records: (reason, count) pairs.
    DroppedByCloud { last_sequence: u64, dropped: Vec<(String, u64)> },
    /// The image area passed its cap and dropped the oldest unsent photos.
    ImageSpoolOverflow { dropped_photos: u64, bytes: u64 },
    /// The cloud refused a photo for good; it was set aside in the spool's `images/refused/`.
    ImageRefused { file: String, reason: String },
    /// The plant-disease model found a disease on a camera's photo (on the farm, link or no link).
    DiseaseDetected { camera: Uuid, label: String, confidence: f64, model: String },
    /// One of the farm's rules raised, repeated or resolved an alert here.
    Rule(smartfarm_core::rules::Alert),
    /// The cloud says an alert of the farm opened or changed (raised there, or this agent's alert as recorded).
    FromCloud(smartfarm_proto::alert::v1::Alert),
}

/// Why a payload did not make it into the spool.
#[derive(Debug)]
pub enum IngestError {
    /// The payload is bad; the sensor is told why.
    Rejected(Rejection),
    /// The spool cannot be written (disk full, I/O error): nothing was stored, the sensor should retry.
    Unavailable(String),
}

/// A device's readings to count in the aggregation windows.
type Count = (Uuid, Vec<Measurement>);

/// Records to append, then readings to count.
struct Write {
    bodies: Vec<Body>,
    /// Counted in the aggregation windows once `bodies` are in the spool, and only then: a publish whose records
    /// were not written is sent again by its sensor, and must not be counted twice.
    count: Option<Count>,
    done: oneshot::Sender<Result<Appended, String>>,
}

/// What the spool writer thread is asked to do.
enum Request {
    Write(Write),
    /// Close the aggregation windows that ended by `now` (every open one when `None`) and spool their aggregates.
    CloseWindows {
        now: Option<SystemTime>,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// Appends to the spool from any task; a dedicated thread does the file work and groups concurrent requests. With
/// aggregation on, the thread also owns the windows: readings are counted only once their own records are written,
/// and a closed window's aggregate that cannot be written (a full disk) is kept and written with the next append.
#[derive(Clone)]
pub struct SpoolWriter {
    requests: mpsc::Sender<Request>,
    aggregates: bool,
}

/// Most requests committed by one fsync.
const MAX_GROUP: usize = 512;

/// The writer thread's state besides the spool.
struct Writing {
    spool: Arc<Spool>,
    alerts: mpsc::UnboundedSender<LocalAlert>,
    aggregator: Option<Aggregator>,
    /// Aggregates of closed windows not yet in the spool.
    unwritten: Vec<Body>,
}

impl Writing {
    fn append(&self, bodies: Vec<Body>) -> Result<Appended, String> {
        let started = std::time::Instant::now();
        let appended = self.spool.append(bodies);
        // The file work alone (write and, under `always`, fsync), to tell disk time from waiting.
        metrics::histogram!("smartfarm_edge_spool_append_seconds").record(started.elapsed().as_secs_f64());
        let appended = appended.map_err(|error| {
            tracing::error!(%error, "spool append failed");
            error.to_string()
        })?;
        if appended.dropped_records > 0 {
            metrics::counter!("smartfarm_edge_spool_dropped_records_total").increment(appended.dropped_records);
            let _ = self.alerts.send(LocalAlert::SpoolOverflow { dropped_records: appended.dropped_records });
        }
        Ok(appended)
    }

    /// Appends a group of writes in one go and answers each; what was written is counted in the windows.
    fn write_group(&mut self, group: Vec<Write>) {
        // Closed windows that could not be written go first; while they cannot be (a full disk), nothing is taken:
        // no publish is acknowledged, so sensors hold back, and the windows in memory stop growing.
        if let Err(error) = self.write_closed_windows() {
            for Write { done, .. } in group {
                let _ = done.send(Err(error.clone()));
            }
            return;
        }
        let mut bodies = Vec::new();
        let mut rest = Vec::with_capacity(group.len());
        for Write { bodies: mine, count, done } in group {
            rest.push((mine.len(), count, done));
            bodies.extend(mine);
        }
        match self.append(bodies) {
            Ok(appended) => {
                let mut next = appended.first_sequence;
                for (size, count, done) in rest {
                    if let (Some((device, measurements)), Some(aggregator)) = (count, self.aggregator.as_mut()) {
                        self.unwritten.extend(aggregator.add(device, &measurements));
                    }
                    let mine = Appended {
                        first_sequence: next,
                        last_sequence: next + size as u64 - 1,
                        dropped_records: appended.dropped_records,
                    };
                    next += size as u64;
                    let _ = done.send(Ok(mine));
                }
            }
            Err(error) => {
                for (_, _, done) in rest {
                    let _ = done.send(Err(error.clone()));
                }
            }
        }
    }

    /// Writes the aggregates of closed windows; kept for the next try when that fails.
    fn write_closed_windows(&mut self) -> Result<(), String> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        self.append(self.unwritten.clone())?;
        self.unwritten.clear();
        Ok(())
    }
}

impl SpoolWriter {
    /// Starts the writer thread, with aggregation windows of `aggregation` when given; it stops when every
    /// `SpoolWriter` clone is dropped.
    pub fn start(
        spool: Arc<Spool>,
        alerts: mpsc::UnboundedSender<LocalAlert>,
        aggregation: Option<Duration>,
    ) -> SpoolWriter {
        let (requests, mut receiver) = mpsc::channel::<Request>(4096);
        let mut writing =
            Writing { spool, alerts, aggregator: aggregation.map(Aggregator::new), unwritten: Vec::new() };
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                while let Some(first) = receiver.blocking_recv() {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match receiver.try_recv() {
                            Ok(request) => group.push(request),
                            Err(_) => break,
                        }
                    }
                    let mut writes = Vec::with_capacity(group.len());
                    let mut closes = Vec::new();
                    for request in group {
                        match request {
                            Request::Write(write) => writes.push(write),
                            Request::CloseWindows { now, done } => closes.push((now, done)),
                        }
                    }
                    if !writes.is_empty() {
                        writing.write_group(writes);
                    }
                    if let Some(aggregator) = writing.aggregator.as_mut() {
                        for (now, _) in &closes {
                            writing.unwritten.extend(aggregator.flush(*now));
                        }
                    }
                    // A closed window is final: its aggregate goes into the spool now, not with the next publish.
                    let closed = writing.write_closed_windows();
                    for (_, done) in closes {
                        let _ = done.send(closed.clone());
                    }
                }
            })
            .expect("the spool writer thread starts");
        SpoolWriter { requests, aggregates: aggregation.is_some() }
    }

    /// Queues `bodies` for the spool without waiting for them to be written: the receiver completes once they are
    /// (and `count` is counted in the aggregation windows). Lets one connection have many publishes in the same
    /// group commit.
    pub async fn submit(&self, bodies: Vec<Body>, count: Option<Count>) -> Result<Durable, String> {
        let (done, result) = oneshot::channel();
        let request = Request::Write(Write { bodies, count, done });
        self.requests.send(request).await.map_err(|_| "the spool writer stopped".to_string())?;
        Ok(result)
    }

    /// Closes the aggregation windows that ended by `now` (every open one when `None`) and spools their aggregates.
    pub async fn close_windows(&self, now: Option<SystemTime>) -> Result<(), String> {
        let (done, result) = oneshot::channel();
        let request = Request::CloseWindows { now, done };
        self.requests.send(request).await.map_err(|_| "the spool writer stopped".to_string())?;
        result.await.map_err(|_| "the spool writer stopped".to_string())?
    }
}

/// Completes when submitted records are in the spool (durable under the `always` fsync policy).
pub type Durable = oneshot::Receiver<Result<Appended, String>>;

/// Per-device, per-metric windows aligned to the clock.
#[derive(Debug)]
pub struct Aggregator {
    width_micros: i64,
    /// Per device, per metric: looked up by the metric's name without making a key (this runs on the spool
    /// writer's thread, for every reading).
    open: HashMap<Uuid, HashMap<String, Window>>,
}

#[derive(Clone, Copy, Debug)]
struct Window {
    start_micros: i64,
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    last: f64,
    last_time: i64,
}

impl Window {
    fn new(start_micros: i64, value: f64, time: i64) -> Window {
        Window { start_micros, count: 1, min: value, max: value, sum: value, last: value, last_time: time }
    }

    fn add(&mut self, value: f64, time: i64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
        if time >= self.last_time {
            self.last = value;
            self.last_time = time;
        }
    }
}

impl Aggregator {
    pub fn new(width: Duration) -> Aggregator {
        Aggregator { width_micros: width.as_micros() as i64, open: HashMap::new() }
    }

    fn body(width_micros: i64, device: Uuid, metric: &str, window: &Window) -> Body {
        Body::Aggregate(Aggregate {
            device_id: device.to_string(),
            metric: metric.to_string(),
            window_start_time: Some(to_timestamp(from_unix_micros(window.start_micros))),
            window_end_time: Some(to_timestamp(from_unix_micros(window.start_micros + width_micros))),
            count: window.count,
            min: window.min,
            max: window.max,
            avg: window.sum / window.count as f64,
            last: window.last,
        })
    }

    /// Adds readings; returns the aggregates this closes (a reading of a later window closes the open one; a late
    /// reading of an earlier window goes up as an aggregate of its own).
    pub fn add(&mut self, device: Uuid, measurements: &[Measurement]) -> Vec<Body> {
        let width = self.width_micros;
        let series = self.open.entry(device).or_default();
        let mut closed = Vec::new();
        for measurement in measurements {
            let time = to_unix_micros(measurement.time);
            let start = time.div_euclid(width) * width;
            let metric = measurement.metric.as_str();
            match series.get_mut(metric) {
                Some(window) if window.start_micros == start => window.add(measurement.value, time),
                Some(window) if window.start_micros < start => {
                    let finished = *window;
                    *window = Window::new(start, measurement.value, time);
                    closed.push(Self::body(width, device, metric, &finished));
                }
                Some(_) => closed.push(Self::body(width, device, metric, &Window::new(start, measurement.value, time))),
                None => {
                    series.insert(metric.to_string(), Window::new(start, measurement.value, time));
                }
            }
        }
        closed
    }

    /// Closes the windows that ended by `now` (all of them when `now` is `None`, at shutdown).
    pub fn flush(&mut self, now: Option<SystemTime>) -> Vec<Body> {
        let now = now.map(to_unix_micros);
        let width = self.width_micros;
        let mut closed = Vec::new();
        for (device, series) in &mut self.open {
            series.retain(|metric, window| {
                let ended = now.is_none_or(|now| window.start_micros + width <= now);
                if ended {
                    closed.push(Self::body(width, *device, metric, window));
                }
                !ended
            });
        }
        self.open.retain(|_, series| !series.is_empty());
        closed
    }
}

/// Where a rule's alert raised on the farm goes: up the link's urgent lane (straight from where it was raised, so
/// the cloud hears it without another task in between) and to the farm's alert topic.
#[derive(Clone, Debug)]
pub struct RaisedAlerts {
    pub urgent: Arc<crate::urgent::UrgentQueue>,
    pub alerts: mpsc::UnboundedSender<LocalAlert>,
}

impl RaisedAlerts {
    pub fn raise(&self, alert: smartfarm_core::rules::Alert) {
        self.urgent.push(smartfarm_proto::ingestion::v1::connect_request::Body::Alert(alert.to_proto()));
        let _ = self.alerts.send(LocalAlert::Rule(alert));
    }
}

/// Turns accepted payloads into spool records.
#[derive(Clone)]
pub struct Ingestor {
    /// Also counts readings in the aggregation windows, when it was started with them.
    writer: SpoolWriter,
    /// The farm's rules, evaluated on every accepted reading, and where the alerts they raise go.
    rules: Option<(Arc<crate::rules::EdgeRules>, RaisedAlerts)>,
    /// Whether each reading is spooled as it is (`raw` and `both`).
    raw: bool,
    max_future_skew: Duration,
}

impl Ingestor {
    /// An ingestor for `upload`; aggregation windows of `window` when the mode has aggregates.
    pub fn new(
        spool: Arc<Spool>,
        alerts: mpsc::UnboundedSender<LocalAlert>,
        upload: UploadMode,
        window: Duration,
        max_future_skew: Duration,
    ) -> Ingestor {
        let writer = SpoolWriter::start(spool, alerts, upload.aggregates().then_some(window));
        Ingestor { writer, rules: None, raw: upload.raw(), max_future_skew }
    }

    /// Evaluates `rules` on every accepted reading; the alerts they raise go to `raised`.
    pub fn with_rules(mut self, rules: Arc<crate::rules::EdgeRules>, raised: RaisedAlerts) -> Ingestor {
        self.rules = Some((rules, raised));
        self
    }

    /// Parses a payload from `device` and stores what it carries. Returns how many readings were accepted.
    pub async fn accept(&self, device: Uuid, payload: &[u8]) -> Result<usize, IngestError> {
        let (readings, durable) = self.submit(device, payload).await?;
        if let Some(durable) = durable {
            durable
                .await
                .map_err(|_| IngestError::Unavailable("the spool writer stopped".into()))?
                .map_err(IngestError::Unavailable)?;
        }
        Ok(readings)
    }

    /// Parses a payload from `device` and queues what it carries for the spool. Returns how many readings it
    /// carries and, when anything is to be written, the completion that says it is durable.
    pub async fn submit(&self, device: Uuid, payload: &[u8]) -> Result<(usize, Option<Durable>), IngestError> {
        let measurements =
            payload::parse(payload, SystemTime::now(), self.max_future_skew).map_err(IngestError::Rejected)?;
        if let Some((rules, raised)) = &self.rules {
            // Before the spool write: an alert must not wait for an fsync.
            for alert in rules.on_readings(device, &measurements) {
                raised.raise(alert);
            }
        }
        let accepted = measurements.len();
        let mut bodies = Vec::new();
        if self.raw {
            let device_id = device.to_string();
            bodies.extend(measurements.iter().map(|m| {
                Body::Reading(Reading {
                    device_id: device_id.clone(),
                    metric: m.metric.clone(),
                    value: m.value,
                    measure_time: Some(to_timestamp(m.time)),
                    receive_time: None,
                })
            }));
        }
        // With aggregates, the publish is settled once its readings are counted in their windows (after its raw
        // records, if any, are written).
        let count = (self.writer.aggregates && !measurements.is_empty()).then_some((device, measurements));
        let durable = match bodies.is_empty() && count.is_none() {
            true => None,
            false => Some(self.writer.submit(bodies, count).await.map_err(IngestError::Unavailable)?),
        };
        metrics::counter!("smartfarm_edge_readings_accepted_total").increment(accepted as u64);
        Ok((accepted, durable))
    }

    /// Spools the aggregates of windows that ended (every open one when `now` is `None`), and any that an earlier
    /// write could not.
    pub async fn flush_windows(&self, now: Option<SystemTime>) -> Result<(), String> {
        match self.writer.aggregates {
            true => self.writer.close_windows(now).await,
            false => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    fn measurement(value: f64, seconds: u64) -> Measurement {
        Measurement { metric: "temperature".into(), value, time: at(seconds) }
    }

    fn aggregate(body: &Body) -> &Aggregate {
        match body {
            Body::Aggregate(aggregate) => aggregate,
            other => panic!("not an aggregate: {other:?}"),
        }
    }

    /// A writer with 300 s aggregation windows over a fresh spool; the directory lives as long as the spool.
    fn aggregating_writer() -> (tempfile::TempDir, Arc<Spool>, SpoolWriter) {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::spool::SpoolConfig {
            dir: dir.path().join("spool"),
            segment_bytes: 1 << 20,
            max_bytes: 1 << 24,
            fsync: crate::spool::FsyncPolicy::Never,
        };
        let spool = Arc::new(Spool::open(config).unwrap().0);
        let writer = SpoolWriter::start(spool.clone(), mpsc::unbounded_channel().0, Some(Duration::from_secs(300)));
        (dir, spool, writer)
    }

    /// The aggregates in the spool, as (window start, count).
    fn spooled_aggregates(spool: &Spool) -> Vec<(SystemTime, u64)> {
        spool.sync().unwrap(); // Only what is on disk is read.
        let records = spool.read_after(0, 1000, usize::MAX).unwrap();
        let aggregates = records.iter().filter_map(|record| match &record.body {
            Some(Body::Aggregate(aggregate)) => Some(aggregate),
            _ => None,
        });
        aggregates
            .map(|a| {
                (smartfarm_core::time::from_timestamp("start", a.window_start_time.as_ref().unwrap()).unwrap(), a.count)
            })
            .collect()
    }

    /// A publish whose records could not be written is sent again by its sensor: its readings are counted in their
    /// window once, when they are written.
    #[tokio::test]
    async fn readings_are_counted_in_their_window_only_once_written() {
        let (_dir, spool, writer) = aggregating_writer();
        let device = Uuid::now_v7();
        let raw = |value: f64| {
            let reading =
                Reading { device_id: device.to_string(), metric: "temperature".into(), value, ..Default::default() };
            vec![Body::Reading(reading)]
        };
        let (decide, held) = std::sync::mpsc::channel();
        *spool.hold_next_append.lock().unwrap() = Some(held);
        decide.send(false).unwrap();
        let failed = writer.submit(raw(1.0), Some((device, vec![measurement(1.0, 0)]))).await.unwrap();
        assert!(failed.await.unwrap().is_err(), "the disk is full");
        let resent = writer.submit(raw(1.0), Some((device, vec![measurement(1.0, 0)]))).await.unwrap();
        resent.await.unwrap().unwrap();
        writer.close_windows(None).await.unwrap();
        assert_eq!(spooled_aggregates(&spool), vec![(at(0), 1)], "the resend is counted, the failed copy is not");
    }

    /// A closed window's aggregate that cannot be written (a full disk) is kept and written by the next try.
    #[tokio::test]
    async fn a_closed_window_survives_a_failed_write() {
        let (_dir, spool, writer) = aggregating_writer();
        let device = Uuid::now_v7();
        writer.submit(Vec::new(), Some((device, vec![measurement(1.0, 0)]))).await.unwrap().await.unwrap().unwrap();
        let (decide, held) = std::sync::mpsc::channel();
        *spool.hold_next_append.lock().unwrap() = Some(held);
        decide.send(false).unwrap();
        // A reading of the next window closes the first; writing its aggregate fails.
        writer.submit(Vec::new(), Some((device, vec![measurement(2.0, 300)]))).await.unwrap().await.unwrap().unwrap();
        // While it cannot be written, nothing more is taken: the publish is refused (its sensor holds back and sends
        // it again), not counted.
        for _ in 0..500 {
            if spool.hold_next_append.lock().unwrap().is_none() {
                break; // The first try (after the acknowledgement above) has taken its failure.
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (decide, held) = std::sync::mpsc::channel();
        *spool.hold_next_append.lock().unwrap() = Some(held);
        decide.send(false).unwrap();
        let refused = writer.submit(Vec::new(), Some((device, vec![measurement(9.0, 350)]))).await.unwrap();
        assert!(refused.await.unwrap().is_err(), "refused while a closed window waits for the disk");
        // The next try writes it (the 300-600 window is still open at 400).
        writer.close_windows(Some(at(400))).await.unwrap();
        assert!(spool.hold_next_append.lock().unwrap().is_none(), "the first write of the closed window was tried");
        assert_eq!(spooled_aggregates(&spool), vec![(at(0), 1)], "written once, by the next try");
        writer.close_windows(None).await.unwrap();
        assert_eq!(spooled_aggregates(&spool), vec![(at(0), 1), (at(300), 1)], "both windows, each once");
    }

    #[test]
    fn windows_are_aligned_and_closed_by_later_readings_or_time() {
        let device = Uuid::now_v7();
        let mut aggregator = Aggregator::new(Duration::from_secs(300));
        assert!(aggregator.add(device, &[measurement(1.0, 0), measurement(5.0, 60), measurement(3.0, 120)]).is_empty());
        let closed = aggregator.add(device, &[measurement(10.0, 300)]);
        assert_eq!(closed.len(), 1);
        let first = aggregate(&closed[0]);
        assert_eq!((first.count, first.min, first.max, first.avg, first.last), (3, 1.0, 5.0, 3.0, 3.0));
        assert_eq!(first.window_start_time, Some(to_timestamp(at(0))));
        assert_eq!(first.window_end_time, Some(to_timestamp(at(300))));

        // A late reading of a closed window becomes an aggregate of its own.
        let late = aggregator.add(device, &[measurement(7.0, 100)]);
        assert_eq!(aggregate(&late[0]).count, 1);

        assert!(aggregator.flush(Some(at(599))).is_empty(), "the 300-600 window is still open");
        let closed = aggregator.flush(Some(at(600)));
        assert_eq!(aggregate(&closed[0]).count, 1);
        assert!(aggregator.flush(None).is_empty());
    }
}
