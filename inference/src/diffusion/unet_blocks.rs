//! The UNet's building blocks with diffusers' tensor names and math: ResNet blocks,
//! down/upsamplers, the spatial transformer (`Transformer2DModel`) and the down, mid and up
//! blocks built from them.
//!
//! Written for Studio rather than taken from candle-transformers, whose blocks differ from
//! diffusers in two ways a parity test against diffusers showed: their `DownBlock2D` /
//! `UpBlock2D` resnets always normalise with 32 groups (ignoring `norm_num_groups`), and their
//! GEGLU gates with tanh-approximate GELU where diffusers uses the exact (erf) one.
//!
//! On the CPU, attention runs on Studio's memory-efficient kernel ([`crate::nn::attention`]: a
//! block of queries at a time) and the linear layers on its packed kernels ([`Linear`]).
//! Elsewhere candle's ops materialise the full score matrix; with f16/bf16 weights the scores
//! and their softmax are computed in f32 (diffusers' `upcast_attention` / `upcast_softmax`)
//! and the probabilities cast back before they weigh the values.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, LayerNorm, VarBuilder};

use crate::nn::{Conv2d, GroupNorm, Linear, Winograd, linear};

use crate::error::{Error, Result};

/// Cross-attention settings of a block whose resnets are each followed by a transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionConfig {
    /// Transformer blocks per `Transformer2DModel` (`transformer_layers_per_block`).
    pub layers: usize,
    /// Attention heads; each head has `channels / heads` dimensions.
    pub heads: usize,
    /// Width of the text embedding attended to (`cross_attention_dim`).
    pub cross_attention_dim: usize,
    /// `proj_in` / `proj_out` are linear layers (SD 2.x, SDXL) instead of 1×1 convolutions.
    pub linear_projection: bool,
}

/// Settings every block of a UNet shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockConfig {
    /// Width of the time embedding the resnets add (`4 × block_out_channels[0]`).
    pub temb_channels: usize,
    /// GroupNorm groups (`norm_num_groups`), for the resnets and the transformers' input norm.
    pub groups: usize,
    /// The resnets' GroupNorm epsilon (`norm_eps`).
    pub eps: f64,
}

/// The transformers' input GroupNorm epsilon, fixed in diffusers' `Transformer2DModel`.
const TRANSFORMER_NORM_EPS: f64 = 1e-6;
/// The transformer blocks' LayerNorm epsilon (diffusers' default `norm_eps`).
const LAYER_NORM_EPS: f64 = 1e-5;

/// The UNet's 3×3 layers at its first level (SD's 320 channels, up to 960 in) run as
/// F(4×4, 3×3) Winograd and those at its second (640, up to 1920 in) as F(2×2, 3×3); the
/// deeper levels, whose maps are small and weights large, convolve directly. Measured at
/// 256² on 2 cores (SD-1.5, f32): UNet step 2.73 -> 2.32 s for about 0.25 GB more weights,
/// where F(2×2) everywhere (2.13 s) took 1.8 GB more.
pub(crate) const UNET_WINOGRAD: Winograd = Winograd {
    f4_up_to: 960 * 320,
    f2_up_to: 1920 * 640,
};

fn conv3x3(
    vb: &VarBuilder,
    name: &str,
    c_in: usize,
    c_out: usize,
    stride: usize,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    Conv2d::with_winograd(
        candle_nn::conv2d(c_in, c_out, 3, cfg, vb.pp(name))?,
        UNET_WINOGRAD,
    )
}

fn conv1x1(vb: &VarBuilder, name: &str, c_in: usize, c_out: usize) -> Result<Conv2d> {
    Conv2d::new(candle_nn::conv2d(
        c_in,
        c_out,
        1,
        Conv2dConfig::default(),
        vb.pp(name),
    )?)
}

/// diffusers' `ResnetBlock2D` (SiLU, output scale 1, no time-scale shift).
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// Loads the block from `vb` (`norm1`, `conv1`, `time_emb_proj`, …), mapping `c_in` to
    /// `c_out` channels; a 1×1 `conv_shortcut` is loaded only when the two differ.
    pub fn new(vb: &VarBuilder, c_in: usize, c_out: usize, cfg: &BlockConfig) -> Result<Self> {
        let norm = |name: &str, c: usize| GroupNorm::load(&vb.pp(name), cfg.groups, c, cfg.eps);
        Ok(Self {
            norm1: norm("norm1", c_in)?,
            conv1: conv3x3(vb, "conv1", c_in, c_out, 1)?,
            time_emb_proj: linear(cfg.temb_channels, c_out, true, &vb.pp("time_emb_proj"))?,
            norm2: norm("norm2", c_out)?,
            conv2: conv3x3(vb, "conv2", c_out, c_out, 1)?,
            conv_shortcut: if c_in == c_out {
                None
            } else {
                Some(conv1x1(vb, "conv_shortcut", c_in, c_out)?)
            },
        })
    }

    /// `temb_act` is the time embedding already passed through SiLU (every resnet applies the
    /// same activation to the same embedding, so the UNet does it once per step).
    pub fn forward(&self, xs: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        // Each step replaces `h`, freeing the last (a shadowing `let` would keep it alive).
        let mut h = self.conv1.forward_normalized(xs, &self.norm1, true)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        h = h.broadcast_add(&t)?;
        h = self.conv2.forward_normalized(&h, &self.norm2, true)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        Ok((shortcut + h)?)
    }
}

/// diffusers' `Downsample2D` with a convolution: 3×3, stride 2, padding 1.
#[derive(Debug)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    /// Loads the convolution from `vb`, keeping `channels` channels.
    pub fn new(vb: &VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(vb, "conv", channels, channels, 2)?,
        })
    }

    /// Halves the height and width of `xs` (an odd side rounds up).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(xs)
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour ×2 (or to `size`), then 3×3.
#[derive(Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Loads the convolution from `vb`, keeping `channels` channels.
    pub fn new(vb: &VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(vb, "conv", channels, channels, 1)?,
        })
    }

    /// `size`: the `(height, width)` to upsample to instead of doubling (odd-size latents,
    /// where the skip connection is one row or column larger than twice the input).
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&xs.upsample_nearest2d(th, tw)?)
    }
}

/// diffusers' `Attention` as the UNet's transformer blocks use it: `to_q`, `to_k`, `to_v`
/// without bias, `to_out.0` with bias, scale `1/√head_dim`.
#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// Studio's attention kernel on the CPU (`None`: candle's matmuls and softmax).
    kernels: Option<crate::nn::KernelPath>,
}

impl Attention {
    fn new(vb: &VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            return Err(Error::InvalidParameter(format!(
                "{dim} attention channels do not split into {heads} heads"
            )));
        }
        let head_dim = dim / heads;
        Ok(Self {
            to_q: linear(dim, dim, false, &vb.pp("to_q"))?,
            to_k: linear(context_dim, dim, false, &vb.pp("to_k"))?,
            to_v: linear(context_dim, dim, false, &vb.pp("to_v"))?,
            to_out: linear(dim, dim, true, &vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            kernels: crate::nn::default_kernels(vb.device()),
        })
    }

    /// `(batch, tokens, heads × head_dim)` → `(batch, heads, tokens, head_dim)`.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, c) = xs.dims3()?;
        Ok(xs
            .reshape((b, t, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Self-attention when `context` is `None`.
    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let dtype = xs.dtype();
        let (q, k, v) = (
            self.to_q.forward(xs)?,
            self.to_k.forward(context)?,
            self.to_v.forward(context)?,
        );
        if let Some(path) = self.kernels.filter(|_| dtype == DType::F32) {
            // A block of queries at a time, on the projections' token-major rows: the full
            // score matrix never exists, and no head is split out by a copy.
            let out = crate::nn::attention_heads(path, &q, &k, &v, self.heads, self.scale as f32)?;
            return self.to_out.forward(&out);
        }
        let (q, k, v) = (
            self.split_heads(&q)?,
            self.split_heads(&k)?,
            self.split_heads(&v)?,
        );
        // Scores and softmax in f32 whatever the weights' dtype (f16 scores can overflow); the
        // scale goes on the keys, the smaller operand in cross-attention.
        let k = (k.to_dtype(DType::F32)? * self.scale)?;
        let scores = q.to_dtype(DType::F32)?.matmul(&k.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        drop(scores);
        let (b, _, t, _) = q.dims4()?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, ()))?;
        self.to_out.forward(&out)
    }
}

/// diffusers' `FeedForward` with a GEGLU input layer (`net.0.proj`), gated with the exact (erf)
/// GELU, and its output layer `net.2`.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: &VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear(dim, 2 * inner, true, &vb.pp("net.0.proj"))?,
            out: linear(inner, dim, true, &vb.pp("net.2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gated = crate::nn::geglu(&self.proj.forward(xs)?)?;
        self.out.forward(&gated)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, feed-forward, each
/// after a LayerNorm and added to its input.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(vb: &VarBuilder, dim: usize, cfg: &AttentionConfig) -> Result<Self> {
        let norm = |name: &str| candle_nn::layer_norm(dim, LAYER_NORM_EPS, vb.pp(name));
        Ok(Self {
            norm1: norm("norm1")?,
            attn1: Attention::new(&vb.pp("attn1"), dim, dim, cfg.heads)?,
            norm2: norm("norm2")?,
            attn2: Attention::new(&vb.pp("attn2"), dim, cfg.cross_attention_dim, cfg.heads)?,
            norm3: norm("norm3")?,
            ff: FeedForward::new(&vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        Ok((self.ff.forward(&self.norm3.forward(&xs)?)? + xs)?)
    }
}

/// diffusers' `Transformer2DModel` for continuous inputs: GroupNorm, `proj_in`, the transformer
/// blocks over the `height × width` tokens, `proj_out`, plus the input. `proj_in` and
/// `proj_out` are linear layers over the tokens whether the checkpoint stores them as such
/// (SD 2.x, SDXL) or as 1×1 convolutions (SD 1.x): the same product, without laying the
/// tokens out as an image in between.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl Transformer2D {
    /// Loads the transformer for `channels`-channel maps from `vb`: its input GroupNorm of
    /// `groups` groups, `proj_in`/`proj_out` and `cfg.layers` transformer blocks.
    pub fn new(
        vb: &VarBuilder,
        channels: usize,
        groups: usize,
        cfg: &AttentionConfig,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Linear> {
            if cfg.linear_projection {
                return linear(channels, channels, true, &vb.pp(name));
            }
            let vb = vb.pp(name);
            let weight = vb
                .get((channels, channels, 1, 1), "weight")?
                .reshape((channels, channels))?;
            let bias = vb.get(channels, "bias")?;
            Linear::new(candle_nn::Linear::new(weight, Some(bias)))
        };
        let vbb = vb.pp("transformer_blocks");
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), groups, channels, TRANSFORMER_NORM_EPS)?,
            proj_in: proj("proj_in")?,
            blocks: (0..cfg.layers)
                .map(|i| TransformerBlock::new(&vbb.pp(i.to_string()), channels, cfg))
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    /// Runs `xs` (`(batch, channels, h, w)`) through the transformer blocks, cross-attending
    /// to `context` (`(batch, tokens, cross_attention_dim)`); the output has the shape of `xs`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let to_image = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let normed = self.norm.forward(xs, false)?;
        let mut tokens = self.proj_in.forward(&to_tokens(&normed)?)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = to_image(&self.proj_out.forward(&tokens)?)?;
        Ok((out + xs)?)
    }
}

/// diffusers' `DownBlock2D` (no `attention`) or `CrossAttnDownBlock2D`: `layers` resnets, each
/// followed by a transformer in the cross-attention kind, then an optional downsampler.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample>,
}

impl DownBlock {
    /// Loads `layers` resnets (the first from `c_in` channels, all to `c_out`), a transformer
    /// after each when `attention` is given, and a downsampler when `downsample`.
    pub fn new(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        layers: usize,
        downsample: bool,
        cfg: &BlockConfig,
        attention: Option<&AttentionConfig>,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                ResnetBlock::new(&vb.pp(format!("resnets.{i}")), c, c_out, cfg)
            })
            .collect::<Result<_>>()?;
        let attentions = attentions(vb, layers, c_out, cfg, attention)?;
        let downsampler = if downsample {
            Some(Downsample::new(&vb.pp("downsamplers.0"), c_out)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the output and the skip connections it adds (one per resnet, plus the
    /// downsampled output).
    pub fn forward(
        &self,
        xs: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }
}

/// diffusers' `UNetMidBlock2DCrossAttn` with one attention layer: resnet, transformer, resnet.
#[derive(Debug)]
pub struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Transformer2D,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    /// Loads the two resnets and the transformer, all at `channels` channels.
    pub fn new(
        vb: &VarBuilder,
        channels: usize,
        cfg: &BlockConfig,
        attention: &AttentionConfig,
    ) -> Result<Self> {
        Ok(Self {
            resnet_in: ResnetBlock::new(&vb.pp("resnets.0"), channels, channels, cfg)?,
            attention: Transformer2D::new(&vb.pp("attentions.0"), channels, cfg.groups, attention)?,
            resnet_out: ResnetBlock::new(&vb.pp("resnets.1"), channels, channels, cfg)?,
        })
    }

    /// Resnet, transformer (cross-attending to `context`), resnet; `temb_act` is the time
    /// embedding after SiLU, as [`ResnetBlock::forward`] takes it.
    pub fn forward(&self, xs: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self.resnet_in.forward(xs, temb_act)?;
        let xs = self.attention.forward(&xs, context)?;
        self.resnet_out.forward(&xs, temb_act)
    }
}

/// diffusers' `UpBlock2D` (no `attention`) or `CrossAttnUpBlock2D`: `layers` resnets, each
/// taking the previous output concatenated with a skip connection (the last one first) and
/// followed by a transformer in the cross-attention kind, then an optional upsampler.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample>,
}

impl UpBlock {
    /// `c_prev`: channels coming from the block below; `c_skip_last`: channels of the last
    /// skip connection consumed (the level above's width, or this one's at the top); the other
    /// skips have `c_out` channels.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: &VarBuilder,
        c_prev: usize,
        c_skip_last: usize,
        c_out: usize,
        layers: usize,
        upsample: bool,
        cfg: &BlockConfig,
        attention: Option<&AttentionConfig>,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let c_in = if i == 0 { c_prev } else { c_out };
                let c_skip = if i + 1 == layers { c_skip_last } else { c_out };
                ResnetBlock::new(&vb.pp(format!("resnets.{i}")), c_in + c_skip, c_out, cfg)
            })
            .collect::<Result<_>>()?;
        let attentions = attentions(vb, layers, c_out, cfg, attention)?;
        let upsampler = if upsample {
            Some(Upsample::new(&vb.pp("upsamplers.0"), c_out)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// The number of skip connections [`UpBlock::forward`] consumes.
    pub fn skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips`: this block's skip connections in the order the down blocks made them (the
    /// last is consumed first); `size`: the upsampler's output size when not twice the input.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb_act: &Tensor,
        context: &Tensor,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        if skips.len() != self.resnets.len() {
            return Err(Error::InvalidParameter(format!(
                "an up block takes {} skip connections, got {}",
                self.resnets.len(),
                skips.len()
            )));
        }
        let mut xs = xs.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            xs = resnet.forward(&Tensor::cat(&[&xs, skip], 1)?, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, size),
            None => Ok(xs),
        }
    }
}

/// `layers` cross-attention transformers (`attentions.N`), or none for a plain block.
fn attentions(
    vb: &VarBuilder,
    layers: usize,
    channels: usize,
    cfg: &BlockConfig,
    attention: Option<&AttentionConfig>,
) -> Result<Vec<Transformer2D>> {
    match attention {
        Some(a) => (0..layers)
            .map(|i| Transformer2D::new(&vb.pp(format!("attentions.{i}")), channels, cfg.groups, a))
            .collect(),
        None => Ok(Vec::new()),
    }
}
