//! Training the demo language model: a tiny Llama (the Hugging Face layout and tensor names,
//! so the result loads through Studio's own loader like any Llama) on the text
//! [`super::corpus`] makes, with candle's autograd and AdamW on the CPU.
//!
//! The training forward pass is written here with differentiable ops only (candle's fused
//! RMSNorm, softmax and RoPE kernels have no backward pass), following transformers'
//! `LlamaForCausalLM`: RMSNorm, RoPE with the rotate-half convention, causal attention,
//! SwiGLU MLP, an untied `lm_head`. A run writes a model folder (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` with a ChatML template), a
//! checkpoint every so many steps (`checkpoint/`: the weights and the step, written
//! atomically, so an interrupted run resumes from the last one; AdamW's moments start afresh)
//! and `loss.jsonl`. Each step's batch comes from a generator seeded with the run's seed and
//! the step, so a resumed run sees the batches an uninterrupted one would.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The demo model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LmShape {
    /// Tokens in the vocabulary (the tokenizer's).
    pub vocab: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads (as many key/value heads).
    pub heads: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// Longest sequence (RoPE table).
    pub max_positions: usize,
}

/// How a run trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Optimizer steps in all (a resumed run continues to this).
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// AdamW's learning rate (cosine-decayed to a tenth after a short warm-up).
    pub lr: f64,
    /// The run's seed: the initial weights and every batch.
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
}

const ROPE_THETA: f64 = 10_000.0;
const RMS_EPS: f64 = 1e-5;

/// The model, over the variables of a [`VarMap`] (named as transformers names them).
pub struct TinyLlama {
    shape: LmShape,
    vb: VarBuilder<'static>,
}

impl TinyLlama {
    /// The model over `varmap`. Variables `varmap` lacks are created: normal(0, 0.02) from a
    /// generator seeded with `seed` (candle's CPU generator cannot be seeded), the norms' at 1.
    pub fn new(shape: LmShape, varmap: &VarMap, device: &Device, seed: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        {
            let mut vars = varmap
                .data()
                .lock()
                .map_err(|_| Error::InvalidParameter("the variable map is poisoned".into()))?;
            for (name, dims) in parameters(&shape) {
                if vars.contains_key(&name) {
                    continue;
                }
                let n: usize = dims.iter().product();
                let values: Vec<f32> = if name.ends_with("norm.weight") {
                    vec![1.0; n]
                } else {
                    (0..n).map(|_| 0.02 * normal(&mut rng)).collect()
                };
                let t = Tensor::from_vec(values, dims.as_slice(), device)?;
                vars.insert(name, Var::from_tensor(&t)?);
            }
        }
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
        Ok(Self { shape, vb })
    }

    fn weight(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        Ok(self.vb.get(dims, name)?)
    }

    fn rms_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.weight(name, &[self.shape.hidden])?;
        let mean = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = x.broadcast_div(&(mean + RMS_EPS)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&w)?)
    }

    fn linear(&self, x: &Tensor, name: &str, out: usize, inp: usize) -> Result<Tensor> {
        let w = self.weight(name, &[out, inp])?;
        Ok(x.broadcast_matmul(&w.t()?)?)
    }

    /// Logits `(batch, time, vocab)` for token ids `(batch, time)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let s = self.shape;
        let (b, t) = ids.dims2()?;
        let device = ids.device();
        let head = s.hidden / s.heads;
        let embed = self.weight("model.embed_tokens.weight", &[s.vocab, s.hidden])?;
        let mut x = embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, s.hidden))?;
        // RoPE tables, transformers' convention: the frequencies twice over the head.
        let inv: Vec<f32> = (0..head / 2)
            .map(|i| (1.0 / ROPE_THETA.powf(2.0 * i as f64 / head as f64)) as f32)
            .collect();
        let angles: Vec<f32> = (0..t)
            .flat_map(|p| {
                let row: Vec<f32> = inv.iter().map(|f| p as f32 * f).collect();
                [row.clone(), row].concat()
            })
            .collect();
        let angles = Tensor::from_vec(angles, (t, head), device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let rope = |q: &Tensor| -> Result<Tensor> {
            let half = head / 2;
            let x1 = q.narrow(3, 0, half)?;
            let x2 = q.narrow(3, half, half)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
            Ok((q.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
        };
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { -1e9 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), device)?;
        for l in 0..s.layers {
            let p = format!("model.layers.{l}");
            let h = self.rms_norm(&x, &format!("{p}.input_layernorm.weight"))?;
            let split = |name: &str| -> Result<Tensor> {
                Ok(self
                    .linear(
                        &h,
                        &format!("{p}.self_attn.{name}.weight"),
                        s.hidden,
                        s.hidden,
                    )?
                    .reshape((b, t, s.heads, head))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (q, k, v) = (
                rope(&split("q_proj")?)?,
                rope(&split("k_proj")?)?,
                split("v_proj")?,
            );
            let scores = (q.matmul(&k.t()?)? / (head as f64).sqrt())?.broadcast_add(&mask)?;
            let max = scores.max_keepdim(3)?;
            let e = scores.broadcast_sub(&max.detach())?.exp()?;
            let probs = e.broadcast_div(&e.sum_keepdim(3)?)?;
            let attn = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, s.hidden))?;
            x = (x + self.linear(
                &attn,
                &format!("{p}.self_attn.o_proj.weight"),
                s.hidden,
                s.hidden,
            )?)?;
            let h = self.rms_norm(&x, &format!("{p}.post_attention_layernorm.weight"))?;
            let gate = self.linear(
                &h,
                &format!("{p}.mlp.gate_proj.weight"),
                s.intermediate,
                s.hidden,
            )?;
            let up = self.linear(
                &h,
                &format!("{p}.mlp.up_proj.weight"),
                s.intermediate,
                s.hidden,
            )?;
            let down = self.linear(
                &(gate.silu()? * up)?,
                &format!("{p}.mlp.down_proj.weight"),
                s.hidden,
                s.intermediate,
            )?;
            x = (x + down)?;
        }
        let x = self.rms_norm(&x, "model.norm.weight")?;
        self.linear(&x, "lm_head.weight", s.vocab, s.hidden)
    }
}

/// The training text of an `lm-data` folder, tokenized.
#[derive(Debug)]
pub struct TrainingData {
    /// Every training example's tokens, one after another.
    pub tokens: Vec<u32>,
    /// Where each example starts in `tokens`.
    pub starts: Vec<usize>,
    /// The tokenizer's vocabulary size (special tokens included).
    pub vocab: usize,
    /// The ids of `<|endoftext|>` and `<|im_end|>`, the tokens that end a reply.
    pub eos: Vec<u32>,
}

/// Reads `train.jsonl` (`{"text": …}` per line) with `tokenizer.json` from `dir`.
pub fn read_training_data(dir: &Path) -> Result<TrainingData> {
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
    let train_path = dir.join("train.jsonl");
    let text = std::fs::read_to_string(&train_path).map_err(|e| Error::io(&train_path, e))?;
    let bad = |n: usize, why: &str| Error::BadConfig {
        path: train_path.clone(),
        message: format!("line {}: {why}", n + 1),
    };
    let mut tokens = Vec::new();
    let mut starts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let entry: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(n, &format!("not JSON: {e}")))?;
        let t = entry["text"]
            .as_str()
            .ok_or_else(|| bad(n, "no \"text\""))?;
        let encoding = tokenizer
            .encode(t, false)
            .map_err(|e| bad(n, &format!("does not tokenize: {e}")))?;
        starts.push(tokens.len());
        tokens.extend_from_slice(encoding.get_ids());
    }
    let eos = [super::corpus::EOS, "<|im_end|>"]
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect();
    Ok(TrainingData {
        tokens,
        starts,
        vocab: tokenizer.get_vocab_size(true),
        eos,
    })
}

/// The demo model's quality, as `studio train lm-eval` reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// Mean cross-entropy per token on the held-out examples (nats).
    pub held_out_loss: f64,
    /// Tokens it was measured on.
    pub held_out_tokens: usize,
    /// Held-out lines asked for.
    pub fim_cases: usize,
    /// Lines the model wrote exactly (greedy, up to the end of the line; spaces around it
    /// ignored).
    pub fim_exact: usize,
}

/// A trained model folder's shape, from its `config.json`.
fn shape_of(model_dir: &Path) -> Result<LmShape> {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let get = |k: &str| {
        v[k].as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| Error::BadConfig {
                path: path.clone(),
                message: format!("no `{k}`"),
            })
    };
    Ok(LmShape {
        vocab: get("vocab_size")?,
        hidden: get("hidden_size")?,
        layers: get("num_hidden_layers")?,
        heads: get("num_attention_heads")?,
        intermediate: get("intermediate_size")?,
        max_positions: get("max_position_embeddings")?,
    })
}

/// Measures a model `studio train lm` wrote on `lm-data`'s held-out set in `data_dir`: the
/// mean loss over at most `max_windows` windows of held-out text, and greedy
/// fill-in-the-middle on at most `max_fim` held-out lines, shown the context a training case
/// shows ([`super::corpus::FimCase::prompt`]).
pub fn evaluate(
    model_dir: &Path,
    data_dir: &Path,
    max_windows: usize,
    max_fim: usize,
) -> Result<Quality> {
    let device = Device::Cpu;
    let shape = shape_of(model_dir)?;
    let tokenizer_path = model_dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
    let mut varmap = VarMap::new();
    let model = TinyLlama::new(shape, &varmap, &device, 0)?;
    varmap.load(model_dir.join("model.safetensors"))?;
    let encode = |t: &str| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(t, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    };
    let lines = |name: &str| -> Result<Vec<serde_json::Value>> {
        let path = data_dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        text.lines()
            .map(|l| {
                serde_json::from_str(l).map_err(|e| Error::BadConfig {
                    path: path.clone(),
                    message: e.to_string(),
                })
            })
            .collect()
    };
    // Held-out loss over non-overlapping windows.
    let mut tokens = Vec::new();
    for entry in lines("held_out.jsonl")? {
        if let Some(t) = entry["text"].as_str() {
            tokens.extend(encode(t)?);
        }
    }
    let window = shape.max_positions.min(129);
    let (mut total, mut counted) = (0.0f64, 0usize);
    for chunk in tokens
        .chunks(window)
        .filter(|c| c.len() > 1)
        .take(max_windows)
    {
        let ids = Tensor::from_vec(chunk.to_vec(), (1, chunk.len()), &device)?;
        let l = f64::from(loss(&model, &ids)?.to_scalar::<f32>()?);
        total += l * (chunk.len() - 1) as f64;
        counted += chunk.len() - 1;
    }
    if counted == 0 {
        return Err(Error::InvalidParameter(format!(
            "{} has no held-out text to measure the loss on",
            data_dir.display()
        )));
    }
    // Greedy fill-in-the-middle of held-out lines.
    let special = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| Error::Tokenizer(format!("the tokenizer has no {t}")))
    };
    for marker in ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"] {
        special(marker)?;
    }
    let stops: Vec<u32> = [super::corpus::EOS, "<|im_end|>"]
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect();
    let max_new = 40;
    let room = shape.max_positions.saturating_sub(max_new);
    if room < 16 {
        return Err(Error::InvalidParameter(format!(
            "the model's {} positions leave no room for a fill-in-the-middle prompt",
            shape.max_positions
        )));
    }
    let (mut cases, mut exact) = (0, 0);
    for entry in lines("fim.jsonl")?.into_iter().take(max_fim) {
        let (Some(prefix), Some(middle), Some(suffix)) = (
            entry["prefix"].as_str(),
            entry["middle"].as_str(),
            entry["suffix"].as_str(),
        ) else {
            continue;
        };
        // The context a training case shows: the same characters around the line.
        let case = super::corpus::FimCase {
            prefix: prefix.to_owned(),
            middle: middle.to_owned(),
            suffix: suffix.to_owned(),
        };
        let mut ids = encode(&case.prompt())?;
        if ids.len() > room {
            // Longer than the model's positions allow: the prefix's start goes (after the
            // `<|fim_prefix|>` marker).
            ids.drain(1..=ids.len() - room);
        }
        let start = ids.len();
        for _ in 0..max_new {
            let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &device)?;
            let logits = model.forward(&input)?.get(0)?.get(ids.len() - 1)?;
            let next = logits.argmax(0)?.to_scalar::<u32>()?;
            if stops.contains(&next) {
                break;
            }
            ids.push(next);
            let text = tokenizer
                .decode(&ids[start..], false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            if text.contains('\n') {
                break;
            }
        }
        let written = tokenizer
            .decode(&ids[start..], false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let line = written.split('\n').next().unwrap_or("");
        cases += 1;
        if line.trim() == middle.trim() {
            exact += 1;
        }
    }
    Ok(Quality {
        held_out_loss: total / counted as f64,
        held_out_tokens: counted,
        fim_cases: cases,
        fim_exact: exact,
    })
}

/// Every parameter's name (as transformers names it) and shape.
pub fn parameters(s: &LmShape) -> Vec<(String, Vec<usize>)> {
    let mut out = vec![(
        "model.embed_tokens.weight".to_owned(),
        vec![s.vocab, s.hidden],
    )];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![s.hidden]));
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            out.push((
                format!("{p}.self_attn.{proj}.weight"),
                vec![s.hidden, s.hidden],
            ));
        }
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![s.hidden],
        ));
        out.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![s.intermediate, s.hidden],
        ));
        out.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![s.intermediate, s.hidden],
        ));
        out.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![s.hidden, s.intermediate],
        ));
    }
    out.push(("model.norm.weight".to_owned(), vec![s.hidden]));
    out.push(("lm_head.weight".to_owned(), vec![s.vocab, s.hidden]));
    out
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// transformers' `config.json` for the trained model.
pub fn hf_config(shape: &LmShape, eos: u32) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": false,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    })
}

/// The ChatML template the demo model was trained with.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// What a training run reports after each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The step just done (from 1).
    pub step: usize,
    /// Its training loss (cross-entropy, nats per token).
    pub loss: f32,
}

/// The checkpoint's record of where a run stopped.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    shape: LmShape,
}

/// Cross-entropy of the model's next-token predictions over `ids` `(batch, seq + 1)`.
pub fn loss(model: &TinyLlama, ids: &Tensor) -> Result<Tensor> {
    let (b, t1) = ids.dims2()?;
    let inputs = ids.narrow(1, 0, t1 - 1)?;
    let targets = ids.narrow(1, 1, t1 - 1)?;
    let logits = model.forward(&inputs)?;
    let v = logits.dim(2)?;
    Ok(candle_nn::loss::cross_entropy(
        &logits.reshape((b * (t1 - 1), v))?,
        &targets.flatten_all()?,
    )?)
}

/// One step's batch: `batch` windows of `seq + 1` tokens from `tokens`, drawn by a generator
/// seeded with the run's seed and the step. Half of them, on average, begin where an example
/// begins (one of `starts`), so short examples (a line to fill in, a chat turn) are seen
/// whole, from their first token, and not only cut anywhere; the rest begin anywhere.
pub fn batch_at(
    tokens: &[u32],
    starts: &[usize],
    opts: &TrainOptions,
    step: usize,
    device: &Device,
) -> Result<Tensor> {
    let window = opts.seq + 1;
    if tokens.len() <= window {
        return Err(Error::InvalidParameter(format!(
            "the training text is {} tokens, shorter than one window of {window}",
            tokens.len()
        )));
    }
    let mut rng =
        StdRng::seed_from_u64(opts.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut data = Vec::with_capacity(opts.batch * window);
    let last = tokens.len() - window;
    for _ in 0..opts.batch {
        let start = if !starts.is_empty() && rng.random_bool(0.5) {
            starts[rng.random_range(0..starts.len())].min(last)
        } else {
            rng.random_range(0..last)
        };
        data.extend_from_slice(&tokens[start..start + window]);
    }
    Ok(Tensor::from_vec(data, (opts.batch, window), device)?)
}

/// Trains (or resumes) a model on `tokens` into `out`: see the module docs. `report` is
/// called after each step. Returns the last step's loss.
pub fn train(
    tokens: &[u32],
    starts: &[usize],
    shape: LmShape,
    opts: &TrainOptions,
    out: &Path,
    report: &mut dyn FnMut(StepReport),
) -> Result<f32> {
    let device = Device::Cpu;
    let checkpoint = out.join("checkpoint");
    let mut varmap = VarMap::new();
    let mut start = 0;
    let state_file = checkpoint.join("state.json");
    if state_file.is_file() {
        let text = std::fs::read_to_string(&state_file).map_err(|e| Error::io(&state_file, e))?;
        let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
            path: state_file.clone(),
            message: e.to_string(),
        })?;
        if state.shape != shape {
            return Err(Error::InvalidParameter(format!(
                "{} holds a model of another shape: remove it or train with its shape",
                checkpoint.display()
            )));
        }
        start = state.step;
    }
    // The initial weights come from the run's seed; a resumed run's from the checkpoint.
    let model = TinyLlama::new(shape, &varmap, &device, opts.seed)?;
    if start > 0 {
        varmap.load(checkpoint.join("model.safetensors"))?;
    }
    let vars: Vec<Var> = varmap.all_vars();
    let mut adam = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: opts.lr,
            weight_decay: 0.01,
            ..candle_nn::ParamsAdamW::default()
        },
    )?;
    std::fs::create_dir_all(&checkpoint).map_err(|e| Error::io(&checkpoint, e))?;
    let mut last = f32::NAN;
    for step in start..opts.steps {
        let warmup = (opts.steps / 20).max(1);
        let lr = if step < warmup {
            opts.lr * (step + 1) as f64 / warmup as f64
        } else {
            let p = (step - warmup) as f64 / (opts.steps - warmup).max(1) as f64;
            opts.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
        };
        adam.set_learning_rate(lr);
        let ids = batch_at(tokens, starts, opts, step, &device)?;
        let l = loss(&model, &ids)?;
        adam.backward_step(&l)?;
        last = l.to_scalar::<f32>()?;
        if !last.is_finite() {
            return Err(Error::InvalidParameter(format!(
                "the loss became {last} at step {}: lower the learning rate",
                step + 1
            )));
        }
        report(StepReport {
            step: step + 1,
            loss: last,
        });
        if (step + 1) % opts.checkpoint_every.max(1) == 0 || step + 1 == opts.steps {
            save_checkpoint(&varmap, &checkpoint, step + 1, shape)?;
        }
    }
    varmap.save(out.join("model.safetensors"))?;
    Ok(last)
}

/// Writes the weights, then the step, each atomically (a crash or a full disk mid-write
/// leaves the previous checkpoint as it was; between the two, a resume repeats a few steps).
fn save_checkpoint(varmap: &VarMap, dir: &Path, step: usize, shape: LmShape) -> Result<()> {
    let weights = dir.join("model.safetensors");
    let tmp = dir.join("model.safetensors.tmp");
    varmap.save(&tmp)?;
    std::fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;
    let state = serde_json::to_vec(&CheckpointState { step, shape })
        .map_err(|e| Error::InvalidParameter(format!("writing the checkpoint state: {e}")))?;
    let file = dir.join("state.json");
    crate::sys::write_atomic(&file, &state, false).map_err(|e| Error::io(&file, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_lowers_the_loss_and_studio_loads_the_model_with_the_same_logits() {
        let tmp = tempfile::tempdir().expect("tmp");
        let text: String = (0..400).fold(String::new(), |mut t, i| {
            use std::fmt::Write as _;
            let _ = write!(t, "def f{}(x):\n    return x + {}\n", i % 7, i % 5);
            t
        });
        let tokenizer = super::super::corpus::train_tokenizer(std::iter::once(text.as_str()), 300)
            .expect("tokenizer");
        let tokens: Vec<u32> = tokenizer
            .encode(text.as_str(), false)
            .expect("encode")
            .get_ids()
            .to_vec();
        let shape = LmShape {
            vocab: tokenizer.get_vocab_size(true),
            hidden: 32,
            layers: 2,
            heads: 4,
            intermediate: 64,
            max_positions: 64,
        };
        let opts = TrainOptions {
            steps: 40,
            batch: 4,
            seq: 32,
            lr: 3e-3,
            seed: 1,
            checkpoint_every: 10,
        };
        let out = tmp.path().join("model");
        let mut losses = Vec::new();
        train(&tokens, &[], shape, &opts, &out, &mut |r| {
            losses.push(r.loss);
        })
        .expect("train");
        assert_eq!(losses.len(), 40);
        assert!(losses[39] < losses[0] * 0.7, "{losses:?}");

        // The folder Studio loads: config, weights, tokenizer.
        let eos = tokenizer
            .token_to_id(super::super::corpus::EOS)
            .expect("eos");
        std::fs::write(out.join("config.json"), hf_config(&shape, eos).to_string())
            .expect("config");
        tokenizer
            .save(out.join("tokenizer.json"), false)
            .expect("tokenizer");
        let mut loaded =
            crate::llm::loader::load(&out, &Device::Cpu, &mut |_, _| {}).expect("load");
        let ids = &tokens[..16];
        let studio = loaded
            .model
            .forward_last(ids, 0)
            .expect("forward")
            .to_vec1::<f32>()
            .expect("vec");
        let varmap = VarMap::new();
        let model = TinyLlama::new(shape, &varmap, &Device::Cpu, 0).expect("model");
        let mut varmap = varmap;
        varmap.load(out.join("model.safetensors")).expect("weights");
        let input = Tensor::from_vec(ids.to_vec(), (1, 16), &Device::Cpu).expect("ids");
        let ours = model
            .forward(&input)
            .expect("forward")
            .get(0)
            .and_then(|r| r.get(15))
            .and_then(|r| r.to_vec1::<f32>())
            .expect("row");
        let diff = ours
            .iter()
            .zip(&studio)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 1e-3,
            "the trainer and Studio's Llama disagree by {diff}"
        );

        // Resuming past the end does nothing; a longer run resumes from the checkpoint.
        let more = TrainOptions { steps: 45, ..opts };
        let mut resumed = Vec::new();
        train(&tokens, &[], shape, &more, &out, &mut |r| {
            resumed.push(r.step);
        })
        .expect("resume");
        assert_eq!(resumed, [41, 42, 43, 44, 45]);
    }

    #[test]
    fn about_half_the_windows_begin_where_an_example_begins() {
        let tokens: Vec<u32> = (0..10_000).collect();
        let starts: Vec<usize> = (0..10_000).step_by(997).collect();
        let opts = TrainOptions {
            steps: 1,
            batch: 64,
            seq: 31,
            lr: 1e-3,
            seed: 5,
            checkpoint_every: 1,
        };
        let batch = batch_at(&tokens, &starts, &opts, 3, &Device::Cpu).expect("batch");
        let rows = batch.to_vec2::<u32>().expect("rows");
        let aligned = rows
            .iter()
            .filter(|r| starts.contains(&(r[0] as usize)))
            .count();
        assert!((16..=48).contains(&aligned), "{aligned} of 64 aligned");
        for r in &rows {
            assert_eq!(r.len(), 32);
            assert!(
                r.windows(2).all(|w| w[1] == w[0] + 1),
                "a window is contiguous"
            );
        }
        // The same step gives the same batch; a start near the end is moved back to fit.
        let again = batch_at(&tokens, &starts, &opts, 3, &Device::Cpu).expect("batch");
        assert_eq!(again.to_vec2::<u32>().expect("rows"), rows);
        let late = batch_at(&tokens, &[9_990], &opts, 0, &Device::Cpu).expect("batch");
        assert!(
            late.to_vec2::<u32>()
                .expect("rows")
                .iter()
                .all(|r| *r.last().expect("last") < 10_000)
        );
    }
}
