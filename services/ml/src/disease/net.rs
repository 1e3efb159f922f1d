//! The networks that classify leaf photos: smartfarm's own small `LeafNet`, trained by `smartfarm train disease`,
//! and `MobileNetV3Lite`, the shape of the pretrained 38-class PlantVillage network whose PyTorch weights are
//! imported from safetensors.

use burn::backend::Dispatch;
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::{hard_swish, relu, sigmoid};

use crate::kernels::{Activation, ConvBiasActivation};

/// A convolution without bias followed by batch normalisation (the activation is the caller's). For serving, the
/// normalisation is folded into the convolution's weights and bias ([`ConvBn::folded`]): one pass over the
/// activations instead of two.
#[derive(Module, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: Option<BatchNorm>,
}

impl ConvBn {
    fn new(channels: [usize; 2], kernel: usize, stride: usize, groups: usize, device: &Device) -> Self {
        let padding = kernel / 2;
        Self {
            conv: Conv2dConfig::new(channels, [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
                .with_groups(groups)
                .with_bias(false)
                .init(device),
            bn: Some(BatchNormConfig::new(channels[1]).with_epsilon(1e-5).init(device)),
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let x = self.conv.forward(input);
        match &self.bn {
            Some(bn) => bn.forward(x),
            None => x,
        }
    }

    /// The block followed by `activation`. A folded block (see [`ConvBn::folded`]) runs as one fused operation
    /// ([`ConvBiasActivation`]); one still normalising, as in training, runs Burn's operations one by one.
    fn forward_activated(&self, input: Tensor<4>, activation: Activation) -> Tensor<4> {
        if self.bn.is_some() {
            let x = self.forward(input);
            return match activation {
                Activation::Identity => x,
                Activation::Relu => relu(x),
                Activation::HardSwish => hard_swish(x),
            };
        }
        // The fused operation pads by half the kernel with equal strides and no dilation, as `ConvBn::new` makes.
        debug_assert!(
            self.conv.stride[0] == self.conv.stride[1]
                && self.conv.dilation == [1, 1]
                && self.conv.kernel_size[0] == self.conv.kernel_size[1]
        );
        let bias = self.conv.bias.as_ref().expect("a folded block has a bias").val();
        let output = <Dispatch as ConvBiasActivation>::conv_bias_activation(
            input.into_dispatch(),
            self.conv.weight.val().into_dispatch(),
            bias.into_dispatch(),
            self.conv.stride[0],
            self.conv.groups,
            activation,
        );
        Tensor::from_dispatch(output)
    }

    /// The same function for inference with the normalisation's running statistics folded into the convolution:
    /// `w' = w·γ/√(σ²+ε)`, `b' = β + (b − μ)·γ/√(σ²+ε)`.
    fn folded(&self) -> ConvBn {
        let Some(bn) = &self.bn else {
            return self.clone();
        };
        let out_channels = self.conv.weight.dims()[0];
        let scale = bn.gamma.val() / (bn.running_var.value() + bn.epsilon).sqrt();
        let bias = match &self.conv.bias {
            Some(bias) => bias.val(),
            None => bn.running_mean.value().zeros_like(),
        };
        let shift = bn.beta.val() + (bias - bn.running_mean.value()) * scale.clone();
        let mut conv = self.conv.clone();
        conv.weight = Param::from_tensor(self.conv.weight.val() * scale.reshape([out_channels, 1, 1, 1]));
        conv.bias = Some(Param::from_tensor(shift));
        ConvBn { conv, bn: None }
    }
}

/// smartfarm's leaf classifier: blocks of 3×3 convolution, batch norm and ReLU, each but the last followed by a
/// 2×2 max pool, then global average pooling, dropout and one linear layer. About 100k parameters at the default
/// widths: small enough to train on two CPU cores in minutes and to run on a Pi.
#[derive(Module, Debug)]
pub struct LeafNet {
    blocks: Vec<ConvBn>,
    pool: MaxPool2d,
    dropout: Dropout,
    classifier: Linear,
}

impl LeafNet {
    /// A freshly initialised network with these block widths and classes.
    pub fn new(channels: &[usize], classes: usize, device: &Device) -> Self {
        let mut blocks = Vec::with_capacity(channels.len());
        let mut input = 3;
        for &output in channels {
            blocks.push(ConvBn::new([input, output], 3, 1, 1, device));
            input = output;
        }
        Self {
            blocks,
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            dropout: DropoutConfig::new(0.2).init(),
            classifier: LinearConfig::new(input, classes).init(device),
        }
    }

    /// The network for serving, batch norms folded into the convolutions (see [`ConvBn::folded`]).
    pub fn folded(&self) -> LeafNet {
        LeafNet {
            blocks: self.blocks.iter().map(ConvBn::folded).collect(),
            pool: self.pool.clone(),
            dropout: self.dropout.clone(),
            classifier: self.classifier.clone(),
        }
    }

    /// The largest activation of one photo, in floats: the largest block output (each block works at half the
    /// size of the one before).
    pub fn largest_activation(&self, size: usize) -> usize {
        let outputs = self.blocks.iter().enumerate().map(|(index, block)| {
            let side = size >> index;
            block.conv.weight.dims()[0] * side * side
        });
        outputs.max().unwrap_or(3 * size * size)
    }

    /// Logits `[batch, classes]` for inputs `[batch, 3, size, size]`.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<2> {
        let last = self.blocks.len() - 1;
        let mut x = input;
        for (index, block) in self.blocks.iter().enumerate() {
            x = block.forward_activated(x, Activation::Relu);
            if index < last {
                x = self.pool.forward(x);
            }
        }
        let features = global_average(x);
        self.classifier.forward(self.dropout.forward(features))
    }
}

/// Mean over the spatial axes: `[batch, channels, h, w]` → `[batch, channels]`.
fn global_average(x: Tensor<4>) -> Tensor<2> {
    x.mean_dim(3).mean_dim(2).flatten(1, 3)
}

/// Squeeze-and-excite: channel weights from the pooled features.
#[derive(Module, Debug)]
pub struct SqueezeExcite {
    reduce: Conv2d,
    expand: Conv2d,
}

impl SqueezeExcite {
    fn new(channels: usize, device: &Device) -> Self {
        let squeezed = channels / 4;
        Self {
            reduce: Conv2dConfig::new([channels, squeezed], [1, 1]).init(device),
            expand: Conv2dConfig::new([squeezed, channels], [1, 1]).init(device),
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let pooled = input.clone().mean_dim(3).mean_dim(2);
        let weights = sigmoid(self.expand.forward(relu(self.reduce.forward(pooled))));
        input * weights
    }
}

/// One inverted bottleneck: 1×1 expand, depthwise k×k, optional squeeze-excite, 1×1 project (no residual, as in
/// the pretrained network).
#[derive(Module, Debug)]
pub struct Bottleneck {
    expand: ConvBn,
    depthwise: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
}

impl Bottleneck {
    fn new(input: usize, output: usize, expansion: usize, kernel: usize, squeeze: bool, device: &Device) -> Self {
        let hidden = input * expansion;
        Self {
            expand: ConvBn::new([input, hidden], 1, 1, 1, device),
            depthwise: ConvBn::new([hidden, hidden], kernel, 1, hidden, device),
            se: squeeze.then(|| SqueezeExcite::new(hidden, device)),
            project: ConvBn::new([hidden, output], 1, 1, 1, device),
        }
    }

    fn folded(&self) -> Bottleneck {
        Bottleneck {
            expand: self.expand.folded(),
            depthwise: self.depthwise.folded(),
            se: self.se.clone(),
            project: self.project.folded(),
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let x = self.expand.forward_activated(input, Activation::Relu);
        let mut x = self.depthwise.forward_activated(x, Activation::Relu);
        if let Some(se) = &self.se {
            x = se.forward(x);
        }
        self.project.forward_activated(x, Activation::Identity)
    }
}

/// The pretrained "SimpleMobileNetV3Lite" (62,682 parameters, 224×224 input): a stride-2 stem, five bottlenecks at
/// 112×112, a 1×1 head, global pooling and a linear classifier.
#[derive(Module, Debug)]
pub struct MobileNetV3Lite {
    stem: ConvBn,
    bottlenecks: Vec<Bottleneck>,
    head: ConvBn,
    classifier: Linear,
}

/// The bottlenecks: (input, output, expansion, kernel, squeeze-excite).
const MOBILENET_BOTTLENECKS: [(usize, usize, usize, usize, bool); 5] =
    [(16, 16, 1, 3, true), (16, 24, 4, 3, false), (24, 24, 4, 3, false), (24, 40, 4, 5, true), (40, 40, 4, 5, true)];

impl MobileNetV3Lite {
    /// A freshly initialised network with this many classes (weights come from `load_pytorch`).
    pub fn new(classes: usize, device: &Device) -> Self {
        Self {
            stem: ConvBn::new([3, 16], 3, 2, 1, device),
            bottlenecks: MOBILENET_BOTTLENECKS
                .iter()
                .map(|&(input, output, expansion, kernel, squeeze)| {
                    Bottleneck::new(input, output, expansion, kernel, squeeze, device)
                })
                .collect(),
            head: ConvBn::new([40, 96], 1, 1, 1, device),
            classifier: LinearConfig::new(96, classes).init(device),
        }
    }

    /// The network for serving, batch norms folded into the convolutions (see [`ConvBn::folded`]).
    pub fn folded(&self) -> MobileNetV3Lite {
        MobileNetV3Lite {
            stem: self.stem.folded(),
            bottlenecks: self.bottlenecks.iter().map(Bottleneck::folded).collect(),
            head: self.head.folded(),
            classifier: self.classifier.clone(),
        }
    }

    /// The largest activation of one photo, in floats: the widest bottleneck's, at half the input size.
    pub fn largest_activation(&self, size: usize) -> usize {
        let widest = self.bottlenecks.iter().map(|b| b.depthwise.conv.weight.dims()[0]).max().unwrap_or(16);
        widest * size.div_ceil(2) * size.div_ceil(2)
    }

    /// Logits `[batch, classes]` for inputs `[batch, 3, 224, 224]`.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<2> {
        let mut x = self.stem.forward_activated(input, Activation::HardSwish);
        for bottleneck in &self.bottlenecks {
            x = bottleneck.forward(x);
        }
        let x = self.head.forward_activated(x, Activation::HardSwish);
        self.classifier.forward(global_average(x))
    }

    /// How the PyTorch state dict's names map onto this module's (regex, replacement), applied in order.
    pub const PYTORCH_NAMES: &'static [(&'static str, &'static str)] = &[
        (r"^conv1\.0\.", "stem.conv."),
        (r"^conv1\.1\.", "stem.bn."),
        (r"^conv2\.0\.", "head.conv."),
        (r"^conv2\.1\.", "head.bn."),
        (r"^fc\.", "classifier."),
        (r"^bottlenecks\.(\d+)\.block\.0\.", "bottlenecks.$1.expand.conv."),
        (r"^bottlenecks\.(\d+)\.block\.1\.", "bottlenecks.$1.expand.bn."),
        (r"^bottlenecks\.(\d+)\.block\.3\.", "bottlenecks.$1.depthwise.conv."),
        (r"^bottlenecks\.(\d+)\.block\.4\.", "bottlenecks.$1.depthwise.bn."),
        (r"^bottlenecks\.(\d+)\.block\.6\.se\.1\.", "bottlenecks.$1.se.reduce."),
        (r"^bottlenecks\.(\d+)\.block\.6\.se\.3\.", "bottlenecks.$1.se.expand."),
        (r"^bottlenecks\.(\d+)\.block\.7\.", "bottlenecks.$1.project.conv."),
        (r"^bottlenecks\.(\d+)\.block\.8\.", "bottlenecks.$1.project.bn."),
    ];
}
