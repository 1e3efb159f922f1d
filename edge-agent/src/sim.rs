//! The sensor simulator: registers simulated sensors with the cloud (`provision`), then connects each of them to an
//! edge agent's broker as a real MQTT client and publishes readings at a chosen overall rate (`run`), synthetic or
//! replayed from a real series. It reports exactly what it sent and what the broker acknowledged, so tests can
//! compare that with what reached the database.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

use smartfarm_proto::device::v1::device_service_client::DeviceServiceClient;
use smartfarm_proto::device::v1::{DeviceKind, RegisterDeviceRequest};

/// A simulated sensor: its device id and MQTT password.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorCredentials {
    pub device_id: String,
    pub credential: String,
}

/// Registers `count` sensors named `<prefix>-<n>` on a farm through the cloud's API.
pub async fn provision(
    cloud: &str,
    api_key: &str,
    farm_id: &str,
    count: usize,
    prefix: &str,
) -> anyhow::Result<Vec<SensorCredentials>> {
    let channel = Endpoint::from_shared(cloud.to_string())?.connect().await?;
    let token: MetadataValue<_> = format!("Bearer {api_key}").parse()?;
    let mut client = DeviceServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", token.clone());
        Ok(request)
    });
    let mut sensors = Vec::with_capacity(count);
    for index in 0..count {
        let response = client
            .register_device(RegisterDeviceRequest {
                farm_id: farm_id.to_string(),
                name: format!("{prefix}-{index:05}"),
                kind: DeviceKind::Sensor as i32,
                labels: Default::default(),
            })
            .await?
            .into_inner();
        let device = response.device.ok_or_else(|| anyhow::anyhow!("RegisterDevice returned no device"))?;
        sensors.push(SensorCredentials { device_id: device.id, credential: response.credential });
    }
    Ok(sensors)
}

/// What to publish and how fast.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// host:port of the edge agent's broker.
    pub mqtt: String,
    /// Messages per second, all sensors together.
    pub rate: f64,
    /// Messages each sensor sends before it stops.
    pub messages_per_sensor: u64,
    /// Values to cycle through (a replayed series); synthetic values when empty.
    pub replay: Vec<f64>,
    /// MQTT quality of service: 0, 1 or 2.
    pub qos: u8,
    /// How long to wait for outstanding acknowledgements at the end.
    pub drain_timeout: Duration,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub sensors: usize,
    pub messages_sent: u64,
    /// Messages the broker acknowledged (PUBACK, or PUBCOMP at QoS 2); at QoS 0, messages written to the socket.
    pub messages_acked: u64,
    /// Readings in acknowledged messages (each message carries two).
    pub readings_acked: u64,
    /// Connection errors the clients recovered from (or not).
    pub connection_errors: u64,
    /// The distinct connection errors seen (at most ten), for diagnosis.
    pub error_samples: Vec<String>,
    pub elapsed_seconds: f64,
    /// Acknowledged messages per device id.
    pub acked_per_device: BTreeMap<String, u64>,
}

/// Metrics each simulated message carries.
pub const METRICS_PER_MESSAGE: u64 = 2;

/// The SIMPaCT soil-moisture fixture (14 days, 13 sensors, hourly; CC BY 4.0, see `fixtures/SOURCE.md`), built in
/// so the demo replays real data wherever the binary runs.
pub const SOIL_MOISTURE_FIXTURE: &str = include_str!("../fixtures/soil_moisture_simpact.csv");

/// Leaf photos a simulated camera delivers (256x256 JPEGs from PlantVillage, CC BY-SA 3.0; see
/// `fixtures/photos/LICENSE`).
pub const PHOTO_FIXTURES: &[(&str, &[u8])] = &[
    ("apple_scab.jpg", include_bytes!("../fixtures/photos/apple_scab.jpg")),
    ("potato_late_blight.jpg", include_bytes!("../fixtures/photos/potato_late_blight.jpg")),
    ("apple_healthy.jpg", include_bytes!("../fixtures/photos/apple_healthy.jpg")),
];

/// A simulated camera's photo number `shot`: one of the leaf photos, lit a little differently each time and with
/// the shot number drawn into its top row, so that every shot is a distinct JPEG, as a real camera's are.
pub fn camera_shot(shot: u64) -> Vec<u8> {
    let (_, fixture) = PHOTO_FIXTURES[(shot % PHOTO_FIXTURES.len() as u64) as usize];
    let leaf = image::load_from_memory(fixture).expect("the fixtures are valid JPEGs").into_rgb8();
    let shift = (shot % 41) as i16 - 20;
    let number = shot.to_be_bytes();
    let lit = image::RgbImage::from_fn(leaf.width(), leaf.height(), |x, y| {
        if y < 8 && (x / 8) < 8 {
            // An 8x8 block per byte of the shot number: survives JPEG compression.
            let value = number[(x / 8) as usize];
            return image::Rgb([value, value, value]);
        }
        image::Rgb(leaf.get_pixel(x, y).0.map(|channel| (channel as i16 + shift).clamp(0, 255) as u8))
    });
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(&lit)
        .expect("encoding into memory cannot fail");
    bytes
}

/// Delivers photos into a camera directory the way a camera program should: each written aside under a hidden
/// name, then renamed in, so the agent never takes a half-written file.
pub fn drop_photos(dir: &std::path::Path, photos: &[(&str, &[u8])]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in photos {
        let temp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&temp, bytes)?;
        std::fs::rename(&temp, dir.join(name))?;
    }
    Ok(())
}

/// Reads the `soil_moisture` series to replay from a SIMPaCT pivot CSV file.
pub fn read_replay(path: &Path) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(path)?;
    let values = parse_replay(&text);
    anyhow::ensure!(!values.is_empty(), "{} holds no values to replay", path.display());
    Ok(values)
}

/// Every numeric cell of a SIMPaCT pivot CSV after the `day,hour` columns, row by row.
pub fn parse_replay(text: &str) -> Vec<f64> {
    text.lines()
        .skip(1)
        .flat_map(|line| line.split(',').skip(2).filter_map(|cell| cell.trim().parse::<f64>().ok()).collect::<Vec<_>>())
        .filter(|value| value.is_finite())
        .collect()
}

/// Publishes from every sensor and reports what happened.
pub async fn run(sensors: &[SensorCredentials], options: RunOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(!sensors.is_empty(), "no sensors to simulate");
    anyhow::ensure!(options.rate > 0.0, "the rate must be positive");
    let (host, port) = options.mqtt.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("--mqtt must be host:port"))?;
    let port: u16 = port.parse()?;
    let qos = match options.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        other => anyhow::bail!("qos must be 0, 1 or 2, not {other}"),
    };
    let period = Duration::from_secs_f64(sensors.len() as f64 / options.rate);
    let replay = Arc::new(options.replay.clone());
    let errors = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, sensor) in sensors.iter().enumerate() {
        let sensor = sensor.clone();
        let host = host.to_string();
        let replay = replay.clone();
        let errors = errors.clone();
        let samples = samples.clone();
        let options = options.clone();
        // Spread the sensors over one period so the load is even rather than in bursts.
        let offset = period.mul_f64(index as f64 / sensors.len() as f64);
        tasks.spawn(async move {
            let outcome =
                sensor_run(&sensor, &host, port, qos, period, offset, &options, &replay, (&errors, &samples)).await;
            (sensor.device_id, outcome)
        });
    }
    let mut report = Report { sensors: sensors.len(), ..Default::default() };
    while let Some(joined) = tasks.join_next().await {
        let (device_id, (sent, acked)) = joined?;
        report.messages_sent += sent;
        report.messages_acked += acked;
        report.acked_per_device.insert(device_id, acked);
    }
    report.readings_acked = report.messages_acked * METRICS_PER_MESSAGE;
    report.connection_errors = errors.load(Ordering::Relaxed);
    report.error_samples = samples.lock().expect("samples lock").clone();
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// One sensor: connect, publish `messages_per_sensor` messages one `period` apart, wait for their acks. Returns
/// (sent, acknowledged).
#[allow(clippy::too_many_arguments)]
async fn sensor_run(
    sensor: &SensorCredentials,
    host: &str,
    port: u16,
    qos: QoS,
    period: Duration,
    offset: Duration,
    options: &RunOptions,
    replay: &[f64],
    (errors, samples): (&AtomicU64, &std::sync::Mutex<Vec<String>>),
) -> (u64, u64) {
    let mut mqtt = MqttOptions::new(sensor.device_id.clone(), host, port);
    mqtt.set_credentials(sensor.device_id.clone(), sensor.credential.clone());
    mqtt.set_keep_alive(Duration::from_secs(30));
    // Keep the session across reconnects, so unacknowledged messages are sent again rather than forgotten.
    mqtt.set_clean_session(false);
    mqtt.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 64);
    let topic = format!("smartfarm/{}/telemetry", sensor.device_id);
    let total = options.messages_per_sensor;
    let publisher = {
        let client = client.clone();
        let replay = replay.to_vec();
        let seed = sensor.device_id.bytes().fold(0u64, |acc, b| acc.wrapping_mul(31).wrapping_add(b as u64));
        async move {
            tokio::time::sleep(offset).await;
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_ms = 0u64;
            for index in 0..total {
                ticks.tick().await;
                // Unique, increasing timestamps per sensor, so every message can be found again in the database.
                let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                last_ms = now_ms.max(last_ms + 1);
                let moisture = match replay.is_empty() {
                    true => 20.0 + ((seed.wrapping_add(index) % 1000) as f64) / 100.0,
                    false => replay[(seed.wrapping_add(index) % replay.len() as u64) as usize],
                };
                let temperature = 15.0 + ((index % 200) as f64) / 10.0;
                let payload = format!(
                    r#"{{"ts": {last_ms}, "metrics": {{"soil_moisture": {moisture}, "temperature": {temperature}}}}}"#
                );
                if client.publish(topic.clone(), qos, false, payload).await.is_err() {
                    return;
                }
            }
        }
    };
    let publisher = tokio::spawn(publisher);

    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if publisher.is_finished() && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + options.drain_timeout);
        }
        if (publisher.is_finished() && acked >= sent && sent >= total)
            || drain_deadline.is_some_and(|d| Instant::now() > d)
        {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await {
            Err(_) => continue,
            Ok(Ok(Event::Outgoing(Outgoing::Publish(_)))) => {
                sent += 1;
                if qos == QoS::AtMostOnce {
                    acked += 1;
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) if qos == QoS::AtLeastOnce => acked += 1,
            Ok(Ok(Event::Incoming(Packet::PubComp(_)))) if qos == QoS::ExactlyOnce => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                errors.fetch_add(1, Ordering::Relaxed);
                let text = error.to_string();
                {
                    let mut samples = samples.lock().expect("samples lock");
                    if samples.len() < 10 && !samples.contains(&text) {
                        samples.push(text);
                    }
                }
                tracing::debug!(device = %sensor.device_id, %error, "simulated sensor lost its connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    publisher.abort();
    let _ = client.try_disconnect();
    // Resent messages count once: a sensor sends each message once from its own point of view.
    (sent.min(total), acked.min(total))
}
