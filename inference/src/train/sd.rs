//! Training the demo text-to-image model (issue 21): a tiny network of Stable Diffusion's
//! architecture in the diffusers layout Studio's Canvas loads:
//!
//! - the VAE: diffusers' `AutoencoderKL` in its tensor names (`encoder.down_blocks.{i}.…`,
//!   `quant_conv`, `decoder.up_blocks.{i}.…`): resnets of group norm (ε 1e-6), SiLU and 3×3
//!   convolutions, stride-2 down-sampling after padding bottom and right, nearest ×2
//!   up-sampling, single-head mid-block attention; [`vae_moments`] and [`vae_decode`] match
//!   Studio's [`crate::diffusion::vae::Vae`] (tested);
//! - the text encoder: CLIP's text transformer in transformers' tensor names
//!   (`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.{i}.…`,
//!   `text_model.final_layer_norm.…`): pre-LN layers, causal attention with queries scaled by
//!   `1/√head`, `quick_gelu` MLPs, the final layer norm (what SD 1.x conditions its UNet on);
//!   [`encode_text`] matches Studio's [`crate::diffusion::clip::ClipTextModel`] (tested).
//!
//! - the UNet: diffusers' `UNet2DConditionModel` (SD 1.x style: cross-attention levels with one
//!   transformer block and 1×1 projections, GEGLU feed-forward, the sinusoidal timestep
//!   embedding with `flip_sin_to_cos`, skip connections concatenated on the way up);
//!   [`unet_forward`] matches Studio's [`crate::diffusion::unet::Unet`] (tested).
//!
//! The forward passes use only differentiable ops ([`super::ops`]); the tests also check that
//! every parameter gets a gradient. [`train_sd`] runs the phases in order (the VAE; its
//! decoder alone on the fixed latents; the UNet with the text encoder on the VAE's latents),
//! checkpoints and resumes them, and writes the diffusers folder.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use candle_nn::Optimizer as _;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::ops::{conv_biased, group_norm, layer_norm, linear, normal, quick_gelu, softmax_last};
use crate::error::{Error, Result};

/// The layer norms' epsilon (transformers' CLIP default).
const LN_EPS: f64 = 1e-5;

/// The text encoder's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipShape {
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Width of the hidden states (the UNet's `cross_attention_dim`).
    pub hidden: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Attention heads (dividing `hidden`).
    pub heads: usize,
    /// Width of the MLPs.
    pub intermediate: usize,
    /// Positions: 77, the chunk Studio's tokenizer makes.
    pub positions: usize,
}

impl ClipShape {
    /// Every parameter's name and shape, as transformers' `CLIPTextModel` names them.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden;
        let mut out = vec![
            (
                "text_model.embeddings.token_embedding.weight".to_owned(),
                vec![self.vocab, h],
            ),
            (
                "text_model.embeddings.position_embedding.weight".to_owned(),
                vec![self.positions, h],
            ),
        ];
        for l in 0..self.layers {
            let p = format!("text_model.encoder.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                out.push((format!("{p}.self_attn.{proj}.weight"), vec![h, h]));
                out.push((format!("{p}.self_attn.{proj}.bias"), vec![h]));
            }
            for norm in ["layer_norm1", "layer_norm2"] {
                out.push((format!("{p}.{norm}.weight"), vec![h]));
                out.push((format!("{p}.{norm}.bias"), vec![h]));
            }
            out.push((format!("{p}.mlp.fc1.weight"), vec![self.intermediate, h]));
            out.push((format!("{p}.mlp.fc1.bias"), vec![self.intermediate]));
            out.push((format!("{p}.mlp.fc2.weight"), vec![h, self.intermediate]));
            out.push((format!("{p}.mlp.fc2.bias"), vec![h]));
        }
        out.push(("text_model.final_layer_norm.weight".to_owned(), vec![h]));
        out.push(("text_model.final_layer_norm.bias".to_owned(), vec![h]));
        out
    }

    /// transformers' `CLIPTextConfig` for this shape (`text_encoder/config.json`).
    pub fn config(&self, bos: u32, eos: u32) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "max_position_embeddings": self.positions,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": LN_EPS,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "torch_dtype": "float32",
        })
    }
}

/// Fresh variables for `params`: layer-norm weights 1 and biases 0, the rest normal with
/// standard deviation `scale` (biases 0), from `seed`.
pub fn init(
    params: &[(String, Vec<usize>)],
    seed: u64,
    scale: f64,
) -> Result<BTreeMap<String, Var>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut vars = BTreeMap::new();
    for (name, dims) in params {
        let is_norm = name.contains("norm");
        let t = if name.rsplit('.').next() == Some("bias") {
            Tensor::zeros(
                dims.as_slice(),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?
        } else if is_norm {
            Tensor::ones(
                dims.as_slice(),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?
        } else {
            normal(&mut rng, dims, scale)?
        };
        vars.insert(name.clone(), Var::from_tensor(&t)?);
    }
    Ok(vars)
}

/// `vars` as variables on `device` (the same ones on the CPU).
fn on_device(
    vars: BTreeMap<String, Var>,
    device: &candle_core::Device,
) -> Result<BTreeMap<String, Var>> {
    if device.is_cpu() {
        return Ok(vars);
    }
    vars.into_iter()
        .map(|(k, v)| Ok((k, Var::from_tensor(&v.as_tensor().to_device(device)?)?)))
        .collect()
}

/// The tensor named `name` among `vars`.
fn get(vars: &BTreeMap<String, Var>, name: &str) -> Result<Tensor> {
    vars.get(name)
        .map(|v| v.as_tensor().clone())
        .ok_or_else(|| Error::InvalidParameter(format!("the model has no {name}")))
}

/// The text encoder's last hidden states after the final layer norm, `(b, t, hidden)`, for
/// token ids `(b, t)`.
pub fn encode_text(vars: &BTreeMap<String, Var>, s: &ClipShape, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let h = s.hidden;
    let head = h / s.heads;
    let g = |name: &str| get(vars, name);
    let tokens = g("text_model.embeddings.token_embedding.weight")?
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, h))?;
    let positions = g("text_model.embeddings.position_embedding.weight")?.narrow(0, 0, t)?;
    let mut x = tokens.broadcast_add(&positions)?;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), ids.device())?;
    for l in 0..s.layers {
        let p = format!("text_model.encoder.layers.{l}");
        let ln = |x: &Tensor, name: &str| -> Result<Tensor> {
            layer_norm(
                x,
                &g(&format!("{p}.{name}.weight"))?,
                &g(&format!("{p}.{name}.bias"))?,
                LN_EPS,
            )
        };
        let proj = |x: &Tensor, name: &str| -> Result<Tensor> {
            linear(
                x,
                &g(&format!("{p}.{name}.weight"))?,
                Some(&g(&format!("{p}.{name}.bias"))?),
            )
        };
        let y = ln(&x, "layer_norm1")?;
        let split = |t_: Tensor| -> Result<Tensor> {
            Ok(t_
                .reshape((b, t, s.heads, head))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split((proj(&y, "self_attn.q_proj")? / (head as f64).sqrt())?)?;
        let k = split(proj(&y, "self_attn.k_proj")?)?;
        let v = split(proj(&y, "self_attn.v_proj")?)?;
        let probs = softmax_last(&q.matmul(&k.t()?)?.broadcast_add(&mask)?)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        x = (x + proj(&attn, "self_attn.out_proj")?)?;
        let y = quick_gelu(&proj(&ln(&x, "layer_norm2")?, "mlp.fc1")?)?;
        x = (x + proj(&y, "mlp.fc2")?)?;
    }
    layer_norm(
        &x,
        &g("text_model.final_layer_norm.weight")?,
        &g("text_model.final_layer_norm.bias")?,
        LN_EPS,
    )
}

/// The VAE's shape (diffusers' `AutoencoderKL` config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaeShape {
    /// Channels per level, full resolution first; every level but the last halves the size
    /// (four levels: SD's factor 8; three: the LDM's `kl-f4`).
    pub channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Latent channels (4 for Studio's pipeline).
    pub latent: usize,
    /// Groups of every group norm.
    pub groups: usize,
}

const VAE_EPS: f64 = 1e-6;

impl VaeShape {
    /// The latents' side is the image's over this: 2 for each level but the last.
    pub fn factor(&self) -> usize {
        1 << self.channels.len().saturating_sub(1).min(16)
    }

    /// Every parameter's name and shape, as diffusers names them.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut conv = |name: String, o: usize, i: usize, k: usize| {
            out.push((format!("{name}.weight"), vec![o, i, k, k]));
            out.push((format!("{name}.bias"), vec![o]));
        };
        let ch = &self.channels;
        let n = ch.len();
        let last = ch[n - 1];
        let lat = self.latent;
        let mut resnets: Vec<(String, usize, usize)> = Vec::new();
        conv("encoder.conv_in".into(), ch[0], 3, 3);
        for i in 0..n {
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            for j in 0..self.layers_per_block {
                let p = format!("encoder.down_blocks.{i}.resnets.{j}");
                resnets.push((p, if j == 0 { c_in } else { ch[i] }, ch[i]));
            }
            if i + 1 < n {
                conv(
                    format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    ch[i],
                    ch[i],
                    3,
                );
            }
        }
        conv("encoder.conv_out".into(), 2 * lat, last, 3);
        conv("quant_conv".into(), 2 * lat, 2 * lat, 1);
        conv("post_quant_conv".into(), lat, lat, 1);
        conv("decoder.conv_in".into(), last, lat, 3);
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        for i in 0..n {
            let c_in = if i == 0 { rev[0] } else { rev[i - 1] };
            for j in 0..=self.layers_per_block {
                let p = format!("decoder.up_blocks.{i}.resnets.{j}");
                resnets.push((p, if j == 0 { c_in } else { rev[i] }, rev[i]));
            }
            if i + 1 < n {
                conv(
                    format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    rev[i],
                    rev[i],
                    3,
                );
            }
        }
        conv("decoder.conv_out".into(), 3, ch[0], 3);
        for part in ["encoder", "decoder"] {
            for j in 0..2 {
                resnets.push((format!("{part}.mid_block.resnets.{j}"), last, last));
            }
            let a = format!("{part}.mid_block.attentions.0");
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                out.push((format!("{a}.{proj}.weight"), vec![last, last]));
                out.push((format!("{a}.{proj}.bias"), vec![last]));
            }
            out.push((format!("{a}.group_norm.weight"), vec![last]));
            out.push((format!("{a}.group_norm.bias"), vec![last]));
        }
        for (name, c) in [
            ("encoder.conv_norm_out", last),
            ("decoder.conv_norm_out", ch[0]),
        ] {
            out.push((format!("{name}.weight"), vec![c]));
            out.push((format!("{name}.bias"), vec![c]));
        }
        for (p, c_in, c_out) in resnets {
            out.push((format!("{p}.norm1.weight"), vec![c_in]));
            out.push((format!("{p}.norm1.bias"), vec![c_in]));
            out.push((format!("{p}.conv1.weight"), vec![c_out, c_in, 3, 3]));
            out.push((format!("{p}.conv1.bias"), vec![c_out]));
            out.push((format!("{p}.norm2.weight"), vec![c_out]));
            out.push((format!("{p}.norm2.bias"), vec![c_out]));
            out.push((format!("{p}.conv2.weight"), vec![c_out, c_out, 3, 3]));
            out.push((format!("{p}.conv2.bias"), vec![c_out]));
            if c_in != c_out {
                out.push((format!("{p}.conv_shortcut.weight"), vec![c_out, c_in, 1, 1]));
                out.push((format!("{p}.conv_shortcut.bias"), vec![c_out]));
            }
        }
        out
    }

    /// diffusers' `vae/config.json` for this shape.
    pub fn config(&self, scaling_factor: f64) -> serde_json::Value {
        let n = self.channels.len();
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": self.channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": self.latent,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.groups,
            "scaling_factor": scaling_factor,
        })
    }
}

/// `name`'s convolution (weight and bias) over `x`.
fn conv_named(
    vars: &BTreeMap<String, Var>,
    name: &str,
    x: &Tensor,
    pad: usize,
    stride: usize,
) -> Result<Tensor> {
    let w = get(vars, &format!("{name}.weight"))?;
    let b = get(vars, &format!("{name}.bias"))?;
    conv_biased(x, &w, Some(&b), pad, stride)
}

fn group_norm_named(
    vars: &BTreeMap<String, Var>,
    name: &str,
    x: &Tensor,
    groups: usize,
) -> Result<Tensor> {
    group_norm(
        x,
        groups,
        &get(vars, &format!("{name}.weight"))?,
        &get(vars, &format!("{name}.bias"))?,
        VAE_EPS,
    )
}

fn vae_resnet(vars: &BTreeMap<String, Var>, p: &str, x: &Tensor, groups: usize) -> Result<Tensor> {
    let h = group_norm_named(vars, &format!("{p}.norm1"), x, groups)?.silu()?;
    let h = conv_named(vars, &format!("{p}.conv1"), &h, 1, 1)?;
    let h = group_norm_named(vars, &format!("{p}.norm2"), &h, groups)?.silu()?;
    let h = conv_named(vars, &format!("{p}.conv2"), &h, 1, 1)?;
    let shortcut = format!("{p}.conv_shortcut");
    let x = if vars.contains_key(&format!("{shortcut}.weight")) {
        conv_named(vars, &shortcut, x, 0, 1)?
    } else {
        x.clone()
    };
    Ok((x + h)?)
}

/// The mid block: resnet, single-head attention over the pixels, resnet.
fn vae_mid(vars: &BTreeMap<String, Var>, p: &str, x: &Tensor, groups: usize) -> Result<Tensor> {
    let x = vae_resnet(vars, &format!("{p}.resnets.0"), x, groups)?;
    let a = format!("{p}.attentions.0");
    let (b, c, h, w) = x.dims4()?;
    let tokens = group_norm_named(vars, &format!("{a}.group_norm"), &x, groups)?
        .reshape((b, c, h * w))?
        .transpose(1, 2)?;
    let proj = |t: &Tensor, name: &str| -> Result<Tensor> {
        linear(
            t,
            &get(vars, &format!("{a}.{name}.weight"))?,
            Some(&get(vars, &format!("{a}.{name}.bias"))?),
        )
    };
    let q = proj(&tokens, "to_q")?;
    let k = proj(&tokens, "to_k")?;
    let v = proj(&tokens, "to_v")?;
    let probs = softmax_last(&(q.matmul(&k.t()?)? / (c as f64).sqrt())?)?;
    let out = proj(&probs.matmul(&v)?, "to_out.0")?
        .transpose(1, 2)?
        .reshape((b, c, h, w))?;
    vae_resnet(vars, &format!("{p}.resnets.1"), &(x + out)?, groups)
}

/// The encoder's moments `(b, 2·latent, h/f, w/f)` after `quant_conv`: the posterior's mean,
/// then its log-variance.
pub fn vae_moments(vars: &BTreeMap<String, Var>, s: &VaeShape, image: &Tensor) -> Result<Tensor> {
    let n = s.channels.len();
    let mut x = conv_named(vars, "encoder.conv_in", image, 1, 1)?;
    for i in 0..n {
        for j in 0..s.layers_per_block {
            let p = format!("encoder.down_blocks.{i}.resnets.{j}");
            x = vae_resnet(vars, &p, &x, s.groups)?;
        }
        if i + 1 < n {
            let padded = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            let p = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
            x = conv_named(vars, &p, &padded, 0, 2)?;
        }
    }
    let x = vae_mid(vars, "encoder.mid_block", &x, s.groups)?;
    let x = group_norm_named(vars, "encoder.conv_norm_out", &x, s.groups)?.silu()?;
    let x = conv_named(vars, "encoder.conv_out", &x, 1, 1)?;
    conv_named(vars, "quant_conv", &x, 0, 1)
}

/// The decoder: latents (not scaled) `(b, latent, h, w)` → image `(b, 3, h·f, w·f)`.
pub fn vae_decode(vars: &BTreeMap<String, Var>, s: &VaeShape, latents: &Tensor) -> Result<Tensor> {
    let n = s.channels.len();
    let x = conv_named(vars, "post_quant_conv", latents, 0, 1)?;
    let x = conv_named(vars, "decoder.conv_in", &x, 1, 1)?;
    let mut x = vae_mid(vars, "decoder.mid_block", &x, s.groups)?;
    for i in 0..n {
        for j in 0..=s.layers_per_block {
            let p = format!("decoder.up_blocks.{i}.resnets.{j}");
            x = vae_resnet(vars, &p, &x, s.groups)?;
        }
        if i + 1 < n {
            let (_, _, h, w) = x.dims4()?;
            let up = x.upsample_nearest2d(2 * h, 2 * w)?;
            let p = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
            x = conv_named(vars, &p, &up, 1, 1)?;
        }
    }
    let x = group_norm_named(vars, "decoder.conv_norm_out", &x, s.groups)?.silu()?;
    conv_named(vars, "decoder.conv_out", &x, 1, 1)
}

/// One level of the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnetLevel {
    /// Channels of its feature maps.
    pub channels: usize,
    /// Whether its blocks have cross-attention (`CrossAttnDownBlock2D`).
    pub attention: bool,
    /// Attention heads.
    pub heads: usize,
}

/// The UNet's shape (diffusers' `UNet2DConditionModel` config, SD 1.x style: one transformer
/// block per attention, 1×1 convolution projections).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnetShape {
    /// Levels, full resolution first; every level but the last halves the size.
    pub levels: Vec<UnetLevel>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Width of the text encoder's states.
    pub cross_dim: usize,
    /// Groups of the resnets' group norms.
    pub groups: usize,
    /// Latent side the model is trained at (`sample_size`).
    pub sample_size: usize,
}

const UNET_EPS: f64 = 1e-5;
/// The transformers' input group norm (diffusers' `Transformer2DModel`).
const TRANSFORMER_GN_EPS: f64 = 1e-6;

impl UnetShape {
    /// Every parameter's name and shape, as diffusers names them.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let lv = &self.levels;
        let n = lv.len();
        let b0 = lv[0].channels;
        let temb = 4 * b0;
        let vec1 = |name: &str, c: usize| {
            [
                (format!("{name}.weight"), vec![c]),
                (format!("{name}.bias"), vec![c]),
            ]
        };
        let conv = |name: &str, o: usize, i: usize, k: usize| {
            [
                (format!("{name}.weight"), vec![o, i, k, k]),
                (format!("{name}.bias"), vec![o]),
            ]
        };
        let lin = |name: &str, o: usize, i: usize| {
            [
                (format!("{name}.weight"), vec![o, i]),
                (format!("{name}.bias"), vec![o]),
            ]
        };
        let resnet = |out: &mut Vec<(String, Vec<usize>)>, p: &str, c_in: usize, c_out: usize| {
            out.extend(vec1(&format!("{p}.norm1"), c_in));
            out.extend(conv(&format!("{p}.conv1"), c_out, c_in, 3));
            out.extend(lin(&format!("{p}.time_emb_proj"), c_out, temb));
            out.extend(vec1(&format!("{p}.norm2"), c_out));
            out.extend(conv(&format!("{p}.conv2"), c_out, c_out, 3));
            if c_in != c_out {
                out.extend(conv(&format!("{p}.conv_shortcut"), c_out, c_in, 1));
            }
        };
        let transformer = |out: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize| {
            out.extend(vec1(&format!("{p}.norm"), c));
            out.extend(conv(&format!("{p}.proj_in"), c, c, 1));
            out.extend(conv(&format!("{p}.proj_out"), c, c, 1));
            let t = format!("{p}.transformer_blocks.0");
            for norm in ["norm1", "norm2", "norm3"] {
                out.extend(vec1(&format!("{t}.{norm}"), c));
            }
            for (attn, ctx) in [("attn1", c), ("attn2", self.cross_dim)] {
                out.push((format!("{t}.{attn}.to_q.weight"), vec![c, c]));
                out.push((format!("{t}.{attn}.to_k.weight"), vec![c, ctx]));
                out.push((format!("{t}.{attn}.to_v.weight"), vec![c, ctx]));
                out.extend(lin(&format!("{t}.{attn}.to_out.0"), c, c));
            }
            out.extend(lin(&format!("{t}.ff.net.0.proj"), 8 * c, c));
            out.extend(lin(&format!("{t}.ff.net.2"), c, 4 * c));
        };
        out.extend(conv("conv_in", b0, 4, 3));
        out.extend(lin("time_embedding.linear_1", temb, b0));
        out.extend(lin("time_embedding.linear_2", temb, temb));
        for (i, level) in lv.iter().enumerate() {
            let c_in = if i == 0 { b0 } else { lv[i - 1].channels };
            for j in 0..self.layers_per_block {
                let p = format!("down_blocks.{i}");
                resnet(
                    &mut out,
                    &format!("{p}.resnets.{j}"),
                    if j == 0 { c_in } else { level.channels },
                    level.channels,
                );
                if level.attention {
                    transformer(&mut out, &format!("{p}.attentions.{j}"), level.channels);
                }
            }
            if i + 1 < n {
                out.extend(conv(
                    &format!("down_blocks.{i}.downsamplers.0.conv"),
                    level.channels,
                    level.channels,
                    3,
                ));
            }
        }
        let last = lv[n - 1].channels;
        resnet(&mut out, "mid_block.resnets.0", last, last);
        transformer(&mut out, "mid_block.attentions.0", last);
        resnet(&mut out, "mid_block.resnets.1", last, last);
        for i in 0..n {
            let level = lv[n - 1 - i];
            let prev = if i == 0 { last } else { lv[n - i].channels };
            let skip_last = lv[if i == n - 1 { 0 } else { n - i - 2 }].channels;
            let layers = self.layers_per_block + 1;
            for j in 0..layers {
                let c_in = if j == 0 { prev } else { level.channels };
                let c_skip = if j + 1 == layers {
                    skip_last
                } else {
                    level.channels
                };
                let p = format!("up_blocks.{i}");
                resnet(
                    &mut out,
                    &format!("{p}.resnets.{j}"),
                    c_in + c_skip,
                    level.channels,
                );
                if level.attention {
                    transformer(&mut out, &format!("{p}.attentions.{j}"), level.channels);
                }
            }
            if i + 1 < n {
                out.extend(conv(
                    &format!("up_blocks.{i}.upsamplers.0.conv"),
                    level.channels,
                    level.channels,
                    3,
                ));
            }
        }
        out.extend(vec1("conv_norm_out", b0));
        out.extend(conv("conv_out", 4, b0, 3));
        out
    }

    /// diffusers' `unet/config.json` for this shape.
    pub fn config(&self) -> serde_json::Value {
        let down: Vec<&str> = self
            .levels
            .iter()
            .map(|l| {
                if l.attention {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
            })
            .collect();
        let up: Vec<&str> = self
            .levels
            .iter()
            .rev()
            .map(|l| {
                if l.attention {
                    "CrossAttnUpBlock2D"
                } else {
                    "UpBlock2D"
                }
            })
            .collect();
        serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": self.levels.iter().map(|l| l.channels).collect::<Vec<_>>(),
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.levels.iter().map(|l| l.heads).collect::<Vec<_>>(),
            "cross_attention_dim": self.cross_dim,
            "norm_num_groups": self.groups,
            "norm_eps": UNET_EPS,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "use_linear_projection": false,
            "sample_size": self.sample_size,
        })
    }
}

fn unet_resnet(
    vars: &BTreeMap<String, Var>,
    p: &str,
    x: &Tensor,
    temb_act: &Tensor,
    groups: usize,
) -> Result<Tensor> {
    let gn = |name: &str, t: &Tensor| -> Result<Tensor> {
        group_norm(
            t,
            groups,
            &get(vars, &format!("{p}.{name}.weight"))?,
            &get(vars, &format!("{p}.{name}.bias"))?,
            UNET_EPS,
        )
    };
    let h = conv_named(vars, &format!("{p}.conv1"), &gn("norm1", x)?.silu()?, 1, 1)?;
    let t = linear(
        temb_act,
        &get(vars, &format!("{p}.time_emb_proj.weight"))?,
        Some(&get(vars, &format!("{p}.time_emb_proj.bias"))?),
    )?;
    let h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
    let h = conv_named(vars, &format!("{p}.conv2"), &gn("norm2", &h)?.silu()?, 1, 1)?;
    let shortcut = format!("{p}.conv_shortcut");
    let x = if vars.contains_key(&format!("{shortcut}.weight")) {
        conv_named(vars, &shortcut, x, 0, 1)?
    } else {
        x.clone()
    };
    Ok((x + h)?)
}

/// Multi-head attention of `x` `(b, t, c)` over `context` (itself when `None`).
fn unet_attention(
    vars: &BTreeMap<String, Var>,
    p: &str,
    x: &Tensor,
    context: Option<&Tensor>,
    heads: usize,
) -> Result<Tensor> {
    let context = context.unwrap_or(x);
    let (b, t, c) = x.dims3()?;
    let head = c / heads;
    let split = |y: Tensor| -> Result<Tensor> {
        let n = y.dim(1)?;
        Ok(y.reshape((b, n, heads, head))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let w = |name: &str| get(vars, &format!("{p}.{name}.weight"));
    // The scale goes on the queries, not on the larger score matrix.
    let q = split((linear(x, &w("to_q")?, None)? / (head as f64).sqrt())?)?;
    let k = split(linear(context, &w("to_k")?, None)?)?;
    let v = split(linear(context, &w("to_v")?, None)?)?;
    let probs = softmax_last(&q.matmul(&k.t()?)?)?;
    let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
    linear(
        &out,
        &w("to_out.0")?,
        Some(&get(vars, &format!("{p}.to_out.0.bias"))?),
    )
}

fn unet_transformer(
    vars: &BTreeMap<String, Var>,
    p: &str,
    x: &Tensor,
    context: &Tensor,
    heads: usize,
    groups: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let normed = group_norm(
        x,
        groups,
        &get(vars, &format!("{p}.norm.weight"))?,
        &get(vars, &format!("{p}.norm.bias"))?,
        TRANSFORMER_GN_EPS,
    )?;
    let projected = conv_named(vars, &format!("{p}.proj_in"), &normed, 0, 1)?;
    let mut tokens = projected.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
    let t = format!("{p}.transformer_blocks.0");
    let ln = |y: &Tensor, name: &str| -> Result<Tensor> {
        layer_norm(
            y,
            &get(vars, &format!("{t}.{name}.weight"))?,
            &get(vars, &format!("{t}.{name}.bias"))?,
            LN_EPS,
        )
    };
    tokens = (unet_attention(
        vars,
        &format!("{t}.attn1"),
        &ln(&tokens, "norm1")?,
        None,
        heads,
    )? + &tokens)?;
    tokens = (unet_attention(
        vars,
        &format!("{t}.attn2"),
        &ln(&tokens, "norm2")?,
        Some(context),
        heads,
    )? + &tokens)?;
    // GEGLU: the first half times the exact GELU of the second.
    let proj = linear(
        &ln(&tokens, "norm3")?,
        &get(vars, &format!("{t}.ff.net.0.proj.weight"))?,
        Some(&get(vars, &format!("{t}.ff.net.0.proj.bias"))?),
    )?;
    let inner = proj.dim(2)? / 2;
    let gated = (proj.narrow(2, 0, inner)? * proj.narrow(2, inner, inner)?.gelu_erf()?)?;
    let ff = linear(
        &gated,
        &get(vars, &format!("{t}.ff.net.2.weight"))?,
        Some(&get(vars, &format!("{t}.ff.net.2.bias"))?),
    )?;
    tokens = (ff + tokens)?;
    let image = tokens.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
    Ok((conv_named(vars, &format!("{p}.proj_out"), &image, 0, 1)? + x)?)
}

/// The sinusoidal timestep embedding diffusers' `Timesteps(dim, flip_sin_to_cos=True,
/// downscale_freq_shift=0)` makes: `[cos(t·fᵢ), sin(t·fᵢ)]`, `fᵢ = 10000^(−i/half)`.
fn timestep_features(
    timesteps: &[f64],
    dim: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let freqs: Vec<f64> = (0..half)
            .map(|i| (-(10_000f64.ln()) * i as f64 / half as f64).exp() * t)
            .collect();
        data.extend(freqs.iter().map(|a| a.cos() as f32));
        data.extend(freqs.iter().map(|a| a.sin() as f32));
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// The UNet's prediction `(b, 4, h, w)` for latents `x` `(b, 4, h, w)` at `timesteps` (one per
/// row) with text states `context` `(b, tokens, cross_dim)`.
pub fn unet_forward(
    vars: &BTreeMap<String, Var>,
    s: &UnetShape,
    x: &Tensor,
    timesteps: &[f64],
    context: &Tensor,
) -> Result<Tensor> {
    let lv = &s.levels;
    let n = lv.len();
    let b0 = lv[0].channels;
    let g = |name: &str| get(vars, name);
    let emb = linear(
        &timestep_features(timesteps, b0, x.device())?,
        &g("time_embedding.linear_1.weight")?,
        Some(&g("time_embedding.linear_1.bias")?),
    )?
    .silu()?;
    let emb = linear(
        &emb,
        &g("time_embedding.linear_2.weight")?,
        Some(&g("time_embedding.linear_2.bias")?),
    )?;
    let temb_act = emb.silu()?;
    let mut x = conv_named(vars, "conv_in", x, 1, 1)?;
    let mut skips = vec![x.clone()];
    for (i, level) in lv.iter().enumerate() {
        for j in 0..s.layers_per_block {
            let p = format!("down_blocks.{i}");
            x = unet_resnet(vars, &format!("{p}.resnets.{j}"), &x, &temb_act, s.groups)?;
            if level.attention {
                x = unet_transformer(
                    vars,
                    &format!("{p}.attentions.{j}"),
                    &x,
                    context,
                    level.heads,
                    s.groups,
                )?;
            }
            skips.push(x.clone());
        }
        if i + 1 < n {
            x = conv_named(
                vars,
                &format!("down_blocks.{i}.downsamplers.0.conv"),
                &x,
                1,
                2,
            )?;
            skips.push(x.clone());
        }
    }
    let last = lv[n - 1];
    x = unet_resnet(vars, "mid_block.resnets.0", &x, &temb_act, s.groups)?;
    x = unet_transformer(
        vars,
        "mid_block.attentions.0",
        &x,
        context,
        last.heads,
        s.groups,
    )?;
    x = unet_resnet(vars, "mid_block.resnets.1", &x, &temb_act, s.groups)?;
    for i in 0..n {
        let level = lv[n - 1 - i];
        for j in 0..=s.layers_per_block {
            let skip = skips.pop().ok_or_else(|| {
                Error::InvalidParameter("the UNet ran out of skip connections".into())
            })?;
            let p = format!("up_blocks.{i}");
            x = unet_resnet(
                vars,
                &format!("{p}.resnets.{j}"),
                &Tensor::cat(&[&x, &skip], 1)?,
                &temb_act,
                s.groups,
            )?;
            if level.attention {
                x = unet_transformer(
                    vars,
                    &format!("{p}.attentions.{j}"),
                    &x,
                    context,
                    level.heads,
                    s.groups,
                )?;
            }
        }
        if i + 1 < n {
            let (_, _, h, w) = x.dims4()?;
            let up = x.upsample_nearest2d(2 * h, 2 * w)?;
            x = conv_named(vars, &format!("up_blocks.{i}.upsamplers.0.conv"), &up, 1, 1)?;
        }
    }
    let x = group_norm(
        x.as_ref(),
        s.groups,
        &g("conv_norm_out.weight")?,
        &g("conv_norm_out.bias")?,
        UNET_EPS,
    )?
    .silu()?;
    conv_named(vars, "conv_out", &x, 1, 1)
}

// ---- data and tokenizer ------------------------------------------------------------------------

/// Captioned images read for training.
pub struct Captioned {
    /// `(n, 3, side, side)` in −1…1.
    pub pixels: Tensor,
    /// One caption per image.
    pub captions: Vec<String>,
    /// Lines of `captions.jsonl` skipped: unreadable or of another size.
    pub skipped: usize,
}

impl Captioned {
    /// The images' side in pixels.
    pub fn pixels_side(&self) -> usize {
        self.pixels.dims().last().copied().unwrap_or(0)
    }
}

/// `dir/file` when `file` names an entry of `dir` itself (no separators, not hidden, not `..`),
/// as the `file` fields of `captions.jsonl` must.
pub fn folder_entry(dir: &std::path::Path, file: &str) -> Option<std::path::PathBuf> {
    (!file.is_empty() && !file.contains(['/', '\\']) && !file.starts_with('.'))
        .then(|| dir.join(file))
}

/// Reads `dir/captions.jsonl` (`{"file": …, "caption": …}` per line, as `studio train
/// shapes-data` writes it) and the images it names, at most `max`; the first image decides
/// the size, unreadable ones and those of another size are skipped and counted.
pub fn read_captioned(dir: &std::path::Path, max: usize) -> Result<Captioned> {
    let list = dir.join("captions.jsonl");
    let text = std::fs::read_to_string(&list).map_err(|e| Error::io(&list, e))?;
    let (mut data, mut captions, mut skipped) = (Vec::new(), Vec::new(), 0);
    let mut side = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if captions.len() >= max {
            break;
        }
        let entry: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::BadConfig {
                path: list.clone(),
                message: e.to_string(),
            })?;
        let (Some(file), Some(caption)) = (entry["file"].as_str(), entry["caption"].as_str())
        else {
            skipped += 1;
            continue;
        };
        let Some(path) = folder_entry(dir, file) else {
            skipped += 1;
            continue;
        };
        let Ok(decoded) = crate::diffusion::imaging::decode_image_file(&path) else {
            skipped += 1;
            continue;
        };
        let image = decoded.image;
        let s = *side.get_or_insert(image.width);
        if image.width != s || image.height != s || !s.is_multiple_of(8) {
            skipped += 1;
            continue;
        }
        if (data.len() + 3 * (s * s) as usize) * 4 > 4 << 30 {
            return Err(Error::InvalidParameter(format!(
                "{} images already take 4 GB: read fewer",
                captions.len()
            )));
        }
        let plane = (s * s) as usize;
        let start = data.len();
        data.resize(start + 3 * plane, 0f32);
        for (i, p) in image.pixels.chunks_exact(3).enumerate() {
            for (c, v) in p.iter().enumerate() {
                data[start + c * plane + i] = f32::from(*v) / 127.5 - 1.0;
            }
        }
        captions.push(caption.to_owned());
    }
    let side = side.unwrap_or(0) as usize;
    if captions.is_empty() {
        return Err(Error::InvalidParameter(format!(
            "{} lists no readable images ({skipped} skipped)",
            list.display()
        )));
    }
    Ok(Captioned {
        pixels: Tensor::from_vec(
            data,
            (captions.len(), 3, side, side),
            &candle_core::Device::Cpu,
        )?,
        captions,
        skipped,
    })
}

/// Writes a CLIP tokenizer for `captions` into `dir` (`vocab.json`, `merges.txt`,
/// `tokenizer_config.json`): every character seen, alone and ending a word, and merges that
/// build each word of the captions into one token where the merge order allows. Studio's
/// [`ClipTokenizer::from_folder`] and transformers' `CLIPTokenizer` read it. Returns the
/// vocabulary size.
pub fn write_tokenizer<'a>(
    dir: &std::path::Path,
    captions: impl IntoIterator<Item = &'a str>,
) -> Result<usize> {
    let mut words = std::collections::BTreeSet::new();
    for c in captions {
        for w in c
            .to_lowercase()
            .split(|ch: char| !ch.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            words.insert(w.to_owned());
        }
        // Punctuation is a word of its own in CLIP's split.
        for ch in c.chars().filter(char::is_ascii_punctuation) {
            words.insert(ch.to_string());
        }
    }
    let mut vocab: Vec<String> = vec!["<|startoftext|>".into(), "<|endoftext|>".into()];
    let chars: std::collections::BTreeSet<char> = words.iter().flat_map(|w| w.chars()).collect();
    for ch in &chars {
        vocab.push(ch.to_string());
        vocab.push(format!("{ch}</w>"));
    }
    let mut merges: Vec<(String, String)> = Vec::new();
    for w in &words {
        let letters: Vec<char> = w.chars().collect();
        let mut left = letters[0].to_string();
        for (i, ch) in letters.iter().enumerate().skip(1) {
            let right = if i + 1 == letters.len() {
                format!("{ch}</w>")
            } else {
                ch.to_string()
            };
            let pair = (left.clone(), right.clone());
            left = format!("{left}{right}");
            if !merges.contains(&pair) {
                merges.push(pair);
                vocab.push(left.clone());
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    vocab.retain(|t| seen.insert(t.clone()));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let ids: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = dir.join(name);
        crate::sys::write_atomic(&path, bytes, false).map_err(|e| Error::io(&path, e))
    };
    write(
        "vocab.json",
        serde_json::Value::Object(ids).to_string().as_bytes(),
    )?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        text.push_str(a);
        text.push(' ');
        text.push_str(b);
        text.push('\n');
    }
    write("merges.txt", text.as_bytes())?;
    let config = serde_json::json!({
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 77,
        "do_lower_case": true,
    });
    write("tokenizer_config.json", config.to_string().as_bytes())?;
    Ok(vocab.len())
}

// ---- training ----------------------------------------------------------------------------------

/// The whole model's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdShape {
    /// The text encoder.
    pub clip: ClipShape,
    /// The VAE.
    pub vae: VaeShape,
    /// The UNet.
    pub unet: UnetShape,
}

/// How a run trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SdTrainOptions {
    /// VAE steps (the first phase).
    pub vae_steps: usize,
    /// The VAE phase trains on random square crops of this side (a multiple of the VAE's
    /// factor, at most the images'), placed on the latent grid: the convolutions learn the
    /// same local structure at a fraction of the cost. `None`: whole images.
    pub vae_crop: Option<usize>,
    /// Decoder steps (the second phase): the VAE's decoder alone, on the fixed encoder's
    /// latents, so a UNet trained on those latents stays valid. Mean absolute error, which
    /// keeps edges sharper than the squared error of the first phase.
    pub decoder_steps: usize,
    /// UNet and text-encoder steps (the last phase, on the VAE's latents).
    pub unet_steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Share of captions replaced by the empty prompt, so guidance has an unconditional model.
    pub caption_dropout: f64,
    /// The run's seed: the initial weights and every batch, timestep and noise.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
    /// Min-SNR-γ loss weighting (Hang et al., 2023): each image's noise-prediction error is
    /// weighted by `min(SNR, γ) / SNR`, so the nearly noise-free timesteps, easy and many,
    /// stop dominating the gradient and the noisy ones that decide layout and colour train
    /// faster. `None`: the plain mean squared error.
    pub min_snr_gamma: Option<f64>,
    /// The UNet phase's last this many steps lower the learning rate linearly towards zero
    /// (the cool-down of a warmup-stable-decay schedule): the weights settle instead of
    /// ending on one noisy step of a constant rate. 0: the rate stays constant.
    pub unet_cooldown: usize,
    /// Offset noise (Guttenberg, 2023): the UNet's training noise gets a per-image,
    /// per-channel constant of this standard deviation added. SD's schedule leaves the
    /// latents' mean (here mostly the background colour) barely destroyed at the last
    /// timestep, so without it the model reads the mean off the starting noise instead of
    /// from the prompt; with it, it must take it from the prompt. 0: plain Gaussian noise.
    pub offset_noise: f64,
}

impl SdTrainOptions {
    /// The learning rate of the UNet step after `done` steps: `lr`, then the cool-down's
    /// linear ramp from `lr` to `lr / cooldown` over the phase's last `unet_cooldown` steps.
    fn unet_lr(&self, done: usize) -> f64 {
        let left = self.unet_steps.saturating_sub(done);
        if self.unet_cooldown == 0 || left >= self.unet_cooldown {
            self.lr
        } else {
            self.lr * left as f64 / self.unet_cooldown as f64
        }
    }
}

/// What [`SdTrainer::train_step`] reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SdStep {
    /// "vae", "decoder" or "unet".
    pub phase: &'static str,
    /// Steps done in the phase.
    pub step: usize,
    /// The phase's loss: reconstruction (mean squared error, plus a small KL term) for the
    /// VAE; mean absolute error for the decoder; the noise prediction's mean squared error
    /// for the UNet (unweighted, whatever the weighting the gradient follows).
    pub loss: f32,
}

/// Stable Diffusion's training schedule: `scaled_linear` betas from 0.00085 to 0.012 over
/// 1,000 steps, as `scheduler_config.json` says.
fn alphas_cumprod() -> Vec<f64> {
    let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut acc = 1.0;
    (0..1000)
        .map(|i| {
            let beta = (a + (b - a) * f64::from(i) / 999.0).powi(2);
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

/// The UNet phase's noise for latents of `dims` `(n, c, h, w)`: standard normal, plus a
/// normal constant per image and channel of standard deviation `offset` when it is above 0
/// ([`SdTrainOptions::offset_noise`]).
fn training_noise(
    rng: &mut StdRng,
    dims: (usize, usize, usize, usize),
    offset: f64,
) -> Result<Tensor> {
    let (n, c, h, w) = dims;
    let noise = normal(rng, &[n, c, h, w], 1.0)?;
    if offset <= 0.0 {
        return Ok(noise);
    }
    Ok(noise.broadcast_add(&normal(rng, &[n, c, 1, 1], offset)?)?)
}

/// Min-SNR-γ's weight of each timestep's ε-prediction error: `min(SNR, γ) / SNR`, where
/// `SNR = ᾱ / (1 − ᾱ)`: 1 where the image is noisier than γ allows, less where it is clearer.
fn min_snr_weights(alphas_cumprod: &[f64], timesteps: &[usize], gamma: f64) -> Vec<f32> {
    timesteps
        .iter()
        .map(|&t| {
            let a = alphas_cumprod[t];
            let snr = a / (1.0 - a).max(f64::MIN_POSITIVE);
            (snr.min(gamma) / snr) as f32
        })
        .collect()
}

#[derive(Serialize, Deserialize)]
struct SdState {
    vae_steps: usize,
    #[serde(default)]
    decoder_steps: usize,
    unet_steps: usize,
    scaling_factor: Option<f64>,
    shape: SdShape,
}

/// A run: the three networks, Adam for each phase, the steps done.
pub struct SdTrainer {
    shape: SdShape,
    opts: SdTrainOptions,
    clip: BTreeMap<String, Var>,
    vae: BTreeMap<String, Var>,
    unet: BTreeMap<String, Var>,
    adam_vae: candle_nn::AdamW,
    adam_decoder: candle_nn::AdamW,
    adam_unet: candle_nn::AdamW,
    vae_done: usize,
    decoder_done: usize,
    unet_done: usize,
    /// 1 / the latents' standard deviation, measured when the UNet phase starts.
    scaling_factor: Option<f64>,
    /// The captions' 77-token chunks, and the empty prompt's.
    ids: Vec<Vec<u32>>,
    empty: Vec<u32>,
    /// The VAE's scaled latent means of every image, once the UNet phase starts (on
    /// `device`).
    latents: Option<Tensor>,
    /// Where the networks live and train; the images stay in memory on the CPU and each
    /// batch is copied over.
    device: candle_core::Device,
}

impl SdTrainer {
    /// A fresh run, or the one checkpointed in `checkpoint`, on `device`. `tokenizer` is the
    /// folder [`write_tokenizer`] wrote; `captions` are the training images' captions.
    pub fn new(
        shape: SdShape,
        opts: SdTrainOptions,
        checkpoint: &std::path::Path,
        tokenizer: &std::path::Path,
        captions: &[String],
        device: &candle_core::Device,
    ) -> Result<Self> {
        use crate::diffusion::prompt::{ClipTokenizer, Padding};
        let tok = ClipTokenizer::from_folder(tokenizer, shape.clip.vocab, Padding::Eos)?;
        let first = |text: &str| -> Result<Vec<u32>> {
            tok.chunks(text, 1)
                .into_iter()
                .next()
                .map(|c| c.ids)
                .ok_or_else(|| Error::InvalidParameter("the tokenizer made no chunk".into()))
        };
        let ids = captions
            .iter()
            .map(|c| first(c))
            .collect::<Result<Vec<_>>>()?;
        let empty = first("")?;
        // Drawn on the CPU from the seed (the same weights on every device), then moved.
        let clip = on_device(init(&shape.clip.parameters(), opts.seed, 0.02)?, device)?;
        let vae = on_device(init(&shape.vae.parameters(), opts.seed + 1, 0.05)?, device)?;
        let unet = on_device(init(&shape.unet.parameters(), opts.seed + 2, 0.05)?, device)?;
        let (mut vae_done, mut decoder_done, mut unet_done, mut scaling_factor) = (0, 0, 0, None);
        let state_file = checkpoint.join("state.json");
        if state_file.is_file() {
            let text =
                std::fs::read_to_string(&state_file).map_err(|e| Error::io(&state_file, e))?;
            let state: SdState = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
                path: state_file.clone(),
                message: e.to_string(),
            })?;
            if state.shape != shape {
                return Err(Error::InvalidParameter(format!(
                    "{} holds a model of another shape: remove it or train with its shape",
                    checkpoint.display()
                )));
            }
            let file = checkpoint.join("nets.safetensors");
            let saved = candle_core::safetensors::load(&file, device)?;
            for (prefix, vars) in [("C.", &clip), ("V.", &vae), ("U.", &unet)] {
                set_from(vars, &saved, prefix, &file)?;
            }
            (vae_done, decoder_done, unet_done, scaling_factor) = (
                state.vae_steps,
                state.decoder_steps,
                state.unet_steps,
                state.scaling_factor,
            );
        }
        let adam = |vars: Vec<Var>| {
            candle_nn::AdamW::new(
                vars,
                candle_nn::ParamsAdamW {
                    lr: opts.lr,
                    weight_decay: 0.0,
                    ..candle_nn::ParamsAdamW::default()
                },
            )
        };
        let adam_vae = adam(vae.values().cloned().collect())?;
        let adam_decoder = adam(
            vae.iter()
                .filter(|(k, _)| is_decoder(k))
                .map(|(_, v)| v.clone())
                .collect(),
        )?;
        let adam_unet = adam(unet.values().chain(clip.values()).cloned().collect())?;
        Ok(Self {
            shape,
            opts,
            clip,
            vae,
            unet,
            adam_vae,
            adam_decoder,
            adam_unet,
            vae_done,
            decoder_done,
            unet_done,
            scaling_factor,
            ids,
            empty,
            latents: None,
            device: device.clone(),
        })
    }

    /// Whether every phase is done.
    pub fn finished(&self) -> bool {
        self.vae_done >= self.opts.vae_steps
            && self.decoder_done >= self.opts.decoder_steps
            && self.unet_done >= self.opts.unet_steps
    }

    /// Whether no step has been taken (no checkpoint was resumed).
    pub fn is_fresh(&self) -> bool {
        self.vae_done + self.decoder_done + self.unet_done == 0
    }

    /// Starts from the weights of a diffusers folder [`SdTrainer::save_model`] wrote (the
    /// bundled demo model, say) instead of random ones, keeping its VAE's scaling factor so
    /// its UNet still fits the latents. Every tensor must be there with this run's shape.
    pub fn start_from(&mut self, folder: &std::path::Path) -> Result<()> {
        for (file, vars) in [
            ("text_encoder/model.safetensors", &self.clip),
            ("vae/diffusion_pytorch_model.safetensors", &self.vae),
            ("unet/diffusion_pytorch_model.safetensors", &self.unet),
        ] {
            let path = folder.join(file);
            let saved = candle_core::safetensors::load(&path, &self.device)?;
            set_from(vars, &saved, "", &path)?;
        }
        let config = folder.join("vae/config.json");
        let text = std::fs::read_to_string(&config).map_err(|e| Error::io(&config, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::BadConfig {
                path: config.clone(),
                message: e.to_string(),
            })?;
        let scale = value["scaling_factor"]
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| Error::BadConfig {
                path: config.clone(),
                message: "no positive scaling_factor".into(),
            })?;
        self.scaling_factor = Some(scale);
        self.latents = None;
        Ok(())
    }

    /// One step of the phase the run is in, on a batch drawn from `images` (those the
    /// captions were given for).
    pub fn train_step(&mut self, images: &Tensor) -> Result<SdStep> {
        let o = self.opts;
        let count = images.dim(0)?;
        let done = self.vae_done + self.decoder_done + self.unet_done;
        let mut rng =
            StdRng::seed_from_u64(o.seed.wrapping_mul(0x9e37_79b9).wrapping_add(done as u64));
        let rows: Vec<u32> = (0..o.batch)
            .map(|_| rand::Rng::random_range(&mut rng, 0..count) as u32)
            .collect();
        // The images' rows (on the CPU, where the images are) and the latents' (on the device).
        let index = Tensor::new(rows.as_slice(), &candle_core::Device::Cpu)?;
        let index_dev = index.to_device(&self.device)?;
        let dev = self.device.clone();
        if self.vae_done < o.vae_steps {
            let mut x = images.index_select(&index, 0)?;
            let side = x.dim(3)?.min(x.dim(2)?);
            if let Some(crop) = o.vae_crop.filter(|&c| c < side) {
                let f = self.shape.vae.factor();
                let cells = (side - crop) / f + 1;
                let (cy, cx) = (
                    rand::Rng::random_range(&mut rng, 0..cells) * f,
                    rand::Rng::random_range(&mut rng, 0..cells) * f,
                );
                x = x.narrow(2, cy, crop)?.narrow(3, cx, crop)?.contiguous()?;
            }
            let x = x.to_device(&dev)?;
            let moments = vae_moments(&self.vae, &self.shape.vae, &x)?;
            let lat = self.shape.vae.latent;
            let mean = moments.narrow(1, 0, lat)?;
            let logvar = moments.narrow(1, lat, lat)?.clamp(-30.0, 20.0)?;
            // The posterior mean is decoded (what the UNet phase trains on and what img2img
            // encodes): sampling with the untrained log-variance's unit noise drowned the
            // means in a short run and the decoder learned only blurred averages. The KL term
            // keeps SD's VAE weight (1e-6), enough to keep the latents bounded.
            let recon = vae_decode(&self.vae, &self.shape.vae, &mean)?;
            let mse = (recon - &x)?.sqr()?.mean_all()?;
            let kl = ((mean.sqr()? + logvar.exp()?)? - 1.0)?
                .sub(&logvar)?
                .mean_all()?;
            let loss = (&mse + (kl * 1e-6)?)?;
            self.adam_vae.backward_step(&loss)?;
            self.vae_done += 1;
            // The encoder changed: the latents are measured again when they are needed.
            self.scaling_factor = None;
            self.latents = None;
            return Ok(SdStep {
                phase: "vae",
                step: self.vae_done,
                loss: mse.to_scalar::<f32>()?,
            });
        }
        let latents = self.latents(images)?;
        if self.decoder_done < o.decoder_steps {
            let scale = self.scaling_factor.unwrap_or(1.0);
            let z = (latents.index_select(&index_dev, 0)? / scale)?;
            let x = images.index_select(&index, 0)?.to_device(&dev)?;
            let recon = vae_decode(&self.vae, &self.shape.vae, &z)?;
            let loss = (recon - &x)?.abs()?.mean_all()?;
            self.adam_decoder.backward_step(&loss)?;
            self.decoder_done += 1;
            return Ok(SdStep {
                phase: "decoder",
                step: self.decoder_done,
                loss: loss.to_scalar::<f32>()?,
            });
        }
        let x0 = latents.index_select(&index_dev, 0)?;
        let schedule = alphas_cumprod();
        let timesteps: Vec<usize> = (0..o.batch)
            .map(|_| rand::Rng::random_range(&mut rng, 0..1000))
            .collect();
        let sqrt_a: Vec<f32> = timesteps
            .iter()
            .map(|&t| schedule[t].sqrt() as f32)
            .collect();
        let sqrt_1a: Vec<f32> = timesteps
            .iter()
            .map(|&t| (1.0 - schedule[t]).sqrt() as f32)
            .collect();
        let per_row = |v: Vec<f32>| Tensor::from_vec(v, (o.batch, 1, 1, 1), &dev);
        let noise = training_noise(&mut rng, x0.dims4()?, o.offset_noise)?.to_device(&dev)?;
        let xt =
            (x0.broadcast_mul(&per_row(sqrt_a)?)? + noise.broadcast_mul(&per_row(sqrt_1a)?)?)?;
        let ids: Vec<u32> = rows
            .iter()
            .flat_map(|&r| {
                if rand::Rng::random_bool(&mut rng, o.caption_dropout.clamp(0.0, 1.0)) {
                    self.empty.clone()
                } else {
                    self.ids[r as usize].clone()
                }
            })
            .collect();
        let ids = Tensor::from_vec(ids, (o.batch, self.empty.len()), &dev)?;
        let context = encode_text(&self.clip, &self.shape.clip, &ids)?;
        let t: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        let pred = unet_forward(&self.unet, &self.shape.unet, &xt, &t, &context)?;
        let per_image = (pred - noise)?.sqr()?.flatten_from(1)?.mean(1)?;
        let loss = per_image.mean_all()?;
        let objective = match o.min_snr_gamma {
            Some(gamma) => {
                let w = min_snr_weights(&schedule, &timesteps, gamma);
                let w = Tensor::from_vec(w, o.batch, &dev)?;
                (per_image * w)?.mean_all()?
            }
            None => loss.clone(),
        };
        self.adam_unet.set_learning_rate(o.unet_lr(self.unet_done));
        self.adam_unet.backward_step(&objective)?;
        self.unet_done += 1;
        Ok(SdStep {
            phase: "unet",
            step: self.unet_done,
            loss: loss.to_scalar::<f32>()?,
        })
    }

    /// The scaled latents of every image (the VAE's posterior means times the scaling factor,
    /// which makes them unit variance), computed once.
    fn latents(&mut self, images: &Tensor) -> Result<Tensor> {
        if let Some(l) = &self.latents {
            return Ok(l.clone());
        }
        let lat = self.shape.vae.latent;
        let mut means = Vec::new();
        let n = images.dim(0)?;
        for start in (0..n).step_by(64) {
            let x = images
                .narrow(0, start, 64.min(n - start))?
                .to_device(&self.device)?;
            means.push(
                vae_moments(&self.vae, &self.shape.vae, &x)?
                    .narrow(1, 0, lat)?
                    .detach(),
            );
        }
        let means = Tensor::cat(&means, 0)?;
        let scale = if let Some(s) = self.scaling_factor {
            s
        } else {
            let var = means.sqr()?.mean_all()?.to_scalar::<f32>()?
                - means.mean_all()?.to_scalar::<f32>()?.powi(2);
            let s = 1.0 / f64::from(var.max(1e-8)).sqrt();
            self.scaling_factor = Some(s);
            s
        };
        let scaled = (means * scale)?;
        self.latents = Some(scaled.clone());
        Ok(scaled)
    }

    /// Writes the checkpoint into `dir` atomically (tensors, then the steps).
    pub fn save_checkpoint(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut all = std::collections::HashMap::new();
        for (prefix, vars) in [("C.", &self.clip), ("V.", &self.vae), ("U.", &self.unet)] {
            for (k, v) in vars {
                all.insert(format!("{prefix}{k}"), v.as_tensor().clone());
            }
        }
        save_tensors_atomic(&all, &dir.join("nets.safetensors"))?;
        let state = serde_json::to_vec(&SdState {
            vae_steps: self.vae_done,
            decoder_steps: self.decoder_done,
            unet_steps: self.unet_done,
            scaling_factor: self.scaling_factor,
            shape: self.shape.clone(),
        })
        .map_err(|e| Error::InvalidParameter(e.to_string()))?;
        let file = dir.join("state.json");
        crate::sys::write_atomic(&file, &state, false).map_err(|e| Error::io(&file, e))
    }

    /// Writes the diffusers folder into `out` (the tokenizer is already in `out/tokenizer`):
    /// `model_index.json`, `scheduler/`, `text_encoder/`, `unet/`, `vae/`.
    pub fn save_model(&self, out: &std::path::Path) -> Result<()> {
        let write = |path: std::path::PathBuf, value: &serde_json::Value| -> Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let text = serde_json::to_vec_pretty(value)
                .map_err(|e| Error::InvalidParameter(e.to_string()))?;
            crate::sys::write_atomic(&path, &text, false).map_err(|e| Error::io(&path, e))
        };
        let tensors = |vars: &BTreeMap<String, Var>| -> std::collections::HashMap<String, Tensor> {
            vars.iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect()
        };
        let (bos, eos) = (0, 1);
        write(
            out.join("text_encoder/config.json"),
            &self.shape.clip.config(bos, eos),
        )?;
        save_tensors_atomic(
            &tensors(&self.clip),
            &out.join("text_encoder/model.safetensors"),
        )?;
        write(
            out.join("vae/config.json"),
            &self.shape.vae.config(self.scaling_factor.unwrap_or(1.0)),
        )?;
        save_tensors_atomic(
            &tensors(&self.vae),
            &out.join("vae/diffusion_pytorch_model.safetensors"),
        )?;
        write(out.join("unet/config.json"), &self.shape.unet.config())?;
        save_tensors_atomic(
            &tensors(&self.unet),
            &out.join("unet/diffusion_pytorch_model.safetensors"),
        )?;
        write(
            out.join("scheduler/scheduler_config.json"),
            &serde_json::json!({
                "_class_name": "EulerDiscreteScheduler",
                "num_train_timesteps": 1000,
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "prediction_type": "epsilon",
                "timestep_spacing": "leading",
                "steps_offset": 1,
            }),
        )?;
        write(
            out.join("model_index.json"),
            &serde_json::json!({
                "_class_name": "StableDiffusionPipeline",
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [null, null],
                "feature_extractor": [null, null],
                "requires_safety_checker": false,
            }),
        )
    }
}

/// Sets each of `vars` to the tensor `prefix` + its name in `saved` (read from `file`), which
/// must be there with the variable's shape.
fn set_from(
    vars: &BTreeMap<String, Var>,
    saved: &std::collections::HashMap<String, Tensor>,
    prefix: &str,
    file: &std::path::Path,
) -> Result<()> {
    for (k, v) in vars {
        let name = format!("{prefix}{k}");
        let t = saved.get(&name).ok_or_else(|| Error::BadConfig {
            path: file.to_owned(),
            message: format!("no {name}: it is not of this run's shape"),
        })?;
        v.set(&crate::weights::expect_shape(
            t.clone(),
            v.shape().clone(),
            &name,
        )?)?;
    }
    Ok(())
}

/// Whether the VAE parameter `name` belongs to the decoder (what the decoder phase trains).
fn is_decoder(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// Writes safetensors to a temporary beside `path`, then renames it over `path`.
fn save_tensors_atomic(
    tensors: &std::collections::HashMap<String, Tensor>,
    path: &std::path::Path,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Trains (or resumes) into `out`: the tokenizer for `data`'s captions (or `init`'s), then
/// each phase with a checkpoint every `checkpoint_every` steps, then the diffusers folder. A
/// run that has no checkpoint yet starts from `init`'s weights when given (see
/// [`SdTrainer::start_from`]). The networks train on `device` (a GPU when there is one).
/// `report` is called after each step.
pub fn train_sd(
    data: &Captioned,
    shape: SdShape,
    opts: SdTrainOptions,
    out: &std::path::Path,
    init: Option<&std::path::Path>,
    device: &candle_core::Device,
    report: &mut dyn FnMut(SdStep),
) -> Result<SdTrainer> {
    let tokenizer = out.join("tokenizer");
    let checkpoint = out.join("checkpoint");
    let vocab_file = tokenizer.join("vocab.json");
    if let Some(init) = init
        && !vocab_file.is_file()
    {
        // The weights embed the folder's tokenizer's ids.
        std::fs::create_dir_all(&tokenizer).map_err(|e| Error::io(&tokenizer, e))?;
        for name in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            let from = init.join("tokenizer").join(name);
            std::fs::copy(&from, tokenizer.join(name)).map_err(|e| Error::io(&from, e))?;
        }
    }
    let vocab = if vocab_file.is_file() {
        let text = std::fs::read_to_string(&vocab_file).map_err(|e| Error::io(&vocab_file, e))?;
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
            .map_err(|e| Error::BadConfig {
                path: vocab_file.clone(),
                message: e.to_string(),
            })?
            .len()
    } else {
        write_tokenizer(&tokenizer, data.captions.iter().map(String::as_str))?
    };
    // The text encoder embeds exactly the tokenizer's vocabulary.
    let mut shape = shape;
    shape.clip.vocab = vocab;
    let mut trainer = SdTrainer::new(shape, opts, &checkpoint, &tokenizer, &data.captions, device)?;
    if let Some(init) = init
        && trainer.is_fresh()
    {
        trainer.start_from(init)?;
    }
    while !trainer.finished() {
        let r = trainer.train_step(&data.pixels)?;
        if !r.loss.is_finite() {
            return Err(Error::InvalidParameter(format!(
                "the {} loss became {} at step {}: lower the learning rate",
                r.phase, r.loss, r.step
            )));
        }
        report(r);
        let phase_end = match r.phase {
            "vae" => r.step == opts.vae_steps,
            "decoder" => r.step == opts.decoder_steps,
            _ => r.step == opts.unet_steps,
        };
        if r.step % opts.checkpoint_every.max(1) == 0 || phase_end {
            trainer.save_checkpoint(&checkpoint)?;
            // The UNet phase's checkpoints also refresh the diffusers folder, so the model
            // so far can be loaded (in the Canvas, or by `sd-eval`) while training goes on.
            if r.phase == "unet" {
                trainer.save_model(out)?;
            }
        }
    }
    trainer.save_model(out)?;
    Ok(trainer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::clip::{ClipConfig, ClipTextModel};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar")
    }

    /// Saves `vars` and opens them as Studio's loaders do.
    fn saved(
        vars: &BTreeMap<String, Var>,
        dir: &std::path::Path,
    ) -> candle_nn::VarBuilder<'static> {
        let file = dir.join("model.safetensors");
        let tensors: std::collections::HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, &file).expect("save");
        // SAFETY: the file was just written by this test and is not changed while mapped.
        #[allow(unsafe_code)]
        unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[&file],
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
        }
        .expect("vb")
    }

    /// Every parameter of `vars` gets a gradient from `out`.
    fn all_get_gradients(vars: &BTreeMap<String, Var>, out: &Tensor) {
        let grads = out
            .sqr()
            .expect("sqr")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("backward");
        for (name, v) in vars {
            assert!(
                grads.get(v.as_tensor()).is_some(),
                "{name} gets no gradient"
            );
        }
    }

    #[test]
    fn the_cool_down_ramps_the_unets_rate_to_zero_over_its_last_steps() {
        let opts = SdTrainOptions {
            vae_steps: 0,
            vae_crop: None,
            decoder_steps: 0,
            unet_steps: 1000,
            batch: 1,
            lr: 1e-3,
            caption_dropout: 0.0,
            seed: 0,
            checkpoint_every: 1,
            min_snr_gamma: None,
            offset_noise: 0.0,
            unet_cooldown: 200,
        };
        let rates: Vec<f64> = [0, 799, 800, 900, 999].map(|d| opts.unet_lr(d)).to_vec();
        assert_eq!(rates[..3], [1e-3, 1e-3, 1e-3]);
        assert!((rates[3] - 5e-4).abs() < 1e-12, "{rates:?}");
        assert!((rates[4] - 5e-6).abs() < 1e-12, "{rates:?}");
        // Raising --unet-steps on resume moves the cool-down to the new end.
        let longer = SdTrainOptions {
            unet_steps: 2000,
            ..opts
        };
        assert!((longer.unet_lr(999) - 1e-3).abs() < 1e-15);
        let constant = SdTrainOptions {
            unet_cooldown: 0,
            ..opts
        };
        assert!((constant.unet_lr(999) - 1e-3).abs() < 1e-15);
    }

    #[test]
    fn offset_noise_moves_each_channels_mean_by_its_own_constant() {
        let means = |offset: f64| -> Vec<f32> {
            let mut rng = StdRng::seed_from_u64(4);
            training_noise(&mut rng, (64, 4, 16, 16), offset)
                .expect("noise")
                .mean_keepdim(3)
                .and_then(|t| t.mean_keepdim(2))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("means")
        };
        let spread = |m: &[f32]| (m.iter().map(|v| v * v).sum::<f32>() / m.len() as f32).sqrt();
        // 256 values per channel: their mean's spread is 1/16 without an offset, about
        // √(1/256 + 0.3²) ≈ 0.31 with one of 0.3.
        let plain = spread(&means(0.0));
        let offset = spread(&means(0.3));
        assert!((0.045..0.08).contains(&plain), "{plain}");
        assert!((0.25..0.37).contains(&offset), "{offset}");
    }

    #[test]
    fn min_snr_weights_cap_the_clear_timesteps_and_keep_the_noisy_ones() {
        let schedule = alphas_cumprod();
        let w = min_snr_weights(&schedule, &[0, 100, 200, 400, 999], 5.0);
        // SNR at t = 0 is ᾱ / (1 − ᾱ) ≈ 1175: weight γ / SNR.
        let snr0 = schedule[0] / (1.0 - schedule[0]);
        assert!((f64::from(w[0]) - 5.0 / snr0).abs() < 1e-6, "{w:?}");
        assert!(w.windows(2).all(|p| p[0] <= p[1]), "{w:?}");
        // Where SNR is under γ the error keeps its full weight.
        let noisy = (0..1000).find(|&t| schedule[t] / (1.0 - schedule[t]) < 5.0);
        let noisy = noisy.expect("SD's schedule reaches SNR 5");
        assert!(noisy > 100 && noisy < 400, "{noisy}");
        assert_eq!(min_snr_weights(&schedule, &[noisy, 999], 5.0), [1.0, 1.0]);
        assert!(w[1] < 1.0 && (w[4] - 1.0).abs() < f32::EPSILON, "{w:?}");
    }

    #[test]
    fn studios_vae_encodes_and_decodes_as_the_trainer_does() {
        let shape = VaeShape {
            channels: vec![4, 8, 8, 8],
            layers_per_block: 1,
            latent: 4,
            groups: 2,
        };
        let vars = init(&shape.parameters(), 6, 0.3).expect("init");
        let tmp = tempfile::tempdir().expect("tmp");
        let vb = saved(&vars, tmp.path());
        let config: crate::diffusion::vae::VaeConfig =
            serde_json::from_value(shape.config(0.5)).expect("Studio reads the config");
        let theirs = crate::diffusion::vae::Vae::new(&vb, config).expect("load");
        let mut rng = StdRng::seed_from_u64(8);
        let image = normal(&mut rng, &[2, 3, 32, 32], 0.5).expect("image");
        let moments = vae_moments(&vars, &shape, &image).expect("moments");
        let mean = (moments.narrow(1, 0, 4).expect("mean") * 0.5).expect("scaled");
        let expected = theirs.encode(&image).expect("encode");
        assert_eq!(expected.dims(), &[2, 4, 4, 4]);
        let d = max_diff(&expected, &mean);
        assert!(d < 1e-4, "encode: max |Δ| {d}");
        let latents = normal(&mut rng, &[2, 4, 4, 4], 1.0).expect("latents");
        let ours = vae_decode(&vars, &shape, &latents).expect("decode");
        let expected = theirs
            .decode(&(&latents * 0.5).expect("scale"))
            .expect("decode");
        assert_eq!(expected.dims(), &[2, 3, 32, 32]);
        let d = max_diff(&expected, &ours);
        assert!(d < 1e-4, "decode: max |Δ| {d}");
        let both = (ours.sum_all().expect("a") + moments.sum_all().expect("b")).expect("sum");
        all_get_gradients(&vars, &both);
    }

    #[test]
    fn studios_clip_encoder_gives_the_trainers_states() {
        let shape = ClipShape {
            vocab: 40,
            hidden: 16,
            layers: 2,
            heads: 2,
            intermediate: 32,
            positions: 77,
        };
        let vars = init(&shape.parameters(), 4, 0.3).expect("init");
        let tmp = tempfile::tempdir().expect("tmp");
        let vb = saved(&vars, tmp.path());
        let config: ClipConfig =
            serde_json::from_value(shape.config(38, 39)).expect("Studio reads the config");
        let theirs = ClipTextModel::new(&vb, &config, false).expect("load");
        let ids = Tensor::new(
            &[[38u32, 5, 9, 17, 39, 39], [38, 1, 39, 39, 39, 39]],
            &candle_core::Device::Cpu,
        )
        .expect("ids");
        let expected = theirs
            .encode(&ids, 2, true, &[4, 2])
            .expect("encode")
            .hidden;
        let ours = encode_text(&vars, &shape, &ids).expect("ours");
        let diff = max_diff(&expected, &ours);
        assert!(diff < 1e-4, "max |Δ| {diff}");
        // Every parameter gets a gradient: nothing in the pass is a kernel without one.
        all_get_gradients(&vars, &ours);
    }

    #[test]
    fn studios_unet_predicts_what_the_trainer_predicts() {
        let level = |channels, attention| UnetLevel {
            channels,
            attention,
            heads: 2,
        };
        let shape = UnetShape {
            levels: vec![level(8, true), level(16, false), level(16, true)],
            layers_per_block: 1,
            cross_dim: 12,
            groups: 4,
            sample_size: 8,
        };
        let vars = init(&shape.parameters(), 9, 0.2).expect("init");
        let tmp = tempfile::tempdir().expect("tmp");
        let vb = saved(&vars, tmp.path());
        let config = crate::diffusion::unet::UnetConfig::from_json(&shape.config().to_string())
            .expect("Studio reads the config");
        let theirs = crate::diffusion::unet::Unet::new(&vb, config).expect("load");
        let mut rng = StdRng::seed_from_u64(10);
        let x = normal(&mut rng, &[2, 4, 8, 8], 1.0).expect("x");
        let context = normal(&mut rng, &[2, 5, 12], 1.0).expect("context");
        let ours = unet_forward(&vars, &shape, &x, &[321.5, 321.5], &context).expect("ours");
        let expected = theirs.forward(&x, 321.5, &context, None).expect("theirs");
        assert_eq!(expected.dims(), &[2, 4, 8, 8]);
        let d = max_diff(&expected, &ours);
        let scale = ours
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("s");
        assert!(scale > 0.1, "a prediction worth comparing: {scale}");
        assert!(d < 1e-4 * scale.max(1.0), "max |Δ| {d} of {scale}");
        all_get_gradients(&vars, &ours);
    }

    /// Six captioned 64 px scenes in `data_dir`, and two lines naming no readable image.
    fn tiny_data(data_dir: &std::path::Path) -> Captioned {
        use crate::train::shapes::Scene;
        std::fs::create_dir_all(data_dir).expect("dir");
        let mut rng = StdRng::seed_from_u64(2);
        let mut lines = String::new();
        for i in 0..6 {
            let scene = Scene::random(&mut rng);
            let png = crate::diffusion::imaging::encode_png(&scene.render(64), None).expect("png");
            std::fs::write(data_dir.join(format!("{i}.png")), png).expect("write");
            lines.push_str(
                &serde_json::json!({"file": format!("{i}.png"), "caption": scene.caption()})
                    .to_string(),
            );
            lines.push('\n');
        }
        // One line naming a file outside the folder, one naming a missing file.
        lines.push_str("{\"file\": \"../x.png\", \"caption\": \"a red circle\"}\n");
        lines.push_str("{\"file\": \"missing.png\", \"caption\": \"a red circle\"}\n");
        std::fs::write(data_dir.join("captions.jsonl"), lines).expect("write");
        read_captioned(data_dir, 100).expect("read")
    }

    /// A tiny model's shape with `vae_levels` VAE levels, its UNet sized for 64 px images.
    fn tiny_shape(vae_levels: usize) -> SdShape {
        let level = |channels, attention| UnetLevel {
            channels,
            attention,
            heads: 2,
        };
        SdShape {
            clip: ClipShape {
                vocab: 0,
                hidden: 8,
                layers: 1,
                heads: 2,
                intermediate: 16,
                positions: 77,
            },
            vae: VaeShape {
                channels: vec![4; vae_levels],
                layers_per_block: 1,
                latent: 4,
                groups: 2,
            },
            unet: UnetShape {
                levels: vec![level(8, true), level(8, true)],
                layers_per_block: 1,
                cross_dim: 8,
                groups: 4,
                sample_size: 64 >> (vae_levels - 1),
            },
        }
    }

    #[test]
    fn a_factor_4_vae_gives_16_pixel_latents_for_64_pixel_images_in_every_mode() {
        use crate::diffusion::imaging::{Mask, RgbImage};
        use crate::diffusion::model::{ImageModelOptions, load};
        use crate::diffusion::pipeline::{ImageMode, ImageRequest, generate};
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tiny_data(&tmp.path().join("data"));
        // Three levels: the LDM's `kl-f4` autoencoder shape.
        let shape = tiny_shape(3);
        assert_eq!(shape.unet.sample_size, 16);
        let opts = SdTrainOptions {
            vae_steps: 1,
            vae_crop: None,
            decoder_steps: 0,
            unet_steps: 1,
            batch: 2,
            lr: 1e-3,
            caption_dropout: 0.1,
            seed: 1,
            checkpoint_every: 10,
            min_snr_gamma: None,
            offset_noise: 0.0,
            unet_cooldown: 0,
        };
        let out = tmp.path().join("model");
        train_sd(
            &data,
            shape,
            opts,
            &out,
            None,
            &candle_core::Device::Cpu,
            &mut |_| {},
        )
        .expect("train");
        let model = load(
            &out,
            &ImageModelOptions::default(),
            &candle_core::Device::Cpu,
            &mut |_, _| {},
        )
        .expect("load");
        assert_eq!(model.vae.config().factor(), 4);
        // The default size is the UNet's 16 latents times the VAE's factor 4.
        assert_eq!(model.info.default_size, (64, 64));
        let init = RgbImage::new_filled(64, 64, [200, 40, 40]);
        let mut mask = Mask::new_filled(64, 64, 0);
        for y in 16..48 {
            for x in 16..48 {
                mask.values[y * 64 + x] = 255;
            }
        }
        let modes = [
            ImageMode::Txt2Img,
            ImageMode::Img2Img {
                init: init.clone(),
                strength: 0.5,
            },
            ImageMode::Inpaint {
                init,
                mask,
                strength: 1.0,
                mask_blur: 2.0,
            },
        ];
        for mode in modes {
            // Latent previews are at latent size: they show the latents' side.
            let mut preview_sides = Vec::new();
            let req = ImageRequest {
                steps: 2,
                seed: Some(1),
                width: 64,
                height: 64,
                mode,
                ..ImageRequest::new("a small red circle on the left, blue background")
            };
            let result = generate(&model, &req, &mut |u| {
                if let Some(p) = &u.preview {
                    preview_sides.push((p.width, p.height));
                }
                std::ops::ControlFlow::Continue(())
            })
            .expect("generate");
            let image = &result.images[0].image;
            assert_eq!((image.width, image.height), (64, 64));
            assert!(!preview_sides.is_empty());
            assert!(
                preview_sides.iter().all(|&s| s == (16, 16)),
                "{preview_sides:?}"
            );
        }
    }

    #[test]
    fn a_tiny_run_writes_a_diffusers_folder_studio_loads_and_generates_with() {
        use crate::diffusion::model::{ImageModelOptions, load};
        use crate::diffusion::pipeline::{ImageRequest, generate};
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tiny_data(&tmp.path().join("data"));
        assert_eq!((data.captions.len(), data.skipped), (6, 2));
        let shape = tiny_shape(4);
        let opts = SdTrainOptions {
            vae_steps: 2,
            vae_crop: Some(32),
            decoder_steps: 1,
            unet_steps: 2,
            batch: 2,
            lr: 1e-3,
            caption_dropout: 0.1,
            seed: 1,
            checkpoint_every: 1,
            min_snr_gamma: Some(5.0),
            offset_noise: 0.1,
            unet_cooldown: 1,
        };
        let out = tmp.path().join("model");
        let mut phases = Vec::new();
        let unet_file = out.join("unet/diffusion_pytorch_model.safetensors");
        let mut written_mid_run = Vec::new();
        train_sd(
            &data,
            shape.clone(),
            opts,
            &out,
            None,
            &candle_core::Device::Cpu,
            &mut |r| {
                phases.push((r.phase, r.step));
                written_mid_run.push(unet_file.is_file());
            },
        )
        .expect("train");
        // The folder appears at the UNet phase's first checkpoint, before the run ends.
        assert_eq!(written_mid_run, [false, false, false, false, true]);
        assert_eq!(
            phases,
            [
                ("vae", 1),
                ("vae", 2),
                ("decoder", 1),
                ("unet", 1),
                ("unet", 2)
            ]
        );

        // Studio's own loader and pipeline run it.
        let model = load(
            &out,
            &ImageModelOptions::default(),
            &candle_core::Device::Cpu,
            &mut |_, _| {},
        )
        .expect("Studio loads the folder");
        let req = ImageRequest {
            steps: 2,
            seed: Some(3),
            width: 64,
            height: 64,
            ..ImageRequest::new("a small red circle on the left, blue background")
        };
        let result =
            generate(&model, &req, &mut |_| std::ops::ControlFlow::Continue(())).expect("generate");
        assert_eq!(result.images.len(), 1);

        // A resumed run picks up at its checkpoint.
        let more = SdTrainOptions {
            unet_steps: 3,
            ..opts
        };
        let mut resumed = Vec::new();
        train_sd(
            &data,
            shape.clone(),
            more,
            &out,
            None,
            &candle_core::Device::Cpu,
            &mut |r| {
                resumed.push((r.phase, r.step));
            },
        )
        .expect("resume");
        assert_eq!(resumed, [("unet", 3)]);

        // A run started from that folder: only the decoder phase, the rest kept as it was.
        let tuned = tmp.path().join("tuned");
        let decoder_only = SdTrainOptions {
            vae_steps: 0,
            decoder_steps: 2,
            unet_steps: 0,
            ..opts
        };
        let mut steps = Vec::new();
        train_sd(
            &data,
            shape.clone(),
            decoder_only,
            &tuned,
            Some(&out),
            &candle_core::Device::Cpu,
            &mut |r| steps.push((r.phase, r.step)),
        )
        .expect("train from the folder");
        assert_eq!(steps, [("decoder", 1), ("decoder", 2)]);
        let tensors = |dir: &std::path::Path, file: &str| {
            candle_core::safetensors::load(dir.join(file), &candle_core::Device::Cpu).expect("load")
        };
        let vae_file = "vae/diffusion_pytorch_model.safetensors";
        let (before, after) = (tensors(&out, vae_file), tensors(&tuned, vae_file));
        let mut changed = 0;
        for (name, t) in &before {
            let d = max_diff(t, &after[name]);
            if is_decoder(name) {
                changed += usize::from(d > 0.0);
            } else {
                assert!(d == 0.0, "the decoder phase changed {name}");
            }
        }
        assert!(changed > 0, "the decoder phase trained nothing");
        for file in [
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
        ] {
            let (a, b) = (tensors(&out, file), tensors(&tuned, file));
            assert!(a.iter().all(|(k, t)| max_diff(t, &b[k]) == 0.0), "{file}");
        }
        let config = |dir: &std::path::Path| {
            std::fs::read_to_string(dir.join("vae/config.json")).expect("config")
        };
        assert_eq!(config(&out), config(&tuned), "the scaling factor is kept");
        let vocab = |dir: &std::path::Path| {
            std::fs::read_to_string(dir.join("tokenizer/vocab.json")).expect("vocab")
        };
        assert_eq!(vocab(&out), vocab(&tuned));

        // A folder of another shape is refused, naming the tensor.
        let mut wider = shape;
        wider.unet.levels[0].channels = 16;
        let err = train_sd(
            &data,
            wider,
            decoder_only,
            &tmp.path().join("other"),
            Some(&out),
            &candle_core::Device::Cpu,
            &mut |_| {},
        )
        .err()
        .expect("another shape is refused")
        .to_string();
        assert!(
            err.contains("down_blocks") || err.contains("conv_in"),
            "{err}"
        );
    }
}
