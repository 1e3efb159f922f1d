//! Evaluation of a classifier on labelled photos: accuracy, per-class recall and the confusion matrix, printed as a
//! table and as one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use smartfarm_core::{Error, Result};

use super::DiseaseClassifier;
use super::dataset::LabelledFolder;
use crate::preprocess;

/// Photos classified per batch during evaluation.
const EVAL_BATCH: usize = 32;

/// The figures of one evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// The model, as `name@version`.
    pub model: String,
    /// Photos evaluated.
    pub photos: usize,
    /// Fraction classified correctly.
    pub accuracy: f64,
    /// Recall of each class present in the data (correct / photos of that class).
    pub per_class_recall: BTreeMap<String, f64>,
    /// The lowest per-class recall.
    pub min_recall: f64,
    /// The classes in matrix order.
    pub classes: Vec<String>,
    /// `confusion[true][predicted]` counts, in `classes` order.
    pub confusion: Vec<Vec<u64>>,
    /// Photos that could not be read (skipped, not counted as errors of the model).
    pub unreadable: Vec<String>,
}

/// Classifies every photo of `folder` and compares with its folder's label. The folder's class names must be
/// classes the model knows.
pub fn evaluate(classifier: &DiseaseClassifier, folder: &LabelledFolder) -> Result<EvalReport> {
    let labels = classifier.labels();
    let mut model_index = Vec::with_capacity(folder.classes.len());
    for class in &folder.classes {
        let index = labels.iter().position(|label| label == class).ok_or_else(|| {
            Error::invalid(
                "data",
                format!("class folder {class:?} is not a class of the model (it knows: {})", labels.join(", ")),
            )
        })?;
        model_index.push(index);
    }
    let classes = labels.to_vec();
    let mut confusion = vec![vec![0u64; classes.len()]; classes.len()];
    let mut unreadable = Vec::new();
    for chunk in folder.photos.chunks(EVAL_BATCH) {
        let mut inputs = Vec::new();
        let mut truths = Vec::new();
        for photo in chunk {
            let decoded = std::fs::read(&photo.path)
                .map_err(|error| Error::invalid("data", format!("{}: {error}", photo.path.display())))
                .and_then(|bytes| preprocess::decode_photo("photo", &bytes));
            match decoded {
                Ok(image) => {
                    inputs.extend(preprocess::model_input(&image, classifier.input_spec()));
                    truths.push(model_index[photo.class]);
                }
                Err(error) => unreadable.push(format!("{}: {error}", photo.path.display())),
            }
        }
        for (truth, row) in truths.into_iter().zip(classifier.probabilities(inputs)) {
            let predicted = argmax(&row);
            confusion[truth][predicted] += 1;
        }
    }
    let photos: u64 = confusion.iter().flatten().sum();
    if photos == 0 {
        return Err(Error::invalid("data", "no photo could be read"));
    }
    let correct: u64 = (0..classes.len()).map(|i| confusion[i][i]).sum();
    let mut per_class_recall = BTreeMap::new();
    for &index in &model_index {
        let total: u64 = confusion[index].iter().sum();
        if total > 0 {
            per_class_recall.insert(classes[index].clone(), confusion[index][index] as f64 / total as f64);
        }
    }
    let min_recall = per_class_recall.values().copied().fold(1.0, f64::min);
    Ok(EvalReport {
        model: classifier.card().reference(),
        photos: photos as usize,
        accuracy: correct as f64 / photos as f64,
        per_class_recall,
        min_recall,
        classes,
        confusion,
        unreadable,
    })
}

/// Index of the largest value.
pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(index, _)| index).unwrap_or(0)
}

impl EvalReport {
    /// The human-readable report: recall per class, accuracy, and the confusion matrix of the classes present.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "model {}: {} photos", self.model, self.photos);
        for (class, recall) in &self.per_class_recall {
            let _ = writeln!(out, "  recall {recall:>7.4}  {class}");
        }
        let _ = writeln!(out, "accuracy {:.4}, lowest class recall {:.4}", self.accuracy, self.min_recall);
        let present: Vec<usize> = (0..self.classes.len())
            .filter(|&i| self.confusion[i].iter().sum::<u64>() > 0 || self.confusion.iter().any(|row| row[i] > 0))
            .collect();
        let _ = writeln!(out, "confusion matrix (rows: true class, columns: predicted, in this order):");
        for (n, &i) in present.iter().enumerate() {
            let _ = writeln!(out, "  [{n}] {}", self.classes[i]);
        }
        let _ = write!(out, "      ");
        for n in 0..present.len() {
            let _ = write!(out, "{:>6}", format!("[{n}]"));
        }
        let _ = writeln!(out);
        for (n, &i) in present.iter().enumerate() {
            let _ = write!(out, "{:>6}", format!("[{n}]"));
            for &j in &present {
                let _ = write!(out, "{:>6}", self.confusion[i][j]);
            }
            let _ = writeln!(out);
        }
        for line in &self.unreadable {
            let _ = writeln!(out, "unreadable: {line}");
        }
        out
    }

    /// The report as one line of JSON.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("the report serializes")
    }
}
