//! `smartfarm train` and `smartfarm eval`: train the plant-disease model on a folder of class subfolders, and
//! evaluate a disease model on labelled photos or the anomaly detector on NAB-format series. Each prints a
//! human-readable report and, as its last line, one JSON object.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use smartfarm_ml::anomaly::{self, nab};
use smartfarm_ml::artifact::{self, ModelKind};
use smartfarm_ml::disease::dataset::LabelledFolder;
use smartfarm_ml::disease::{self, DiseaseClassifier, evaluate, train};

#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Train a plant-disease classifier (LeafNet) on DIR/<class>/<photo> and write the model file.
    Disease(TrainDiseaseArgs),
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Classify labelled photos (DIR/<class>/<photo>): per-class recall, accuracy, confusion matrix.
    Disease(EvalDiseaseArgs),
    /// Run the anomaly detector on NAB-format series and score it against labelled windows.
    Anomaly(EvalAnomalyArgs),
}

#[derive(Debug, Args)]
pub struct TrainDiseaseArgs {
    /// Folder with one subfolder of photos per class (the subfolder's name is the label).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Where to write the model file (safetensors with the model card in its metadata).
    #[arg(long, value_name = "MODEL")]
    pub out: PathBuf,
    /// The model's name.
    #[arg(long, default_value = "leafnet")]
    pub name: String,
    /// The model's version.
    #[arg(long, default_value = "1")]
    pub model_version: String,
    /// Input side in pixels (photos are scaled to it).
    #[arg(long, default_value_t = 64)]
    pub input_size: u32,
    /// Most epochs.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Stop after this many epochs without a better validation score.
    #[arg(long, default_value_t = 8)]
    pub patience: usize,
    /// Share of each class held out for validation.
    #[arg(long, default_value_t = 0.15)]
    pub validation_fraction: f64,
    /// Seed of the split, shuffles, augmentation and initial weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Train without augmentation (faster; for quick checks).
    #[arg(long)]
    pub no_augment: bool,
}

#[derive(Debug, Args)]
pub struct EvalDiseaseArgs {
    /// A plant-disease model file (default: the model shipped in the binary).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<PathBuf>,
    /// Folder with one subfolder of photos per class, named as the model's classes.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
}

#[derive(Debug, Args)]
pub struct EvalAnomalyArgs {
    /// An anomaly model file (default: the built-in detector constants).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<PathBuf>,
    /// A `timestamp,value` CSV (repeat the flag for several series; the JSON then also has the totals).
    #[arg(long = "series", value_name = "CSV", required = true)]
    pub series: Vec<PathBuf>,
    /// NAB's combined_windows.json (keys `<folder>/<file>.csv`).
    #[arg(long, value_name = "JSON")]
    pub labels: PathBuf,
}

pub fn train(command: TrainCommand) -> anyhow::Result<()> {
    let TrainCommand::Disease(args) = command;
    let folder = LabelledFolder::scan(&args.data)?;
    let counts = folder.counts();
    println!(
        "training on {} photos in {} classes from {}",
        folder.photos.len(),
        folder.classes.len(),
        args.data.display()
    );
    for (class, count) in folder.classes.iter().zip(&counts) {
        println!("  {count:>6}  {class}");
    }
    let options = train::TrainOptions {
        name: args.name,
        version: args.model_version,
        input_size: args.input_size,
        max_epochs: args.epochs,
        patience: args.patience,
        validation_fraction: args.validation_fraction,
        seed: args.seed,
        augment: !args.no_augment,
        ..train::TrainOptions::default()
    };
    let started = std::time::Instant::now();
    let trained = train::train(&folder, &options, &smartfarm_ml::training_device(), |epoch| {
        println!(
            "epoch {:>3}: loss {:.4}, train accuracy {:.4}, validation accuracy {:.4}, lowest class recall {:.4}{} ({:.1} s)",
            epoch.epoch,
            epoch.train_loss,
            epoch.train_accuracy,
            epoch.validation_accuracy,
            epoch.validation_min_recall,
            if epoch.best { ", best so far" } else { "" },
            epoch.seconds
        );
    })?;
    let bytes = trained.classifier.to_model_file()?;
    write_file(&args.out, &bytes)?;
    let card = trained.classifier.card();
    println!("wrote {} ({} bytes) in {:.0} s", args.out.display(), bytes.len(), started.elapsed().as_secs_f64());
    println!(
        "{}",
        serde_json::json!({ "model": card.reference(), "out": args.out, "bytes": bytes.len(), "metrics": card.metrics })
    );
    Ok(())
}

pub fn eval(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::Disease(args) => eval_disease(args),
        EvalCommand::Anomaly(args) => eval_anomaly(args),
    }
}

fn eval_disease(args: EvalDiseaseArgs) -> anyhow::Result<()> {
    let device = smartfarm_ml::inference_device();
    let classifier = match &args.model {
        Some(path) => DiseaseClassifier::from_model_file(&read_model(path)?, &device)?,
        None => DiseaseClassifier::from_model_file(disease::DEFAULT_MODEL, &device)?,
    };
    let folder = LabelledFolder::scan(&args.data)?;
    let started = std::time::Instant::now();
    let report = evaluate::evaluate(&classifier, &folder)?;
    print!("{}", report.table());
    println!(
        "({:.1} s, {:.0} photos/s)",
        started.elapsed().as_secs_f64(),
        report.photos as f64 / started.elapsed().as_secs_f64()
    );
    println!("{}", report.json());
    Ok(())
}

fn eval_anomaly(args: EvalAnomalyArgs) -> anyhow::Result<()> {
    let card = match &args.model {
        Some(path) => {
            let card = artifact::read_card(&read_model(path)?)?;
            anyhow::ensure!(
                card.kind == ModelKind::SensorAnomaly,
                "{} is a {} model, not a sensor-anomaly one",
                path.display(),
                card.kind.as_str()
            );
            card
        }
        None => anomaly::default_card(),
    };
    let params = anomaly::params_of(&card)?;
    let device = smartfarm_ml::training_device();
    let mut results = Vec::new();
    let (mut detected, mut total, mut false_positives, mut scored_days, mut readings, mut seconds) =
        (0, 0, 0, 0.0, 0, 0.0);
    for path in &args.series {
        let file_name = path.file_name().and_then(|n| n.to_str()).context("the series path has no file name")?;
        let series = nab::read_series(path)?;
        let windows = nab::read_windows(&args.labels, file_name)?;
        let started = std::time::Instant::now();
        let detection = anomaly::detect(&series.times, &series.values, &params, &device)?;
        let elapsed = started.elapsed().as_secs_f64();
        let report = nab::score_windows(&series.times, &detection, &windows);
        print!("{}", report.table(file_name));
        println!(
            "  ({} readings learned from and scored in {elapsed:.2} s{}{})",
            series.values.len(),
            detection.seasonal_period.map(|p| format!(", seasonal period {} h", p / 3600.0)).unwrap_or_default(),
            if series.dropped_rows > 0 {
                format!(", {} rows with repeated times dropped", series.dropped_rows)
            } else {
                String::new()
            }
        );
        detected += report.windows_detected;
        total += report.windows_total;
        false_positives += report.false_positive_events;
        scored_days += report.scored_days;
        readings += series.values.len();
        seconds += elapsed;
        results.push(serde_json::json!({ "series": file_name, "report": report }));
    }
    let per_month = false_positives as f64 / (scored_days / 30.0).max(1e-9);
    println!(
        "model {}: windows detected {detected}/{total}, false-positive events {false_positives} ({per_month:.2} per 30 days), {:.0} readings/s learned and scored",
        card.reference(),
        readings as f64 / seconds.max(1e-9)
    );
    let mut summary = serde_json::json!({
        "model": card.reference(),
        "windows_detected": detected,
        "windows_total": total,
        "windows_missed": total - detected,
        "false_positive_events": false_positives,
        "false_positives_per_month": per_month,
        "readings_per_second": readings as f64 / seconds.max(1e-9),
    });
    if let [only] = results.as_slice() {
        let report = &only["report"];
        summary["detection_delay_hours"] = report["detection_delay_hours"].clone();
        summary["events"] = report["events"].clone();
    } else {
        summary["series"] = serde_json::Value::Array(results);
    }
    println!("{summary}");
    Ok(())
}

fn read_model(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the model file {}", path.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
