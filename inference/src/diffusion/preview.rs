//! Live previews of a denoising run, from the latents of the current step.
//!
//! Both previews take **UNet-space latents**: the tensors the sampler works on, i.e. the VAE
//! encoder's output already multiplied by the VAE's scaling factor (0.18215 for SD 1.x/2.x,
//! 0.13025 for SDXL). Do not divide by the scaling factor first.
//!
//! - [`latent_to_rgb`]: a linear map of the 4 latent channels to RGB per latent pixel; almost
//!   free, blurry and low in contrast, at latent resolution.
//! - [`TinyDecoder`]: TAESD, madebyollin's tiny autoencoder's decoder (`taesd` for SD 1.x/2.x,
//!   `taesdxl` for SDXL), a close approximation of the full VAE decode at a fraction of its
//!   cost.
//!
//! About TAESD's input scaling: diffusers' `AutoencoderTiny` has `scaling_factor = 1.0`, and the
//! diffusers pipelines decode with `vae.decode(latents / vae.config.scaling_factor)`, so with
//! TAESD in place of the VAE the decoder receives the UNet-space latents unchanged. That is
//! what [`TinyDecoder::decode`] takes too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::nn::{Conv2d, Winograd};

/// TAESD's 64-channel kernels are small: every 3×3 layer runs as F(4×4, 3×3) Winograd
/// (measured: 256² preview 350 -> 255 ms on 2 cores).
const TAESD_WINOGRAD: Winograd = Winograd {
    f4_up_to: usize::MAX,
    f2_up_to: usize::MAX,
};
use serde::Deserialize;

use crate::error::{Error, Result};

use super::imaging::RgbImage;

/// Which model family's latents a preview shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentFormat {
    /// Stable Diffusion 1.x / 2.x (VAE scaling factor 0.18215).
    Sd,
    /// Stable Diffusion XL (VAE scaling factor 0.13025).
    Sdxl,
}

/// SD 1.x/2.x: rows are latent channels, columns R, G, B (no bias).
const SD_FACTORS: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];
const SD_BIAS: [f32; 3] = [0.0, 0.0, 0.0];

/// SDXL: the factors fitted for the SDXL VAE, with their bias (as in ComfyUI's latent formats).
const SDXL_FACTORS: [[f32; 3]; 4] = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
];
const SDXL_BIAS: [f32; 3] = [0.1084, -0.0175, -0.0011];

impl LatentFormat {
    /// The 4×3 latent→RGB matrix (rows = latent channels) and the RGB bias; the result is in
    /// `[-1, 1]`.
    pub fn rgb_factors(self) -> ([[f32; 3]; 4], [f32; 3]) {
        match self {
            LatentFormat::Sd => (SD_FACTORS, SD_BIAS),
            LatentFormat::Sdxl => (SDXL_FACTORS, SDXL_BIAS),
        }
    }
}

/// The cheapest preview: each latent pixel's 4 channels mapped linearly to RGB,
/// `rgb = Σ_c latent[c]·F[c] + bias` in `[-1, 1]`, then `(rgb + 1) / 2 · 255`, rounded and
/// clamped.
///
/// The image is at **latent resolution** (64×64 for a 512×512 generation): it is not upscaled
/// ×8 here; the UI magnifies it when drawing. Takes UNet-space latents of shape `(1, 4, h, w)`
/// or `(4, h, w)`, any dtype or device; they are copied to the CPU once.
pub fn latent_to_rgb(latents: &Tensor, format: LatentFormat) -> Result<RgbImage> {
    let t = match latents.dims() {
        [1, 4, _, _] => latents.squeeze(0)?,
        [4, _, _] => latents.clone(),
        other => {
            return Err(Error::InvalidParameter(format!(
                "a latent preview needs (1, 4, h, w) or (4, h, w) latents, not {other:?}"
            )));
        }
    };
    let planes = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec3::<f32>()?;
    let (factors, bias) = format.rgb_factors();
    let h = planes[0].len();
    let w = planes[0].first().map_or(0, Vec::len);
    let mut pixels = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            for (c, b) in bias.iter().enumerate() {
                let mut v = *b;
                for (plane, f) in planes.iter().zip(&factors) {
                    v += plane[y][x] * f[c];
                }
                pixels.push(((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        pixels,
    })
}

/// How a TAESD decoder's tensors are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaesdLayout {
    /// diffusers' `AutoencoderTiny` (`diffusion_pytorch_model.safetensors`):
    /// `decoder.layers.0.weight` is the first convolution.
    Diffusers,
    /// madebyollin's `taesd_decoder.safetensors` / `taesdxl_decoder.safetensors`: the
    /// `nn.Sequential` indices alone, shifted by one for its leading clamp module, so `1.weight`
    /// is the first convolution.
    Original,
}

impl TaesdLayout {
    /// The name prefix and the index of the first convolution.
    fn prefix_and_start(self) -> (&'static str, usize) {
        match self {
            TaesdLayout::Diffusers => ("decoder.layers.", 0),
            TaesdLayout::Original => ("", 1),
        }
    }
}

/// The shape of a TAESD decoder (diffusers' `AutoencoderTiny` decoder options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyDecoderConfig {
    /// Channels of the latents it takes (4 in published models).
    pub latent_channels: usize,
    /// Channels of the image it outputs (3, RGB).
    pub out_channels: usize,
    /// Channels of each stage (all equal in published models: 64).
    pub block_out_channels: Vec<usize>,
    /// Residual blocks in each stage (published models: 3, 3, 3, 1).
    pub num_blocks: Vec<usize>,
    /// Nearest-neighbour upsampling between stages (2; three stages' worth make ×8).
    pub upsampling_scaling_factor: usize,
    /// How its tensors are named.
    pub layout: TaesdLayout,
}

impl Default for TinyDecoderConfig {
    /// The published `taesd` / `taesdxl` decoders, in diffusers' layout.
    fn default() -> Self {
        Self {
            latent_channels: 4,
            out_channels: 3,
            block_out_channels: vec![64; 4],
            num_blocks: vec![3, 3, 3, 1],
            upsampling_scaling_factor: 2,
            layout: TaesdLayout::Diffusers,
        }
    }
}

/// The parts of diffusers' `AutoencoderTiny` `config.json` the decoder needs.
#[derive(Deserialize)]
struct DiffusersConfig {
    #[serde(default = "default_latent_channels")]
    latent_channels: usize,
    #[serde(default = "default_out_channels")]
    out_channels: usize,
    #[serde(default = "default_block_out")]
    decoder_block_out_channels: Vec<usize>,
    #[serde(default = "default_num_blocks")]
    num_decoder_blocks: Vec<usize>,
    #[serde(default = "default_upsampling")]
    upsampling_scaling_factor: usize,
    #[serde(default = "default_act")]
    act_fn: String,
    #[serde(default = "default_upsample_fn")]
    upsample_fn: String,
}

fn default_latent_channels() -> usize {
    4
}
fn default_out_channels() -> usize {
    3
}
fn default_block_out() -> Vec<usize> {
    vec![64; 4]
}
fn default_num_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn default_upsampling() -> usize {
    2
}
fn default_act() -> String {
    "relu".to_owned()
}
fn default_upsample_fn() -> String {
    "nearest".to_owned()
}

/// One entry of the decoder's sequence.
enum Layer {
    /// Conv 3×3; `relu` applies a ReLU after it (only the first convolution has one).
    Conv {
        conv: Conv2d,
        relu: bool,
    },
    /// conv-relu-conv-relu-conv, plus the input (or a 1×1 skip conv), then ReLU.
    Block {
        convs: Box<[Conv2d; 3]>,
        skip: Option<Conv2d>,
    },
    Upsample(usize),
}

/// A tensor the decoder reads: its index-relative name and shape.
struct Param {
    name: String,
    shape: Vec<usize>,
}

/// Every parameter the config implies, in order, with names relative to the layout's prefix.
fn parameters(config: &TinyDecoderConfig) -> Result<Vec<Param>> {
    let stages = config.num_blocks.len();
    if stages == 0 || config.block_out_channels.len() != stages {
        return Err(Error::InvalidParameter(format!(
            "a TAESD decoder needs as many stage channel counts as block counts \
             ({:?} vs {:?})",
            config.block_out_channels, config.num_blocks
        )));
    }
    let (_, mut index) = config.layout.prefix_and_start();
    let mut out = Vec::new();
    let conv = |out: &mut Vec<Param>, i: usize, sub: &str, o: usize, n: usize, bias: bool| {
        out.push(Param {
            name: format!("{i}.{sub}weight"),
            shape: vec![o, n, 3, 3],
        });
        if bias {
            out.push(Param {
                name: format!("{i}.{sub}bias"),
                shape: vec![o],
            });
        }
    };
    let c0 = config.block_out_channels[0];
    conv(&mut out, index, "", c0, config.latent_channels, true);
    index += 2; // the convolution and its ReLU
    let mut channels = c0;
    for (stage, (&n_blocks, &c)) in config
        .num_blocks
        .iter()
        .zip(&config.block_out_channels)
        .enumerate()
    {
        for _ in 0..n_blocks {
            conv(&mut out, index, "conv.0.", c, channels, true);
            conv(&mut out, index, "conv.2.", c, c, true);
            conv(&mut out, index, "conv.4.", c, c, true);
            if channels != c {
                out.push(Param {
                    name: format!("{index}.skip.weight"),
                    shape: vec![c, channels, 1, 1],
                });
            }
            channels = c;
            index += 1;
        }
        if stage + 1 < stages {
            index += 1; // upsample
            conv(&mut out, index, "", c, c, false);
        } else {
            conv(&mut out, index, "", config.out_channels, c, true);
        }
        index += 1;
    }
    Ok(out)
}

/// madebyollin's Tiny AutoEncoder for Stable Diffusion (TAESD), the decoder half: from
/// UNet-space latents to an image at 8× their size, in `[0, 1]`.
pub struct TinyDecoder {
    layers: Vec<Layer>,
    config: TinyDecoderConfig,
    device: Device,
    dtype: DType,
}

impl TinyDecoder {
    /// Builds the decoder from `vb` (rooted at the checkpoint's top level; names follow
    /// `config.layout`). With a `candle_nn::VarMap` this makes a random-weight decoder that
    /// [`candle_core::safetensors::save`] can write for tests.
    pub fn new(vb: &VarBuilder, config: TinyDecoderConfig) -> Result<TinyDecoder> {
        let (prefix, start) = config.layout.prefix_and_start();
        let vb = match prefix.strip_suffix('.') {
            Some(p) => vb.pp(p),
            None => vb.clone(),
        };
        let pad = Conv2dConfig {
            padding: 1,
            ..Conv2dConfig::default()
        };
        let conv3 = |vb: VarBuilder, o: usize, n: usize| -> Result<Conv2d> {
            Conv2d::with_winograd(candle_nn::conv2d(n, o, 3, pad, vb)?, TAESD_WINOGRAD)
        };
        let mut index = start;
        let c0 = config.block_out_channels.first().copied().unwrap_or(0);
        // Validates the config's stage lists.
        parameters(&config)?;
        let mut layers = vec![Layer::Conv {
            conv: conv3(vb.pp(index), c0, config.latent_channels)?,
            relu: true,
        }];
        index += 2;
        let mut channels = c0;
        let stages = config.num_blocks.len();
        for (stage, (&n_blocks, &c)) in config
            .num_blocks
            .iter()
            .zip(&config.block_out_channels)
            .enumerate()
        {
            for _ in 0..n_blocks {
                let b = vb.pp(index).pp("conv");
                let convs = Box::new([
                    conv3(b.pp(0), c, channels)?,
                    conv3(b.pp(2), c, c)?,
                    conv3(b.pp(4), c, c)?,
                ]);
                let skip = if channels == c {
                    None
                } else {
                    Some(Conv2d::new(candle_nn::conv2d_no_bias(
                        channels,
                        c,
                        1,
                        Conv2dConfig::default(),
                        vb.pp(index).pp("skip"),
                    )?)?)
                };
                layers.push(Layer::Block { convs, skip });
                channels = c;
                index += 1;
            }
            if stage + 1 < stages {
                layers.push(Layer::Upsample(config.upsampling_scaling_factor));
                index += 1;
                let conv = Conv2d::with_winograd(
                    candle_nn::conv2d_no_bias(c, c, 3, pad, vb.pp(index))?,
                    TAESD_WINOGRAD,
                )?;
                layers.push(Layer::Conv { conv, relu: false });
            } else {
                layers.push(Layer::Conv {
                    conv: conv3(vb.pp(index), config.out_channels, c)?,
                    relu: false,
                });
            }
            index += 1;
        }
        Ok(TinyDecoder {
            layers,
            config,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a TAESD decoder from
    /// - a diffusers `AutoencoderTiny` folder (`config.json` + `diffusion_pytorch_model.safetensors`,
    ///   e.g. `madebyollin/taesd`) or that safetensors file;
    /// - madebyollin's `taesd_decoder.safetensors` / `taesdxl_decoder.safetensors` (or a folder
    ///   holding one); the same names under a `taesd_decoder.` or `decoder.` prefix load too.
    ///
    /// Without `config.json` the shape (channels, blocks per stage) is read from the tensors.
    /// madebyollin's `taesd_decoder.pth` and diffusers' `diffusion_pytorch_model.bin` (pickles)
    /// are read by Studio's own reader, as data. Weights are kept in `f32` on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<TinyDecoder> {
        let (file, config_path) = resolve(path)?;
        let checkpoint = crate::weights::open_checkpoint(std::slice::from_ref(&file))?;
        let tensors: HashMap<String, Tensor> = checkpoint
            .tensors()
            .into_iter()
            .map(|(name, _)| {
                let t =
                    checkpoint
                        .load(&name, &Device::Cpu)
                        .map_err(|e| Error::CorruptWeights {
                            path: file.clone(),
                            message: e.to_string(),
                        })?;
                Ok((name, t))
            })
            .collect::<Result<_>>()?;
        let (layout, outer) = detect_layout(&file, &tensors)?;
        // Names relative to the layout (without an outer prefix such as `taesd_decoder.`).
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(outer).map(|k| (k.to_owned(), v)))
            .collect();
        let config = match config_path {
            Some(cp) => read_config(&cp, layout)?,
            None => infer_config(&tensors, layout),
        };
        let (prefix, _) = layout.prefix_and_start();
        let mut needed = HashMap::new();
        for p in parameters(&config)? {
            let name = format!("{prefix}{}", p.name);
            let Some(t) = tensors.get(&name) else {
                return Err(Error::MissingTensor {
                    path: file,
                    name: format!("{outer}{name}"),
                });
            };
            if t.dims() != p.shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    path: file,
                    name: format!("{outer}{name}"),
                    expected: p.shape,
                    found: t.dims().to_vec(),
                });
            }
            needed.insert(name, t.to_device(device)?);
        }
        let vb = VarBuilder::from_tensors(needed, DType::F32, device);
        TinyDecoder::new(&vb, config)
    }

    /// The shape the decoder was built with.
    pub fn config(&self) -> &TinyDecoderConfig {
        &self.config
    }

    /// Decodes UNet-space latents (the sampler's latents as they are, *not* divided by the VAE
    /// scaling factor; see the module docs), `(N, C, h, w)` or `(C, h, w)`, any dtype or device,
    /// to images `(N, 3, 8h, 8w)` `f32` in `[0, 1]` (clamped) on the decoder's device.
    ///
    /// (diffusers' `AutoencoderTiny.decode` returns the same image as `2x − 1`, in `[-1, 1]`,
    /// unclamped.)
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let x = match latents.rank() {
            3 => latents.unsqueeze(0)?,
            4 => latents.clone(),
            _ => {
                return Err(Error::InvalidParameter(format!(
                    "TAESD needs (N, C, h, w) or (C, h, w) latents, not {:?}",
                    latents.dims()
                )));
            }
        };
        if x.dim(1)? != self.config.latent_channels {
            return Err(Error::InvalidParameter(format!(
                "this TAESD decoder takes {} latent channels, the latents have {}",
                self.config.latent_channels,
                x.dim(1)?
            )));
        }
        let x = x.to_device(&self.device)?.to_dtype(self.dtype)?;
        // The input clamp: tanh(x / 3) · 3.
        let mut x = ((x / 3.0)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            x = match layer {
                Layer::Conv { conv, relu } => {
                    let y = conv.forward(&x)?;
                    if *relu { y.relu()? } else { y }
                }
                Layer::Block { convs, skip } => {
                    let y = convs[0].forward(&x)?.relu()?;
                    let y = convs[1].forward(&y)?.relu()?;
                    let y = convs[2].forward(&y)?;
                    let s = match skip {
                        Some(s) => s.forward(&x)?,
                        None => x.clone(),
                    };
                    (y + s)?.relu()?
                }
                Layer::Upsample(f) => {
                    let (h, w) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
                    x.upsample_nearest2d(h * f, w * f)?
                }
            };
        }
        Ok(x.clamp(0f32, 1f32)?)
    }

    /// Decodes the first latent of the batch to an image (8× the latent size).
    pub fn decode_to_image(&self, latents: &Tensor) -> Result<RgbImage> {
        let img = self.decode(latents)?.get(0)?;
        // [0, 1] → [-1, 1], the convention `tensor_to_image` reads.
        let img = ((img.to_dtype(DType::F32)? * 2.0)? - 1.0)?;
        super::imaging::tensor_to_image(&img)
    }
}

/// A diffusers `AutoencoderTiny` folder's weights (safetensors first; the `.bin` is a pickle
/// Studio reads as data).
const DIFFUSERS_WEIGHTS: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
];
/// madebyollin's decoders (the `.pth` are pickles Studio reads as data).
const ORIGINAL_WEIGHTS: [&str; 4] = [
    "taesd_decoder.safetensors",
    "taesdxl_decoder.safetensors",
    "taesd_decoder.pth",
    "taesdxl_decoder.pth",
];

/// The weights file and, for a diffusers folder, its `config.json`.
fn resolve(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if !path.exists() {
        return Err(Error::NotFound(path.to_path_buf()));
    }
    if path.is_file() {
        let config = path.parent().map(|d| d.join("config.json")).filter(|c| {
            path.file_name()
                .is_some_and(|n| DIFFUSERS_WEIGHTS.iter().any(|w| n == *w))
                && c.is_file()
        });
        return Ok((path.to_path_buf(), config));
    }
    for name in DIFFUSERS_WEIGHTS {
        let weights = path.join(name);
        if weights.is_file() {
            let config = path.join("config.json");
            return Ok((weights, config.is_file().then_some(config)));
        }
    }
    for name in ORIGINAL_WEIGHTS {
        let file = path.join(name);
        if file.is_file() {
            return Ok((file, None));
        }
    }
    Err(Error::InvalidParameter(format!(
        "{}: no TAESD decoder here (expected config.json with \
         diffusion_pytorch_model.safetensors, or taesd_decoder.safetensors / \
         taesdxl_decoder.safetensors)",
        path.display()
    )))
}

/// Which naming the file uses, from its first convolution's name, and the outer prefix of
/// madebyollin-layout names (`taesd_decoder.` in ComfyUI-style files, `decoder.` when saved
/// with the encoder, or none).
fn detect_layout(
    file: &Path,
    tensors: &HashMap<String, Tensor>,
) -> Result<(TaesdLayout, &'static str)> {
    if tensors.contains_key("decoder.layers.0.weight") {
        return Ok((TaesdLayout::Diffusers, ""));
    }
    for outer in ["", "taesd_decoder.", "decoder."] {
        if tensors.contains_key(&format!("{outer}1.weight")) {
            return Ok((TaesdLayout::Original, outer));
        }
    }
    if tensors.keys().any(|k| k.starts_with("decoder.layers.")) {
        Err(Error::MissingTensor {
            path: file.to_path_buf(),
            name: "decoder.layers.0.weight".to_owned(),
        })
    } else {
        Err(Error::InvalidParameter(format!(
            "{}: not a TAESD decoder (neither `decoder.layers.0.weight`, as diffusers names it, \
             nor `1.weight`, as taesd_decoder.safetensors does)",
            file.display()
        )))
    }
}

fn read_config(path: &Path, layout: TaesdLayout) -> Result<TinyDecoderConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |message: String| Error::BadConfig {
        path: path.to_path_buf(),
        message,
    };
    let c: DiffusersConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if c.act_fn != "relu" {
        return Err(bad(format!(
            "act_fn `{}`: TAESD decoders use relu",
            c.act_fn
        )));
    }
    if c.upsample_fn != "nearest" {
        return Err(bad(format!(
            "upsample_fn `{}`: TAESD decoders use nearest",
            c.upsample_fn
        )));
    }
    Ok(TinyDecoderConfig {
        latent_channels: c.latent_channels,
        out_channels: c.out_channels,
        block_out_channels: c.decoder_block_out_channels,
        num_blocks: c.num_decoder_blocks,
        upsampling_scaling_factor: c.upsampling_scaling_factor,
        layout,
    })
}

/// The decoder's shape read from its tensors: walks the sequence, counting residual blocks
/// (`N.conv.0.weight`) until the convolution that follows each stage. Tensors that turn out
/// missing are reported by the load that follows.
fn infer_config(tensors: &HashMap<String, Tensor>, layout: TaesdLayout) -> TinyDecoderConfig {
    let (prefix, start) = layout.prefix_and_start();
    let name = |i: usize, rest: &str| format!("{prefix}{i}.{rest}");
    let dims = |n: &str| tensors.get(n).map(|t| t.dims().to_vec());
    let mut config = TinyDecoderConfig {
        layout,
        ..TinyDecoderConfig::default()
    };
    if let Some(d) = dims(&name(start, "weight")) {
        config.latent_channels = d.get(1).copied().unwrap_or(config.latent_channels);
    }
    let mut index = start + 2;
    let mut blocks = Vec::new();
    let mut channels = Vec::new();
    // A stage: blocks, then either the final convolution (with a bias) or an upsample followed
    // by a bias-free convolution. Bounded so a strange file cannot loop for long.
    for _ in 0..64 {
        let mut n = 0;
        let mut c = None;
        while let Some(d) = dims(&name(index, "conv.0.weight")) {
            c = d.first().copied();
            n += 1;
            index += 1;
        }
        if let Some(d) = dims(&name(index, "weight")) {
            // The final convolution.
            blocks.push(n);
            channels.push(c.or_else(|| d.get(1).copied()).unwrap_or(64));
            config.out_channels = d.first().copied().unwrap_or(3);
            break;
        }
        if let Some(d) = dims(&name(index + 1, "weight")) {
            blocks.push(n);
            channels.push(c.or_else(|| d.first().copied()).unwrap_or(64));
            index += 2;
        } else {
            break;
        }
    }
    if !blocks.is_empty() {
        config.num_blocks = blocks;
        config.block_out_channels = channels;
    }
    config
}
