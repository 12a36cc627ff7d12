//! Sentence embeddings from `sentence-transformers` folders of BERT-family encoders (all-MiniLM,
//! bge, e5, nomic-embed-text, …) and of decoders (Qwen3-Embedding, gte-Qwen2): the encoder
//! (candle's `BertModel`, in the published tensor names, `bert.` prefixed or not; NomicBERT,
//! [`nomic`]; a Qwen2 or Qwen3 decoder, `model.` prefixed or not), the pooling the folder's `1_Pooling/config.json` names (mean, CLS, max,
//! last token, mean / √length) and the L2 normalisation of its `Normalize` module, as
//! `SentenceTransformer.encode` computes them.
//!
//! Both layouts sentence-transformers writes are read: the published 2.x files
//! (`pooling_mode_mean_tokens: true`, `max_seq_length` in `sentence_bert_config.json`) and
//! 5.x/6.x ones (`pooling_mode: "mean"`, `model_max_length` in `tokenizer_config.json`). A
//! text is never cut short: one longer than the model's sequence length is an
//! [`Error::PromptTooLong`] with its token count. Checked against sentence-transformers
//! (`tests/fixtures/sentence_embeddings`, `tools/make_sentence_embedding_fixture.py`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, HiddenAct, PositionEmbeddingType};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::weights::{ReleasingMmap, open_checkpoint};

mod nomic;

use crate::models::family::Family;
use crate::models::hf::FamilyConfig;

/// The largest JSON file read from a model folder.
const MAX_JSON: u64 = 1 << 20;
/// The largest `tokenizer.json` read.
const MAX_TOKENIZER: u64 = 64 << 20;

/// How token vectors become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean of the tokens' vectors.
    Mean,
    /// The first (`[CLS]`) token's.
    Cls,
    /// The element-wise maximum.
    Max,
    /// The last token's (decoder embedding models).
    LastToken,
    /// The sum over √(token count).
    MeanSqrtLen,
}

impl Pooling {
    /// The name sentence-transformers gives it.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
            Pooling::LastToken => "lasttoken",
            Pooling::MeanSqrtLen => "mean_sqrt_len_tokens",
        }
    }
}

/// What an embedding model is.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingInfo {
    /// The folder's name.
    pub name: String,
    /// The folder.
    pub path: PathBuf,
    /// Length of each embedding.
    pub dimensions: usize,
    /// The most tokens one input may have (special tokens included).
    pub max_tokens: usize,
    /// How token vectors are pooled.
    pub pooling: Pooling,
    /// Whether embeddings are scaled to length 1.
    pub normalize: bool,
}

/// The encoder of an embedding model.
enum Encoder {
    Bert(Box<BertModel>),
    Nomic(nomic::NomicBert),
    /// A causal decoder; it keeps a KV cache while it runs, so one text at a time.
    Decoder(std::sync::Mutex<crate::models::hf::Decoder>),
}

/// A loaded sentence-embedding model.
pub struct EmbeddingModel {
    info: EmbeddingInfo,
    encoder: Encoder,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
}

impl std::fmt::Debug for EmbeddingModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Whether `dir` looks like a sentence-transformers folder (`modules.json`).
pub fn is_embedding_model(dir: &Path) -> bool {
    dir.join("modules.json").is_file() && dir.join("config.json").is_file()
}

fn read_json(path: &Path) -> Result<Value> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > MAX_JSON {
        return Err(Error::BadConfig {
            path: path.to_owned(),
            message: format!("{} bytes; at most {MAX_JSON}", meta.len()),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A config value as a size in `1..=max`, or an error naming it.
fn size(
    config: &Value,
    path: &Path,
    key: &str,
    default: Option<usize>,
    max: usize,
) -> Result<usize> {
    let bad = |message: String| Error::BadConfig {
        path: path.to_owned(),
        message,
    };
    let v = match config.get(key).and_then(Value::as_u64) {
        Some(v) => usize::try_from(v).unwrap_or(usize::MAX),
        None => default.ok_or_else(|| bad(format!("`{key}` is missing")))?,
    };
    if !(1..=max).contains(&v) {
        return Err(bad(format!("`{key}` is {v}; Studio accepts 1 to {max}")));
    }
    Ok(v)
}

/// The modules of `modules.json`: the pooling folder and whether it normalises; other modules
/// (a `Dense` projection, …) are refused by name.
fn read_modules(dir: &Path) -> Result<(Option<PathBuf>, bool)> {
    let path = dir.join("modules.json");
    let modules = read_json(&path)?;
    let list = modules.as_array().ok_or_else(|| Error::BadConfig {
        path: path.clone(),
        message: "not a list of modules".into(),
    })?;
    let mut pooling = None;
    let mut normalize = false;
    for m in list {
        let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
        let short = kind.rsplit('.').next().unwrap_or(kind);
        match short {
            "Transformer" => {}
            "Pooling" => {
                let sub = m.get("path").and_then(Value::as_str).unwrap_or("1_Pooling");
                if sub.contains("..") || Path::new(sub).is_absolute() {
                    return Err(Error::BadConfig {
                        path: path.clone(),
                        message: format!("the pooling module's path `{sub}` leaves the folder"),
                    });
                }
                pooling = Some(dir.join(sub));
            }
            "Normalize" => normalize = true,
            other => {
                return Err(Error::InvalidModel {
                    path: path.clone(),
                    message: format!(
                        "its `{other}` module is not one Studio runs (it runs Transformer, \
                         Pooling and Normalize)"
                    ),
                });
            }
        }
    }
    Ok((pooling, normalize))
}

fn read_pooling(dir: Option<&Path>) -> Result<Pooling> {
    let Some(dir) = dir else {
        // sentence-transformers' default for a bare Transformer.
        return Ok(Pooling::Mean);
    };
    let path = dir.join("config.json");
    let config = read_json(&path)?;
    if let Some(mode) = config.get("pooling_mode").and_then(Value::as_str) {
        return match mode {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            "max" => Ok(Pooling::Max),
            "lasttoken" => Ok(Pooling::LastToken),
            "mean_sqrt_len_tokens" => Ok(Pooling::MeanSqrtLen),
            other => Err(Error::InvalidModel {
                path,
                message: format!("pooling mode `{other}` is not one Studio runs"),
            }),
        };
    }
    let on = |k: &str| config.get(k).and_then(Value::as_bool) == Some(true);
    let modes: Vec<Pooling> = [
        ("pooling_mode_cls_token", Pooling::Cls),
        ("pooling_mode_mean_tokens", Pooling::Mean),
        ("pooling_mode_max_tokens", Pooling::Max),
        ("pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
        ("pooling_mode_lasttoken", Pooling::LastToken),
    ]
    .into_iter()
    .filter(|(k, _)| on(k))
    .map(|(_, p)| p)
    .collect();
    match modes[..] {
        [one] => Ok(one),
        [] => Err(Error::InvalidModel {
            path,
            message: "no pooling mode is switched on".into(),
        }),
        _ => Err(Error::InvalidModel {
            path,
            message: "several pooling modes at once (their concatenation) are not supported".into(),
        }),
    }
}

/// Loads a sentence-transformers folder of a BERT-family encoder onto `device`.
pub fn load(dir: &Path, device: &Device) -> Result<EmbeddingModel> {
    if !dir.is_dir() {
        return Err(Error::NotFound(dir.to_owned()));
    }
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let (kind, dimensions, positions) = if nomic::is_nomic(&config) {
        let c = nomic::NomicConfig::read(&config, &config_path)?;
        let (hidden, positions) = (c.hidden, c.positions);
        (Kind::Nomic(c), hidden, positions)
    } else if model_type == "bert" {
        let c = bert_config(&config, &config_path)?;
        let (hidden, positions) = (c.hidden_size, c.max_position_embeddings);
        (Kind::Bert(c), hidden, positions)
    } else if let Some(family @ (Family::Qwen2 | Family::Qwen3)) =
        Family::from_model_type(model_type)
    {
        let c = FamilyConfig::parse(family, &config).map_err(|message| Error::BadConfig {
            path: config_path.clone(),
            message,
        })?;
        let hidden = config
            .get("hidden_size")
            .and_then(Value::as_u64)
            .and_then(|h| usize::try_from(h).ok())
            .unwrap_or_default();
        let positions = c.context_length;
        (Kind::Decoder(Box::new(c)), hidden, positions)
    } else {
        // RoBERTa's positions start after the padding index: not candle's BERT.
        return Err(Error::UnsupportedArchitecture(
            format!("{model_type} (as an embedding model)"),
            "BERT sentence-transformers models (all-MiniLM, bge, e5, …), NomicBERT \
             (nomic-embed-text v1, v1.5) and Qwen2/Qwen3 decoders (Qwen3-Embedding, gte-Qwen2)"
                .into(),
        ));
    };
    let (pooling_dir, normalize) = read_modules(dir)?;
    let pooling = read_pooling(pooling_dir.as_deref())?;
    // The sequence length: sentence-transformers' own setting, else the tokenizer's, at most
    // the model's positions.
    let st = read_json_if_exists(&dir.join("sentence_bert_config.json"))?;
    let tok_config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
    let max_tokens = st
        .as_ref()
        .and_then(|c| c.get("max_seq_length"))
        .or_else(|| tok_config.as_ref().and_then(|c| c.get("model_max_length")))
        .and_then(Value::as_u64)
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(positions)
        .clamp(1, positions);

    let tok_path = dir.join("tokenizer.json");
    let meta = std::fs::metadata(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
    if meta.len() > MAX_TOKENIZER {
        return Err(Error::Tokenizer(format!(
            "{}: {} bytes; at most {MAX_TOKENIZER}",
            tok_path.display(),
            meta.len()
        )));
    }
    let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    // Texts are never cut short or padded: too long is an error, one text at a time.
    tokenizer
        .with_truncation(None)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    tokenizer.with_padding(None);

    let weights = ["model.safetensors", "pytorch_model.bin"]
        .into_iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::InvalidModel {
            path: dir.to_owned(),
            message: "no model.safetensors (or pytorch_model.bin) in the folder".into(),
        })?;
    let tensors = open_checkpoint(std::slice::from_ref(&weights))?;
    // Decoders saved without their head (Qwen3-Embedding) name tensors without `model.`.
    let unprefixed = {
        use candle_nn::var_builder::SimpleBackend as _;
        !tensors.contains_tensor("model.embed_tokens.weight")
            && tensors.contains_tensor("embed_tokens.weight")
    };
    let vb = VarBuilder::from_backend(Box::new(ReleasingMmap(tensors)), DType::F32, device.clone());
    let wrong = |what: &str, e: candle_core::Error| Error::InvalidModel {
        path: weights.clone(),
        message: format!("not the {what} encoder its config.json describes: {e}"),
    };
    let encoder = match &kind {
        Kind::Bert(c) => Encoder::Bert(Box::new(
            BertModel::load(vb, c).map_err(|e| wrong("BERT", e))?,
        )),
        Kind::Nomic(c) => {
            Encoder::Nomic(nomic::NomicBert::load(&vb, c).map_err(|e| wrong("NomicBERT", e))?)
        }
        Kind::Decoder(c) => {
            let vb = if unprefixed {
                vb.rename_f(|name| name.strip_prefix("model.").unwrap_or(name).to_owned())
            } else {
                vb
            };
            let decoder = c.decoder(vb).map_err(|e| match e {
                Error::Candle(e) => wrong("decoder", e),
                other => other,
            })?;
            Encoder::Decoder(std::sync::Mutex::new(decoder))
        }
    };
    Ok(EmbeddingModel {
        info: EmbeddingInfo {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: dir.to_owned(),
            dimensions,
            max_tokens,
            pooling,
            normalize,
        },
        encoder,
        tokenizer,
        device: device.clone(),
    })
}

/// What `config.json` describes.
enum Kind {
    Bert(Config),
    Nomic(nomic::NomicConfig),
    Decoder(Box<FamilyConfig>),
}

/// candle's BERT config from a BERT `config.json`.
fn bert_config(config: &Value, config_path: &Path) -> Result<Config> {
    let config_path = config_path.to_owned();
    let hidden = size(config, &config_path, "hidden_size", None, 8192)?;
    let heads = size(config, &config_path, "num_attention_heads", None, 256)?;
    if hidden % heads != 0 {
        return Err(Error::BadConfig {
            path: config_path,
            message: format!("{heads} heads do not divide the hidden size {hidden}"),
        });
    }
    let positions = size(
        config,
        &config_path,
        "max_position_embeddings",
        Some(512),
        1 << 17,
    )?;
    let act = match config
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu")
    {
        "gelu" => HiddenAct::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => HiddenAct::GeluApproximate,
        "relu" => HiddenAct::Relu,
        other => {
            return Err(Error::BadConfig {
                path: config_path,
                message: format!("activation `{other}` is not supported"),
            });
        }
    };
    let bert_config = Config {
        vocab_size: size(config, &config_path, "vocab_size", None, 1 << 20)?,
        hidden_size: hidden,
        num_hidden_layers: size(config, &config_path, "num_hidden_layers", None, 256)?,
        num_attention_heads: heads,
        intermediate_size: size(config, &config_path, "intermediate_size", None, 1 << 16)?,
        hidden_act: act,
        hidden_dropout_prob: 0.0,
        max_position_embeddings: positions,
        type_vocab_size: size(config, &config_path, "type_vocab_size", Some(2), 16)?,
        initializer_range: 0.02,
        layer_norm_eps: config
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .filter(|e| *e > 0.0 && *e < 1.0)
            .unwrap_or(1e-12),
        pad_token_id: 0,
        position_embedding_type: PositionEmbeddingType::Absolute,
        use_cache: false,
        classifier_dropout: None,
        model_type: Some("bert".to_owned()),
    };
    Ok(bert_config)
}

impl EmbeddingModel {
    /// What was loaded.
    pub fn info(&self) -> &EmbeddingInfo {
        &self.info
    }

    /// The token ids of `text`, special tokens added as the model expects.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The embedding of `text`; [`Error::PromptTooLong`] when it has more tokens than the
    /// model takes.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        self.embed_tokens(&self.tokenize(text)?)
    }

    /// The embedding of token ids (special tokens included).
    pub fn embed_tokens(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if ids.len() > self.info.max_tokens {
            return Err(Error::PromptTooLong {
                tokens: ids.len(),
                context: self.info.max_tokens,
            });
        }
        let vocab = self.tokenizer.get_vocab_size(true);
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidParameter(format!(
                "token id {bad} is not in the model's vocabulary of {vocab}"
            )));
        }
        let n = ids.len();
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let types = input.zeros_like()?;
        let hidden = match &self.encoder {
            Encoder::Bert(bert) => bert.forward(&input, &types, None)?.squeeze(0)?,
            Encoder::Nomic(nomic) => nomic.forward(&input.squeeze(0)?)?,
            Encoder::Decoder(decoder) => decoder
                .lock()
                .map_err(|_| Error::InvalidParameter("an earlier embedding panicked".into()))?
                .hidden_states(ids, &self.device)?,
        }; // (n, d)
        // Lengths are bounded by max_tokens, far inside f64's exact range.
        #[allow(clippy::cast_precision_loss)]
        let count = n as f64;
        let pooled = match self.info.pooling {
            Pooling::Mean => (hidden.sum(0)? / count)?,
            Pooling::MeanSqrtLen => (hidden.sum(0)? / count.sqrt())?,
            Pooling::Cls => hidden.get(0)?,
            Pooling::LastToken => hidden.get(n - 1)?,
            Pooling::Max => hidden.max(0)?,
        };
        let mut v = pooled.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if self.info.normalize {
            normalize(&mut v);
        }
        Ok(v)
    }
}

/// Scales `v` to length 1 as sentence-transformers' `F.normalize` does: divided by
/// `max(‖v‖, 1e-12)`.
pub fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    for x in v {
        // f32 in, f32 out.
        #[allow(clippy::cast_possible_truncation)]
        let scaled = (f64::from(*x) / norm) as f32;
        *x = scaled;
    }
}
