//! The demo models bundled with Studio (`assets/models/`, issue 21): what the window and the
//! command line use when no other model is configured.
//!
//! Each kind has its own folder, in the layout its loader reads: `assets/models/lm/` is a
//! Hugging Face model folder (a tiny Llama with its tokenizer, chat template and FIM tokens).
//! A kind whose demo model is not bundled has no folder, and callers say so.

use std::path::{Path, PathBuf};

/// What a bundled model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundledKind {
    /// Chat, generation and code completion.
    Language,
    /// Text-to-image, image-to-image and inpainting.
    Image,
    /// The Latent Explorer.
    Gan,
}

impl BundledKind {
    /// The folder under `assets/models/`.
    fn folder(self) -> &'static str {
        match self {
            BundledKind::Language => "lm",
            BundledKind::Image => "sd",
            BundledKind::Gan => "gan",
        }
    }

    /// What `--model` takes, inside the folder: the folder itself for the Hugging Face and
    /// diffusers layouts (known by their index file), the generator's file for the GAN.
    fn entry(self) -> (&'static str, bool) {
        match self {
            BundledKind::Language => ("config.json", false),
            BundledKind::Image => ("model_index.json", false),
            BundledKind::Gan => ("generator.safetensors", true),
        }
    }

    /// For messages: "language model", …
    pub fn label(self) -> &'static str {
        match self {
            BundledKind::Language => "language model",
            BundledKind::Image => "text-to-image model",
            BundledKind::Gan => "GAN",
        }
    }
}

/// Where an installed data folder is: `$env` when set, else `name/` next to the executable,
/// else two folders up from it (`target/release/studio` in a checkout), else the source
/// tree's (development builds), else none.
pub fn installed_dir(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    exe_dir
        .iter()
        .flat_map(|d| [d.join(name), d.join("../..").join(name)])
        .chain(std::iter::once(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name),
        ))
        .find(|dir| dir.is_dir())
}

/// The folder holding the bundled models: `$STUDIO_ASSETS/models`, else `assets/models` found
/// as [`installed_dir`] finds folders.
pub fn models_dir() -> Option<PathBuf> {
    installed_dir("STUDIO_ASSETS", "assets")
        .map(|d| d.join("models"))
        .filter(|d| d.is_dir())
}

/// The bundled model of `kind` in `models_dir`, if it is there (as `--model` takes it).
pub fn model_in(models_dir: &Path, kind: BundledKind) -> Option<PathBuf> {
    let dir = models_dir.join(kind.folder());
    let (file, is_model) = kind.entry();
    let file = dir.join(file);
    file.is_file().then_some(if is_model { file } else { dir })
}

/// The bundled model of `kind`, if this installation has one.
pub fn model(kind: BundledKind) -> Option<PathBuf> {
    model_in(&models_dir()?, kind)
}
