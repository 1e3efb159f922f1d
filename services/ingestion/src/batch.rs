//! Turning a `ReadingBatch` from the wire into rows to commit: decompression with a size cap, decoding, and the
//! checks that keep one bad record from blocking a farm's link. A batch that cannot be decoded at all is refused
//! for good (`BatchReject`); a record that can never be stored (a device of another farm, a bad metric name, a
//! non-finite value) is dropped from its batch and counted, and the rest of the batch is committed.

use std::collections::HashSet;
use std::io::Read;
use std::time::SystemTime;

use prost::Message;
use uuid::Uuid;

use smartfarm_core::time::{earliest_measurement_time, from_timestamp};
use smartfarm_core::validate::{MAX_RECORDS_PER_BATCH, is_metric_name};
use smartfarm_proto::ingestion::v1 as pb;
use smartfarm_store::telemetry::{AggregateRow, EdgeBatch, ReadingRow};

/// The most a record may take decompressed, on average over a batch: today's records take about 150 bytes, so
/// this leaves room for newer record kinds while bounding what a small compressed batch can expand to.
const MAX_BYTES_PER_RECORD: usize = 4096;
/// How far ahead of the cloud's clock a gateway's times may be (a gateway whose clock runs ahead).
const MAX_FUTURE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Most readings one aggregate may summarise.
const MAX_AGGREGATE_COUNT: u64 = u32::MAX as u64;

/// Why a batch was refused as a whole. The text goes to the agent in `BatchReject.reason`.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

/// Records dropped from a committed batch, by reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub foreign_device: u64,
    pub bad_metric: u64,
    pub bad_value: u64,
    pub bad_time: u64,
    pub out_of_range: u64,
}

impl Dropped {
    pub fn total(&self) -> u64 {
        self.foreign_device + self.bad_metric + self.bad_value + self.bad_time + self.out_of_range
    }

    /// The reasons with a count, for the agent.
    pub fn to_proto(&self) -> Vec<pb::DroppedRecords> {
        self.by_reason()
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .map(|(reason, count)| pb::DroppedRecords { reason: reason.to_owned(), count })
            .collect()
    }

    /// (reason, count) pairs for metrics and logs.
    pub fn by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("foreign_device", self.foreign_device),
            ("bad_metric", self.bad_metric),
            ("bad_value", self.bad_value),
            ("bad_time", self.bad_time),
            ("sequence_out_of_range", self.out_of_range),
        ]
    }
}

/// Decodes and checks a batch. `farm_devices` are the ids of the farm's devices (in service or not: data measured
/// before a decommission is still the farm's).
pub fn decode(
    batch: &pb::ReadingBatch,
    gateway_id: Uuid,
    spool_id: Uuid,
    farm_id: Uuid,
    farm_devices: &HashSet<Uuid>,
    max_decompressed_bytes: usize,
    receive_time: SystemTime,
) -> Result<(EdgeBatch, Dropped), Refusal> {
    if batch.first_sequence == 0 || batch.first_sequence > batch.last_sequence {
        return Err(Refusal(format!(
            "sequence range {}..={} is empty or starts at 0",
            batch.first_sequence, batch.last_sequence
        )));
    }
    if batch.last_sequence > i64::MAX as u64 {
        return Err(Refusal(format!(
            "last_sequence {} is past the largest sequence, {}",
            batch.last_sequence,
            i64::MAX
        )));
    }
    let record_count = batch.record_count as usize;
    if record_count == 0 || record_count > MAX_RECORDS_PER_BATCH {
        return Err(Refusal(format!(
            "record_count {record_count} is outside 1..={MAX_RECORDS_PER_BATCH} (a batch carries records)"
        )));
    }
    let max_decompressed_bytes = max_decompressed_bytes.min(record_count * MAX_BYTES_PER_RECORD);
    let payload = match pb::Compression::try_from(batch.compression) {
        Ok(pb::Compression::None) => batch.payload.clone(),
        Ok(pb::Compression::Zstd) => {
            let mut decoded = Vec::new();
            let decoder = zstd::stream::read::Decoder::new(batch.payload.as_slice())
                .map_err(|error| Refusal(format!("payload is not valid zstd: {error}")))?;
            // One byte over the cap tells an oversized payload from one that fits exactly.
            decoder
                .take(max_decompressed_bytes as u64 + 1)
                .read_to_end(&mut decoded)
                .map_err(|error| Refusal(format!("payload is not valid zstd: {error}")))?;
            if decoded.len() > max_decompressed_bytes {
                return Err(Refusal(format!("payload decompresses to more than {max_decompressed_bytes} bytes")));
            }
            decoded
        }
        _ => return Err(Refusal(format!("unknown compression {}", batch.compression))),
    };
    // Counted on the wire before decoding: a payload of many tiny records would decode to far more memory than
    // its bytes.
    let on_wire =
        count_records(&payload).map_err(|error| Refusal(format!("payload is not a BatchPayload: {error}")))?;
    if on_wire != record_count {
        return Err(Refusal(format!("record_count says {record_count} but the payload holds {on_wire}")));
    }
    let decoded = pb::BatchPayload::decode(payload.as_slice())
        .map_err(|error| Refusal(format!("payload is not a BatchPayload: {error}")))?;
    // The mark moves to last_sequence: it must be a record's, or a bad batch could move it past records to come.
    let highest = decoded.records.iter().map(|record| record.sequence).filter(|s| *s <= batch.last_sequence).max();
    if highest != Some(batch.last_sequence) {
        return Err(Refusal(format!(
            "last_sequence {} is not the sequence of the batch's last record",
            batch.last_sequence
        )));
    }
    let earliest = earliest_measurement_time();
    let latest = receive_time + MAX_FUTURE;
    let plausible = |time: SystemTime| time >= earliest && time <= latest;

    let mut dropped = Dropped::default();
    let mut readings = Vec::new();
    let mut aggregates = Vec::new();
    // The agent sends its records in spool order, each number once: a record whose number does not follow the
    // one before it repeats a number (or is out of order), and two stored readings with one number would share
    // their page cursor's key, so that paging skips one of them.
    let mut previous: Option<u64> = None;
    for record in decoded.records {
        if record.sequence < batch.first_sequence
            || record.sequence > batch.last_sequence
            || previous.is_some_and(|previous| record.sequence <= previous)
        {
            dropped.out_of_range += 1;
            continue;
        }
        previous = Some(record.sequence);
        match record.body {
            Some(pb::spool_record::Body::Reading(reading)) => {
                let Some(device_id) = farm_device(&reading.device_id, &reading.metric, farm_devices, &mut dropped)
                else {
                    continue;
                };
                if !smartfarm_core::validate::is_reading_value(reading.value) {
                    dropped.bad_value += 1;
                    continue;
                }
                let Some(measure_time) = reading
                    .measure_time
                    .as_ref()
                    .and_then(|t| from_timestamp("time", t).ok())
                    .filter(|time| plausible(*time))
                else {
                    dropped.bad_time += 1;
                    continue;
                };
                readings.push(ReadingRow {
                    sequence: record.sequence,
                    device_id,
                    metric: reading.metric,
                    value: reading.value,
                    measure_time,
                });
            }
            Some(pb::spool_record::Body::Aggregate(aggregate)) => {
                let Some(device_id) = farm_device(&aggregate.device_id, &aggregate.metric, farm_devices, &mut dropped)
                else {
                    continue;
                };
                let values = [aggregate.min, aggregate.max, aggregate.avg, aggregate.last];
                if aggregate.count == 0
                    || aggregate.count > MAX_AGGREGATE_COUNT
                    || values.iter().any(|v| !smartfarm_core::validate::is_reading_value(*v))
                    || aggregate.min > aggregate.max
                {
                    dropped.bad_value += 1;
                    continue;
                }
                let window =
                    aggregate.window_start_time.as_ref().and_then(|t| from_timestamp("window_start_time", t).ok()).zip(
                        aggregate.window_end_time.as_ref().and_then(|t| from_timestamp("window_end_time", t).ok()),
                    );
                let Some((window_start, window_end)) =
                    window.filter(|(start, end)| start < end && plausible(*start) && plausible(*end))
                else {
                    dropped.bad_time += 1;
                    continue;
                };
                aggregates.push(AggregateRow {
                    sequence: record.sequence,
                    device_id,
                    metric: aggregate.metric,
                    window_start,
                    window_end,
                    count: aggregate.count,
                    min: aggregate.min,
                    max: aggregate.max,
                    avg: aggregate.avg,
                    last: aggregate.last,
                });
            }
            // A record of a kind this cloud does not know (a newer agent): keep the link moving.
            None => dropped.out_of_range += 1,
        }
    }
    let batch = EdgeBatch {
        gateway_id,
        spool_id,
        farm_id,
        first_sequence: batch.first_sequence,
        last_sequence: batch.last_sequence,
        readings,
        aggregates,
        receive_time,
        // Set by the link, which knows whether anything scores its commits.
        score_later: false,
    };
    Ok((batch, dropped))
}

/// The record's device when it is one of the farm's and its metric name is valid; otherwise counts why not.
fn farm_device(device_id: &str, metric: &str, farm_devices: &HashSet<Uuid>, dropped: &mut Dropped) -> Option<Uuid> {
    match Uuid::try_parse(device_id) {
        Ok(device_id) if farm_devices.contains(&device_id) => {
            if is_metric_name(metric) {
                Some(device_id)
            } else {
                dropped.bad_metric += 1;
                None
            }
        }
        _ => {
            dropped.foreign_device += 1;
            None
        }
    }
}

/// Counts the top-level `records` fields (field 1) of an encoded `BatchPayload` without decoding them.
fn count_records(mut bytes: &[u8]) -> Result<usize, &'static str> {
    fn varint(bytes: &mut &[u8]) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first().ok_or("truncated varint")?;
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes")
    }
    let mut count = 0;
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut bytes)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut bytes)?).map_err(|_| "length too large")?,
            5 => 4,
            _ => return Err("unsupported wire type"),
        };
        if skip > bytes.len() {
            return Err("field runs past the end");
        }
        bytes = &bytes[skip..];
        if key == (1 << 3) | 2 {
            count += 1;
        }
    }
    Ok(count)
}

/// Encodes records the way edge agents do (used by tests and benchmarks on the cloud side).
pub fn encode(records: Vec<pb::SpoolRecord>, first_sequence: u64, last_sequence: u64) -> pb::ReadingBatch {
    let record_count = records.len() as u32;
    let payload = pb::BatchPayload { records }.encode_to_vec();
    pb::ReadingBatch {
        first_sequence,
        last_sequence,
        compression: pb::Compression::Zstd as i32,
        payload: zstd::bulk::compress(&payload, 3).expect("compressing into a vec cannot fail"),
        record_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smartfarm_proto::common::v1::Reading;
    use std::time::Duration;

    fn record(sequence: u64, device: Uuid, metric: &str, value: f64) -> pb::SpoolRecord {
        pb::SpoolRecord {
            sequence,
            body: Some(pb::spool_record::Body::Reading(Reading {
                device_id: device.to_string(),
                metric: metric.to_string(),
                value,
                measure_time: Some(smartfarm_core::time::to_timestamp(SystemTime::now())),
                receive_time: None,
            })),
        }
    }

    #[test]
    fn good_records_pass_and_bad_ones_are_dropped_by_reason() {
        let (gateway, farm, mine, foreign) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let devices = HashSet::from([mine]);
        let wire = encode(
            vec![
                record(1, mine, "temperature", 20.0),
                record(2, foreign, "temperature", 20.0),
                record(3, mine, "Temperature", 20.0),
                record(4, mine, "humidity", f64::NAN),
                record(5, mine, "humidity", 1.0),
                record(5, mine, "humidity", 2.0),
                record(9, mine, "humidity", 1.0),
            ],
            1,
            5,
        );
        let (batch, dropped) =
            decode(&wire, gateway, Uuid::now_v7(), farm, &devices, 1 << 20, SystemTime::now()).unwrap();
        assert_eq!(batch.readings.len(), 2);
        assert_eq!((batch.readings[0].sequence, batch.readings[1].sequence), (1, 5));
        assert_eq!(batch.readings[1].value, 1.0, "a repeated number is dropped, the first kept");
        assert_eq!(dropped, Dropped { foreign_device: 1, bad_metric: 1, bad_value: 1, bad_time: 0, out_of_range: 2 });
    }

    /// Values whose sums could overflow the rollups (a store keeps no infinity) are dropped as bad values.
    #[test]
    fn values_beyond_the_storable_magnitude_are_dropped() {
        let (farm, mine) = (Uuid::now_v7(), Uuid::now_v7());
        let devices = HashSet::from([mine]);
        let values = [f64::MAX, -1e101, 1e100, -1e100];
        let records = values.iter().enumerate().map(|(i, v)| record(i as u64 + 1, mine, "flow", *v)).collect();
        let wire = encode(records, 1, 4);
        let (batch, dropped) =
            decode(&wire, Uuid::now_v7(), Uuid::now_v7(), farm, &devices, 1 << 20, SystemTime::now()).unwrap();
        assert_eq!(batch.readings.iter().map(|r| r.value).collect::<Vec<_>>(), [1e100, -1e100]);
        assert_eq!(dropped.bad_value, 2);
    }

    #[test]
    fn implausible_times_and_aggregates_are_dropped() {
        let (mine, now) = (Uuid::now_v7(), SystemTime::now());
        let at = |time: SystemTime, sequence: u64| {
            let mut record = record(sequence, mine, "temperature", 20.0);
            if let Some(pb::spool_record::Body::Reading(reading)) = &mut record.body {
                reading.measure_time = Some(smartfarm_core::time::to_timestamp(time));
            }
            record
        };
        let aggregate = |sequence: u64, count: u64, min: f64, max: f64| pb::SpoolRecord {
            sequence,
            body: Some(pb::spool_record::Body::Aggregate(pb::Aggregate {
                device_id: mine.to_string(),
                metric: "temperature".into(),
                window_start_time: Some(smartfarm_core::time::to_timestamp(now - Duration::from_secs(60))),
                window_end_time: Some(smartfarm_core::time::to_timestamp(now)),
                count,
                min,
                max,
                avg: min,
                last: min,
            })),
        };
        let wire = encode(
            vec![
                at(SystemTime::UNIX_EPOCH + Duration::from_secs(5), 1),
                at(now + Duration::from_secs(3 * 24 * 3600), 2),
                at(now, 3),
                aggregate(4, u64::MAX, 1.0, 2.0),
                aggregate(5, 10, 3.0, 2.0),
                aggregate(6, 10, 1.0, 2.0),
            ],
            1,
            6,
        );
        let devices = HashSet::from([mine]);
        let (batch, dropped) = decode(&wire, Uuid::nil(), Uuid::nil(), Uuid::nil(), &devices, 1 << 20, now).unwrap();
        assert_eq!((batch.readings.len(), batch.aggregates.len()), (1, 1));
        assert_eq!((dropped.bad_time, dropped.bad_value), (2, 2));
    }

    #[test]
    fn undecodable_batches_are_refused_with_a_reason() {
        let devices = HashSet::new();
        let decode = |batch: &pb::ReadingBatch| {
            decode(batch, Uuid::nil(), Uuid::nil(), Uuid::nil(), &devices, 1 << 20, SystemTime::now())
        };
        let one = || encode(vec![record(1, Uuid::nil(), "t", 1.0)], 1, 1);
        let mut wire = one();
        wire.payload = b"not zstd".to_vec();
        assert!(decode(&wire).unwrap_err().0.contains("not valid zstd"));
        let mut wire = one();
        wire.record_count = 3;
        assert!(decode(&wire).unwrap_err().0.contains("record_count"));
        let wire = encode(vec![], 1, 1);
        assert!(decode(&wire).unwrap_err().0.contains("record_count 0"));
        let mut wire = one();
        wire.record_count = MAX_RECORDS_PER_BATCH as u32 + 1;
        assert!(decode(&wire).unwrap_err().0.contains("outside"));
        let wire = encode(vec![record(1, Uuid::nil(), "t", 1.0)], 5, 4);
        assert!(decode(&wire).unwrap_err().0.contains("empty"));
        let mut wire = one();
        wire.compression = 0;
        assert!(decode(&wire).unwrap_err().0.contains("unknown compression"));
        // The mark may only move to a record's sequence.
        let wire = encode(vec![record(1, Uuid::nil(), "t", 1.0)], 1, 1_000_000);
        assert!(decode(&wire).unwrap_err().0.contains("last record"));
        let wire = encode(vec![record(u64::MAX, Uuid::nil(), "t", 1.0)], 1, u64::MAX);
        assert!(decode(&wire).unwrap_err().0.contains("largest sequence"));
        // A zip bomb: a small payload that decompresses past the cap.
        let bomb = zstd::bulk::compress(&vec![0u8; 4 << 20], 19).unwrap();
        let wire =
            pb::ReadingBatch { first_sequence: 1, last_sequence: 1, compression: 2, payload: bomb, record_count: 1 };
        assert!(decode(&wire).unwrap_err().0.contains("more than"));
        // Many empty records in few bytes: counted on the wire, refused before decoding.
        let tiny = [0x0au8, 0x00].repeat(200_000);
        let wire = pb::ReadingBatch {
            first_sequence: 1,
            last_sequence: 1,
            compression: 2,
            payload: zstd::bulk::compress(&tiny, 3).unwrap(),
            record_count: 1000,
        };
        assert!(decode(&wire).unwrap_err().0.contains("holds 200000"));
    }
}
