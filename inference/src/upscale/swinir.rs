//! SwinIR (Liang et al. 2021), the transformer upscaler: a shallow convolution, residual Swin
//! Transformer blocks (shifted-window self-attention with a relative position bias) with a
//! convolution after each group, and one of the three published reconstructions:
//!
//! - `pixelshuffle` (classical SR, `001_classicalSR_*`): convolution, leaky ReLU, then ×2
//!   pixel-shuffle steps (or one ×3);
//! - `pixelshuffledirect` (lightweight SR, `002_lightweightSR_*`): one convolution and one
//!   pixel shuffle;
//! - `nearest+conv` (real-world SR, `003_realSR_*`, the SD web UI's `SwinIR_4x`): nearest ×2
//!   steps, each with a convolution.
//!
//! Loaded in the published names (`conv_first`, `patch_embed.norm`,
//! `layers.N.residual_group.blocks.M.{norm1,attn.qkv,attn.proj,
//! attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}`, `layers.N.conv` (one
//! convolution, or `conv.0/2/4` for `3conv`), `norm`, `conv_after_body`, then the
//! reconstruction's), inside `params_ema` / `params` in `.pth` files. The shape (width, groups,
//! blocks, heads, window, MLP width, reconstruction, scale) is read from the tensors. The
//! relative position indices and shift masks are computed here, not read from the file.
//!
//! As the reference does, the input is padded to a multiple of the window by reflection, the
//! dataset mean `(0.4488, 0.4371, 0.4040)` is taken away before and added back after, and the
//! output is cropped to the input's size times the scale. Checked against the reference
//! implementation (`tests/fixtures/swinir`, `tools/make_swinir_fixture.py`).

use candle_core::{D, Device, IndexOp, Tensor};

use super::{Conv, lrelu, shape_of};
use crate::error::{Error, Result};
use crate::nn::Linear;
use crate::weights::Weights;

/// The RGB mean of the training data (DIV2K), subtracted before the network.
const MEAN: [f32; 3] = [0.4488, 0.4371, 0.4040];
/// Bounds on what a file may describe, checked before anything is allocated.
const MAX_GROUPS: usize = 64;
const MAX_BLOCKS: usize = 64;
const MAX_WIDTH: usize = 2048;
const MAX_WINDOW: usize = 32;

/// The reconstruction after the deep features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsampler {
    /// Classical SR: convolution, leaky ReLU, pixel-shuffle steps, convolution.
    PixelShuffle,
    /// Lightweight SR: one convolution and one pixel shuffle.
    PixelShuffleDirect,
    /// Real-world SR: nearest ×2 steps with convolutions.
    NearestConv,
}

/// The convolution at the end of each group and after the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResiConnection {
    /// One 3×3 convolution.
    OneConv,
    /// 3×3 to a quarter of the width, 1×1, 3×3 back, with leaky ReLUs (the large models).
    ThreeConv,
}

/// What a SwinIR file turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwinIrConfig {
    /// Channels of the transformer (`embed_dim`: 60, 180 or 240 in the published models).
    pub embed_dim: usize,
    /// Swin blocks in each residual group.
    pub depths: Vec<usize>,
    /// Attention heads in each residual group.
    pub heads: Vec<usize>,
    /// The attention window's side (8 in the published models).
    pub window: usize,
    /// The MLP's hidden width.
    pub mlp_hidden: usize,
    /// The reconstruction after the deep features.
    pub upsampler: Upsampler,
    /// The convolution closing each residual group.
    pub resi: ResiConnection,
    /// Whether the patch embedding is layer-normed (`patch_norm`).
    pub patch_norm: bool,
    /// Output size over input size.
    pub scale: usize,
}

/// The tensor-name prefix of a SwinIR file (`params_ema.`, `params.`, none, `module.`), if
/// the file is one.
pub fn find_prefix(w: &Weights) -> Option<String> {
    ["params_ema.", "params.", "", "module."]
        .into_iter()
        .find(|p| {
            w.contains(&format!("{p}conv_first.weight"))
                && w.contains(&format!(
                    "{p}layers.0.residual_group.blocks.0.attn.qkv.weight"
                ))
        })
        .map(str::to_owned)
}

/// A layer norm over the last dimension (PyTorch's default epsilon).
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn load(w: &Weights, name: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[dim])?,
            bias: w.get(&format!("{name}.bias"), &[dim])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.weight,
            &self.bias,
            1e-5,
        )?)
    }
}

fn linear(w: &Weights, name: &str, inp: usize, out: usize) -> Result<Linear> {
    let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
    let bias = w.get(&format!("{name}.bias"), &[out])?;
    Linear::new(candle_nn::Linear::new(weight, Some(bias)))
}

/// One Swin Transformer block: (shifted-)window attention, then an MLP, each residual.
struct Block {
    norm1: Norm,
    qkv: Linear,
    proj: Linear,
    /// The relative position bias, `(heads, N, N)` for the window's `N` tokens.
    bias: Tensor,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    /// The cyclic shift (half the window on odd blocks).
    shift: usize,
}

/// `index[i·N + j]`: the row of the bias table for tokens `i` and `j` of a `ws × ws` window.
fn relative_position_index(ws: usize) -> Vec<u32> {
    let n = ws * ws;
    let mut index = Vec::with_capacity(n * n);
    for i in 0..n {
        let (yi, xi) = (i / ws, i % ws);
        for j in 0..n {
            let (yj, xj) = (j / ws, j % ws);
            let dy = yi + ws - 1 - yj;
            let dx = xi + ws - 1 - xj;
            // At most (2ws-1)² - 1, far inside u32 for the windows accepted.
            #[allow(clippy::cast_possible_truncation)]
            index.push((dy * (2 * ws - 1) + dx) as u32);
        }
    }
    index
}

/// The attention mask of shifted windows on an `h × w` map (multiples of `ws`), `(nW, 1, N,
/// N)`: tokens that came from different regions before the cyclic shift do not see each other.
fn shift_mask(h: usize, w: usize, ws: usize, shift: usize, device: &Device) -> Result<Tensor> {
    let region = |v: usize, len: usize| -> usize {
        if v < len - ws {
            0
        } else if v < len - shift {
            1
        } else {
            2
        }
    };
    let (nh, nw, n) = (h / ws, w / ws, ws * ws);
    let mut mask = Vec::with_capacity(nh * nw * n * n);
    for wy in 0..nh {
        for wx in 0..nw {
            let labels: Vec<usize> = (0..n)
                .map(|t| {
                    let (y, x) = (wy * ws + t / ws, wx * ws + t % ws);
                    region(y, h) * 3 + region(x, w)
                })
                .collect();
            for &a in &labels {
                mask.extend(labels.iter().map(|&b| if a == b { 0f32 } else { -100f32 }));
            }
        }
    }
    Ok(Tensor::from_vec(mask, (nh * nw, 1, n, n), device)?)
}

impl Block {
    /// `x`: `(h·w, C)` tokens of an `h × w` map (multiples of `ws`); `mask`: this map's shift
    /// mask when the block shifts.
    fn forward(
        &self,
        x: &Tensor,
        (h, w): (usize, usize),
        ws: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        let mut y = self.norm1.forward(x)?.reshape((h, w, c))?;
        // The shift is less than the window, itself at most the map's side.
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let shift = self.shift as i32;
        if shift > 0 {
            y = y.roll(-shift, 0)?.roll(-shift, 1)?;
        }
        let (nh, nw) = (h / ws, w / ws);
        let windows = y
            .reshape((nh, ws, nw, ws, c))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((nh * nw, ws * ws, c))?;
        let attended = self.attention(&windows, if shift > 0 { mask } else { None })?;
        let mut y = attended
            .reshape((nh, nw, ws, ws, c))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((h, w, c))?;
        if shift > 0 {
            y = y.roll(shift, 0)?.roll(shift, 1)?;
        }
        let x = (x + y.reshape((h * w, c))?)?;
        let mlp = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?)?;
        Ok((x + mlp)?)
    }

    /// Multi-head self-attention within each window: `x` is `(windows, N, C)`.
    fn attention(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (nw, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((nw, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        // Head widths are at most the width, far inside f64's exact range.
        #[allow(clippy::cast_precision_loss)]
        let scale = (hd as f64).powf(-0.5);
        let q = (qkv.i(0)?.contiguous()? * scale)?;
        let k = qkv.i(1)?.contiguous()?;
        let v = qkv.i(2)?.contiguous()?;
        let mut attn = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(&self.bias)?;
        if let Some(mask) = mask {
            attn = attn.broadcast_add(mask)?;
        }
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let y = attn
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((nw, n, c))?;
        self.proj.forward(&y)
    }
}

/// The convolution of a residual group or after the body.
enum Resi {
    One(Conv),
    Three([Conv; 3]),
}

impl Resi {
    fn load(w: &Weights, name: &str, dim: usize, kind: ResiConnection) -> Result<Self> {
        Ok(match kind {
            ResiConnection::OneConv => Self::One(Conv::load(w, name, dim, dim)?),
            ResiConnection::ThreeConv => {
                let q = dim / 4;
                Self::Three([
                    Conv::load(w, &format!("{name}.0"), dim, q)?,
                    Conv::load_k(w, &format!("{name}.2"), q, q, 1)?,
                    Conv::load(w, &format!("{name}.4"), q, dim)?,
                ])
            }
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::One(c) => c.forward(x),
            Self::Three([a, b, c]) => c.forward(&lrelu(&b.forward(&lrelu(&a.forward(x)?)?)?)?),
        }
    }
}

/// A residual Swin Transformer block (RSTB): Swin blocks, then a convolution, residual.
struct Group {
    blocks: Vec<Block>,
    conv: Resi,
}

/// The reconstruction's weights.
enum Tail {
    PixelShuffle {
        before: Conv,
        /// Convolutions, each followed by a pixel shuffle by the factor.
        ups: Vec<(Conv, usize)>,
        last: Conv,
    },
    Direct {
        up: Conv,
    },
    Nearest {
        before: Conv,
        ups: Vec<Conv>,
        hr: Conv,
        last: Conv,
    },
}

/// A loaded SwinIR.
pub struct SwinIr {
    config: SwinIrConfig,
    first: Conv,
    patch_norm: Option<Norm>,
    groups: Vec<Group>,
    norm: Norm,
    after_body: Resi,
    tail: Tail,
}

/// Leaky ReLU with PyTorch's default slope (0.01), as after `conv_before_upsample`.
fn leaky(x: &Tensor) -> Result<Tensor> {
    Ok(x.maximum(&(x * 0.01)?)?)
}

/// `(1, C·r², H, W)` → `(1, C, H·r, W·r)`, as `torch.nn.PixelShuffle(r)`.
fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let c = c / (r * r);
    Ok(x.reshape((b, c, r, r, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .contiguous()?
        .reshape((b, c, h * r, w * r))?)
}

/// Indices `0..len + pad` into a side of `len`, mirrored past the end as PyTorch's
/// `reflect` padding does (and again, should the padding be longer than the side).
fn reflect_indices(len: usize, pad: usize) -> Vec<u32> {
    let period = 2 * len.saturating_sub(1);
    (0..len + pad)
        .map(|i| {
            let m = if period == 0 { 0 } else { i % period };
            let j = if m < len { m } else { period - m };
            // Sides are bounded by the image size checks.
            #[allow(clippy::cast_possible_truncation)]
            let j = j as u32;
            j
        })
        .collect()
}

/// Pads `(1, C, H, W)` on the right and bottom to multiples of `m`, by reflection.
fn reflect_pad(x: &Tensor, m: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ph, pw) = ((m - h % m) % m, (m - w % m) % m);
    let mut x = x.clone();
    if pw > 0 {
        let idx = Tensor::new(reflect_indices(w, pw), x.device())?;
        x = x.index_select(&idx, 3)?;
    }
    if ph > 0 {
        let idx = Tensor::new(reflect_indices(h, ph), x.device())?;
        x = x.index_select(&idx, 2)?;
    }
    Ok(x)
}

impl SwinIr {
    /// What was loaded.
    pub fn config(&self) -> &SwinIrConfig {
        &self.config
    }

    /// Reads the shape from the tensors under `prefix` and loads the weights.
    pub fn load(w: &Weights, prefix: &str) -> Result<Self> {
        let bad = |message: String| Error::InvalidModel {
            path: w.path().to_path_buf(),
            message: format!("SwinIR: {message}"),
        };
        let name = |n: &str| format!("{prefix}{n}");
        let first_shape = shape_of(w, &name("conv_first.weight"))?;
        let [embed_dim, 3, 3, 3] = first_shape[..] else {
            return Err(bad(format!(
                "the first convolution has shape {first_shape:?}; Studio runs RGB SwinIRs \
                 (width, 3, 3, 3)"
            )));
        };
        if !(1..=MAX_WIDTH).contains(&embed_dim) {
            return Err(bad(format!("{embed_dim} channels; at most {MAX_WIDTH}")));
        }
        let block = |g: usize, b: usize| format!("{prefix}layers.{g}.residual_group.blocks.{b}");
        let groups = (0..=MAX_GROUPS)
            .take_while(|&g| w.contains(&format!("{}.attn.qkv.weight", block(g, 0))))
            .count();
        if groups == 0 || groups > MAX_GROUPS {
            return Err(bad(format!(
                "{groups} residual groups; 1 to {MAX_GROUPS} are accepted"
            )));
        }
        let mut depths = Vec::with_capacity(groups);
        let mut heads = Vec::with_capacity(groups);
        let mut window = None;
        for g in 0..groups {
            let depth = (0..=MAX_BLOCKS)
                .take_while(|&b| w.contains(&format!("{}.attn.qkv.weight", block(g, b))))
                .count();
            if depth > MAX_BLOCKS {
                return Err(bad(format!(
                    "group {g} has over {MAX_BLOCKS} blocks; at most {MAX_BLOCKS}"
                )));
            }
            let table = shape_of(
                w,
                &format!("{}.attn.relative_position_bias_table", block(g, 0)),
            )?;
            let [rows, h] = table[..] else {
                return Err(bad(format!(
                    "a relative position bias table of shape {table:?}, not (rows, heads)"
                )));
            };
            // rows = (2·ws - 1)²
            let side = (1..=2 * MAX_WINDOW).find(|s| s * s == rows);
            let ws = match side {
                Some(s) if s % 2 == 1 => s.div_ceil(2),
                _ => {
                    return Err(bad(format!(
                        "a relative position bias table of {rows} rows is not that of a window \
                         of at most {MAX_WINDOW}"
                    )));
                }
            };
            if *window.get_or_insert(ws) != ws {
                return Err(bad("groups with different windows".into()));
            }
            if h == 0 || embed_dim % h != 0 {
                return Err(bad(format!(
                    "{h} heads do not divide the {embed_dim} channels"
                )));
            }
            depths.push(depth);
            heads.push(h);
        }
        let window = window.unwrap_or(8);
        if window < 2 {
            return Err(bad(format!("a window of {window}; at least 2")));
        }
        let mlp_shape = shape_of(w, &format!("{}.mlp.fc1.weight", block(0, 0)))?;
        let mlp_hidden = mlp_shape.first().copied().unwrap_or(0);
        if !(1..=4 * MAX_WIDTH).contains(&mlp_hidden) {
            return Err(bad(format!(
                "an MLP of {mlp_hidden} channels; at most {}",
                4 * MAX_WIDTH
            )));
        }
        let resi = if w.contains(&name("conv_after_body.0.weight")) {
            ResiConnection::ThreeConv
        } else {
            ResiConnection::OneConv
        };
        let (upsampler, scale) = if w.contains(&name("conv_up1.weight")) {
            let ups = (1..=3)
                .take_while(|i| w.contains(&name(&format!("conv_up{i}.weight"))))
                .count();
            (Upsampler::NearestConv, 1 << ups)
        } else if w.contains(&name("conv_before_upsample.0.weight")) {
            let feat = shape_of(w, &name("conv_before_upsample.0.weight"))?[0];
            let mut scale = 1;
            for k in (0..8).step_by(2) {
                let Ok(shape) = shape_of(w, &name(&format!("upsample.{k}.weight"))) else {
                    break;
                };
                match shape.first() {
                    Some(&o) if o == 4 * feat => scale *= 2,
                    Some(&o) if o == 9 * feat && k == 0 => scale *= 3,
                    _ => return Err(bad(format!("an up-sampling convolution of {shape:?}"))),
                }
            }
            if scale == 1 {
                return Err(bad("no up-sampling convolutions".into()));
            }
            (Upsampler::PixelShuffle, scale)
        } else if w.contains(&name("upsample.0.weight")) {
            let out = shape_of(w, &name("upsample.0.weight"))?[0];
            let scale = (2..=8).find(|s| 3 * s * s == out).ok_or_else(|| {
                bad(format!(
                    "a one-step up-sampling to {out} channels, not 3·scale²"
                ))
            })?;
            (Upsampler::PixelShuffleDirect, scale)
        } else {
            return Err(bad(
                "it has no up-sampling: a SwinIR for denoising or JPEG artefacts (×1), not an \
                 upscaler"
                    .into(),
            ));
        };
        let config = SwinIrConfig {
            embed_dim,
            depths,
            heads,
            window,
            mlp_hidden,
            upsampler,
            resi,
            patch_norm: w.contains(&name("patch_embed.norm.weight")),
            scale,
        };
        Self::load_weights(w, prefix, config)
    }

    fn load_weights(w: &Weights, prefix: &str, config: SwinIrConfig) -> Result<Self> {
        let name = |n: &str| format!("{prefix}{n}");
        let dim = config.embed_dim;
        let ws = config.window;
        let n = ws * ws;
        let index = Tensor::new(relative_position_index(ws), w.device())?;
        let mut groups = Vec::with_capacity(config.depths.len());
        for (g, (&depth, &heads)) in config.depths.iter().zip(&config.heads).enumerate() {
            let mut blocks = Vec::with_capacity(depth);
            for b in 0..depth {
                let p = name(&format!("layers.{g}.residual_group.blocks.{b}"));
                let table = w.get(
                    &format!("{p}.attn.relative_position_bias_table"),
                    &[(2 * ws - 1) * (2 * ws - 1), heads],
                )?;
                let bias = table
                    .index_select(&index, 0)?
                    .reshape((n, n, heads))?
                    .permute((2, 0, 1))?
                    .contiguous()?;
                blocks.push(Block {
                    norm1: Norm::load(w, &format!("{p}.norm1"), dim)?,
                    qkv: linear(w, &format!("{p}.attn.qkv"), dim, 3 * dim)?,
                    proj: linear(w, &format!("{p}.attn.proj"), dim, dim)?,
                    bias,
                    norm2: Norm::load(w, &format!("{p}.norm2"), dim)?,
                    fc1: linear(w, &format!("{p}.mlp.fc1"), dim, config.mlp_hidden)?,
                    fc2: linear(w, &format!("{p}.mlp.fc2"), config.mlp_hidden, dim)?,
                    heads,
                    shift: if b % 2 == 1 { ws / 2 } else { 0 },
                });
            }
            groups.push(Group {
                blocks,
                conv: Resi::load(w, &name(&format!("layers.{g}.conv")), dim, config.resi)?,
            });
        }
        let tail = match config.upsampler {
            Upsampler::PixelShuffle => {
                let feat = shape_of(w, &name("conv_before_upsample.0.weight"))?[0];
                let steps: Vec<usize> = if config.scale == 3 {
                    vec![3]
                } else {
                    vec![2; config.scale.trailing_zeros() as usize]
                };
                let mut ups = Vec::with_capacity(steps.len());
                for (i, &r) in steps.iter().enumerate() {
                    let conv =
                        Conv::load(w, &name(&format!("upsample.{}", 2 * i)), feat, r * r * feat)?;
                    ups.push((conv, r));
                }
                Tail::PixelShuffle {
                    before: Conv::load(w, &name("conv_before_upsample.0"), dim, feat)?,
                    ups,
                    last: Conv::load(w, &name("conv_last"), feat, 3)?,
                }
            }
            Upsampler::PixelShuffleDirect => Tail::Direct {
                up: Conv::load(w, &name("upsample.0"), dim, 3 * config.scale * config.scale)?,
            },
            Upsampler::NearestConv => {
                let feat = shape_of(w, &name("conv_before_upsample.0.weight"))?[0];
                let steps = config.scale.trailing_zeros() as usize;
                let mut ups = Vec::with_capacity(steps);
                for i in 1..=steps {
                    ups.push(Conv::load(w, &name(&format!("conv_up{i}")), feat, feat)?);
                }
                Tail::Nearest {
                    before: Conv::load(w, &name("conv_before_upsample.0"), dim, feat)?,
                    ups,
                    hr: Conv::load(w, &name("conv_hr"), feat, feat)?,
                    last: Conv::load(w, &name("conv_last"), feat, 3)?,
                }
            }
        };
        Ok(Self {
            first: Conv::load(w, &name("conv_first"), 3, dim)?,
            patch_norm: if config.patch_norm {
                Some(Norm::load(w, &name("patch_embed.norm"), dim)?)
            } else {
                None
            },
            groups,
            norm: Norm::load(w, &name("norm"), dim)?,
            after_body: Resi::load(w, &name("conv_after_body"), dim, config.resi)?,
            tail,
            config,
        })
    }

    /// `(1, C, H, W)` → `(H·W, C)` tokens.
    fn tokens(x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        Ok(x.reshape((c, h * w))?.t()?.contiguous()?)
    }

    /// `(H·W, C)` tokens → `(1, C, H, W)`.
    fn image(t: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let c = t.dim(1)?;
        Ok(t.t()?.contiguous()?.reshape((1, c, h, w))?)
    }

    /// The deep features of `(1, C, H, W)` (sides multiples of the window).
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let ws = self.config.window;
        let mut t = Self::tokens(x)?;
        if let Some(norm) = &self.patch_norm {
            t = norm.forward(&t)?;
        }
        let mask = shift_mask(h, w, ws, ws / 2, x.device())?;
        for group in &self.groups {
            let mut y = t.clone();
            for block in &group.blocks {
                y = block.forward(&y, (h, w), ws, Some(&mask))?;
            }
            let y = group.conv.forward(&Self::image(&y, h, w)?)?;
            t = (Self::tokens(&y)? + t)?;
        }
        Self::image(&self.norm.forward(&t)?, h, w)
    }

    /// The network on `(1, 3, H, W)` values in `[0, 1]`, any size; returns `(1, 3, H·scale,
    /// W·scale)`, not clamped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mean = Tensor::new(&MEAN, x.device())?.reshape((1, 3, 1, 1))?;
        let x = reflect_pad(x, self.config.window)?.broadcast_sub(&mean)?;
        let first = self.first.forward(&x)?;
        let deep = (self.after_body.forward(&self.features(&first)?)? + first)?;
        let y = match &self.tail {
            Tail::PixelShuffle { before, ups, last } => {
                let mut y = leaky(&before.forward(&deep)?)?;
                for (conv, r) in ups {
                    y = pixel_shuffle(&conv.forward(&y)?, *r)?;
                }
                last.forward(&y)?
            }
            Tail::Direct { up } => pixel_shuffle(&up.forward(&deep)?, self.config.scale)?,
            Tail::Nearest {
                before,
                ups,
                hr,
                last,
            } => {
                let mut y = leaky(&before.forward(&deep)?)?;
                for conv in ups {
                    let (_, _, yh, yw) = y.dims4()?;
                    y = lrelu(&conv.forward(&y.upsample_nearest2d(2 * yh, 2 * yw)?)?)?;
                }
                last.forward(&lrelu(&hr.forward(&y)?)?)?
            }
        };
        let s = self.config.scale;
        Ok(y.broadcast_add(&mean)?
            .narrow(2, 0, h * s)?
            .narrow(3, 0, w * s)?
            .contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_mirrors_without_repeating_the_edge() {
        assert_eq!(reflect_indices(4, 3), [0, 1, 2, 3, 2, 1, 0]);
        // Longer than the side: mirrored again.
        assert_eq!(reflect_indices(3, 5), [0, 1, 2, 1, 0, 1, 2, 1]);
        assert_eq!(reflect_indices(1, 2), [0, 0, 0]);
    }

    #[test]
    fn relative_positions_index_a_table_of_two_ws_minus_one_squared() {
        let idx = relative_position_index(2);
        // Tokens (0,0),(0,1),(1,0),(1,1): the same token is the table's centre.
        assert_eq!(idx[0], 4);
        assert_eq!(idx.iter().max(), Some(&8));
        assert_eq!(idx[1], 3, "(0,0) against (0,1): dx = -1");
    }

    #[test]
    fn the_shift_mask_separates_the_wrapped_regions() {
        let m = shift_mask(4, 4, 2, 1, &Device::Cpu).expect("mask");
        assert_eq!(m.dims(), [4, 1, 4, 4]);
        let v: Vec<f32> = m.flatten_all().expect("flat").to_vec1().expect("vec");
        // The first window lies in region (0,0) only: nothing masked.
        assert!(v[..16].iter().all(|&x| x == 0.0));
        // The last window straddles four regions: each token sees only itself.
        let last = &v[48..];
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(last[i * 4 + j] == 0.0, i == j, "{i} {j}");
            }
        }
    }
}
