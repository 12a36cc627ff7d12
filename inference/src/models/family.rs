//! The registry of language-model families (GPT-2 aside, which has its own loader): the one
//! place that knows a family's names in Hugging Face `config.json` files (`model_type`) and in
//! GGUF files (`general.architecture`), and what the error messages list as supported.
//!
//! Adding a family starts here: a variant, its row in `FAMILIES`, then its loaders (see
//! `ARCHITECTURE.md`).

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

/// A decoder-only model family Studio loads from Hugging Face folders and GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    /// Llama 2/3.x, SmolLM2, TinyLlama: `model_type` and GGUF architecture `llama`.
    Llama,
    /// Mistral: `model_type` `mistral`; its GGUF files say `llama` and load as [`Family::Llama`].
    Mistral,
    /// Qwen2 and Qwen2.5: `model_type` and GGUF architecture `qwen2`.
    Qwen2,
    /// Qwen3: `model_type` and GGUF architecture `qwen3`.
    Qwen3,
    /// Phi-3 and Phi-3.5: `model_type` and GGUF architecture `phi3`.
    Phi3,
    /// Gemma 2: `model_type` and GGUF architecture `gemma2`.
    Gemma2,
    /// Gemma 3, text only: `model_type` `gemma3_text` or `gemma3`, GGUF architecture `gemma3`.
    Gemma3,
}

/// One family's names.
struct Names {
    family: Family,
    /// Shown in the UI.
    label: &'static str,
    /// The checkpoints it covers, for the supported-architectures messages.
    covers: &'static str,
    /// `config.json`'s `model_type` values.
    model_types: &'static [&'static str],
    /// The GGUF `general.architecture` value; `None` where llama.cpp writes the family's
    /// files under another family's name (Mistral GGUFs say `llama`).
    gguf: Option<&'static str>,
}

/// Every family, in the order the messages list them.
const FAMILIES: &[Names] = &[
    Names {
        family: Family::Llama,
        label: "Llama",
        covers: "Llama 2/3.x, SmolLM2, TinyLlama",
        model_types: &["llama"],
        gguf: Some("llama"),
    },
    Names {
        family: Family::Mistral,
        label: "Mistral",
        covers: "",
        model_types: &["mistral"],
        gguf: None,
    },
    Names {
        family: Family::Qwen2,
        label: "Qwen2",
        covers: "Qwen2, Qwen2.5",
        model_types: &["qwen2"],
        gguf: Some("qwen2"),
    },
    Names {
        family: Family::Qwen3,
        label: "Qwen3",
        covers: "",
        model_types: &["qwen3"],
        gguf: Some("qwen3"),
    },
    Names {
        family: Family::Phi3,
        label: "Phi-3",
        covers: "Phi-3, Phi-3.5",
        model_types: &["phi3"],
        gguf: Some("phi3"),
    },
    Names {
        family: Family::Gemma2,
        label: "Gemma 2",
        covers: "",
        model_types: &["gemma2"],
        gguf: Some("gemma2"),
    },
    Names {
        family: Family::Gemma3,
        label: "Gemma 3",
        covers: "text",
        model_types: &["gemma3_text", "gemma3"],
        gguf: Some("gemma3"),
    },
];

impl Family {
    /// Every family.
    pub fn all() -> impl Iterator<Item = Family> {
        FAMILIES.iter().map(|n| n.family)
    }

    fn names(self) -> &'static Names {
        // Every variant has its row (a test checks it).
        FAMILIES
            .iter()
            .find(|n| n.family == self)
            .unwrap_or(&FAMILIES[0])
    }

    /// From `config.json`'s `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        FAMILIES
            .iter()
            .find(|n| n.model_types.contains(&model_type))
            .map(|n| n.family)
    }

    /// From a GGUF file's `general.architecture`.
    pub fn from_gguf_architecture(arch: &str) -> Option<Self> {
        FAMILIES
            .iter()
            .find(|n| n.gguf == Some(arch))
            .map(|n| n.family)
    }

    /// The name shown in the UI.
    pub fn label(self) -> &'static str {
        self.names().label
    }

    /// Gemma 2 or Gemma 3 (Studio's own quantized model runs their GGUF files).
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

/// `label (covers)`, or the label alone.
fn described(n: &Names) -> String {
    if n.covers.is_empty() {
        n.label.to_owned()
    } else {
        format!("{} ({})", n.label, n.covers)
    }
}

/// The families a Hugging Face folder may hold, for error messages.
pub fn supported_hf() -> &'static str {
    static TEXT: LazyLock<String> = LazyLock::new(|| {
        FAMILIES
            .iter()
            .map(described)
            .collect::<Vec<_>>()
            .join(", ")
    });
    &TEXT
}

/// The GGUF architectures Studio reads, with the families written under each, for error
/// messages.
pub fn supported_gguf() -> &'static str {
    static TEXT: LazyLock<String> = LazyLock::new(gguf_list);
    &TEXT
}

fn gguf_list() -> String {
    let list: Vec<String> = FAMILIES
        .iter()
        .filter_map(|n| {
            let arch = n.gguf?;
            // Families llama.cpp writes under this one's name.
            let guests: Vec<&str> = FAMILIES
                .iter()
                .filter(|g| g.gguf.is_none() && arch == "llama" && g.family != n.family)
                .map(|g| g.label)
                .collect();
            let covers = [n.covers]
                .into_iter()
                .chain(guests)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(", ");
            Some(if covers.is_empty() {
                format!("{} (`{arch}`)", n.label)
            } else {
                format!("{} ({covers}: `{arch}`)", n.label)
            })
        })
        .collect();
    format!("GGUF files of {}", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_one_row_and_names_round_trip() {
        let variants = [
            Family::Llama,
            Family::Mistral,
            Family::Qwen2,
            Family::Qwen3,
            Family::Phi3,
            Family::Gemma2,
            Family::Gemma3,
        ];
        for f in variants {
            assert_eq!(
                FAMILIES.iter().filter(|n| n.family == f).count(),
                1,
                "{f:?}"
            );
            for t in f.names().model_types {
                assert_eq!(Family::from_model_type(t), Some(f));
            }
            if let Some(a) = f.names().gguf {
                assert_eq!(Family::from_gguf_architecture(a), Some(f));
            }
        }
        assert_eq!(Family::all().count(), variants.len());
        assert_eq!(Family::from_model_type("gpt2"), None);
        assert_eq!(Family::from_gguf_architecture("mistral"), None);
        assert!(
            supported_gguf().contains("Llama (Llama 2/3.x, SmolLM2, TinyLlama, Mistral: `llama`)")
        );
        assert!(supported_hf().contains("Gemma 3 (text)"));
    }
}
