//! What sensors publish on `smartfarm/<device_id>/telemetry`, in any of three forms, turned into readings:
//!
//! - smartfarm JSON: `{"ts": "2026-12-04T10:00:00Z" | 1796378400000, "metrics": {"temperature": 21.5}}`; `ts`
//!   (RFC 3339 or Unix milliseconds) is optional and defaults to when the agent received the message.
//! - SenML JSON (RFC 8428): an array of records; a record's name (base name + name) ends in the metric name after
//!   its last `:` or `/` (`urn:dev:mac:0024befffe804ff1:temperature` is `temperature`); times are seconds, with
//!   base time and the RFC's relative times; only numeric values (`v`) are readings.
//! - The protobuf message `smartfarm.common.v1.DeviceTelemetry`.
//!
//! Anything else is rejected with a reason, never a panic: the agent faces whatever a farm's devices send.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use serde_json::Value;

use smartfarm_core::time::{earliest_measurement_time, from_timestamp};
use smartfarm_core::validate::is_metric_name;
use smartfarm_proto::common::v1::DeviceTelemetry;

/// Most metrics one message may carry.
pub const MAX_METRICS_PER_MESSAGE: usize = 256;

/// One parsed reading (the device comes from the topic).
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    pub metric: String,
    pub value: f64,
    pub time: SystemTime,
}

/// Why a payload was refused.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejection {
    /// Not JSON, not SenML, not the protobuf message.
    Unreadable(String),
    /// A metric name outside `[a-z0-9_]{1,64}`.
    BadMetricName(String),
    /// NaN, infinity, or not a number.
    BadValue(String),
    /// A timestamp that cannot be read.
    BadTimestamp(String),
    /// A timestamp further in the future than allowed.
    FutureTimestamp(String),
    /// No metrics, or more than allowed.
    BadMetricCount(usize),
}

impl Rejection {
    /// The reason as a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Unreadable(_) => "unreadable_payload",
            Rejection::BadMetricName(_) => "bad_metric_name",
            Rejection::BadValue(_) => "bad_value",
            Rejection::BadTimestamp(_) => "bad_timestamp",
            Rejection::FutureTimestamp(_) => "future_timestamp",
            Rejection::BadMetricCount(_) => "bad_metric_count",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Unreadable(detail) => {
                write!(f, "payload is not smartfarm JSON, SenML or DeviceTelemetry: {detail}")
            }
            Rejection::BadMetricName(name) => write!(f, "metric name {} is not 1 to 64 of a-z, 0-9, '_'", short(name)),
            Rejection::BadValue(metric) => {
                write!(
                    f,
                    "metric {} has a value that is not a finite number of at most 1e100 in magnitude",
                    short(metric)
                )
            }
            Rejection::BadTimestamp(detail) => write!(f, "timestamp cannot be read: {detail}"),
            Rejection::FutureTimestamp(detail) => write!(f, "timestamp is too far in the future: {detail}"),
            Rejection::BadMetricCount(count) => {
                write!(f, "a message must carry 1 to {MAX_METRICS_PER_MESSAGE} metrics, this one has {count}")
            }
        }
    }
}

fn short(text: &str) -> String {
    smartfarm_core::validate::excerpt(text)
}

/// Parses a telemetry payload received at `now`; timestamps more than `max_future` ahead of `now` are refused.
pub fn parse(payload: &[u8], now: SystemTime, max_future: Duration) -> Result<Vec<Measurement>, Rejection> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let measurements = match first {
        Some(b'{') => parse_smartfarm_json(payload, now)?,
        Some(b'[') => parse_senml(payload, now)?,
        None => return Err(Rejection::Unreadable("the payload is empty".into())),
        _ => parse_protobuf(payload, now)?,
    };
    if measurements.is_empty() || measurements.len() > MAX_METRICS_PER_MESSAGE {
        return Err(Rejection::BadMetricCount(measurements.len()));
    }
    let latest_allowed = now + max_future;
    for measurement in &measurements {
        if !is_metric_name(&measurement.metric) {
            return Err(Rejection::BadMetricName(measurement.metric.clone()));
        }
        if !smartfarm_core::validate::is_reading_value(measurement.value) {
            return Err(Rejection::BadValue(measurement.metric.clone()));
        }
        if measurement.time < earliest_measurement_time() {
            return Err(Rejection::BadTimestamp(format!(
                "Unix time {} ms is before 2000-01-01T00:00:00Z (is the device's clock set?)",
                smartfarm_core::time::to_unix_micros(measurement.time) / 1000
            )));
        }
        if measurement.time > latest_allowed {
            let ahead = measurement.time.duration_since(now).unwrap_or_default();
            return Err(Rejection::FutureTimestamp(format!("{} s ahead of the agent's clock", ahead.as_secs())));
        }
    }
    Ok(measurements)
}

fn parse_smartfarm_json(payload: &[u8], now: SystemTime) -> Result<Vec<Measurement>, Rejection> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|error| Rejection::Unreadable(format!("invalid JSON: {error}")))?;
    let object = value.as_object().ok_or_else(|| Rejection::Unreadable("expected a JSON object".into()))?;
    let time = match object.get("ts") {
        None | Some(Value::Null) => now,
        Some(Value::String(text)) => parse_rfc3339(text).ok_or_else(|| Rejection::BadTimestamp(short(text)))?,
        Some(Value::Number(number)) => {
            let millis = number.as_f64().filter(|m| m.is_finite() && *m >= 0.0 && *m < 1e15);
            let millis = millis.ok_or_else(|| Rejection::BadTimestamp(format!("{number} is not Unix milliseconds")))?;
            UNIX_EPOCH + Duration::from_micros((millis * 1000.0) as u64)
        }
        Some(other) => return Err(Rejection::BadTimestamp(format!("expected a string or a number, got {other}"))),
    };
    let metrics = object
        .get("metrics")
        .and_then(Value::as_object)
        .ok_or_else(|| Rejection::Unreadable("expected a \"metrics\" object".into()))?;
    metrics
        .iter()
        .map(|(metric, value)| match value.as_f64() {
            Some(value) => Ok(Measurement { metric: metric.clone(), value, time }),
            None => Err(Rejection::BadValue(metric.clone())),
        })
        .collect()
}

/// Times below 2^28 seconds are relative to now (RFC 8428, section 4.5.3).
const SENML_RELATIVE_LIMIT: f64 = 268_435_456.0;

fn parse_senml(payload: &[u8], now: SystemTime) -> Result<Vec<Measurement>, Rejection> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|error| Rejection::Unreadable(format!("invalid SenML: {error}")))?;
    let records = value.as_array().ok_or_else(|| Rejection::Unreadable("SenML is a JSON array".into()))?;
    let mut base_name = String::new();
    let mut base_time = 0.0f64;
    let mut base_value = 0.0f64;
    let mut measurements = Vec::new();
    for record in records {
        let record =
            record.as_object().ok_or_else(|| Rejection::Unreadable("SenML records are JSON objects".into()))?;
        if let Some(bn) = record.get("bn") {
            base_name = bn.as_str().ok_or_else(|| Rejection::Unreadable("bn must be a string".into()))?.to_string();
        }
        if let Some(bt) = record.get("bt") {
            base_time = bt.as_f64().ok_or_else(|| Rejection::BadTimestamp("bt must be a number".into()))?;
        }
        if let Some(bv) = record.get("bv") {
            base_value = bv.as_f64().ok_or_else(|| Rejection::Unreadable("bv must be a number".into()))?;
        }
        let Some(v) = record.get("v") else {
            // Records with string, boolean or data values, or only base fields, carry no reading.
            continue;
        };
        let name = format!("{base_name}{}", record.get("n").and_then(Value::as_str).unwrap_or(""));
        let metric = name.rsplit([':', '/']).next().unwrap_or("").to_string();
        let value = v.as_f64().map(|v| v + base_value).ok_or_else(|| Rejection::BadValue(metric.clone()))?;
        let t = match record.get("t") {
            None => 0.0,
            Some(t) => t.as_f64().ok_or_else(|| Rejection::BadTimestamp("t must be a number".into()))?,
        };
        let seconds = base_time + t;
        let time = if seconds.abs() < SENML_RELATIVE_LIMIT {
            let offset = Duration::from_secs_f64(seconds.abs());
            if seconds >= 0.0 { now + offset } else { now.checked_sub(offset).unwrap_or(UNIX_EPOCH) }
        } else if seconds > 0.0 && seconds < 1e13 {
            UNIX_EPOCH + Duration::from_secs_f64(seconds)
        } else {
            return Err(Rejection::BadTimestamp(format!("{seconds} is not a SenML time")));
        };
        measurements.push(Measurement { metric, value, time });
    }
    Ok(measurements)
}

fn parse_protobuf(payload: &[u8], now: SystemTime) -> Result<Vec<Measurement>, Rejection> {
    let message = DeviceTelemetry::decode(payload)
        .map_err(|error| Rejection::Unreadable(format!("not a DeviceTelemetry message: {error}")))?;
    let time = match &message.measure_time {
        None => now,
        Some(timestamp) => {
            from_timestamp("measure_time", timestamp).map_err(|error| Rejection::BadTimestamp(error.to_string()))?
        }
    };
    let mut measurements: Vec<Measurement> =
        message.metrics.into_iter().map(|(metric, value)| Measurement { metric, value, time }).collect();
    // Map order is arbitrary on the wire; a stable order keeps spool contents reproducible.
    measurements.sort_by(|a, b| a.metric.cmp(&b.metric));
    Ok(measurements)
}

/// Parses an RFC 3339 timestamp (`2026-12-04T10:00:00Z`, `…T10:00:00.123+02:00`).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || bytes[4] != b'-' || bytes[7] != b'-' || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    if bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|b| b.is_ascii_digit()) { part.parse().ok() } else { None }
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut position = 19;
    let mut nanos: i64 = 0;
    if bytes.get(position) == Some(&b'.') {
        position += 1;
        let start = position;
        while bytes.get(position).is_some_and(u8::is_ascii_digit) {
            position += 1;
        }
        let digits = text.get(start..position)?;
        if digits.is_empty() {
            return None;
        }
        let padded: String = digits.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = padded.parse().ok()?;
    }
    let offset_seconds = match text.get(position..)? {
        "Z" | "z" => 0,
        zone if zone.len() == 6 && matches!(zone.as_bytes()[0], b'+' | b'-') && zone.as_bytes()[3] == b':' => {
            let hours = number(position + 1..position + 3)?;
            let minutes = number(position + 4..position + 6)?;
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    let micros = seconds.checked_mul(1_000_000)? + nanos / 1000;
    Some(smartfarm_core::time::from_unix_micros(micros))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use smartfarm_core::time::{from_unix_micros, to_timestamp};

    fn now() -> SystemTime {
        from_unix_micros(1_796_378_400_000_000) // 2026-12-04T10:00:00Z
    }

    const SKEW: Duration = Duration::from_secs(300);

    #[test]
    fn smartfarm_json_with_every_timestamp_form() {
        let parsed =
            parse(br#"{"ts": "2026-12-04T09:59:00Z", "metrics": {"temperature": 21.5, "humidity": 61}}"#, now(), SKEW)
                .unwrap();
        assert_eq!(parsed.len(), 2);
        assert!(parsed.iter().all(|m| m.time == now() - Duration::from_secs(60)));
        let parsed = parse(br#"{"ts": 1796378340000, "metrics": {"temperature": 21.5}}"#, now(), SKEW).unwrap();
        assert_eq!(parsed[0].time, now() - Duration::from_secs(60));
        let parsed = parse(br#"{"metrics": {"soil_moisture": 0.31}}"#, now(), SKEW).unwrap();
        assert_eq!(parsed, vec![Measurement { metric: "soil_moisture".into(), value: 0.31, time: now() }]);
        let parsed = parse(br#"{"ts": "2026-12-04T11:59:00.5+02:00", "metrics": {"t": 1}}"#, now(), SKEW).unwrap();
        assert_eq!(parsed[0].time, now() - Duration::from_millis(59_500));
    }

    #[test]
    fn senml_records_with_base_fields() {
        let payload = br#"[
            {"bn": "urn:dev:mac:0024befffe804ff1:", "bt": 1796378340, "n": "temperature", "u": "Cel", "v": 23.1},
            {"n": "humidity", "u": "%RH", "v": 40, "t": 30},
            {"n": "door", "vb": true}
        ]"#;
        let parsed = parse(payload, now(), SKEW).unwrap();
        assert_eq!(parsed.len(), 2, "the boolean record is not a reading");
        assert_eq!(
            parsed[0],
            Measurement { metric: "temperature".into(), value: 23.1, time: now() - Duration::from_secs(60) }
        );
        assert_eq!(parsed[1].time, now() - Duration::from_secs(30));
        let relative = parse(br#"[{"n": "light", "v": 300, "t": -10}]"#, now(), SKEW).unwrap();
        assert_eq!(relative[0].time, now() - Duration::from_secs(10), "small times are relative to now");
    }

    #[test]
    fn protobuf_device_telemetry() {
        let message = DeviceTelemetry {
            measure_time: Some(to_timestamp(now() - Duration::from_secs(5))),
            metrics: [("temperature".to_string(), 19.0), ("humidity".to_string(), 70.0)].into(),
        };
        let parsed = parse(&message.encode_to_vec(), now(), SKEW).unwrap();
        assert_eq!(parsed.iter().map(|m| m.metric.as_str()).collect::<Vec<_>>(), vec!["humidity", "temperature"]);
    }

    #[test]
    fn bad_payloads_are_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"{not json", "unreadable_payload"),
            (b"hello world", "unreadable_payload"),
            (br#"{"metrics": {"temperature": "warm"}}"#, "bad_value"),
            (br#"{"metrics": {"Temperature": 1}}"#, "bad_metric_name"),
            (br#"{"metrics": {"temp-c": 1}}"#, "bad_metric_name"),
            (br#"{"metrics": {}}"#, "bad_metric_count"),
            (br#"{"ts": "yesterday", "metrics": {"t": 1}}"#, "bad_timestamp"),
            (br#"{"ts": "2027-01-01T00:00:00Z", "metrics": {"t": 1}}"#, "future_timestamp"),
            (br#"{"ts": -5, "metrics": {"t": 1}}"#, "bad_timestamp"),
            (br#"{"ts": 5000, "metrics": {"t": 1}}"#, "bad_timestamp"),
            (br#"{"ts": "1999-12-31T23:59:59Z", "metrics": {"t": 1}}"#, "bad_timestamp"),
            (br#"[{"n": "t", "v": 1e999}]"#, "unreadable_payload"),
            (br#"[{"n": "t", "v": "x"}]"#, "bad_value"),
            (br#"{"metrics": {"t": 1e101}}"#, "bad_value"),
            (br#"{"metrics": {"t": -1.7976931348623157e308}}"#, "bad_value"),
            (b"", "unreadable_payload"),
        ];
        for (payload, reason) in cases {
            let error = parse(payload, now(), SKEW).expect_err(&String::from_utf8_lossy(payload));
            assert_eq!(error.reason(), *reason, "{}: {error}", String::from_utf8_lossy(payload));
        }
        let many: String = (0..300).map(|i| format!("\"m{i}\": 1")).collect::<Vec<_>>().join(",");
        let error = parse(format!("{{\"metrics\": {{{many}}}}}").as_bytes(), now(), SKEW).unwrap_err();
        assert_eq!(error.reason(), "bad_metric_count");
    }

    #[test]
    fn rfc3339_forms() {
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00Z"), Some(now()));
        assert_eq!(parse_rfc3339("2026-12-04T12:00:00+02:00"), Some(now()));
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00.000001Z"), Some(now() + Duration::from_micros(1)));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        for bad in ["2026-13-04T10:00:00Z", "2026-12-04T10:00:00", "2026-12-04 10:00", "2026-12-04T10:00:00.Z", ""] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
