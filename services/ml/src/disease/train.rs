//! Training a LeafNet on a folder of class subfolders: a stratified held-out validation split, augmentation,
//! class-balanced loss, Adam with a cosine learning rate, and early stopping on the validation set's mean recall.
//! The best epoch's weights become the model.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use image::RgbImage;
use image::imageops::FilterType;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use smartfarm_core::{Error, Result};

use super::dataset::{LabelledFolder, LabelledPhoto};
use super::evaluate::argmax;
use super::{DiseaseClassifier, LeafNet};
use crate::artifact::{Architecture, ModelCard, ModelKind};
use crate::preprocess::{self, IMAGENET_MEAN, IMAGENET_STD, InputSpec, Resize};

/// What to train and how.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Name and version written into the model card.
    pub name: String,
    /// Version written into the model card.
    pub version: String,
    /// Input side in pixels.
    pub input_size: u32,
    /// Output channels of the convolution blocks.
    pub channels: Vec<usize>,
    /// Most epochs to run.
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation score.
    pub patience: usize,
    /// Photos per training step.
    pub batch_size: usize,
    /// Peak learning rate (cosine-decayed to a twentieth of it over `max_epochs`).
    pub learning_rate: f64,
    /// Fraction of each class held out for validation.
    pub validation_fraction: f64,
    /// Seed of the split, the shuffles, the augmentation and the initial weights.
    pub seed: u64,
    /// Whether to augment training photos (crops, flips, turns, brightness and contrast).
    pub augment: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            name: "leafnet".into(),
            version: "1".into(),
            input_size: 64,
            channels: vec![16, 32, 64, 128],
            max_epochs: 30,
            patience: 8,
            batch_size: 32,
            learning_rate: 1e-3,
            validation_fraction: 0.15,
            seed: 42,
            augment: true,
        }
    }
}

/// What one epoch did, for progress output.
#[derive(Clone, Debug)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy (on augmented photos).
    pub train_accuracy: f64,
    /// Validation accuracy.
    pub validation_accuracy: f64,
    /// Lowest per-class validation recall.
    pub validation_min_recall: f64,
    /// Mean of the per-class validation recalls: what early stopping maximises.
    pub validation_mean_recall: f64,
    /// Whether this epoch is the best so far.
    pub best: bool,
    /// Seconds the epoch took.
    pub seconds: f64,
}

/// The outcome: the model (best epoch) and the figures it was chosen by.
#[derive(Debug)]
pub struct Trained {
    /// The trained classifier, its card carrying the validation figures.
    pub classifier: DiseaseClassifier,
    /// Every epoch's report.
    pub epochs: Vec<EpochReport>,
}

/// Trains a LeafNet on `folder` on `device` (which must support autodiff), calling `progress` after each epoch.
pub fn train(
    folder: &LabelledFolder,
    options: &TrainOptions,
    device: &Device,
    mut progress: impl FnMut(&EpochReport),
) -> Result<Trained> {
    crate::artifact::check_token("name", &options.name)?;
    crate::artifact::check_token("version", &options.version)?;
    if folder.classes.len() < 2 {
        return Err(Error::invalid("data", "training needs at least two class folders"));
    }
    if options.channels.is_empty() || options.batch_size == 0 || options.max_epochs == 0 {
        return Err(Error::invalid("options", "channels, batch size and epochs must not be empty or zero"));
    }
    if !(0.0..1.0).contains(&options.validation_fraction) || options.validation_fraction == 0.0 {
        return Err(Error::invalid("validation fraction", "must be above 0 and below 1"));
    }
    let spec = InputSpec { size: options.input_size, resize: Resize::Stretch, mean: IMAGENET_MEAN, std: IMAGENET_STD };
    spec.validate()?;
    let (train_photos, validation_photos) = folder.split(options.validation_fraction, options.seed);
    if train_photos.is_empty() || validation_photos.is_empty() {
        return Err(Error::invalid("data", "too few photos to hold out a validation set"));
    }
    let classes = folder.classes.len();

    // Training photos are decoded once and kept at twice the input size, the canvas augmentation crops from;
    // validation photos go through exactly what serving does, once.
    let cache_side = options.input_size * 2;
    let train_images =
        load(&train_photos, |image| image::imageops::resize(&image, cache_side, cache_side, FilterType::Triangle))?;
    let validation_inputs = load(&validation_photos, |image| preprocess::model_input(&image, &spec))?;
    let validation_truth: Vec<usize> = validation_photos.iter().map(|p| p.class).collect();

    // Classes with few photos weigh more in the loss (inverse square root of their share).
    let mut counts = vec![0usize; classes];
    for photo in &train_photos {
        counts[photo.class] += 1;
    }
    let weights: Vec<f32> =
        counts.iter().map(|&n| (train_photos.len() as f32 / (classes as f32 * n.max(1) as f32)).sqrt()).collect();
    let mean_weight = weights.iter().sum::<f32>() / classes as f32;
    let weights: Vec<f32> = weights.iter().map(|w| w / mean_weight).collect();

    device.seed(options.seed);
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut model = LeafNet::new(&options.channels, classes, device);
    let mut optimizer =
        AdamConfig::new().with_weight_decay(Some(burn::optim::decay::WeightDecayConfig::new(1e-4))).init();
    let loss_fn = CrossEntropyLossConfig::new().with_weights(Some(weights)).init(device);
    let size = options.input_size as usize;

    let mut reports = Vec::new();
    let mut best: Option<(f64, f64, LeafNet)> = None;
    let mut since_best = 0;
    let mut order: Vec<usize> = (0..train_images.len()).collect();
    for epoch in 1..=options.max_epochs {
        let started = Instant::now();
        let progress_fraction = (epoch - 1) as f64 / options.max_epochs.max(2) as f64;
        let learning_rate =
            options.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * progress_fraction).cos()));
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for batch in order.chunks(options.batch_size) {
            let mut inputs = Vec::with_capacity(batch.len() * spec.len());
            let mut targets = Vec::with_capacity(batch.len());
            for &index in batch {
                let (image, class) = &train_images[index];
                let sample = if options.augment { augment(image, &mut rng) } else { image.clone() };
                inputs.extend(preprocess::model_input(&sample, &spec));
                targets.push(*class as i64);
            }
            let x = Tensor::<4>::from_data(TensorData::new(inputs, [batch.len(), 3, size, size]), device);
            let y = Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [batch.len()]), device);
            let logits = model.forward(x);
            let predicted = logits.clone().argmax(1).into_data().try_into_vec_as::<i64>().expect("indices");
            correct += predicted.iter().zip(&targets).filter(|(p, t)| p == t).count();
            seen += batch.len();
            let loss = loss_fn.forward(logits, y);
            loss_sum += f64::from(loss.clone().into_scalar::<f32>()) * batch.len() as f64;
            let gradients = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(learning_rate, model, gradients);
        }

        let validating = model.valid();
        let (accuracy, recalls) = validate(&validating, &validation_inputs, &validation_truth, classes, &spec);
        let min_recall = recalls.iter().copied().fold(1.0, f64::min);
        let mean_recall = recalls.iter().sum::<f64>() / classes as f64;
        let is_best = best
            .as_ref()
            .is_none_or(|(score, acc, _)| mean_recall > *score || (mean_recall == *score && accuracy > *acc));
        if is_best {
            best = Some((mean_recall, accuracy, validating));
            since_best = 0;
        } else {
            since_best += 1;
        }
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / seen as f64,
            train_accuracy: correct as f64 / seen as f64,
            validation_accuracy: accuracy,
            validation_min_recall: min_recall,
            validation_mean_recall: mean_recall,
            best: is_best,
            seconds: started.elapsed().as_secs_f64(),
        };
        progress(&report);
        reports.push(report);
        if since_best >= options.patience {
            break;
        }
    }

    let (_, _, best_model) = best.expect("at least one epoch ran");
    let best_report = reports.iter().rev().find(|r| r.best).expect("one epoch is the best").clone();
    let inference = best_model.to_device(&device.clone().inner());
    let (accuracy, recalls) = validate(&inference, &validation_inputs, &validation_truth, classes, &spec);
    let mut metrics = BTreeMap::new();
    metrics.insert("validation_accuracy".to_string(), accuracy);
    metrics.insert("validation_min_recall".to_string(), recalls.iter().copied().fold(1.0, f64::min));
    metrics.insert("validation_photos".to_string(), validation_inputs.len() as f64);
    metrics.insert("train_photos".to_string(), train_images.len() as f64);
    metrics.insert("epochs".to_string(), reports.len() as f64);
    metrics.insert("best_epoch".to_string(), best_report.epoch as f64);
    for (class, recall) in folder.classes.iter().zip(&recalls) {
        metrics.insert(format!("validation_recall.{class}"), *recall);
    }
    let mut provenance = BTreeMap::new();
    provenance.insert("trained_by".to_string(), format!("smartfarm train disease {}", env!("CARGO_PKG_VERSION")));
    provenance.insert("seed".to_string(), options.seed.to_string());
    provenance.insert("validation_fraction".to_string(), options.validation_fraction.to_string());
    let card = ModelCard {
        name: options.name.clone(),
        version: options.version.clone(),
        kind: ModelKind::PlantDisease,
        architecture: Architecture::LeafNet { channels: options.channels.clone() },
        input: Some(spec),
        class_labels: folder.classes.clone(),
        metrics,
        provenance,
    };
    card.validate()?;
    let inner = device.clone().inner();
    Ok(Trained { classifier: DiseaseClassifier::from_leafnet(inference, card, &inner), epochs: reports })
}

/// Decodes photos with their class, mapped by `prepare`.
fn load<T>(photos: &[LabelledPhoto], prepare: impl Fn(RgbImage) -> T) -> Result<Vec<(T, usize)>> {
    photos
        .iter()
        .map(|photo| {
            let bytes = std::fs::read(&photo.path)
                .map_err(|error| Error::invalid("data", format!("{}: {error}", photo.path.display())))?;
            let image = preprocess::decode_photo(&photo.path.display().to_string(), &bytes)?;
            Ok((prepare(image), photo.class))
        })
        .collect()
}

/// Accuracy and per-class recall of `model` on preprocessed inputs.
fn validate(
    model: &LeafNet,
    inputs: &[(Vec<f32>, usize)],
    truth: &[usize],
    classes: usize,
    spec: &InputSpec,
) -> (f64, Vec<f64>) {
    let size = spec.size as usize;
    let device = model_device(model);
    let mut hits = vec![0usize; classes];
    let mut totals = vec![0usize; classes];
    for (chunk, truths) in inputs.chunks(64).zip(truth.chunks(64)) {
        let flat: Vec<f32> = chunk.iter().flat_map(|(input, _)| input.iter().copied()).collect();
        let x = Tensor::<4>::from_data(TensorData::new(flat, [chunk.len(), 3, size, size]), &device);
        let logits = model.forward(x).into_data().try_into_vec::<f32>().expect("logits are f32");
        for (row, &class) in logits.chunks(classes).zip(truths) {
            totals[class] += 1;
            if argmax(row) == class {
                hits[class] += 1;
            }
        }
    }
    let accuracy = hits.iter().sum::<usize>() as f64 / totals.iter().sum::<usize>().max(1) as f64;
    let recalls = hits.iter().zip(&totals).map(|(&h, &t)| if t == 0 { 1.0 } else { h as f64 / t as f64 }).collect();
    (accuracy, recalls)
}

fn model_device(model: &LeafNet) -> Device {
    model.devices().into_iter().next().expect("a network has parameters on a device")
}

/// A random variation of a training photo: a crop of 75–100% of its side, flips, quarter turns, and brightness
/// and contrast within ±15%.
fn augment(image: &RgbImage, rng: &mut StdRng) -> RgbImage {
    let (width, height) = image.dimensions();
    let side = ((width.min(height) as f64) * rng.random_range(0.75..=1.0)).round() as u32;
    let left = rng.random_range(0..=width - side);
    let top = rng.random_range(0..=height - side);
    let mut out = image::imageops::crop_imm(image, left, top, side, side).to_image();
    if rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    if rng.random_bool(0.5) {
        image::imageops::flip_vertical_in_place(&mut out);
    }
    if rng.random_bool(0.5) {
        out = image::imageops::rotate90(&out);
    }
    let contrast: f32 = rng.random_range(0.85..1.15);
    let brightness: f32 = rng.random_range(-0.15..0.15) * 255.0;
    for pixel in out.pixels_mut() {
        for channel in pixel.0.iter_mut() {
            let value = (f32::from(*channel) - 128.0) * contrast + 128.0 + brightness;
            *channel = value.clamp(0.0, 255.0) as u8;
        }
    }
    out
}
