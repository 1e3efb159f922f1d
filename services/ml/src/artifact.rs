//! The model file: one safetensors file holding a model's weights and, in its metadata under `smartfarm`, the
//! model card (name, version, kind, architecture, input spec, class labels, evaluation figures). The same bytes
//! are stored in the blob store, pushed to edge agents and shipped as the default model; any safetensors reader
//! can open them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use smartfarm_core::{Error, Result};

use crate::anomaly::DetectorParams;
use crate::preprocess::InputSpec;

/// The metadata key that holds the card.
pub const CARD_KEY: &str = "smartfarm";

/// The largest model file accepted, in bytes: our models are well under a megabyte.
pub const MAX_MODEL_BYTES: usize = 64 * 1024 * 1024;

/// What a model does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Classifies leaf photos into healthy and disease classes.
    PlantDisease,
    /// Scores sensor series for anomalies.
    SensorAnomaly,
}

impl ModelKind {
    /// The name used in file names, logs and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::PlantDisease => "plant_disease",
            ModelKind::SensorAnomaly => "sensor_anomaly",
        }
    }
}

/// The network a model file's weights belong to, with the shape parameters needed to build it before loading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "network")]
pub enum Architecture {
    /// smartfarm's own small leaf classifier (see `disease::LeafNet`).
    LeafNet {
        /// Output channels of each convolution block.
        channels: Vec<usize>,
    },
    /// The pretrained MobileNetV3-style network imported from PyTorch (see `disease::MobileNetV3Lite`).
    MobileNetV3Lite,
    /// The per-series window autoencoder and robust baseline of the anomaly detector: the file holds its
    /// hyper-parameters; each device and metric trains its own weights on its own history.
    WindowAutoencoder {
        /// The detector's constants.
        params: DetectorParams,
    },
}

/// Everything known about a model besides its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The model's name, for example `leafnet-plantvillage7`.
    pub name: String,
    /// Its version, for example `1` or `2026-12-05`.
    pub version: String,
    /// What it does.
    pub kind: ModelKind,
    /// The network the weights belong to.
    pub architecture: Architecture,
    /// How photos are fed to it (classifiers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputSpec>,
    /// The classes a classifier outputs, in output order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_labels: Vec<String>,
    /// Evaluation figures measured when it was made, for example `accuracy`.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Free-form provenance: the data it was trained on, epochs, where the weights came from.
    #[serde(default)]
    pub provenance: BTreeMap<String, String>,
}

impl ModelCard {
    /// Rejects cards that no loader could use.
    pub fn validate(&self) -> Result<()> {
        check_token("model name", &self.name)?;
        check_token("model version", &self.version)?;
        match (&self.kind, &self.architecture) {
            (ModelKind::PlantDisease, Architecture::LeafNet { .. } | Architecture::MobileNetV3Lite) => {
                let input = self
                    .input
                    .as_ref()
                    .ok_or_else(|| Error::invalid("model card", "a classifier needs an input spec"))?;
                input.validate()?;
                if self.class_labels.len() < 2 {
                    return Err(Error::invalid("model card", "a classifier needs at least two class labels"));
                }
            }
            (ModelKind::SensorAnomaly, Architecture::WindowAutoencoder { params }) => params.validate()?,
            (kind, architecture) => {
                return Err(Error::invalid(
                    "model card",
                    format!("a {} model cannot be a {architecture:?} network", kind.as_str()),
                ));
            }
        }
        Ok(())
    }

    /// `name@version`, how logs and results name a model.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Checks a model name or version: 1 to 64 characters of `[A-Za-z0-9._-]`, starting with a letter or digit. They
/// become part of blob keys and file names, so nothing else is allowed.
pub fn check_token(field: &str, value: &str) -> Result<()> {
    let ok = (1..=64).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && value.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(field, format!("{value:?} must be 1 to 64 letters, digits, dots, dashes or underscores")))
    }
}

/// Reads the card from a model file's safetensors header without touching the weights.
pub fn read_card(bytes: &[u8]) -> Result<ModelCard> {
    let field = "model file";
    if bytes.len() > MAX_MODEL_BYTES {
        return Err(Error::invalid(
            field,
            format!("{} bytes is more than the {MAX_MODEL_BYTES} a model may have", bytes.len()),
        ));
    }
    let header_len = bytes
        .get(..8)
        .map(|len| u64::from_le_bytes(len.try_into().expect("8 bytes")))
        .ok_or_else(|| Error::invalid(field, "too short to be a safetensors file"))?;
    let header = usize::try_from(header_len)
        .ok()
        .and_then(|len| bytes.get(8..8usize.checked_add(len)?))
        .ok_or_else(|| Error::invalid(field, "not a safetensors file (its header length runs past the end)"))?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: BTreeMap<String, String>,
    }
    let header: Header = serde_json::from_slice(header)
        .map_err(|error| Error::invalid(field, format!("not a safetensors file (header: {error})")))?;
    let card = header.metadata.get(CARD_KEY).ok_or_else(|| {
        Error::invalid(field, format!("a safetensors file without a `{CARD_KEY}` model card in its metadata"))
    })?;
    let card: ModelCard = serde_json::from_str(card)
        .map_err(|error| Error::invalid(field, format!("its model card is not valid: {error}")))?;
    card.validate()?;
    Ok(card)
}

/// The card as the JSON stored in the file's metadata.
pub fn card_json(card: &ModelCard) -> String {
    serde_json::to_string(card).expect("a model card serializes")
}
