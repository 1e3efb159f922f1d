//! The inference benchmark: the pretrained MobileNetV3-style network (the same weights) run by Burn on this
//! machine's CPU and by ONNX Runtime (the `onnxruntime` Python package, `scripts/ort_bench.py`) on the same
//! preprocessed photos, at batch 1 and 32, in one run: p50/p99 latency and images/s, the latency ratio, and how
//! far the two outputs are apart. Then smartfarm's default LeafNet at the same batch sizes, and the anomaly
//! detector's throughput (readings/s learned from, and scored with an already fitted detector).
//!
//! `cargo bench -p smartfarm-ml --bench inference -- [--photos DIR] [--count N] [--series CSV] [--python PY]`
//! (`scripts/bench.sh` runs it with ONNX Runtime installed into `.tools/ort`). The last line is one JSON object.

// The allocator the smartfarm binary serves with (see the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use smartfarm_ml::anomaly::{self, DetectorParams, FittedDetector, nab};
use smartfarm_ml::artifact::{Architecture, ModelCard, ModelKind};
use smartfarm_ml::disease::dataset::LabelledFolder;
use smartfarm_ml::disease::evaluate::argmax;
use smartfarm_ml::disease::{DEFAULT_MODEL, DiseaseClassifier};
use smartfarm_ml::preprocess::{self, IMAGENET_MEAN, IMAGENET_STD, InputSpec, Resize};

fn main() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut photos_dir = fixtures.join("plants");
    let mut count = 32usize;
    let mut series_path = fixtures.join("nab/ec2_request_latency_system_failure.csv");
    let mut python = "python3".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--photos" => photos_dir = PathBuf::from(args.next().expect("--photos DIR")),
            "--count" => count = args.next().expect("--count N").parse().expect("a number"),
            "--series" => series_path = PathBuf::from(args.next().expect("--series CSV")),
            "--python" => python = args.next().expect("--python PY"),
            "--bench" => {}
            other => panic!("unknown argument {other} (expected --photos, --count, --series, --python)"),
        }
    }
    let machine = machine();
    println!("machine: {machine}");

    // The same photos for both: preprocessed once here, written as the raw tensor ONNX Runtime reads.
    let folder = LabelledFolder::scan(&photos_dir).expect("a folder of class subfolders");
    let photos = round_robin(&folder, count);
    let mobilenet_spec = InputSpec {
        size: 224,
        resize: Resize::ShorterSideThenCenterCrop { shorter_side: 256 },
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    };
    let decoded: Vec<image::RgbImage> =
        photos.iter().map(|path| preprocess::decode_photo("photo", &std::fs::read(path).unwrap()).unwrap()).collect();
    let inputs: Vec<Vec<f32>> = decoded.iter().map(|photo| preprocess::model_input(photo, &mobilenet_spec)).collect();
    let work = tempfile::tempdir().unwrap();
    let input_file = work.path().join("input.f32");
    let bytes: Vec<u8> = inputs.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&input_file, bytes).unwrap();

    let device = smartfarm_ml::inference_device();
    let labels: Vec<String> = std::fs::read_to_string(fixtures.join("mobilenetv3lite/classes.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let card = ModelCard {
        name: "plantvillage-mobilenetv3-lite".into(),
        version: "upstream".into(),
        kind: ModelKind::PlantDisease,
        architecture: Architecture::MobileNetV3Lite,
        input: Some(mobilenet_spec),
        class_labels: labels,
        metrics: BTreeMap::new(),
        provenance: BTreeMap::new(),
    };
    let weights = std::fs::read(fixtures.join("mobilenetv3lite/ModifiedV3_converted.safetensors")).unwrap();
    let mobilenet = DiseaseClassifier::import_pytorch(&weights, card, &device).unwrap();

    let burn_results = [1usize, 32].map(|batch| time_batches(&mobilenet, &inputs, batch));
    let burn_logits: Vec<Vec<f32>> = inputs.iter().flat_map(|input| mobilenet.logits(input.clone())).collect();

    // ONNX Runtime on the same tensor and the same ONNX network.
    let logits_file = work.path().join("ort_logits.f32");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ort_bench.py");
    let output = Command::new(&python)
        .arg(&script)
        .args(["--model", fixtures.join("mobilenetv3lite/ModifiedV3_converted.onnx").to_str().unwrap()])
        .args(["--input", input_file.to_str().unwrap(), "--batches", "1,32", "--threads", "2"])
        .args(["--logits-out", logits_file.to_str().unwrap()])
        .output()
        .expect("cannot run python3 for the ONNX Runtime side");
    if !output.status.success() {
        panic!(
            "ONNX Runtime side failed (install it: python3 -m pip install --target .tools/ort onnxruntime numpy, then PYTHONPATH=.tools/ort): {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let ort: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ort_logits: Vec<f32> =
        std::fs::read(&logits_file).unwrap().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let mut worst = 0.0f32;
    let mut same_top1 = 0;
    for (ours, theirs) in burn_logits.iter().zip(ort_logits.chunks(38)) {
        worst = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
        same_top1 += usize::from(argmax(ours) == argmax(theirs));
    }

    println!("MobileNetV3-lite (62,682 parameters, 224x224), {} photos, same input tensor:", inputs.len());
    println!("  {:<14} {:>6} {:>10} {:>10} {:>10}", "runtime", "batch", "p50 ms", "p99 ms", "images/s");
    let mut comparison = Vec::new();
    for (burn, ort) in burn_results.iter().zip(ort["results"].as_array().unwrap()) {
        println!(
            "  {:<14} {:>6} {:>10.2} {:>10.2} {:>10.1}",
            "burn (flex)", burn.batch, burn.p50_ms, burn.p99_ms, burn.images_per_s
        );
        let (p50, p99, rate) =
            (ort["p50_ms"].as_f64().unwrap(), ort["p99_ms"].as_f64().unwrap(), ort["images_per_s"].as_f64().unwrap());
        println!("  {:<14} {:>6} {:>10.2} {:>10.2} {:>10.1}", "onnxruntime", burn.batch, p50, p99, rate);
        println!("  p50 ratio burn / onnxruntime at batch {}: {:.2}x", burn.batch, burn.p50_ms / p50);
        comparison.push(serde_json::json!({
            "batch": burn.batch,
            "burn": { "p50_ms": burn.p50_ms, "p99_ms": burn.p99_ms, "images_per_s": burn.images_per_s },
            "onnxruntime": { "p50_ms": p50, "p99_ms": p99, "images_per_s": rate },
            "p50_ratio": burn.p50_ms / p50,
        }));
    }
    println!("  outputs: largest logit difference {worst:.2e}, same top class on {same_top1}/{}", inputs.len());

    // Our own default model.
    let leafnet = DiseaseClassifier::from_model_file(DEFAULT_MODEL, &device).unwrap();
    let leaf_inputs: Vec<Vec<f32>> =
        decoded.iter().map(|photo| preprocess::model_input(photo, leafnet.input_spec())).collect();
    let leaf_results = [1usize, 32].map(|batch| time_batches(&leafnet, &leaf_inputs, batch));
    println!("{} (LeafNet, 64x64):", leafnet.card().reference());
    for result in &leaf_results {
        println!(
            "  batch {:>3}: p50 {:.2} ms, p99 {:.2} ms, {:.0} images/s",
            result.batch, result.p50_ms, result.p99_ms, result.images_per_s
        );
    }

    // The anomaly detector: learning normal (the autoencoder's training) and scoring.
    let series = nab::read_series(&series_path).unwrap();
    let params = DetectorParams::default();
    let training = (params.train_fraction * series.values.len() as f64) as usize;
    let started = Instant::now();
    let detector = FittedDetector::fit(
        &series.times[..training],
        &series.values[..training],
        &params,
        &smartfarm_ml::training_device(),
    )
    .unwrap();
    let fit_seconds = started.elapsed().as_secs_f64();
    let mut scoring = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let scores = detector.score(&series.times, &series.values);
        let _ = anomaly::events(&scores, training, &params);
        scoring.push(started.elapsed().as_secs_f64());
    }
    scoring.sort_by(f64::total_cmp);
    let readings_per_second = series.values.len() as f64 / scoring[scoring.len() / 2];
    println!(
        "anomaly detector on {} ({} readings): learning normal from {training} took {:.2} s; scoring {:.0} readings/s",
        series_path.file_name().unwrap().to_string_lossy(),
        series.values.len(),
        fit_seconds,
        readings_per_second
    );

    println!(
        "{}",
        serde_json::json!({
            "bench": "inference",
            "machine": machine,
            "photos": inputs.len(),
            "mobilenet": comparison,
            "onnxruntime_version": ort["onnxruntime"],
            "max_logit_difference": worst,
            "same_top1": same_top1,
            "leafnet": leaf_results.iter().map(|r| serde_json::json!({"batch": r.batch, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "images_per_s": r.images_per_s})).collect::<Vec<_>>(),
            "anomaly": { "readings": series.values.len(), "fit_seconds": fit_seconds, "score_readings_per_second": readings_per_second },
        })
    );
}

struct Timing {
    batch: usize,
    p50_ms: f64,
    p99_ms: f64,
    images_per_s: f64,
}

/// Latency of forward passes at `batch`, cycling through the inputs (a few warm-up passes first).
fn time_batches(classifier: &DiseaseClassifier, inputs: &[Vec<f32>], batch: usize) -> Timing {
    let iterations = (50 / batch).max(10);
    let make = |start: usize| -> Vec<f32> {
        (0..batch).flat_map(|i| inputs[(start + i) % inputs.len()].iter().copied()).collect()
    };
    for round in 0..3 {
        classifier.logits(make(round));
    }
    let mut times = Vec::with_capacity(iterations);
    for round in 0..iterations {
        let input = make(round * batch);
        let started = Instant::now();
        let out = classifier.logits(input);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(out.len(), batch);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    let percentile = |q: f64| {
        let position = q * (times.len() - 1) as f64;
        let (low, high) = (position.floor() as usize, position.ceil() as usize);
        times[low] + (times[high] - times[low]) * (position - low as f64)
    };
    Timing { batch, p50_ms: percentile(0.5), p99_ms: percentile(0.99), images_per_s: batch as f64 / (mean / 1000.0) }
}

/// `count` photos taking each class in turn.
fn round_robin(folder: &LabelledFolder, count: usize) -> Vec<PathBuf> {
    let mut by_class: Vec<Vec<PathBuf>> = vec![Vec::new(); folder.classes.len()];
    for photo in &folder.photos {
        by_class[photo.class].push(photo.path.clone());
    }
    let mut picked = Vec::new();
    let mut round = 0;
    while picked.len() < count && round < folder.photos.len() {
        for class in &by_class {
            if let Some(path) = class.get(round)
                && picked.len() < count
            {
                picked.push(path.clone());
            }
        }
        round += 1;
    }
    picked
}

/// The CPU model and core count, for the README's figures.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{model}, {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}
