//! Stable Diffusion single-file checkpoints in the original (LDM) naming, read as diffusers
//! names.
//!
//! Most SD checkpoints people have are one `*.safetensors` file holding every component under
//! the names of the original training code: the UNet under `model.diffusion_model.`
//! (`input_blocks` / `middle_block` / `output_blocks`), the VAE under `first_stage_model.`, and
//! the text encoders under `cond_stage_model.` (SD 1.x, SD 2.x) or `conditioner.embedders.N.`
//! (SDXL). Studio's model code asks for diffusers / transformers names. This module maps one
//! to the other without copying the file:
//!
//! - [`detect_kind`] tells SD 1.x, SD 2.x and SDXL apart by the text encoders' prefixes;
//! - [`key_map`] maps each diffusers name of one [`Component`] to its [`Source`] in the file;
//!   the UNet's level / block structure is read from the names present ([`unet_layout`]), so
//!   SD 1.x/2.x (4 levels), SDXL (3 levels, several transformer blocks) and tiny test UNets
//!   all map;
//! - [`var_builder`] serves a `candle_nn::VarBuilder` over the memory-mapped file that answers
//!   diffusers names, reading each tensor only when asked for and converting it then (rows of
//!   OpenCLIP's fused q/k/v, the transposed `text_projection`, 1×1-conv VAE attention weights
//!   squeezed to linear ones).
//!
//! The mapping is the one diffusers' `single_file_utils` applies (checked against it in
//! `tests/tests/single_file.rs` with the fixture from `tools/make_ldm_fixture.py`), with one
//! deliberate difference: diffusers drops SD 2.x's last OpenCLIP layer (`resblocks.23`) by
//! name, while here every layer is mapped and the text encoder simply asks for the layers it
//! builds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::weights::Tensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::error::{Error, Result};

/// One model of a Stable Diffusion checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// The denoising UNet (diffusers `UNet2DConditionModel`).
    Unet,
    /// The autoencoder (diffusers `AutoencoderKL`).
    Vae,
    /// The (first) text encoder: CLIP ViT-L for SD 1.x and SDXL, OpenCLIP ViT-H for SD 2.x.
    TextEncoder,
    /// SDXL's second text encoder, OpenCLIP ViT-bigG with its projection.
    TextEncoder2,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Unet => "UNet",
            Component::Vae => "VAE",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "second text encoder",
        })
    }
}

/// What the checkpoint holds, detected from its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointKind {
    /// SD 1.x: CLIP text encoder under `cond_stage_model.transformer.`.
    Sd1,
    /// SD 2.x: OpenCLIP text encoder under `cond_stage_model.model.`.
    Sd2,
    /// SDXL: two text encoders under `conditioner.embedders.`.
    Sdxl,
}

/// Tells the checkpoint's family from its tensor names (the text encoders' prefixes); `None`
/// when it has no text encoder Studio recognises.
pub fn detect_kind(names: &[&str]) -> Option<CheckpointKind> {
    let any = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    if any("conditioner.embedders.") {
        Some(CheckpointKind::Sdxl)
    } else if any("cond_stage_model.model.") {
        Some(CheckpointKind::Sd2)
    } else if any("cond_stage_model.transformer.") {
        Some(CheckpointKind::Sd1)
    } else {
        None
    }
}

/// Where a diffusers-named tensor comes from (LDM names are full names in the file).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// The tensor itself, unchanged.
    Tensor(String),
    /// Rows `[index*n/parts .. (index+1)*n/parts)` of a fused tensor (OpenCLIP's in_proj q/k/v).
    Chunk {
        /// The fused tensor's name in the checkpoint.
        name: String,
        /// Which part to take, `0..parts`.
        index: usize,
        /// How many equal parts the rows split into (3 for q/k/v).
        parts: usize,
    },
    /// The transpose of a 2-D tensor (OpenCLIP's `text_projection`).
    Transposed(String),
    /// A 1×1 convolution weight `[out, in, 1, 1]` used as a linear weight `[out, in]`.
    Squeezed(String),
}

impl Source {
    /// The name of the tensor in the checkpoint.
    pub fn ldm_name(&self) -> &str {
        match self {
            Source::Tensor(n) | Source::Transposed(n) | Source::Squeezed(n) => n,
            Source::Chunk { name, .. } => name,
        }
    }

    /// Reads the tensor from the checkpoint and converts it to what the diffusers name means.
    fn load(&self, st: &Tensors, dev: &Device) -> candle_core::Result<Tensor> {
        let t = st.load(self.ldm_name(), dev)?;
        match self {
            Source::Tensor(_) => Ok(t),
            Source::Chunk { index, parts, .. } => {
                let n = t.dim(0)?;
                let (start, end) = (index * n / parts, (index + 1) * n / parts);
                t.narrow(0, start, end - start)?.contiguous()
            }
            Source::Transposed(_) => t.t()?.contiguous(),
            Source::Squeezed(_) => {
                if t.rank() > 2 {
                    t.flatten_from(1)
                } else {
                    Ok(t)
                }
            }
        }
    }
}

/// The prefix of `component`'s tensors in a `kind` checkpoint.
fn prefix_of(kind: CheckpointKind, component: Component) -> Result<&'static str> {
    Ok(match (kind, component) {
        (_, Component::Unet) => "model.diffusion_model.",
        (_, Component::Vae) => "first_stage_model.",
        (CheckpointKind::Sd1, Component::TextEncoder) => "cond_stage_model.transformer.",
        (CheckpointKind::Sd2, Component::TextEncoder) => "cond_stage_model.model.",
        (CheckpointKind::Sdxl, Component::TextEncoder) => "conditioner.embedders.0.transformer.",
        (CheckpointKind::Sdxl, Component::TextEncoder2) => "conditioner.embedders.1.model.",
        (_, Component::TextEncoder2) => {
            return Err(Error::InvalidParameter(format!(
                "a {kind:?} checkpoint has no second text encoder (only SDXL has one)"
            )));
        }
    })
}

/// Maps each diffusers name of `component` to where it comes from in a single-file checkpoint
/// with the tensor names `ldm_names`. Names of other components (and names the component's
/// diffusers model has no use for, like OpenCLIP's `logit_scale`) are ignored.
///
/// Fails when the checkpoint holds no tensor of the component at all, or when the UNet's
/// block structure cannot be read from its names.
pub fn key_map(
    kind: CheckpointKind,
    component: Component,
    ldm_names: &[&str],
) -> Result<HashMap<String, Source>> {
    let mut prefix = prefix_of(kind, component)?;
    let mut names: Vec<&str> = ldm_names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix))
        .collect();
    if names.is_empty() && kind == CheckpointKind::Sdxl && component == Component::TextEncoder2 {
        // The SDXL refiner has OpenCLIP bigG alone, as the first embedder.
        prefix = "conditioner.embedders.0.model.";
        names = ldm_names
            .iter()
            .filter_map(|n| n.strip_prefix(prefix))
            .collect();
    }
    if names.is_empty() && component == Component::Vae {
        // Some merges store the VAE as `vae.` (diffusers accepts both).
        prefix = "vae.";
        names = ldm_names
            .iter()
            .filter_map(|n| n.strip_prefix(prefix))
            .collect();
    }
    if names.is_empty() {
        return Err(Error::InvalidParameter(format!(
            "this {kind:?} checkpoint has no {component} (no tensor is named `{prefix}…`); \
             load that part from a separate file"
        )));
    }
    let pairs = match component {
        Component::Unet => unet_map(kind, &names)?,
        Component::Vae => vae_map(&names),
        Component::TextEncoder | Component::TextEncoder2 => {
            if prefix.ends_with(".model.") {
                open_clip_map(&names, component == Component::TextEncoder2)
            } else {
                // transformers' CLIP names already, under a prefix.
                names
                    .iter()
                    .map(|n| ((*n).to_owned(), Source::Tensor((*n).to_owned())))
                    .collect()
            }
        }
    };
    Ok(prefixed(prefix, pairs))
}

/// `pairs` with `prefix` put back before each checkpoint name.
fn prefixed(prefix: &str, pairs: Vec<(String, Source)>) -> HashMap<String, Source> {
    pairs
        .into_iter()
        .map(|(diffusers, source)| {
            let full = |n: String| format!("{prefix}{n}");
            let source = match source {
                Source::Tensor(n) => Source::Tensor(full(n)),
                Source::Transposed(n) => Source::Transposed(full(n)),
                Source::Squeezed(n) => Source::Squeezed(full(n)),
                Source::Chunk { name, index, parts } => Source::Chunk {
                    name: full(name),
                    index,
                    parts,
                },
            };
            (diffusers, source)
        })
        .collect()
}

/// Maps each diffusers `ControlNetModel` name to its tensor in a ControlNet file in the
/// original names (lllyasviel's ControlNet, as the SD web UI's extension and ComfyUI load
/// them), with or without the `control_model.` prefix: the UNet's encoder half under the
/// UNet's own names (`time_embed`, `label_emb` on SDXL, `input_blocks`, `middle_block`), the
/// hint encoder `input_hint_block.K` (convolutions at even K, SiLUs between: the first is
/// `conv_in`, the last `conv_out`, the rest `blocks.N` in order), `zero_convs.N.0` and
/// `middle_block_out.0`.
pub fn controlnet_key_map(names: &[&str]) -> Result<HashMap<String, Source>> {
    let prefix = if names.iter().any(|n| n.starts_with("control_model.")) {
        "control_model."
    } else {
        ""
    };
    let names: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix))
        .collect();
    if !names.iter().any(|n| n.starts_with("input_hint_block.")) {
        return Err(Error::InvalidParameter(
            "this file is not a ControlNet: it has no `input_hint_block` (the control image's \
             encoder)"
                .into(),
        ));
    }
    let unet_names: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| {
            [
                "time_embed.",
                "label_emb.",
                "input_blocks.",
                "middle_block.",
            ]
            .iter()
            .any(|p| n.starts_with(p))
        })
        .collect();
    let kind = if unet_names.iter().any(|n| n.starts_with("label_emb.")) {
        CheckpointKind::Sdxl
    } else {
        CheckpointKind::Sd1
    };
    let mut pairs = unet_map(kind, &unet_names)?;
    let put = |pairs: &mut Vec<(String, Source)>, diffusers: String, name: &str| {
        pairs.push((diffusers, Source::Tensor(name.to_owned())));
    };
    let hint: BTreeSet<usize> = names
        .iter()
        .filter_map(|n| n.strip_prefix("input_hint_block."))
        .filter_map(|r| split_index(r).map(|(k, _)| k))
        .collect();
    let hint: Vec<usize> = hint.into_iter().collect();
    for name in &names {
        if let Some((k, tail)) = name.strip_prefix("input_hint_block.").and_then(split_index) {
            let Some(pos) = hint.iter().position(|&h| h == k) else {
                continue;
            };
            let module = if pos == 0 {
                "conv_in".to_owned()
            } else if pos + 1 == hint.len() {
                "conv_out".to_owned()
            } else {
                format!("blocks.{}", pos - 1)
            };
            put(
                &mut pairs,
                format!("controlnet_cond_embedding.{module}.{tail}"),
                name,
            );
        } else if let Some((n, tail)) = name.strip_prefix("zero_convs.").and_then(split_index) {
            if let Some(tail) = tail.strip_prefix("0.") {
                put(
                    &mut pairs,
                    format!("controlnet_down_blocks.{n}.{tail}"),
                    name,
                );
            }
        } else if let Some(tail) = name.strip_prefix("middle_block_out.0.") {
            put(&mut pairs, format!("controlnet_mid_block.{tail}"), name);
        }
    }
    Ok(prefixed(prefix, pairs))
}

// ----------------------------------------------------------------------------------------------
// UNet

/// One resolution level of a UNet, as read from its LDM names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLevel {
    /// ResNet blocks on the way down (`layers_per_block`); the way up has one more.
    pub layers: usize,
    /// Whether the level's blocks have cross-attention transformers.
    pub attention: bool,
    /// Transformer blocks in each of the level's attentions (0 without attention).
    pub transformer_blocks: usize,
}

/// The structure of an LDM UNet, read from its names (see [`unet_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// Levels from the highest resolution down; every level but the last downsamples.
    pub levels: Vec<UnetLevel>,
    /// Transformer blocks in the middle block's attention (0 without one).
    pub mid_transformer_blocks: usize,
    /// SDXL's size / text-embedding conditioning (`label_emb`).
    pub label_embedding: bool,
}

/// `(block index, slot, rest)` of `input_blocks.I.S.rest` style names under `group`.
fn blocks<'a>(names: &[&'a str], group: &str) -> BTreeMap<usize, Vec<(usize, &'a str)>> {
    let mut out: BTreeMap<usize, Vec<(usize, &str)>> = BTreeMap::new();
    for name in names {
        let Some(rest) = name.strip_prefix(group).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        let Some((block, rest)) = split_index(rest) else {
            continue;
        };
        let Some((slot, rest)) = split_index(rest) else {
            continue;
        };
        out.entry(block).or_default().push((slot, rest));
    }
    out
}

/// `"12.rest"` → `(12, "rest")`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (head, rest) = s.split_once('.')?;
    Some((head.parse().ok()?, rest))
}

/// Number of distinct `transformer_blocks.K` under the given (slot 1) names.
fn transformer_depth<'a>(rests: impl Iterator<Item = &'a str>) -> usize {
    rests
        .filter_map(|r| r.strip_prefix("transformer_blocks."))
        .filter_map(|r| split_index(r).map(|(k, _)| k))
        .collect::<BTreeSet<_>>()
        .len()
}

/// Reads a UNet's level / block structure from its LDM names (without the
/// `model.diffusion_model.` prefix, or with it): `input_blocks.0` is `conv_in`; then each level is its
/// ResNet(+attention) blocks followed, except at the last level, by a block holding only a
/// downsampler (`.0.op`). The way up (`output_blocks`) mirrors it with one more block per
/// level, a level ending at the block that holds an upsampler (`.1.conv` / `.2.conv`).
pub fn unet_layout(names: &[&str]) -> Result<UnetLayout> {
    let stripped: Vec<&str> = names
        .iter()
        .map(|n| n.strip_prefix("model.diffusion_model.").unwrap_or(n))
        .collect();
    let names = stripped.as_slice();
    let bad = |what: String| {
        Error::InvalidParameter(format!(
            "the UNet of this checkpoint has an unexpected layout: {what}"
        ))
    };
    let input = blocks(names, "input_blocks");
    let mut levels = Vec::new();
    let mut current = UnetLevel {
        layers: 0,
        attention: false,
        transformer_blocks: 0,
    };
    for (&i, parts) in input.range(1..) {
        if parts
            .iter()
            .any(|(slot, rest)| *slot == 0 && rest.starts_with("op."))
        {
            levels.push(std::mem::replace(
                &mut current,
                UnetLevel {
                    layers: 0,
                    attention: false,
                    transformer_blocks: 0,
                },
            ));
            continue;
        }
        current.layers += 1;
        let depth = transformer_depth(parts.iter().filter(|(slot, _)| *slot == 1).map(|(_, r)| *r));
        if depth > 0 {
            current.attention = true;
            current.transformer_blocks = current.transformer_blocks.max(depth);
        }
        if !parts.iter().any(|(slot, _)| *slot == 0) {
            return Err(bad(format!("input block {i} has no ResNet")));
        }
    }
    if current.layers == 0 {
        return Err(bad("no ResNet blocks after the last downsampler".into()));
    }
    levels.push(current);
    if levels.iter().any(|l| l.layers == 0) {
        return Err(bad("a level without ResNet blocks".into()));
    }
    // The middle block's names are `middle_block.K.rest`: ResNet, attention (K = 1), ResNet.
    let mid_depth = transformer_depth(
        names
            .iter()
            .filter_map(|n| n.strip_prefix("middle_block.1.")),
    );
    Ok(UnetLayout {
        levels,
        mid_transformer_blocks: mid_depth,
        label_embedding: names.iter().any(|n| n.starts_with("label_emb.")),
    })
}

/// LDM ResNet parameter names → diffusers' (the part after the block's own prefix).
fn resnet_rest(rest: &str) -> String {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (ldm, diffusers) in MAP {
        if let Some(tail) = rest.strip_prefix(ldm) {
            return format!("{diffusers}{tail}");
        }
    }
    rest.to_owned()
}

fn unet_map(kind: CheckpointKind, names: &[&str]) -> Result<Vec<(String, Source)>> {
    let mut out: Vec<(String, Source)> = Vec::new();
    let mut put = |diffusers: String, ldm: &str| out.push((diffusers, Source::Tensor(ldm.into())));
    let label = if kind == CheckpointKind::Sdxl {
        "add_embedding"
    } else {
        "class_embedding"
    };
    let top = [
        ("time_embed.0.", "time_embedding.linear_1.".to_owned()),
        ("time_embed.2.", "time_embedding.linear_2.".to_owned()),
        ("label_emb.0.0.", format!("{label}.linear_1.")),
        ("label_emb.0.2.", format!("{label}.linear_2.")),
        ("input_blocks.0.0.", "conv_in.".to_owned()),
        ("out.0.", "conv_norm_out.".to_owned()),
        ("out.2.", "conv_out.".to_owned()),
    ];
    for name in names {
        for (ldm, diffusers) in &top {
            if let Some(tail) = name.strip_prefix(ldm) {
                put(format!("{diffusers}{tail}"), name);
            }
        }
        if *name == "label_emb.weight" {
            put("class_embedding.weight".into(), name);
        }
    }

    // Way down: walk the input blocks, a downsampler closing each level.
    let input = blocks(names, "input_blocks");
    let (mut level, mut layer) = (0usize, 0usize);
    for (&i, parts) in input.range(1..) {
        let downsampler = parts
            .iter()
            .any(|(slot, rest)| *slot == 0 && rest.starts_with("op."));
        for &(slot, rest) in parts {
            let ldm = format!("input_blocks.{i}.{slot}.{rest}");
            let diffusers = match (slot, rest.strip_prefix("op.")) {
                (0, Some(tail)) => format!("down_blocks.{level}.downsamplers.0.conv.{tail}"),
                (0, None) if !downsampler => {
                    format!("down_blocks.{level}.resnets.{layer}.{}", resnet_rest(rest))
                }
                (1, _) if !downsampler => format!("down_blocks.{level}.attentions.{layer}.{rest}"),
                _ => continue,
            };
            put(diffusers, &ldm);
        }
        if downsampler {
            level += 1;
            layer = 0;
        } else {
            layer += 1;
        }
    }

    // Middle: ResNet, attention, ResNet.
    for name in names {
        let Some((k, rest)) = name.strip_prefix("middle_block.").and_then(split_index) else {
            continue;
        };
        let diffusers = if k % 2 == 0 {
            format!("mid_block.resnets.{}.{}", k / 2, resnet_rest(rest))
        } else {
            format!("mid_block.attentions.{}.{rest}", k / 2)
        };
        put(diffusers, name);
    }

    // Way up: an upsampler (`.1.conv` after a ResNet, `.2.conv` after an attention) closes
    // each level but the last.
    let output = blocks(names, "output_blocks");
    let (mut level, mut layer) = (0usize, 0usize);
    for (&i, parts) in &output {
        let is_upsampler = |slot: usize, rest: &str| slot >= 1 && rest.starts_with("conv.");
        let mut closes = false;
        for &(slot, rest) in parts {
            let ldm = format!("output_blocks.{i}.{slot}.{rest}");
            let diffusers = if is_upsampler(slot, rest) {
                closes = true;
                format!("up_blocks.{level}.upsamplers.0.{rest}")
            } else if slot == 0 {
                format!("up_blocks.{level}.resnets.{layer}.{}", resnet_rest(rest))
            } else if slot == 1 {
                format!("up_blocks.{level}.attentions.{layer}.{rest}")
            } else {
                continue;
            };
            put(diffusers, &ldm);
        }
        if closes {
            level += 1;
            layer = 0;
        } else {
            layer += 1;
        }
    }

    // Check the structure both ways agree, so a checkpoint we misread fails here rather than
    // loading weights into the wrong layers.
    let layout = unet_layout(names)?;
    if level + 1 != layout.levels.len() && !output.is_empty() {
        return Err(Error::InvalidParameter(format!(
            "the UNet of this checkpoint has an unexpected layout: {} levels on the way down \
             but {} on the way up",
            layout.levels.len(),
            level + 1
        )));
    }
    Ok(out)
}

// ----------------------------------------------------------------------------------------------
// VAE

fn vae_map(names: &[&str]) -> Vec<(String, Source)> {
    // diffusers numbers the decoder's up blocks from the lowest resolution: reversed.
    let up_levels = names
        .iter()
        .filter_map(|n| n.strip_prefix("decoder.up."))
        .filter_map(|r| split_index(r).map(|(i, _)| i + 1))
        .max()
        .unwrap_or(0);
    let mut out = Vec::new();
    for name in names {
        let Some((side, rest)) = name.split_once('.') else {
            continue;
        };
        let mapped = match side {
            "quant_conv" | "post_quant_conv" => Some(((*name).to_owned(), false)),
            "encoder" | "decoder" => vae_side(side, rest, up_levels),
            _ => None,
        };
        if let Some((diffusers, squeeze)) = mapped {
            let source = if squeeze {
                Source::Squeezed((*name).to_owned())
            } else {
                Source::Tensor((*name).to_owned())
            };
            out.push((diffusers, source));
        }
    }
    out
}

/// Maps `rest` of an `encoder.` / `decoder.` name; the flag says a 1×1 conv weight is squeezed.
fn vae_side(side: &str, rest: &str, up_levels: usize) -> Option<(String, bool)> {
    let resnet = |r: &str| r.replacen("nin_shortcut.", "conv_shortcut.", 1);
    let plain = |s: String| Some((format!("{side}.{s}"), false));
    if let Some(tail) = rest.strip_prefix("norm_out.") {
        return plain(format!("conv_norm_out.{tail}"));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return plain(rest.to_owned());
    }
    if let Some(r) = rest.strip_prefix("down.") {
        let (i, r) = split_index(r)?;
        if let Some((j, r)) = r.strip_prefix("block.").and_then(split_index) {
            return plain(format!("down_blocks.{i}.resnets.{j}.{}", resnet(r)));
        }
        let tail = r.strip_prefix("downsample.")?;
        return plain(format!("down_blocks.{i}.downsamplers.0.{tail}"));
    }
    if let Some(r) = rest.strip_prefix("up.") {
        let (i, r) = split_index(r)?;
        let b = up_levels.checked_sub(i + 1)?;
        if let Some((j, r)) = r.strip_prefix("block.").and_then(split_index) {
            return plain(format!("up_blocks.{b}.resnets.{j}.{}", resnet(r)));
        }
        let tail = r.strip_prefix("upsample.")?;
        return plain(format!("up_blocks.{b}.upsamplers.0.{tail}"));
    }
    if let Some(r) = rest.strip_prefix("mid.block_") {
        let (k, r) = split_index(r)?;
        let k = k.checked_sub(1)?;
        return plain(format!("mid_block.resnets.{k}.{}", resnet(r)));
    }
    if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        const MAP: [(&str, &str); 5] = [
            ("norm.", "group_norm."),
            ("q.", "to_q."),
            ("k.", "to_k."),
            ("v.", "to_v."),
            ("proj_out.", "to_out.0."),
        ];
        for (ldm, diffusers) in MAP {
            if let Some(tail) = r.strip_prefix(ldm) {
                let squeeze = ldm != "norm." && tail == "weight";
                return Some((
                    format!("{side}.mid_block.attentions.0.{diffusers}{tail}"),
                    squeeze,
                ));
            }
        }
    }
    None
}

// ----------------------------------------------------------------------------------------------
// OpenCLIP text encoders

/// OpenCLIP residual-block parameter names → transformers' CLIP encoder-layer ones.
const OPEN_CLIP_LAYER: [(&str, &str); 5] = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
];

fn open_clip_map(names: &[&str], with_projection: bool) -> Vec<(String, Source)> {
    let mut out = Vec::new();
    for name in names {
        let tensor = || Source::Tensor((*name).to_owned());
        match *name {
            "positional_embedding" => out.push((
                "text_model.embeddings.position_embedding.weight".into(),
                tensor(),
            )),
            "token_embedding.weight" => out.push((
                "text_model.embeddings.token_embedding.weight".into(),
                tensor(),
            )),
            "text_projection" if with_projection => out.push((
                "text_projection.weight".into(),
                Source::Transposed((*name).to_owned()),
            )),
            _ => {}
        }
        if let Some(tail) = name.strip_prefix("ln_final.") {
            out.push((format!("text_model.final_layer_norm.{tail}"), tensor()));
        }
        let Some((layer, rest)) = name
            .strip_prefix("transformer.resblocks.")
            .and_then(split_index)
        else {
            continue;
        };
        let p = format!("text_model.encoder.layers.{layer}");
        let fused = match rest {
            "attn.in_proj_weight" => Some("weight"),
            "attn.in_proj_bias" => Some("bias"),
            _ => None,
        };
        if let Some(kind) = fused {
            for (index, qkv) in ["q", "k", "v"].into_iter().enumerate() {
                out.push((
                    format!("{p}.self_attn.{qkv}_proj.{kind}"),
                    Source::Chunk {
                        name: (*name).to_owned(),
                        index,
                        parts: 3,
                    },
                ));
            }
            continue;
        }
        for (ldm, diffusers) in OPEN_CLIP_LAYER {
            if let Some(tail) = rest.strip_prefix(ldm) {
                out.push((format!("{p}.{diffusers}{tail}"), tensor()));
            }
        }
    }
    out
}

// ----------------------------------------------------------------------------------------------
// VarBuilder

/// A `SimpleBackend` answering diffusers names from a memory-mapped single-file checkpoint.
struct LdmBackend {
    checkpoint: Arc<Tensors>,
    map: HashMap<String, Source>,
}

impl LdmBackend {
    fn source(&self, name: &str) -> candle_core::Result<&Source> {
        self.map.get(name).ok_or_else(|| {
            candle_core::Error::msg(format!(
                "single-file checkpoint: nothing in it maps to `{name}` (the model expects a \
                 layer this checkpoint does not have)"
            ))
        })
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let source = self.source(name)?;
        let ldm = source.ldm_name();
        if self.checkpoint.get(ldm).is_err() {
            return Err(candle_core::Error::msg(format!(
                "single-file checkpoint: missing tensor `{ldm}` (needed for `{name}`)"
            )));
        }
        let tensor = source.load(&self.checkpoint, dev).map_err(|e| {
            candle_core::Error::msg(format!(
                "single-file checkpoint: tensor `{ldm}` (for `{name}`): {e}"
            ))
        })?;
        // On the CPU the tensor is a copy: its pages of the mapping are not needed again
        // (a split tensor's next part faults them back in), see `weights::ReleasingMmap`.
        if dev.is_cpu()
            && let Ok(view) = self.checkpoint.get(ldm)
        {
            crate::sys::release_mapped_pages(view.data());
        }
        Ok(tensor)
    }
}

impl SimpleBackend for LdmBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dev)?;
        if tensor.shape() != &s {
            let ldm = self.source(name)?.ldm_name();
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for `{name}` (from `{ldm}`)"),
                expected: s,
                got: tensor.shape().clone(),
            });
        }
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .get(name)
            .is_some_and(|s| self.checkpoint.get(s.ldm_name()).is_ok())
    }
}

/// A `VarBuilder` over a memory-mapped single-file checkpoint that answers the diffusers names
/// of `map` (from [`key_map`]): each tensor is read when asked for, converted as its [`Source`]
/// says, and cast to `dtype`. A name with no source, or whose LDM tensor is absent, is an
/// error naming both.
#[allow(clippy::implicit_hasher)] // the map comes from `key_map`
pub fn var_builder(
    checkpoint: Arc<Tensors>,
    map: HashMap<String, Source>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(backend(checkpoint, map), dtype, device.clone())
}

/// The backend [`var_builder`] reads through: diffusers names over the checkpoint's tensors.
#[allow(clippy::implicit_hasher)]
pub fn backend(
    checkpoint: Arc<Tensors>,
    map: HashMap<String, Source>,
) -> Box<dyn candle_nn::var_builder::SimpleBackend> {
    Box::new(LdmBackend { checkpoint, map })
}
