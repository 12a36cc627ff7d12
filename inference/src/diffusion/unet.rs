//! The denoising UNet (diffusers `UNet2DConditionModel` names), assembled from Studio's own
//! blocks in [`super::unet_blocks`] (which follow diffusers' math: `norm_num_groups` in every
//! GroupNorm, GEGLU with the exact GELU) and candle-transformers' timestep embedding. It adds
//! SDXL's "text_time" conditioning (`add_time_proj` + `add_embedding`: the pooled text
//! embedding and the original-size/crop/target-size ids), which SDXL checkpoints need to
//! produce sensible images, and takes its shape from `unet/config.json` or from the tensors
//! themselves.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use serde::Deserialize;
use serde_json::Value;

use super::unet_blocks::{AttentionConfig, BlockConfig, DownBlock, MidBlock, UpBlock};
use crate::error::{Error, Result};

/// One resolution level of the UNet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// Channels of the level's feature maps (diffusers' `block_out_channels[i]`).
    pub channels: usize,
    /// Transformer blocks per attention (`None`: no cross-attention at this level).
    pub transformer_layers: Option<usize>,
    /// Attention heads at this level (the last level's also serve the mid block).
    pub heads: usize,
}

/// The UNet's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetConfig {
    /// Input channels: 4 latent channels, or 9 for inpainting UNets (latents, mask and
    /// masked-image latents).
    pub in_channels: usize,
    /// Output channels: 4, the predicted noise (or v) per latent channel.
    pub out_channels: usize,
    /// The resolution levels from the full latent size down, each after the first at half
    /// the previous size.
    pub levels: Vec<Level>,
    /// Resnets per down block; up blocks have one more.
    pub layers_per_block: usize,
    /// Width of the text conditioning cross-attention reads (768 for SD 1.x, 1024 for
    /// SD 2.x, 2048 for SDXL).
    pub cross_attention_dim: usize,
    /// Whether the transformers' `proj_in`/`proj_out` are linear layers rather than 1×1
    /// convolutions (SD 2.x, SDXL).
    pub use_linear_projection: bool,
    /// Groups of every GroupNorm (32).
    pub norm_num_groups: usize,
    /// Epsilon of every GroupNorm (1e-5).
    pub norm_eps: f64,
    /// SDXL's `addition_embed_type: "text_time"`: (time id embedding size, input size of
    /// `add_embedding`).
    pub text_time: Option<(usize, usize)>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default = "four")]
    in_channels: usize,
    #[serde(default = "four")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    #[serde(default = "two")]
    layers_per_block: usize,
    #[serde(default)]
    attention_head_dim: Option<Value>,
    #[serde(default)]
    num_attention_heads: Option<Value>,
    cross_attention_dim: Value,
    #[serde(default)]
    transformer_layers_per_block: Option<Value>,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default = "groups")]
    norm_num_groups: usize,
    #[serde(default = "eps")]
    norm_eps: f64,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
}

fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn groups() -> usize {
    32
}
fn eps() -> f64 {
    1e-5
}

/// An int or a per-level list of ints, as diffusers configs write them.
fn per_level(
    v: Option<&Value>,
    n: usize,
    default: usize,
) -> std::result::Result<Vec<usize>, String> {
    match v {
        None | Some(Value::Null) => Ok(vec![default; n]),
        Some(Value::Number(x)) => {
            let x = x.as_u64().ok_or("expected a positive integer")? as usize;
            Ok(vec![x; n])
        }
        Some(Value::Array(a)) if a.len() == n => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| "expected integers".to_owned())
            })
            .collect(),
        Some(other) => Err(format!(
            "expected an integer or {n} integers, found {other}"
        )),
    }
}

impl UnetConfig {
    /// Parses diffusers' `unet/config.json`.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let n = raw.block_out_channels.len();
        if n == 0 || raw.down_block_types.len() != n {
            return Err("block_out_channels and down_block_types must have the same length".into());
        }
        // diffusers' legacy naming: `attention_head_dim` holds the head *count* unless
        // `num_attention_heads` is given.
        let heads = per_level(
            raw.num_attention_heads
                .as_ref()
                .or(raw.attention_head_dim.as_ref()),
            n,
            8,
        )?;
        let tlayers = per_level(raw.transformer_layers_per_block.as_ref(), n, 1)?;
        let cross = match &raw.cross_attention_dim {
            Value::Number(x) => x.as_u64().ok_or("cross_attention_dim")? as usize,
            Value::Array(a) => a
                .first()
                .and_then(Value::as_u64)
                .ok_or("cross_attention_dim")? as usize,
            _ => return Err("cross_attention_dim must be an integer".into()),
        };
        let levels = (0..n)
            .map(|i| Level {
                channels: raw.block_out_channels[i],
                transformer_layers: raw.down_block_types[i]
                    .contains("CrossAttn")
                    .then_some(tlayers[i]),
                heads: heads[i],
            })
            .collect();
        let text_time = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => Some((
                raw.addition_time_embed_dim.unwrap_or(256),
                raw.projection_class_embeddings_input_dim.unwrap_or(2816),
            )),
            Some(other) => return Err(format!("addition_embed_type `{other}` is not supported")),
        };
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            levels,
            layers_per_block: raw.layers_per_block,
            cross_attention_dim: cross,
            use_linear_projection: raw.use_linear_projection,
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            text_time,
        })
    }

    /// Infers the shape from diffusers-named tensors (single-file checkpoints carry no config).
    /// `shape` returns a tensor's shape by name.
    pub fn infer(
        names: &[&str],
        shape: &dyn Fn(&str) -> Option<Vec<usize>>,
    ) -> std::result::Result<Self, String> {
        let need = |name: &str| shape(name).ok_or_else(|| format!("missing tensor `{name}`"));
        let conv_in = need("conv_in.weight")?;
        // A ControlNet (the UNet's encoder half) has no `conv_out`: 4 latent channels.
        let out_channels = shape("conv_out.weight").map_or(4, |s| s[0]);
        let count = |prefix: &str| {
            let mut ids: Vec<usize> = names
                .iter()
                .filter_map(|n| n.strip_prefix(prefix))
                .filter_map(|rest| rest.split('.').next()?.parse().ok())
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids.last().map_or(0, |m| m + 1)
        };
        let n = count("down_blocks.");
        if n == 0 {
            return Err("no down_blocks tensors".into());
        }
        let layers_per_block = count("down_blocks.0.resnets.");
        let mut levels = Vec::with_capacity(n);
        let mut cross = 0;
        let mut linear = false;
        for i in 0..n {
            let channels = need(&format!("down_blocks.{i}.resnets.0.conv1.weight"))?[0];
            let attn = format!("down_blocks.{i}.attentions.0.");
            let tl = count(&format!("{attn}transformer_blocks."));
            let level = if tl == 0 {
                Level {
                    channels,
                    transformer_layers: None,
                    heads: 0,
                }
            } else {
                let k = need(&format!("{attn}transformer_blocks.0.attn2.to_k.weight"))?;
                cross = k[1];
                linear = need(&format!("{attn}proj_in.weight"))?.len() == 2;
                // Every released SD/SDXL UNet uses 64-dim heads except SD 1.x (8 heads).
                let heads = if cross == 768 {
                    8
                } else {
                    (channels / 64).max(1)
                };
                Level {
                    channels,
                    transformer_layers: Some(tl),
                    heads,
                }
            };
            levels.push(level);
        }
        // Levels without attention still set the mid block's heads when they are last.
        for level in &mut levels {
            level.heads = heads_for(cross, level.channels);
        }
        let text_time = shape("add_embedding.linear_1.weight").map(|s| (256, s[1]));
        Ok(Self {
            in_channels: conv_in[1],
            out_channels,
            levels,
            layers_per_block,
            cross_attention_dim: cross,
            use_linear_projection: linear,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            text_time,
        })
    }
}

/// Every released SD/SDXL UNet uses 64-dim heads, except SD 1.x (8 heads per level).
fn heads_for(cross_attention_dim: usize, channels: usize) -> usize {
    if cross_attention_dim == 768 {
        8
    } else {
        (channels / 64).max(1)
    }
}

/// The UNet.
pub struct Unet {
    conv_in: crate::nn::Conv2d,
    time: TimeEmbedding,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: crate::nn::GroupNorm,
    conv_out: crate::nn::Conv2d,
    config: UnetConfig,
}

impl std::fmt::Debug for Unet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unet")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Unet {
    /// Builds the UNet with `config`'s shape from diffusers-named weights; fails when it has
    /// no levels.
    pub fn new(vb: &VarBuilder, config: UnetConfig) -> Result<Self> {
        let c = &config;
        let n = c.levels.len();
        if n == 0 {
            return Err(Error::InvalidParameter(
                "a UNet needs at least one level".into(),
            ));
        }
        let b0 = c.levels[0].channels;
        let last = &c.levels[n - 1];
        let pad1 = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = crate::nn::Conv2d::with_winograd(
            candle_nn::conv2d(c.in_channels, b0, 3, pad1, vb.pp("conv_in"))?,
            super::unet_blocks::UNET_WINOGRAD,
        )?;
        let time = TimeEmbedding::new(vb, c)?;
        let (down, mid) = encoder(vb, c)?;
        let blocks = c.block_config();
        let attention = |level: &Level, layers: usize| c.attention(level, layers);
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let level = &c.levels[n - 1 - i];
            let prev = if i == 0 {
                last.channels
            } else {
                c.levels[n - i].channels
            };
            let skip_ch = c.levels[if i == n - 1 { 0 } else { n - i - 2 }].channels;
            let attn = level.transformer_layers.map(|l| attention(level, l));
            up.push(UpBlock::new(
                &vb.pp(format!("up_blocks.{i}")),
                prev,
                skip_ch,
                level.channels,
                c.layers_per_block + 1,
                i + 1 < n,
                &blocks,
                attn.as_ref(),
            )?);
        }
        let norm_out =
            crate::nn::GroupNorm::load(&vb.pp("conv_norm_out"), c.norm_num_groups, b0, c.norm_eps)?;
        let conv_out = crate::nn::Conv2d::new(candle_nn::conv2d(
            b0,
            c.out_channels,
            3,
            pad1,
            vb.pp("conv_out"),
        )?)?;
        Ok(Self {
            conv_in,
            time,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            config,
        })
    }

    /// The shape it was built with.
    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Predicts noise (or v) for `xs` (`(batch, in_channels, h, w)`) at `timestep`.
    /// `text_time` is SDXL's `(pooled text embeds (batch, 1280), time ids (batch, 6))`.
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        text_time: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        self.forward_with_control(xs, timestep, context, text_time, None)
    }

    /// [`Self::forward`] with ControlNet residuals added to the skip connections and to the
    /// middle block's output (diffusers' `down_block_additional_residuals` /
    /// `mid_block_additional_residual`).
    pub fn forward_with_control(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        text_time: Option<(&Tensor, &Tensor)>,
        control: Option<&super::controlnet::ControlResiduals>,
    ) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let factor = 1usize << (self.config.levels.len() - 1);
        let odd = h % factor != 0 || w % factor != 0;
        let temb = self.time.forward(xs, timestep, text_time)?;
        let xs = self.conv_in.forward(xs)?;
        let (mut xs, mut residuals) = run_encoder(&self.down, &self.mid, xs, &temb, context)?;
        if let Some(control) = control {
            if control.down.len() != residuals.len() {
                return Err(Error::InvalidParameter(format!(
                    "the ControlNet gives {} residuals, this UNet has {} skip connections: \
                     it is made for another base model",
                    control.down.len(),
                    residuals.len()
                )));
            }
            for (r, c) in residuals.iter_mut().zip(&control.down) {
                *r = (&*r + c.to_dtype(r.dtype())?)?;
            }
            xs = (&xs + control.mid.to_dtype(xs.dtype())?)?;
        }
        let n = self.up.len();
        for (i, block) in self.up.iter().enumerate() {
            let take = block.skips().min(residuals.len());
            let skips = residuals.split_off(residuals.len() - take);
            let size = match residuals.last() {
                Some(r) if odd && i + 1 < n => {
                    let (_, _, rh, rw) = r.dims4()?;
                    Some((rh, rw))
                }
                _ => None,
            };
            xs = block.forward(&xs, &skips, &temb, context, size)?;
        }
        self.conv_out.forward_normalized(&xs, &self.norm_out, true)
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.conv_in.dtype()
    }
}

impl UnetConfig {
    /// The resnets' shared settings.
    pub(crate) fn block_config(&self) -> BlockConfig {
        BlockConfig {
            temb_channels: self.levels[0].channels * 4,
            groups: self.norm_num_groups,
            eps: self.norm_eps,
        }
    }

    /// The transformers' settings at `level`, with `layers` blocks each.
    pub(crate) fn attention(&self, level: &Level, layers: usize) -> AttentionConfig {
        AttentionConfig {
            layers,
            heads: level.heads,
            cross_attention_dim: self.cross_attention_dim,
            linear_projection: self.use_linear_projection,
        }
    }
}

/// The down blocks and the middle block: the half of the UNet a ControlNet copies.
pub(crate) fn encoder(vb: &VarBuilder, c: &UnetConfig) -> Result<(Vec<DownBlock>, MidBlock)> {
    let n = c.levels.len();
    let b0 = c.levels[0].channels;
    let last = &c.levels[n - 1];
    let blocks = c.block_config();
    let mut down = Vec::with_capacity(n);
    for (i, level) in c.levels.iter().enumerate() {
        let in_ch = if i == 0 { b0 } else { c.levels[i - 1].channels };
        let attn = level.transformer_layers.map(|l| c.attention(level, l));
        down.push(DownBlock::new(
            &vb.pp(format!("down_blocks.{i}")),
            in_ch,
            level.channels,
            c.layers_per_block,
            i + 1 < n,
            &blocks,
            attn.as_ref(),
        )?);
    }
    let mid = MidBlock::new(
        &vb.pp("mid_block"),
        last.channels,
        &blocks,
        &c.attention(last, last.transformer_layers.unwrap_or(1)),
    )?;
    Ok((down, mid))
}

/// Runs `xs` (after `conv_in`) through the down blocks and the middle block: the middle
/// block's output, and the skip connections from `xs` on.
pub(crate) fn run_encoder(
    down: &[DownBlock],
    mid: &MidBlock,
    mut xs: Tensor,
    temb: &Tensor,
    context: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut skips = vec![xs.clone()];
    for block in down {
        let (ys, s) = block.forward(&xs, temb, context)?;
        skips.extend(s);
        xs = ys;
    }
    Ok((mid.forward(&xs, temb, context)?, skips))
}

/// The timestep's embedding, plus SDXL's pooled text and size conditioning where the
/// network has it (`add_embedding`).
pub(crate) struct TimeEmbedding {
    proj: Timesteps,
    embedding: TimestepEmbedding,
    add: Option<(Timesteps, TimestepEmbedding)>,
}

impl TimeEmbedding {
    pub(crate) fn new(vb: &VarBuilder, c: &UnetConfig) -> Result<Self> {
        let b0 = c.levels[0].channels;
        let temb = b0 * 4;
        let add = match c.text_time {
            Some((dim, input)) => Some((
                Timesteps::new(dim, true, 0.0),
                TimestepEmbedding::new(vb.pp("add_embedding"), input, temb)?,
            )),
            None => None,
        };
        Ok(Self {
            proj: Timesteps::new(b0, true, 0.0),
            embedding: TimestepEmbedding::new(vb.pp("time_embedding"), b0, temb)?,
            add,
        })
    }

    /// The embedding for `xs`'s batch at `timestep`, after the SiLU every resnet applies
    /// first (done once here).
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        text_time: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let batch = xs.dim(0)?;
        let (device, dtype) = (xs.device(), xs.dtype());
        let t = (Tensor::ones(batch, dtype, device)? * timestep)?;
        let mut emb = self.embedding.forward(&self.proj.forward(&t)?)?;
        match (&self.add, text_time) {
            (Some((proj, embed)), Some((pooled, ids))) => {
                let ids = proj
                    .forward(&ids.flatten_all()?.to_dtype(dtype)?)?
                    .reshape((batch, ()))?;
                let input = Tensor::cat(&[&pooled.to_dtype(dtype)?, &ids], 1)?;
                emb = (emb + embed.forward(&input)?)?;
            }
            (Some(_), None) => {
                return Err(Error::InvalidParameter(
                    "this network needs SDXL's pooled text embedding and size conditioning".into(),
                ));
            }
            (None, _) => {}
        }
        Ok(candle_nn::ops::silu(&emb)?)
    }
}
