//! Which of a repository's files a download takes: the weights asked for (or, when none are
//! named, the ones Studio would load), plus the small files that come with them (configs,
//! tokenizers, `model_index.json`, a network's settings JSON).

use super::api::{RepoFile, RepoInfo};
use super::hub_error;
use crate::error::Result;

/// GGUF quantizations in the order Studio picks one when none is named: llama-quantize's
/// default mix first, then larger and smaller ones.
pub const GGUF_PREFERENCE: [&str; 8] = [
    "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS",
];

/// Largest "small file" that comes along without being asked for.
const SMALL: u64 = 32 * 1024 * 1024;

/// The kind of a repository file, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `.safetensors` weights.
    Safetensors,
    /// A llama.cpp `.gguf` file.
    Gguf,
    /// A Python pickle (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`): listed, fetched only when
    /// named (Studio reads pickles as data).
    Pickle,
    /// A config, tokenizer or settings file that comes with the weights.
    Companion,
    /// Anything else (README, images, other frameworks' weights).
    Other,
}

/// What kind of file `name` is.
pub fn kind(name: &str) -> FileKind {
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit_once('.').map_or("", |(_, e)| e);
    match ext {
        "safetensors" => FileKind::Safetensors,
        "gguf" => FileKind::Gguf,
        "bin" | "pt" | "pth" | "ckpt" | "pkl" => FileKind::Pickle,
        "json" | "txt" | "model" | "jinja" | "tiktoken" => FileKind::Companion,
        _ => FileKind::Other,
    }
}

/// The quantization a GGUF file's name says (`…-Q4_K_M.gguf` → `Q4_K_M`), if any.
pub fn quant_of(name: &str) -> Option<String> {
    let stem = name.rsplit('/').next()?.strip_suffix(".gguf")?;
    let upper = stem.to_ascii_uppercase();
    let known = [
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
        "IQ3_M", "IQ4_XS", "IQ4_NL", "Q2_K_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
        "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16",
        "BF16", "F32",
    ];
    // The longest known name the stem ends with (after `-`, `.` or `_`).
    known
        .iter()
        .filter(|q| {
            upper.ends_with(*q)
                && upper[..upper.len() - q.len()]
                    .chars()
                    .last()
                    .is_some_and(|c| matches!(c, '-' | '.' | '_'))
        })
        .max_by_key(|q| q.len())
        .map(|q| (*q).to_owned())
}

/// The files to download: `requested` (each must be in the repository; pickles only this way),
/// or when it is empty the weights Studio loads, plus the small companion files. Refused with
/// the repository's file list when nothing fits.
pub fn pick(info: &RepoInfo, requested: &[String]) -> Result<Vec<RepoFile>> {
    let listing = || {
        info.files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let weights: Vec<&RepoFile> = if requested.is_empty() {
        default_weights(info).ok_or_else(|| {
            hub_error(format!(
                "{} has no safetensors or GGUF files; name one with --file (it has: {})",
                info.id,
                listing()
            ))
        })?
    } else {
        requested
            .iter()
            .map(|name| {
                info.files.iter().find(|f| &f.name == name).ok_or_else(|| {
                    hub_error(format!(
                        "{} has no file `{name}` (it has: {})",
                        info.id,
                        listing()
                    ))
                })
            })
            .collect::<Result<_>>()?
    };
    let gguf_only = weights.iter().all(|f| kind(&f.name) == FileKind::Gguf);
    let mut picked: Vec<RepoFile> = weights.into_iter().cloned().collect();
    for f in &info.files {
        let companion = kind(&f.name) == FileKind::Companion
            && f.size.is_none_or(|s| s <= SMALL)
            && !picked.iter().any(|p| p.name == f.name);
        // A GGUF file carries its own config and tokenizer.
        if companion && !gguf_only {
            picked.push(f.clone());
        }
    }
    Ok(picked)
}

/// The weights Studio would load from this repository: a diffusers pipeline's components
/// (one variant each, full precision first), else the top-level safetensors (every shard),
/// else one GGUF file ([`GGUF_PREFERENCE`], else the smallest).
fn default_weights(info: &RepoInfo) -> Option<Vec<&RepoFile>> {
    let has = |name: &str| info.files.iter().any(|f| f.name == name);
    if has("model_index.json") {
        let mut picked: Vec<&RepoFile> = Vec::new();
        let mut folders: Vec<&str> = info
            .files
            .iter()
            .filter(|f| kind(&f.name) == FileKind::Safetensors)
            .filter_map(|f| f.name.split_once('/').map(|(d, _)| d))
            .collect();
        folders.sort_unstable();
        folders.dedup();
        for folder in folders {
            let in_folder: Vec<&RepoFile> = info
                .files
                .iter()
                .filter(|f| {
                    kind(&f.name) == FileKind::Safetensors
                        && f.name
                            .split_once('/')
                            .is_some_and(|(d, rest)| d == folder && !rest.contains('/'))
                })
                .collect();
            let full: Vec<&RepoFile> = in_folder
                .iter()
                .copied()
                .filter(|f| !f.name.contains(".fp16.") && !f.name.contains(".non_ema."))
                .collect();
            picked.extend(if full.is_empty() { in_folder } else { full });
        }
        if !picked.is_empty() {
            return Some(picked);
        }
    }
    let top: Vec<&RepoFile> = info
        .files
        .iter()
        .filter(|f| kind(&f.name) == FileKind::Safetensors && !f.name.contains('/'))
        .collect();
    if !top.is_empty() {
        return Some(top);
    }
    let ggufs: Vec<&RepoFile> = info
        .files
        .iter()
        .filter(|f| kind(&f.name) == FileKind::Gguf)
        .collect();
    GGUF_PREFERENCE
        .iter()
        .find_map(|q| {
            ggufs
                .iter()
                .find(|f| quant_of(&f.name).as_deref() == Some(*q))
                .copied()
        })
        .or_else(|| {
            ggufs
                .iter()
                .min_by_key(|f| f.size.unwrap_or(u64::MAX))
                .copied()
        })
        .map(|f| vec![f])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(names: &[(&str, u64)]) -> RepoInfo {
        RepoInfo {
            id: "org/x".into(),
            commit: "a".repeat(40),
            files: names
                .iter()
                .map(|(n, s)| RepoFile {
                    name: (*n).into(),
                    size: Some(*s),
                    sha256: None,
                })
                .collect(),
            gated: false,
            license: None,
        }
    }

    fn names(files: &[RepoFile]) -> Vec<&str> {
        files.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn the_default_pick_is_what_studio_loads() {
        let gguf = info(&[
            ("m-Q8_0.gguf", 8),
            ("m-Q4_K_M.gguf", 4),
            ("m-Q2_K.gguf", 2),
            ("README.md", 1),
        ]);
        assert_eq!(names(&pick(&gguf, &[]).expect("pick")), ["m-Q4_K_M.gguf"]);
        let hf = info(&[
            ("config.json", 1),
            ("tokenizer.json", 1),
            ("model-00001-of-00002.safetensors", 5),
            ("model-00002-of-00002.safetensors", 5),
            ("model.safetensors.index.json", 1),
            ("pytorch_model.bin", 10),
            ("README.md", 1),
        ]);
        assert_eq!(
            names(&pick(&hf, &[]).expect("pick")),
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "config.json",
                "tokenizer.json",
                "model.safetensors.index.json"
            ]
        );
        let sd = info(&[
            ("model_index.json", 1),
            ("unet/config.json", 1),
            ("unet/diffusion_pytorch_model.safetensors", 9),
            ("unet/diffusion_pytorch_model.fp16.safetensors", 5),
            ("vae/diffusion_pytorch_model.safetensors", 3),
            ("v1-5-pruned.safetensors", 20),
        ]);
        let picked = pick(&sd, &[]).expect("pick");
        assert!(names(&picked).contains(&"unet/diffusion_pytorch_model.safetensors"));
        assert!(!names(&picked).contains(&"unet/diffusion_pytorch_model.fp16.safetensors"));
        assert!(!names(&picked).contains(&"v1-5-pruned.safetensors"));
        assert!(names(&picked).contains(&"unet/config.json"));
        // Pickles only when named; an unknown name lists what there is.
        let pickles = info(&[("pytorch_model.bin", 3), ("config.json", 1)]);
        let e = pick(&pickles, &[]).expect_err("no default").to_string();
        assert!(
            e.contains("pytorch_model.bin") && e.contains("--file"),
            "{e}"
        );
        assert_eq!(
            names(&pick(&pickles, &["pytorch_model.bin".into()]).expect("named")),
            ["pytorch_model.bin", "config.json"]
        );
        assert!(pick(&pickles, &["nope.gguf".into()]).is_err());
        assert_eq!(
            quant_of("x/Llama-3-8B.Q4_K_M.gguf").as_deref(),
            Some("Q4_K_M")
        );
        assert_eq!(quant_of("m-IQ4_XS.gguf").as_deref(), Some("IQ4_XS"));
        assert_eq!(quant_of("m.gguf"), None);
    }
}
