//! Finding a model's files, refusing unsafe ones, detecting the architecture from the files
//! themselves, and loading the right model family.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::{CausalLm, gpt2};
use crate::text::Tokenizer;
use crate::weights::Weights;

/// Architectures this build can load, for error messages and the Models panel.
pub const SUPPORTED_ARCHITECTURES: &str = "GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) from Hugging Face folders with model.safetensors";

/// Extensions of Python pickle checkpoints, which are never loaded.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl", "pickle"];

/// A supported model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    Gpt2,
}

impl Architecture {
    pub fn label(self) -> &'static str {
        match self {
            Architecture::Gpt2 => "GPT-2",
        }
    }
}

/// The files of one model on disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
}

/// What the UI shows about a loaded model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub architecture: Architecture,
    pub context_length: usize,
    pub vocab_size: usize,
    pub parameters: usize,
    pub dtype: String,
    /// How chat turns are turned into a prompt for this model.
    pub chat_format: String,
}

/// A model ready to generate: the network, its tokenizer and its description.
pub struct LoadedModel {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
    /// Token ids that end generation (the model's end-of-text).
    pub eos_token_ids: Vec<u32>,
}

fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Newest snapshot of a Hugging Face cache repo folder (`models--ORG--NAME`).
fn hf_cache_snapshot(dir: &Path) -> Option<PathBuf> {
    let snapshots = dir.join("snapshots");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(snapshots).ok()?.flatten() {
        let path = entry.path();
        if !path.join("config.json").exists() {
            continue;
        }
        let time = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _)| time > *t) {
            best = Some((time, path));
        }
    }
    best.map(|(_, p)| p)
}

/// Finds a model's files from a folder, a weights file or a `config.json` path.
///
/// Pickle checkpoints (`.bin`, `.pt`, `.ckpt`, …) are refused, never opened.
pub fn resolve(path: &Path) -> Result<ModelFiles> {
    if !path.exists() {
        return Err(Error::NotFound(path.to_path_buf()));
    }
    if path.is_file() {
        if is_pickle(path) {
            return Err(Error::UnsafePickle(path.to_path_buf()));
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext.eq_ignore_ascii_case("gguf") {
            return Err(Error::UnsupportedArchitecture(
                "GGUF file".to_owned(),
                SUPPORTED_ARCHITECTURES.to_owned(),
            ));
        }
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut files = resolve_dir(&dir)?;
        if ext.eq_ignore_ascii_case("safetensors") {
            files.weights = vec![path.to_path_buf()];
        }
        return Ok(files);
    }
    if let Some(snapshot) = hf_cache_snapshot(path) {
        return resolve_dir(&snapshot);
    }
    resolve_dir(path)
}

fn resolve_dir(dir: &Path) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let weights = if single.exists() {
        vec![single]
    } else if index.exists() {
        shards_from_index(&index)?
    } else {
        let pickle = ["pytorch_model.bin", "model.ckpt", "model.pt"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists());
        return Err(match pickle {
            Some(p) => Error::UnsafePickle(p),
            None => Error::NoModel(dir.to_path_buf()),
        });
    };
    if !config.exists() {
        return Err(Error::NoModel(dir.to_path_buf()));
    }
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        config,
        weights,
        tokenizer: dir.join("tokenizer.json"),
    })
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::CorruptWeights {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Reads `config.json` and names the architecture it describes.
pub fn detect_architecture(config_path: &Path) -> Result<(Architecture, serde_json::Value)> {
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::io(config_path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: config_path.to_path_buf(),
        message: e.to_string(),
    })?;
    let model_type = value.get("model_type").and_then(|v| v.as_str());
    let architectures: Vec<&str> = value
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if model_type == Some("gpt2") || architectures.iter().any(|a| a.starts_with("GPT2")) {
        return Ok((Architecture::Gpt2, value));
    }
    let name = model_type
        .map(str::to_owned)
        .or_else(|| architectures.first().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown (config.json has no model_type)".to_owned());
    Err(Error::UnsupportedArchitecture(
        name,
        SUPPORTED_ARCHITECTURES.to_owned(),
    ))
}

fn display_name(files: &ModelFiles) -> String {
    // `…/models--ORG--NAME/snapshots/REV` → `ORG/NAME`
    let mut comps = files
        .dir
        .components()
        .rev()
        .map(|c| c.as_os_str().to_string_lossy());
    let last = comps.next().unwrap_or_default().into_owned();
    if comps.next().as_deref() == Some("snapshots")
        && let Some(repo) = comps.next()
        && let Some(rest) = repo.strip_prefix("models--")
    {
        return rest.replacen("--", "/", 1);
    }
    last
}

/// A model whose files were checked — config, tokenizer and the weights' headers (mapped, not
/// read) — and that can now be loaded. Preparing is cheap, so a caller can check a model before
/// giving up the one it has.
pub struct PreparedModel {
    files: ModelFiles,
    config: FamilyConfig,
    tokenizer: Tokenizer,
    weights: Weights,
    dtype: DType,
}

enum FamilyConfig {
    Gpt2(gpt2::Config),
}

/// Checks everything about the model at `path` that can be checked without reading its weights.
pub fn prepare(path: &Path, device: &Device) -> Result<PreparedModel> {
    let files = resolve(path)?;
    let (arch, config_value) = detect_architecture(&files.config)?;
    let bad_config = |message: String| Error::BadConfig {
        path: files.config.clone(),
        message,
    };
    let config = match arch {
        Architecture::Gpt2 => {
            let cfg: gpt2::Config =
                serde_json::from_value(config_value).map_err(|e| bad_config(e.to_string()))?;
            cfg.validate().map_err(bad_config)?;
            FamilyConfig::Gpt2(cfg)
        }
    };
    let tokenizer = Tokenizer::from_file(&files.tokenizer)?;
    let FamilyConfig::Gpt2(cfg) = &config;
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(Error::Tokenizer(format!(
            "tokenizer.json has {} tokens but the model only {}: they do not belong together",
            tokenizer.vocab_size(),
            cfg.vocab_size
        )));
    }
    let dtype = DType::F32;
    let weights = Weights::open(&files.weights, device, dtype)?;
    Ok(PreparedModel {
        files,
        config,
        tokenizer,
        weights,
        dtype,
    })
}

impl PreparedModel {
    /// Reads the weights. `progress(fraction, message)` reports loading.
    pub fn load(self, progress: &mut dyn FnMut(f32, &str)) -> Result<LoadedModel> {
        let Self {
            files,
            config,
            tokenizer,
            weights,
            dtype,
        } = self;
        match config {
            FamilyConfig::Gpt2(cfg) => {
                let model =
                    gpt2::Gpt2::load(&cfg, &weights, &mut |f| progress(f, "loading weights"))?;
                let eos = cfg
                    .eos_token_id
                    .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
                    .into_iter()
                    .collect();
                let info = ModelInfo {
                    name: display_name(&files),
                    path: files.dir.clone(),
                    architecture: Architecture::Gpt2,
                    context_length: cfg.context_length(),
                    vocab_size: cfg.vocab_size,
                    parameters: count_parameters(&cfg),
                    dtype: format!("{dtype:?}").to_lowercase(),
                    chat_format: crate::chat::PLAIN_TRANSCRIPT_NAME.to_owned(),
                };
                Ok(LoadedModel {
                    model: Box::new(model),
                    tokenizer,
                    info,
                    eos_token_ids: eos,
                })
            }
        }
    }
}

/// Loads the model at `path` onto `device`. `progress(fraction, message)` reports loading.
pub fn load(
    path: &Path,
    device: &Device,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<LoadedModel> {
    progress(0.0, "checking files");
    prepare(path, device)?.load(progress)
}

fn count_parameters(cfg: &gpt2::Config) -> usize {
    let c = cfg.n_embd;
    let inner = cfg.n_inner.unwrap_or(4 * c);
    let per_layer =
        4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * inner + inner) + (inner * c + c);
    cfg.vocab_size * c + cfg.context_length() * c + cfg.n_layer * per_layer + 2 * c
}
