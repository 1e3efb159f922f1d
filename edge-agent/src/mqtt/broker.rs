//! The broker: one task per sensor connection. A sensor authenticates with its device id and credential (checked
//! against the registry cache), may publish only under `smartfarm/<its id>/` and subscribe only to its own
//! `commands` and `errors` topics and to `smartfarm/alerts` (rumqttd has no such ACL, which is why the agent speaks
//! MQTT itself). A telemetry publish is acknowledged only after its readings are in the spool (with `upload =
//! "aggregates"`, once they are counted in an open aggregation window, which a crash loses). Refusals are logged,
//! counted per reason, and told to the device on `smartfarm/<id>/errors`; the connection stays up. Clients that
//! connect with clean session off keep their subscriptions across reconnects and agent restarts, and a QoS 2 publish
//! they resend after a lost acknowledgement is stored once (while the agent runs: that state is not on disk).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot::error::TryRecvError;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::codec::{self, ConnectRefusal, Inbound, Outbound, PublishOutcome, Qos, Version};
use crate::ingest::{Durable, IngestError, Ingestor};
use crate::registry::{AuthFailure, Registry};

/// The topic every device may read for the farm's alerts.
pub const ALERTS_TOPIC: &str = "smartfarm/alerts";

/// How long a new connection has to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a packet may take to go out before the client is considered gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Persistent sessions kept at most; past it new clients get clean sessions (a bound on what clients can make us
/// keep on disk).
const MAX_SAVED_SESSIONS: usize = 100_000;
/// Persistent sessions kept at most for one device (client ids of its own), and for anonymous clients together:
/// one client cycling through client ids cannot take the room the farm's other sensors need. Past it, the device's
/// least recently opened session not in use makes room (a sensor that changed its client id keeps its new one).
const MAX_SAVED_SESSIONS_PER_DEVICE: usize = 16;
/// Messages waiting for one subscriber before new ones are dropped (and counted).
const SUBSCRIBER_QUEUE: usize = 256;
/// Publishes of one connection waiting for the spool before the connection stops reading.
const MAX_OWED_ACKS: usize = 256;
/// How long the end of a connection, or a resend on a new one, waits for a publish's spool write to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// An acknowledgement owed to the client.
struct OwedAck {
    pkid: u16,
    qos: Qos,
    outcome: PublishOutcome,
    /// Pending while the publish's readings are on their way into the spool.
    durable: Option<Durable>,
    /// For a QoS 2 publish entered in the release set: where to say whether it was stored.
    settles: Option<watch::Sender<Option<bool>>>,
    received: std::time::Instant,
}

impl OwedAck {
    /// Tells a resend waiting on this publish (see [`ReleaseSet`]) whether it was stored.
    fn settle(&mut self, stored: bool) {
        if let Some(settles) = self.settles.take() {
            settles.send_replace(Some(stored));
        }
    }
}

/// Waits for the front owed acknowledgement's readings to reach the spool.
async fn front_durable(
    owed: &mut VecDeque<OwedAck>,
) -> Result<Result<crate::spool::Appended, String>, tokio::sync::oneshot::error::RecvError> {
    match owed.front_mut().and_then(|ack| ack.durable.as_mut()) {
        Some(durable) => durable.await,
        None => std::future::pending().await,
    }
}

/// A message for a subscriber.
#[derive(Clone, Debug)]
struct Delivery {
    topic: String,
    payload: Bytes,
    /// The QoS the subscription was granted (the agent's own messages are sent at most at QoS 1).
    qos: Qos,
}

/// A topic's subscribers: (connection id, granted QoS, its delivery queue).
type Subscribers = Vec<(u64, Qos, mpsc::Sender<Delivery>)>;

/// What the broker keeps of a client that connected with clean session off (MQTT's persistent session): its
/// subscriptions, written to disk so they survive an agent restart, and the QoS 2 publishes awaiting release.
/// Telling such a client its session is present on reconnect makes it resend the publishes it never saw
/// acknowledged (clients discard them when told the session is new).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct SavedSession {
    /// The device the session belongs to (`None`: anonymous); another login does not get it.
    device: Option<Uuid>,
    /// Topic filter → the QoS granted.
    subscriptions: std::collections::BTreeMap<String, Qos>,
    /// When a connection last opened it (Unix microseconds, each opening later than the one before; 0 in files
    /// from before): past a device's bound, its least recently opened session makes room for a new one.
    #[serde(default)]
    opened: u64,
    /// Shared with the connection that holds the session, so a client that reconnects while its old connection is
    /// still winding down sees what that connection stored.
    #[serde(skip)]
    awaiting_release: ReleaseSet,
}

/// QoS 2 packet ids whose publishes were handed to the spool and are not yet released (PUBREL) by the client, each
/// with whether the publish is stored: `None` while the spool writes it, then the answer. A resend of one of these
/// (on a new connection, after a lost PUBREC) waits for that answer: PUBREC promises the message is kept, so it goes
/// out only once the first copy is on disk, and a first copy that never made it is replaced by the resend.
type ReleaseSet = Arc<Mutex<HashMap<u16, watch::Receiver<Option<bool>>>>>;

/// Persistent sessions by client id, and whether the file is behind.
#[derive(Debug, Default)]
struct Sessions {
    saved: HashMap<String, SavedSession>,
    dirty: bool,
    /// The latest `opened` given, so that each opening is later than the one before (the clock's microseconds
    /// may repeat, or step back).
    latest_opened: u64,
}

impl Sessions {
    /// An `opened` time for a session opened now: later than any given before.
    fn opening(&mut self) -> u64 {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_micros());
        self.latest_opened = (now as u64).max(self.latest_opened + 1);
        self.latest_opened
    }
}

/// Reads saved sessions; a missing file is no sessions, an unreadable one is reported and set aside.
fn load_sessions(path: &std::path::Path) -> HashMap<String, SavedSession> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "cannot read the saved MQTT sessions; starting without");
            return HashMap::new();
        }
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|error| {
        tracing::error!(path = %path.display(), %error, "the saved MQTT sessions are unreadable; starting without");
        HashMap::new()
    })
}

/// A device's answer on `smartfarm/<device>/commands/ack`, for the command book; `recorded` says whether it is on
/// disk (the broker acknowledges the publish only then).
pub struct CommandAck {
    pub device: Uuid,
    pub payload: Bytes,
    pub recorded: tokio::sync::oneshot::Sender<bool>,
}

/// The broker's shared state.
pub struct Broker {
    registry: Arc<Registry>,
    ingestor: Ingestor,
    allow_anonymous: bool,
    /// Exact topic → subscribers (the ACL allows no wildcards, so exact matching is complete).
    routes: Mutex<HashMap<String, Subscribers>>,
    /// Session key → its current connection: its id, the switch that ends it (a new connection takes the key
    /// over; a login that no longer holds is cut), and the device and credential hash it logged in with.
    sessions: Mutex<HashMap<String, Live>>,
    next_connection: AtomicU64,
    persistent: Mutex<Sessions>,
    /// Where persistent sessions are kept (`<spool dir>/mqtt-sessions.json`).
    sessions_file: Option<std::path::PathBuf>,
    /// Where devices' command acknowledgements go (`smartfarm/<id>/commands/ack`).
    command_acks: std::sync::OnceLock<mpsc::UnboundedSender<CommandAck>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("allow_anonymous", &self.allow_anonymous).finish_non_exhaustive()
    }
}

/// A connection as the broker knows it.
struct Live {
    connection_id: u64,
    cut: watch::Sender<Cut>,
    login: Option<(Uuid, String)>,
}

/// Why a connection is ended from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    No,
    /// A new connection took its session key over.
    TakenOver,
    /// Its device left the farm, or its credential changed, since it logged in.
    LoginRevoked,
}

/// Who is on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Identity {
    Device(Uuid),
    Anonymous,
}

impl Broker {
    /// A broker; with `sessions_file`, persistent sessions are loaded from it and saved to it by
    /// [`Broker::save_sessions`].
    pub fn new(
        registry: Arc<Registry>,
        ingestor: Ingestor,
        allow_anonymous: bool,
        sessions_file: Option<std::path::PathBuf>,
    ) -> Arc<Broker> {
        let saved = sessions_file.as_deref().map(load_sessions).unwrap_or_default();
        Arc::new(Broker {
            registry,
            ingestor,
            allow_anonymous,
            routes: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            persistent: Mutex::new(Sessions {
                latest_opened: saved.values().map(|session| session.opened).max().unwrap_or(0),
                saved,
                dirty: false,
            }),
            sessions_file,
            command_acks: std::sync::OnceLock::new(),
        })
    }

    /// Sends devices' command acknowledgements to `acks` (set once, when the agent starts).
    pub fn route_command_acks(&self, acks: mpsc::UnboundedSender<CommandAck>) {
        let _ = self.command_acks.set(acks);
    }

    /// Whether anyone is subscribed to `topic` now.
    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.routes.lock().expect("routes lock").get(topic).is_some_and(|subscribers| !subscribers.is_empty())
    }

    /// Tells a device something is wrong with what it sent, on `smartfarm/<id>/errors`.
    pub fn tell_device(&self, device: Uuid, topic: &str, reason: &str, detail: &str) {
        self.report_error(device, topic, reason, detail);
    }

    /// Writes the persistent sessions to disk if they changed (called every second, and at shutdown).
    pub fn save_sessions(&self) -> std::io::Result<()> {
        let Some(path) = &self.sessions_file else { return Ok(()) };
        let bytes = {
            let mut sessions = self.persistent.lock().expect("sessions lock");
            if !sessions.dirty {
                return Ok(());
            }
            sessions.dirty = false;
            serde_json::to_vec(&sessions.saved).map_err(std::io::Error::other)?
        };
        let written = crate::spool::write_file_durably(path, &bytes);
        if written.is_err() {
            // Try again on the next call.
            self.persistent.lock().expect("sessions lock").dirty = true;
        }
        written
    }

    /// Starts or resumes a client's session: whether one was present, and the session (a clean one is not kept).
    fn open_session(&self, key: &str, device: Option<Uuid>, clean: bool) -> (bool, SavedSession) {
        let mut sessions = self.persistent.lock().expect("sessions lock");
        if clean {
            if sessions.saved.remove(key).is_some() {
                sessions.dirty = true;
            }
            return (false, SavedSession { device, ..Default::default() });
        }
        let now = sessions.opening();
        if let Some(saved) = sessions.saved.get_mut(key).filter(|saved| saved.device == device) {
            saved.opened = now;
            let resumed = saved.clone();
            sessions.dirty = true;
            return (true, resumed);
        }
        if sessions.saved.len() >= MAX_SAVED_SESSIONS {
            tracing::warn!(key, "too many persistent MQTT sessions: this one is not kept");
            return (false, SavedSession { device, ..Default::default() });
        }
        let devices_own: Vec<(&String, u64)> = sessions
            .saved
            .iter()
            .filter(|(_, saved)| saved.device == device)
            .map(|(other, saved)| (other, saved.opened))
            .collect();
        if devices_own.len() >= MAX_SAVED_SESSIONS_PER_DEVICE {
            let live = self.sessions.lock().expect("sessions lock");
            let oldest = devices_own
                .into_iter()
                .filter(|(other, _)| !live.contains_key(*other))
                .min_by_key(|(_, opened)| *opened)
                .map(|(other, _)| other.clone());
            drop(live);
            match oldest {
                Some(oldest) => {
                    tracing::info!(key, evicted = %oldest, "a device's least recently opened MQTT session makes room");
                    sessions.saved.remove(&oldest);
                }
                None => {
                    tracing::warn!(
                        key,
                        "too many persistent MQTT sessions in use for one device: this one is not kept"
                    );
                    return (false, SavedSession { device, ..Default::default() });
                }
            }
        }
        let session = SavedSession { device, opened: now, ..Default::default() };
        sessions.saved.insert(key.to_string(), session.clone());
        sessions.dirty = true;
        (false, session)
    }

    /// Records a persistent session's subscriptions and QoS 2 state (no-op for clean sessions).
    fn update_session(&self, key: &str, update: impl FnOnce(&mut SavedSession) -> bool) {
        let mut sessions = self.persistent.lock().expect("sessions lock");
        if let Some(saved) = sessions.saved.get_mut(key)
            && update(saved)
        {
            sessions.dirty = true;
        }
    }

    /// Delivers a message from the agent to the topic's subscribers; returns how many got it.
    pub fn publish(&self, topic: &str, payload: Bytes) -> usize {
        let routes = self.routes.lock().expect("routes lock");
        let Some(subscribers) = routes.get(topic) else { return 0 };
        let mut delivered = 0;
        for (_, qos, sender) in subscribers {
            match sender.try_send(Delivery { topic: topic.to_string(), payload: payload.clone(), qos: *qos }) {
                Ok(()) => delivered += 1,
                Err(_) => metrics::counter!("smartfarm_edge_mqtt_deliveries_dropped_total").increment(1),
            }
        }
        delivered
    }

    /// Tells a device why its publish was refused, on `smartfarm/<id>/errors`.
    fn report_error(&self, device: Uuid, topic: &str, reason: &str, detail: &str) {
        let message = serde_json::json!({ "error": reason, "detail": detail, "topic": topic });
        self.publish(&format!("smartfarm/{device}/errors"), Bytes::from(message.to_string()));
    }

    fn subscribe(&self, topic: &str, connection: u64, qos: Qos, sender: &mpsc::Sender<Delivery>) {
        let mut routes = self.routes.lock().expect("routes lock");
        let subscribers = routes.entry(topic.to_string()).or_default();
        // Subscribing again replaces the subscription (and its QoS), as MQTT says.
        subscribers.retain(|(id, _, _)| *id != connection);
        subscribers.push((connection, qos, sender.clone()));
    }

    fn unsubscribe(&self, topic: &str, connection: u64) {
        let mut routes = self.routes.lock().expect("routes lock");
        if let Some(subscribers) = routes.get_mut(topic) {
            subscribers.retain(|(id, _, _)| *id != connection);
            if subscribers.is_empty() {
                routes.remove(topic);
            }
        }
    }

    fn forget_connection(&self, connection: u64, session_key: &str) {
        let mut routes = self.routes.lock().expect("routes lock");
        routes.retain(|_, subscribers| {
            subscribers.retain(|(id, _, _)| *id != connection);
            !subscribers.is_empty()
        });
        drop(routes);
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if sessions.get(session_key).is_some_and(|live| live.connection_id == connection) {
            sessions.remove(session_key);
        }
    }

    /// Ends the connections whose device is no longer the farm's, or whose credential changed, since they logged
    /// in: a login is checked at CONNECT, and a sensor whose credential was rotated because it leaked must not keep
    /// a session open with the old one.
    fn cut_revoked_logins(&self) {
        let sessions = self.sessions.lock().expect("sessions lock");
        for live in sessions.values() {
            let Some((device, credential)) = &live.login else { continue };
            if self.registry.credential_sha256(device).as_ref() != Some(credential) {
                tracing::info!(%device, "mqtt login no longer holds (device removed or credential changed); cut");
                metrics::counter!("smartfarm_edge_mqtt_logins_revoked_total").increment(1);
                live.cut.send_replace(Cut::LoginRevoked);
            }
        }
    }

    /// Which filters a connection may subscribe to.
    fn may_subscribe(identity: Identity, filter: &str) -> bool {
        if filter == ALERTS_TOPIC {
            return true;
        }
        match identity {
            Identity::Device(id) => {
                filter == format!("smartfarm/{id}/commands") || filter == format!("smartfarm/{id}/errors")
            }
            Identity::Anonymous => false,
        }
    }
}

/// Accepts sensor connections until `shutdown` resolves.
pub async fn serve(broker: Arc<Broker>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut registry_changes = broker.registry.changes();
    loop {
        tokio::select! {
            Ok(()) = registry_changes.changed() => broker.cut_revoked_logins(),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(broker.clone(), stream, peer));
                }
                Err(error) => {
                    tracing::warn!(%error, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => return,
        }
    }
}

/// Why a connection ended, for the log.
#[derive(Debug)]
enum Ended {
    ClientLeft,
    Refused(&'static str),
    TakenOver,
    LoginRevoked,
    Timeout,
    Protocol(String),
    Io(std::io::Error),
    SpoolUnavailable(String),
    /// A device's answer to a command was not recorded (the command book failed, or took over 10 s).
    CommandBookUnavailable,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::ClientLeft => f.write_str("the client left"),
            Ended::Refused(reason) => write!(f, "refused: {reason}"),
            Ended::TakenOver => f.write_str("a new connection took over the client id"),
            Ended::LoginRevoked => f.write_str("the device left the farm or its credential changed"),
            Ended::Timeout => f.write_str("keep-alive or connect timeout"),
            Ended::Protocol(detail) => write!(f, "protocol error: {detail}"),
            Ended::Io(error) => write!(f, "socket error: {error}"),
            Ended::SpoolUnavailable(error) => write!(f, "the spool cannot be written: {error}"),
            Ended::CommandBookUnavailable => {
                f.write_str("the command book cannot record an answer now; the device sends it again")
            }
        }
    }
}

async fn connection(broker: Arc<Broker>, stream: TcpStream, peer: SocketAddr) {
    metrics::gauge!("smartfarm_edge_mqtt_connections").increment(1.0);
    let connection_id = broker.next_connection.fetch_add(1, Ordering::Relaxed);
    let mut session = Session {
        broker: broker.clone(),
        stream,
        connection_id,
        // Small to start with: a thousand idle sensors should cost little; buffers grow for big packets.
        buffer: BytesMut::with_capacity(512),
        out: BytesMut::with_capacity(256),
        version: Version::V311,
        identity: Identity::Anonymous,
        client_id: String::new(),
        session_key: String::new(),
        awaiting_release: ReleaseSet::default(),
        next_pkid: 0,
        heard: tokio::time::Instant::now(),
    };
    let ended = session.run().await;
    broker.forget_connection(connection_id, &session.session_key);
    metrics::gauge!("smartfarm_edge_mqtt_connections").decrement(1.0);
    match ended {
        Ended::ClientLeft | Ended::TakenOver => {
            tracing::debug!(%peer, client_id = %session.client_id, %ended, "mqtt client left")
        }
        Ended::Refused(_) => tracing::info!(%peer, %ended, "mqtt connection refused"),
        other => tracing::info!(%peer, client_id = %session.client_id, reason = %other, "mqtt connection closed"),
    }
}

struct Session {
    broker: Arc<Broker>,
    stream: TcpStream,
    connection_id: u64,
    buffer: BytesMut,
    out: BytesMut,
    version: Version,
    identity: Identity,
    client_id: String,
    /// The client id within its device (`<device id or "anonymous">/<client id>`): one device cannot take over or
    /// resume another's session by picking the same client id.
    session_key: String,
    /// QoS 2 publishes handed to the spool, waiting for PUBREL: a resend of one of these is not stored again. A
    /// persistent session's set is the one kept in the broker.
    awaiting_release: ReleaseSet,
    next_pkid: u16,
    /// When the client last sent anything: keep-alive counts the client's silence, not the broker's own sends.
    heard: tokio::time::Instant,
}

impl Session {
    /// Writes a packet (after whatever was queued before it).
    async fn send(&mut self, packet: Outbound) -> Result<(), Ended> {
        self.queue(packet)?;
        self.flush().await
    }

    /// Encodes a packet behind what waits to be written.
    fn queue(&mut self, packet: Outbound) -> Result<(), Ended> {
        codec::write(self.version, packet, &mut self.out).map_err(|error| Ended::Protocol(error.to_string()))
    }

    /// Writes what waits, in one go.
    async fn flush(&mut self) -> Result<(), Ended> {
        if self.out.is_empty() {
            return Ok(());
        }
        // A client that stops reading would otherwise hold its task, and its session, for ever.
        tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&self.out))
            .await
            .map_err(|_| Ended::Timeout)?
            .map_err(Ended::Io)?;
        self.out.clear();
        Ok(())
    }

    /// Reads more bytes, or times out.
    async fn fill(&mut self, deadline: Option<Duration>) -> Result<(), Ended> {
        let read = self.stream.read_buf(&mut self.buffer);
        let count = match deadline {
            Some(deadline) => tokio::time::timeout(deadline, read).await.map_err(|_| Ended::Timeout)?,
            None => read.await,
        }
        .map_err(Ended::Io)?;
        if count == 0 {
            return Err(Ended::ClientLeft);
        }
        self.heard = tokio::time::Instant::now();
        Ok(())
    }

    /// Forgets a QoS 2 packet id released by the client.
    fn release(&self, pkid: u16) {
        self.awaiting_release.lock().expect("release lock").remove(&pkid);
    }

    /// Settles an owed acknowledgement whose publish is stored or not; one that is not is forgotten, so its resend
    /// is stored. Only its own entry goes: a resend may have entered the same packet id since.
    fn settle(&self, ack: &mut OwedAck, stored: bool) {
        if !stored && let Some(settles) = &ack.settles {
            let mut awaiting = self.awaiting_release.lock().expect("release lock");
            if awaiting.get(&ack.pkid).is_some_and(|entry| entry.same_channel(&settles.subscribe())) {
                awaiting.remove(&ack.pkid);
            }
        }
        ack.settle(stored);
    }

    /// Whether the first copy of a resent QoS 2 publish is stored, once its spool write has settled. A connection
    /// that ended without saying is taken as not stored (a duplicate is better than a loss); a write that takes
    /// longer than [`SETTLE_TIMEOUT`] ends this connection too, and the client resends later.
    async fn first_copy_stored(mut first: watch::Receiver<Option<bool>>) -> Result<bool, Ended> {
        match tokio::time::timeout(SETTLE_TIMEOUT, first.wait_for(Option::is_some)).await {
            Ok(Ok(stored)) => Ok(stored.unwrap_or(false)),
            Ok(Err(_)) => Ok(false),
            Err(_) => Err(Ended::SpoolUnavailable("the first copy of a resent publish is still being written".into())),
        }
    }

    async fn run(&mut self) -> Ended {
        let mut owed = VecDeque::new();
        let ended = match self.handshake().await {
            Ok((keep_alive, takeover, resumed)) => {
                self.serve(keep_alive, takeover, resumed, &mut owed).await.err().unwrap_or(Ended::ClientLeft)
            }
            Err(ended) => ended,
        };
        // QoS 2 publishes are remembered from the moment they are handed to the spool, so a resend is never stored
        // twice; one that did not make it into the spool is forgotten again, so its resend is stored.
        for mut ack in owed.drain(..) {
            let stored = match ack.durable.take() {
                None => ack.outcome == PublishOutcome::Accepted,
                Some(durable) => matches!(tokio::time::timeout(SETTLE_TIMEOUT, durable).await, Ok(Ok(Ok(_)))),
            };
            self.settle(&mut ack, stored);
        }
        ended
    }

    async fn handshake(&mut self) -> Result<(Option<Duration>, watch::Receiver<Cut>, Option<SavedSession>), Ended> {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let (version, connect) = loop {
            match codec::read_connect(&mut self.buffer) {
                Ok(Some(found)) => break found,
                Ok(None) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    self.fill(Some(left)).await?;
                }
                Err(codec::ConnectError::UnsupportedLevel(level)) => {
                    tracing::info!(level, "mqtt client speaks an unsupported protocol level");
                    self.send(Outbound::ConnAck(Err(ConnectRefusal::UnsupportedProtocol))).await?;
                    return Err(Ended::Refused("unsupported protocol level"));
                }
                Err(codec::ConnectError::Malformed(error)) => return Err(Ended::Protocol(error.to_string())),
            }
        };
        self.version = version;
        let Inbound::Connect { client_id, keep_alive_secs, clean_session, login } = connect else {
            return Err(Ended::Protocol("expected CONNECT".into()));
        };
        let identity = match login {
            Some((username, password)) => match self.broker.registry.authenticate(&username, &password) {
                Ok(device) => Identity::Device(device),
                Err(failure) => {
                    let reason = match failure {
                        AuthFailure::UnknownDevice => "unknown_device",
                        AuthFailure::BadCredential => "bad_credential",
                    };
                    metrics::counter!("smartfarm_edge_mqtt_auth_failures_total", "reason" => reason).increment(1);
                    tracing::warn!(%username, reason, "mqtt login refused");
                    self.send(Outbound::ConnAck(Err(ConnectRefusal::BadCredentials))).await?;
                    return Err(Ended::Refused(reason));
                }
            },
            None if self.broker.allow_anonymous => Identity::Anonymous,
            None => {
                metrics::counter!("smartfarm_edge_mqtt_auth_failures_total", "reason" => "anonymous").increment(1);
                self.send(Outbound::ConnAck(Err(ConnectRefusal::NotAuthorized))).await?;
                return Err(Ended::Refused("anonymous connections are not allowed"));
            }
        };
        self.identity = identity;
        // MQTT: an empty client id has no session to resume.
        let clean_session = clean_session || client_id.is_empty();
        self.client_id = if client_id.is_empty() { format!("anonymous-{}", self.connection_id) } else { client_id };
        let device = match identity {
            Identity::Device(device) => Some(device),
            Identity::Anonymous => None,
        };
        self.session_key = match device {
            Some(device) => format!("{device}/{}", self.client_id),
            None => format!("anonymous/{}", self.client_id),
        };
        let (present, session) = self.broker.open_session(&self.session_key, device, clean_session);
        self.awaiting_release = session.awaiting_release.clone();
        let (cut, takeover) = watch::channel(Cut::No);
        // The credential it logged in with, to cut the connection once it no longer holds.
        let login = device.and_then(|device| Some((device, self.broker.registry.credential_sha256(&device)?)));
        let live = Live { connection_id: self.connection_id, cut, login };
        let previous = self.broker.sessions.lock().expect("sessions lock").insert(self.session_key.clone(), live);
        if let Some(previous) = previous {
            previous.cut.send_replace(Cut::TakenOver);
        }
        self.send(Outbound::ConnAck(Ok(present))).await?;
        // MQTT: the server allows one and a half keep-alive periods of silence.
        let keep_alive = (keep_alive_secs > 0).then(|| Duration::from_millis(keep_alive_secs as u64 * 1500));
        Ok((keep_alive, takeover, present.then_some(session)))
    }

    async fn serve(
        &mut self,
        keep_alive: Option<Duration>,
        mut takeover: watch::Receiver<Cut>,
        resumed: Option<SavedSession>,
        owed: &mut VecDeque<OwedAck>,
    ) -> Result<(), Ended> {
        let (deliveries_sender, mut deliveries) = mpsc::channel::<Delivery>(SUBSCRIBER_QUEUE);
        if let Some(resumed) = resumed {
            // The ACL is checked again: a session is only as good as what the device may do now.
            for (filter, qos) in
                resumed.subscriptions.iter().filter(|(filter, _)| Broker::may_subscribe(self.identity, filter))
            {
                self.broker.subscribe(filter, self.connection_id, *qos, &deliveries_sender);
            }
        }
        // `owed`: acknowledgements owed, in the order the publishes arrived (MQTT requires that order). Publishes
        // are handed to the spool writer as they arrive, so one connection's burst shares a group commit instead of
        // waiting for one fsync per message.
        loop {
            while owed.len() < MAX_OWED_ACKS {
                let Some(packet) =
                    codec::read(self.version, &mut self.buffer).map_err(|error| Ended::Protocol(error.to_string()))?
                else {
                    break;
                };
                if self.handle(packet, &deliveries_sender, owed).await? {
                    return Ok(());
                }
            }
            self.send_ready_acks(owed).await?;
            let waiting_on_spool = owed.front().is_some_and(|ack| ack.durable.is_some());
            // What is left of the silence keep-alive allows: deliveries wake this loop, and must not restart it.
            let silence_left = keep_alive.map(|allowed| allowed.saturating_sub(self.heard.elapsed()));
            tokio::select! {
                // Past MAX_OWED_ACKS nothing more is read: TCP pushes back on the client.
                filled = self.fill(silence_left), if owed.len() < MAX_OWED_ACKS => filled?,
                written = front_durable(owed), if waiting_on_spool => self.settle_front(owed, written.ok())?,
                Some(delivery) = deliveries.recv() => {
                    // Delivered at the QoS the subscription was granted; a QoS 0 publish carries no packet id.
                    let pkid = if delivery.qos == Qos::AtMostOnce {
                        0
                    } else {
                        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
                        self.next_pkid
                    };
                    self.send(Outbound::Publish { topic: delivery.topic, qos: delivery.qos, pkid, payload: delivery.payload }).await?;
                }
                _ = takeover.changed() => {
                    return Err(match *takeover.borrow() {
                        Cut::LoginRevoked => Ended::LoginRevoked,
                        Cut::No | Cut::TakenOver => Ended::TakenOver,
                    });
                }
            }
        }
    }

    /// Sends the owed acknowledgements at the front of the queue whose publishes are settled, in one write: a group
    /// commit settles many of a connection's publishes at once, and a write for each would cost a system call and a
    /// TCP segment per publish, on the agent and on the sensor.
    async fn send_ready_acks(&mut self, owed: &mut VecDeque<OwedAck>) -> Result<(), Ended> {
        let settled = self.queue_ready_acks(owed);
        // The publishes settled before a failure were stored: their acknowledgements go out all the same.
        let written = self.flush().await;
        settled.and(written)
    }

    /// Queues the acknowledgements at the front of the queue, as far as their publishes are settled.
    fn queue_ready_acks(&mut self, owed: &mut VecDeque<OwedAck>) -> Result<(), Ended> {
        loop {
            let spool_answer = match owed.front_mut() {
                None => return Ok(()),
                Some(front) => front.durable.as_mut().map(|durable| durable.try_recv()),
            };
            match spool_answer {
                None => {
                    let ack = owed.pop_front().expect("checked: a front");
                    match ack.qos {
                        Qos::AtMostOnce => {}
                        Qos::AtLeastOnce => self.queue(Outbound::PubAck { pkid: ack.pkid, outcome: ack.outcome })?,
                        Qos::ExactlyOnce => self.queue(Outbound::PubRec { pkid: ack.pkid, outcome: ack.outcome })?,
                    }
                }
                Some(Err(TryRecvError::Empty)) => return Ok(()),
                Some(Ok(written)) => self.settle_front(owed, Some(written))?,
                Some(Err(TryRecvError::Closed)) => self.settle_front(owed, None)?,
            }
        }
    }

    /// Takes the spool's answer for the front owed acknowledgement's publish (`None`: the spool writer stopped).
    /// Stored, the acknowledgement may go; otherwise the connection ends without it.
    fn settle_front(
        &mut self,
        owed: &mut VecDeque<OwedAck>,
        written: Option<Result<crate::spool::Appended, String>>,
    ) -> Result<(), Ended> {
        let front = owed.front_mut().expect("a front to settle");
        if let Some(Ok(_)) = written {
            metrics::histogram!("smartfarm_edge_publish_to_spool_seconds")
                .record(front.received.elapsed().as_secs_f64());
            front.durable = None;
            front.settle(true);
            return Ok(());
        }
        // Nothing was stored and no acknowledgement goes out: the sensor resends after reconnecting, and that resend
        // must be stored.
        let mut ack = owed.pop_front().expect("a front to settle");
        self.settle(&mut ack, false);
        Err(Ended::SpoolUnavailable(match written {
            Some(Err(error)) => error,
            _ => "the spool writer stopped".into(),
        }))
    }

    /// Handles one packet; `true` when the client said goodbye.
    async fn handle(
        &mut self,
        packet: Inbound,
        deliveries: &mpsc::Sender<Delivery>,
        owed: &mut VecDeque<OwedAck>,
    ) -> Result<bool, Ended> {
        match packet {
            Inbound::Publish { topic, qos, pkid, payload } => {
                let received = std::time::Instant::now();
                // A resend on this very connection (a client that retries without reconnecting): its first copy is
                // settled by this task, so it cannot be waited for here; its PUBREC queues behind the first's.
                let owed_here = qos == Qos::ExactlyOnce
                    && owed.iter().any(|ack| ack.pkid == pkid && ack.qos == Qos::ExactlyOnce && ack.settles.is_some());
                if owed_here {
                    let outcome = PublishOutcome::Accepted;
                    owed.push_back(OwedAck { pkid, qos, outcome, durable: None, settles: None, received });
                    return Ok(false);
                }
                let first_copy = (qos == Qos::ExactlyOnce)
                    .then(|| self.awaiting_release.lock().expect("release lock").get(&pkid).cloned())
                    .flatten();
                if let Some(first_copy) = first_copy
                    && Self::first_copy_stored(first_copy).await?
                {
                    // A resend of a QoS 2 message already stored: acknowledge again, in turn, and store nothing.
                    let outcome = PublishOutcome::Accepted;
                    owed.push_back(OwedAck { pkid, qos, outcome, durable: None, settles: None, received });
                    return Ok(false);
                }
                let (outcome, durable) = self.publish(&topic, payload).await?;
                // Only a stored publish is remembered: MQTT 5 clients free the id of a refused one without PUBREL.
                let settles = (qos == Qos::ExactlyOnce && outcome == PublishOutcome::Accepted).then(|| {
                    let (settles, stored) = watch::channel(durable.is_none().then_some(true));
                    self.awaiting_release.lock().expect("release lock").insert(pkid, stored);
                    settles
                });
                // At QoS 0 nothing is acknowledged; the records are written all the same.
                if qos != Qos::AtMostOnce {
                    owed.push_back(OwedAck { pkid, qos, outcome, durable, settles, received });
                }
            }
            Inbound::PubRel { pkid } => {
                self.release(pkid);
                self.send(Outbound::PubComp { pkid }).await?;
            }
            Inbound::PubRec { pkid } => self.send(Outbound::PubRel { pkid }).await?,
            Inbound::PubAck | Inbound::PubComp => {}
            Inbound::Subscribe { pkid, filters } => {
                let mut granted = Vec::with_capacity(filters.len());
                for (filter, qos) in filters {
                    if Broker::may_subscribe(self.identity, &filter) {
                        let qos = qos.min(Qos::AtLeastOnce);
                        self.broker.subscribe(&filter, self.connection_id, qos, deliveries);
                        self.broker.update_session(&self.session_key, |saved| {
                            saved.subscriptions.insert(filter.clone(), qos) != Some(qos)
                        });
                        granted.push(Some(qos));
                    } else {
                        metrics::counter!("smartfarm_edge_acl_denied_total", "action" => "subscribe").increment(1);
                        tracing::warn!(client_id = %self.client_id, %filter, "subscription refused by the topic acl");
                        granted.push(None);
                    }
                }
                self.send(Outbound::SubAck { pkid, granted }).await?;
            }
            Inbound::Unsubscribe { pkid, filters } => {
                for filter in &filters {
                    self.broker.unsubscribe(filter, self.connection_id);
                    self.broker.update_session(&self.session_key, |saved| saved.subscriptions.remove(filter).is_some());
                }
                self.send(Outbound::UnsubAck { pkid, count: filters.len() }).await?;
            }
            Inbound::PingReq => self.send(Outbound::PingResp).await?,
            Inbound::Disconnect => return Ok(true),
            Inbound::Connect { .. } => return Err(Ended::Protocol("a second CONNECT".into())),
        }
        Ok(false)
    }

    /// Applies the ACL and queues telemetry for the spool; the outcome goes into the acknowledgement, which waits for
    /// the returned completion when there is one.
    async fn publish(&mut self, topic: &str, payload: Bytes) -> Result<(PublishOutcome, Option<Durable>), Ended> {
        let mut parts = topic.splitn(3, '/');
        let (prefix, device, rest) = (parts.next(), parts.next(), parts.next());
        let device = device.and_then(|d| Uuid::try_parse(d).ok());
        let allowed = match (prefix, device, self.identity) {
            (Some("smartfarm"), Some(device), Identity::Device(own)) => device == own,
            (Some("smartfarm"), Some(device), Identity::Anonymous) => self.broker.registry.contains(&device),
            _ => false,
        };
        let Some(device) = device.filter(|_| allowed) else {
            metrics::counter!("smartfarm_edge_acl_denied_total", "action" => "publish").increment(1);
            tracing::warn!(client_id = %self.client_id, %topic, "publish refused by the topic acl");
            if let Identity::Device(own) = self.identity {
                self.broker.report_error(
                    own,
                    topic,
                    "not_authorized",
                    "a device may publish only under smartfarm/<its device id>/",
                );
            }
            return Ok((PublishOutcome::NotAuthorized, None));
        };
        if rest == Some("commands/ack") {
            let Some(acks) = self.broker.command_acks.get() else {
                tracing::debug!(%topic, "command acknowledgement with nobody to take it");
                return Ok((PublishOutcome::Accepted, None));
            };
            // Acknowledged to the device only once its answer is in the command book on disk: a device does not
            // send an acknowledged answer again, and one lost to a crash would leave the command reported expired
            // though it ran. Not recorded: no acknowledgement, and the device sends it again.
            let (recorded, done) = tokio::sync::oneshot::channel();
            let _ = acks.send(CommandAck { device, payload, recorded });
            return match tokio::time::timeout(Duration::from_secs(10), done).await {
                Ok(Ok(true)) => Ok((PublishOutcome::Accepted, None)),
                _ => Err(Ended::CommandBookUnavailable),
            };
        }
        if rest != Some("telemetry") {
            // Other topics under the device's own prefix are its to use; nothing here consumes them.
            tracing::debug!(%topic, "publish on an unhandled topic");
            return Ok((PublishOutcome::Accepted, None));
        }
        match self.broker.ingestor.submit(device, &payload).await {
            Ok((_, durable)) => Ok((PublishOutcome::Accepted, durable)),
            Err(IngestError::Rejected(rejection)) => {
                metrics::counter!("smartfarm_edge_readings_rejected_total", "reason" => rejection.reason())
                    .increment(1);
                tracing::warn!(%device, reason = rejection.reason(), detail = %rejection, "telemetry refused");
                self.broker.report_error(device, topic, rejection.reason(), &rejection.to_string());
                Ok((PublishOutcome::PayloadInvalid, None))
            }
            // Nothing was stored and no acknowledgement goes out: the sensor resends after reconnecting.
            Err(IngestError::Unavailable(error)) => Err(Ended::SpoolUnavailable(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UploadMode;
    use crate::spool::{FsyncPolicy, Spool, SpoolConfig};
    use rumqttc::mqttbytes::{QoS, v4};
    use smartfarm_proto::ingestion::v1::{EdgeDevice, RegistrySnapshot};

    /// A farm directory with one registered sensor, and a broker over it.
    struct Farm {
        dir: tempfile::TempDir,
        device: Uuid,
        secret: String,
    }

    impl Farm {
        fn new() -> Farm {
            let dir = tempfile::tempdir().unwrap();
            let device = Uuid::now_v7();
            let secret =
                smartfarm_core::credential::generate(smartfarm_core::credential::SecretKind::Device, device).unwrap();
            let devices = vec![EdgeDevice {
                device_id: device.to_string(),
                name: "probe".into(),
                kind: 1,
                credential_sha256: secret.hash.clone(),
            }];
            Registry::load(dir.path()).apply(&RegistrySnapshot { version: 1, devices }).unwrap();
            Farm { dir, device, secret: secret.secret }
        }

        /// Starts a broker (as the agent does after a restart: registry and sessions from disk); returns its
        /// address, the spool, and the switch that stops it.
        async fn start(&self) -> (Arc<Broker>, SocketAddr, Arc<Spool>, watch::Sender<bool>) {
            let config = SpoolConfig {
                dir: self.dir.path().join("spool"),
                segment_bytes: 1 << 20,
                max_bytes: 1 << 24,
                fsync: FsyncPolicy::Never,
            };
            let spool = Arc::new(Spool::open(config).unwrap().0);
            let (alerts, _) = mpsc::unbounded_channel();
            let ingestor = Ingestor::new(
                spool.clone(),
                alerts,
                UploadMode::Raw,
                Duration::from_secs(60),
                Duration::from_secs(300),
            );
            let registry = Arc::new(Registry::load(self.dir.path()));
            let broker = Broker::new(registry, ingestor, false, Some(self.dir.path().join("mqtt-sessions.json")));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let (stop, mut stopped) = watch::channel(false);
            tokio::spawn(serve(broker.clone(), listener, async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }));
            (broker, address, spool, stop)
        }
    }

    /// A bare MQTT 3.1.1 client: packets in and out, nothing done behind the test's back.
    struct Client {
        stream: TcpStream,
        buffer: BytesMut,
    }

    impl Client {
        async fn connect(address: SocketAddr, farm: &Farm, clean_session: bool) -> (Client, v4::ConnAck) {
            let mut client = Client { stream: TcpStream::connect(address).await.unwrap(), buffer: BytesMut::new() };
            let mut connect = v4::Connect::new(farm.device.to_string());
            connect.clean_session = clean_session;
            connect.set_login(farm.device.to_string(), farm.secret.clone());
            client.send(v4::Packet::Connect(connect)).await;
            match client.receive().await {
                v4::Packet::ConnAck(ack) => (client, ack),
                other => panic!("expected CONNACK, got {other:?}"),
            }
        }

        async fn send(&mut self, packet: v4::Packet) {
            let mut bytes = BytesMut::new();
            packet.write(&mut bytes, 1 << 20).unwrap();
            self.stream.write_all(&bytes).await.unwrap();
        }

        async fn receive(&mut self) -> v4::Packet {
            loop {
                match v4::Packet::read(&mut self.buffer, 1 << 20) {
                    Ok(packet) => return packet,
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                        let read = tokio::time::timeout(Duration::from_secs(5), self.stream.read_buf(&mut self.buffer));
                        assert!(read.await.expect("a packet within 5 s").unwrap() > 0, "the broker hung up");
                    }
                    Err(error) => panic!("unreadable packet: {error}"),
                }
            }
        }

        async fn publish_qos2(&mut self, farm: &Farm, pkid: u16, value: f64) {
            self.publish_raw(farm, pkid, format!(r#"{{"metrics": {{"t": {value}}}}}"#)).await;
        }

        async fn publish_raw(&mut self, farm: &Farm, pkid: u16, payload: String) {
            let topic = format!("smartfarm/{}/telemetry", farm.device);
            let mut publish = v4::Publish::new(topic, QoS::ExactlyOnce, payload);
            publish.pkid = pkid;
            self.send(v4::Packet::Publish(publish)).await;
        }
    }

    /// A login is checked at CONNECT; a connection whose device's credential changes afterwards (rotated because it
    /// leaked, say) is cut when the new registry arrives, and the old credential no longer gets in.
    #[tokio::test]
    async fn a_connection_whose_credential_was_rotated_is_cut() {
        let farm = Farm::new();
        let (broker, address, _spool, _stop) = farm.start().await;
        let (mut client, ack) = Client::connect(address, &farm, true).await;
        assert_eq!(ack.code, v4::ConnectReturnCode::Success);
        let rotated =
            smartfarm_core::credential::generate(smartfarm_core::credential::SecretKind::Device, farm.device).unwrap();
        let devices = vec![EdgeDevice {
            device_id: farm.device.to_string(),
            name: "probe".into(),
            kind: 1,
            credential_sha256: rotated.hash.clone(),
        }];
        broker.registry.apply(&RegistrySnapshot { version: 2, devices }).unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.stream.read_to_end(&mut rest)).await;
        read.expect("the broker ends the connection").unwrap();
        let (_, refused) = Client::connect(address, &farm, true).await;
        assert_eq!(refused.code, v4::ConnectReturnCode::BadUserNamePassword, "the old credential is refused");
    }

    /// One device keeps at most `MAX_SAVED_SESSIONS_PER_DEVICE` persistent sessions: past them, a new client id's
    /// session takes the place of the device's least recently opened one.
    #[tokio::test]
    async fn one_device_cannot_fill_the_saved_sessions() {
        let farm = Farm::new();
        let (_broker, address, _spool, _stop) = farm.start().await;
        let connect = |client_id: String| {
            let farm = &farm;
            async move {
                let mut client = Client { stream: TcpStream::connect(address).await.unwrap(), buffer: BytesMut::new() };
                let mut connect = v4::Connect::new(client_id);
                connect.clean_session = false;
                connect.set_login(farm.device.to_string(), farm.secret.clone());
                client.send(v4::Packet::Connect(connect)).await;
                let v4::Packet::ConnAck(ack) = client.receive().await else { panic!("expected CONNACK") };
                client.send(v4::Packet::Disconnect).await;
                ack.session_present
            }
        };
        for n in 0..MAX_SAVED_SESSIONS_PER_DEVICE {
            assert!(!connect(format!("client-{n}")).await, "a new session");
        }
        // Opened again: client-1 is now the least recently opened.
        assert!(connect("client-0".into()).await, "a session kept within the bound is resumed");
        let past = format!("client-{MAX_SAVED_SESSIONS_PER_DEVICE}");
        assert!(!connect(past.clone()).await, "a new session, in the place of client-1's");
        assert!(connect(past).await, "the newest is kept");
        assert!(connect("client-0".into()).await, "so is the one opened again");
        assert!(!connect("client-1".into()).await, "the least recently opened made room");
        assert_eq!(_broker.persistent.lock().unwrap().saved.len(), MAX_SAVED_SESSIONS_PER_DEVICE, "within the bound");
    }

    /// Keep-alive counts the client's silence: a client that went quiet is dropped after one and a half periods
    /// even while the broker keeps sending it messages (it no longer counts as listening to its topics).
    #[tokio::test]
    async fn a_silent_client_is_dropped_though_messages_keep_going_to_it() {
        let farm = Farm::new();
        let (broker, address, _spool, _stop) = farm.start().await;
        let mut client = Client { stream: TcpStream::connect(address).await.unwrap(), buffer: BytesMut::new() };
        let mut connect = v4::Connect::new(farm.device.to_string());
        connect.keep_alive = 1;
        connect.set_login(farm.device.to_string(), farm.secret.clone());
        client.send(v4::Packet::Connect(connect)).await;
        assert!(matches!(client.receive().await, v4::Packet::ConnAck(_)));
        let subscribe = v4::Subscribe::new(ALERTS_TOPIC, QoS::AtMostOnce);
        client.send(v4::Packet::Subscribe(subscribe)).await;
        assert!(matches!(client.receive().await, v4::Packet::SubAck(_)));
        let silent_since = std::time::Instant::now();
        while broker.has_subscribers(ALERTS_TOPIC) {
            assert!(silent_since.elapsed() < Duration::from_secs(5), "still counted as listening after 5 s");
            broker.publish(ALERTS_TOPIC, Bytes::from_static(b"{}"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(silent_since.elapsed() >= Duration::from_millis(1400), "dropped early: {:?}", silent_since.elapsed());
    }

    /// A device's answer to a command is acknowledged only once the command book has it on disk; one the book cannot
    /// record is not acknowledged (the connection ends and the device sends it again).
    #[tokio::test]
    async fn a_command_answer_is_acknowledged_only_once_recorded() {
        let farm = Farm::new();
        let (broker, address, _spool, _stop) = farm.start().await;
        let (acks, mut answers) = mpsc::unbounded_channel();
        broker.route_command_acks(acks);
        let (mut client, _) = Client::connect(address, &farm, true).await;
        let topic = format!("smartfarm/{}/commands/ack", farm.device);
        let answer = |pkid: u16| {
            let mut publish = v4::Publish::new(topic.clone(), QoS::AtLeastOnce, r#"{"id": "x", "status": "ok"}"#);
            publish.pkid = pkid;
            v4::Packet::Publish(publish)
        };
        client.send(answer(1)).await;
        let first = answers.recv().await.expect("the answer reaches the command book");
        assert_eq!(first.device, farm.device);
        let early = tokio::time::timeout(Duration::from_millis(300), client.receive()).await;
        assert!(early.is_err(), "acknowledged before the book had it: {early:?}");
        first.recorded.send(true).unwrap();
        assert!(matches!(client.receive().await, v4::Packet::PubAck(ack) if ack.pkid == 1));

        client.send(answer(2)).await;
        answers.recv().await.unwrap().recorded.send(false).unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.stream.read_to_end(&mut rest)).await;
        read.expect("the broker ends the connection").unwrap();
        assert!(rest.is_empty() && client.buffer.is_empty(), "no acknowledgement: {rest:?}");
    }

    /// A burst of QoS 1 publishes, more than the acknowledgements a connection may owe, sent in one write: every
    /// one is stored and acknowledged once, in order (the acknowledgements a group commit settles go out together).
    #[tokio::test]
    async fn a_burst_of_publishes_is_acknowledged_once_each_in_order() {
        let farm = Farm::new();
        let (_broker, address, spool, _stop) = farm.start().await;
        let (mut client, _) = Client::connect(address, &farm, true).await;
        let count = MAX_OWED_ACKS as u16 + 44;
        let mut burst = BytesMut::new();
        for pkid in 1..=count {
            let topic = format!("smartfarm/{}/telemetry", farm.device);
            let mut publish = v4::Publish::new(topic, QoS::AtLeastOnce, format!(r#"{{"metrics": {{"t": {pkid}}}}}"#));
            publish.pkid = pkid;
            v4::Packet::Publish(publish).write(&mut burst, 1 << 20).unwrap();
        }
        client.stream.write_all(&burst).await.unwrap();
        for pkid in 1..=count {
            match client.receive().await {
                v4::Packet::PubAck(ack) => assert_eq!(ack.pkid, pkid, "acknowledged in the order published"),
                other => panic!("expected PUBACK {pkid}, got {other:?}"),
            }
        }
        assert_eq!(spool.stats().last_sequence, u64::from(count), "each stored once");
        // Nothing more: no acknowledgement twice.
        client.send(v4::Packet::PingReq).await;
        assert!(matches!(client.receive().await, v4::Packet::PingResp), "only the answer to the ping follows");
    }

    /// A QoS 2 publish resent on a new connection while its first copy is still being written gets its PUBREC only
    /// once that copy is in the spool; when the first copy's write fails, the resend is stored in its place.
    #[tokio::test]
    async fn a_qos2_resend_is_acknowledged_only_once_a_copy_is_stored() {
        let farm = Farm::new();
        let (_broker, address, spool, _stop) = farm.start().await;
        for (pkid, first_copy_written) in [(7, true), (8, false)] {
            let before = spool.stats().last_sequence;
            let (decide, held) = std::sync::mpsc::channel();
            *spool.hold_next_append.lock().unwrap() = Some(held);
            let (mut first, _) = Client::connect(address, &farm, false).await;
            first.publish_qos2(&farm, pkid, f64::from(pkid)).await;
            let holding = eventually(|| spool.hold_next_append.lock().unwrap().is_none()).await;
            assert!(holding, "the first copy reaches the spool writer");
            drop(first);

            let (mut second, ack) = Client::connect(address, &farm, false).await;
            assert!(ack.session_present);
            second.publish_qos2(&farm, pkid, f64::from(pkid)).await;
            let early = tokio::time::timeout(Duration::from_millis(300), second.receive()).await;
            assert!(early.is_err(), "PUBREC {pkid} before any copy was stored: {early:?}");
            decide.send(first_copy_written).unwrap();
            assert!(matches!(second.receive().await, v4::Packet::PubRec(rec) if rec.pkid == pkid));
            second.send(v4::Packet::PubRel(v4::PubRel::new(pkid))).await;
            assert!(matches!(second.receive().await, v4::Packet::PubComp(comp) if comp.pkid == pkid));
            assert_eq!(spool.stats().last_sequence, before + 1, "publish {pkid} is stored once");
        }
    }

    /// A client that resends a QoS 2 publish on the same connection while the first copy is being written gets a
    /// PUBREC for each once the copy is stored, which is stored once.
    #[tokio::test]
    async fn a_qos2_resend_on_the_same_connection_is_acknowledged_behind_the_first() {
        let farm = Farm::new();
        let (_broker, address, spool, _stop) = farm.start().await;
        let (decide, held) = std::sync::mpsc::channel();
        *spool.hold_next_append.lock().unwrap() = Some(held);
        let (mut client, _) = Client::connect(address, &farm, false).await;
        client.publish_qos2(&farm, 5, 5.0).await;
        assert!(eventually(|| spool.hold_next_append.lock().unwrap().is_none()).await);
        client.publish_qos2(&farm, 5, 5.0).await;
        decide.send(true).unwrap();
        for _ in 0..2 {
            let packet = tokio::time::timeout(Duration::from_secs(3), client.receive()).await.expect("in time");
            assert!(matches!(&packet, v4::Packet::PubRec(rec) if rec.pkid == 5), "{packet:?}");
        }
        client.send(v4::Packet::PubRel(v4::PubRel::new(5))).await;
        assert!(matches!(client.receive().await, v4::Packet::PubComp(comp) if comp.pkid == 5));
        assert_eq!(spool.stats().last_sequence, 1, "stored once");
    }

    /// Polls `condition` for up to 5 s.
    async fn eventually(condition: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if condition() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_persistent_session_keeps_subscriptions_across_restarts_and_stores_a_qos2_resend_once() {
        let farm = Farm::new();
        let (broker, address, spool, stop) = farm.start().await;

        // A QoS 2 publish whose PUBREC the client never sees (the connection drops), resent on a new connection.
        let (mut client, ack) = Client::connect(address, &farm, false).await;
        assert!(!ack.session_present, "a first connection has no session");
        client.send(v4::Packet::Subscribe(v4::Subscribe::new(ALERTS_TOPIC, QoS::AtLeastOnce))).await;
        assert!(matches!(client.receive().await, v4::Packet::SubAck(_)));
        client.publish_qos2(&farm, 7, 1.0).await;
        assert!(matches!(client.receive().await, v4::Packet::PubRec(rec) if rec.pkid == 7));
        drop(client);

        let (mut client, ack) = Client::connect(address, &farm, false).await;
        assert!(ack.session_present, "the session is resumed, so the client resends what was unacknowledged");
        client.publish_qos2(&farm, 7, 1.0).await;
        assert!(matches!(client.receive().await, v4::Packet::PubRec(rec) if rec.pkid == 7));
        client.send(v4::Packet::PubRel(v4::PubRel::new(7))).await;
        assert!(matches!(client.receive().await, v4::Packet::PubComp(comp) if comp.pkid == 7));
        assert_eq!(spool.stats().last_sequence, 1, "the resend was not stored again");

        // Released: the same packet id is a new message now.
        client.publish_qos2(&farm, 7, 2.0).await;
        assert!(matches!(client.receive().await, v4::Packet::PubRec(rec) if rec.pkid == 7));
        assert_eq!(spool.stats().last_sequence, 2, "a new message under a released id is stored");

        // A refused publish is not remembered (MQTT 5 clients reuse its id at once, without PUBREL), and the
        // refusal comes on the errors topic at the QoS 0 the client asked for.
        let errors = format!("smartfarm/{}/errors", farm.device);
        client.send(v4::Packet::Subscribe(v4::Subscribe::new(&errors, QoS::AtMostOnce))).await;
        assert!(matches!(client.receive().await, v4::Packet::SubAck(_)));
        client.publish_raw(&farm, 9, "not json".into()).await;
        let mut seen = (false, false);
        for _ in 0..2 {
            match client.receive().await {
                v4::Packet::PubRec(rec) if rec.pkid == 9 => seen.0 = true,
                v4::Packet::Publish(publish) if publish.topic == errors => {
                    assert_eq!((publish.qos, publish.pkid), (QoS::AtMostOnce, 0), "delivered at the granted QoS");
                    seen.1 = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, (true, true));
        client.publish_qos2(&farm, 9, 3.0).await;
        assert!(matches!(client.receive().await, v4::Packet::PubRec(rec) if rec.pkid == 9));
        assert_eq!(spool.stats().last_sequence, 3, "the id of a refused publish is free for the next one");
        drop(client);

        // The agent restarts: the subscription comes back with the session, without a new SUBSCRIBE.
        broker.save_sessions().unwrap();
        stop.send(true).unwrap();
        let (broker, address, _spool, _stop) = farm.start().await;
        let (mut client, ack) = Client::connect(address, &farm, false).await;
        assert!(ack.session_present, "the session survived the restart");
        assert_eq!(broker.publish(ALERTS_TOPIC, Bytes::from_static(b"frost")), 1);
        match client.receive().await {
            v4::Packet::Publish(publish) => assert_eq!(&publish.payload[..], b"frost"),
            other => panic!("expected the alert, got {other:?}"),
        }
        drop(client);

        // Clean session on: the saved session is discarded, and nothing is delivered to it any more.
        let (_client, ack) = Client::connect(address, &farm, true).await;
        assert!(!ack.session_present);
        assert_eq!(broker.publish(ALERTS_TOPIC, Bytes::from_static(b"frost")), 0);
    }
}
