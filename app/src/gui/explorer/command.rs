//! What the Latent Explorer asks for, and why it submits jobs, as data (inside
//! `Command::Panel` and `JobPurpose::Panel`): a leaf module, so the window's command and job
//! lists can name them without importing the panel.

use std::path::PathBuf;

/// What the explorer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExplorerCommand {
    /// Load a StyleGAN2 safetensors file (a `.pkl` is refused with how to convert it).
    LoadModel(PathBuf),
    OpenModelDialog,
    /// Compute PCA directions with the panel's N and k.
    ComputeDirections,
    /// Forget the directions (and their sliders).
    ClearDirections,
    /// Add the current latent as the last keyframe.
    AddKeyframe,
    RemoveKeyframe(usize),
    /// Move keyframe `index` one place up (`up`) or down.
    MoveKeyframe {
        index: usize,
        up: bool,
    },
    /// Make keyframe `index` the current latent.
    GoToKeyframe(usize),
    TogglePlay,
    /// Save the current image as a PNG under `explorer/captures/`, with its latent.
    Capture,
    /// Restore the latent written into a captured PNG; any other image is projected.
    RestoreFromPng(PathBuf),
    /// Pick an image with the file dialog, then as [`ExplorerCommand::RestoreFromPng`].
    ProjectDialog,
    /// Make `seed` (with offset 0) the current seed.
    SelectSeed(u64),
    /// Render the keyframe path to a GIF file (`gif`) or a folder of PNGs.
    ExportAnimation {
        path: PathBuf,
        gif: bool,
    },
    /// Choose where to export with the file dialog.
    ExportDialog {
        gif: bool,
    },
    /// Save the directions and slider settings as a preset called `name` under
    /// `presets/gan-directions/` (or `STUDIO_HOME/presets/gan-directions/`).
    SavePreset(String),
    /// Load the directions and sliders of a saved preset.
    LoadPreset(PathBuf),
}

/// Why the Latent Explorer submitted a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExplorerPurpose {
    /// Loading a StyleGAN2 generator.
    LoadGan(PathBuf),
    /// PCA directions.
    ComputeGanDirections,
    /// Projecting an image into the generator.
    ProjectGan(PathBuf),
    /// Exporting the animation to this file or folder.
    ExportGanAnimation(PathBuf),
}
