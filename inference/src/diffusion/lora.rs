//! LoRA and LyCORIS networks for Stable Diffusion, in the formats model sites share, merged
//! into the weights as they load ([`LoraBackend`]): a model loaded with a set of LoRAs has
//! `W + Σ multiplier · ΔW` in place of `W`, and one loaded without them has the file's `W`
//! exactly, so toggling never drifts.
//!
//! Formats (one `.safetensors` file each):
//! - kohya / the SD web UI: `lora_unet_<module>` and `lora_te_<module>` (`lora_te1_` /
//!   `lora_te2_` for SDXL's two encoders), the module's dotted diffusers / transformers name
//!   with `_` for `.`, and
//!   - LoRA / LoCon: `lora_down.weight`, `lora_up.weight`, `alpha`, and for LoCon's CP
//!     decomposition `lora_mid.weight`: `ΔW = alpha / rank · up · (mid) · down`;
//!   - LoHa: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`:
//!     `ΔW = alpha / rank · (w1_a · w1_b) ⊙ (w2_a · w2_b)`;
//!   - LoKr: `lokr_w1` (or `lokr_w1_a`, `lokr_w1_b`), `lokr_w2` (or `lokr_w2_a`,
//!     `lokr_w2_b`), `alpha`: `ΔW = scale · w1 ⊗ w2`, the scale `alpha / rank` when a factor
//!     is decomposed, else 1;
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (or the older
//!   `.lora.down.weight` / `.lora.up.weight`), `text_encoder.<module>…`, with an optional
//!   `<module>.alpha`.
//!
//! Keys that name no module of the model (another base, or parts Studio does not run) are
//! counted and reported, not applied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::weights::open_checkpoint;

/// The most LoRA files applied at once.
pub const MAX_LORAS: usize = 32;
/// The largest rank accepted (published LoRAs use 4 to 256).
const MAX_RANK: usize = 4096;

/// One LoRA file and how strongly it applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// Multiplier of its UNet part.
    pub unet: f64,
    /// Multiplier of its text-encoder part.
    pub text: f64,
}

// The multipliers are finite numbers read from the user's settings or prompt: equality is
// total on them.
impl Eq for LoraSpec {}

/// Which network a weight belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// The UNet.
    Unet,
    /// The (first) text encoder.
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

/// What one file contributed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraReport {
    /// The file's stem (the name the prompt syntax uses).
    pub name: String,
    /// Modules it changed.
    pub applied: usize,
    /// Modules it names that this model does not have (another base model, or parts Studio
    /// does not run).
    pub ignored: usize,
    /// A few of the ignored modules, for messages.
    pub ignored_examples: Vec<String>,
    /// The SD web UI's short hash of the file (the first 12 hex digits of the SHA-256 of
    /// everything after the safetensors header), for `Lora hashes`.
    #[serde(default)]
    pub hash: String,
}

/// One low-rank term of a weight.
#[derive(Debug)]
enum Term {
    /// `scale · up · down` (LoRA, LoCon), with `mid` between for CP-decomposed convolutions.
    LowRank {
        up: Tensor,
        down: Tensor,
        mid: Option<Tensor>,
        scale: f64,
    },
    /// `scale · (w1a · w1b) ⊙ (w2a · w2b)` (LoHa).
    Hadamard {
        w1: (Tensor, Tensor),
        w2: (Tensor, Tensor),
        scale: f64,
    },
    /// `scale · w1 ⊗ w2` (LoKr).
    Kronecker { w1: Tensor, w2: Tensor, scale: f64 },
}

impl Term {
    /// `(rows, values)` of the `ΔW` this term makes, from its factors' shapes alone.
    fn size(&self) -> Option<(usize, usize)> {
        let rest = |t: &Tensor| Some(t.elem_count() / t.dim(0).ok()?.max(1));
        match self {
            Term::LowRank { up, down, mid, .. } => {
                let rows = up.dim(0).ok()?;
                let taps = match mid {
                    Some(m) => m.dims4().ok().map(|(_, _, kh, kw)| kh * kw)?,
                    None => 1,
                };
                Some((rows, rows * rest(down)? * taps))
            }
            Term::Hadamard { w1, .. } => {
                let rows = w1.0.dim(0).ok()?;
                Some((rows, rows * rest(&w1.1)?))
            }
            Term::Kronecker { w1, w2, .. } => Some((
                w1.dim(0).ok()? * w2.dim(0).ok()?,
                w1.elem_count() * w2.elem_count(),
            )),
        }
    }

    /// Whether the term makes a `ΔW` of `shape`.
    fn fits(&self, shape: &[usize]) -> bool {
        self.size() == Some((shape.first().copied().unwrap_or(0), shape.iter().product()))
    }

    /// `ΔW` in `shape` (f32, on the CPU).
    fn delta(&self, shape: &[usize]) -> Result<Tensor> {
        let flat = |t: &Tensor| -> Result<Tensor> {
            let d0 = t.dim(0)?;
            Ok(t.reshape((d0, t.elem_count() / d0.max(1)))?)
        };
        let out = match self {
            Term::LowRank {
                up,
                down,
                mid: None,
                scale,
            } => (flat(up)?.matmul(&flat(down)?)? * *scale)?,
            Term::LowRank {
                up,
                down,
                mid: Some(mid),
                scale,
            } => {
                // mid (r, r, kh, kw), down (r, in, 1, 1), up (out, r, 1, 1):
                // ΔW[o, i, y, x] = Σ_{a, b} up[o, a] · mid[a, b, y, x] · down[b, i].
                let (r1, r2, kh, kw) = mid.dims4()?;
                let up = flat(up)?;
                let down = flat(down)?;
                // (out, r1) · (r1, r2·kh·kw) → (out, r2, kh·kw)
                let t = up.matmul(&mid.reshape((r1, r2 * kh * kw))?)?.reshape((
                    up.dim(0)?,
                    r2,
                    kh * kw,
                ))?;
                // → (out, kh·kw, r2) · (r2, in) → (out, kh·kw, in) → (out, in, kh, kw)
                let t = t.transpose(1, 2)?.contiguous()?;
                let o = t.dim(0)?;
                let t = t
                    .reshape((o * kh * kw, r2))?
                    .matmul(&down)?
                    .reshape((o, kh, kw, down.dim(1)?))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?;
                (t * *scale)?
            }
            Term::Hadamard { w1, w2, scale } => {
                let a = w1.0.matmul(&flat(&w1.1)?)?;
                let b = w2.0.matmul(&flat(&w2.1)?)?;
                ((a * b)? * *scale)?
            }
            Term::Kronecker { w1, w2, scale } => {
                let (a0, a1) = w1.dims2()?;
                let w2 = flat(w2)?;
                let (b0, b1) = w2.dims2()?;
                // kron(A, B)[i·b0 + k, j·b1 + l] = A[i, j] · B[k, l]
                let k = w1
                    .reshape((a0, 1, a1, 1))?
                    .broadcast_mul(&w2.reshape((1, b0, 1, b1))?)?
                    .reshape((a0 * b0, a1 * b1))?;
                (k * *scale)?
            }
        };
        if out.elem_count() != shape.iter().product::<usize>() {
            return Err(Error::InvalidParameter(format!(
                "a LoRA term of {:?} values does not fit a weight of shape {shape:?}",
                out.elem_count()
            )));
        }
        Ok(out.reshape(shape)?)
    }
}

/// The LoRAs of one load: for each weight (diffusers / transformers name, e.g.
/// `down_blocks.0.attentions.0.proj_in.weight`) of each part, its terms.
#[derive(Debug, Default)]
pub struct LoraSet {
    terms: HashMap<(Part, String), Vec<Term>>,
    /// What each file did, in the order given.
    pub reports: Vec<LoraReport>,
}

/// The weights each part of the model has, with their shapes (its module names are the
/// names without `.weight`).
pub type PartNames = BTreeMap<Part, HashMap<String, Vec<usize>>>;

impl LoraSet {
    /// Whether anything applies.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Reads `specs` against the model's weight names.
    pub fn build(specs: &[LoraSpec], names: &PartNames) -> Result<Self> {
        if specs.len() > MAX_LORAS {
            return Err(Error::InvalidParameter(format!(
                "{} LoRAs at once; at most {MAX_LORAS}",
                specs.len()
            )));
        }
        // kohya's module names: the dotted name with `_` for `.`.
        let mut kohya: HashMap<(Part, String), String> = HashMap::new();
        let mut modules: HashSet<(Part, String)> = HashSet::new();
        for (part, list) in names {
            let per_block = layers_per_block(list.keys());
            for name in list.keys() {
                if let Some(module) = name.strip_suffix(".weight") {
                    kohya.insert((*part, module.replace('.', "_")), module.to_owned());
                    // SDXL's kohya files name the original UNet's blocks.
                    if *part == Part::Unet
                        && let Some(ldm) = ldm_alias(module, per_block)
                    {
                        kohya.insert((*part, ldm.replace('.', "_")), module.to_owned());
                    }
                    modules.insert((*part, module.to_owned()));
                }
            }
        }
        let mut set = LoraSet::default();
        for spec in specs {
            let report = set.add(spec, names, &kohya, &modules)?;
            set.reports.push(report);
        }
        Ok(set)
    }

    fn add(
        &mut self,
        spec: &LoraSpec,
        names: &PartNames,
        kohya: &HashMap<(Part, String), String>,
        modules: &HashSet<(Part, String)>,
    ) -> Result<LoraReport> {
        let path = &spec.path;
        let tensors = open_checkpoint(std::slice::from_ref(path))?;
        let bad = |message: String| Error::InvalidModel {
            path: path.clone(),
            message,
        };
        let mut groups: BTreeMap<(Part, String), HashMap<String, Tensor>> = BTreeMap::new();
        let mut ignored = std::collections::BTreeSet::new();
        for (key, _) in tensors.tensors() {
            let Some((part, module, field)) = split_key(&key, kohya, modules) else {
                ignored.insert(key.clone());
                continue;
            };
            let t = tensors
                .load(&key, &Device::Cpu)
                .map_err(|e| bad(format!("`{key}`: {e}")))?
                .to_dtype(DType::F32)?;
            groups
                .entry((part, module))
                .or_default()
                .insert(field.to_owned(), t);
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut applied = 0;
        let mut unknown_modules: Vec<String> = Vec::new();
        for ((part, module), fields) in groups {
            let multiplier = if part == Part::Unet {
                spec.unet
            } else {
                spec.text
            };
            let weight = format!("{module}.weight");
            let shape = names.get(&part).and_then(|n| n.get(&weight));
            match term(&fields, multiplier).map_err(|m| bad(format!("`{module}`: {m}")))? {
                // A module of the same name and another size: a LoRA for another base model.
                Some(t) if shape.is_some_and(|s| t.fits(s)) => {
                    applied += 1;
                    self.terms.entry((part, weight)).or_default().push(t);
                }
                Some(_) => unknown_modules.push(format!("{module} (another size)")),
                None => unknown_modules.push(module),
            }
        }
        // Keys that matched no module: count them by module.
        let mut ignored_modules: Vec<String> = ignored
            .iter()
            .map(|k| module_of_key(k).to_owned())
            .collect();
        ignored_modules.extend(unknown_modules);
        ignored_modules.sort();
        ignored_modules.dedup();
        Ok(LoraReport {
            name,
            applied,
            ignored: ignored_modules.len(),
            ignored_examples: ignored_modules.into_iter().take(3).collect(),
            hash: short_hash(path)?,
        })
    }

    /// `Σ ΔW` for weight `name` of `part` in `shape`, if any LoRA changes it.
    pub fn delta(&self, part: Part, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(terms) = self.terms.get(&(part, name.to_owned())) else {
            return Ok(None);
        };
        let mut sum: Option<Tensor> = None;
        for t in terms {
            let d = t.delta(shape)?;
            sum = Some(match sum {
                Some(s) => (s + d)?,
                None => d,
            });
        }
        Ok(sum)
    }
}

/// Resnets per down block (`down_blocks.0.resnets.N`), 2 when none are found.
fn layers_per_block<'a>(names: impl Iterator<Item = &'a String>) -> usize {
    names
        .filter_map(|n| {
            let rest = n.strip_prefix("down_blocks.0.resnets.")?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map_or(2, |m| m + 1)
}

/// The original (LDM / SGM) UNet's name of a diffusers UNet module, as SDXL's kohya LoRAs
/// name them: `down_blocks.1.attentions.0.…` → `input_blocks.4.1.…`, `mid_block.resnets.1.conv1`
/// → `middle_block.2.in_layers.2`, `up_blocks.0.attentions.2.…` → `output_blocks.2.1.…`.
fn ldm_alias(module: &str, per_block: usize) -> Option<String> {
    let resnet = |rest: &str| -> Option<String> {
        let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let renamed = match layer {
            "norm1" => "in_layers.0",
            "conv1" => "in_layers.2",
            "time_emb_proj" => "emb_layers.1",
            "norm2" => "out_layers.0",
            "conv2" => "out_layers.3",
            "conv_shortcut" => "skip_connection",
            _ => return None,
        };
        Some(if tail.is_empty() {
            renamed.to_owned()
        } else {
            format!("{renamed}.{tail}")
        })
    };
    let parts: Vec<&str> = module.splitn(5, '.').collect();
    match parts.as_slice() {
        ["down_blocks", b, kind, r, rest] => {
            let (b, r) = (b.parse::<usize>().ok()?, r.parse::<usize>().ok()?);
            match *kind {
                "resnets" => Some(format!(
                    "input_blocks.{}.0.{}",
                    1 + b * (per_block + 1) + r,
                    resnet(rest)?
                )),
                "attentions" => Some(format!(
                    "input_blocks.{}.1.{rest}",
                    1 + b * (per_block + 1) + r
                )),
                "downsamplers" if *rest == "conv" => {
                    Some(format!("input_blocks.{}.0.op", (b + 1) * (per_block + 1)))
                }
                _ => None,
            }
        }
        ["up_blocks", b, kind, r, rest] => {
            let (b, r) = (b.parse::<usize>().ok()?, r.parse::<usize>().ok()?);
            let index = b * (per_block + 1) + r;
            match *kind {
                "resnets" => Some(format!("output_blocks.{index}.0.{}", resnet(rest)?)),
                "attentions" => Some(format!("output_blocks.{index}.1.{rest}")),
                _ => None,
            }
        }
        ["mid_block", ..] => {
            let [_, kind, r, rest] = module.splitn(4, '.').collect::<Vec<_>>()[..] else {
                return None;
            };
            let r = r.parse::<usize>().ok()?;
            match kind {
                "resnets" => Some(format!("middle_block.{}.{}", 2 * r, resnet(rest)?)),
                "attentions" => Some(format!("middle_block.1.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The module part of a key (for reporting unknown keys).
fn module_of_key(key: &str) -> &str {
    for suffix in [
        ".lora_down.weight",
        ".lora_up.weight",
        ".lora_mid.weight",
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora.down.weight",
        ".lora.up.weight",
        ".alpha",
    ] {
        if let Some(m) = key.strip_suffix(suffix) {
            return m;
        }
    }
    key.rsplit_once('.').map_or(key, |(m, _)| m)
}

/// `(part, module, field)` of a LoRA key, the module as the model names it; `None` when it
/// names no module of the model.
fn split_key<'k>(
    key: &'k str,
    kohya: &HashMap<(Part, String), String>,
    modules: &HashSet<(Part, String)>,
) -> Option<(Part, String, &'k str)> {
    const FIELDS: [&str; 15] = [
        "lora_down.weight",
        "lora_up.weight",
        "lora_mid.weight",
        "lora_A.weight",
        "lora_B.weight",
        "lora.down.weight",
        "lora.up.weight",
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "lokr_w1",
        "lokr_w2",
        "alpha",
        "lokr_w1_a",
    ];
    const MORE: [&str; 3] = ["lokr_w1_b", "lokr_w2_a", "lokr_w2_b"];
    let (module, field) = FIELDS
        .iter()
        .chain(MORE.iter())
        .find_map(|f| Some((key.strip_suffix(f)?.strip_suffix('.')?, *f)))?;
    // kohya names.
    for (prefix, part) in [
        ("lora_unet_", Part::Unet),
        ("lora_te1_", Part::TextEncoder),
        ("lora_te2_", Part::TextEncoder2),
        ("lora_te_", Part::TextEncoder),
    ] {
        if let Some(rest) = module.strip_prefix(prefix) {
            let m = kohya.get(&(part, rest.to_owned()))?;
            return Some((part, m.clone(), field));
        }
    }
    // diffusers / PEFT names.
    for (prefix, part) in [
        ("unet.", Part::Unet),
        ("text_encoder.", Part::TextEncoder),
        ("text_encoder_2.", Part::TextEncoder2),
    ] {
        if let Some(rest) = module.strip_prefix(prefix) {
            // Older diffusers files name attention processors (`…attn1.processor.to_q_lora`);
            // those are not read.
            return modules
                .contains(&(part, rest.to_owned()))
                .then(|| (part, rest.to_owned(), field));
        }
    }
    None
}

/// The term of one module's fields, times `multiplier`; `None` when the fields make no term
/// Studio knows.
fn term(f: &HashMap<String, Tensor>, multiplier: f64) -> std::result::Result<Option<Term>, String> {
    let get = |k: &str| f.get(k).cloned();
    let alpha = match f.get("alpha") {
        Some(a) => Some(
            a.flatten_all()
                .and_then(|a| a.to_vec1::<f32>())
                .map_err(|e| e.to_string())?
                .first()
                .copied()
                .map(f64::from)
                .ok_or("an empty alpha")?,
        ),
        None => None,
    };
    let check_rank = |r: usize| {
        if r == 0 || r > MAX_RANK {
            Err(format!("rank {r}; 1 to {MAX_RANK} is accepted"))
        } else {
            Ok(r)
        }
    };
    let scale_for = |rank: usize| {
        // usize → f64: ranks are small.
        #[allow(clippy::cast_precision_loss)]
        let r = rank as f64;
        alpha.map_or(1.0, |a| a / r) * multiplier
    };
    let pair = |down: &str, up: &str| Some((get(down)?, get(up)?));
    if let Some((down, up)) = pair("lora_down.weight", "lora_up.weight")
        .or_else(|| pair("lora_A.weight", "lora_B.weight"))
        .or_else(|| pair("lora.down.weight", "lora.up.weight"))
    {
        let rank = check_rank(down.dim(0).map_err(|e| e.to_string())?)?;
        return Ok(Some(Term::LowRank {
            up,
            down,
            mid: get("lora_mid.weight"),
            scale: scale_for(rank),
        }));
    }
    if let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
        get("hada_w1_a"),
        get("hada_w1_b"),
        get("hada_w2_a"),
        get("hada_w2_b"),
    ) {
        let rank = check_rank(w1b.dim(0).map_err(|e| e.to_string())?)?;
        return Ok(Some(Term::Hadamard {
            w1: (w1a, w1b),
            w2: (w2a, w2b),
            scale: scale_for(rank),
        }));
    }
    let factor = |whole: &str,
                  a: &str,
                  b: &str|
     -> std::result::Result<Option<(Tensor, Option<usize>)>, String> {
        if let Some(w) = get(whole) {
            return Ok(Some((w, None)));
        }
        match (get(a), get(b)) {
            (Some(a), Some(b)) => {
                let rank = check_rank(b.dim(0).map_err(|e| e.to_string())?)?;
                let b2 = b
                    .reshape((b.dim(0).map_err(|e| e.to_string())?, ()))
                    .map_err(|e| e.to_string())?;
                Ok(Some((
                    a.matmul(&b2).map_err(|e| e.to_string())?,
                    Some(rank),
                )))
            }
            _ => Ok(None),
        }
    };
    if let (Some((w1, r1)), Some((w2, r2))) = (
        factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?,
        factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?,
    ) {
        let scale = match r1.or(r2) {
            Some(rank) => scale_for(rank),
            None => multiplier,
        };
        return Ok(Some(Term::Kronecker { w1, w2, scale }));
    }
    Ok(None)
}

/// A weight backend that adds a [`LoraSet`]'s `ΔW` to `part`'s weights as they load.
pub struct LoraBackend {
    inner: Box<dyn candle_nn::var_builder::SimpleBackend>,
    set: Arc<LoraSet>,
    part: Part,
}

impl LoraBackend {
    /// Wraps `inner`, whose names are `part`'s diffusers / transformers names.
    pub fn new(
        inner: Box<dyn candle_nn::var_builder::SimpleBackend>,
        set: Arc<LoraSet>,
        part: Part,
    ) -> Self {
        Self { inner, set, part }
    }

    fn merged(&self, t: Tensor, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        match self
            .set
            .delta(self.part, name, t.dims())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        {
            Some(d) => (t.to_dtype(DType::F32)? + d.to_device(t.device())?)?.to_dtype(dtype),
            None => Ok(t),
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for LoraBackend {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get(s, name, h, dtype, dev)?;
        self.merged(t, name, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        self.merged(t, name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// The SD web UI's short hash of a LoRA file, first 12 hex digits of a SHA-256: for a
/// safetensors file its "addnet" hash (the bytes after the header), for a pickle (`.pt`,
/// `.ckpt`) the whole file's.
pub fn short_hash(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if safetensors {
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
        let header = u64::from_le_bytes(len);
        file.seek(SeekFrom::Start(header.saturating_add(8)))
            .map_err(|e| Error::io(path, e))?;
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    Ok(crate::hub::download::hex(&digest[..6]))
}

/// A network named in a prompt: `<lora:NAME:WEIGHT>` or `<lora:NAME:UNET:TEXT>` (the SD web
/// UI's syntax; `<lyco:…>` too), the weight 1 when left out.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLora {
    /// The file's stem.
    pub name: String,
    /// Weight of its UNet part.
    pub unet: f64,
    /// Weight of its text-encoder part.
    pub text: f64,
}

/// The `<lora:…>` / `<lyco:…>` tags of `prompt`, and the prompt without them (what the text
/// encoder reads). Tags with a weight that is not a number are kept as text.
pub fn parse_prompt(prompt: &str) -> (Vec<PromptLora>, String) {
    let mut found = Vec::new();
    let mut text = String::with_capacity(prompt.len());
    let mut rest = prompt;
    while let Some(start) = rest.find('<') {
        text.push_str(&rest[..start]);
        let tail = &rest[start..];
        let Some(end) = tail.find('>') else {
            text.push_str(tail);
            rest = "";
            break;
        };
        let inner = &tail[1..end];
        let parsed = inner
            .strip_prefix("lora:")
            .or_else(|| inner.strip_prefix("lyco:"))
            .and_then(|body| {
                let mut parts = body.split(':');
                let name = parts.next()?.trim();
                let nums: Vec<f64> = parts
                    .map(|p| p.trim().parse::<f64>().ok().filter(|v| v.is_finite()))
                    .collect::<Option<_>>()?;
                if name.is_empty() || nums.len() > 2 {
                    return None;
                }
                let unet = nums.first().copied().unwrap_or(1.0).clamp(-10.0, 10.0);
                Some(PromptLora {
                    name: name.to_owned(),
                    unet,
                    text: nums.get(1).copied().unwrap_or(unet).clamp(-10.0, 10.0),
                })
            });
        match parsed {
            Some(l) => found.push(l),
            None => text.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    text.push_str(rest);
    (found, text)
}

/// The LoRA files in `dir` (`.safetensors`, and pickles `.pt` / `.ckpt`, which Studio's own
/// reader reads as data), by stem, sorted; a stem in both forms is its safetensors file.
pub fn list_dir(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["safetensors", "pt", "ckpt"]
                    .iter()
                    .any(|x| e.eq_ignore_ascii_case(x))
            })
        })
        .filter_map(|p| Some((p.file_stem()?.to_string_lossy().into_owned(), p)))
        .collect();
    // A name in both forms: the safetensors file (sorted first by the stable sort below).
    out.sort_by_key(|(name, p)| {
        let pickle = !p
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        (name.clone(), pickle)
    });
    out.dedup_by(|b, a| a.0 == b.0);
    out
}

/// A LoRA file as the gallery shows it, with what is found beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraEntry {
    /// The name `<lora:…>` uses: the file's stem.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// A preview image beside it: `NAME.preview.png` / `.jpg` / `.jpeg` / `.webp`, or
    /// `NAME.png` / `.jpg` / `.jpeg` / `.webp` (the SD web UI's conventions).
    pub preview: Option<PathBuf>,
    /// Its trigger words: the web UI's `NAME.json` "activation text", else a Civitai
    /// `NAME.civitai.info` "trainedWords", else the most frequent tags of the file's own
    /// kohya training metadata (`ss_tag_frequency`).
    pub trigger_words: Vec<String>,
    /// The web UI's "preferred weight" from `NAME.json`, when set.
    pub preferred_weight: Option<f64>,
}

/// The LoRAs of `dirs` (see [`list_dir`]; a name found in an earlier folder wins), with their
/// previews and trigger words, sorted by name.
pub fn gallery(dirs: &[PathBuf]) -> Vec<LoraEntry> {
    let mut out: Vec<LoraEntry> = Vec::new();
    for dir in dirs {
        for (name, path) in list_dir(dir) {
            if out.iter().any(|e| e.name == name) {
                continue;
            }
            let beside = |suffix: &str| {
                let p = dir.join(format!("{name}{suffix}"));
                p.is_file().then_some(p)
            };
            let preview = [
                ".preview.png",
                ".preview.jpg",
                ".preview.jpeg",
                ".preview.webp",
            ]
            .into_iter()
            .chain([".png", ".jpg", ".jpeg", ".webp"])
            .find_map(beside);
            let user = beside(".json").and_then(|p| small_json(&p));
            let activation = user
                .as_ref()
                .and_then(|v| v["activation text"].as_str())
                .map(split_words)
                .unwrap_or_default();
            let trigger_words = if activation.is_empty() {
                let civitai = beside(".civitai.info")
                    .and_then(|p| small_json(&p))
                    .and_then(|v| {
                        v["trainedWords"].as_array().map(|a| {
                            a.iter()
                                .filter_map(|w| w.as_str())
                                .flat_map(split_words)
                                .collect::<Vec<_>>()
                        })
                    })
                    .unwrap_or_default();
                if civitai.is_empty() {
                    training_tags(&path, 5)
                } else {
                    civitai
                }
            } else {
                activation
            };
            let preferred_weight = user
                .as_ref()
                .and_then(|v| v["preferred weight"].as_f64())
                .filter(|w| w.is_finite() && *w != 0.0);
            out.push(LoraEntry {
                name,
                path,
                preview,
                trigger_words,
                preferred_weight,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Comma-separated words, trimmed, the empty ones dropped.
fn split_words(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A JSON file of at most 1 MB.
fn small_json(path: &Path) -> Option<serde_json::Value> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > 1 << 20 {
        return None;
    }
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The `count` most frequent tags of a kohya LoRA's `ss_tag_frequency` metadata (a JSON
/// string of `{dataset: {tag: count}}` in the safetensors header; headers over 16 MB are not
/// read).
fn training_tags(path: &Path, count: usize) -> Vec<String> {
    use std::io::Read as _;
    let read = || -> Option<serde_json::Value> {
        let mut f = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).ok()?;
        let n = usize::try_from(u64::from_le_bytes(len)).ok()?;
        if n > 16 << 20 {
            return None;
        }
        let mut header = vec![0u8; n];
        f.read_exact(&mut header).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
        serde_json::from_str(v["__metadata__"]["ss_tag_frequency"].as_str()?).ok()
    };
    let Some(freq) = read() else {
        return Vec::new();
    };
    let mut totals: HashMap<String, u64> = HashMap::new();
    for tags in freq.as_object().into_iter().flat_map(|m| m.values()) {
        for (tag, n) in tags.as_object().into_iter().flatten() {
            *totals.entry(tag.trim().to_owned()).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    let mut tags: Vec<(String, u64)> = totals.into_iter().filter(|(t, _)| !t.is_empty()).collect();
    tags.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    tags.into_iter().take(count).map(|(t, _)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gallery_finds_previews_and_trigger_words_beside_the_files() {
        let a = tempfile::tempdir().expect("tmp");
        let b = tempfile::tempdir().expect("tmp");
        let header = |meta: &str| {
            let json = format!(r#"{{"__metadata__":{{"ss_tag_frequency":{meta}}}}}"#);
            let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
            bytes.extend(json.as_bytes());
            bytes
        };
        // Kohya metadata only: its most frequent tags.
        let tags = serde_json::to_string(
            r#"{"set1": {"inkwash": 40, " brush": 12}, "set2": {"inkwash": 5, "paper": 20}}"#,
        )
        .expect("json");
        std::fs::write(a.path().join("inkwash.safetensors"), header(&tags)).expect("write");
        std::fs::write(a.path().join("inkwash.preview.png"), b"png").expect("write");
        // The web UI's user metadata wins over Civitai's.
        std::fs::write(a.path().join("neon.safetensors"), header("\"{}\"")).expect("write");
        std::fs::write(a.path().join("neon.png"), b"png").expect("write");
        std::fs::write(
            a.path().join("neon.json"),
            r#"{"activation text": "neon glow, cyberpunk", "preferred weight": 0.7}"#,
        )
        .expect("write");
        std::fs::write(
            a.path().join("neon.civitai.info"),
            r#"{"trainedWords": ["other"]}"#,
        )
        .expect("write");
        // Civitai's words; a second folder's file of the same name is shadowed.
        std::fs::write(b.path().join("clay.safetensors"), b"not even a header").expect("write");
        std::fs::write(
            b.path().join("clay.civitai.info"),
            r#"{"trainedWords": ["claymation, plasticine"]}"#,
        )
        .expect("write");
        std::fs::write(b.path().join("neon.safetensors"), header("\"{}\"")).expect("write");
        let g = gallery(&[a.path().to_owned(), b.path().to_owned()]);
        let names: Vec<&str> = g.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["clay", "inkwash", "neon"]);
        assert_eq!(g[0].trigger_words, ["claymation", "plasticine"]);
        assert_eq!(g[0].preview, None);
        assert_eq!(g[1].trigger_words, ["inkwash", "paper", "brush"]);
        assert_eq!(
            g[1].preview.as_deref(),
            Some(a.path().join("inkwash.preview.png").as_path())
        );
        assert_eq!(g[2].trigger_words, ["neon glow", "cyberpunk"]);
        assert_eq!(g[2].preferred_weight, Some(0.7));
        assert_eq!(g[2].path, a.path().join("neon.safetensors"));
    }

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).expect("tensor")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().expect("flat").to_vec1().expect("vec")
    }

    #[test]
    fn each_term_gives_its_published_formula() {
        // LoRA: ΔW = scale · up · down.
        let up = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let down = t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]);
        let lr = Term::LowRank {
            up: up.clone(),
            down: down.clone(),
            mid: None,
            scale: 0.5,
        };
        assert_eq!(values(&lr.delta(&[2, 2]).expect("d")), [0.5, 1.0, 1.5, 2.0]);
        // LoHa: (w1a·w1b) ⊙ (w2a·w2b).
        let ha = Term::Hadamard {
            w1: (up.clone(), down.clone()),
            w2: (t(&[2.0, 0.0, 0.0, 2.0], &[2, 2]), down.clone()),
            scale: 1.0,
        };
        assert_eq!(values(&ha.delta(&[2, 2]).expect("d")), [2.0, 0.0, 0.0, 8.0]);
        // LoKr: kron([[1, 2]], [[1], [3]]) = [[1, 2], [3, 6]].
        let kr = Term::Kronecker {
            w1: t(&[1.0, 2.0], &[1, 2]),
            w2: t(&[1.0, 3.0], &[2, 1]),
            scale: 1.0,
        };
        assert_eq!(values(&kr.delta(&[2, 2]).expect("d")), [1.0, 2.0, 3.0, 6.0]);
        // LoCon with a CP mid: an identity mid gives up · down at every tap.
        let mid = t(&[1.0, 0.0, 0.0, 1.0], &[2, 2, 1, 1]);
        let cp = Term::LowRank {
            up: up.reshape((2, 2, 1, 1)).expect("r"),
            down: down.reshape((2, 2, 1, 1)).expect("r"),
            mid: Some(mid),
            scale: 1.0,
        };
        assert_eq!(
            values(&cp.delta(&[2, 2, 1, 1]).expect("d")),
            [1.0, 2.0, 3.0, 4.0]
        );
        assert!(
            lr.delta(&[3, 3]).is_err(),
            "a term of the wrong size is refused"
        );
    }

    #[test]
    fn sdxl_kohya_names_are_the_original_unets() {
        let cases = [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "down_blocks.2.attentions.1.proj_in",
                "input_blocks.8.1.proj_in",
            ),
            (
                "down_blocks.0.resnets.1.conv1",
                "input_blocks.2.0.in_layers.2",
            ),
            ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
            (
                "mid_block.resnets.1.time_emb_proj",
                "middle_block.2.emb_layers.1",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.3.ff.net.2",
                "middle_block.1.transformer_blocks.3.ff.net.2",
            ),
            (
                "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k",
                "output_blocks.2.1.transformer_blocks.9.attn2.to_k",
            ),
            (
                "up_blocks.1.resnets.0.conv_shortcut",
                "output_blocks.3.0.skip_connection",
            ),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(ldm_alias(diffusers, 2).as_deref(), Some(ldm), "{diffusers}");
        }
        assert_eq!(ldm_alias("conv_in", 2), None);
    }

    #[test]
    fn prompt_tags_name_networks_and_leave_the_text() {
        let (l, text) = parse_prompt("a cat <lora:ink:0.6>, <lyco:paper> on a mat <lora:x:0.5:1>");
        assert_eq!(text, "a cat ,  on a mat ");
        assert_eq!(
            l,
            [
                PromptLora {
                    name: "ink".into(),
                    unet: 0.6,
                    text: 0.6
                },
                PromptLora {
                    name: "paper".into(),
                    unet: 1.0,
                    text: 1.0
                },
                PromptLora {
                    name: "x".into(),
                    unet: 0.5,
                    text: 1.0
                },
            ]
        );
        // Not tags: kept as typed.
        let (l, text) = parse_prompt("a <b> c <lora:y:heavy> <unclosed");
        assert!(l.is_empty());
        assert_eq!(text, "a <b> c <lora:y:heavy> <unclosed");
    }

    #[test]
    fn keys_find_their_modules_in_both_namings() {
        let names: PartNames = BTreeMap::from([
            (
                Part::Unet,
                HashMap::from([(
                    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight".to_owned(),
                    vec![4, 4],
                )]),
            ),
            (
                Part::TextEncoder,
                HashMap::from([(
                    "text_model.encoder.layers.0.self_attn.q_proj.weight".to_owned(),
                    vec![4, 4],
                )]),
            ),
        ]);
        let mut kohya = HashMap::new();
        let mut modules = HashSet::new();
        for (part, list) in &names {
            for n in list.keys() {
                let m = n.strip_suffix(".weight").expect("weight");
                kohya.insert((*part, m.replace('.', "_")), m.to_owned());
                modules.insert((*part, m.to_owned()));
            }
        }
        let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        assert_eq!(
            split_key(
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                &kohya,
                &modules
            ),
            Some((Part::Unet, q.to_owned(), "lora_down.weight"))
        );
        assert_eq!(
            split_key(&format!("unet.{q}.lora_B.weight"), &kohya, &modules),
            Some((Part::Unet, q.to_owned(), "lora_B.weight"))
        );
        assert_eq!(
            split_key(
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                &kohya,
                &modules
            ),
            Some((
                Part::TextEncoder,
                "text_model.encoder.layers.0.self_attn.q_proj".to_owned(),
                "alpha"
            ))
        );
        // An SDXL key on this model names nothing.
        assert_eq!(
            split_key(
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight",
                &kohya,
                &modules
            ),
            None
        );
    }
}
