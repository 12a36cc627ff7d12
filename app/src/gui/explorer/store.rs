//! What the Latent Explorer keeps between runs, under `STUDIO_HOME/explorer/`: the sliders,
//! keyframes and playback settings (`state.json`) and the PCA directions (`directions.json`),
//! each written atomically. Captures go to `explorer/captures/`. A projected latent's
//! optimized noise (megabytes for a large network) goes to `explorer/noise/<hash>.npy`, named
//! by its content so it is written once; files no latent refers to any more are removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use studio_inference::gan::directions::{Directions, DirectionsPreset};
use studio_inference::gan::render::GanLatent;
use studio_inference::gan::{npy, perceptual};

/// Version of `state.json`.
pub const STATE_VERSION: u32 = 1;

/// Which noise the synthesis layers get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NoiseChoice {
    #[default]
    Const,
    Random,
    None,
}

impl NoiseChoice {
    pub const ALL: [NoiseChoice; 3] = [NoiseChoice::Const, NoiseChoice::Random, NoiseChoice::None];

    pub fn label(self) -> &'static str {
        match self {
            NoiseChoice::Const => "const",
            NoiseChoice::Random => "random",
            NoiseChoice::None => "none",
        }
    }
}

/// The interpolation space of the keyframe animation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PathSpace {
    /// Linear interpolation of W.
    #[default]
    W,
    /// Spherical interpolation of Z.
    Z,
}

/// The explorer's saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExplorerState {
    pub version: u32,
    /// The current latent (seed, offset, ψ, cutoff, mixing, direction amounts).
    pub latent: GanLatent,
    pub noise: NoiseChoice,
    pub noise_seed: u64,
    /// Whether style mixing is on (its seed and layers live in `latent.mix`).
    pub mixing: bool,
    pub mix_seed: u64,
    pub mix_layers: Vec<bool>,
    pub keyframes: Vec<GanLatent>,
    pub space: PathSpace,
    /// Keyframes per second while playing.
    pub speed: f64,
    pub pca_samples: usize,
    pub pca_components: usize,
    /// First seed of the seed browser.
    pub grid_start: u64,
    /// Frames of an exported animation, and the GIF's frame rate.
    pub export_frames: usize,
    pub export_fps: f64,
    /// Optimization steps of a projection.
    pub project_steps: usize,
    /// The synthesis layer shown under the image (`None` = no layer view).
    pub layer: Option<String>,
    /// Show three channels as RGB instead of a grid of channels.
    pub layer_rgb: bool,
    /// Channels in the grid (at most [`studio_inference::gan::render::GAN_LAYER_MAX_TILES`]).
    pub layer_tiles: usize,
    /// The channels shown as red, green and blue.
    pub layer_channels: [usize; 3],
    /// Noise file of `latent` under `explorer/noise/` (written by [`save_state`], read back
    /// by [`load`] into `latent.noise`).
    pub latent_noise: Option<String>,
    /// Noise file of each keyframe, like `latent_noise`.
    pub keyframe_noise: Vec<Option<String>>,
}

impl Default for ExplorerState {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            latent: GanLatent::default(),
            noise: NoiseChoice::Const,
            noise_seed: 0,
            mixing: false,
            mix_seed: 1,
            mix_layers: Vec::new(),
            keyframes: Vec::new(),
            space: PathSpace::W,
            speed: 0.5,
            pca_samples: 2000,
            pca_components: 8,
            grid_start: 0,
            export_frames: 30,
            export_fps: 15.0,
            project_steps: 200,
            layer: None,
            layer_rgb: false,
            layer_tiles: studio_inference::gan::render::GAN_LAYER_MAX_TILES,
            layer_channels: [0, 1, 2],
            latent_noise: None,
            keyframe_noise: Vec::new(),
        }
    }
}

pub fn dir(home: &Path) -> PathBuf {
    home.join("explorer")
}

fn state_path(home: &Path) -> PathBuf {
    dir(home).join("state.json")
}

fn directions_path(home: &Path) -> PathBuf {
    dir(home).join("directions.json")
}

/// Reads the saved state and directions; a damaged file is kept aside
/// (`*.bad-<timestamp>`), reported, and replaced by defaults.
pub fn load(home: &Path) -> (ExplorerState, Option<Directions>, Vec<String>) {
    let mut notes = Vec::new();
    let mut state = match crate::home::load_json::<ExplorerState>(&state_path(home)) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            notes.push(format!(
                "The Latent Explorer's saved sliders could not be read: {e:#}.{}",
                crate::home::keep_corrupt(&state_path(home))
            ));
            ExplorerState::default()
        }
    };
    let directions = match crate::home::load_json::<Directions>(&directions_path(home)) {
        Ok(d) => d,
        Err(e) => {
            notes.push(format!(
                "The saved PCA directions could not be read: {e:#}.{}",
                crate::home::keep_corrupt(&directions_path(home))
            ));
            None
        }
    };
    let mut missing = Vec::new();
    let mut restore = |latent: &mut GanLatent, file: Option<&String>, what: String| {
        if let Some(file) = file {
            match read_noise(home, file) {
                Ok(noise) => latent.noise = Some(noise),
                Err(e) => missing.push(format!("{what} ({e:#})")),
            }
        }
    };
    let latent_file = state.latent_noise.clone();
    restore(
        &mut state.latent,
        latent_file.as_ref(),
        "the current latent".into(),
    );
    let files = state.keyframe_noise.clone();
    for (i, k) in state.keyframes.iter_mut().enumerate() {
        restore(
            k,
            files.get(i).and_then(Option::as_ref),
            format!("keyframe {}", i + 1),
        );
    }
    if !missing.is_empty() {
        notes.push(format!(
            "The projected noise of {} could not be read; it renders with the panel's noise.",
            missing.join(", ")
        ));
    }
    (state, directions, notes)
}

/// The file names of noise buffers already written, by buffer (`Arc` identity), so an
/// autosave does not hash megabytes of noise on the UI thread every time.
#[derive(Debug, Default)]
pub struct NoiseFiles(Vec<(Arc<Vec<f32>>, String)>);

impl NoiseFiles {
    fn name(&mut self, home: &Path, noise: &Arc<Vec<f32>>) -> anyhow::Result<String> {
        if let Some((_, name)) = self.0.iter().find(|(n, _)| Arc::ptr_eq(n, noise)) {
            return Ok(name.clone());
        }
        let name = write_noise(home, noise)?;
        self.0.push((Arc::clone(noise), name.clone()));
        Ok(name)
    }
}

pub fn save_state(
    home: &Path,
    state: &ExplorerState,
    files: &mut NoiseFiles,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir(home)).context("creating the explorer folder")?;
    let mut saved = state.clone();
    saved.latent_noise = state
        .latent
        .noise
        .as_ref()
        .map(|n| files.name(home, n))
        .transpose()?;
    saved.keyframe_noise = state
        .keyframes
        .iter()
        .map(|k| k.noise.as_ref().map(|n| files.name(home, n)).transpose())
        .collect::<anyhow::Result<_>>()?;
    crate::home::save_json(&state_path(home), &saved)?;
    // Forget buffers no latent holds any more, and their files.
    let in_use = |n: &Arc<Vec<f32>>| {
        state
            .latent
            .noise
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(l, n))
            || state
                .keyframes
                .iter()
                .any(|k| k.noise.as_ref().is_some_and(|k| Arc::ptr_eq(k, n)))
    };
    files.0.retain(|(n, _)| in_use(n));
    remove_unused_noise(home, &saved);
    Ok(())
}

fn noise_dir(home: &Path) -> PathBuf {
    dir(home).join("noise")
}

/// Writes `noise` as `explorer/noise/<FNV-1a hash>.npy` unless that file exists; its name.
fn write_noise(home: &Path, noise: &[f32]) -> anyhow::Result<String> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for v in noise {
        for b in v.to_le_bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let name = format!("{hash:016x}-{}.npy", noise.len());
    let path = noise_dir(home).join(&name);
    if !path.exists() {
        std::fs::create_dir_all(noise_dir(home)).context("creating the explorer noise folder")?;
        let bytes = npy::encode(&npy::NpyArray {
            shape: vec![noise.len()],
            data: noise.to_vec(),
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        crate::home::atomic_write(&path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(name)
}

fn read_noise(home: &Path, name: &str) -> anyhow::Result<Arc<Vec<f32>>> {
    if name.contains(['/', '\\']) || name.starts_with('.') {
        anyhow::bail!("{name} is not a noise file name");
    }
    let path = noise_dir(home).join(name);
    let array = npy::read(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(array.data))
}

/// Removes noise files that neither the current latent nor a keyframe uses (best effort).
fn remove_unused_noise(home: &Path, saved: &ExplorerState) {
    let used: Vec<&String> = saved
        .latent_noise
        .iter()
        .chain(saved.keyframe_noise.iter().flatten())
        .collect();
    let Ok(entries) = std::fs::read_dir(noise_dir(home)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().extension().is_some_and(|e| e == "npy")
            && !used.iter().any(|u| **u == name)
            && let Err(e) = std::fs::remove_file(entry.path())
        {
            log::warn!("removing the unused noise file {name}: {e}");
        }
    }
}

/// Folder of direction presets under a presets folder (`presets/gan-directions/`).
pub const PRESETS_SUBDIR: &str = "gan-directions";

/// A saved directions preset found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct PresetEntry {
    pub name: String,
    pub path: PathBuf,
    pub w_dim: usize,
    pub components: usize,
}

/// Where presets go when the shipped presets folder cannot be written:
/// `STUDIO_HOME/presets/gan-directions/`.
pub fn fallback_presets_dir(home: &Path) -> PathBuf {
    home.join("presets").join(PRESETS_SUBDIR)
}

/// A file name for a preset called `name` (letters, digits, `-`, `_` and spaces kept);
/// `None` when nothing usable is left.
pub fn preset_file_name(name: &str) -> Option<String> {
    let clean: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '-' | '_' | ' ') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim().trim_matches('_').to_owned();
    (!clean.is_empty()).then(|| format!("{clean}.json"))
}

/// Writes `preset` as `<name>.json` into `primary` (the presets folder's `gan-directions/`),
/// or, when that fails, into [`fallback_presets_dir`]. Returns where it went and, for the
/// fallback, why the first place failed.
pub fn save_preset(
    primary: Option<&Path>,
    home: &Path,
    name: &str,
    preset: &DirectionsPreset,
) -> anyhow::Result<(PathBuf, Option<String>)> {
    let file = preset_file_name(name)
        .with_context(|| format!("\"{name}\" is not a usable preset name"))?;
    let write = |dir: &Path| -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(&file);
        crate::home::save_json(&path, preset)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let first_error = match primary {
        Some(dir) => match write(dir) {
            Ok(path) => return Ok((path, None)),
            Err(e) => format!("{e:#}"),
        },
        None => "there is no presets folder".to_owned(),
    };
    let path = write(&fallback_presets_dir(home))?;
    Ok((path, Some(first_error)))
}

/// The presets in `dirs` (missing folders are skipped), by name; unreadable files are
/// returned as problems.
pub fn list_presets(dirs: &[PathBuf]) -> (Vec<PresetEntry>, Vec<String>) {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match DirectionsPreset::load_json(&path) {
                Ok(p) => found.push(PresetEntry {
                    name: path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    w_dim: p.directions.w_dim,
                    components: p.directions.len(),
                    path,
                }),
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
    (found, problems)
}

pub fn save_directions(home: &Path, directions: &Directions) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir(home)).context("creating the explorer folder")?;
    crate::home::save_json(&directions_path(home), directions)
}

/// VGG16 weights for the perceptual projection loss next to the generator `model`, else in
/// `STUDIO_HOME/models/` ([`perceptual::find_weights`]).
pub fn find_vgg16(home: &Path, model: &Path) -> Option<PathBuf> {
    let beside = model.parent().map(Path::to_path_buf);
    let dirs: Vec<PathBuf> = [beside, Some(home.join("models"))]
        .into_iter()
        .flatten()
        .collect();
    perceptual::find_weights(&dirs)
}
