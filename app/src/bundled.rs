//! The demo models bundled with Studio (`assets/models/`, issue 21): what the window and the
//! command line use when no other model is configured.
//!
//! Each kind has its own folder, in the layout its loader reads: `studio-demo-lm/` is a
//! Hugging Face model folder (a tiny Llama with its tokenizer, chat template and FIM tokens),
//! `gan/studio-demo-faces.safetensors` a StyleGAN2 in NVIDIA's names with its init kwargs
//! beside it, `studio-demo-sd/` a diffusers folder.
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
    /// The folder under `assets/models/` and the file in it that `--model` takes (`None`: the
    /// folder itself, a Hugging Face or diffusers layout known by its index file).
    fn location(self) -> (&'static str, &'static str, bool) {
        match self {
            BundledKind::Language => ("studio-demo-lm", "config.json", false),
            BundledKind::Image => ("studio-demo-sd", "model_index.json", false),
            BundledKind::Gan => ("gan", "studio-demo-faces.safetensors", true),
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

/// The guidance the demo text-to-image model is run with when none is asked for: its card
/// measured 153 of 200 held-out captions followed at CFG 3–4 and 80 at SD's usual 7, where its
/// colours over-saturate.
pub const DEMO_IMAGE_CFG: f32 = 4.0;

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
    let (folder, file, is_model) = kind.location();
    let dir = models_dir.join(folder);
    let file = dir.join(file);
    file.is_file().then_some(if is_model { file } else { dir })
}

/// The bundled model of `kind`, if this installation has one.
pub fn model(kind: BundledKind) -> Option<PathBuf> {
    model_in(&models_dir()?, kind)
}
