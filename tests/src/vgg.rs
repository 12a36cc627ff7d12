//! Tiny random-weight VGG16s for the perceptual (LPIPS) loss: torchvision's `vgg16` layer
//! structure and tensor names (`features.{0,2,5,…,28}.weight/.bias`) with narrow widths, plus
//! optional LPIPS linear layers (`lin{0..4}.model.1.weight`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// torchvision's indices of the 13 convolutions.
pub const CONV_INDICES: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
const CONVS_PER_BLOCK: [usize; 5] = [2, 2, 3, 3, 3];

fn uniform(rng: &mut StdRng, shape: &[usize], low: f32, high: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| low + rng.random::<f32>() * (high - low))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
}

/// Random VGG16 tensors with block widths `widths` (He-scaled uniform weights, small biases,
/// so the signal survives all 13 layers), and LPIPS linear layers in [0, 1) when `lpips`.
pub fn vgg16_tensors(widths: [usize; 5], lpips: bool, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = HashMap::new();
    let mut in_ch = 3;
    let mut next = 0;
    for (&width, &count) in widths.iter().zip(&CONVS_PER_BLOCK) {
        for _ in 0..count {
            let index = CONV_INDICES[next];
            let bound = (6.0 / (in_ch * 9) as f32).sqrt();
            t.insert(
                format!("features.{index}.weight"),
                uniform(&mut rng, &[width, in_ch, 3, 3], -bound, bound),
            );
            t.insert(
                format!("features.{index}.bias"),
                uniform(&mut rng, &[width], -0.05, 0.05),
            );
            in_ch = width;
            next += 1;
        }
    }
    if lpips {
        for (k, &width) in widths.iter().enumerate() {
            t.insert(
                format!("lin{k}.model.1.weight"),
                uniform(&mut rng, &[1, width, 1, 1], 0.0, 1.0),
            );
        }
    }
    t
}

/// Writes [`vgg16_tensors`] to a safetensors file.
pub fn write_vgg16(path: &Path, widths: [usize; 5], lpips: bool, seed: u64) {
    let tensors = vgg16_tensors(widths, lpips, seed);
    candle_core::safetensors::save(&tensors, path).expect("save vgg16");
}
