//! Sensor anomaly detection. For one device's metric, the detector learns what normal looks like from the first
//! part of its history (a window autoencoder in Burn, and robust statistics: median/MAD scale, a trailing-median
//! baseline and, where the series repeats daily or weekly, a seasonal baseline), scores every reading, and turns
//! the scores into events with a start and an end (hysteresis, merging of close events), not one alarm per point.
//! `nab` evaluates it on Numenta Anomaly Benchmark series.

mod autoencoder;
pub mod nab;
pub mod stats;

use std::collections::BTreeMap;

use burn::module::Module as _;
use serde::{Deserialize, Serialize};

use smartfarm_core::{Error, Result};

pub use autoencoder::WindowAutoencoder;

/// The detector's constants. The defaults were chosen on NAB series (see `models/README.md`): the event
/// constants out of sample (leave one series out), the others by looking at all of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DetectorParams {
    /// Share of the series (its beginning) that teaches the detector what normal is; no events are raised in it.
    pub train_fraction: f64,
    /// A step longer than this many typical steps is a gap: no window spans it.
    pub max_gap_steps: f64,
    /// Standardised values are clipped to ± this.
    pub z_clip: f64,
    /// Points in one autoencoder window.
    pub window: usize,
    /// Width of the autoencoder's hidden layers.
    pub hidden: usize,
    /// Width of its code (bottleneck) layer.
    pub code: usize,
    /// Training passes over the windows.
    pub epochs: usize,
    /// Windows per training step.
    pub batch_size: usize,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Seed of the weights and the shuffles.
    pub seed: u64,
    /// The baseline compares each point with the median of this many before it.
    pub baseline_points: usize,
    /// Each score is divided by this quantile of its values in the training part.
    pub calibration_quantile: f64,
    /// The combined score is the trailing mean over this many points.
    pub smooth_points: usize,
    /// Whether to add the seasonal baseline when the training part repeats daily or weekly.
    pub seasonal: bool,
    /// Autocorrelation a period needs to count as seasonal.
    pub seasonal_min_correlation: f64,
    /// Periods back the seasonal baseline looks.
    pub seasonal_periods: usize,
    /// Of those, how many must exist for a point to get a seasonal score.
    pub seasonal_min_references: usize,
    /// The seasonal residual is averaged over this many points.
    pub seasonal_smooth_points: usize,
    /// An event starts when the combined score reaches this.
    pub threshold: f64,
    /// It ends when the score falls below this share of the threshold.
    pub hysteresis: f64,
    /// Events this many points apart or closer are one event.
    pub merge_gap_points: usize,
    /// Shorter events are dropped.
    pub min_event_points: usize,
}

impl Default for DetectorParams {
    fn default() -> Self {
        Self {
            train_fraction: 0.15,
            max_gap_steps: 6.0,
            z_clip: 10.0,
            window: 24,
            hidden: 16,
            code: 6,
            epochs: 40,
            batch_size: 64,
            learning_rate: 1e-3,
            seed: 0,
            baseline_points: 12,
            calibration_quantile: 0.99,
            smooth_points: 12,
            seasonal: true,
            seasonal_min_correlation: 0.5,
            seasonal_periods: 4,
            seasonal_min_references: 3,
            seasonal_smooth_points: 4,
            threshold: 3.0,
            hysteresis: 0.5,
            merge_gap_points: 12,
            min_event_points: 1,
        }
    }
}

/// Fewest points the training part may have.
pub const MIN_TRAINING_POINTS: usize = 100;

impl DetectorParams {
    /// Rejects constants the detector cannot run with.
    pub fn validate(&self) -> Result<()> {
        let field = "detector";
        let fail = |reason: &str| Err(Error::invalid(field, reason));
        if !(self.train_fraction > 0.0 && self.train_fraction < 1.0) {
            return fail("train_fraction must be above 0 and below 1");
        }
        if !(2..=1024).contains(&self.window) || self.hidden == 0 || self.code == 0 || self.batch_size == 0 {
            return fail("window must be 2 to 1024 points and the layer widths and batch size above 0");
        }
        if !(0.5..1.0).contains(&self.calibration_quantile) {
            return fail("calibration_quantile must be at least 0.5 and below 1");
        }
        if !(self.threshold > 0.0 && self.threshold.is_finite() && (0.0..=1.0).contains(&self.hysteresis)) {
            return fail("threshold must be positive and hysteresis between 0 and 1");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) || self.max_gap_steps < 1.0 || self.z_clip <= 0.0 {
            return fail("learning_rate must be in (0, 1), max_gap_steps at least 1 and z_clip positive");
        }
        if self.seasonal
            && (self.seasonal_periods == 0
                || self.seasonal_min_references == 0
                || self.seasonal_min_references > self.seasonal_periods)
        {
            return fail("seasonal_min_references must be 1 to seasonal_periods");
        }
        Ok(())
    }
}

/// A stretch of the series the detector judged anomalous, as point indices.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// First anomalous point.
    pub start: usize,
    /// Last anomalous point.
    pub end: usize,
    /// The point with the highest score.
    pub peak: usize,
    /// That score.
    pub peak_score: f64,
}

/// What the detector found in a series.
#[derive(Clone, Debug)]
pub struct Detection {
    /// One combined score per point (in units of the calibration quantile), in input order.
    pub scores: Vec<f64>,
    /// The score at which an event starts.
    pub threshold: f64,
    /// Points at the start used to learn normal; no events are raised there.
    pub training_points: usize,
    /// The seasonal period found in the training part, in seconds.
    pub seasonal_period: Option<f64>,
    /// The anomalous stretches, in time order.
    pub events: Vec<Event>,
}

/// Checks a series: equal lengths, finite values, strictly increasing times, not constant, long enough.
pub fn check_series(times: &[f64], values: &[f64], params: &DetectorParams) -> Result<()> {
    let field = "series";
    if values.is_empty() {
        return Err(Error::invalid(field, "is empty"));
    }
    if times.len() != values.len() {
        return Err(Error::invalid(field, format!("has {} times but {} values", times.len(), values.len())));
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            field,
            format!("value {index} is {} (NaN or infinite values cannot be scored)", values[index]),
        ));
    }
    if let Some(index) = times.windows(2).position(|pair| pair[1] <= pair[0] || !pair[1].is_finite()) {
        return Err(Error::invalid(
            field,
            format!("times must increase: point {} is not after point {index}", index + 1),
        ));
    }
    let needed = minimum_points(params);
    if values.len() < needed {
        return Err(Error::invalid(
            field,
            format!(
                "has {} points; the detector needs at least {needed} ({} to learn normal from, {:.0}% of the series)",
                values.len(),
                MIN_TRAINING_POINTS,
                params.train_fraction * 100.0
            ),
        ));
    }
    if values.iter().all(|v| *v == values[0]) {
        return Err(Error::invalid(
            field,
            format!("is constant ({} everywhere): there is no variation to learn normal from", values[0]),
        ));
    }
    // A constant learning part gives every later change an unbounded score (its spread is zero).
    let training = training_points(values.len(), params);
    if values[..training].iter().all(|v| *v == values[0]) {
        return Err(Error::invalid(
            field,
            format!(
                "its first {training} points, which the detector learns normal from ({:.0}% of the series), are \
                 constant ({}): there is no variation to learn normal from",
                params.train_fraction * 100.0,
                values[0]
            ),
        ));
    }
    Ok(())
}

/// How many points of a series of `len` the detector learns normal from.
fn training_points(len: usize, params: &DetectorParams) -> usize {
    (params.train_fraction * len as f64) as usize
}

/// The fewest points a series needs for its training part to have `MIN_TRAINING_POINTS` and a window.
pub fn minimum_points(params: &DetectorParams) -> usize {
    let training = MIN_TRAINING_POINTS.max(params.window * 2);
    (training as f64 / params.train_fraction).ceil() as usize
}

/// Learns normal from the beginning of the series and scores all of it. `times` are seconds (any origin),
/// strictly increasing; `training_device` must support autodiff.
pub fn detect(
    times: &[f64],
    values: &[f64],
    params: &DetectorParams,
    training_device: &burn::prelude::Device,
) -> Result<Detection> {
    params.validate()?;
    check_series(times, values, params)?;
    let training = training_points(values.len(), params);
    let detector = FittedDetector::fit(&times[..training], &values[..training], params, training_device)?;
    let scores = detector.score(times, values);
    let events = events(&scores, training, params);
    Ok(Detection {
        scores,
        threshold: params.threshold,
        training_points: training,
        seasonal_period: detector.seasonal_period,
        events,
    })
}

/// What the detector learned about one series: its scale, its autoencoder and how large each score normally is.
/// Scoring later readings with it (given enough earlier ones as context) needs no retraining.
#[derive(Debug)]
pub struct FittedDetector {
    params: DetectorParams,
    location: f64,
    scale: f64,
    step: f64,
    model: WindowAutoencoder,
    device: burn::prelude::Device,
    /// Divisors of the autoencoder, baseline and seasonal scores.
    divisors: [f64; 3],
    /// The seasonal period, seconds, when the training data repeats.
    pub seasonal_period: Option<f64>,
}

/// The scores of one series before calibration, and where each is defined.
struct RawScores {
    autoencoder: Vec<f64>,
    autoencoder_valid: Vec<bool>,
    baseline: Vec<f64>,
    seasonal: Option<(Vec<f64>, Vec<bool>)>,
}

impl FittedDetector {
    /// Learns normal from `times`/`values` (all of them are the training part).
    pub fn fit(
        times: &[f64],
        values: &[f64],
        params: &DetectorParams,
        training_device: &burn::prelude::Device,
    ) -> Result<Self> {
        params.validate()?;
        if values.len() < MIN_TRAINING_POINTS.max(params.window * 2) {
            return Err(Error::invalid(
                "series",
                format!("{} points are too few to learn normal from (at least {MIN_TRAINING_POINTS})", values.len()),
            ));
        }
        let mut steps: Vec<f64> = times.windows(2).map(|pair| pair[1] - pair[0]).collect();
        steps.sort_by(f64::total_cmp);
        let step = steps[steps.len() / 2];
        let (location, scale) = stats::robust_location_scale(values);
        let z: Vec<f64> =
            values.iter().map(|v| ((v - location) / scale).clamp(-params.z_clip, params.z_clip)).collect();
        let width = params.window;
        let valid = stats::windows_without_gaps(times, width, params.max_gap_steps * step);
        let mut windows = Vec::new();
        for end in (0..z.len()).filter(|&i| valid[i]) {
            windows.extend(z[end + 1 - width..=end].iter().map(|&v| v as f32));
        }
        if windows.len() / width < MIN_TRAINING_POINTS / 2 {
            return Err(Error::invalid("series", "its training part has too few gap-free windows to learn from"));
        }
        let device = training_device.clone().inner();
        let model = WindowAutoencoder::train(&windows, params, training_device).to_device(&device);
        let seasonal_period = if params.seasonal {
            stats::seasonal_period(&z, step, params.seasonal_min_references, params.seasonal_min_correlation)
        } else {
            None
        };
        let mut detector = FittedDetector {
            params: params.clone(),
            location,
            scale,
            step,
            model,
            device,
            divisors: [1.0; 3],
            seasonal_period,
        };
        // Calibrate: each score's quantile over the training data is its unit.
        let raw = detector.raw_scores(times, values);
        let quantile = |scores: &[f64], valid: &[bool]| {
            let kept: Vec<f64> = scores.iter().zip(valid).filter(|(_, ok)| **ok).map(|(v, _)| *v).collect();
            (kept.len(), stats::quantile(&kept, params.calibration_quantile).max(1e-9))
        };
        detector.divisors[0] = quantile(&raw.autoencoder, &raw.autoencoder_valid).1;
        detector.divisors[1] = quantile(&raw.baseline, &vec![true; values.len()]).1;
        if let Some((seasonal, available)) = &raw.seasonal {
            let (count, divisor) = quantile(seasonal, available);
            if count >= MIN_TRAINING_POINTS {
                detector.divisors[2] = divisor;
            } else {
                detector.seasonal_period = None;
            }
        }
        Ok(detector)
    }

    /// The detector's constants.
    pub fn params(&self) -> &DetectorParams {
        &self.params
    }

    /// Points of context a score needs before the first point to be scored: a window, the baseline, the smoothing
    /// and, for a seasonal series, the periods it looks back (as a duration, in seconds).
    pub fn context_seconds(&self) -> f64 {
        let points = (self.params.window + self.params.baseline_points + self.params.smooth_points) as f64 * self.step;
        let seasonal =
            self.seasonal_period.map_or(0.0, |period| period * self.params.seasonal_periods as f64 + self.step);
        points.max(seasonal)
    }

    /// One combined score per point (causal: each depends on the point and earlier ones only).
    pub fn score(&self, times: &[f64], values: &[f64]) -> Vec<f64> {
        let raw = self.raw_scores(times, values);
        let n = values.len();
        let combined: Vec<f64> = (0..n)
            .map(|i| {
                let mut score = (raw.autoencoder[i] / self.divisors[0]).max(raw.baseline[i] / self.divisors[1]);
                if let Some((seasonal, _)) = &raw.seasonal {
                    score = score.max(seasonal[i] / self.divisors[2]);
                }
                score
            })
            .collect();
        stats::trailing_mean(&combined, self.params.smooth_points)
    }

    fn raw_scores(&self, times: &[f64], values: &[f64]) -> RawScores {
        let params = &self.params;
        let n = values.len();
        let max_gap = params.max_gap_steps * self.step;
        let z: Vec<f64> =
            values.iter().map(|v| ((v - self.location) / self.scale).clamp(-params.z_clip, params.z_clip)).collect();

        // Autoencoder over the windows without gaps: the error of the window ending at a point is its score.
        let width = params.window;
        let autoencoder_valid = stats::windows_without_gaps(times, width, max_gap);
        let ends: Vec<usize> = (0..n).filter(|&i| autoencoder_valid[i]).collect();
        let mut windows = Vec::with_capacity(ends.len() * width);
        for &end in &ends {
            windows.extend(z[end + 1 - width..=end].iter().map(|&v| v as f32));
        }
        let mut autoencoder = vec![0.0; n];
        for (&end, error) in ends.iter().zip(self.model.reconstruction_errors(&windows, width, &self.device)) {
            autoencoder[end] = error;
        }

        // Robust baseline: distance from the recent median; nothing right after a gap.
        let mut baseline = stats::trailing_median_residual(&z, params.baseline_points);
        for i in 1..n {
            if times[i] - times[i - 1] > max_gap {
                baseline[i] = 0.0;
            }
        }

        // Seasonal baseline where the training data repeats daily or weekly.
        let seasonal = self.seasonal_period.map(|period| {
            let residual = stats::seasonal_residual(
                times,
                &z,
                period,
                params.seasonal_periods,
                params.seasonal_min_references,
                self.step,
            );
            let available: Vec<bool> = residual.iter().map(Option::is_some).collect();
            let signed: Vec<f64> = residual.iter().map(|r| r.unwrap_or(0.0)).collect();
            let scores = stats::trailing_mean(&signed, params.seasonal_smooth_points)
                .iter()
                .zip(&available)
                .map(|(v, ok)| if *ok { v.abs() } else { 0.0 })
                .collect();
            (scores, available)
        });
        RawScores { autoencoder, autoencoder_valid, baseline, seasonal }
    }
}

/// Events from scores, from point `from` on: an event starts when the score reaches the threshold and ends at the
/// last point before it falls below `hysteresis × threshold`; events at most `merge_gap_points` apart merge, and
/// ones shorter than `min_event_points` are dropped.
pub fn events(scores: &[f64], from: usize, params: &DetectorParams) -> Vec<Event> {
    let enter = params.threshold;
    let leave = params.hysteresis * params.threshold;
    let mut raw: Vec<(usize, usize)> = Vec::new();
    let mut open: Option<usize> = None;
    for (i, &score) in scores.iter().enumerate().skip(from) {
        match open {
            None if score >= enter => open = Some(i),
            Some(start) if score < leave => {
                raw.push((start, i - 1));
                open = None;
            }
            _ => {}
        }
    }
    if let Some(start) = open {
        raw.push((start, scores.len() - 1));
    }
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (start, end) in raw {
        match merged.last_mut() {
            Some(last) if start - last.1 - 1 <= params.merge_gap_points => last.1 = end,
            _ => merged.push((start, end)),
        }
    }
    merged
        .into_iter()
        .filter(|(start, end)| end - start + 1 >= params.min_event_points)
        .map(|(start, end)| {
            let peak = (start..=end).max_by(|&a, &b| scores[a].total_cmp(&scores[b])).expect("events are not empty");
            Event { start, end, peak, peak_score: scores[peak] }
        })
        .collect()
}

/// The anomaly detector's model file: a safetensors file with no tensors (each device and metric trains its own
/// weights) and the card, which holds the detector's constants.
pub fn model_file(card: &crate::artifact::ModelCard) -> Result<Vec<u8>> {
    card.validate()?;
    if !matches!(card.architecture, crate::artifact::Architecture::WindowAutoencoder { .. }) {
        return Err(Error::invalid("model card", "an anomaly model's network is the window autoencoder"));
    }
    let mut metadata = BTreeMap::new();
    metadata.insert(crate::artifact::CARD_KEY.to_string(), crate::artifact::card_json(card));
    let mut header =
        serde_json::to_vec(&serde_json::json!({ "__metadata__": metadata })).expect("the header serializes");
    // safetensors pads the header with spaces to a multiple of 8 bytes.
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    Ok(bytes)
}

/// The constants of an anomaly model file.
pub fn params_of(card: &crate::artifact::ModelCard) -> Result<DetectorParams> {
    match &card.architecture {
        crate::artifact::Architecture::WindowAutoencoder { params } => Ok(params.clone()),
        other => Err(Error::invalid(
            "model",
            format!("{} is a {other:?} network, not an anomaly detector", card.reference()),
        )),
    }
}

/// The card of the built-in detector (the default constants), for when no model file is given.
pub fn default_card() -> crate::artifact::ModelCard {
    crate::artifact::ModelCard {
        name: "window-autoencoder".into(),
        version: "1".into(),
        kind: crate::artifact::ModelKind::SensorAnomaly,
        architecture: crate::artifact::Architecture::WindowAutoencoder { params: DetectorParams::default() },
        input: None,
        class_labels: Vec::new(),
        metrics: BTreeMap::new(),
        provenance: BTreeMap::from([("constants".to_string(), "chosen on the NAB realKnownCause series".to_string())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> DetectorParams {
        DetectorParams { epochs: 5, ..DetectorParams::default() }
    }

    #[test]
    fn an_anomaly_model_file_holds_its_constants() {
        let mut card = default_card();
        if let crate::artifact::Architecture::WindowAutoencoder { params } = &mut card.architecture {
            params.threshold = 4.5;
        }
        let bytes = model_file(&card).unwrap();
        let read = crate::artifact::read_card(&bytes).unwrap();
        assert_eq!(read, card);
        assert_eq!(params_of(&read).unwrap().threshold, 4.5);
    }

    #[test]
    fn events_use_hysteresis_and_merge_close_ones() {
        let p = DetectorParams {
            threshold: 2.0,
            hysteresis: 0.5,
            merge_gap_points: 2,
            min_event_points: 1,
            ..DetectorParams::default()
        };
        let scores = [0.0, 3.0, 1.5, 0.5, 0.0, 2.5, 0.0, 0.0, 0.0, 0.0, 4.0];
        let found: Vec<(usize, usize)> = events(&scores, 0, &p).iter().map(|e| (e.start, e.end)).collect();
        assert_eq!(found, vec![(1, 5), (10, 10)]);
        assert_eq!(events(&scores, 0, &p)[0].peak, 1);
        assert!(events(&scores, 11, &p).is_empty(), "nothing is raised in the training part");
    }

    #[test]
    fn bad_series_get_clear_errors() {
        let device = crate::training_device();
        let p = params();
        let times: Vec<f64> = (0..1000).map(f64::from).collect();
        let error = |values: &[f64], times: &[f64]| detect(times, values, &p, &device).unwrap_err().to_string();
        assert!(error(&[], &[]).contains("is empty"));
        let mut with_nan = vec![1.0; 1000];
        with_nan[7] = f64::NAN;
        with_nan[8] = 2.0;
        assert!(error(&with_nan, &times).contains("value 7 is NaN"));
        assert!(error(&vec![4.5; 1000], &times).contains("is constant (4.5 everywhere)"));
        let flat_then_varying: Vec<f64> =
            (0..1000).map(|i| if i < 300 { 0.0 } else { (i as f64 / 9.0).sin() }).collect();
        let flat_start = error(&flat_then_varying, &times);
        assert!(
            flat_start.contains("which the detector learns normal from") && flat_start.contains("are constant (0)")
        );
        assert!(error(&[1.0, 2.0, 3.0], &times[..3]).contains("the detector needs at least"));
        let mut backwards = times.clone();
        backwards[10] = 3.0;
        let varying: Vec<f64> = (0..1000).map(|i| f64::from(i % 7)).collect();
        assert!(error(&varying, &backwards).contains("times must increase: point 10"));
    }

    #[test]
    fn a_spike_in_a_noisy_sine_is_one_event() {
        let device = crate::training_device();
        let n = 2000;
        let mut state = 12345u64;
        let mut noise = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let times: Vec<f64> = (0..n).map(|i| i as f64 * 300.0).collect();
        let mut values: Vec<f64> = (0..n).map(|i| 20.0 + 3.0 * (i as f64 / 40.0).sin() + 0.2 * noise()).collect();
        for value in &mut values[1500..1520] {
            *value += 15.0;
        }
        let detection = detect(&times, &values, &params(), &device).unwrap();
        assert_eq!(detection.training_points, 300);
        assert_eq!(detection.events.len(), 1, "{:?}", detection.events);
        let event = &detection.events[0];
        assert!(event.start >= 1495 && event.start <= 1505, "{event:?}");
        assert!(event.peak_score > detection.threshold);
    }
}
