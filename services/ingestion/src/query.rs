//! `TelemetryService`: raw readings, buckets and latest values of one farm, for API keys of that farm (or admins).

use std::time::Duration;

use base64::Engine as _;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use smartfarm_core::paging::page_size;
use smartfarm_core::time::{from_unix_micros, to_timestamp, to_unix_micros};
use smartfarm_core::{Error, Principal, Result, validate};
use smartfarm_proto::common::v1 as common;
use smartfarm_proto::ingestion::v1 as pb;
use smartfarm_proto::ingestion::v1::telemetry_service_server::TelemetryService;
use smartfarm_store::telemetry::{ReadingCursor, ReadingFilter, StoredReading};

use crate::IngestionApi;

/// Readings per page by default, and at most.
const DEFAULT_READINGS_PAGE: usize = 1000;
const MAX_READINGS_PAGE: usize = 10_000;
/// The most buckets one aggregate query may ask for per device and metric.
const MAX_BUCKETS: u64 = 100_000;
/// The most buckets one aggregate response may hold (about 12 MB), over all devices and metrics.
const MAX_RESPONSE_BUCKETS: u64 = 100_000;
/// The widest bucket: beyond it, leave the width unset for one bucket over the whole range.
const MAX_BUCKET_WIDTH_SECS: i64 = 100 * 366 * 24 * 3600;
/// The most devices or metrics one query may name.
const MAX_FILTER_VALUES: usize = 1000;

fn reading(reading: StoredReading) -> common::Reading {
    common::Reading {
        device_id: reading.device_id.to_string(),
        metric: reading.metric,
        value: reading.value,
        measure_time: Some(to_timestamp(reading.measure_time)),
        receive_time: Some(to_timestamp(reading.receive_time)),
    }
}

/// Checks the common parts of a query: the caller may read the farm, and the filters are well-formed.
fn filter(
    principal: &Principal,
    farm_id: &str,
    device_ids: &[String],
    metrics: &[String],
    range: Option<&common::TimeRange>,
) -> Result<ReadingFilter> {
    let farm_id = validate::id("farm_id", farm_id)?;
    principal.authorize_farm(farm_id)?;
    if device_ids.len() > MAX_FILTER_VALUES || metrics.len() > MAX_FILTER_VALUES {
        return Err(Error::invalid("device_ids", format!("at most {MAX_FILTER_VALUES} devices and metrics per query")));
    }
    let device_ids = device_ids.iter().map(|id| validate::id("device_ids", id)).collect::<Result<Vec<Uuid>>>()?;
    let metrics = metrics.iter().map(|name| validate::metric_name("metrics", name)).collect::<Result<Vec<_>>>()?;
    let (start, end) = smartfarm_core::time::required_range(range)?;
    Ok(ReadingFilter { farm_id, device_ids, metrics, start, end })
}

/// Page tokens carry the cursor and a fingerprint of the filters they were issued for.
fn fingerprint(filter: &ReadingFilter) -> String {
    format!(
        "{}|{:?}|{:?}|{}|{}",
        filter.farm_id,
        filter.device_ids,
        filter.metrics,
        to_unix_micros(filter.start),
        to_unix_micros(filter.end)
    )
}

fn encode_cursor(cursor: &ReadingCursor, filter: &ReadingFilter) -> String {
    let raw = format!(
        "{}|{}|{}|{}|{}",
        smartfarm_core::credential::hash(&fingerprint(filter)).get(..12).unwrap_or_default(),
        to_unix_micros(cursor.measure_time),
        cursor.device_id,
        cursor.metric,
        cursor.sequence
    );
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(token: &str, filter: &ReadingFilter) -> Result<ReadingCursor> {
    let invalid = || Error::invalid("page_token", "is not a token this query returned");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let parts: Vec<&str> = raw.split('|').collect();
    let [print, micros, device, metric, sequence] = parts.as_slice() else { return Err(invalid()) };
    if smartfarm_core::credential::hash(&fingerprint(filter)).get(..12) != Some(*print) {
        return Err(Error::invalid("page_token", "was issued for different filters"));
    }
    Ok(ReadingCursor {
        measure_time: from_unix_micros(micros.parse().map_err(|_| invalid())?),
        device_id: Uuid::try_parse(device).map_err(|_| invalid())?,
        metric: metric.to_string(),
        sequence: sequence.parse().map_err(|_| invalid())?,
    })
}

#[tonic::async_trait]
impl TelemetryService for IngestionApi {
    async fn query_readings(
        &self,
        request: Request<pb::QueryReadingsRequest>,
    ) -> Result<Response<pb::QueryReadingsResponse>, Status> {
        let principal = Principal::of(&request)?;
        let message = request.get_ref();
        let filter =
            filter(&principal, &message.farm_id, &message.device_ids, &message.metrics, message.time_range.as_ref())?;
        let size = page_size(message.page_size, DEFAULT_READINGS_PAGE, MAX_READINGS_PAGE)?;
        let cursor =
            if message.page_token.is_empty() { None } else { Some(decode_cursor(&message.page_token, &filter)?) };
        let mut readings = self.telemetry.query_readings(&filter, cursor.as_ref(), size + 1).await?;
        let next_page_token = if readings.len() > size {
            readings.truncate(size);
            readings.last().map(|last| encode_cursor(&ReadingCursor::after(last), &filter)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::QueryReadingsResponse {
            readings: readings.into_iter().map(reading).collect(),
            next_page_token,
        }))
    }

    async fn query_aggregates(
        &self,
        request: Request<pb::QueryAggregatesRequest>,
    ) -> Result<Response<pb::QueryAggregatesResponse>, Status> {
        let principal = Principal::of(&request)?;
        let message = request.get_ref();
        let filter =
            filter(&principal, &message.farm_id, &message.device_ids, &message.metrics, message.time_range.as_ref())?;
        let width = match &message.bucket_width {
            None => None,
            Some(width) if width.seconds == 0 && width.nanos == 0 => None,
            Some(width) if width.seconds < 1 || width.nanos != 0 => {
                return Err(Error::invalid("bucket_width", "must be a whole number of seconds, at least 1s").into());
            }
            Some(width) if width.seconds > MAX_BUCKET_WIDTH_SECS => {
                return Err(Error::invalid(
                    "bucket_width",
                    "must be at most 100 years; leave it unset for one bucket over the whole range",
                )
                .into());
            }
            Some(width) => Some(Duration::from_secs(width.seconds as u64)),
        };
        if let Some(width) = width {
            let span = filter.end.duration_since(filter.start).unwrap_or_default();
            if span.as_secs() / width.as_secs() > MAX_BUCKETS {
                return Err(Error::invalid(
                    "bucket_width",
                    format!("is too small for the range: at most {MAX_BUCKETS} buckets per device and metric"),
                )
                .into());
            }
        }
        // An estimate before the work: the series the farm has (one latest value per device and metric) times the
        // buckets of one series.
        let span = filter.end.duration_since(filter.start).unwrap_or_default();
        let per_series = width.map(|width| span.as_secs() / width.as_secs() + 1).unwrap_or(1);
        let series = self
            .telemetry
            .latest_readings(filter.farm_id, &filter.device_ids)
            .await?
            .iter()
            .filter(|latest| filter.metrics.is_empty() || filter.metrics.contains(&latest.metric))
            .count() as u64;
        let too_many = |covered: String| {
            Error::invalid(
                "bucket_width",
                format!(
                    "the query covers {covered}, more than the {MAX_RESPONSE_BUCKETS} a response holds: narrow the \
                     time range, name devices or metrics, or widen the buckets"
                ),
            )
        };
        if series.saturating_mul(per_series) > MAX_RESPONSE_BUCKETS {
            return Err(too_many(format!("up to {} buckets", series.saturating_mul(per_series))).into());
        }
        // The estimate counts series with raw readings only; the store's limit holds for the rest (a farm that
        // uploads only aggregates).
        let limit = MAX_RESPONSE_BUCKETS as usize;
        let Some(buckets) = self.telemetry.query_buckets(&filter, width, &self.settings.rollup_widths, limit).await?
        else {
            return Err(too_many("more buckets".into()).into());
        };
        Ok(Response::new(pb::QueryAggregatesResponse {
            buckets: buckets
                .into_iter()
                .map(|bucket| pb::AggregateBucket {
                    device_id: bucket.device_id.to_string(),
                    metric: bucket.metric,
                    start_time: Some(to_timestamp(bucket.start)),
                    end_time: Some(to_timestamp(bucket.end)),
                    count: bucket.count,
                    min: bucket.min,
                    max: bucket.max,
                    avg: bucket.avg,
                })
                .collect(),
        }))
    }

    async fn get_latest_readings(
        &self,
        request: Request<pb::GetLatestReadingsRequest>,
    ) -> Result<Response<pb::GetLatestReadingsResponse>, Status> {
        let principal = Principal::of(&request)?;
        let message = request.get_ref();
        let farm_id = validate::id("farm_id", &message.farm_id)?;
        principal.authorize_farm(farm_id)?;
        if message.device_ids.len() > MAX_FILTER_VALUES {
            return Err(Error::invalid("device_ids", format!("at most {MAX_FILTER_VALUES} devices per query")).into());
        }
        let device_ids =
            message.device_ids.iter().map(|id| validate::id("device_ids", id)).collect::<Result<Vec<Uuid>>>()?;
        let readings = self.telemetry.latest_readings(farm_id, &device_ids).await?;
        Ok(Response::new(pb::GetLatestReadingsResponse { readings: readings.into_iter().map(reading).collect() }))
    }
}
