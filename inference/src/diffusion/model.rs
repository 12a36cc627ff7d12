//! Finding and loading a Stable Diffusion model: a diffusers folder (`model_index.json`,
//! `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and for SDXL `text_encoder_2/`)
//! or a single-file checkpoint in the original naming, renamed on load ([`super::convert`]).
//! The model type (SD 1.x, SD 2.x, SDXL, inpainting, v-prediction) is read from the files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::weights::Tensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::clip::{ClipConfig, ClipTextModel};
use super::convert::{self, CheckpointKind, Component, Source};
use super::lora::{LoraBackend, LoraReport, LoraSet, LoraSpec, Part as LoraPart, PartNames};
use super::preview::{LatentFormat, TinyDecoder};
use super::prompt::{ClipTokenizer, Padding};
use super::samplers::{BetaSchedule, NoiseSchedule, Prediction};
use super::unet::{Unet, UnetConfig};
use super::vae::{Vae, VaeConfig};
use crate::error::{Error, Result};
use crate::nn::{Storage, with_weight_storage};
use crate::weights::{open_checkpoint, stored_storage};

/// The model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdKind {
    /// Stable Diffusion 1.x: OpenAI CLIP ViT-L text encoder, trained at 512×512.
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H text encoder, trained at 512×512 or (v-prediction)
    /// 768×768.
    Sd2,
    /// SDXL: two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), trained at
    /// 1024×1024.
    Sdxl,
}

impl SdKind {
    /// The family's name for the UI: `SD 1.x`, `SD 2.x` or `SDXL`.
    pub fn label(self) -> &'static str {
        match self {
            SdKind::Sd1 => "SD 1.x",
            SdKind::Sd2 => "SD 2.x",
            SdKind::Sdxl => "SDXL",
        }
    }
}

/// How the model was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// A diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, …).
    Diffusers,
    /// One checkpoint file in the original (LDM) naming, renamed on load.
    SingleFile,
}

/// What the UI shows about a loaded image model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageModelInfo {
    /// Display name: the file's stem, or the folder's name for a diffusers model.
    pub name: String,
    /// Where it was loaded from (the folder, for a diffusers model).
    pub path: PathBuf,
    /// The model family.
    pub kind: SdKind,
    /// Whether it was a diffusers folder or a single file.
    pub layout: Layout,
    /// A 9-channel inpainting UNet.
    pub inpainting: bool,
    /// What the UNet predicts (noise or v): from the scheduler config or a test pass,
    /// unless [`ImageModelOptions::prediction`] overrides it.
    pub prediction: Prediction,
    /// A distilled few-step model (SD-Turbo, SDXL-Turbo, LCM), judged by its name.
    pub few_step: bool,
    /// The size it was trained at.
    pub default_size: (u32, u32),
    /// Width and height must be multiples of this.
    pub size_multiple: u32,
    /// Whether a TAESD decoder is loaded for previews.
    pub taesd: bool,
    /// Choices made on load the user should know about.
    pub notes: Vec<String>,
    /// What each LoRA of the load changed and ignored.
    #[serde(default)]
    pub loras: Vec<LoraReport>,
}

/// Optional extras when loading.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageModelOptions {
    /// A separate VAE file (diffusers or original names) replacing the model's own.
    pub vae: Option<PathBuf>,
    /// A TAESD decoder (file or folder) for better live previews.
    pub taesd: Option<PathBuf>,
    /// Overrides the detected prediction type.
    pub prediction: Option<Prediction>,
    /// LoRA / LyCORIS files merged into the UNet and text encoders as they load (see
    /// [`super::lora`]); the model's own weights are what loads without them.
    pub loras: Vec<LoraSpec>,
}

/// One text encoder with its tokenizer and how SD reads it.
#[derive(Debug)]
pub struct TextEncoder {
    /// The CLIP text transformer.
    pub model: ClipTextModel,
    /// Its tokenizer, padding as this encoder was trained to.
    pub tokenizer: ClipTokenizer,
    /// Layers left out by default (1 = the penultimate layer).
    pub skip: usize,
    /// Whether the final layer norm is applied to the hidden states (SD 1.x/2.x; SDXL uses
    /// them without it).
    pub final_norm: bool,
}

/// A loaded Stable Diffusion model.
pub struct SdModel {
    /// What the UI shows about the model.
    pub info: ImageModelInfo,
    /// The denoising UNet.
    pub unet: Unet,
    /// The VAE, always in F32 whatever [`SdModel::dtype`] is.
    pub vae: Vae,
    /// The text encoders in order: one for SD 1.x/2.x, two for SDXL (CLIP ViT-L, then
    /// OpenCLIP ViT-bigG).
    pub text: Vec<TextEncoder>,
    /// The training noise schedule and prediction type the samplers follow.
    pub noise: NoiseSchedule,
    /// A TAESD decoder for previews, when one was given in [`ImageModelOptions::taesd`].
    pub taesd: Option<TinyDecoder>,
    /// The device the weights live on and the pipeline runs on.
    pub device: Device,
    /// The UNet's and text encoders' dtype: F32 on the CPU, F16 on a GPU.
    pub dtype: DType,
}

impl std::fmt::Debug for SdModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdModel")
            .field("info", &self.info)
            .field("unet", &self.unet)
            .field("vae", &self.vae)
            .finish_non_exhaustive()
    }
}

impl SdModel {
    /// Whether this is an SDXL refiner: the OpenCLIP bigG encoder alone, conditioned on an
    /// aesthetic score instead of the target size.
    pub fn is_refiner(&self) -> bool {
        self.info.kind == SdKind::Sdxl && self.text.len() == 1
    }

    /// The format of this model's latents, for previews (SDXL's differs).
    pub fn latent_format(&self) -> LatentFormat {
        match self.info.kind {
            SdKind::Sdxl => LatentFormat::Sdxl,
            _ => LatentFormat::Sd,
        }
    }
}

/// Whether `path` looks like a Stable Diffusion model (a diffusers pipeline folder, a
/// single-file safetensors checkpoint with SD names, or a `.ckpt`, the original SD
/// checkpoints' extension), without loading it (only a safetensors header is read).
pub fn is_diffusion_model(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("model_index.json").exists() || path.join("unet").is_dir();
    }
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ckpt"))
    {
        return true;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        && let Ok(st) = open_checkpoint(&[path.to_path_buf()])
    {
        return st
            .tensors()
            .iter()
            .any(|(n, _)| n.starts_with("model.diffusion_model."));
    }
    false
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

pub(super) fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::BadConfig {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// The weight file(s) of a diffusers component folder: safetensors (one file or shards),
/// else the `.bin` pickles older diffusers wrote (one file or shards), which Studio's own
/// reader reads as data (`pytorch_model.bin` for a text encoder's `model`).
pub(super) fn component_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    for ext in ["safetensors", "bin"] {
        // transformers' components (the text encoders) name their pickles `pytorch_model`.
        let stem = if ext == "bin" && stem == "model" {
            "pytorch_model"
        } else {
            stem
        };
        for name in [format!("{stem}.{ext}"), format!("{stem}.fp16.{ext}")] {
            let p = dir.join(name);
            if p.exists() {
                return Ok(vec![p]);
            }
        }
        let index = dir.join(format!("{stem}.{ext}.index.json"));
        if index.exists() {
            let idx: Index = read_json(&index)?;
            return crate::llm::loader::shard_files(&index, idx.weight_map.values(), ext);
        }
    }
    Err(Error::NoModel(dir.to_owned()))
}

/// A builder over `files`, and how the native kernels keep their weights (see
/// [`with_weight_storage`]).
fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    lora: Option<(&Arc<LoraSet>, LoraPart)>,
) -> Result<(VarBuilder<'static>, Storage)> {
    let st = open_checkpoint(files)?;
    let stored = stored_storage(&st);
    // On the CPU every tensor is copied out of the mapping, whose pages are then released;
    // a GPU upload copies too, but keep the plain mapping there.
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = if device.is_cpu() {
        Box::new(crate::weights::ReleasingMmap(st))
    } else {
        Box::new(st)
    };
    let backend = with_lora(backend, lora);
    Ok((
        VarBuilder::from_backend(backend, dtype, device.clone()),
        stored,
    ))
}

/// `backend` with `lora`'s changes to its part, when there are any.
fn with_lora(
    backend: Box<dyn candle_nn::var_builder::SimpleBackend>,
    lora: Option<(&Arc<LoraSet>, LoraPart)>,
) -> Box<dyn candle_nn::var_builder::SimpleBackend> {
    match lora {
        Some((set, part)) if !set.is_empty() => {
            Box::new(LoraBackend::new(backend, Arc::clone(set), part))
        }
        _ => backend,
    }
}

/// The LoRAs of a load against the model's weight names, or `None` without any.
fn lora_set(loras: &[LoraSpec], names: &PartNames) -> Result<Option<Arc<LoraSet>>> {
    if loras.is_empty() {
        return Ok(None);
    }
    Ok(Some(Arc::new(LoraSet::build(loras, names)?)))
}

/// The tensors of a component's files, with their shapes.
fn tensor_names(files: &[PathBuf]) -> Result<HashMap<String, Vec<usize>>> {
    Ok(names_and_shapes(&open_checkpoint(files)?))
}

fn names_and_shapes(st: &Tensors) -> HashMap<String, Vec<usize>> {
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SchedulerConfig {
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    prediction_type: Option<String>,
}

fn noise_schedule(cfg: &SchedulerConfig) -> NoiseSchedule {
    let d = NoiseSchedule::default();
    NoiseSchedule {
        num_train_timesteps: cfg.num_train_timesteps.unwrap_or(d.num_train_timesteps),
        beta_start: cfg.beta_start.unwrap_or(d.beta_start),
        beta_end: cfg.beta_end.unwrap_or(d.beta_end),
        beta_schedule: match cfg.beta_schedule.as_deref() {
            Some("linear") => BetaSchedule::Linear,
            _ => BetaSchedule::ScaledLinear,
        },
        prediction: match cfg.prediction_type.as_deref() {
            Some("v_prediction") => Prediction::VPrediction,
            _ => Prediction::Epsilon,
        },
    }
}

pub(super) fn device_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

fn model_name(path: &Path) -> String {
    let p = if path.file_name().is_some_and(|n| n == "model_index.json") {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    p.file_stem().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn few_step(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("turbo") || n.contains("lcm") || n.contains("lightning") || n.contains("hyper")
}

/// Loads a Stable Diffusion model from a diffusers folder or a single-file checkpoint.
pub fn load(
    path: &Path,
    options: &ImageModelOptions,
    device: &Device,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<SdModel> {
    if !path.exists() {
        return Err(Error::NotFound(path.to_owned()));
    }
    let path = if path.file_name().is_some_and(|n| n == "model_index.json") {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    let mut model = if path.is_dir() {
        load_diffusers(path, &options.loras, device, progress)?
    } else {
        load_single_file(path, &options.loras, device, progress)?
    };
    if let Some(vae_path) = &options.vae {
        progress(0.9, "Loading the VAE");
        model.vae = load_separate_vae(vae_path, model.vae.config().scaling_factor, device)?;
        model
            .info
            .notes
            .push(format!("VAE: {}", model_name(vae_path)));
    }
    if let Some(taesd) = &options.taesd {
        progress(0.95, "Loading TAESD");
        model.taesd = Some(TinyDecoder::load(taesd, device)?);
        model.info.taesd = true;
    }
    if let Some(p) = options.prediction {
        model.noise.prediction = p;
        model.info.prediction = p;
    }
    progress(1.0, "Ready");
    Ok(model)
}

/// `native`: the image side the model was trained at, when a diffusers folder gives one: the
/// UNet config's `sample_size` (a latent side) times the VAE's factor, as diffusers' pipelines
/// choose (SD 1.5 64 → 512, SD 2.1-v 96 → 768, SDXL 128 → 1024, a 64 px demo model 8 → 64).
fn finish_info(
    path: &Path,
    kind: SdKind,
    layout: Layout,
    unet: &Unet,
    prediction: Prediction,
    notes: Vec<String>,
    native: Option<u64>,
) -> ImageModelInfo {
    let name = model_name(path);
    let few_step = few_step(&name);
    let size_multiple = if kind == SdKind::Sdxl { 64 } else { 8 };
    let guessed = match kind {
        SdKind::Sdxl => 1024,
        SdKind::Sd2 if prediction == Prediction::VPrediction && !few_step => 768,
        _ => 512,
    };
    let default = native
        .and_then(|s| u32::try_from(s).ok())
        .filter(|d| (64..=2048).contains(d) && d.is_multiple_of(size_multiple))
        .unwrap_or(guessed);
    ImageModelInfo {
        few_step,
        name,
        path: path.to_owned(),
        kind,
        layout,
        inpainting: unet.config().in_channels == 9,
        prediction,
        default_size: (default, default),
        size_multiple,
        taesd: false,
        notes,
        loras: Vec::new(),
    }
}

fn load_diffusers(
    dir: &Path,
    loras: &[LoraSpec],
    device: &Device,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<SdModel> {
    let dtype = device_dtype(device);
    let unet_dir = dir.join("unet");
    let unet_cfg_path = unet_dir.join("config.json");
    let unet_cfg_text = std::fs::read_to_string(&unet_cfg_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NoModel(dir.to_owned())
        } else {
            Error::io(&unet_cfg_path, e)
        }
    })?;
    let unet_cfg = UnetConfig::from_json(&unet_cfg_text).map_err(|m| bad(&unet_cfg_path, m))?;
    let native = serde_json::from_str::<serde_json::Value>(&unet_cfg_text)
        .ok()
        .and_then(|v| v["sample_size"].as_u64());
    let has_te2 = dir.join("text_encoder_2").is_dir();
    let te_cfg: Option<ClipConfig> = read_json(&dir.join("text_encoder").join("config.json")).ok();
    // SD 2.x conditions on OpenCLIP-H (1024 wide, GELU); SD 1.x on OpenAI's CLIP-L (quick GELU).
    let open_clip = te_cfg
        .as_ref()
        .is_some_and(|c| c.hidden_act == super::clip::Activation::Gelu);
    let kind = if has_te2 || unet_cfg.text_time.is_some() {
        SdKind::Sdxl
    } else if unet_cfg.cross_attention_dim == 1024 || open_clip {
        SdKind::Sd2
    } else {
        SdKind::Sd1
    };
    let sched_path = dir.join("scheduler").join("scheduler_config.json");
    let sched: SchedulerConfig = if sched_path.exists() {
        read_json(&sched_path)?
    } else {
        SchedulerConfig::default()
    };
    let noise = noise_schedule(&sched);

    progress(0.05, "Loading the text encoder");
    let mut text = Vec::new();
    let lora = if loras.is_empty() {
        None
    } else {
        let mut names = PartNames::new();
        for (te, part) in [
            ("text_encoder", LoraPart::TextEncoder),
            ("text_encoder_2", LoraPart::TextEncoder2),
        ] {
            if dir.join(te).join("config.json").is_file() {
                names.insert(
                    part,
                    tensor_names(&component_files(&dir.join(te), "model")?)?,
                );
            }
        }
        names.insert(
            LoraPart::Unet,
            tensor_names(&component_files(&unet_dir, "diffusion_pytorch_model")?)?,
        );
        lora_set(loras, &names)?
    };
    let te_dirs: &[(&str, &str, Padding)] = match kind {
        SdKind::Sd1 => &[("text_encoder", "tokenizer", Padding::Eos)],
        SdKind::Sd2 => &[("text_encoder", "tokenizer", Padding::Exclamation)],
        SdKind::Sdxl => &[
            ("text_encoder", "tokenizer", Padding::Eos),
            ("text_encoder_2", "tokenizer_2", Padding::Exclamation),
        ],
    };
    for (te, tok, padding) in te_dirs {
        let te_dir = dir.join(te);
        // The SDXL refiner has only the second (OpenCLIP bigG) encoder.
        if kind == SdKind::Sdxl && *te == "text_encoder" && !te_dir.join("config.json").is_file() {
            continue;
        }
        let cfg: ClipConfig = read_json(&te_dir.join("config.json"))?;
        let second = *te == "text_encoder_2";
        let part = if second {
            LoraPart::TextEncoder2
        } else {
            LoraPart::TextEncoder
        };
        let (vb, stored) = var_builder(
            &component_files(&te_dir, "model")?,
            dtype,
            device,
            lora.as_ref().map(|l| (l, part)),
        )?;
        let with_projection = kind == SdKind::Sdxl && second;
        let model = with_weight_storage(stored, || ClipTextModel::new(&vb, &cfg, with_projection))
            .map_err(|e| component_error(&te_dir, &e))?;
        let tokenizer = diffusers_tokenizer(&dir.join(tok), cfg.vocab_size, *padding)?;
        let sdxl = kind == SdKind::Sdxl;
        text.push(TextEncoder {
            model,
            tokenizer,
            skip: usize::from(sdxl),
            final_norm: !sdxl,
        });
    }

    progress(0.3, "Loading the UNet");
    let (vb, stored) = var_builder(
        &component_files(&unet_dir, "diffusion_pytorch_model")?,
        dtype,
        device,
        lora.as_ref().map(|l| (l, LoraPart::Unet)),
    )?;
    let unet = with_weight_storage(stored, || Unet::new(&vb, unet_cfg))
        .map_err(|e| component_error(&unet_dir, &e))?;

    progress(0.8, "Loading the VAE");
    let vae_dir = dir.join("vae");
    let mut vae_cfg: VaeConfig = read_json(&vae_dir.join("config.json"))?;
    if kind == SdKind::Sdxl && (vae_cfg.scaling_factor - 0.18215).abs() < 1e-9 {
        vae_cfg.scaling_factor = 0.13025;
    }
    let (vb, stored) = var_builder(
        &component_files(&vae_dir, "diffusion_pytorch_model")?,
        DType::F32,
        device,
        None,
    )?;
    let vae = with_weight_storage(stored, || Vae::new(&vb, vae_cfg))
        .map_err(|e| component_error(&vae_dir, &e))?;
    let pickled = ["unet", "vae", "text_encoder", "text_encoder_2"]
        .iter()
        .any(|c| {
            std::fs::read_dir(dir.join(c)).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "bin"))
            })
        });
    let info = finish_info(
        dir,
        kind,
        Layout::Diffusers,
        &unet,
        noise.prediction,
        if pickled {
            vec![crate::pickle::SAFE_MODE_NOTE.to_owned()]
        } else {
            Vec::new()
        },
        native.map(|s| s.saturating_mul(vae.config().factor() as u64)),
    );
    let info = ImageModelInfo {
        loras: lora.map(|l| l.reports.clone()).unwrap_or_default(),
        ..info
    };
    Ok(SdModel {
        info,
        unet,
        vae,
        text,
        noise,
        taesd: None,
        device: device.clone(),
        dtype,
    })
}

pub(super) fn component_error(dir: &Path, e: &Error) -> Error {
    Error::CorruptWeights {
        path: dir.to_owned(),
        message: e.to_string(),
    }
}

fn diffusers_tokenizer(dir: &Path, vocab_size: usize, padding: Padding) -> Result<ClipTokenizer> {
    let merges = dir.join("merges.txt");
    if vocab_size == 49408 || !merges.exists() {
        // Every released SD text encoder uses OpenAI's 49408-token vocabulary, bundled.
        Ok(ClipTokenizer::bundled(padding))
    } else if dir.join("vocab.json").exists() {
        ClipTokenizer::from_folder(dir, vocab_size, padding)
    } else {
        ClipTokenizer::from_merges(&merges, vocab_size, padding)
    }
}

/// A single-file checkpoint's component: its renamed weights and shapes.
struct Part {
    vb: VarBuilder<'static>,
    names: Vec<String>,
    shapes: HashMap<String, Vec<usize>>,
}

impl Part {
    #[allow(clippy::too_many_arguments)]
    fn new(
        st: &Arc<Tensors>,
        all: &HashMap<String, Vec<usize>>,
        kind: CheckpointKind,
        component: Component,
        dtype: DType,
        device: &Device,
        lora: Option<(&Arc<LoraSet>, LoraPart)>,
    ) -> Result<Self> {
        let ldm: Vec<&str> = all.keys().map(String::as_str).collect();
        let map = convert::key_map(kind, component, &ldm)?;
        let shapes: HashMap<String, Vec<usize>> = map
            .iter()
            .filter_map(|(name, src)| Some((name.clone(), source_shape(src, all)?)))
            .collect();
        let mut names: Vec<String> = map.keys().cloned().collect();
        names.sort();
        let backend = with_lora(convert::backend(st.clone(), map), lora);
        let vb = VarBuilder::from_backend(backend, dtype, device.clone());
        Ok(Self { vb, names, shapes })
    }

    /// The diffusers names of a component of a single-file checkpoint, with their shapes.
    fn names_of(
        all: &HashMap<String, Vec<usize>>,
        kind: CheckpointKind,
        component: Component,
    ) -> Result<HashMap<String, Vec<usize>>> {
        let ldm: Vec<&str> = all.keys().map(String::as_str).collect();
        Ok(convert::key_map(kind, component, &ldm)?
            .into_iter()
            .filter_map(|(name, src)| Some((name, source_shape(&src, all)?)))
            .collect())
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }

    fn name_refs(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    fn count(&self, prefix: &str) -> usize {
        self.names
            .iter()
            .filter_map(|n| n.strip_prefix(prefix))
            .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    }

    fn clip_config(&self, open_clip: bool) -> Result<ClipConfig> {
        let missing = |n: &str| Error::MissingTensor {
            path: PathBuf::from("text encoder"),
            name: n.to_owned(),
        };
        let tok = "text_model.embeddings.token_embedding.weight";
        let pos = "text_model.embeddings.position_embedding.weight";
        let fc1 = "text_model.encoder.layers.0.mlp.fc1.weight";
        let emb = self.shape(tok).ok_or_else(|| missing(tok))?;
        let positions = self.shape(pos).ok_or_else(|| missing(pos))?[0];
        let intermediate = self.shape(fc1).ok_or_else(|| missing(fc1))?[0];
        Ok(ClipConfig {
            vocab_size: emb[0],
            hidden_size: emb[1],
            intermediate_size: intermediate,
            num_hidden_layers: self.count("text_model.encoder.layers."),
            num_attention_heads: (emb[1] / 64).max(1),
            max_position_embeddings: positions,
            hidden_act: if open_clip {
                super::clip::Activation::Gelu
            } else {
                super::clip::Activation::QuickGelu
            },
            layer_norm_eps: 1e-5,
            projection_dim: self.shape("text_projection.weight").map(|s| s[0]),
        })
    }
}

fn source_shape(src: &Source, all: &HashMap<String, Vec<usize>>) -> Option<Vec<usize>> {
    match src {
        Source::Tensor(n) => all.get(n).cloned(),
        Source::Chunk { name, parts, .. } => {
            let mut s = all.get(name)?.clone();
            s[0] /= parts;
            Some(s)
        }
        Source::Transposed(n) => {
            let mut s = all.get(n)?.clone();
            s.reverse();
            Some(s)
        }
        Source::Squeezed(n) => Some(all.get(n)?.iter().copied().take(2).collect()),
    }
}

fn load_single_file(
    path: &Path,
    loras: &[LoraSpec],
    device: &Device,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<SdModel> {
    let dtype = device_dtype(device);
    let st = Arc::new(open_checkpoint(&[path.to_path_buf()])?);
    let stored = stored_storage(&st);
    let all = names_and_shapes(&st);
    let refs: Vec<&str> = all.keys().map(String::as_str).collect();
    let ckpt = convert::detect_kind(&refs).ok_or_else(|| {
        let has_unet = refs.iter().any(|n| n.starts_with("model.diffusion_model."));
        bad(
            path,
            if has_unet {
                "a UNet without a text encoder (a UNet-only or LoRA file?): Studio needs a full \
                 SD 1.x, SD 2.x or SDXL checkpoint"
            } else {
                "not a Stable Diffusion checkpoint: no `model.diffusion_model.*` tensors"
            },
        )
    })?;
    let kind = match ckpt {
        CheckpointKind::Sd1 => SdKind::Sd1,
        CheckpointKind::Sd2 => SdKind::Sd2,
        CheckpointKind::Sdxl => SdKind::Sdxl,
    };
    let err = |e: Error| Error::CorruptWeights {
        path: path.to_owned(),
        message: e.to_string(),
    };
    progress(0.05, "Loading the text encoder");
    let mut text = Vec::new();
    // The SDXL refiner has the second (OpenCLIP bigG) encoder alone.
    let refiner = kind == SdKind::Sdxl
        && !refs
            .iter()
            .any(|n| n.starts_with("conditioner.embedders.0.transformer."));
    let encoders: &[(Component, Padding, bool)] = match kind {
        SdKind::Sd1 => &[(Component::TextEncoder, Padding::Eos, false)],
        SdKind::Sd2 => &[(Component::TextEncoder, Padding::Exclamation, true)],
        SdKind::Sdxl if refiner => &[(Component::TextEncoder2, Padding::Exclamation, true)],
        SdKind::Sdxl => &[
            (Component::TextEncoder, Padding::Eos, false),
            (Component::TextEncoder2, Padding::Exclamation, true),
        ],
    };
    let lora = if loras.is_empty() {
        None
    } else {
        let mut names = PartNames::new();
        for &(component, _, _) in encoders {
            let part = if component == Component::TextEncoder {
                LoraPart::TextEncoder
            } else {
                LoraPart::TextEncoder2
            };
            names.insert(part, Part::names_of(&all, ckpt, component)?);
        }
        names.insert(LoraPart::Unet, Part::names_of(&all, ckpt, Component::Unet)?);
        lora_set(loras, &names)?
    };
    for &(component, padding, open_clip) in encoders {
        let lora_part = if component == Component::TextEncoder {
            LoraPart::TextEncoder
        } else {
            LoraPart::TextEncoder2
        };
        let part = Part::new(
            &st,
            &all,
            ckpt,
            component,
            dtype,
            device,
            lora.as_ref().map(|l| (l, lora_part)),
        )?;
        let cfg = part.clip_config(open_clip)?;
        let with_projection = kind == SdKind::Sdxl && component == Component::TextEncoder2;
        let model = with_weight_storage(stored, || {
            ClipTextModel::new(&part.vb, &cfg, with_projection)
        })
        .map_err(err)?;
        let (skip, final_norm) = match kind {
            SdKind::Sd1 => (0, true),
            // OpenCLIP-H has 24 layers; SD 2.x reads the 23rd (diffusers drops the last).
            SdKind::Sd2 => (1, true),
            SdKind::Sdxl => (1, false),
        };
        let tokenizer = if cfg.vocab_size == 49408 {
            ClipTokenizer::bundled(padding)
        } else {
            return Err(bad(
                path,
                format!(
                    "text encoder vocabulary of {} tokens: single-file checkpoints must use \
                     CLIP's 49408",
                    cfg.vocab_size
                ),
            ));
        };
        text.push(TextEncoder {
            model,
            tokenizer,
            skip,
            final_norm,
        });
    }
    progress(0.3, "Loading the UNet");
    let part = Part::new(
        &st,
        &all,
        ckpt,
        Component::Unet,
        dtype,
        device,
        lora.as_ref().map(|l| (l, LoraPart::Unet)),
    )?;
    let unet_cfg =
        UnetConfig::infer(&part.name_refs(), &|n| part.shape(n)).map_err(|m| bad(path, m))?;
    let unet = with_weight_storage(stored, || Unet::new(&part.vb, unet_cfg)).map_err(err)?;
    progress(0.8, "Loading the VAE");
    let scale = if kind == SdKind::Sdxl {
        0.13025
    } else {
        0.18215
    };
    let part = Part::new(&st, &all, ckpt, Component::Vae, DType::F32, device, None)?;
    let vae_cfg =
        VaeConfig::infer(&part.name_refs(), &|n| part.shape(n), scale).map_err(|m| bad(path, m))?;
    let vae = with_weight_storage(stored, || Vae::new(&part.vb, vae_cfg)).map_err(err)?;
    let mut notes = Vec::new();
    if st.is_pickle() {
        notes.push(crate::pickle::SAFE_MODE_NOTE.to_owned());
    }
    let prediction = if kind == SdKind::Sd2 && unet.config().in_channels == 4 {
        progress(0.9, "Checking the prediction type");
        let v = uses_v_prediction(&unet, device, dtype)?;
        notes.push(format!(
            "{} detected from a test pass of the UNet",
            if v {
                "v-prediction"
            } else {
                "epsilon prediction"
            }
        ));
        if v {
            Prediction::VPrediction
        } else {
            Prediction::Epsilon
        }
    } else {
        Prediction::Epsilon
    };
    let noise = NoiseSchedule {
        prediction,
        ..NoiseSchedule::default()
    };
    let info = finish_info(
        path,
        kind,
        Layout::SingleFile,
        &unet,
        prediction,
        notes,
        None,
    );
    let info = ImageModelInfo {
        loras: lora.map(|l| l.reports.clone()).unwrap_or_default(),
        ..info
    };
    Ok(SdModel {
        info,
        unet,
        vae,
        text,
        noise,
        taesd: None,
        device: device.clone(),
        dtype,
    })
}

/// SD 2.x single files do not say whether they predict noise or v: a v-model, given a flat
/// latent at the last timestep, predicts an output far below its input (the test the most used
/// SD web UI runs).
fn uses_v_prediction(unet: &Unet, device: &Device, dtype: DType) -> Result<bool> {
    let x = (Tensor::ones((1, 4, 8, 8), dtype, device)? * 0.5)?;
    let ctx_dim = unet.config().cross_attention_dim;
    let ctx = (Tensor::ones((1, 77, ctx_dim), dtype, device)? * 0.5)?;
    let out = unet.forward(&x, 999.0, &ctx, None)?;
    let diff = (out - &x)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(diff < -1.0)
}

/// A separate VAE file: diffusers names, or original names with or without the
/// `first_stage_model.` prefix.
fn load_separate_vae(path: &Path, scaling_factor: f64, device: &Device) -> Result<Vae> {
    let files = if path.is_dir() {
        component_files(path, "diffusion_pytorch_model")?
    } else {
        vec![path.to_path_buf()]
    };
    let st = Arc::new(open_checkpoint(&files)?);
    let stored = stored_storage(&st);
    let all = names_and_shapes(&st);
    let err = |e: Error| Error::CorruptWeights {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let refs: Vec<&str> = all.keys().map(String::as_str).collect();
    if refs.iter().any(|n| n.starts_with("encoder.down_blocks.")) {
        let shape = |n: &str| all.get(n).cloned();
        let cfg = VaeConfig::infer(&refs, &shape, scaling_factor).map_err(|m| bad(path, m))?;
        let (vb, stored) = var_builder(&files, DType::F32, device, None)?;
        return with_weight_storage(stored, || Vae::new(&vb, cfg)).map_err(err);
    }
    // Original names: present them with the prefix the converter expects.
    let prefixed: HashMap<String, Vec<usize>> = all
        .iter()
        .map(|(n, s)| {
            if n.starts_with("first_stage_model.") {
                (n.clone(), s.clone())
            } else {
                (format!("first_stage_model.{n}"), s.clone())
            }
        })
        .collect();
    let prefixed_refs: Vec<&str> = prefixed.keys().map(String::as_str).collect();
    let mut map = convert::key_map(CheckpointKind::Sd1, Component::Vae, &prefixed_refs)?;
    for src in map.values_mut() {
        let name = match src {
            Source::Tensor(n) | Source::Transposed(n) | Source::Squeezed(n) => n,
            Source::Chunk { name, .. } => name,
        };
        if !all.contains_key(name.as_str())
            && let Some(bare) = name.strip_prefix("first_stage_model.")
        {
            *name = bare.to_owned();
        }
    }
    let shapes: HashMap<String, Vec<usize>> = map
        .iter()
        .filter_map(|(n, s)| Some((n.clone(), source_shape(s, &all)?)))
        .collect();
    let names: Vec<&str> = shapes.keys().map(String::as_str).collect();
    let cfg = VaeConfig::infer(&names, &|n| shapes.get(n).cloned(), scaling_factor)
        .map_err(|m| bad(path, m))?;
    let vb = convert::var_builder(st, map, DType::F32, device);
    with_weight_storage(stored, || Vae::new(&vb, cfg)).map_err(err)
}
