//! Checks of request fields shared by every service: ids, names, labels. Each failure is an `InvalidArgument` that
//! names the field as the contract spells it.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::error::{Error, Result};

/// The longest name or label value accepted, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// The most labels one resource may carry.
pub const MAX_LABELS: usize = 32;
/// The longest label key, in characters.
pub const MAX_LABEL_KEY_CHARS: usize = 63;

/// The longest metric name.
pub const MAX_METRIC_CHARS: usize = 64;
/// Most records one edge batch may carry: the cloud refuses more before decompressing, which bounds what one batch
/// can make it allocate; edge agents keep their batches below it.
pub const MAX_RECORDS_PER_BATCH: usize = 100_000;

/// The largest magnitude a reading's value may have. Far beyond any sensor's range, and small enough that sums of
/// readings (the rollups) cannot overflow to infinity, which no store keeps.
pub const MAX_READING_MAGNITUDE: f64 = 1e100;

/// Whether a reading's value can be stored: finite and at most [`MAX_READING_MAGNITUDE`] in magnitude.
pub fn is_reading_value(value: f64) -> bool {
    value.abs() <= MAX_READING_MAGNITUDE
}

/// Whether `name` is a metric name: 1 to 64 of `[a-z0-9_]` (what MQTT payloads, batches and queries accept).
pub fn is_metric_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_METRIC_CHARS
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Checks a metric name field.
pub fn metric_name(field: &str, name: &str) -> Result<String> {
    if is_metric_name(name) {
        Ok(name.to_string())
    } else {
        Err(Error::invalid(field, format!("{} is not a metric name (1 to 64 of a-z, 0-9, '_')", excerpt(name))))
    }
}

/// Client input quoted in an error message, cut to 64 characters: enough to recognise, never a huge status header.
pub fn excerpt(value: &str) -> String {
    const MAX_CHARS: usize = 64;
    if value.chars().count() <= MAX_CHARS {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(MAX_CHARS).collect();
        format!("{head:?}…")
    }
}

/// Parses a required id field.
pub fn id(field: &str, value: &str) -> Result<Uuid> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    Uuid::try_parse(value).map_err(|_| Error::invalid(field, "must be a UUID"))
}

/// Parses an optional id field (empty means absent).
pub fn optional_id(field: &str, value: &str) -> Result<Option<Uuid>> {
    if value.is_empty() { Ok(None) } else { id(field, value).map(Some) }
}

/// Checks a human-readable name: 1 to 200 characters, not blank, no control characters. Returns it trimmed.
pub fn name(field: &str, value: &str) -> Result<String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    let chars = trimmed.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(Error::invalid(field, format!("must be at most {MAX_NAME_CHARS} characters, got {chars}")));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(trimmed.to_string())
}

/// Checks labels: at most 32; keys 1 to 63 characters of `[a-z0-9_-]`; values at most 200 characters without
/// control characters.
pub fn labels(field: &str, labels: &std::collections::HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid(field, format!("at most {MAX_LABELS} labels, got {}", labels.len())));
    }
    let mut checked = BTreeMap::new();
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_CHARS
            && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !key_ok {
            return Err(Error::invalid(
                field,
                format!(
                    "label key {} must be 1 to {MAX_LABEL_KEY_CHARS} characters of a-z, 0-9, '_' and '-'",
                    excerpt(key)
                ),
            ));
        }
        if value.chars().count() > MAX_NAME_CHARS || value.chars().any(char::is_control) {
            return Err(Error::invalid(
                field,
                format!(
                    "label {}: value must be at most {MAX_NAME_CHARS} characters without control characters",
                    excerpt(key)
                ),
            ));
        }
        checked.insert(key.clone(), value.clone());
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_uuids() {
        assert!(id("farm_id", "0193a4b2-0000-7000-8000-000000000000").is_ok());
        assert_eq!(id("farm_id", "").unwrap_err().to_string(), "farm_id: is required");
        assert_eq!(id("farm_id", "farm-1").unwrap_err().to_string(), "farm_id: must be a UUID");
        assert_eq!(optional_id("farm_id", "").unwrap(), None);
    }

    #[test]
    fn metric_names_are_lowercase_words() {
        assert!(is_metric_name("soil_moisture_2"));
        for bad in ["", "Temperature", "temp-c", "t\u{e9}mp", &"x".repeat(65)] {
            assert!(!is_metric_name(bad), "{bad:?}");
        }
        assert!(metric_name("metrics", "Temp").unwrap_err().to_string().contains("is not a metric name"));
    }

    #[test]
    fn names_are_bounded_and_trimmed() {
        assert_eq!(name("name", "  north field ").unwrap(), "north field");
        assert!(name("name", "   ").is_err());
        assert!(name("name", &"x".repeat(201)).is_err());
        assert!(name("name", &"é".repeat(200)).is_ok());
        assert!(name("name", "bad\nname").is_err());
    }

    #[test]
    fn labels_are_checked() {
        let ok = [("row".to_string(), "7".to_string())].into();
        assert_eq!(labels("labels", &ok).unwrap().len(), 1);
        let bad_key = [("Row".to_string(), "7".to_string())].into();
        assert!(labels("labels", &bad_key).is_err());
        let too_many = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(labels("labels", &too_many).is_err());
        let huge_key = [("K".repeat(100_000), String::new())].into();
        let message = labels("labels", &huge_key).unwrap_err().to_string();
        assert!(message.len() < 200, "client input is quoted in short: {message}");
    }
}
