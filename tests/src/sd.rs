//! Tiny random-weight Stable Diffusion models of the real architectures (UNet, VAE, CLIP text
//! encoders with a small BPE tokenizer), written in the diffusers folder layout.
//!
//! Head counts follow what single-file loading infers (64-dim heads, at least one), so the same
//! weights loaded from a diffusers folder and from a single file give the same images.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{Value, json};
use studio_inference::diffusion::clip::{ClipConfig, ClipTextModel};
use studio_inference::diffusion::unet::{Unet, UnetConfig};
use studio_inference::diffusion::vae::{Vae, VaeConfig};

/// Which architecture to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyKind {
    Sd1,
    Sd2,
    Sdxl,
    /// An SDXL refiner: the second text encoder alone, aesthetic-score conditioning.
    SdxlRefiner,
}

/// Options for [`write_tiny_sd`].
#[derive(Debug, Clone, Copy)]
pub struct TinySd {
    pub kind: TinyKind,
    /// A 9-channel inpainting UNet.
    pub inpainting: bool,
    pub v_prediction: bool,
    /// CLIP's real 49408-token vocabulary (the bundled tokenizer) instead of the small test
    /// tokenizer; single-file checkpoints carry no tokenizer, so they need this.
    pub full_vocab: bool,
    pub seed: u64,
}

impl TinySd {
    pub fn new(kind: TinyKind) -> Self {
        Self {
            kind,
            inpainting: false,
            v_prediction: false,
            full_vocab: false,
            seed: 7,
        }
    }
}

/// Merges of the test tokenizer (CLIP's `merges.txt` format; ids follow the byte tokens).
pub const MERGES: &[&str] = &[
    "c a", "ca t</w>", "d o", "do g</w>", "a t</w>", "t h", "th e</w>", "r e", "re d</w>", "s u",
    "su n</w>",
];

/// The tokenizer's vocabulary size: 512 byte tokens, the merges, `<bos>` and `<eos>`.
pub fn vocab_size() -> usize {
    512 + MERGES.len() + 2
}

fn text_config(hidden: usize, act: &str, layers: usize, projection: usize, vocab: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection,
    })
}

/// Released text encoders name their tower `text_model.…` (a fresh `VarMap` makes
/// `ClipTextModel` use the unprefixed names transformers 5 writes).
fn with_text_model_prefix(weights: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    weights
        .into_iter()
        .map(|(n, t)| {
            if n.starts_with("text_projection") || n.starts_with("text_model.") {
                (n, t)
            } else {
                (format!("text_model.{n}"), t)
            }
        })
        .collect()
}

/// A fresh `VarMap` makes candle's VAE attention block use the legacy names; checkpoints saved
/// by today's diffusers use these.
fn with_current_vae_names(weights: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    weights
        .into_iter()
        .map(|(name, t)| {
            let name = name
                .replace(".query.", ".to_q.")
                .replace(".key.", ".to_k.")
                .replace(".value.", ".to_v.")
                .replace(".proj_attn.", ".to_out.0.");
            (name, t)
        })
        .collect()
}

/// The names and shapes a loader asks for, recorded without allocating them (each is handed
/// back as a broadcast zero).
type Recorded = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<usize>)>>>;
struct Recorder(Recorded);

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .expect("recorder lock")
            .push((name.to_owned(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::CannotFindTensor {
            path: name.to_owned(),
        })
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Random f16 tensors ([`init_values`], as [`random_weights`]) for `build`'s module at full size: the
/// shapes are recorded first (candle's ops, so nothing is packed), then filled.
fn random_f16_weights(
    seed: u64,
    build: impl FnOnce(&VarBuilder) -> studio_inference::Result<()>,
) -> HashMap<String, Tensor> {
    let recorded = Recorded::default();
    let vb = VarBuilder::from_backend(
        Box::new(Recorder(std::sync::Arc::clone(&recorded))),
        DType::F32,
        Device::Cpu,
    );
    studio_inference::nn::with_kernels(None, || build(&vb)).expect("build module");
    drop(vb);
    let mut shapes = std::mem::take(&mut *recorded.lock().expect("recorder lock"));
    shapes.sort();
    shapes.dedup();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    shapes
        .into_iter()
        .map(|(name, dims)| {
            let values: Vec<half::f16> = init_values(&name, &dims, &mut rng)
                .into_iter()
                .map(half::f16::from_f32)
                .collect();
            let t = Tensor::from_vec(values, dims, &Device::Cpu).expect("tensor");
            (name, t)
        })
        .collect()
}

/// Writes a random-weight SDXL base 1.0 at its real size (UNet 2.6 B parameters, both text
/// encoders, the VAE) in f16, in the diffusers folder layout with the released configs: for
/// measuring memory and speed at 1024² (`write_random_sdxl` example). It uses the bundled CLIP
/// tokenizer (no tokenizer folders).
pub fn write_random_sdxl(dir: &Path, seed: u64) {
    let unet_cfg = json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": true,
    });
    let unet_config = UnetConfig::from_json(&unet_cfg.to_string()).expect("unet config");
    let unet = random_f16_weights(seed, |vb| Unet::new(vb, unet_config).map(|_| ()));
    write_json(&dir.join("unet/config.json"), &unet_cfg);
    save(
        &dir.join("unet"),
        "diffusion_pytorch_model.safetensors",
        &unet,
    );
    drop(unet);

    let vae_cfg = json!({
        "_class_name": "AutoencoderKL",
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "scaling_factor": 0.13025,
        "in_channels": 3,
        "out_channels": 3,
        "sample_size": 1024,
    });
    let vae_config: VaeConfig = serde_json::from_value(vae_cfg.clone()).expect("vae config");
    let vae = with_current_vae_names(random_f16_weights(seed + 1, |vb| {
        Vae::new(vb, vae_config).map(|_| ())
    }));
    write_json(&dir.join("vae/config.json"), &vae_cfg);
    save(
        &dir.join("vae"),
        "diffusion_pytorch_model.safetensors",
        &vae,
    );

    // CLIP ViT-L/14 and OpenCLIP bigG/14: 4× MLPs, 64-dim heads.
    for (folder, hidden, layers, act, projection, offset) in [
        ("text_encoder", 768, 12, "quick_gelu", false, 2),
        ("text_encoder_2", 1280, 32, "gelu", true, 3),
    ] {
        let mut cfg = text_config(hidden, act, layers, hidden, 49408);
        cfg["intermediate_size"] = json!(4 * hidden);
        if projection {
            cfg["architectures"] = json!(["CLIPTextModelWithProjection"]);
        }
        let config: ClipConfig = serde_json::from_value(cfg.clone()).expect("clip config");
        let w = with_text_model_prefix(random_f16_weights(seed + offset, |vb| {
            ClipTextModel::new(vb, &config, projection).map(|_| ())
        }));
        write_json(&dir.join(folder).join("config.json"), &cfg);
        save(&dir.join(folder), "model.safetensors", &w);
    }
    write_pipeline_files(dir, true, false);
}

/// A tensor's initial values: norms at one (weights) and zero (biases) like a trained model,
/// other biases zero, everything else uniform in ±1/√fan_in from `rng`.
fn init_values(name: &str, dims: &[usize], rng: &mut rand::rngs::StdRng) -> Vec<f32> {
    let n: usize = dims.iter().product();
    let is_norm = name.contains("norm") || name.contains("layer_norm");
    if is_norm && name.ends_with("weight") {
        vec![1.0; n]
    } else if is_norm || name.ends_with("bias") {
        vec![0.0; n]
    } else {
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        let scale = 1.0 / (fan_in as f32).sqrt();
        (0..n)
            .map(|_| (rand::Rng::random::<f32>(rng) * 2.0 - 1.0) * scale)
            .collect()
    }
}

/// Random tensors for `build`'s module, by name (seeded).
fn random_weights(
    seed: u64,
    build: impl FnOnce(&VarBuilder) -> studio_inference::Result<()>,
) -> HashMap<String, Tensor> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    build(&vb).expect("build tiny module");
    let data = map.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    // VarMap's own init is unseeded: overwrite every tensor from a seeded generator, keeping
    // norms at one/zero like a trained model.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut out = HashMap::new();
    for name in names {
        let dims = data[name].as_tensor().dims().to_vec();
        let values = init_values(name, &dims, &mut rng);
        out.insert(
            name.clone(),
            Tensor::from_vec(values, dims, &Device::Cpu).expect("tensor"),
        );
    }
    out
}

fn save(dir: &Path, file: &str, tensors: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).expect("create dir");
    candle_core::safetensors::save(tensors, dir.join(file)).expect("save safetensors");
}

fn write_json(path: &Path, v: &Value) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("create dir");
    std::fs::write(path, serde_json::to_string_pretty(v).expect("json")).expect("write json");
}

/// The diffusers-named tensors of every component of a tiny model.
pub struct TinyWeights {
    pub unet: HashMap<String, Tensor>,
    pub vae: HashMap<String, Tensor>,
    pub text_encoder: HashMap<String, Tensor>,
    pub text_encoder_2: Option<HashMap<String, Tensor>>,
}

/// Writes a tiny model in the diffusers layout to `dir` and returns its tensors.
pub fn write_tiny_sd(dir: &Path, opts: TinySd) -> TinyWeights {
    let refiner = opts.kind == TinyKind::SdxlRefiner;
    let sdxl = opts.kind == TinyKind::Sdxl || refiner;
    let (te_hidden, te2_hidden) = (32, 32);
    let cross = match opts.kind {
        TinyKind::Sd1 | TinyKind::Sd2 => te_hidden,
        TinyKind::Sdxl => te_hidden + te2_hidden,
        TinyKind::SdxlRefiner => te2_hidden,
    };
    let projection = 16;
    let down_types = if sdxl {
        json!(["DownBlock2D", "CrossAttnDownBlock2D"])
    } else {
        json!(["CrossAttnDownBlock2D", "DownBlock2D"])
    };
    let mut unet_cfg = json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": if opts.inpainting { 9 } else { 4 },
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "down_block_types": down_types,
        "up_block_types": if sdxl { json!(["CrossAttnUpBlock2D", "UpBlock2D"]) } else { json!(["UpBlock2D", "CrossAttnUpBlock2D"]) },
        "layers_per_block": 1,
        "attention_head_dim": [1, 1],
        "cross_attention_dim": cross,
        "transformer_layers_per_block": if sdxl { json!([1, 2]) } else { json!(1) },
        "use_linear_projection": opts.kind != TinyKind::Sd1,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "sample_size": 8,
    });
    if sdxl {
        unet_cfg["addition_embed_type"] = json!("text_time");
        unet_cfg["addition_time_embed_dim"] = json!(256);
        // Size ids (6), or the refiner's size and aesthetic score (5).
        let ids = if refiner { 5 } else { 6 };
        unet_cfg["projection_class_embeddings_input_dim"] = json!(projection + ids * 256);
    }
    let unet_config = UnetConfig::from_json(&unet_cfg.to_string()).expect("unet config");
    let unet = random_weights(opts.seed, |vb| Unet::new(vb, unet_config).map(|_| ()));
    write_json(&dir.join("unet/config.json"), &unet_cfg);
    save(
        &dir.join("unet"),
        "diffusion_pytorch_model.safetensors",
        &unet,
    );

    let scaling = if sdxl { 0.13025 } else { 0.18215 };
    let vae_cfg = json!({
        "_class_name": "AutoencoderKL",
        "block_out_channels": [32, 32, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "scaling_factor": scaling,
        "in_channels": 3,
        "out_channels": 3,
    });
    let vae_config: VaeConfig = serde_json::from_value(vae_cfg.clone()).expect("vae config");
    let vae = with_current_vae_names(random_weights(opts.seed + 1, |vb| {
        Vae::new(vb, vae_config).map(|_| ())
    }));
    write_json(&dir.join("vae/config.json"), &vae_cfg);
    save(
        &dir.join("vae"),
        "diffusion_pytorch_model.safetensors",
        &vae,
    );

    let act = if opts.kind == TinyKind::Sd1 || sdxl {
        "quick_gelu"
    } else {
        "gelu"
    };
    let vocab = if opts.full_vocab { 49408 } else { vocab_size() };
    let te_cfg = text_config(te_hidden, act, 2, projection, vocab);
    let te_config: ClipConfig = serde_json::from_value(te_cfg.clone()).expect("clip config");
    let text_encoder = if refiner {
        HashMap::new()
    } else {
        let w = with_text_model_prefix(random_weights(opts.seed + 2, |vb| {
            ClipTextModel::new(vb, &te_config, false).map(|_| ())
        }));
        write_json(&dir.join("text_encoder/config.json"), &te_cfg);
        save(&dir.join("text_encoder"), "model.safetensors", &w);
        w
    };
    if !opts.full_vocab && !refiner {
        write_tokenizer(&dir.join("tokenizer"), opts.kind == TinyKind::Sd1 || sdxl);
    }

    let text_encoder_2 = sdxl.then(|| {
        let cfg = text_config(te2_hidden, "gelu", 2, projection, vocab);
        let config: ClipConfig = serde_json::from_value(cfg.clone()).expect("clip config");
        let w = with_text_model_prefix(random_weights(opts.seed + 3, |vb| {
            ClipTextModel::new(vb, &config, true).map(|_| ())
        }));
        write_json(&dir.join("text_encoder_2/config.json"), &cfg);
        save(&dir.join("text_encoder_2"), "model.safetensors", &w);
        if !opts.full_vocab {
            write_tokenizer(&dir.join("tokenizer_2"), false);
        }
        w
    });

    write_pipeline_files(dir, sdxl, opts.v_prediction);
    TinyWeights {
        unet,
        vae,
        text_encoder,
        text_encoder_2,
    }
}

/// The scheduler's config and `model_index.json`.
fn write_pipeline_files(dir: &Path, sdxl: bool, v_prediction: bool) {
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &json!({
            "_class_name": "EulerDiscreteScheduler",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "prediction_type": if v_prediction { "v_prediction" } else { "epsilon" },
        }),
    );
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": if sdxl { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" },
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    );
}

fn write_tokenizer(dir: &Path, pad_eos: bool) {
    std::fs::create_dir_all(dir).expect("create dir");
    let mut merges = String::from("#version: 0.2\n");
    for m in MERGES {
        merges.push_str(m);
        merges.push('\n');
    }
    std::fs::write(dir.join("merges.txt"), merges).expect("write merges");
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({ "pad_token": if pad_eos { "<|endoftext|>" } else { "!" } }),
    );
}

/// A kohya-format LoRA (rank 2, `lora_unet_…` keys, no `alpha`) on every attention `to_q` and
/// `to_v` of the tiny model in `model_dir`, with deterministic pseudo-random factors, saved to
/// `out`.
///
/// # Panics
/// When the model's UNet cannot be read or the file cannot be written (a test's setup).
pub fn write_tiny_lora(model_dir: &Path, out: &Path) {
    let unet = studio_inference::weights::open_checkpoint(&[
        model_dir.join("unet/diffusion_pytorch_model.safetensors")
    ])
    .expect("unet");
    let mut state = 1u32;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / 16_777_216.0 - 0.5
            })
            .collect()
    };
    let mut lora = HashMap::new();
    for (name, view) in unet.tensors() {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !(module.ends_with("to_q") || module.ends_with("to_v")) || view.shape().len() != 2 {
            continue;
        }
        let (rows, cols) = (view.shape()[0], view.shape()[1]);
        let key = format!("lora_unet_{}", module.replace('.', "_"));
        let down = Tensor::from_vec(rand(2 * cols), (2, cols), &Device::Cpu).expect("down");
        let up = Tensor::from_vec(rand(rows * 2), (rows, 2), &Device::Cpu).expect("up");
        lora.insert(format!("{key}.lora_down.weight"), down);
        lora.insert(format!("{key}.lora_up.weight"), up);
    }
    assert!(!lora.is_empty(), "the tiny UNet has attention layers");
    candle_core::safetensors::save(&lora, out).expect("save the LoRA");
}

/// A ControlNet for the tiny model in `model_dir`, written as a diffusers folder to `out`: the
/// UNet's encoder half copied (as diffusers' `ControlNetModel.from_unet` does), with a control
/// image encoder (widths 4, 4, 8, 8: one eighth of the image's size, the latents') and zero
/// convolutions filled with deterministic pseudo-random values instead of zeros, so the unit
/// changes the image.
///
/// # Panics
/// When the model's UNet cannot be read or the folder cannot be written (a test's setup).
pub fn write_tiny_controlnet(model_dir: &Path, out: &Path) {
    let unet_dir = model_dir.join("unet");
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(unet_dir.join("config.json")).expect("unet config"),
    )
    .expect("unet config json");
    config["_class_name"] = json!("ControlNetModel");
    config["conditioning_embedding_out_channels"] = json!([4, 4, 8, 8]);
    config["conditioning_channels"] = json!(3);
    let parsed = UnetConfig::from_json(&config.to_string()).expect("unet config parses");
    let unet = studio_inference::weights::open_checkpoint(&[
        unet_dir.join("diffusion_pytorch_model.safetensors")
    ])
    .expect("unet");
    let mut tensors = HashMap::new();
    for (name, _) in unet.tensors() {
        if [
            "conv_in.",
            "time_embedding.",
            "add_embedding.",
            "down_blocks.",
            "mid_block.",
        ]
        .iter()
        .any(|p| name.starts_with(p))
        {
            tensors.insert(
                name.clone(),
                unet.load(&name, &Device::Cpu).expect("tensor"),
            );
        }
    }
    let mut state = 3u32;
    let mut rand = |shape: &[usize], scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((state >> 8) as f32 / 16_777_216.0 - 0.5) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    };
    let mut conv =
        |t: &mut HashMap<String, Tensor>, name: &str, c_in: usize, c_out: usize, k: usize| {
            let fan = (c_in * k * k) as f32;
            t.insert(
                format!("{name}.weight"),
                rand(&[c_out, c_in, k, k], 3.0 / fan.sqrt()),
            );
            t.insert(format!("{name}.bias"), rand(&[c_out], 0.2));
        };
    let widths = [4, 4, 8, 8];
    let e = "controlnet_cond_embedding";
    conv(&mut tensors, &format!("{e}.conv_in"), 3, widths[0], 3);
    for i in 0..widths.len() - 1 {
        conv(
            &mut tensors,
            &format!("{e}.blocks.{}", 2 * i),
            widths[i],
            widths[i],
            3,
        );
        conv(
            &mut tensors,
            &format!("{e}.blocks.{}", 2 * i + 1),
            widths[i],
            widths[i + 1],
            3,
        );
    }
    let b0 = parsed.levels[0].channels;
    conv(&mut tensors, &format!("{e}.conv_out"), widths[3], b0, 3);
    let mut skip_widths = vec![b0];
    for (i, level) in parsed.levels.iter().enumerate() {
        skip_widths.extend(std::iter::repeat_n(level.channels, parsed.layers_per_block));
        if i + 1 < parsed.levels.len() {
            skip_widths.push(level.channels);
        }
    }
    for (i, &w) in skip_widths.iter().enumerate() {
        conv(
            &mut tensors,
            &format!("controlnet_down_blocks.{i}"),
            w,
            w,
            1,
        );
    }
    let last = parsed.levels[parsed.levels.len() - 1].channels;
    conv(&mut tensors, "controlnet_mid_block", last, last, 1);
    write_json(&out.join("config.json"), &config);
    candle_core::safetensors::save(&tensors, out.join("diffusion_pytorch_model.safetensors"))
        .expect("save the ControlNet");
}
