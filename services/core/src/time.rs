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

/// The range `google.protobuf.Timestamp` allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z, in seconds. Every
/// store keeps these times (PostgreSQL's `timestamptz`, microseconds in a 64-bit integer).
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// A contract timestamp as a `SystemTime`; `field` names it in the error when it is out of range.
pub fn from_timestamp(field: &str, timestamp: &pbjson_types::Timestamp) -> Result<SystemTime> {
    if !(0..1_000_000_000).contains(&timestamp.nanos) {
        return Err(Error::invalid(field, "nanos must be between 0 and 999999999"));
    }
    if !TIMESTAMP_SECONDS.contains(&timestamp.seconds) {
        return Err(Error::invalid(field, "is out of range (a timestamp lies between the years 1 and 9999)"));
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

    /// Times no store keeps (microseconds since 1970 in 64 bits would wrap, PostgreSQL refuses them) are refused
    /// with the field named, as a request's fault; the contract's own bounds pass.
    #[test]
    fn timestamps_outside_the_contracts_range_are_refused() {
        for seconds in [10_000_000_000_000, -300_000_000_000, 253_402_300_800, -62_135_596_801] {
            let error = from_timestamp("end_time", &pbjson_types::Timestamp { seconds, nanos: 0 }).unwrap_err();
            assert!(matches!(&error, Error::InvalidArgument { field, .. } if field == "end_time"), "{error:?}");
            assert!(error.to_string().contains("out of range"), "{error}");
        }
        for seconds in [253_402_300_799, -62_135_596_800] {
            let time = from_timestamp("t", &pbjson_types::Timestamp { seconds, nanos: 0 }).unwrap();
            assert_eq!(to_unix_micros(time), seconds * 1_000_000);
        }
    }
}
