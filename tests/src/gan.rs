//! Tiny random-weight StyleGAN2 generators in NVIDIA's `G_ema` state-dict naming, written as
//! safetensors (what `tools/convert_stylegan_pkl.py` makes of a real network), optionally with
//! the init-kwargs JSON next to them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The shape of a StyleGAN2 generator (NVIDIA's init kwargs).
#[derive(Debug, Clone, Copy)]
pub struct TinyStyleGan2 {
    pub z_dim: usize,
    pub w_dim: usize,
    pub c_dim: usize,
    pub resolution: usize,
    pub mapping_layers: usize,
    pub channel_base: usize,
    pub channel_max: usize,
    /// Every block has `torgb` ('skip', config F); otherwise only the last (with `resnet`
    /// deciding whether blocks get `skip` convolutions).
    pub skip: bool,
    pub resnet: bool,
}

impl Default for TinyStyleGan2 {
    fn default() -> Self {
        Self {
            z_dim: 16,
            w_dim: 16,
            c_dim: 0,
            resolution: 32,
            mapping_layers: 2,
            channel_base: 128,
            channel_max: 16,
            skip: true,
            resnet: false,
        }
    }
}

impl TinyStyleGan2 {
    /// Channels of the block at `res` (NVIDIA: `min(channel_base // res, channel_max)`).
    pub fn channels(&self, res: usize) -> usize {
        (self.channel_base / res).min(self.channel_max)
    }

    /// One W row per convolution plus the last toRGB.
    pub fn num_ws(&self) -> usize {
        2 * (self.resolution.trailing_zeros() as usize - 1)
    }
}

fn randn(rng: &mut StdRng, shape: &[usize], scale: f32, offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            // Box–Muller; the exact distribution does not matter here.
            let u1 = rng.random::<f32>().max(1e-7);
            let u2 = rng.random::<f32>();
            offset + scale * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
}

fn filter() -> Tensor {
    let taps = [1f32, 3., 3., 1.];
    let v: Vec<f32> = taps
        .iter()
        .flat_map(|a| taps.iter().map(move |b| a * b / 64.0))
        .collect();
    Tensor::from_vec(v, (4, 4), &Device::Cpu).expect("filter")
}

/// Random tensors with NVIDIA's names and shapes (weights ~ N(0, 1) as NVIDIA's init,
/// mapping weights divided by the 0.01 learning-rate multiplier, non-zero biases, noise
/// strengths and `w_avg`).
pub fn stylegan2_tensors(cfg: TinyStyleGan2, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = HashMap::new();
    let embed = if cfg.c_dim > 0 { cfg.w_dim } else { 0 };
    if cfg.c_dim > 0 {
        t.insert(
            "mapping.embed.weight".into(),
            randn(&mut rng, &[embed, cfg.c_dim], 1.0, 0.0),
        );
        t.insert(
            "mapping.embed.bias".into(),
            randn(&mut rng, &[embed], 0.1, 0.0),
        );
    }
    for i in 0..cfg.mapping_layers {
        let inp = if i == 0 { cfg.z_dim + embed } else { cfg.w_dim };
        t.insert(
            format!("mapping.fc{i}.weight"),
            randn(&mut rng, &[cfg.w_dim, inp], 100.0, 0.0),
        );
        t.insert(
            format!("mapping.fc{i}.bias"),
            randn(&mut rng, &[cfg.w_dim], 10.0, 0.0),
        );
    }
    t.insert(
        "mapping.w_avg".into(),
        randn(&mut rng, &[cfg.w_dim], 0.5, 0.0),
    );
    let mut prev = 0;
    let mut res = 4;
    while res <= cfg.resolution {
        let ch = cfg.channels(res);
        let p = format!("synthesis.b{res}");
        let is_last = res == cfg.resolution;
        t.insert(format!("{p}.resample_filter"), filter());
        if res == 4 {
            t.insert(format!("{p}.const"), randn(&mut rng, &[ch, 4, 4], 1.0, 0.0));
        }
        let layers: &[(&str, usize)] = if res == 4 {
            &[("conv1", ch)]
        } else {
            &[("conv0", prev), ("conv1", ch)]
        };
        for &(name, inp) in layers {
            let q = format!("{p}.{name}");
            t.insert(
                format!("{q}.weight"),
                randn(&mut rng, &[ch, inp, 3, 3], 1.0, 0.0),
            );
            t.insert(format!("{q}.bias"), randn(&mut rng, &[ch], 0.1, 0.0));
            t.insert(
                format!("{q}.affine.weight"),
                randn(&mut rng, &[inp, cfg.w_dim], 1.0, 0.0),
            );
            t.insert(
                format!("{q}.affine.bias"),
                randn(&mut rng, &[inp], 0.1, 1.0),
            );
            t.insert(
                format!("{q}.noise_const"),
                randn(&mut rng, &[res, res], 1.0, 0.0),
            );
            t.insert(
                format!("{q}.noise_strength"),
                Tensor::new(0.1f32 + rng.random::<f32>() * 0.2, &Device::Cpu).expect("scalar"),
            );
            t.insert(format!("{q}.resample_filter"), filter());
        }
        if is_last || cfg.skip {
            let q = format!("{p}.torgb");
            t.insert(
                format!("{q}.weight"),
                randn(&mut rng, &[3, ch, 1, 1], 1.0, 0.0),
            );
            t.insert(format!("{q}.bias"), randn(&mut rng, &[3], 0.1, 0.0));
            t.insert(
                format!("{q}.affine.weight"),
                randn(&mut rng, &[ch, cfg.w_dim], 1.0, 0.0),
            );
            t.insert(format!("{q}.affine.bias"), randn(&mut rng, &[ch], 0.1, 1.0));
        }
        if res > 4 && cfg.resnet && !cfg.skip {
            t.insert(
                format!("{p}.skip.weight"),
                randn(&mut rng, &[ch, prev, 1, 1], 1.0, 0.0),
            );
            t.insert(format!("{p}.skip.resample_filter"), filter());
        }
        prev = ch;
        res *= 2;
    }
    t
}

/// NVIDIA's init kwargs for `cfg`, as `tools/convert_stylegan_pkl.py` writes them.
pub fn stylegan2_json(cfg: TinyStyleGan2) -> serde_json::Value {
    let architecture = if cfg.skip {
        "skip"
    } else if cfg.resnet {
        "resnet"
    } else {
        "orig"
    };
    serde_json::json!({
        "class_name": "Generator",
        "init_kwargs": {
            "z_dim": cfg.z_dim,
            "c_dim": cfg.c_dim,
            "w_dim": cfg.w_dim,
            "img_resolution": cfg.resolution,
            "img_channels": 3,
            "mapping_kwargs": {"num_layers": cfg.mapping_layers},
            "synthesis_kwargs": {
                "channel_base": cfg.channel_base,
                "channel_max": cfg.channel_max,
                "num_fp16_res": 0,
                "conv_clamp": 256,
                "architecture": architecture,
            },
        },
    })
}

/// Writes `path` (a `.safetensors` file) and, with `json`, the init kwargs next to it.
pub fn write_stylegan2(path: &Path, cfg: TinyStyleGan2, seed: u64, json: bool) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create dir");
    }
    candle_core::safetensors::save(&stylegan2_tensors(cfg, seed), path).expect("save");
    if json {
        std::fs::write(
            path.with_extension("json"),
            serde_json::to_string_pretty(&stylegan2_json(cfg)).expect("json"),
        )
        .expect("write json");
    }
}
