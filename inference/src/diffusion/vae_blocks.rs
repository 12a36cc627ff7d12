//! The VAE's building blocks with diffusers' `AutoencoderKL` names, computed in bounded memory.
//!
//! candle's convolution on CUDA and Metal (and its full-im2col CPU path) unfolds the whole input
//! before the matrix product: one 3×3 convolution over `(1, 256, 1024, 1024)` would allocate
//! `1024² × 256·9 × 4 B ≈ 9.7 GB`. [`Conv3x3`] bounds that buffer by computing the output in
//! horizontal bands of rows (each band reads its rows plus the halo the kernel needs), which
//! gives the same values as one convolution. The mid block's attention likewise computes its
//! scores for a chunk of query rows at a time (softmax is per row, so chunking is exact).

use candle_core::{D, DType, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::nn::{Conv2d, GroupNorm, Linear, Winograd};

use crate::error::{Error, Result};

/// Default cap on a 3×3 convolution's unfolded input (`H_out·W_out · C_in·9` elements).
pub const CONV_BUDGET_BYTES: usize = 256 << 20;
/// Default cap on one chunk of attention scores (`query rows × tokens` f32 values).
pub const ATTENTION_BUDGET_BYTES: usize = 128 << 20;
/// GroupNorm and resnet epsilon of the VAE (fixed in diffusers' `Encoder` / `Decoder`).
const EPS: f64 = 1e-6;

/// How much memory the VAE's convolutions and attention may use for their temporaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Bytes of unfolded input one 3×3 convolution may need before it runs in bands.
    pub conv_bytes: usize,
    /// Bytes of f32 attention scores computed at once.
    pub attention_bytes: usize,
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self {
            conv_bytes: CONV_BUDGET_BYTES,
            attention_bytes: ATTENTION_BUDGET_BYTES,
        }
    }
}

impl MemoryBudget {
    /// No limit: every convolution and attention runs in one piece.
    pub fn unlimited() -> Self {
        Self {
            conv_bytes: usize::MAX,
            attention_bytes: usize::MAX,
        }
    }
}

/// Zero padding on each side of the input, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    /// Zero rows added above.
    pub top: usize,
    /// Zero rows added below.
    pub bottom: usize,
    /// Zero columns added on the left.
    pub left: usize,
    /// Zero columns added on the right.
    pub right: usize,
}

impl Padding {
    /// The same padding on every side (`padding=p` in PyTorch).
    pub fn same(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    /// diffusers' `Downsample2D` with `padding=0`: one zero row below and one column right.
    pub fn bottom_right() -> Self {
        Self {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        }
    }
}

/// A 3×3 convolution of `xs` `(b, c_in, h, w)` with `weight` `(c_out, c_in, 3, 3)` (no bias),
/// computed in bands of output rows when the unfolded input would exceed `budget_bytes`.
/// Equal to padding `xs` and running one convolution with padding 0.
pub fn conv3x3_banded(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: Padding,
    budget_bytes: usize,
) -> Result<Tensor> {
    let (b, c_in, h, w) = xs.dims4()?;
    let (c_out, c_in_k, kh, kw) = weight.dims4()?;
    if c_in != c_in_k || kh != 3 || kw != 3 || stride == 0 {
        return Err(Error::InvalidParameter(format!(
            "3×3 convolution of {c_in} channels with a {:?} kernel, stride {stride}",
            weight.dims()
        )));
    }
    let (hp, wp) = (
        h + padding.top + padding.bottom,
        w + padding.left + padding.right,
    );
    if hp < 3 || wp < 3 {
        return Err(Error::InvalidParameter(format!(
            "a {h}×{w} input is too small for a 3×3 convolution"
        )));
    }
    let (h_out, w_out) = ((hp - 3) / stride + 1, (wp - 3) / stride + 1);
    let row_bytes = (b * w_out * c_in * 9).saturating_mul(xs.dtype().size_in_bytes());
    let rows = (budget_bytes / row_bytes.max(1)).max(1);
    if rows >= h_out {
        let symmetric = padding == Padding::same(padding.top);
        return Ok(if symmetric {
            xs.conv2d(weight, padding.top, stride, 1, 1)?
        } else {
            xs.pad_with_zeros(2, padding.top, padding.bottom)?
                .pad_with_zeros(3, padding.left, padding.right)?
                .conv2d(weight, 0, stride, 1, 1)?
        });
    }
    let out = Tensor::zeros((b, c_out, h_out, w_out), xs.dtype(), xs.device())?;
    let mut r0 = 0;
    while r0 < h_out {
        let n = rows.min(h_out - r0);
        // Rows [p0, p1) of the padded input feed output rows [r0, r0 + n).
        let p0 = r0 * stride;
        let p1 = (r0 + n - 1) * stride + 3;
        let src0 = p0.saturating_sub(padding.top).min(h);
        let src1 = p1.saturating_sub(padding.top).min(h);
        let above = padding.top.saturating_sub(p0);
        let below = (p1 - p0) - above - (src1 - src0);
        let band = xs
            .narrow(2, src0, src1 - src0)?
            .pad_with_zeros(2, above, below)?
            .pad_with_zeros(3, padding.left, padding.right)?;
        let ys = band.conv2d(weight, 0, stride, 1, 1)?.contiguous()?;
        out.slice_set(&ys, 2, r0)?;
        r0 += n;
    }
    Ok(out)
}

/// The VAE's 3×3 layers up to 256 channels (the full- and half-resolution levels) run as
/// F(4×4, 3×3) Winograd, the 512-channel ones as F(2×2, 3×3).
const VAE_WINOGRAD: Winograd = Winograd {
    f4_up_to: 256 * 256,
    f2_up_to: 512 * 512,
};

/// A 3×3 convolution with bias: on Studio's CPU kernels where they run (no unfolded input,
/// so no banding), otherwise candle's, in bands of rows above a memory budget
/// ([`conv3x3_banded`]).
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    /// Candle's weight and bias, kept only where candle runs the convolution.
    candle: Option<(Tensor, Option<Tensor>)>,
    native: Option<crate::nn::Conv2d>,
    stride: usize,
    padding: Padding,
}

impl Conv3x3 {
    /// A convolution with `weight` `(c_out, c_in, 3, 3)` and an optional bias: on Studio's
    /// CPU kernels when they take it, otherwise the tensors are kept for candle.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: Padding,
    ) -> Result<Self> {
        let pads = [padding.top, padding.bottom, padding.left, padding.right];
        let native = crate::nn::Conv2d::native(&weight, bias.as_ref(), stride, pads, VAE_WINOGRAD)?;
        Ok(Self {
            candle: if native.is_some() {
                None
            } else {
                Some((weight, bias))
            },
            native,
            stride,
            padding,
        })
    }

    /// Loads `weight` `(c_out, c_in, 3, 3)` and `bias` from `vb`.
    pub fn load(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        stride: usize,
        padding: Padding,
    ) -> Result<Self> {
        let conv = candle_nn::conv2d(c_in, c_out, 3, Conv2dConfig::default(), vb.clone())?;
        Self::new(conv.weight().clone(), conv.bias().cloned(), stride, padding)
    }

    /// `self.forward(&norm.forward(xs, silu), budget_bytes)`; on the native kernels the
    /// normalization is applied as the convolution loads its input (no normalized copy).
    pub fn forward_normalized(
        &self,
        xs: &Tensor,
        norm: &GroupNorm,
        silu: bool,
        budget_bytes: usize,
    ) -> Result<Tensor> {
        match &self.native {
            Some(native) => native.forward_normalized(xs, norm, silu),
            None => self.forward(&norm.forward(xs, silu)?, budget_bytes),
        }
    }

    /// Convolves `xs` `(b, c_in, h, w)`; on candle's path in bands of rows whose unfolded
    /// input fits `budget_bytes` (the native kernels ignore it).
    pub fn forward(&self, xs: &Tensor, budget_bytes: usize) -> Result<Tensor> {
        if let Some(native) = &self.native {
            return native.forward(xs);
        }
        let (weight, bias) = self
            .candle
            .as_ref()
            .ok_or_else(|| Error::InvalidParameter("a convolution without weights".into()))?;
        let ys = conv3x3_banded(xs, weight, self.stride, self.padding, budget_bytes)?;
        Ok(match bias {
            Some(bias) => ys.broadcast_add(&bias.reshape((1, bias.dims1()?, 1, 1))?)?,
            None => ys,
        })
    }
}

fn group_norm(vb: &VarBuilder, name: &str, groups: usize, channels: usize) -> Result<GroupNorm> {
    GroupNorm::load(&vb.pp(name), groups, channels, EPS)
}

/// diffusers' `ResnetBlock2D` without a time embedding (SiLU, output scale 1).
#[derive(Debug)]
pub struct VaeResnet {
    norm1: GroupNorm,
    conv1: Conv3x3,
    norm2: GroupNorm,
    conv2: Conv3x3,
    conv_shortcut: Option<Conv2d>,
}

impl VaeResnet {
    /// Loads the block from `vb` (`norm1`, `conv1`, `norm2`, `conv2`), mapping `c_in` to
    /// `c_out` channels with `groups`-group GroupNorms; a 1×1 `conv_shortcut` is loaded only
    /// when the two differ.
    pub fn new(vb: &VarBuilder, c_in: usize, c_out: usize, groups: usize) -> Result<Self> {
        let same = Padding::same(1);
        Ok(Self {
            norm1: group_norm(vb, "norm1", groups, c_in)?,
            conv1: Conv3x3::load(&vb.pp("conv1"), c_in, c_out, 1, same)?,
            norm2: group_norm(vb, "norm2", groups, c_out)?,
            conv2: Conv3x3::load(&vb.pp("conv2"), c_out, c_out, 1, same)?,
            conv_shortcut: if c_in == c_out {
                None
            } else {
                Some(Conv2d::new(candle_nn::conv2d(
                    c_in,
                    c_out,
                    1,
                    Conv2dConfig::default(),
                    vb.pp("conv_shortcut"),
                )?)?)
            },
        })
    }

    /// The residual block on `xs` `(b, c_in, h, w)`, giving `(b, c_out, h, w)`; `budget`
    /// bounds the convolutions' temporaries.
    pub fn forward(&self, xs: &Tensor, budget: &MemoryBudget) -> Result<Tensor> {
        // One full-size temporary at a time besides the input: each step replaces `h`, which
        // frees the last (shadowing with `let` would keep all four alive to the end: at
        // 1024² that was 2.5 GiB more at the peak).
        let mut h = self
            .conv1
            .forward_normalized(xs, &self.norm1, true, budget.conv_bytes)?;
        h = self
            .conv2
            .forward_normalized(&h, &self.norm2, true, budget.conv_bytes)?;
        Ok(match &self.conv_shortcut {
            Some(conv) => (conv.forward(xs)? + h)?,
            None => (xs + h)?,
        })
    }
}

/// A q/k/v/out projection stored as `[c, c]` (linear) or `[c, c, 1, 1]` (1×1 convolution).
fn projection(vb: &VarBuilder, channels: usize) -> Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(_) => vb
            .get((channels, channels, 1, 1), "weight")?
            .reshape((channels, channels))?,
    };
    Linear::new(candle_nn::Linear::new(
        weight,
        Some(vb.get(channels, "bias")?),
    ))
}

/// diffusers' VAE `Attention`: single head over all channels, GroupNorm first, residual added.
/// Reads the current names (`to_q`, `to_k`, `to_v`, `to_out.0`) and the legacy ones (`query`,
/// `key`, `value`, `proj_attn`).
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
    /// Studio's attention kernel on the CPU (`None`: candle's matmuls and softmax in chunks).
    kernels: Option<crate::nn::KernelPath>,
}

impl VaeAttention {
    /// Loads the attention over `channels` channels from `vb` (current or legacy names),
    /// with a `groups`-group GroupNorm.
    pub fn new(vb: &VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let (q, k, v, out) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(Self {
            group_norm: group_norm(vb, "group_norm", groups, channels)?,
            to_q: projection(&vb.pp(q), channels)?,
            to_k: projection(&vb.pp(k), channels)?,
            to_v: projection(&vb.pp(v), channels)?,
            to_out: projection(&vb.pp(out), channels)?,
            channels,
            kernels: crate::nn::default_kernels(vb.device()),
        })
    }

    /// Self-attention over the `h × w` positions of `xs` `(b, c, h, w)`, plus `xs`. Without
    /// Studio's kernel (or for non-f32 input) the scores are computed in f32, in chunks of query
    /// rows within `budget.attention_bytes`.
    pub fn forward(&self, xs: &Tensor, budget: &MemoryBudget) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let t = h * w;
        let dtype = xs.dtype();
        let tokens = self
            .group_norm
            .forward(xs, false)?
            .reshape((b, c, t))?
            .transpose(1, 2)?;
        if let Some(path) = self.kernels.filter(|_| dtype == DType::F32) {
            // One head over all channels, a block of queries at a time.
            let head = |l: &Linear| -> Result<Tensor> { Ok(l.forward(&tokens)?.unsqueeze(1)?) };
            let (q, k, v) = (head(&self.to_q)?, head(&self.to_k)?, head(&self.to_v)?);
            drop(tokens);
            let scale = 1.0 / (self.channels as f32).sqrt();
            let attended = crate::nn::attention(path, &q, &k, &v, scale)?.squeeze(1)?;
            let out = self.to_out.forward(&attended)?.t()?.reshape((b, c, h, w))?;
            return Ok((out + xs)?);
        }
        // Scores in f32 whatever the dtype; the 1/√c scale split between queries and keys.
        let scale = (self.channels as f64).powf(-0.25);
        let q = (self.to_q.forward(&tokens)?.to_dtype(DType::F32)? * scale)?;
        let k_t = (self.to_k.forward(&tokens)?.to_dtype(DType::F32)? * scale)?
            .t()?
            .contiguous()?;
        let v = self.to_v.forward(&tokens)?.to_dtype(DType::F32)?;
        drop(tokens);
        let rows = (budget.attention_bytes / (b * t * 4).max(1)).clamp(1, t);
        let mut chunks = Vec::with_capacity(t.div_ceil(rows));
        let mut r0 = 0;
        while r0 < t {
            let n = rows.min(t - r0);
            let scores = q.narrow(1, r0, n)?.matmul(&k_t)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            drop(scores);
            chunks.push(probs.matmul(&v)?);
            r0 += n;
        }
        let attended = if chunks.len() == 1 {
            chunks.swap_remove(0)
        } else {
            Tensor::cat(&chunks, 1)?
        };
        let out = self
            .to_out
            .forward(&attended.to_dtype(dtype)?)?
            .t()?
            .reshape((b, c, h, w))?;
        Ok((out + xs)?)
    }
}

/// diffusers' `DownEncoderBlock2D`: resnets, then a stride-2 3×3 convolution padded one row
/// below and one column right (`downsamplers.0.conv`).
#[derive(Debug)]
pub struct DownEncoderBlock {
    resnets: Vec<VaeResnet>,
    downsampler: Option<Conv3x3>,
}

impl DownEncoderBlock {
    /// Loads `layers` resnets (the first from `c_in` channels, all to `c_out`) and, when
    /// `downsample`, the downsampling convolution.
    pub fn new(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        layers: usize,
        groups: usize,
        downsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                VaeResnet::new(&vb.pp(format!("resnets.{i}")), c, c_out, groups)
            })
            .collect::<Result<_>>()?;
        let downsampler = if downsample {
            Some(Conv3x3::load(
                &vb.pp("downsamplers.0.conv"),
                c_out,
                c_out,
                2,
                Padding::bottom_right(),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            downsampler,
        })
    }

    /// Runs the resnets, then halves the height and width if the block downsamples.
    pub fn forward(&self, xs: &Tensor, budget: &MemoryBudget) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, budget)?;
        }
        match &self.downsampler {
            Some(conv) => conv.forward(&xs, budget.conv_bytes),
            None => Ok(xs),
        }
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then nearest-neighbour ×2 and a 3×3 convolution
/// (`upsamplers.0.conv`).
#[derive(Debug)]
pub struct UpDecoderBlock {
    resnets: Vec<VaeResnet>,
    upsampler: Option<Conv3x3>,
}

impl UpDecoderBlock {
    /// Loads `layers` resnets (the first from `c_in` channels, all to `c_out`) and, when
    /// `upsample`, the upsampling convolution.
    pub fn new(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        layers: usize,
        groups: usize,
        upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                VaeResnet::new(&vb.pp(format!("resnets.{i}")), c, c_out, groups)
            })
            .collect::<Result<_>>()?;
        let upsampler = if upsample {
            Some(Conv3x3::load(
                &vb.pp("upsamplers.0.conv"),
                c_out,
                c_out,
                1,
                Padding::same(1),
            )?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    /// Runs the resnets, then doubles the height and width if the block upsamples.
    pub fn forward(&self, xs: &Tensor, budget: &MemoryBudget) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, budget)?;
        }
        match &self.upsampler {
            Some(conv) => {
                let (_, _, h, w) = xs.dims4()?;
                let up = xs.upsample_nearest2d(2 * h, 2 * w)?;
                drop(xs);
                conv.forward(&up, budget.conv_bytes)
            }
            None => Ok(xs),
        }
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Debug)]
pub struct VaeMidBlock {
    resnet0: VaeResnet,
    attention: VaeAttention,
    resnet1: VaeResnet,
}

impl VaeMidBlock {
    /// Loads the two resnets and the attention, all at `channels` channels with
    /// `groups`-group GroupNorms.
    pub fn new(vb: &VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            resnet0: VaeResnet::new(&vb.pp("resnets.0"), channels, channels, groups)?,
            attention: VaeAttention::new(&vb.pp("attentions.0"), channels, groups)?,
            resnet1: VaeResnet::new(&vb.pp("resnets.1"), channels, channels, groups)?,
        })
    }

    /// Resnet, attention, resnet; the output has the shape of `xs`.
    pub fn forward(&self, xs: &Tensor, budget: &MemoryBudget) -> Result<Tensor> {
        let xs = self.resnet0.forward(xs, budget)?;
        let xs = self.attention.forward(&xs, budget)?;
        self.resnet1.forward(&xs, budget)
    }
}
