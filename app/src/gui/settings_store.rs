//! The user's settings: one serde struct saved as `settings.json` in Studio's home whenever it
//! changes (debounced a moment so typing in a field is not a write per key).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use studio_inference::device::DevicePreference;
use studio_inference::diffusion::model::ImageModelOptions;
use studio_inference::llm::sampling::SamplingParams;

use crate::home::{load_json, save_json_private};

/// Bumped when a saved field changes meaning; older files are migrated in [`Settings::load`].
pub const SETTINGS_VERSION: u32 = 1;

/// How many recently loaded models are remembered.
pub const MAX_RECENT_MODELS: usize = 10;

/// How long a change waits before it is written (more changes restart the wait).
const SAVE_DEBOUNCE: Duration = Duration::from_millis(400);

pub use super::panel_list::Panel;

/// Everything Studio remembers between runs (apart from conversations and the window's
/// position, which eframe keeps in `window.ron`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub version: u32,
    /// The panel shown at startup: the one open when Studio was closed.
    pub panel: Panel,
    /// The sampling parameters shown in the chat panel: the open conversation's, and those a
    /// new conversation starts with.
    pub sampling: SamplingParams,
    /// Draw a fresh seed for every reply (the seed used is kept with the reply), so Regenerate
    /// gives a different answer. When off, `sampling.seed` is used as is.
    pub new_seed_each_reply: bool,
    /// Like `sampling`: the open conversation's system prompt, and a new one's.
    pub system_prompt: String,
    /// Takes effect at the next start.
    pub device: DevicePreference,
    /// CPU threads for inference; `None` lets candle choose. Takes effect at the next start.
    pub cpu_threads: Option<usize>,
    /// Most recent first, at most [`MAX_RECENT_MODELS`].
    pub recent_models: Vec<PathBuf>,
    /// Loaded again at startup if it still exists.
    pub last_model: Option<PathBuf>,
    /// Context length models are loaded with (below their maximum saves memory); `None` uses
    /// each model's maximum.
    pub context_length: Option<usize>,
    /// The conversation that was open.
    pub last_conversation: Option<String>,
    /// An OpenAI-compatible server to chat through instead of a local model.
    pub remote: RemoteSettings,
    /// Whether the chat's parameters side panel is shown.
    pub show_parameters: bool,
    /// The Canvas's Stable Diffusion model, loaded again at startup if it still exists.
    pub last_image_model: Option<PathBuf>,
    /// VAE and TAESD files the next Stable Diffusion model is loaded with.
    pub image_model_options: ImageModelOptions,
    /// The Latent Explorer's StyleGAN2 generator, loaded again at startup if it still exists.
    pub last_gan_model: Option<PathBuf>,
    /// Folders of LoRA files the user added to the Canvas's LoRA gallery (besides
    /// `STUDIO_HOME/models/lora`).
    pub lora_folders: Vec<PathBuf>,
    /// The Code panel's options.
    pub code: CodeSettings,
    /// The API server started from the Settings panel.
    pub server: ServerSettings,
}

/// How the Settings panel's API server listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerSettings {
    pub port: u16,
    /// Listen on every interface (other devices connect by this machine's IP address), not
    /// only loopback; an API key is then required.
    pub network: bool,
    /// Required as `Authorization: Bearer KEY` when not empty.
    pub api_key: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            port: 8080,
            network: false,
            api_key: String::new(),
        }
    }
}

impl ServerSettings {
    /// A fresh random key (128 bits from the OS-seeded generator).
    pub fn new_key() -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes: [u8; 16] = rand::random();
        let mut key = String::from("sk-studio-");
        for b in bytes {
            key.push(char::from(HEX[usize::from(b >> 4)]));
            key.push(char::from(HEX[usize::from(b & 15)]));
        }
        key
    }
}

/// The Code panel's options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CodeSettings {
    /// Suggest code at the cursor (ghost text) when typing pauses.
    pub ghost_text: bool,
    /// How long a pause in typing asks for a suggestion, in milliseconds.
    pub ghost_delay_ms: u64,
    /// Actions include the other open tabs as context.
    pub include_tabs: bool,
    /// A FIM format chosen by name instead of the one detected from the model's tokens
    /// (`None` = detect).
    pub fim_format: Option<String>,
}

impl Default for CodeSettings {
    fn default() -> Self {
        Self {
            ghost_text: true,
            ghost_delay_ms: 350,
            include_tabs: false,
            fim_format: None,
        }
    }
}

/// The remote-server form in Settings (kept between runs; the API key stays in the user's own
/// data folder, as peers do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RemoteSettings {
    /// e.g. `http://127.0.0.1:11434/v1` (Ollama), `http://localhost:8000/v1` (vLLM).
    pub base_url: String,
    pub api_key: String,
    /// Empty: the first model the server lists.
    pub model: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            version: SETTINGS_VERSION,
            panel: Panel::Chat,
            sampling: SamplingParams {
                temperature: 0.7,
                ..SamplingParams::default()
            },
            new_seed_each_reply: true,
            system_prompt: String::new(),
            device: DevicePreference::Auto,
            cpu_threads: None,
            recent_models: Vec::new(),
            last_model: None,
            context_length: None,
            last_conversation: None,
            remote: RemoteSettings::default(),
            show_parameters: true,
            last_image_model: None,
            image_model_options: ImageModelOptions::default(),
            last_gan_model: None,
            lora_folders: Vec::new(),
            code: CodeSettings::default(),
            server: ServerSettings::default(),
        }
    }
}

impl Settings {
    pub fn path(home: &Path) -> PathBuf {
        home.join("settings.json")
    }

    /// Reads `settings.json`. A missing file gives the defaults; a file that does not parse is
    /// moved aside to `settings.json.bad-<timestamp>` (so it is not overwritten) and the defaults are used,
    /// with the reason returned for a notice.
    pub fn load(home: &Path) -> (Settings, Option<String>) {
        let path = Self::path(home);
        match load_json::<Settings>(&path) {
            Ok(Some(mut s)) => {
                let note = (s.version > SETTINGS_VERSION).then(|| {
                    format!(
                        "{} was written by a newer Studio (version {}); settings this version \
                         does not know are ignored",
                        path.display(),
                        s.version
                    )
                });
                s.version = SETTINGS_VERSION;
                s.recent_models.truncate(MAX_RECENT_MODELS);
                (s, note)
            }
            Ok(None) => (Settings::default(), None),
            Err(e) => {
                let note = format!(
                    "{e:#}. Using default settings.{}",
                    crate::home::keep_corrupt(&path)
                );
                (Settings::default(), Some(note))
            }
        }
    }

    /// Puts `path` first in the recent list.
    pub fn remember_model(&mut self, path: &Path) {
        self.recent_models.retain(|p| p != path);
        self.recent_models.insert(0, path.to_path_buf());
        self.recent_models.truncate(MAX_RECENT_MODELS);
    }
}

/// Writes [`Settings`] when they differ from what was last written, a moment after the last
/// change.
#[derive(Debug)]
pub struct SettingsSaver {
    path: PathBuf,
    saved: Settings,
    changed_at: Option<Instant>,
}

impl SettingsSaver {
    pub fn new(home: &Path, saved: Settings) -> Self {
        Self {
            path: Settings::path(home),
            saved,
            changed_at: None,
        }
    }

    /// Call once per frame. Returns how long until the next check is due (to schedule a
    /// repaint), and the error of a failed write.
    pub fn tick(&mut self, current: &Settings) -> (Option<Duration>, Option<String>) {
        if *current == self.saved {
            self.changed_at = None;
            return (None, None);
        }
        let changed_at = *self.changed_at.get_or_insert_with(Instant::now);
        let waited = changed_at.elapsed();
        if waited < SAVE_DEBOUNCE {
            return (Some(SAVE_DEBOUNCE.saturating_sub(waited)), None);
        }
        (None, self.flush(current))
    }

    /// Writes now if anything changed. Returns the error, if any.
    pub fn flush(&mut self, current: &Settings) -> Option<String> {
        if *current == self.saved {
            return None;
        }
        self.changed_at = None;
        // Whatever happens, do not retry every frame: the next change tries again.
        self.saved = current.clone();
        save_json_private(&self.path, current)
            .err()
            .map(|e| format!("Settings were not saved: {e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_tolerate_missing_fields() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut s = Settings {
            panel: Panel::Models,
            cpu_threads: Some(3),
            context_length: Some(2048),
            device: DevicePreference::Cuda(1),
            ..Settings::default()
        };
        for i in 0..12 {
            s.remember_model(Path::new(&format!("/m/{i}")));
        }
        s.remember_model(Path::new("/m/5"));
        assert_eq!(s.recent_models.len(), MAX_RECENT_MODELS);
        assert_eq!(s.recent_models[0], Path::new("/m/5"));
        let mut saver = SettingsSaver::new(tmp.path(), Settings::default());
        assert_eq!(saver.flush(&s), None);
        let (loaded, note) = Settings::load(tmp.path());
        assert_eq!(loaded, s);
        assert_eq!(note, None);

        std::fs::write(Settings::path(tmp.path()), r#"{"panel":"Settings"}"#).expect("write");
        let (loaded, _) = Settings::load(tmp.path());
        assert_eq!(loaded.panel, Panel::Settings);
        assert_eq!(loaded.sampling, Settings::default().sampling);
    }

    #[test]
    fn unreadable_settings_are_kept_aside_not_overwritten() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::write(Settings::path(tmp.path()), "{ not json").expect("write");
        let (loaded, note) = Settings::load(tmp.path());
        assert_eq!(loaded, Settings::default());
        assert!(note.expect("a note").contains("settings.json.bad"));
        assert_eq!(crate::home::kept_copies(tmp.path(), "settings.json"), 1);
    }
}
