//! The error type of the inference crate: every failure a person can act on.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong loading a model or running a job.
///
/// Messages are written for the person using Studio: they say what was wrong and, where
/// possible, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}: no such file or folder")]
    NotFound(PathBuf),

    #[error(
        "{0}: this is a Python pickle checkpoint, which can run arbitrary code when loaded; \
         Studio never unpickles files. Convert it to .safetensors first (language and \
         diffusion models: the `safetensors` convert script; NVIDIA StyleGAN .pkl: \
         tools/convert_stylegan_pkl.py) and open that instead."
    )]
    UnsafePickle(PathBuf),

    #[error("{path}: config.json does not parse: {message}")]
    BadConfig { path: PathBuf, message: String },

    #[error("unsupported model architecture `{0}`; this version of Studio loads: {1}")]
    UnsupportedArchitecture(String, String),

    #[error("{path}: the weights file is corrupt or truncated: {message}")]
    CorruptWeights { path: PathBuf, message: String },

    #[error("{path}: missing tensor `{name}` (is this the right model folder?)")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{0}: no model found here (expected config.json with model.safetensors)")]
    NoModel(PathBuf),

    /// A weight the quantized kernels cannot take (shape not a multiple of the format's
    /// block, wrong byte count, a format without a kernel), naming the tensor.
    #[error("tensor `{name}`: {message}")]
    BadQuantTensor { name: String, message: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("the prompt is empty: type something to continue from")]
    EmptyPrompt,

    #[error(
        "the prompt is {tokens} tokens but the model's context is {context} tokens; \
         shorten it (or start a new conversation)"
    )]
    PromptTooLong { tokens: usize, context: usize },

    #[error("no model is loaded: open one in the Models panel first")]
    NoModelLoaded,

    #[error(
        "{}: loading it needs about {:.1} GiB of memory ({what}) but this machine has {:.1} GiB; \
         choose a smaller or more quantized model (such as a Q4_K_M GGUF)",
        path.display(),
        *needed as f64 / f64::from(1u32 << 30),
        *total as f64 / f64::from(1u32 << 30)
    )]
    ModelTooLarge {
        path: PathBuf,
        what: String,
        needed: u64,
        total: u64,
    },

    #[error("invalid parameter: {0}")]
    InvalidParameter(String),

    #[error("the job panicked: {0} (the worker recovered; please report this)")]
    Panicked(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(path)
        } else {
            Error::Io { path, source }
        }
    }
}
