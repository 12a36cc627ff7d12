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
    /// An I/O operation failed: on a file or folder (other than its absence), or, for a
    /// remote server, on the connection to it.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved; for a remote server, the address or request.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The named file or folder does not exist.
    #[error("{0}: no such file or folder")]
    NotFound(PathBuf),

    /// A model's JSON config does not parse or holds a value Studio cannot use.
    #[error("{path}: config.json does not parse: {message}")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A weights file whose tensors do not make a model Studio runs (another architecture,
    /// impossible sizes): what it is, in words.
    #[error("{path}: {message}")]
    InvalidModel {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// The model's architecture is not one Studio implements: the name found, then the
    /// architectures this build supports.
    #[error("unsupported model architecture `{0}`; this version of Studio loads: {1}")]
    UnsupportedArchitecture(String, String),

    /// A weights file that cannot be read as the format it claims to be.
    #[error("{path}: the weights file is corrupt or truncated: {message}")]
    CorruptWeights {
        /// The weights file.
        path: PathBuf,
        /// What failed while reading it.
        message: String,
    },

    /// A tensor the architecture needs is absent from the weights.
    #[error("{path}: missing tensor `{name}` (is this the right model folder?)")]
    MissingTensor {
        /// The weights file or model folder searched.
        path: PathBuf,
        /// The name of the missing tensor.
        name: String,
    },

    /// A tensor's shape differs from the one the model expects.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?} from config.json")]
    ShapeMismatch {
        /// The weights file or model folder holding the tensor.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },

    /// The folder or file holds no model Studio recognises.
    #[error(
        "{0}: no model found here (expected config.json with model.safetensors or \
         pytorch_model.bin)"
    )]
    NoModel(PathBuf),

    /// A weight the quantized kernels cannot take (shape not a multiple of the format's
    /// block, wrong byte count, a format without a kernel), naming the tensor.
    #[error("tensor `{name}`: {message}")]
    BadQuantTensor {
        /// The tensor's name.
        name: String,
        /// Why the kernels cannot take it.
        message: String,
    },

    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A tokenizer failed to load, or to encode or decode text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// There is nothing to generate from: the prompt has no tokens.
    #[error("the prompt is empty: type something to continue from")]
    EmptyPrompt,

    /// The prompt, with the room reserved for the reply, does not fit the model's context.
    #[error(
        "the prompt is {tokens} tokens but the model's context is {context} tokens; \
         shorten it (or start a new conversation)"
    )]
    PromptTooLong {
        /// Tokens needed: the prompt, plus any room reserved for the reply.
        tokens: usize,
        /// The model's context length, in tokens.
        context: usize,
    },

    /// A job that needs a model arrived before one was loaded.
    #[error("no model is loaded: open one in the Models panel first")]
    NoModelLoaded,

    /// On the CPU, the model's estimated memory need exceeds the machine's memory.
    #[error(
        "{}: loading it needs about {:.1} GiB of memory ({what}) but this machine has {:.1} GiB; \
         choose a smaller or more quantized model (such as a Q4_K_M GGUF)",
        path.display(),
        *needed as f64 / f64::from(1u32 << 30),
        *total as f64 / f64::from(1u32 << 30)
    )]
    ModelTooLarge {
        /// The model file or folder.
        path: PathBuf,
        /// What the estimate counts, such as "its weights as stored in the file".
        what: String,
        /// Estimated bytes to load it, the weights plus a tenth for the working set.
        needed: u64,
        /// Bytes of memory on this machine.
        total: u64,
    },

    /// The Hugging Face Hub could not give what was asked (no such repository, a gated one, no
    /// network, a download that did not verify); the message says which and what to do.
    #[error("{0}")]
    Hub(String),

    /// A request or input carries a value out of range or inconsistent with the model.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),

    /// A job, or a thread it relies on, panicked; the message says what stopped.
    #[error("the job panicked: {0} (the worker recovered; please report this)")]
    Panicked(String),

    /// An error from candle, the tensor library.
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
