//! Training the demo text-to-image model (issue 21, in progress): a tiny network of Stable
//! Diffusion's architecture in the diffusers layout Studio's Canvas loads. This first part is
//! the text encoder: CLIP's text transformer in transformers' tensor names
//! (`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.{i}.…`,
//! `text_model.final_layer_norm.…`), its forward pass written with differentiable ops
//! ([`super::ops`]): pre-LN layers, causal attention with queries scaled by `1/√head`,
//! `quick_gelu` MLPs, the final layer norm (what SD 1.x conditions its UNet on). A test checks
//! Studio's own encoder ([`crate::diffusion::clip::ClipTextModel`]) gives the same states.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::ops::{layer_norm, linear, normal, quick_gelu, softmax_last};
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::clip::{ClipConfig, ClipTextModel};

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
        let file = tmp.path().join("model.safetensors");
        let tensors: std::collections::HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, &file).expect("save");
        let config: ClipConfig =
            serde_json::from_value(shape.config(38, 39)).expect("Studio reads the config");
        // SAFETY: the file was just written by this test and is not changed while mapped.
        #[allow(unsafe_code)]
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(
                &[&file],
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
        }
        .expect("vb");
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
        let diff = (expected - &ours)
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar");
        assert!(diff < 1e-4, "max |Δ| {diff}");
        // Every parameter gets a gradient: nothing in the pass is a kernel without one.
        let grads = ours
            .sqr()
            .expect("sqr")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("backward");
        for (name, v) in &vars {
            assert!(
                grads.get(v.as_tensor()).is_some(),
                "{name} gets no gradient"
            );
        }
    }
}
