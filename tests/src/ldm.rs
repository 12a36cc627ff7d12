//! Single-file Stable Diffusion checkpoints for tests: diffusers-named tensors renamed (and
//! reshaped) into the original LDM / OpenCLIP layout, and written as one safetensors file.
//!
//! This is the inverse of `studio_inference::diffusion::convert`, written independently of it
//! (from the layout of the original code) so that a round trip checks the loader.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::Tensor;
use studio_inference::diffusion::convert::{CheckpointKind, Component};

/// The prefix of `component` in a `kind` single file, and whether it uses OpenCLIP names.
pub fn ldm_prefix(kind: CheckpointKind, component: Component) -> (&'static str, bool) {
    match (kind, component) {
        (_, Component::Unet) => ("model.diffusion_model.", false),
        (_, Component::Vae) => ("first_stage_model.", false),
        (CheckpointKind::Sd1, Component::TextEncoder) => ("cond_stage_model.transformer.", false),
        (CheckpointKind::Sd2, Component::TextEncoder) => ("cond_stage_model.model.", true),
        (CheckpointKind::Sdxl, Component::TextEncoder) => {
            ("conditioner.embedders.0.transformer.", false)
        }
        (CheckpointKind::Sdxl, Component::TextEncoder2) => ("conditioner.embedders.1.model.", true),
        (k, Component::TextEncoder2) => panic!("{k:?} has no second text encoder"),
    }
}

/// `"3.rest"` → `(3, "rest")`.
fn index(s: &str) -> (usize, &str) {
    let (head, rest) = s.split_once('.').expect("index then a name");
    (head.parse().expect("numeric index"), rest)
}

/// Distinct `N` of names `{prefix}N.…`.
fn indices(names: &[&str], prefix: &str) -> BTreeSet<usize> {
    names
        .iter()
        .filter_map(|n| n.strip_prefix(prefix))
        .map(|r| index(r).0)
        .collect()
}

/// diffusers ResNet parameter names → LDM ones (UNet).
fn unet_resnet(rest: &str) -> String {
    for (d, l) in [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ] {
        if let Some(t) = rest.strip_prefix(d) {
            return format!("{l}{t}");
        }
    }
    panic!("unknown UNet ResNet parameter {rest}")
}

fn unet_name(name: &str, layers: usize, up_attention: &BTreeSet<usize>) -> String {
    for (d, l) in [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("class_embedding.linear_1.", "label_emb.0.0."),
        ("class_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ] {
        if let Some(t) = name.strip_prefix(d) {
            return format!("{l}{t}");
        }
    }
    let per_level = layers + 1;
    if let Some(r) = name.strip_prefix("down_blocks.") {
        let (b, r) = index(r);
        let first = 1 + b * per_level;
        if let Some(r) = r.strip_prefix("resnets.") {
            let (j, r) = index(r);
            return format!("input_blocks.{}.0.{}", first + j, unet_resnet(r));
        }
        if let Some(r) = r.strip_prefix("attentions.") {
            let (j, r) = index(r);
            return format!("input_blocks.{}.1.{r}", first + j);
        }
        let r = r
            .strip_prefix("downsamplers.0.conv.")
            .expect("down block part");
        return format!("input_blocks.{}.0.op.{r}", first + layers);
    }
    if let Some(r) = name.strip_prefix("up_blocks.") {
        let (b, r) = index(r);
        let first = b * per_level;
        if let Some(r) = r.strip_prefix("resnets.") {
            let (j, r) = index(r);
            return format!("output_blocks.{}.0.{}", first + j, unet_resnet(r));
        }
        if let Some(r) = r.strip_prefix("attentions.") {
            let (j, r) = index(r);
            return format!("output_blocks.{}.1.{r}", first + j);
        }
        let r = r.strip_prefix("upsamplers.0.").expect("up block part");
        let slot = if up_attention.contains(&b) { 2 } else { 1 };
        return format!("output_blocks.{}.{slot}.{r}", first + layers);
    }
    if let Some(r) = name.strip_prefix("mid_block.resnets.") {
        let (k, r) = index(r);
        return format!("middle_block.{}.{}", 2 * k, unet_resnet(r));
    }
    if let Some(r) = name.strip_prefix("mid_block.attentions.0.") {
        return format!("middle_block.1.{r}");
    }
    panic!("unknown UNet tensor {name}")
}

/// The LDM name of a VAE tensor, and whether it is a linear weight stored as a 1×1 conv.
fn vae_name(name: &str, up_levels: usize) -> (String, bool) {
    let Some((side, rest)) = name.split_once('.') else {
        panic!("unknown VAE tensor {name}")
    };
    if side == "quant_conv" || side == "post_quant_conv" {
        return (name.to_owned(), false);
    }
    let shortcut = |r: &str| r.replace("conv_shortcut.", "nin_shortcut.");
    let ldm = if let Some(t) = rest.strip_prefix("conv_norm_out.") {
        format!("norm_out.{t}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_owned()
    } else if let Some(r) = rest.strip_prefix("down_blocks.") {
        let (i, r) = index(r);
        if let Some(r) = r.strip_prefix("resnets.") {
            let (j, r) = index(r);
            format!("down.{i}.block.{j}.{}", shortcut(r))
        } else {
            let r = r.strip_prefix("downsamplers.0.").expect("downsampler");
            format!("down.{i}.downsample.{r}")
        }
    } else if let Some(r) = rest.strip_prefix("up_blocks.") {
        let (b, r) = index(r);
        let i = up_levels - 1 - b;
        if let Some(r) = r.strip_prefix("resnets.") {
            let (j, r) = index(r);
            format!("up.{i}.block.{j}.{}", shortcut(r))
        } else {
            let r = r.strip_prefix("upsamplers.0.").expect("upsampler");
            format!("up.{i}.upsample.{r}")
        }
    } else if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
        let (k, r) = index(r);
        format!("mid.block_{}.{}", k + 1, shortcut(r))
    } else if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        let (part, param) = r.rsplit_once('.').expect("attention parameter");
        let ldm = match part {
            "group_norm" => "norm",
            "to_q" => "q",
            "to_k" => "k",
            "to_v" => "v",
            "to_out.0" => "proj_out",
            _ => panic!("unknown VAE attention tensor {name}"),
        };
        return (
            format!("{side}.mid.attn_1.{ldm}.{param}"),
            ldm != "norm" && param == "weight",
        );
    } else {
        panic!("unknown VAE tensor {name}")
    };
    (format!("{side}.{ldm}"), false)
}

/// OpenCLIP names from transformers' CLIP names; q/k/v are fused into `in_proj_*`.
fn open_clip(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let mut qkv: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
    for (name, t) in tensors {
        let top = match name.as_str() {
            "text_model.embeddings.position_embedding.weight" => Some("positional_embedding"),
            "text_model.embeddings.token_embedding.weight" => Some("token_embedding.weight"),
            "text_model.final_layer_norm.weight" => Some("ln_final.weight"),
            "text_model.final_layer_norm.bias" => Some("ln_final.bias"),
            _ => None,
        };
        if let Some(l) = top {
            out.insert(l.to_owned(), t);
            continue;
        }
        if name == "text_projection.weight" {
            out.insert(
                "text_projection".to_owned(),
                t.t().expect("transpose").contiguous().expect("contiguous"),
            );
            continue;
        }
        let r = name
            .strip_prefix("text_model.encoder.layers.")
            .unwrap_or_else(|| panic!("unknown CLIP tensor {name}"));
        let (layer, r) = index(r);
        let p = format!("transformer.resblocks.{layer}");
        if let Some(r) = r.strip_prefix("self_attn.") {
            let (which, param) = r.split_once('.').expect("attention parameter");
            let slot = match which {
                "q_proj" => 0,
                "k_proj" => 1,
                "v_proj" => 2,
                "out_proj" => {
                    out.insert(format!("{p}.attn.out_proj.{param}"), t);
                    continue;
                }
                _ => panic!("unknown CLIP tensor {name}"),
            };
            qkv.entry(format!("{p}.attn.in_proj_{param}")).or_default()[slot] = Some(t);
            continue;
        }
        let l = r
            .replace("layer_norm1.", "ln_1.")
            .replace("layer_norm2.", "ln_2.")
            .replace("mlp.fc1.", "mlp.c_fc.")
            .replace("mlp.fc2.", "mlp.c_proj.");
        out.insert(format!("{p}.{l}"), t);
    }
    for (name, parts) in qkv {
        let parts: Vec<Tensor> = parts
            .into_iter()
            .map(|p| p.unwrap_or_else(|| panic!("q, k and v for {name}")))
            .collect();
        out.insert(name, Tensor::cat(&parts, 0).expect("fuse q/k/v"));
    }
    out
}

/// Renames (and reshapes) diffusers-named tensors of one component into the single-file layout
/// of a `kind` checkpoint, with the component's prefix.
#[allow(clippy::implicit_hasher)] // callers build ordinary HashMaps
pub fn diffusers_to_ldm(
    kind: CheckpointKind,
    component: Component,
    tensors: HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    let (prefix, openclip) = ldm_prefix(kind, component);
    let names: Vec<String> = tensors.keys().cloned().collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let renamed: HashMap<String, Tensor> = match component {
        Component::Unet => {
            let layers = indices(&names, "down_blocks.0.resnets.").len();
            let up_attention: BTreeSet<usize> = names
                .iter()
                .filter_map(|n| n.strip_prefix("up_blocks."))
                .filter(|r| index(r).1.starts_with("attentions."))
                .map(|r| index(r).0)
                .collect();
            tensors
                .into_iter()
                .map(|(n, t)| (unet_name(&n, layers, &up_attention), t))
                .collect()
        }
        Component::Vae => {
            let up_levels = indices(&names, "decoder.up_blocks.").len();
            tensors
                .into_iter()
                .map(|(n, t)| {
                    let (l, unsqueeze) = vae_name(&n, up_levels);
                    let t = if unsqueeze {
                        t.unsqueeze(2)
                            .and_then(|t| t.unsqueeze(3))
                            .expect("unsqueeze")
                    } else {
                        t
                    };
                    (l, t)
                })
                .collect()
        }
        Component::TextEncoder | Component::TextEncoder2 if openclip => open_clip(tensors),
        Component::TextEncoder | Component::TextEncoder2 => tensors,
    };
    renamed
        .into_iter()
        .map(|(n, t)| (format!("{prefix}{n}"), t))
        .collect()
}

/// The components (diffusers-named tensors each) as one single-file checkpoint's tensors,
/// with the original (LDM) names.
#[allow(clippy::implicit_hasher)] // test helper: callers pass std HashMaps
pub fn single_file_tensors(
    kind: CheckpointKind,
    components: &[(Component, HashMap<String, Tensor>)],
) -> HashMap<String, Tensor> {
    let mut all = HashMap::new();
    for (component, tensors) in components {
        all.extend(diffusers_to_ldm(kind, *component, tensors.clone()));
    }
    all
}

/// Writes the components (diffusers-named tensors each) as one single-file checkpoint.
#[allow(clippy::implicit_hasher)] // test helper: callers pass std HashMaps
pub fn write_single_file(
    kind: CheckpointKind,
    components: &[(Component, HashMap<String, Tensor>)],
    out: &Path,
) {
    let all = single_file_tensors(kind, components);
    candle_core::safetensors::save(&all, out).expect("save single-file checkpoint");
}

/// A tiny SD 1.x model (full CLIP vocabulary) as an original single-file checkpoint, twice
/// with the same tensors: `DIR/tiny.safetensors` and `DIR/tiny.ckpt` (`torch.save`'s format,
/// `{"state_dict": …}`, as the original SD checkpoints are). Returns both paths.
pub fn write_tiny_sd1_checkpoints(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use crate::sd::{TinyKind, TinySd, write_tiny_sd};
    let w = write_tiny_sd(
        &dir.join("diffusers"),
        TinySd {
            full_vocab: true,
            ..TinySd::new(TinyKind::Sd1)
        },
    );
    let tensors = single_file_tensors(
        CheckpointKind::Sd1,
        &[
            (Component::Unet, w.unet),
            (Component::Vae, w.vae),
            (Component::TextEncoder, w.text_encoder),
        ],
    );
    let (file, ckpt) = (dir.join("tiny.safetensors"), dir.join("tiny.ckpt"));
    candle_core::safetensors::save(&tensors, &file).expect("save single-file checkpoint");
    crate::torch_writer::save_torch(&tensors, true, &ckpt);
    (file, ckpt)
}
