//! Training the demo text-to-image model (issue 21, in progress): a tiny network of Stable
//! Diffusion's architecture in the diffusers layout Studio's Canvas loads. Written so far:
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
//! Both forward passes use only differentiable ops ([`super::ops`]); the tests also check that
//! every parameter gets a gradient. Still to write: the UNet, the training loop and the CLI.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::ops::{conv_strided, group_norm, layer_norm, linear, normal, quick_gelu, softmax_last};
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
    /// (four levels: the factor 8 Studio's pipeline works with).
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
    let b = get(vars, &format!("{name}.bias"))?.reshape((1, (), 1, 1))?;
    Ok(conv_strided(x, &w, pad, stride)?.broadcast_add(&b)?)
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
}
