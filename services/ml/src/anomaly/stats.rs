//! The robust statistics the detector is built from. Every per-point quantity is causal: it looks only at the
//! point itself and earlier ones, so scoring a stream point by point gives what scoring the whole series gives.

/// Median of a slice (copied and sorted); 0 for an empty one.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 { sorted[middle] } else { (sorted[middle - 1] + sorted[middle]) / 2.0 }
}

/// The `q` quantile with linear interpolation between order statistics (numpy's default).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let position = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    sorted[below] + (sorted[above] - sorted[below]) * (position - below as f64)
}

/// Location and scale that a few outliers cannot move: the median, and 1.4826 × the median absolute deviation
/// (the standard deviation for normal data). Where most values are equal the MAD is 0: then 1.2533 × the mean
/// absolute deviation, and 1 if that is 0 too.
pub fn robust_location_scale(values: &[f64]) -> (f64, f64) {
    let location = median(values);
    let deviations: Vec<f64> = values.iter().map(|v| (v - location).abs()).collect();
    let mut scale = 1.4826 * median(&deviations);
    if scale <= 1e-12 {
        scale = 1.2533 * deviations.iter().sum::<f64>() / deviations.len().max(1) as f64;
    }
    if scale <= 1e-12 {
        scale = 1.0;
    }
    (location, scale)
}

/// `|x[i] − median(x[i−k..i])|`, the distance of each point from its recent past; 0 for the first `k` points.
pub fn trailing_median_residual(x: &[f64], k: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for i in k..x.len() {
        out[i] = (x[i] - median(&x[i - k..i])).abs();
    }
    out
}

/// Mean of each point and up to `s − 1` points before it.
pub fn trailing_mean(x: &[f64], s: usize) -> Vec<f64> {
    let s = s.max(1);
    let mut out = Vec::with_capacity(x.len());
    let mut sum = 0.0;
    for i in 0..x.len() {
        sum += x[i];
        if i >= s {
            sum -= x[i - s];
        }
        out.push(sum / (i + 1).min(s) as f64);
    }
    out
}

/// For each point, whether the `w` points ending at it exist and no step between them is longer than `max_gap`.
pub fn windows_without_gaps(times: &[f64], w: usize, max_gap: f64) -> Vec<bool> {
    let n = times.len();
    let mut gaps_before = vec![0usize; n];
    for i in 1..n {
        gaps_before[i] = gaps_before[i - 1] + usize::from(times[i] - times[i - 1] > max_gap);
    }
    (0..n).map(|i| i + 1 >= w && gaps_before[i] == gaps_before[i + 1 - w]).collect()
}

/// The longer of a day and a week that repeats in the training part (lag autocorrelation above `min_correlation`,
/// with `periods + 1` whole periods of training data: enough to look `periods` back and calibrate on one more), in
/// seconds; `None` when neither does.
pub fn seasonal_period(z_train: &[f64], step: f64, periods: usize, min_correlation: f64) -> Option<f64> {
    let n = z_train.len();
    if n == 0 {
        return None;
    }
    let mean = z_train.iter().sum::<f64>() / n as f64;
    let x: Vec<f64> = z_train.iter().map(|v| v - mean).collect();
    let energy: f64 = x.iter().map(|v| v * v).sum();
    if energy <= 0.0 {
        return None;
    }
    let mut found = None;
    for period in [86_400.0, 7.0 * 86_400.0] {
        let lag = (period / step).round() as usize;
        if lag < 2 || (periods + 1) * lag > n {
            continue;
        }
        let correlation: f64 = x[lag..].iter().zip(&x[..n - lag]).map(|(a, b)| a * b).sum::<f64>() / energy;
        if correlation > min_correlation {
            found = Some(period);
        }
    }
    found
}

/// `z[i]` minus the median of `z` at the same phase of the `periods` previous periods (the nearest point within
/// half a step of `t[i] − j·period`), over the references that exist; unavailable (None) with fewer than
/// `min_references`.
pub fn seasonal_residual(
    times: &[f64],
    z: &[f64],
    period: f64,
    periods: usize,
    min_references: usize,
    step: f64,
) -> Vec<Option<f64>> {
    let mut out = Vec::with_capacity(z.len());
    let mut references = Vec::with_capacity(periods);
    for i in 0..z.len() {
        references.clear();
        for j in 1..=periods {
            let target = times[i] - j as f64 * period;
            if target < times[0] - 0.5 * step {
                break;
            }
            let index = times.partition_point(|&t| t < target);
            let nearest = [index.saturating_sub(1), index.min(times.len() - 1)]
                .into_iter()
                .min_by(|&a, &b| (times[a] - target).abs().total_cmp(&(times[b] - target).abs()))
                .expect("two candidates");
            if (times[nearest] - target).abs() <= 0.5 * step {
                references.push(z[nearest]);
            }
        }
        out.push((references.len() >= min_references).then(|| z[i] - median(&references)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_match_their_definitions() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!((quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.9) - 4.6).abs() < 1e-12);
        let (location, scale) = robust_location_scale(&[1.0, 2.0, 3.0, 4.0, 100.0]);
        assert_eq!(location, 3.0);
        assert!((scale - 1.4826).abs() < 1e-9);
        assert_eq!(robust_location_scale(&[5.0; 10]), (5.0, 1.0));
        assert_eq!(trailing_mean(&[1.0, 3.0, 5.0], 2), vec![1.0, 2.0, 4.0]);
        assert_eq!(trailing_median_residual(&[1.0, 1.0, 1.0, 9.0], 3), vec![0.0, 0.0, 0.0, 8.0]);
        let valid = windows_without_gaps(&[0.0, 1.0, 2.0, 10.0, 11.0, 12.0], 3, 5.0);
        assert_eq!(valid, vec![false, false, true, false, false, true]);
    }

    #[test]
    fn a_daily_pattern_is_found_and_removed() {
        let step = 3600.0;
        let times: Vec<f64> = (0..24 * 30).map(|i| i as f64 * step).collect();
        let z: Vec<f64> = times.iter().map(|t| (t / 86_400.0 * std::f64::consts::TAU).sin()).collect();
        assert_eq!(seasonal_period(&z, step, 4, 0.5), Some(86_400.0));
        let residual = seasonal_residual(&times, &z, 86_400.0, 4, 3, step);
        assert!(residual[..72].iter().all(Option::is_none));
        assert!(residual[72..].iter().all(|r| r.unwrap().abs() < 1e-9));
    }
}
