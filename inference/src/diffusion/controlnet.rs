//! ControlNet (diffusers' `ControlNetModel`): a trainable copy of the UNet's encoder half that
//! reads a control image (edges, a scribble, depth, a pose) and adds its residuals to the
//! UNet's skip connections and middle block, for SD 1.x/2.x and SDXL.
//!
//! Loads diffusers folders (`config.json` + `diffusion_pytorch_model.safetensors`) and single
//! files in either diffusers' names or the original ones (lllyasviel's `control_model.…`, as
//! the SD web UI's extension and ComfyUI share them; mapped by
//! [`super::convert::controlnet_key_map`]). A single file's shape is read from its tensors, or
//! from a ControlNet `config.json` beside it. Checked against diffusers on tiny random-weight
//! models (`tests/fixtures/controlnet`, made by `tools/make_controlnet_fixture.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::imaging::RgbImage;
use super::model::{bad, component_error, component_files, device_dtype};
use super::unet::{TimeEmbedding, UnetConfig, encoder, run_encoder};
use super::unet_blocks::{DownBlock, MidBlock};
use crate::error::{Error, Result};
use crate::nn::{Conv2d, with_weight_storage};
use crate::weights::{Tensors, open_checkpoint, stored_storage};

/// What a ControlNet adds to the UNet: one residual per skip connection, and one for the
/// middle block's output.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// Added to the skip connections, in the order the down blocks make them.
    pub down: Vec<Tensor>,
    /// Added to the middle block's output.
    pub mid: Tensor,
}

impl ControlResiduals {
    /// The sum of two units' residuals (several ControlNets at once add up).
    pub fn add(&self, other: &ControlResiduals) -> Result<ControlResiduals> {
        if self.down.len() != other.down.len() {
            return Err(Error::InvalidParameter(
                "these ControlNets are made for different base models".into(),
            ));
        }
        let down = self
            .down
            .iter()
            .zip(&other.down)
            .map(|(a, b)| Ok((a + b)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(ControlResiduals {
            down,
            mid: (&self.mid + &other.mid)?,
        })
    }
}

/// A ControlNet's shape: the UNet's encoder half plus the control image's encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetConfig {
    /// The copied UNet's shape (its `out_channels` is unused).
    pub unet: UnetConfig,
    /// Channels of the control image (3).
    pub conditioning_channels: usize,
    /// Widths of the control image encoder's convolutions (`(16, 32, 96, 256)`: one stride-2
    /// convolution between consecutive widths, so four widths take the image to latent size).
    pub embedding_channels: Vec<usize>,
    /// The control image is given in BGR order (`controlnet_conditioning_channel_order`).
    pub bgr: bool,
    /// Residuals averaged over the image (`global_pool_conditions`: the shuffle model).
    pub global_pool: bool,
}

#[derive(Deserialize)]
struct RawExtra {
    #[serde(default = "three")]
    conditioning_channels: usize,
    #[serde(default = "embedding_default")]
    conditioning_embedding_out_channels: Vec<usize>,
    #[serde(default)]
    controlnet_conditioning_channel_order: Option<String>,
    #[serde(default)]
    global_pool_conditions: bool,
}

fn three() -> usize {
    3
}
fn embedding_default() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

impl ControlNetConfig {
    /// Parses diffusers' ControlNet `config.json`.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let unet = UnetConfig::from_json(text)?;
        let extra: RawExtra = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if extra.conditioning_embedding_out_channels.is_empty() {
            return Err("conditioning_embedding_out_channels is empty".into());
        }
        Ok(Self {
            unet,
            conditioning_channels: extra.conditioning_channels,
            embedding_channels: extra.conditioning_embedding_out_channels,
            bgr: extra.controlnet_conditioning_channel_order.as_deref() == Some("bgr"),
            global_pool: extra.global_pool_conditions,
        })
    }

    /// Reads the shape from diffusers-named tensors (a single file without a config).
    pub fn infer(
        names: &[&str],
        shape: &dyn Fn(&str) -> Option<Vec<usize>>,
    ) -> std::result::Result<Self, String> {
        let unet = UnetConfig::infer(names, shape)?;
        let need = |name: &str| shape(name).ok_or_else(|| format!("missing tensor `{name}`"));
        let conv_in = need("controlnet_cond_embedding.conv_in.weight")?;
        let mut embedding_channels = vec![conv_in[0]];
        // blocks.(2i) keeps width i, blocks.(2i+1) goes to width i+1 at half the size.
        let mut k = 1;
        while let Some(s) = shape(&format!("controlnet_cond_embedding.blocks.{k}.weight")) {
            embedding_channels.push(s[0]);
            k += 2;
        }
        Ok(Self {
            unet,
            conditioning_channels: conv_in[1],
            embedding_channels,
            bgr: false,
            global_pool: false,
        })
    }
}

/// diffusers' `ControlNetConditioningEmbedding`: 3×3 convolutions with SiLU between, a
/// stride-2 one between consecutive widths, then `conv_out` to the UNet's first width.
struct CondEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

fn conv3x3(vb: VarBuilder, c_in: usize, c_out: usize, stride: usize) -> Result<Conv2d> {
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    Conv2d::new(candle_nn::conv2d(c_in, c_out, 3, cfg, vb)?)
}

impl CondEmbedding {
    fn new(vb: &VarBuilder, c: &ControlNetConfig) -> Result<Self> {
        let w = &c.embedding_channels;
        let conv_in = conv3x3(vb.pp("conv_in"), c.conditioning_channels, w[0], 1)?;
        let mut blocks = Vec::new();
        for i in 0..w.len() - 1 {
            let k = blocks.len();
            blocks.push(conv3x3(vb.pp(format!("blocks.{k}")), w[i], w[i], 1)?);
            blocks.push(conv3x3(
                vb.pp(format!("blocks.{}", k + 1)),
                w[i],
                w[i + 1],
                2,
            )?);
        }
        let last = w[w.len() - 1];
        let conv_out = conv3x3(vb.pp("conv_out"), last, c.unet.levels[0].channels, 1)?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = candle_nn::ops::silu(&self.conv_in.forward(xs)?)?;
        for block in &self.blocks {
            xs = candle_nn::ops::silu(&block.forward(&xs)?)?;
        }
        self.conv_out.forward(&xs)
    }
}

/// A loaded ControlNet.
pub struct ControlNet {
    conv_in: Conv2d,
    time: TimeEmbedding,
    cond_embedding: CondEmbedding,
    down: Vec<DownBlock>,
    mid: MidBlock,
    zero_down: Vec<Conv2d>,
    zero_mid: Conv2d,
    config: ControlNetConfig,
    path: PathBuf,
}

impl std::fmt::Debug for ControlNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlNet")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn conv1x1(vb: VarBuilder, c: usize) -> Result<Conv2d> {
    Conv2d::new(candle_nn::conv2d(
        c,
        c,
        1,
        candle_nn::Conv2dConfig::default(),
        vb,
    )?)
}

impl ControlNet {
    /// Builds the network with `config`'s shape from diffusers-named weights.
    pub fn new(vb: &VarBuilder, config: ControlNetConfig, path: PathBuf) -> Result<Self> {
        let c = &config.unet;
        if c.levels.is_empty() {
            return Err(Error::InvalidParameter(
                "a ControlNet needs at least one level".into(),
            ));
        }
        let b0 = c.levels[0].channels;
        let conv_in = conv3x3(vb.pp("conv_in"), c.in_channels, b0, 1)?;
        let time = TimeEmbedding::new(vb, c)?;
        let cond_embedding = CondEmbedding::new(&vb.pp("controlnet_cond_embedding"), &config)?;
        let (down, mid) = encoder(vb, c)?;
        // One zero convolution per skip connection: conv_in's output, then each resnet's and
        // each downsampler's.
        let mut widths = vec![b0];
        for (i, level) in c.levels.iter().enumerate() {
            widths.extend(std::iter::repeat_n(level.channels, c.layers_per_block));
            if i + 1 < c.levels.len() {
                widths.push(level.channels);
            }
        }
        let zero_down = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| conv1x1(vb.pp(format!("controlnet_down_blocks.{i}")), w))
            .collect::<Result<Vec<_>>>()?;
        let last = c.levels[c.levels.len() - 1].channels;
        let zero_mid = conv1x1(vb.pp("controlnet_mid_block"), last)?;
        Ok(Self {
            conv_in,
            time,
            cond_embedding,
            down,
            mid,
            zero_down,
            zero_mid,
            config,
            path,
        })
    }

    /// Loads a diffusers folder or a single file (diffusers or original names) for `device`
    /// (f32 on the CPU, f16 on a GPU).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let dtype = device_dtype(device);
        if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let config = ControlNetConfig::from_json(&text).map_err(|m| bad(&cfg_path, m))?;
            let st = open_checkpoint(&component_files(path, "diffusion_pytorch_model")?)?;
            return Self::from_tensors(st, None, Some(config), path, dtype, device);
        }
        let st = open_checkpoint(&[path.to_owned()])?;
        // A ControlNet config.json beside a single file gives its shape (diffusers'
        // `from_single_file(config=…)`); released files are read from their tensors.
        let beside = path
            .parent()
            .map(|d| d.join("config.json"))
            .filter(|p| p.is_file())
            .and_then(|p| {
                let text = std::fs::read_to_string(&p).ok()?;
                text.contains("ControlNetModel")
                    .then(|| ControlNetConfig::from_json(&text).map_err(|m| bad(&p, m)))
            })
            .transpose()?;
        let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let map = if refs
            .iter()
            .any(|n| n.starts_with("controlnet_cond_embedding."))
        {
            None
        } else {
            Some(super::convert::controlnet_key_map(&refs).map_err(|e| bad(path, e.to_string()))?)
        };
        Self::from_tensors(st, map, beside, path, dtype, device)
    }

    fn from_tensors(
        st: Tensors,
        map: Option<HashMap<String, super::convert::Source>>,
        config: Option<ControlNetConfig>,
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let stored = stored_storage(&st);
        let shapes: HashMap<String, Vec<usize>> = match &map {
            Some(map) => {
                let all: HashMap<String, Vec<usize>> = st
                    .tensors()
                    .into_iter()
                    .map(|(n, v)| (n, v.shape().to_vec()))
                    .collect();
                map.iter()
                    .filter_map(|(name, src)| {
                        Some((name.clone(), all.get(src.ldm_name())?.clone()))
                    })
                    .collect()
            }
            None => st
                .tensors()
                .into_iter()
                .map(|(n, v)| (n, v.shape().to_vec()))
                .collect(),
        };
        let config = if let Some(c) = config {
            c
        } else {
            let names: Vec<&str> = shapes.keys().map(String::as_str).collect();
            ControlNetConfig::infer(&names, &|n| shapes.get(n).cloned())
                .map_err(|m| bad(path, m))?
        };
        let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = match map {
            Some(map) => super::convert::backend(Arc::new(st), map),
            // On the CPU every tensor is copied out of the mapping, whose pages are released.
            None if device.is_cpu() => Box::new(crate::weights::ReleasingMmap(st)),
            None => Box::new(st),
        };
        let vb = VarBuilder::from_backend(backend, dtype, device.clone());
        with_weight_storage(stored, || Self::new(&vb, config, path.to_owned()))
            .map_err(|e| component_error(path, &e))
    }

    /// The shape it was built with.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The file or folder it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The residuals for latents `xs` (`(batch, 4, h, w)`, already scaled for the step) and
    /// the control image `cond` (`(batch, 3, 8h, 8w)`, values 0 to 1, RGB), scaled by
    /// `scale`. In guess mode the residuals grow from 0.1·scale at the first skip connection
    /// to scale at the middle block (diffusers' `logspace(-1, 0)`), so the ControlNet guides
    /// even without a prompt.
    #[allow(clippy::too_many_arguments)] // diffusers' forward, argument for argument
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        text_time: Option<(&Tensor, &Tensor)>,
        cond: &Tensor,
        scale: f64,
        guess_mode: bool,
    ) -> Result<ControlResiduals> {
        let hint = self.embed(cond, xs.dtype())?;
        self.forward_embedded(xs, timestep, context, text_time, &hint, scale, guess_mode)
    }

    /// The control image's embedding, at latent size, in `dtype`. It does not change over a
    /// generation's steps, so the pipeline makes it once per unit and calls
    /// [`Self::forward_embedded`] at each step.
    pub fn embed(&self, cond: &Tensor, dtype: DType) -> Result<Tensor> {
        let cond = if self.config.bgr {
            Tensor::cat(
                &[
                    cond.narrow(1, 2, 1)?,
                    cond.narrow(1, 1, 1)?,
                    cond.narrow(1, 0, 1)?,
                ],
                1,
            )?
        } else {
            cond.clone()
        };
        self.cond_embedding.forward(&cond.to_dtype(dtype)?)
    }

    /// [`Self::forward`] with the control image already embedded ([`Self::embed`]).
    #[allow(clippy::too_many_arguments)] // diffusers' forward, argument for argument
    pub fn forward_embedded(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        text_time: Option<(&Tensor, &Tensor)>,
        hint: &Tensor,
        scale: f64,
        guess_mode: bool,
    ) -> Result<ControlResiduals> {
        let temb = self.time.forward(xs, timestep, text_time)?;
        let xs = self.conv_in.forward(xs)?;
        if hint.dims() != xs.dims() {
            return Err(Error::InvalidParameter(format!(
                "the control image encodes to {:?} but the latents are {:?}: the image must be \
                 the VAE's factor (8 for SD) times the latents' size",
                hint.dims(),
                xs.dims()
            )));
        }
        let (xs, skips) = run_encoder(&self.down, &self.mid, (xs + hint)?, &temb, context)?;
        if skips.len() != self.zero_down.len() {
            return Err(Error::InvalidParameter(format!(
                "the ControlNet made {} skip connections for {} zero convolutions",
                skips.len(),
                self.zero_down.len()
            )));
        }
        let n = skips.len();
        let weight = |i: usize| {
            if guess_mode && !self.config.global_pool {
                // logspace(-1, 0, n + 1)[i]
                scale * 10f64.powf(-1.0 + i as f64 / n as f64)
            } else {
                scale
            }
        };
        let pool = |t: Tensor| -> Result<Tensor> {
            if self.config.global_pool {
                Ok(t.mean_keepdim(3)?.mean_keepdim(2)?)
            } else {
                Ok(t)
            }
        };
        let down = skips
            .iter()
            .zip(&self.zero_down)
            .enumerate()
            .map(|(i, (s, z))| pool((z.forward(s)? * weight(i))?))
            .collect::<Result<Vec<_>>>()?;
        let mid = pool((self.zero_mid.forward(&xs)? * weight(n))?)?;
        Ok(ControlResiduals { down, mid })
    }
}

/// One ControlNet unit of a generation: a loaded network, its control image (already
/// preprocessed: edges, a scribble, a depth map…) and how strongly and when it guides.
#[derive(Debug, Clone)]
pub struct ControlUnit {
    /// The network.
    pub net: Arc<ControlNet>,
    /// The control image; resized to the generation's size when it differs.
    pub image: RgbImage,
    /// The preprocessor that made `image` (`none` when the user supplied it as is), for the
    /// PNG parameters.
    pub module: String,
    /// Residual scale (the web UI's "Control Weight", 0 to 2).
    pub weight: f64,
    /// The share of the steps at which it starts guiding (0 to 1).
    pub start: f64,
    /// The share of the steps after which it stops (`start` to 1).
    pub end: f64,
    /// Guess mode: the unit guides only the prompt's pass, with residuals growing from the
    /// highest resolution down (the web UI's "ControlNet is more important").
    pub guess_mode: bool,
}

impl PartialEq for ControlUnit {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.net, &other.net)
            && self.image == other.image
            && self.module == other.module
            && self.weight == other.weight
            && self.start == other.start
            && self.end == other.end
            && self.guess_mode == other.guess_mode
    }
}

impl ControlUnit {
    /// A unit guiding every step at weight 1, with an image used as it is.
    pub fn new(net: Arc<ControlNet>, image: RgbImage) -> Self {
        Self {
            net,
            image,
            module: "none".into(),
            weight: 1.0,
            start: 0.0,
            end: 1.0,
            guess_mode: false,
        }
    }

    /// Whether it guides step `i` of `steps` (diffusers' rule: off while `i / steps < start`
    /// or `(i + 1) / steps > end`).
    pub fn active(&self, i: usize, steps: usize) -> bool {
        let n = steps as f64;
        !((i as f64) / n < self.start || ((i + 1) as f64) / n > self.end)
    }

    /// Checks the weight and the step range.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=2.0).contains(&self.weight) {
            return Err(Error::InvalidParameter(format!(
                "ControlNet weight {} is out of range (0 to 2)",
                self.weight
            )));
        }
        if !(0.0..=1.0).contains(&self.start) || !(self.start..=1.0).contains(&self.end) {
            return Err(Error::InvalidParameter(format!(
                "ControlNet steps {}–{} are out of range: 0 ≤ start ≤ end ≤ 1",
                self.start, self.end
            )));
        }
        self.image.check()
    }

    /// The web UI extension's PNG entry: `Module: canny, Model: name, Weight: 1, …`.
    pub fn parameters(&self) -> String {
        let name = self
            .net
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mode = if self.guess_mode {
            "ControlNet is more important"
        } else {
            "Balanced"
        };
        format!(
            "Module: {}, Model: {name}, Weight: {}, Guidance Start: {}, Guidance End: {}, \
             Control Mode: {mode}",
            self.module, self.weight, self.start, self.end
        )
    }
}

/// A ControlNet unit as the window asks for it: the network by path (the worker loads it,
/// keeping the ones in use), the image before preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlSpec {
    /// The ControlNet file or folder.
    pub model: PathBuf,
    /// The image the preprocessor reads (or the control map itself, with no preprocessor).
    pub image: RgbImage,
    /// What makes the control map from `image`.
    pub preprocessor: super::annotators::Preprocessor,
    /// See [`ControlUnit::weight`].
    pub weight: f64,
    /// See [`ControlUnit::start`].
    pub start: f64,
    /// See [`ControlUnit::end`].
    pub end: f64,
    /// See [`ControlUnit::guess_mode`].
    pub guess_mode: bool,
}

impl ControlSpec {
    /// The unit with `net` loaded and the control map made.
    pub fn unit(&self, net: Arc<ControlNet>) -> ControlUnit {
        ControlUnit {
            net,
            image: self.preprocessor.apply(&self.image),
            module: self.preprocessor.name().to_owned(),
            weight: self.weight,
            start: self.start,
            end: self.end,
            guess_mode: self.guess_mode,
        }
    }
}

/// The control image as a `(1, 3, h, w)` tensor of values 0 to 1, at `width`×`height`.
pub fn control_tensor(
    image: &RgbImage,
    width: u32,
    height: u32,
    device: &Device,
) -> Result<Tensor> {
    let img = image.resized(width, height);
    let (w, h) = (width as usize, height as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, px) in img.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = f32::from(px[c]) / 255.0;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
}
