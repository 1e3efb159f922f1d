//! Evaluation on the Numenta Anomaly Benchmark's format: a `timestamp,value` CSV and `combined_windows.json`
//! (labelled anomaly windows keyed by `<folder>/<file>.csv`). Scored by windows, as NAB intends: an event that
//! overlaps a window detects it (once), an event that overlaps none is a false positive. Windows that end inside
//! the training part cannot be detected and are reported apart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use smartfarm_core::{Error, Result};

use super::Detection;

/// Seconds in the 30-day month false positives are counted per.
const MONTH_SECONDS: f64 = 30.0 * 86_400.0;

/// A series read from a NAB CSV: times in seconds since 1970 (UTC), values; rows whose time does not increase are
/// dropped (NAB files repeat an hour at clock changes), and counted.
#[derive(Clone, Debug)]
pub struct NabSeries {
    /// Times, seconds since 1970.
    pub times: Vec<f64>,
    /// Values.
    pub values: Vec<f64>,
    /// Rows dropped because their time did not follow the previous row's.
    pub dropped_rows: usize,
}

/// Reads a `timestamp,value` CSV with a header line.
pub fn read_series(path: &Path) -> Result<NabSeries> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| Error::invalid("series", format!("cannot read {}: {error}", path.display())))?;
    let mut series = NabSeries { times: Vec::new(), values: Vec::new(), dropped_rows: 0 };
    for (number, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let row = number + 1;
        let (time, value) = line.split_once(',').ok_or_else(|| {
            Error::invalid("series", format!("{} line {row}: expected `timestamp,value`", path.display()))
        })?;
        let time = parse_time(time.trim()).ok_or_else(|| {
            Error::invalid(
                "series",
                format!("{} line {row}: {time:?} is not a `YYYY-MM-DD HH:MM:SS` time", path.display()),
            )
        })?;
        let value: f64 = value.trim().parse().map_err(|_| {
            Error::invalid("series", format!("{} line {row}: {value:?} is not a number", path.display()))
        })?;
        if series.times.last().is_some_and(|&last| time <= last) {
            series.dropped_rows += 1;
            continue;
        }
        series.times.push(time);
        series.values.push(value);
    }
    Ok(series)
}

/// The labelled windows of `file_name` (for example `nyc_taxi.csv`) in a `combined_windows.json`, as
/// (start, end) seconds; the key is matched on its file part, whatever folder it names.
pub fn read_windows(path: &Path, file_name: &str) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| Error::invalid("labels", format!("cannot read {}: {error}", path.display())))?;
    let all: BTreeMap<String, Vec<[String; 2]>> = serde_json::from_str(&text)
        .map_err(|error| Error::invalid("labels", format!("{} is not a NAB windows file: {error}", path.display())))?;
    let (_, windows) = all
        .iter()
        .find(|(key, _)| key.rsplit('/').next() == Some(file_name))
        .ok_or_else(|| Error::invalid("labels", format!("{} has no windows for {file_name}", path.display())))?;
    windows
        .iter()
        .map(|[start, end]| match (parse_time(start), parse_time(end)) {
            (Some(start), Some(end)) => Ok((start, end)),
            _ => Err(Error::invalid(
                "labels",
                format!("window [{start}, {end}] has a time that is not `YYYY-MM-DD HH:MM:SS`"),
            )),
        })
        .collect()
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` (or with a `T`) as seconds since 1970, UTC.
pub fn parse_time(text: &str) -> Option<f64> {
    let bytes = text.as_bytes();
    if bytes.len() < 19 || !matches!(bytes[10], b' ' | b'T') {
        return None;
    }
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let fraction = match text.get(19..) {
        Some("") | None => 0.0,
        Some(rest) if rest.starts_with('.') => format!("0{rest}").parse::<f64>().ok()?,
        Some(_) => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60 + second) as f64 + fraction)
}

/// How a detection did against labelled windows.
#[derive(Clone, Debug, Serialize)]
pub struct WindowReport {
    /// Labelled windows that end after the training part.
    pub windows_total: usize,
    /// Of those, the ones an event overlaps.
    pub windows_detected: usize,
    /// Windows that end inside the training part (not scored).
    pub windows_in_training: usize,
    /// Events that overlap no window.
    pub false_positive_events: usize,
    /// False-positive events per 30 days of scored data (after the training part).
    pub false_positives_per_month: f64,
    /// Per scored window, hours from its start to the first event overlapping it (negative: the event began
    /// before the window); `None` for a missed window.
    pub detection_delay_hours: Vec<Option<f64>>,
    /// Every event, as (start, end) times.
    pub events: Vec<(String, String)>,
    /// Days of data, and days scored.
    pub days: f64,
    /// Days after the training part.
    pub scored_days: f64,
}

/// Scores `detection` of a series with `times` against `windows` (seconds).
pub fn score_windows(times: &[f64], detection: &Detection, windows: &[(f64, f64)]) -> WindowReport {
    let scored_from = times[detection.training_points];
    let scored: Vec<(f64, f64)> = windows.iter().copied().filter(|&(_, end)| end >= scored_from).collect();
    let spans: Vec<(f64, f64)> = detection.events.iter().map(|e| (times[e.start], times[e.end])).collect();
    let mut hit = vec![false; spans.len()];
    let mut delays = Vec::new();
    for &(window_start, window_end) in &scored {
        let mut first: Option<f64> = None;
        for (k, &(start, end)) in spans.iter().enumerate() {
            if start <= window_end && end >= window_start {
                hit[k] = true;
                first.get_or_insert(start);
            }
        }
        delays.push(first.map(|start| (start - window_start) / 3600.0));
    }
    let false_positive_events = hit.iter().filter(|h| !**h).count();
    let scored_seconds = times[times.len() - 1] - scored_from;
    WindowReport {
        windows_total: scored.len(),
        windows_detected: delays.iter().filter(|d| d.is_some()).count(),
        windows_in_training: windows.len() - scored.len(),
        false_positive_events,
        false_positives_per_month: false_positive_events as f64 / (scored_seconds / MONTH_SECONDS).max(1e-9),
        detection_delay_hours: delays,
        events: spans.iter().map(|&(start, end)| (format_time(start), format_time(end))).collect(),
        days: (times[times.len() - 1] - times[0]) / 86_400.0,
        scored_days: scored_seconds / 86_400.0,
    }
}

/// Seconds since 1970 as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn format_time(seconds: f64) -> String {
    let total = seconds.floor() as i64;
    let days = total.div_euclid(86_400);
    let rest = total.rem_euclid(86_400);
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

impl WindowReport {
    /// The human-readable report.
    pub fn table(&self, name: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{name}: {:.1} days, {:.1} scored after the training part", self.days, self.scored_days);
        for (index, delay) in self.detection_delay_hours.iter().enumerate() {
            match delay {
                Some(hours) => {
                    let _ = writeln!(out, "  window {}: detected, first event {hours:+.1} h from its start", index + 1);
                }
                None => {
                    let _ = writeln!(out, "  window {}: MISSED", index + 1);
                }
            }
        }
        if self.windows_in_training > 0 {
            let _ = writeln!(
                out,
                "  ({} window(s) end inside the training part and are not scored)",
                self.windows_in_training
            );
        }
        for (start, end) in &self.events {
            let _ = writeln!(out, "  event {start} .. {end}");
        }
        let _ = writeln!(
            out,
            "windows detected {}/{}, missed {}, false-positive events {} ({:.2} per 30 days)",
            self.windows_detected,
            self.windows_total,
            self.windows_total - self.windows_detected,
            self.false_positive_events,
            self.false_positives_per_month
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anomaly::Event;

    #[test]
    fn times_round_trip() {
        let seconds = parse_time("2014-02-28 23:59:59").unwrap();
        assert_eq!(seconds, 1_393_631_999.0);
        assert_eq!(format_time(seconds), "2014-02-28 23:59:59");
        assert_eq!(parse_time("2014-03-01 00:00:00.500000").unwrap(), 1_393_632_000.5);
        assert_eq!(parse_time("1970-01-01T00:00:00"), Some(0.0));
        assert_eq!(parse_time("2014-13-01 00:00:00"), None);
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn windows_are_scored_once_and_other_events_are_false_positives() {
        let times: Vec<f64> = (0..100).map(|i| f64::from(i) * 3600.0).collect();
        let event = |start, end| Event { start, end, peak: start, peak_score: 5.0 };
        let detection = Detection {
            scores: vec![0.0; 100],
            threshold: 3.0,
            training_points: 10,
            seasonal_period: None,
            events: vec![event(20, 22), event(24, 25), event(60, 61)],
        };
        let windows = [(2.0 * 3600.0, 5.0 * 3600.0), (21.0 * 3600.0, 30.0 * 3600.0), (80.0 * 3600.0, 90.0 * 3600.0)];
        let report = score_windows(&times, &detection, &windows);
        assert_eq!(report.windows_in_training, 1);
        assert_eq!(report.windows_total, 2);
        assert_eq!(report.windows_detected, 1);
        assert_eq!(report.false_positive_events, 1);
        assert_eq!(report.detection_delay_hours, vec![Some(-1.0), None]);
    }
}
