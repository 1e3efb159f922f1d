//! smartfarm-ml owns smartfarm's models, written with Burn: the plant-disease networks (our own small `LeafNet`,
//! trained here, and the pretrained MobileNetV3-style network imported from PyTorch weights), the sensor anomaly
//! detector (a window autoencoder per device and metric beside a robust statistical baseline, turning scores into
//! events), the model file (safetensors weights with the model card in its metadata), the one preprocessing
//! function every photo goes through, and the evaluations that `smartfarm eval` prints. It depends on nothing of
//! smartfarm but the core crate, so the edge agent can run the same model files (feature `ai`) as the cloud.

#![forbid(unsafe_code)]

pub mod anomaly;
pub mod artifact;
pub mod disease;
pub mod kernels;
pub mod preprocess;

use burn::prelude::Device;

/// The device models run on: Burn's pure-Rust CPU backend (Flex), with SIMD kernels and one thread per core.
/// No GPU is needed to build, test or serve.
pub fn inference_device() -> Device {
    Device::flex()
}

/// The device models train on: the CPU backend with automatic differentiation.
pub fn training_device() -> Device {
    Device::flex().autodiff()
}
