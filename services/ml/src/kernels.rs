//! Fused convolution kernels for serving on the CPU, registered with Burn as a backend extension
//! ([`ConvBiasActivation`]).
//!
//! Flex, Burn's CPU backend, runs a folded convolution block as three passes over its output (the convolution, the
//! bias, the activation) and runs depthwise and few-input-channel convolutions with a kernel that reloads and
//! stores every output row once per kernel tap, and with scalar code when the stride is 2. On the 2-core machine
//! this project measures on, those two kernels took 13 of MobileNetV3's 29 ms. Here:
//!
//! - depthwise convolutions (one filter per channel) and convolutions over at most [`DIRECT_MAX_INPUT_CHANNELS`]
//!   input channels (a network's stem, on RGB) run a direct kernel: each output row is accumulated in SIMD
//!   registers over every tap, the bias and the activation applied there, and stored once. Strided convolutions
//!   read input rows split by phase (even and odd columns for stride 2), so every load is contiguous;
//! - every other convolution runs Flex's own (im2col and gemm) without its bias, and the bias and activation follow
//!   in one pass instead of two.
//!
//! Code is safe Rust; SIMD width is chosen at run time by `pulp` (AVX2 and FMA where the CPU has them, NEON on a
//! Raspberry Pi, scalar otherwise). On the Autodiff backend the operation is Burn's own convolution and activation
//! ([`reference`]), which the tests compare the kernels against.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, TensorData};
use pulp::{Simd, WithSimd};
use rayon::prelude::*;

/// Convolutions with at most this many input channels per group run the direct kernel (an RGB stem); wider ones
/// are better served by gemm.
pub const DIRECT_MAX_INPUT_CHANNELS: usize = 4;

/// What follows the convolution and its bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Nothing: the convolution and its bias.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `x · clamp(x/6 + 1/2, 0, 1)`, MobileNetV3's.
    HardSwish,
}

/// A 2-D convolution with a square kernel of odd size `k`, `k / 2` padding on every side, stride `stride` in
/// both directions and `groups` groups, then its bias, then an activation, as one operation.
#[backend_extension(Flex, Autodiff)]
pub trait ConvBiasActivation: Backend {
    /// `x` is `[batch, in, h, w]`, `weight` `[out, in / groups, k, k]`, `bias` `[out]`.
    fn conv_bias_activation(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        groups: usize,
        activation: Activation,
    ) -> FloatTensor<Self> {
        reference::<Self>(x, weight, bias, stride, groups, activation)
    }
}

/// The operation from Burn's own convolution and activations, on any backend.
pub fn reference<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    stride: usize,
    groups: usize,
    activation: Activation,
) -> FloatTensor<B> {
    let pad = weight.shape()[2] / 2;
    let output = B::conv2d(x, weight, Some(bias), ConvOptions::new([stride, stride], [pad, pad], [1, 1], groups));
    match activation {
        Activation::Identity => output,
        Activation::Relu => B::relu(output),
        Activation::HardSwish => {
            let gate = B::hard_sigmoid(output.clone(), (1.0 / 6.0).into(), 0.5.into());
            B::float_mul(output, gate)
        }
    }
}

/// Training runs on Autodiff: Burn's own operations, which it knows how to differentiate.
impl<B: Backend + ConvBiasActivation, C: CheckpointStrategy> ConvBiasActivation for Autodiff<B, C> {}

impl ConvBiasActivation for Flex {
    fn conv_bias_activation(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: usize,
        groups: usize,
        activation: Activation,
    ) -> FlexTensor {
        let x_shape = x.shape();
        let w_shape = weight.shape();
        // Anything else (other types, shapes that do not fit together) goes to Burn, which says what is wrong.
        let supported = x.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && bias.dtype() == DType::F32
            && x_shape.num_dims() == 4
            && w_shape.num_dims() == 4
            && x_shape[1] > 0
            && w_shape[0] > 0
            && x_shape[2] > 0
            && x_shape[3] > 0
            && groups > 0
            && stride > 0
            && x_shape[1].is_multiple_of(groups)
            && w_shape[0].is_multiple_of(groups)
            && w_shape[1] == x_shape[1] / groups
            && w_shape[2] == w_shape[3]
            && w_shape[2] % 2 == 1
            && bias.shape().num_elements() == w_shape[0];
        if !supported {
            return reference::<Flex>(x, weight, bias, stride, groups, activation);
        }
        let shape = ConvShape {
            batch: x_shape[0],
            in_channels: x_shape[1],
            out_channels: w_shape[0],
            groups,
            height: x_shape[2],
            width: x_shape[3],
            kernel: w_shape[2],
            stride,
        };
        let bias = bias.to_contiguous();
        let bias = bias.as_slice::<f32>().expect("contiguous");
        if shape.is_direct() {
            let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
            let output = direct_conv(
                x.as_slice::<f32>().expect("contiguous"),
                weight.as_slice::<f32>().expect("contiguous"),
                bias,
                &shape,
                activation,
                pulp::Arch::new(),
            );
            return FlexTensor::from_data(TensorData::new(output, shape.output_shape()));
        }
        let pad = shape.kernel / 2;
        let options = ConvOptions::new([stride, stride], [pad, pad], [1, 1], groups);
        let mut output = Flex::conv2d(x, weight, None, options).to_contiguous();
        let plane = shape.output_height() * shape.output_width();
        bias_activation_in_place(output.storage_mut::<f32>(), bias, plane, activation);
        output
    }
}

/// The geometry of one convolution.
#[derive(Clone, Debug)]
pub(crate) struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub groups: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
}

impl ConvShape {
    fn pad(&self) -> usize {
        self.kernel / 2
    }

    fn output_height(&self) -> usize {
        (self.height + 2 * self.pad() - self.kernel) / self.stride + 1
    }

    fn output_width(&self) -> usize {
        (self.width + 2 * self.pad() - self.kernel) / self.stride + 1
    }

    fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.output_height(), self.output_width()]
    }

    /// Whether the direct kernel serves this convolution: depthwise, or few input channels per group.
    fn is_direct(&self) -> bool {
        let depthwise = self.groups == self.in_channels && self.out_channels == self.in_channels;
        depthwise || (self.in_channels / self.groups <= DIRECT_MAX_INPUT_CHANNELS && self.stride <= 4)
    }
}

/// The direct kernel: `[batch, in, h, w]` in, `[batch, out, oh, ow]` out, one task per (image, group), with the
/// SIMD instruction set `arch`.
pub(crate) fn direct_conv(
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    shape: &ConvShape,
    activation: Activation,
    arch: pulp::Arch,
) -> Vec<f32> {
    let in_per_group = shape.in_channels / shape.groups;
    let out_per_group = shape.out_channels / shape.groups;
    let (out_h, out_w) = (shape.output_height(), shape.output_width());
    let in_plane = shape.height * shape.width;
    let out_plane = out_h * out_w;
    let taps = in_per_group * shape.kernel * shape.kernel;
    let mut output = vec![0.0f32; shape.batch * shape.out_channels * out_plane];
    let rows = PhaseRows::new(shape);
    // One task per (image, group). Its scratch holds the group's prepared input planes; the padding cells are
    // the same for every plane of this shape, so they are zeroed once, when a thread's scratch is made.
    output.par_chunks_mut(out_per_group * out_plane).enumerate().for_each_init(
        || vec![0.0f32; in_per_group * rows.plane_len()],
        |prepared, (task, group_output)| {
            let (image, group) = (task / shape.groups, task % shape.groups);
            let first_in = (image * shape.in_channels + group * in_per_group) * in_plane;
            for channel in 0..in_per_group {
                let plane = &input[first_in + channel * in_plane..][..in_plane];
                rows.prepare(plane, &mut prepared[channel * rows.plane_len()..][..rows.plane_len()]);
            }
            let prepared = &prepared[..];
            let plane_kernel = |index: usize, output_plane: &mut [f32]| {
                let out_channel = group * out_per_group + index;
                arch.dispatch(PlaneKernel {
                    prepared,
                    rows: &rows,
                    weights: &weight[out_channel * taps..][..taps],
                    bias: bias[out_channel],
                    channels: in_per_group,
                    output: output_plane,
                    out_w,
                    activation,
                });
            };
            if out_per_group == 1 {
                plane_kernel(0, group_output);
            } else {
                // A stem has one group and many output channels: they share the prepared input and run in parallel.
                group_output
                    .par_chunks_mut(out_plane)
                    .enumerate()
                    .for_each(|(index, plane)| plane_kernel(index, plane));
            }
        },
    );
    output
}

/// How an input plane is laid out for the direct kernel: zero-padded, and each padded row split into `stride`
/// phases (columns `q, q + stride, q + 2·stride, …` for phase `q`), so that output column `o` and kernel column
/// `kw` read phase `kw % stride` at index `o + kw / stride`: contiguous for every stride.
#[derive(Debug)]
struct PhaseRows {
    width: usize,
    pad: usize,
    stride: usize,
    padded_rows: usize,
    phase_len: usize,
}

impl PhaseRows {
    fn new(shape: &ConvShape) -> Self {
        let pad = shape.pad();
        let padded_width = shape.width + 2 * pad;
        Self {
            width: shape.width,
            pad,
            stride: shape.stride,
            padded_rows: shape.height + 2 * pad,
            phase_len: padded_width.div_ceil(shape.stride),
        }
    }

    fn row_len(&self) -> usize {
        self.stride * self.phase_len
    }

    fn plane_len(&self) -> usize {
        self.padded_rows * self.row_len()
    }

    /// Writes the plane's values into their cells of `prepared` (which holds zeros in every padding cell).
    fn prepare(&self, plane: &[f32], prepared: &mut [f32]) {
        for (y, source) in plane.chunks_exact(self.width).enumerate() {
            let row = &mut prepared[(y + self.pad) * self.row_len()..][..self.row_len()];
            if self.stride == 1 {
                row[self.pad..self.pad + self.width].copy_from_slice(source);
                continue;
            }
            // Padded column c goes to phase c % stride at index c / stride.
            for phase in 0..self.stride {
                let first_column = (phase + self.stride - self.pad % self.stride) % self.stride;
                let first_index = (first_column + self.pad) / self.stride;
                let cells = &mut row[phase * self.phase_len + first_index..(phase + 1) * self.phase_len];
                for (cell, &value) in cells.iter_mut().zip(source.iter().skip(first_column).step_by(self.stride)) {
                    *cell = value;
                }
            }
        }
    }
}

/// One output plane of the direct kernel, generic over the SIMD instruction set.
struct PlaneKernel<'a> {
    /// The group's input planes, prepared by [`PhaseRows::prepare`].
    prepared: &'a [f32],
    rows: &'a PhaseRows,
    /// `[channels, k, k]`.
    weights: &'a [f32],
    bias: f32,
    channels: usize,
    output: &'a mut [f32],
    out_w: usize,
    activation: Activation,
}

impl WithSimd for PlaneKernel<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        let rows = self.rows;
        let kernel = (self.weights.len() / self.channels).isqrt();
        // Every tap as (offset into the prepared planes from the output row's first input row, weight): no
        // division or index arithmetic left in the loops below.
        let mut taps = Vec::with_capacity(self.weights.len());
        for channel in 0..self.channels {
            for ky in 0..kernel {
                for kx in 0..kernel {
                    let offset = channel * rows.plane_len()
                        + ky * rows.row_len()
                        + (kx % rows.stride) * rows.phase_len
                        + kx / rows.stride;
                    taps.push((offset, self.weights[(channel * kernel + ky) * kernel + kx]));
                }
            }
        }
        let tile = Tile { simd, prepared: self.prepared, taps: &taps, bias: self.bias, activation: self.activation };
        let out_w = self.out_w;
        for (y, out_row) in self.output.chunks_mut(out_w).enumerate() {
            let row_start = y * rows.stride * rows.row_len();
            // Wide tiles first: each accumulator is a chain of dependent multiply-adds, and it takes about eight
            // chains in flight to keep the FMA units busy.
            let mut x = 0;
            while x + 8 * lanes <= out_w {
                tile.run::<8>(row_start, x, out_row);
                x += 8 * lanes;
            }
            if x + 4 * lanes <= out_w {
                tile.run::<4>(row_start, x, out_row);
                x += 4 * lanes;
            }
            if x + 2 * lanes <= out_w {
                tile.run::<2>(row_start, x, out_row);
                x += 2 * lanes;
            }
            if x + lanes <= out_w {
                tile.run::<1>(row_start, x, out_row);
                x += lanes;
            }
            for (column, out) in out_row.iter_mut().enumerate().skip(x) {
                let mut sum = self.bias;
                for &(offset, weight) in &taps {
                    sum = self.prepared[row_start + offset + column].mul_add(weight, sum);
                }
                *out = activate_scalar(sum, self.activation);
            }
        }
    }
}

/// `VECTORS` vectors of one output row, accumulated in registers over every tap.
struct Tile<'a, S: Simd> {
    simd: S,
    prepared: &'a [f32],
    taps: &'a [(usize, f32)],
    bias: f32,
    activation: Activation,
}

impl<S: Simd> Tile<'_, S> {
    #[inline(always)]
    fn run<const VECTORS: usize>(&self, row_start: usize, x: usize, out_row: &mut [f32]) {
        let (simd, lanes) = (self.simd, S::F32_LANES);
        let mut accumulators = [simd.splat_f32s(self.bias); VECTORS];
        for &(offset, weight) in self.taps {
            let weight = simd.splat_f32s(weight);
            let source = &self.prepared[row_start + offset + x..][..VECTORS * lanes];
            for (vector, accumulator) in accumulators.iter_mut().enumerate() {
                *accumulator = simd.mul_add_e_f32s(load::<S>(&source[vector * lanes..]), weight, *accumulator);
            }
        }
        for (vector, accumulator) in accumulators.into_iter().enumerate() {
            store::<S>(&mut out_row[x + vector * lanes..], activate(simd, accumulator, self.activation));
        }
    }
}

/// Adds each channel's bias and applies the activation, in place, on `[batch, channels, plane]` data.
fn bias_activation_in_place(data: &mut [f32], bias: &[f32], plane: usize, activation: Activation) {
    data.par_chunks_mut(plane).enumerate().for_each(|(index, values)| {
        pulp::Arch::new().dispatch(BiasActivation { values, bias: bias[index % bias.len()], activation });
    });
}

struct BiasActivation<'a> {
    values: &'a mut [f32],
    bias: f32,
    activation: Activation,
}

impl WithSimd for BiasActivation<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        let bias = simd.splat_f32s(self.bias);
        let mut chunks = self.values.chunks_exact_mut(lanes);
        for chunk in &mut chunks {
            let value = simd.add_f32s(load::<S>(chunk), bias);
            store::<S>(chunk, activate(simd, value, self.activation));
        }
        for value in chunks.into_remainder() {
            *value = activate_scalar(*value + self.bias, self.activation);
        }
    }
}

#[inline(always)]
fn activate<S: Simd>(simd: S, value: S::f32s, activation: Activation) -> S::f32s {
    match activation {
        Activation::Identity => value,
        Activation::Relu => simd.max_f32s(value, simd.splat_f32s(0.0)),
        Activation::HardSwish => {
            let gate = simd.mul_add_e_f32s(value, simd.splat_f32s(1.0 / 6.0), simd.splat_f32s(0.5));
            let gate = simd.min_f32s(simd.max_f32s(gate, simd.splat_f32s(0.0)), simd.splat_f32s(1.0));
            simd.mul_f32s(value, gate)
        }
    }
}

#[inline(always)]
fn activate_scalar(value: f32, activation: Activation) -> f32 {
    match activation {
        Activation::Identity => value,
        Activation::Relu => value.max(0.0),
        Activation::HardSwish => value * (value * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0),
    }
}

/// One vector from the start of `values` (at least a vector long), at any alignment.
#[inline(always)]
fn load<S: Simd>(values: &[f32]) -> S::f32s {
    bytemuck::pod_read_unaligned(bytemuck::cast_slice(&values[..S::F32_LANES]))
}

/// Writes one vector to the start of `values` (at least a vector long).
#[inline(always)]
fn store<S: Simd>(values: &mut [f32], vector: S::f32s) {
    bytemuck::cast_slice_mut::<f32, u8>(&mut values[..S::F32_LANES]).copy_from_slice(bytemuck::bytes_of(&vector));
}

#[cfg(test)]
mod tests {
    use burn::backend::Dispatch;
    use burn::prelude::*;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// `count` values in [-1, 1).
    fn random_values(count: usize, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
        (0..count).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn random(shape: [usize; 4], rng: &mut rand::rngs::StdRng, device: &Device) -> Tensor<4> {
        let values = random_values(shape.iter().product(), rng);
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// The fused operation against Burn's convolution and activation on the same inputs.
    fn check(batch: usize, channels: [usize; 2], size: [usize; 2], kernel: usize, stride: usize, groups: usize) {
        let device = Device::flex();
        let mut rng = rand::rngs::StdRng::seed_from_u64((batch * 1000 + channels[0] * 10 + kernel) as u64);
        let x = random([batch, channels[0], size[0], size[1]], &mut rng, &device);
        let weight = random([channels[1], channels[0] / groups, kernel, kernel], &mut rng, &device);
        let bias: Tensor<1> = random([1, 1, 1, channels[1]], &mut rng, &device).flatten(0, 3);
        for activation in [Activation::Identity, Activation::Relu, Activation::HardSwish] {
            let fused = <Dispatch as ConvBiasActivation>::conv_bias_activation(
                x.clone().into_dispatch(),
                weight.clone().into_dispatch(),
                bias.clone().into_dispatch(),
                stride,
                groups,
                activation,
            );
            let expected = reference::<Dispatch>(
                x.clone().into_dispatch(),
                weight.clone().into_dispatch(),
                bias.clone().into_dispatch(),
                stride,
                groups,
                activation,
            );
            let (fused, expected) = (Tensor::<4>::from_dispatch(fused), Tensor::<4>::from_dispatch(expected));
            assert_eq!(fused.dims(), expected.dims(), "{channels:?} {size:?} k{kernel} s{stride} g{groups}");
            let fused = fused.into_data().try_to_vec::<f32>().unwrap();
            let expected = expected.into_data().try_to_vec::<f32>().unwrap();
            assert_close(
                &fused,
                &expected,
                &format!("{activation:?} {channels:?} {size:?} k{kernel} s{stride} g{groups}"),
            );
        }
    }

    /// Every value within 1e-4 of the other's (a NaN is never close).
    fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}");
        for (index, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!((a - b).abs() < 1e-4, "{what}: value {index} is {a}, expected {b}");
        }
    }

    #[test]
    fn depthwise_matches_burn() {
        check(1, [16, 16], [112, 112], 3, 1, 16);
        check(2, [6, 6], [23, 30], 5, 2, 6);
        // A channel multiplier: two filters per input channel.
        check(1, [3, 6], [20, 20], 3, 1, 3);
        check(2, [8, 8], [37, 21], 5, 1, 8);
        check(3, [4, 4], [9, 17], 3, 2, 4);
        check(1, [2, 2], [1, 1], 3, 1, 2);
        check(1, [2, 2], [5, 3], 7, 1, 2);
    }

    #[test]
    fn few_input_channels_match_burn_at_every_stride() {
        check(1, [3, 16], [224, 224], 3, 2, 1);
        check(2, [3, 5], [31, 40], 3, 1, 1);
        check(1, [3, 4], [23, 19], 5, 3, 1);
        check(1, [3, 4], [31, 29], 7, 4, 1);
        check(2, [1, 2], [8, 8], 1, 2, 1);
        // Grouped, two input channels per group.
        check(1, [4, 6], [10, 12], 3, 1, 2);
    }

    /// The scalar instruction set (what a CPU without AVX2 or NEON runs) gives what the detected one gives.
    #[test]
    fn every_instruction_set_gives_the_same_answer() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (shape, kernel, stride, groups) in [([2, 8, 8, 37, 29], 5, 1, 8), ([1, 3, 16, 45, 50], 3, 2, 1)] {
            let [batch, in_channels, out_channels, height, width] = shape;
            let conv = ConvShape { batch, in_channels, out_channels, groups, height, width, kernel, stride };
            let input = random_values(batch * in_channels * height * width, &mut rng);
            let weight = random_values(out_channels * in_channels / groups * kernel * kernel, &mut rng);
            let bias = random_values(out_channels, &mut rng);
            let detected = direct_conv(&input, &weight, &bias, &conv, Activation::HardSwish, pulp::Arch::new());
            let scalar = direct_conv(&input, &weight, &bias, &conv, Activation::HardSwish, pulp::Arch::Scalar);
            assert_close(&detected, &scalar, &format!("{conv:?}"));
        }
    }

    /// 1×1 convolutions: Flex's gemm, then the fused bias-and-activation pass (planes of odd sizes, several images).
    #[test]
    fn pointwise_matches_burn() {
        check(2, [24, 40], [14, 14], 1, 1, 1);
        check(1, [16, 13], [7, 9], 1, 1, 1);
        check(3, [5, 7], [40, 41], 1, 1, 1);
        check(1, [160, 40], [16, 16], 1, 1, 1);
    }

    #[test]
    fn wide_convolutions_match_burn() {
        check(1, [8, 12], [6, 6], 1, 2, 1);
        check(1, [16, 32], [9, 11], 3, 1, 1);
        check(1, [16, 32], [9, 11], 3, 2, 1);
    }
}
