//! Preset galleries, as data files users can edit:
//!
//! - sampling presets in `presets/sampling/*.json`, each
//!   `{ "name": …, "description": …, "params": { <SamplingParams fields> } }`. A preset sets
//!   only the parameters it names; the rest (seed, max new tokens, …) stay as the user left
//!   them;
//! - system-prompt presets in `presets/system/*.json`, each
//!   `{ "name": …, "description": …, "prompt": … }`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};
use studio_inference::llm::sampling::SamplingParams;

/// Where the presets folder is: `$STUDIO_PRESETS`, else `presets/` found as
/// [`crate::bundled::installed_dir`] finds folders, else none.
pub fn presets_dir() -> Option<PathBuf> {
    crate::bundled::installed_dir("STUDIO_PRESETS", "presets")
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: String,
    pub description: String,
    /// Only the parameters the file sets.
    pub params: Map<String, Value>,
}

#[derive(Deserialize)]
struct PresetFile {
    name: String,
    #[serde(default)]
    description: String,
    params: Map<String, Value>,
}

impl Preset {
    /// `base` with this preset's parameters applied.
    pub fn apply(&self, base: &SamplingParams) -> Result<SamplingParams, String> {
        let mut value = serde_json::to_value(base).map_err(|e| e.to_string())?;
        if let Value::Object(fields) = &mut value {
            for (k, v) in &self.params {
                fields.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(value).map_err(|e| format!("preset \"{}\": {e}", self.name))
    }

    /// Whether `params` already has every value this preset sets.
    pub fn matches(&self, params: &SamplingParams) -> bool {
        self.apply(params).is_ok_and(|p| p == *params)
    }
}

/// A system prompt from the gallery.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SystemPreset {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub prompt: String,
}

/// The presets found, and what went wrong reading the others.
#[derive(Debug, Clone, Default)]
pub struct Presets {
    pub dir: Option<PathBuf>,
    /// Sampling presets.
    pub list: Vec<Preset>,
    /// System-prompt presets.
    pub system: Vec<SystemPreset>,
    pub errors: Vec<String>,
}

impl Presets {
    /// Reads `<dir>/sampling/*.json` and `<dir>/system/*.json`, each sorted by file name.
    pub fn load(dir: Option<&Path>) -> Self {
        let Some(dir) = dir else {
            return Self::default();
        };
        let mut out = Self {
            dir: Some(dir.to_path_buf()),
            ..Self::default()
        };
        let system = dir.join("system");
        match json_files(&system) {
            Ok(files) => {
                for file in files {
                    match read_system_preset(&file) {
                        Ok(p) => out.system.push(p),
                        Err(e) => out.errors.push(e),
                    }
                }
            }
            // A presets folder from before system prompts had presets.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => out.errors.push(format!(
                "Could not read presets in {}: {e}",
                system.display()
            )),
        }
        let sampling = dir.join("sampling");
        let files = match json_files(&sampling) {
            Ok(files) => files,
            Err(e) => {
                out.errors.push(format!(
                    "Could not read presets in {}: {e}",
                    sampling.display()
                ));
                return out;
            }
        };
        let known = match serde_json::to_value(SamplingParams::default()) {
            Ok(Value::Object(fields)) => fields.keys().cloned().collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        for file in files {
            match read_preset(&file, &known) {
                Ok(p) => out.list.push(p),
                Err(e) => out.errors.push(e),
            }
        }
        out
    }
}

/// The `*.json` files in `dir`, sorted by name.
fn json_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
        .collect();
    files.sort();
    Ok(files)
}

fn read_system_preset(file: &Path) -> Result<SystemPreset, String> {
    let shown = file.display();
    let text = std::fs::read_to_string(file).map_err(|e| format!("{shown}: {e}"))?;
    let preset: SystemPreset = serde_json::from_str(&text)
        .map_err(|e| format!("{shown}: not a system-prompt preset: {e}"))?;
    if preset.name.trim().is_empty() || preset.prompt.trim().is_empty() {
        return Err(format!(
            "{shown}: a system-prompt preset needs a name and a prompt"
        ));
    }
    Ok(preset)
}

fn read_preset(file: &Path, known: &[String]) -> Result<Preset, String> {
    let shown = file.display();
    let text = std::fs::read_to_string(file).map_err(|e| format!("{shown}: {e}"))?;
    let parsed: PresetFile =
        serde_json::from_str(&text).map_err(|e| format!("{shown}: not a preset: {e}"))?;
    if let Some(unknown) = parsed.params.keys().find(|k| !known.contains(k)) {
        return Err(format!(
            "{shown}: unknown sampling parameter `{unknown}` (known: {})",
            known.join(", ")
        ));
    }
    let preset = Preset {
        name: parsed.name,
        description: parsed.description,
        params: parsed.params,
    };
    let applied = preset
        .apply(&SamplingParams::default())
        .map_err(|e| format!("{shown}: {e}"))?;
    applied.validate().map_err(|e| format!("{shown}: {e}"))?;
    Ok(preset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Presets {
        Presets::load(Some(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets"),
        ))
    }

    #[test]
    fn shipped_presets_load_and_set_only_their_fields() {
        let presets = shipped();
        assert!(presets.errors.is_empty(), "{:?}", presets.errors);
        assert!(presets.system.len() >= 4, "{:?}", presets.system);
        assert!(
            presets
                .system
                .iter()
                .all(|p| !p.description.is_empty() && p.prompt.len() > 40)
        );
        let names: Vec<&str> = presets.list.iter().map(|p| p.name.as_str()).collect();
        for want in ["Balanced", "Precise", "Creative", "Greedy"] {
            assert!(names.contains(&want), "{names:?}");
        }
        let base = SamplingParams {
            seed: 7,
            max_new_tokens: 999,
            ..SamplingParams::default()
        };
        let greedy = presets
            .list
            .iter()
            .find(|p| p.name == "Greedy")
            .expect("greedy");
        let applied = greedy.apply(&base).expect("applies");
        assert!(applied.temperature.abs() < f32::EPSILON);
        assert_eq!((applied.seed, applied.max_new_tokens), (7, 999));
        assert!(greedy.matches(&applied) && !greedy.matches(&base));
        let balanced = presets
            .list
            .iter()
            .find(|p| p.name == "Balanced")
            .expect("balanced");
        let b = balanced.apply(&base).expect("applies");
        assert_eq!((b.top_k, b.repeat_last_n), (40, 64));
        assert!((b.temperature - 0.7).abs() < 1e-6 && (b.repeat_penalty - 1.1).abs() < 1e-6);
    }

    #[test]
    fn bad_preset_files_are_reported_not_loaded() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("sampling");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("a.json"),
            r#"{"name":"A","params":{"temprature":1}}"#,
        )
        .expect("write");
        std::fs::write(dir.join("b.json"), r#"{"name":"B","params":{"top_p":0}}"#).expect("write");
        std::fs::write(dir.join("c.json"), r#"{"name":"C","params":{"top_k":5}}"#).expect("write");
        let presets = Presets::load(Some(tmp.path()));
        assert_eq!(presets.list.len(), 1);
        assert!(presets.system.is_empty(), "no system folder is no error");
        assert_eq!(presets.errors.len(), 2, "{:?}", presets.errors);
        assert!(presets.errors[0].contains("temprature"));
        assert!(presets.errors[1].contains("top-p"));
    }
}
