//! Logs and metrics set-up for every smartfarm process: tracing with a text or JSON formatter, and a Prometheus
//! recorder whose rendering is served on `/metrics`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::error::{Error, Result};

/// Installs the global tracing subscriber. `filter` uses tracing-subscriber's syntax; `SMARTFARM_LOG` or
/// `RUST_LOG`, when set, win over it. Calling it twice is harmless (the second call does nothing).
pub fn init_tracing(format: LogFormat, filter: &str) -> Result<()> {
    let filter = std::env::var("SMARTFARM_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or(filter.to_string());
    let filter = EnvFilter::try_new(&filter)
        .map_err(|error| Error::invalid("log_level", format!("{filter:?} is not a log filter: {error}")))?;
    // Colours only for a person at a terminal; files and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _already_installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    Ok(())
}

/// Latency buckets (seconds) for request histograms: from 0.5 ms to 30 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Installs the global Prometheus recorder and returns the handle that renders `/metrics`. Only the first call in
/// a process installs; later calls get a fresh handle that renders nothing, which keeps in-process tests working.
pub fn init_metrics() -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), LATENCY_BUCKETS)
        .expect("the bucket list is not empty");
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    let _already_installed = metrics::set_global_recorder(recorder);
    handle
}
