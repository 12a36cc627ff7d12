//! Finding a model's files, refusing unsafe ones, detecting the architecture from the files
//! themselves, and loading the right model family.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::llm::chat::ChatFormat;
use crate::llm::gguf;
use crate::llm::template::ChatTemplate;
use crate::llm::text::Tokenizer;
use crate::models::family::{self, Family};
use crate::models::hf::{self, FamilyConfig};
use crate::models::{CausalLm, gpt2};
use crate::weights::Weights;

/// Architectures this build can load, for error messages and the Models panel.
pub fn supported_architectures() -> &'static str {
    static TEXT: LazyLock<String> = LazyLock::new(|| {
        let ggufs: Vec<&str> = Family::all().map(Family::label).collect();
        format!(
            "GPT-2 (gpt2 … gpt2-xl, distilgpt2), {} from Hugging Face folders with \
             safetensors weights, and GGUF files of {}",
            family::supported_hf(),
            ggufs.join(", ")
        )
    });
    &TEXT
}

/// Extensions of Python pickle checkpoints, which are never loaded.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl", "pickle"];

/// A supported model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// OpenAI's GPT-2 and its variants (distilgpt2 included), from a Hugging Face folder.
    Gpt2,
    /// A family from [`crate::models::family`], from a Hugging Face folder or a GGUF file.
    Family(Family),
    /// A model served by an OpenAI-compatible server (see [`crate::llm::remote`]).
    Remote,
}

impl Architecture {
    /// The name the UI shows, such as "GPT-2".
    pub fn label(self) -> &'static str {
        match self {
            Architecture::Gpt2 => "GPT-2",
            Architecture::Family(f) => f.label(),
            Architecture::Remote => "Remote (OpenAI-compatible)",
        }
    }
}

/// The files of one model on disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The model's folder (for a GGUF file, the folder holding it).
    pub dir: PathBuf,
    /// `config.json` (for a GGUF file, the file itself).
    pub config: PathBuf,
    /// The safetensors file, or shards, holding the weights (for a GGUF file, the file itself).
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json` in the folder (for a GGUF file, the file itself).
    pub tokenizer: PathBuf,
}

/// What the UI shows about a loaded model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Display name: the GGUF `general.name`, a Hugging Face cache's `ORG/NAME`, a server's
    /// model id, else the file or folder name.
    pub name: String,
    /// Where the model was loaded from: its folder, GGUF file, or server address.
    pub path: PathBuf,
    /// Which implementation runs it.
    pub architecture: Architecture,
    /// Context window in tokens.
    pub context_length: usize,
    /// Size of the vocabulary, the model's logits (0 for a remote model).
    pub vocab_size: usize,
    /// Number of parameters (0 for a remote model).
    pub parameters: usize,
    /// How the weights are stored, such as `f32`, `bf16` or `GGUF Q4_K_M`.
    pub dtype: String,
    /// How chat turns are turned into a prompt for this model.
    pub chat_format: String,
    /// Things worth telling the user about this model (approximations, caps).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A model ready to generate: the network, its tokenizer and its description.
pub struct LoadedModel {
    /// The network.
    pub model: Box<dyn CausalLm>,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// What the UI shows about it.
    pub info: ModelInfo,
    /// Token ids that end generation (the model's end-of-text).
    pub eos_token_ids: Vec<u32>,
    /// How conversations become prompts: the model's own template, else the plain transcript.
    pub chat: ChatFormat,
}

impl LoadedModel {
    /// The prompt for the next reply in this model's chat format, fitted to its context
    /// ([`crate::llm::chat::build_chat_prompt`]).
    pub fn chat_prompt(
        &self,
        system: &str,
        messages: &[crate::llm::chat::ChatMessage],
        reserve: usize,
    ) -> Result<crate::llm::chat::ChatPrompt> {
        crate::llm::chat::build_chat_prompt(
            &self.tokenizer,
            &self.chat,
            self.model.context_length(),
            system,
            messages,
            reserve,
        )
    }

    /// The next reply's prompt, sampling parameters and end ids in this model's chat format
    /// ([`Self::chat_prompt`] then [`crate::llm::chat::ChatPrompt::into_reply`]), with
    /// `params.max_new_tokens` reserved for the reply.
    pub fn chat_reply(
        &self,
        system: &str,
        messages: &[crate::llm::chat::ChatMessage],
        params: crate::llm::sampling::SamplingParams,
    ) -> Result<crate::llm::chat::ChatReply> {
        use crate::llm::chat::ChatFormat;
        // Tools are shown through the model's own template, never a made-up section.
        let format = match (&params.tools, &self.chat) {
            (None, _) => self.chat.clone(),
            (Some(tools), ChatFormat::Template(t)) if t.takes_tools() => {
                ChatFormat::Template(t.with_tools(tools.clone()))
            }
            (Some(_), _) => {
                return Err(Error::InvalidParameter(
                    "this model's chat template has no tool section, so it can't be offered \
                     tools (Qwen2.5, Llama 3.1 and Mistral models can)"
                        .into(),
                ));
            }
        };
        let prompt = crate::llm::chat::build_chat_prompt(
            &self.tokenizer,
            &format,
            self.model.context_length(),
            system,
            messages,
            params.max_new_tokens,
        )?;
        Ok(prompt.into_reply(params, &self.eos_token_ids))
    }
}

impl LoadedModel {
    /// An embedding of `tokens` from this (chat) model: its final hidden states, pooled as
    /// its file says (a GGUF's `pooling_type`: mean, first or last token; the mean when it
    /// says nothing) and scaled to length 1, as llama.cpp's server gives them. Models that
    /// give no hidden states say so ([`crate::models::CausalLm::hidden_states`]), and so
    /// does a reranker.
    pub fn embed_tokens(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        use crate::embed::Pooling;
        let pooling = self.model.embedding_pooling()?;
        let hidden = self.model.hidden_states(tokens)?;
        let pooled = match pooling {
            Pooling::Cls => hidden.get(0)?,
            Pooling::LastToken => hidden.get(tokens.len() - 1)?,
            Pooling::Max => hidden.max(0)?,
            Pooling::Mean | Pooling::MeanSqrtLen => hidden.mean(0)?,
        };
        let mut v = pooled.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        crate::embed::normalize(&mut v);
        Ok(v)
    }
}

/// Whether `path` is a llama.cpp GGUF file (by extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Whether `path` is a Python pickle checkpoint, by extension (`.bin`, `.pt`, `.pth`, `.ckpt`,
/// `.pkl`, `.pickle`).
pub fn is_pickle(path: &Path) -> bool {
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
/// Weights are `model.safetensors` (or its shards), else transformers' `pytorch_model.bin`
/// (or its shards), which Studio's own pickle reader reads as data.
pub fn resolve(path: &Path) -> Result<ModelFiles> {
    if !path.exists() {
        return Err(Error::NotFound(path.to_path_buf()));
    }
    if path.is_file() {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if is_gguf(path) {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Ok(ModelFiles {
                dir,
                config: path.to_path_buf(),
                weights: vec![path.to_path_buf()],
                tokenizer: path.to_path_buf(),
            });
        }
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut files = resolve_dir(&dir)?;
        if ext.eq_ignore_ascii_case("safetensors") || is_pickle(path) {
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
    let pickle = dir.join("pytorch_model.bin");
    let pickle_index = dir.join("pytorch_model.bin.index.json");
    let weights = if single.exists() {
        vec![single]
    } else if index.exists() {
        shards_from_index(&index, "safetensors")?
    } else if pickle.exists() {
        vec![pickle]
    } else if pickle_index.exists() {
        shards_from_index(&pickle_index, "bin")?
    } else {
        return Err(Error::NoModel(dir.to_path_buf()));
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

/// The shards an index names (`extension`: `safetensors`, or `bin` for
/// `pytorch_model.bin.index.json`).
fn shards_from_index(index: &Path, extension: &str) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::CorruptWeights {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    shard_files(index, parsed.weight_map.values(), extension)
}

/// The shard files an index (`*.safetensors.index.json`, `pytorch_model.bin.index.json`)
/// names, beside it. A name that is not a plain file name in the index's folder with the
/// index's kind of weights (`../x`, an absolute path, a subfolder, another kind of file) is
/// refused before anything is opened.
pub(crate) fn shard_files<'a>(
    index: &Path,
    names: impl Iterator<Item = &'a String>,
    extension: &str,
) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    for name in names {
        let mut parts = Path::new(name).components();
        let plain = matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(_)), None)
        );
        let kind_ok = Path::new(name)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case(extension));
        if !plain || !kind_ok {
            return Err(Error::CorruptWeights {
                path: index.to_path_buf(),
                message: format!(
                    "the index names `{name}`, which is not a .{extension} file in the \
                     model's folder; refused"
                ),
            });
        }
        files.push(dir.join(name));
    }
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
    if let Some(family) = model_type.and_then(Family::from_model_type) {
        return Ok((Architecture::Family(family), value));
    }
    let name = model_type
        .map(str::to_owned)
        .or_else(|| architectures.first().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown (config.json has no model_type)".to_owned());
    Err(Error::UnsupportedArchitecture(
        name,
        supported_architectures().to_owned(),
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
    config: Config,
    tokenizer: Tokenizer,
    weights: Weights,
    dtype: DType,
    eos_token_ids: Vec<u32>,
    chat: ChatFormat,
}

enum Config {
    Gpt2(gpt2::Config),
    Family(FamilyConfig),
}

/// What `prepare` checked: a Hugging Face folder or a GGUF file.
enum Prepared {
    Folder(Box<PreparedModel>),
    /// A GGUF file whose header and metadata were checked (nothing else is read).
    Gguf(PathBuf),
}

/// The dtype weights are computed in: f32 on the CPU (candle's fastest CPU path), bf16 on GPUs
/// (the dtype of today's checkpoints), f32 for GPT-2 everywhere.
fn compute_dtype(arch: Architecture, device: &Device) -> DType {
    match (arch, device) {
        (Architecture::Family(_), Device::Cuda(_) | Device::Metal(_)) => DType::BF16,
        _ => DType::F32,
    }
}

/// End-of-text ids: `generation_config.json`'s `eos_token_id` (a number or a list), then
/// `config.json`'s, then the tokenizer's `eos_token` from `tokenizer_config.json`, then
/// well-known end tokens present in the vocabulary.
fn eos_token_ids(dir: &Path, config: &serde_json::Value, tokenizer: &Tokenizer) -> Vec<u32> {
    let read = |name: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        serde_json::from_str(&text).ok()
    };
    let mut ids = read("generation_config.json")
        .map(|g| hf::token_ids(g.get("eos_token_id")))
        .unwrap_or_default();
    for id in hf::token_ids(config.get("eos_token_id")) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    if let Some(tc) = read("tokenizer_config.json") {
        let eos = tc.get("eos_token");
        let name = eos.and_then(serde_json::Value::as_str).or_else(|| {
            eos.and_then(|e| e.get("content"))
                .and_then(serde_json::Value::as_str)
        });
        if let Some(id) = name.and_then(|n| tokenizer.token_to_id(n))
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        ids.extend(
            [
                "<|endoftext|>",
                "</s>",
                "<|im_end|>",
                "<|eot_id|>",
                "<end_of_turn>",
                "<|end|>",
            ]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t)),
        );
    }
    ids
}

/// A model checked by [`prepare`] and ready to [`Checked::load`].
pub struct Checked(Prepared);

/// Checks everything about the model at `path` that can be checked without reading its weights
/// (a folder's config, tokenizer and weight headers; a GGUF file's header and metadata).
///
/// On the CPU, a model whose weights would not fit in the machine's memory is refused with the
/// estimate ([`Error::ModelTooLarge`]) before anything is read.
pub fn prepare(path: &Path, device: &Device) -> Result<Checked> {
    if path.is_file() && is_gguf(path) {
        gguf::inspect(path)?;
        // Quantized blocks are kept as stored: about the file's size.
        let bytes = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        check_memory(path, device, bytes, "its weights as stored in the file")?;
        return Ok(Checked(Prepared::Gguf(path.to_path_buf())));
    }
    let prepared = prepare_folder(path, device)?;
    let bytes = (prepared.weights.parameter_count() as u64)
        .saturating_mul(prepared.dtype.size_in_bytes() as u64);
    check_memory(
        path,
        device,
        bytes,
        &format!(
            "{} parameters as {:?}",
            prepared.weights.parameter_count(),
            prepared.dtype
        ),
    )?;
    Ok(Checked(Prepared::Folder(Box::new(prepared))))
}

/// Refuses, on the CPU, weights of `bytes` (plus a tenth for the working set) beyond the
/// machine's memory. GPU memory is not known here: an allocation there fails with an error.
fn check_memory(path: &Path, device: &Device, bytes: u64, what: &str) -> Result<()> {
    if !device.is_cpu() {
        return Ok(());
    }
    let Some(total) = crate::sys::total_memory_bytes() else {
        return Ok(());
    };
    fits_in_memory(path, bytes, what, total)
}

/// `check_memory`'s rule, for a given machine.
pub fn fits_in_memory(path: &Path, bytes: u64, what: &str, total: u64) -> Result<()> {
    let needed = bytes.saturating_add(bytes / 10);
    if needed <= total {
        return Ok(());
    }
    Err(Error::ModelTooLarge {
        path: path.to_path_buf(),
        what: what.to_owned(),
        needed,
        total,
    })
}

impl Checked {
    /// Reads the weights. `progress(fraction, message)` reports loading.
    pub fn load(self, device: &Device, progress: &mut dyn FnMut(f32, &str)) -> Result<LoadedModel> {
        match self.0 {
            Prepared::Folder(p) => p.load(progress),
            Prepared::Gguf(path) => load_gguf(&path, device, progress),
        }
    }
}

/// The family of a GGUF file `gguf::inspect` accepted.
fn gguf_architecture(path: &Path, name: &str) -> Result<Architecture> {
    Family::from_gguf_architecture(name)
        .map(Architecture::Family)
        .ok_or_else(|| {
            Error::UnsupportedArchitecture(
                format!("`{name}` ({})", path.display()),
                family::supported_gguf().to_owned(),
            )
        })
}

fn load_gguf(
    path: &Path,
    device: &Device,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<LoadedModel> {
    let gguf::GgufModel {
        model,
        tokenizer,
        info,
    } = gguf::load(path, device, progress)?;
    let chat = ChatFormat::from_model_template(
        info.chat_template
            .as_deref()
            .map(|source| {
                ChatTemplate::new(source, info.bos_token.as_deref(), info.eos_token.as_deref())
                    .map(|t| t.with_origin(&format!("the chat template in {}", path.display())))
            })
            .transpose(),
    );
    let name = info.name.clone().unwrap_or_else(|| {
        path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        )
    });
    let model_info = ModelInfo {
        name,
        path: path.to_path_buf(),
        architecture: gguf_architecture(path, &info.architecture)?,
        context_length: model.context_length(),
        vocab_size: info.vocab_size,
        parameters: info.parameters,
        dtype: format!("GGUF {}", info.file_type),
        chat_format: chat.name(),
        notes: info.warnings.clone(),
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        info: model_info,
        eos_token_ids: info.eos_token_ids,
        chat,
    })
}

/// Checks a Hugging Face folder without reading its weights.
fn prepare_folder(path: &Path, device: &Device) -> Result<PreparedModel> {
    let files = resolve(path)?;
    let (arch, config_value) = detect_architecture(&files.config)?;
    let bad_config = |message: String| Error::BadConfig {
        path: files.config.clone(),
        message,
    };
    let (config, vocab_size) = match arch {
        Architecture::Gpt2 => {
            let cfg: gpt2::Config = serde_json::from_value(config_value.clone())
                .map_err(|e| bad_config(e.to_string()))?;
            cfg.validate().map_err(bad_config)?;
            let vocab = cfg.vocab_size;
            (Config::Gpt2(cfg), vocab)
        }
        Architecture::Family(family) => {
            let cfg = FamilyConfig::parse(family, &config_value).map_err(bad_config)?;
            let vocab = cfg.vocab_size;
            (Config::Family(cfg), vocab)
        }
        // Never detected from files: remote models come from `remote::RemoteBackend`.
        Architecture::Remote => {
            return Err(Error::UnsupportedArchitecture(
                "remote".to_owned(),
                supported_architectures().to_owned(),
            ));
        }
    };
    let tokenizer = Tokenizer::from_file(&files.tokenizer)?;
    if tokenizer.vocab_size() > vocab_size {
        return Err(Error::Tokenizer(format!(
            "tokenizer.json has {} tokens but the model only {vocab_size}: they do not belong together",
            tokenizer.vocab_size(),
        )));
    }
    let dtype = compute_dtype(arch, device);
    let weights = Weights::open(&files.weights, device, dtype)?;
    let eos_token_ids = eos_token_ids(&files.dir, &config_value, &tokenizer);
    // A template that does not compile is reported in the chat format's name, and the plain
    // transcript is used: the model still loads.
    let chat = ChatFormat::from_model_template(ChatTemplate::from_model_dir(&files.dir));
    Ok(PreparedModel {
        files,
        config,
        tokenizer,
        weights,
        dtype,
        eos_token_ids,
        chat,
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
            eos_token_ids,
            chat,
        } = self;
        let (model, architecture, context_length, vocab_size, parameters): (
            Box<dyn CausalLm>,
            _,
            _,
            _,
            _,
        ) = match config {
            Config::Gpt2(cfg) => {
                let model =
                    gpt2::Gpt2::load(&cfg, &weights, &mut |f| progress(f, "loading weights"))?;
                let n = count_parameters(&cfg);
                let ctx = cfg.context_length();
                (Box::new(model), Architecture::Gpt2, ctx, cfg.vocab_size, n)
            }
            Config::Family(cfg) => {
                cfg.check_layers(weights.names())
                    .map_err(|message| Error::BadConfig {
                        path: files.config.clone(),
                        message,
                    })?;
                progress(0.1, "loading weights");
                let parameters = weights.parameter_count();
                let device = weights.device().clone();
                drop(weights);
                let model = cfg.load(&files.weights, &device, dtype)?;
                progress(1.0, "loading weights");
                (
                    Box::new(model),
                    Architecture::Family(cfg.family),
                    cfg.context_length,
                    cfg.vocab_size,
                    parameters,
                )
            }
        };
        let info = ModelInfo {
            name: display_name(&files),
            path: files.dir.clone(),
            architecture,
            context_length,
            vocab_size,
            parameters,
            dtype: format!("{dtype:?}").to_lowercase(),
            chat_format: chat.name(),
            notes: if files.weights.iter().any(|w| is_pickle(w)) {
                vec![crate::pickle::SAFE_MODE_NOTE.to_owned()]
            } else {
                Vec::new()
            },
        };
        Ok(LoadedModel {
            model,
            tokenizer,
            info,
            eos_token_ids,
            chat,
        })
    }
}

/// Loads the model at `path` onto `device`. `progress(fraction, message)` reports loading.
pub fn load(
    path: &Path,
    device: &Device,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<LoadedModel> {
    progress(0.0, "checking files");
    prepare(path, device)?.load(device, progress)
}

fn count_parameters(cfg: &gpt2::Config) -> usize {
    let c = cfg.n_embd;
    let inner = cfg.n_inner.unwrap_or(4 * c);
    let per_layer =
        4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * inner + inner) + (inner * c + c);
    cfg.vocab_size * c + cfg.context_length() * c + cfg.n_layer * per_layer + 2 * c
}
