//! The models on real data: the shipped default classifier, training end to end, the PyTorch import checked
//! against ONNX Runtime, and the anomaly detector on a labelled NAB series. Fixtures and their licences are in
//! `fixtures/SOURCE.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use smartfarm_ml::anomaly::{self, DetectorParams, nab};
use smartfarm_ml::artifact::{self, Architecture, ModelCard, ModelKind};
use smartfarm_ml::disease::dataset::LabelledFolder;
use smartfarm_ml::disease::{DEFAULT_MODEL, DiseaseClassifier, evaluate, train};
use smartfarm_ml::preprocess::{self, IMAGENET_MEAN, IMAGENET_STD, InputSpec, Resize};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

#[test]
fn the_default_model_classifies_the_fixture_photos() {
    let classifier = DiseaseClassifier::from_model_file(DEFAULT_MODEL, &smartfarm_ml::inference_device()).unwrap();
    let card = classifier.card();
    assert_eq!(card.kind, ModelKind::PlantDisease);
    assert_eq!(card.class_labels.len(), 7);
    assert!(card.metrics["validation_accuracy"] >= 0.97, "{:?}", card.metrics);
    let folder = LabelledFolder::scan(&fixtures().join("plants")).unwrap();
    let report = evaluate::evaluate(&classifier, &folder).unwrap();
    assert_eq!(report.photos, 14);
    assert!(report.accuracy >= 13.0 / 14.0, "{}", report.table());
    let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
    assert_eq!(json["per_class_recall"].as_object().unwrap().len(), 7);
    // LeafNet's widest layer is 0.25 MB a photo: batches go through whole, and each photo's answer is the one it
    // gets alone (the kernels index every image of a batch right).
    assert!(classifier.slice_len() >= 32, "{}", classifier.slice_len());
    let inputs: Vec<Vec<f32>> = folder
        .photos
        .iter()
        .take(5)
        .map(|labelled| {
            let photo = preprocess::decode_photo("photo", &std::fs::read(&labelled.path).unwrap()).unwrap();
            preprocess::model_input(&photo, classifier.input_spec())
        })
        .collect();
    let together = classifier.logits(inputs.concat());
    assert_eq!(together.len(), 5);
    for (input, row) in inputs.into_iter().zip(&together) {
        let alone = classifier.logits(input).remove(0);
        for (a, b) in alone.iter().zip(row) {
            assert!((a - b).abs() < 1e-4, "alone {alone:?}, in a batch {row:?}");
        }
    }
}

#[test]
fn training_learns_and_its_model_file_gives_the_same_answers() {
    let folder = LabelledFolder::scan(&fixtures().join("plants")).unwrap();
    let options = train::TrainOptions {
        name: "tiny".into(),
        version: "test-1".into(),
        input_size: 32,
        channels: vec![8, 16],
        max_epochs: 6,
        patience: 6,
        batch_size: 4,
        learning_rate: 1e-2,
        validation_fraction: 0.5,
        seed: 7,
        augment: false,
    };
    let trained = train::train(&folder, &options, &smartfarm_ml::training_device(), |_| {}).unwrap();
    assert_eq!(trained.epochs.len(), 6);
    let first = trained.epochs.first().unwrap().train_loss;
    let last = trained.epochs.last().unwrap().train_loss;
    assert!(last < first * 0.8, "the training loss should fall: {first} -> {last}");

    let bytes = trained.classifier.to_model_file().unwrap();
    let card = artifact::read_card(&bytes).unwrap();
    assert_eq!(card.reference(), "tiny@test-1");
    assert_eq!(card.architecture, Architecture::LeafNet { channels: vec![8, 16] });
    assert!(card.metrics.contains_key("validation_accuracy"));
    let loaded = DiseaseClassifier::from_model_file(&bytes, &smartfarm_ml::inference_device()).unwrap();
    let photo = preprocess::decode_photo("photo", &std::fs::read(&folder.photos[0].path).unwrap()).unwrap();
    let before = trained.classifier.probabilities(preprocess::model_input(&photo, trained.classifier.input_spec()));
    let after = loaded.probabilities(preprocess::model_input(&photo, loaded.input_spec()));
    for (a, b) in before[0].iter().zip(&after[0]) {
        assert!((a - b).abs() < 1e-6, "{before:?} vs {after:?}");
    }
}

#[test]
fn the_pretrained_network_imported_from_pytorch_agrees_with_onnx_runtime() {
    let dir = fixtures().join("mobilenetv3lite");
    let labels: Vec<String> =
        std::fs::read_to_string(dir.join("classes.txt")).unwrap().lines().map(str::to_string).collect();
    let card = ModelCard {
        name: "plantvillage-mobilenetv3-lite".into(),
        version: "upstream".into(),
        kind: ModelKind::PlantDisease,
        architecture: Architecture::MobileNetV3Lite,
        input: Some(InputSpec {
            size: 224,
            resize: Resize::ShorterSideThenCenterCrop { shorter_side: 256 },
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }),
        class_labels: labels,
        metrics: BTreeMap::new(),
        provenance: BTreeMap::new(),
    };
    let weights = std::fs::read(dir.join("ModifiedV3_converted.safetensors")).unwrap();
    let classifier = DiseaseClassifier::import_pytorch(&weights, card, &smartfarm_ml::inference_device()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("onnxruntime_logits.json")).unwrap()).unwrap();
    let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../edge-agent/fixtures/photos");
    let mut one_at_a_time = Vec::new();
    let mut batch = Vec::new();
    for name in ["apple_scab.jpg", "potato_late_blight.jpg"] {
        let photo = preprocess::decode_photo("photo", &std::fs::read(photos.join(name)).unwrap()).unwrap();
        let input = preprocess::model_input(&photo, classifier.input_spec());
        batch.extend_from_slice(&input);
        one_at_a_time.push(classifier.logits(input).remove(0));
        let ours = one_at_a_time.last().unwrap();
        let theirs: Vec<f32> =
            reference[name]["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        // Same weights, same input up to the JPEG decoder (Pillow's libjpeg-turbo vs the image crate): ONNX Runtime
        // moves by up to 0.27 for ±1 grey level of noise, so 0.6 separates a decoder from a wrong port.
        // (A NaN is never within the bound: it fails too.)
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 0.6, "{name}: ours {ours:?}, ONNX Runtime's {theirs:?}");
        }
    }
    // A batch runs in slices small enough for one layer's activations to stay in cache: one photo at a time for
    // this network (8 MB at its widest). The answers are the same.
    assert_eq!(classifier.slice_len(), 1);
    assert_eq!(classifier.logits(batch), one_at_a_time);
    let photo = preprocess::decode_photo("photo", &std::fs::read(photos.join("apple_scab.jpg")).unwrap()).unwrap();
    assert_eq!(classifier.classify(&[photo])[0].label, "Apple___Apple_scab");
    // The converted model is a model file like any other.
    let reloaded =
        DiseaseClassifier::from_model_file(&classifier.to_model_file().unwrap(), &smartfarm_ml::inference_device())
            .unwrap();
    assert_eq!(reloaded.card().architecture, Architecture::MobileNetV3Lite);
}

#[test]
fn every_labelled_window_of_a_nab_series_is_detected_without_false_alarms() {
    let series = nab::read_series(&fixtures().join("nab/ec2_request_latency_system_failure.csv")).unwrap();
    assert_eq!(series.dropped_rows, 11, "the file repeats an hour at a clock change");
    let windows: Vec<(f64, f64)> = [
        ("2014-03-14 03:31:00", "2014-03-14 14:41:00"),
        ("2014-03-18 17:06:00", "2014-03-19 04:16:00"),
        ("2014-03-20 21:26:00", "2014-03-21 03:41:00"),
    ]
    .iter()
    .map(|(start, end)| (nab::parse_time(start).unwrap(), nab::parse_time(end).unwrap()))
    .collect();
    let detection =
        anomaly::detect(&series.times, &series.values, &DetectorParams::default(), &smartfarm_ml::training_device())
            .unwrap();
    let report = nab::score_windows(&series.times, &detection, &windows);
    assert_eq!((report.windows_detected, report.windows_total), (3, 3), "{}", report.table("ec2"));
    assert_eq!(report.false_positive_events, 0, "{}", report.table("ec2"));
    assert_eq!(detection.scores.len(), series.values.len());
}

#[test]
fn model_files_that_are_not_ours_are_refused() {
    let device = smartfarm_ml::inference_device();
    let error = DiseaseClassifier::from_model_file(b"not a model", &device).unwrap_err().to_string();
    assert!(
        error.contains("too short to be a safetensors file") || error.contains("not a safetensors file"),
        "{error}"
    );
    let pytorch = std::fs::read(fixtures().join("mobilenetv3lite/ModifiedV3_converted.safetensors")).unwrap();
    let error = DiseaseClassifier::from_model_file(&pytorch, &device).unwrap_err().to_string();
    assert!(error.contains("without a `smartfarm` model card"), "{error}");
    let anomaly_model = anomaly::model_file(&anomaly::default_card()).unwrap();
    let error = DiseaseClassifier::from_model_file(&anomaly_model, &device).unwrap_err().to_string();
    assert!(error.contains("is a sensor_anomaly model, not a plant-disease one"), "{error}");
}
