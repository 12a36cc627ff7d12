//! Textual-inversion embeddings: vectors that stand for a word in the prompt, in the files
//! model sites share.
//!
//! - the SD web UI's `.safetensors` (`emb_params`, `(n, width)`) and `.pt` (a pickle, read as
//!   data, with `string_to_param.*`);
//! - SDXL's `.safetensors` with one set per text encoder (`clip_l`, 768 wide, and `clip_g`,
//!   1280 wide);
//! - diffusers' `learned_embeds.bin` / `.safetensors` (one tensor named after the token).
//!
//! An embedding is used where its file's stem appears in the prompt as a whole word: the word
//! becomes its `n` vectors, given to each text encoder of the matching width
//! ([`super::clip::ClipTextModel::encode_with`]). The SD web UI's `TI hashes` are the first 12
//! hex digits of the file's SHA-256.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::open_checkpoint;

/// The most vectors one embedding may have (one prompt chunk's tokens).
pub const MAX_VECTORS: usize = 75;
/// The widest text encoder an embedding may be for.
const MAX_WIDTH: usize = 4096;

/// One loaded embedding.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// The word that calls it: the file's stem.
    pub name: String,
    /// The SD web UI's short hash of the file.
    pub hash: String,
    /// `(n, width)` vector sets, one per text-encoder width it has.
    sets: Vec<Tensor>,
}

impl TextualInversion {
    /// Reads an embedding file.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::InvalidModel {
            path: path.to_path_buf(),
            message,
        };
        let tensors = open_checkpoint(&[path.to_path_buf()])?;
        let all: Vec<String> = tensors.tensors().into_iter().map(|(n, _)| n).collect();
        let pick: Vec<&str> = if all.iter().any(|n| n == "clip_l" || n == "clip_g") {
            all.iter()
                .map(String::as_str)
                .filter(|n| *n == "clip_l" || *n == "clip_g")
                .collect()
        } else if let Some(n) = all
            .iter()
            .find(|n| *n == "emb_params" || n.starts_with("string_to_param."))
        {
            vec![n.as_str()]
        } else if all.len() == 1 {
            vec![all[0].as_str()]
        } else {
            return Err(bad(format!(
                "not a textual-inversion embedding: expected `emb_params`, `clip_l`/`clip_g` or \
                 `string_to_param`, found {} tensors",
                all.len()
            )));
        };
        let mut sets = Vec::new();
        for name in pick {
            let t = tensors
                .load(name, &Device::Cpu)
                .map_err(|e| bad(format!("`{name}`: {e}")))?
                .to_dtype(DType::F32)?;
            let t = match t.dims() {
                [w] => t.reshape((1, *w))?,
                [_, _] => t,
                other => return Err(bad(format!("`{name}` has shape {other:?}, not (n, width)"))),
            };
            let (n, w) = t.dims2()?;
            if !(1..=MAX_VECTORS).contains(&n) || !(1..=MAX_WIDTH).contains(&w) {
                return Err(bad(format!(
                    "`{name}` holds {n} vectors of {w}; 1 to {MAX_VECTORS} vectors of at most \
                     {MAX_WIDTH}"
                )));
            }
            sets.push(t);
        }
        Ok(Self {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            hash: file_hash(path)?,
            sets,
        })
    }

    /// The vectors for a text encoder `width` wide, if the embedding has them.
    pub fn vectors(&self, width: usize) -> Option<&Tensor> {
        self.sets
            .iter()
            .find(|t| t.dims2().is_ok_and(|(_, w)| w == width))
    }
}

/// The first 12 hex digits of the file's SHA-256.
pub fn file_hash(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::hub::download::hex(&hasher.finalize()[..6]))
}

/// The embedding files in `dir` (`.safetensors`, `.pt`, `.bin`), sorted.
pub fn list_dir(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| {
                ["safetensors", "pt", "bin"]
                    .iter()
                    .any(|x| e.eq_ignore_ascii_case(x))
            })
        })
        .collect();
    out.sort();
    out
}

/// Whether `word` appears in `text` as a whole word.
pub fn mentions(text: &str, word: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    !word.is_empty()
        && text.match_indices(word).any(|(i, _)| {
            text[..i].chars().next_back().is_none_or(|c| !is_word(c))
                && text[i + word.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !is_word(c))
        })
}

/// The embeddings among `files` that `texts` mention, loaded.
pub fn load_mentioned(files: &[PathBuf], texts: &[&str]) -> Result<Vec<TextualInversion>> {
    let mut out = Vec::new();
    for f in files {
        let Some(stem) = f.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        if texts.iter().any(|t| mentions(t, &stem)) {
            out.push(TextualInversion::load(f)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_found_whole() {
        assert!(mentions("a cat, easynegative, blurry", "easynegative"));
        assert!(mentions("easynegative", "easynegative"));
        assert!(!mentions("a cat, easynegative2", "easynegative"));
        assert!(!mentions("my-easynegative", "easynegative"));
    }
}
