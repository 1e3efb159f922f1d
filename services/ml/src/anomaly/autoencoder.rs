//! The learned half of the detector: a small MLP autoencoder over windows of a standardised series
//! (`window → hidden → code → hidden → window`, tanh, linear output). Trained on a series' normal history, it
//! reconstructs normal shapes well and unusual ones badly; the reconstruction error is the score.

use burn::nn::loss::{MseLoss, Reduction};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::tanh;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::DetectorParams;

/// The network.
#[derive(Module, Debug)]
pub struct WindowAutoencoder {
    layers: Vec<Linear>,
}

impl WindowAutoencoder {
    fn new(params: &DetectorParams, device: &Device) -> Self {
        let dims = [params.window, params.hidden, params.code, params.hidden, params.window];
        let layers = dims
            .windows(2)
            .map(|pair| {
                LinearConfig::new(pair[0], pair[1])
                    .with_initializer(Initializer::XavierUniform { gain: 1.0 })
                    .init(device)
            })
            .collect();
        Self { layers }
    }

    fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut x = input;
        for (index, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if index < last {
                x = tanh(x);
            }
        }
        x
    }

    /// Trains a fresh network on `windows` (each `params.window` values, back to back) with Adam and mean squared
    /// error, `params.epochs` passes in shuffled batches, on `device` (which must support autodiff); returns it
    /// ready for scoring on the device's inner (plain) backend.
    pub fn train(windows: &[f32], params: &DetectorParams, device: &Device) -> Self {
        device.seed(params.seed);
        let mut rng = StdRng::seed_from_u64(params.seed.wrapping_add(1));
        let width = params.window;
        let count = windows.len() / width;
        let mut model = Self::new(params, device);
        let mut optimizer = AdamConfig::new().with_epsilon(1e-8).init();
        let mut order: Vec<usize> = (0..count).collect();
        let mut batch = Vec::with_capacity(params.batch_size * width);
        for _ in 0..params.epochs {
            order.shuffle(&mut rng);
            for chunk in order.chunks(params.batch_size) {
                batch.clear();
                for &index in chunk {
                    batch.extend_from_slice(&windows[index * width..(index + 1) * width]);
                }
                let x = Tensor::<2>::from_data(TensorData::new(batch.clone(), [chunk.len(), width]), device);
                let loss = MseLoss::new().forward(model.forward(x.clone()), x, Reduction::Mean);
                let gradients = GradientsParams::from_grads(loss.backward(), &model);
                model = optimizer.step(params.learning_rate, model, gradients);
            }
        }
        model.valid()
    }

    /// Mean squared reconstruction error of each window (windows back to back), computed in batches.
    pub fn reconstruction_errors(&self, windows: &[f32], width: usize, device: &Device) -> Vec<f64> {
        let mut errors = Vec::with_capacity(windows.len() / width);
        for chunk in windows.chunks(4096 * width) {
            let rows = chunk.len() / width;
            let x = Tensor::<2>::from_data(TensorData::new(chunk.to_vec(), [rows, width]), device);
            let squared = (self.forward(x.clone()) - x).powi_scalar(2).mean_dim(1);
            let values = squared.into_data().try_into_vec::<f32>().expect("errors are f32");
            errors.extend(values.into_iter().map(f64::from));
        }
        errors
    }
}
