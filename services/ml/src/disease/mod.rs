//! Plant-disease classification: the networks, a loaded classifier that turns photos into ranked classes, training
//! on a folder of class subfolders, and evaluation with per-class recall and a confusion matrix.

pub mod dataset;
pub mod evaluate;
mod net;
pub mod train;

use burn::prelude::*;
use burn::store::{ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use burn::tensor::activation::softmax;
use image::RgbImage;

use smartfarm_core::{Error, Result};

pub use net::{LeafNet, MobileNetV3Lite};

use crate::artifact::{self, Architecture, ModelCard, ModelKind};
use crate::preprocess::{self, InputSpec};

/// The default model, built into every binary: a LeafNet trained by `smartfarm train disease` on the PlantVillage
/// training split (its validation figures are in its card and in `models/README.md`).
pub const DEFAULT_MODEL: &[u8] = include_bytes!("../../../../models/plant-disease-default.safetensors");

/// How many bytes of one layer's activations a slice of a batch may hold (see [`DiseaseClassifier::slice_len`]).
const SLICE_ACTIVATION_BYTES: usize = 8 << 20;

/// A network that classifies leaf photos.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "one per loaded model; boxing buys nothing")]
enum DiseaseNet {
    Leaf(LeafNet),
    MobileNet(MobileNetV3Lite),
}

impl DiseaseNet {
    fn folded(&self) -> DiseaseNet {
        match self {
            DiseaseNet::Leaf(net) => DiseaseNet::Leaf(net.folded()),
            DiseaseNet::MobileNet(net) => DiseaseNet::MobileNet(net.folded()),
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<2> {
        match self {
            DiseaseNet::Leaf(net) => net.forward(input),
            DiseaseNet::MobileNet(net) => net.forward(input),
        }
    }

    /// The largest activation of one photo, in floats, for inputs of `size`×`size`.
    fn largest_activation(&self, size: usize) -> usize {
        match self {
            DiseaseNet::Leaf(net) => net.largest_activation(size),
            DiseaseNet::MobileNet(net) => net.largest_activation(size),
        }
    }
}

/// Whether a class is a healthy one (PlantVillage names them `<crop>___healthy`): the cloud and the edge agent
/// announce only the other classes as diseases.
pub fn is_healthy(label: &str) -> bool {
    label.to_ascii_lowercase().contains("healthy")
}

/// One photo's result: the most likely class and the ranking.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The most likely class.
    pub label: String,
    /// Its probability.
    pub confidence: f32,
    /// Every class with its probability, most likely first.
    pub ranked: Vec<(String, f32)>,
}

/// A loaded plant-disease model, ready to classify batches of photos.
#[derive(Debug)]
pub struct DiseaseClassifier {
    card: ModelCard,
    input: InputSpec,
    /// The network as trained and stored.
    net: DiseaseNet,
    /// The same function with batch norms folded, which is what runs.
    serving: DiseaseNet,
    device: Device,
}

impl DiseaseClassifier {
    /// Loads a model file (see [`artifact`]) onto a device.
    pub fn from_model_file(bytes: &[u8], device: &Device) -> Result<Self> {
        let card = artifact::read_card(bytes)?;
        if card.kind != ModelKind::PlantDisease {
            return Err(Error::invalid(
                "model file",
                format!("{} is a {} model, not a plant-disease one", card.reference(), card.kind.as_str()),
            ));
        }
        let classes = card.class_labels.len();
        let mut net = match &card.architecture {
            Architecture::LeafNet { channels } => DiseaseNet::Leaf(LeafNet::new(channels, classes, device)),
            Architecture::MobileNetV3Lite => DiseaseNet::MobileNet(MobileNetV3Lite::new(classes, device)),
            other => return Err(Error::invalid("model file", format!("{other:?} is not a photo classifier"))),
        };
        let mut store = SafetensorsStore::from_bytes(Some(bytes.to_vec()));
        let result = match &mut net {
            DiseaseNet::Leaf(module) => module.load_from(&mut store),
            DiseaseNet::MobileNet(module) => module.load_from(&mut store),
        }
        .map_err(|error| Error::invalid("model file", format!("cannot read its weights: {error}")))?;
        check_applied(&result)?;
        let input = card.input.clone().expect("validated classifier cards have an input spec");
        Ok(Self { card, input, serving: net.folded(), net, device: device.clone() })
    }

    /// Imports the pretrained MobileNetV3-style network from its PyTorch state dict in safetensors form, and
    /// describes it with `card` (whose architecture must be `MobileNetV3Lite`).
    pub fn import_pytorch(weights: &[u8], card: ModelCard, device: &Device) -> Result<Self> {
        card.validate()?;
        if card.architecture != Architecture::MobileNetV3Lite {
            return Err(Error::invalid("model card", "only the MobileNetV3Lite network is imported from PyTorch"));
        }
        let mut module = MobileNetV3Lite::new(card.class_labels.len(), device);
        let mut store = SafetensorsStore::from_bytes(Some(weights.to_vec())).with_from_adapter(PyTorchToBurnAdapter);
        for (from, to) in MobileNetV3Lite::PYTORCH_NAMES {
            store = store.with_key_remapping(from, *to);
        }
        let result = module
            .load_from(&mut store)
            .map_err(|error| Error::invalid("weights", format!("cannot read the PyTorch safetensors: {error}")))?;
        check_applied(&result)?;
        let input = card.input.clone().expect("validated classifier cards have an input spec");
        let net = DiseaseNet::MobileNet(module);
        Ok(Self { card, input, serving: net.folded(), net, device: device.clone() })
    }

    /// Wraps a freshly trained LeafNet.
    pub(crate) fn from_leafnet(net: LeafNet, card: ModelCard, device: &Device) -> Self {
        let input = card.input.clone().expect("training writes an input spec");
        let net = DiseaseNet::Leaf(net);
        Self { card, input, serving: net.folded(), net, device: device.clone() }
    }

    /// The model file: weights and card in one safetensors file.
    pub fn to_model_file(&self) -> Result<Vec<u8>> {
        let mut store =
            SafetensorsStore::from_bytes(None).metadata(artifact::CARD_KEY, artifact::card_json(&self.card));
        let saved = match &self.net {
            DiseaseNet::Leaf(net) => net.valid().save_into(&mut store),
            DiseaseNet::MobileNet(net) => net.valid().save_into(&mut store),
        };
        saved.map_err(|error| Error::internal("writing the model file", anyhow::anyhow!("{error}")))?;
        store.get_bytes().map_err(|error| Error::internal("writing the model file", anyhow::anyhow!("{error}")))
    }

    /// The model's card.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    /// Replaces the card (a new name, version or figures); the weights stay.
    pub fn set_card(&mut self, card: ModelCard) -> Result<()> {
        card.validate()?;
        if card.architecture != self.card.architecture
            || card.class_labels.len() != self.card.class_labels.len()
            || card.input != self.card.input
        {
            return Err(Error::invalid("model card", "a new card must keep the network, input and number of classes"));
        }
        self.card = card;
        Ok(())
    }

    /// How photos are fed to the model.
    pub fn input_spec(&self) -> &InputSpec {
        &self.input
    }

    /// The class labels, in output order.
    pub fn labels(&self) -> &[String] {
        &self.card.class_labels
    }

    /// Raw network outputs (logits) for preprocessed inputs (each `input_spec().len()` floats, back to back), one
    /// row per input, in output order.
    pub fn logits(&self, inputs: Vec<f32>) -> Vec<Vec<f32>> {
        self.run(inputs, false)
    }

    /// Class probabilities for preprocessed inputs (each `input_spec().len()` floats, back to back), one row per
    /// input, in output order.
    pub fn probabilities(&self, inputs: Vec<f32>) -> Vec<Vec<f32>> {
        self.run(inputs, true)
    }

    fn run(&self, mut inputs: Vec<f32>, as_probabilities: bool) -> Vec<Vec<f32>> {
        let per_input = self.input.len();
        let size = self.input.size as usize;
        let photos = inputs.len() / per_input;
        inputs.truncate(photos * per_input);
        // One slice takes the inputs as they are; several are copied out.
        let slices: Vec<Vec<f32>> = if photos <= self.slice_len() {
            vec![inputs]
        } else {
            inputs.chunks(self.slice_len() * per_input).map(<[f32]>::to_vec).collect()
        };
        let mut rows = Vec::with_capacity(photos);
        for slice in slices.into_iter().filter(|slice| !slice.is_empty()) {
            let batch = slice.len() / per_input;
            let tensor = Tensor::<4>::from_data(TensorData::new(slice, [batch, 3, size, size]), &self.device);
            let mut output = self.serving.forward(tensor);
            if as_probabilities {
                output = softmax(output, 1);
            }
            let flat = output.into_data().try_into_vec::<f32>().expect("outputs are f32");
            rows.extend(flat.chunks(self.card.class_labels.len()).map(<[f32]>::to_vec));
        }
        rows
    }

    /// How many photos go through the network at once: as many as keep the largest layer's activations within
    /// [`SLICE_ACTIVATION_BYTES`] (at least one); a larger batch runs as consecutive slices. On a CPU a layer that
    /// fits in cache feeds the next one from there: MobileNetV3 (8 MB per photo at its widest) ran 1.3 times faster
    /// per photo one at a time than 32 at once on this project's 2-core machine, while LeafNet (0.25 MB) gains
    /// from whole batches.
    pub fn slice_len(&self) -> usize {
        let bytes = self.serving.largest_activation(self.input.size as usize) * size_of::<f32>();
        (SLICE_ACTIVATION_BYTES / bytes.max(1)).max(1)
    }

    /// Classifies decoded photos in one batch.
    pub fn classify(&self, photos: &[RgbImage]) -> Vec<Prediction> {
        let mut inputs = Vec::with_capacity(photos.len() * self.input.len());
        for photo in photos {
            inputs.extend(preprocess::model_input(photo, &self.input));
        }
        self.probabilities(inputs).into_iter().map(|row| self.rank(&row)).collect()
    }

    /// A prediction from one row of probabilities.
    pub fn rank(&self, probabilities: &[f32]) -> Prediction {
        let mut ranked: Vec<(String, f32)> =
            self.card.class_labels.iter().cloned().zip(probabilities.iter().copied()).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (label, confidence) = ranked[0].clone();
        Prediction { label, confidence, ranked }
    }
}

/// Fails unless every parameter of the module got a tensor from the file.
fn check_applied(result: &burn::store::ApplyResult) -> Result<()> {
    if !result.errors.is_empty() {
        return Err(Error::invalid("model file", format!("its weights do not fit the network: {:?}", result.errors)));
    }
    if !result.missing.is_empty() {
        let missing: Vec<&str> = result.missing.iter().map(|(path, _)| path.as_str()).collect();
        return Err(Error::invalid("model file", format!("weights missing for {}", missing.join(", "))));
    }
    Ok(())
}
