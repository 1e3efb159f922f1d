//! Conversions between `SystemTime` (what the code uses) and the contracts' `Timestamp`/`Duration`, and the
//! microsecond integers the embedded database stores.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smartfarm_proto::pbjson_types;

use crate::error::{Error, Result};

/// The earliest time a measurement may carry: 2000-01-01T00:00:00Z. Earlier times come from devices whose clock was
/// never set (they count from 1970 after every power-up); storing them would file readings decades in the past.
pub fn earliest_measurement_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(946_684_800)
}

/// A `SystemTime` as a contract timestamp.
pub fn to_timestamp(time: SystemTime) -> pbjson_types::Timestamp {
    let (seconds, nanos) = match time.duration_since(UNIX_EPOCH) {
        Ok(since) => (since.as_secs() as i64, since.subsec_nanos() as i32),
        Err(before) => {
            let before = before.duration();
            let mut seconds = -(before.as_secs() as i64);
            let mut nanos = before.subsec_nanos() as i32;
            if nanos > 0 {
                seconds -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            (seconds, nanos)
        }
    };
    pbjson_types::Timestamp { seconds, nanos }
}

/// A request's required time range: both bounds set, start before end.
pub fn required_range(range: Option<&smartfarm_proto::common::v1::TimeRange>) -> Result<(SystemTime, SystemTime)> {
    let range = range.ok_or_else(|| Error::invalid("time_range", "is required"))?;
    let start = range.start_time.as_ref().ok_or_else(|| Error::invalid("time_range.start_time", "is required"))?;
    let end = range.end_time.as_ref().ok_or_else(|| Error::invalid("time_range.end_time", "is required"))?;
    let (start, end) = (from_timestamp("time_range.start_time", start)?, from_timestamp("time_range.end_time", end)?);
    if start >= end {
        return Err(Error::invalid("time_range", "start_time must be before end_time"));
    }
    Ok((start, end))
}

/// A contract timestamp as a `SystemTime`; `field` names it in the error when it is out of range.
pub fn from_timestamp(field: &str, timestamp: &pbjson_types::Timestamp) -> Result<SystemTime> {
    if !(0..1_000_000_000).contains(&timestamp.nanos) {
        return Err(Error::invalid(field, "nanos must be between 0 and 999999999"));
    }
    let nanos = Duration::from_nanos(timestamp.nanos as u64);
    let time = if timestamp.seconds >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(timestamp.seconds as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(timestamp.seconds.unsigned_abs()))
    };
    time.and_then(|t| t.checked_add(nanos)).ok_or_else(|| Error::invalid(field, "is out of range"))
}

/// Microseconds since the Unix epoch (negative before it), as the embedded database stores times.
pub fn to_unix_micros(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_micros() as i64,
        Err(before) => -(before.duration().as_micros() as i64),
    }
}

/// The inverse of [`to_unix_micros`].
pub fn from_unix_micros(micros: i64) -> SystemTime {
    if micros >= 0 {
        UNIX_EPOCH + Duration::from_micros(micros as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(micros.unsigned_abs())
    }
}

/// The current time, truncated to microseconds so that what is stored and what is returned are equal on every
/// backend (PostgreSQL keeps microseconds).
pub fn now() -> SystemTime {
    from_unix_micros(to_unix_micros(SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_on_both_sides_of_the_epoch() {
        for micros in [0, 1, 1_733_000_000_123_456, -1, -1_500_000] {
            let time = from_unix_micros(micros);
            assert_eq!(to_unix_micros(time), micros);
            let back = from_timestamp("t", &to_timestamp(time)).unwrap();
            assert_eq!(back, time, "{micros}");
        }
        let bad = pbjson_types::Timestamp { seconds: 0, nanos: -5 };
        assert!(from_timestamp("t", &bad).is_err());
    }
}
