//! Helpers for the alerts-and-commands tests: clients with a bearer token, a webhook receiver (a plain HTTP/1.1
//! server that records each POST and answers what the test says), and a `mosquitto_sub` that streams what it
//! receives.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use smartfarm_proto::alert::v1 as alert_pb;
use smartfarm_proto::alert::v1::alert_service_client::AlertServiceClient;
use smartfarm_proto::command::v1::command_service_client::CommandServiceClient;

use crate::{Bearer, Cloud};

pub type AlertClient = AlertServiceClient<InterceptedService<Channel, Bearer>>;
pub type CommandClient = CommandServiceClient<InterceptedService<Channel, Bearer>>;

impl Cloud {
    /// An AlertService client that sends `key` as its bearer token.
    pub async fn alert_client(&self, key: &str) -> AlertClient {
        AlertServiceClient::with_interceptor(self.channel().await, Bearer::new(key))
    }

    /// A CommandService client that sends `key` as its bearer token.
    pub async fn command_client(&self, key: &str) -> CommandClient {
        CommandServiceClient::with_interceptor(self.channel().await, Bearer::new(key))
    }
}

/// The next alert event on a `Subscribe` stream within `wait`, heartbeats skipped; `None` when none came in time.
/// A stream error or end panics.
pub async fn next_alert_event(
    stream: &mut tonic::Streaming<alert_pb::SubscribeResponse>,
    wait: Duration,
) -> Option<alert_pb::SubscribeResponse> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, stream.message()).await.ok()?;
        let message = message.expect("the alert stream failed").expect("the alert stream ended");
        if message.event_type != alert_pb::AlertEventType::Heartbeat as i32 {
            return Some(message);
        }
    }
}

/// One POST a webhook receiver got.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a webhook body is JSON")
    }
}

/// A webhook endpoint on 127.0.0.1: records every request and answers with the status at the front of `answers`
/// (200 once they run out).
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    pub deliveries: mpsc::UnboundedReceiver<Delivery>,
    answers: Arc<Mutex<std::collections::VecDeque<u16>>>,
}

impl WebhookReceiver {
    pub async fn start() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sender, deliveries) = mpsc::unbounded_channel();
        let answers: Arc<Mutex<std::collections::VecDeque<u16>>> = Arc::default();
        let shared = answers.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (sender, answers) = (sender.clone(), shared.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut read = BufReader::new(read);
                    loop {
                        let mut headers = Vec::new();
                        let mut line = String::new();
                        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            line.clear();
                            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let header = line.trim_end();
                            if header.is_empty() {
                                break;
                            }
                            if let Some((name, value)) = header.split_once(':') {
                                headers.push((name.trim().to_string(), value.trim().to_string()));
                            }
                        }
                        let length = headers
                            .iter()
                            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, value)| value.parse::<usize>().ok())
                            .unwrap_or(0);
                        let mut body = vec![0u8; length];
                        if read.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let status = answers.lock().unwrap().pop_front().unwrap_or(200);
                        let _ = sender.send(Delivery { headers, body });
                        let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                        if write.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WebhookReceiver { addr, deliveries, answers }
    }

    /// The URL to register.
    pub fn url(&self) -> String {
        format!("http://{}/hooks/smartfarm", self.addr)
    }

    /// Answers the next requests with these statuses.
    pub fn answer_with(&self, statuses: &[u16]) {
        self.answers.lock().unwrap().extend(statuses);
    }

    /// The next delivery, within `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<Delivery> {
        tokio::time::timeout(limit, self.deliveries.recv()).await.ok().flatten()
    }
}

/// A `mosquitto_sub` (Mosquitto's own client, an independent MQTT implementation) on the agent's broker, whose
/// messages arrive one line each.
pub struct MqttWatch {
    child: tokio::process::Child,
    pub lines: mpsc::UnboundedReceiver<String>,
}

impl MqttWatch {
    /// Subscribes to `topic` as a device; waits until the subscription is in place (the agent's
    /// `smartfarm_edge_mqtt_*` figures cannot tell, so it waits half a second).
    pub async fn start(mqtt: SocketAddr, user: &str, password: &str, topic: &str) -> MqttWatch {
        let mut child = tokio::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &mqtt.port().to_string(), "-V", "mqttv311", "-q", "1"])
            .args(["-u", user, "-P", password, "-t", topic])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub (Debian package mosquitto-clients; scripts/install-tools.sh installs it)");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        MqttWatch { child, lines }
    }

    /// The next message, within `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<String> {
        tokio::time::timeout(limit, self.lines.recv()).await.ok().flatten()
    }

    /// Every message that arrives within `window`.
    pub async fn drain(&mut self, window: Duration) -> Vec<String> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            out.push(line);
        }
        out
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Publishes one message with `mosquitto_pub` at QoS 1 as a device; panics when it fails.
pub async fn mosquitto_pub(mqtt: SocketAddr, user: &str, password: &str, topic: &str, payload: &str) {
    let output = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.port().to_string(), "-V", "mqttv311", "-q", "1"])
        .args(["-u", user, "-P", password, "-t", topic, "-m", payload])
        .output()
        .await
        .expect("mosquitto_pub (Debian package mosquitto-clients; scripts/install-tools.sh installs it)");
    assert!(output.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&output.stderr));
}
