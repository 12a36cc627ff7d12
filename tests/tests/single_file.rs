//! Single-file (LDM-named) Stable Diffusion checkpoints read as diffusers names.
//!
//! The reference is `tests/fixtures/ldm/mapping.json` (`tools/make_ldm_fixture.py`): for tiny
//! SD 1.x / SD 2.x / SDXL-style models, the LDM names and shapes of each component and, for
//! every diffusers name, the LDM tensor (and rows, transpose, squeeze) diffusers' own
//! converter takes it from.

use studio_tests::ldm;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use studio_inference::diffusion::convert::{
    CheckpointKind, Component, Source, UnetLevel, detect_kind, key_map, unet_layout, var_builder,
};

struct Fixture {
    kind: CheckpointKind,
    component: Component,
    prefix: String,
    /// Full LDM name → shape.
    ldm: BTreeMap<String, Vec<usize>>,
    /// diffusers name → (shape, source with full LDM names).
    diffusers: BTreeMap<String, (Vec<usize>, Source)>,
}

fn shape(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .expect("shape array")
        .iter()
        .map(|d| usize::try_from(d.as_u64().expect("dim")).expect("dim fits"))
        .collect()
}

fn fixtures() -> Vec<Fixture> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/ldm/mapping.json");
    let text = std::fs::read_to_string(&path).expect("read mapping.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("parse mapping.json");
    doc["fixtures"]
        .as_array()
        .expect("fixtures")
        .iter()
        .map(|f| {
            let kind = match f["kind"].as_str().expect("kind") {
                "Sd1" => CheckpointKind::Sd1,
                "Sd2" => CheckpointKind::Sd2,
                "Sdxl" => CheckpointKind::Sdxl,
                k => panic!("kind {k}"),
            };
            let component = match f["component"].as_str().expect("component") {
                "Unet" => Component::Unet,
                "Vae" => Component::Vae,
                "TextEncoder" => Component::TextEncoder,
                "TextEncoder2" => Component::TextEncoder2,
                c => panic!("component {c}"),
            };
            let prefix = f["prefix"].as_str().expect("prefix").to_owned();
            let ldm = f["ldm"]
                .as_object()
                .expect("ldm")
                .iter()
                .map(|(k, v)| (format!("{prefix}{k}"), shape(v)))
                .collect();
            let diffusers = f["diffusers"]
                .as_object()
                .expect("diffusers")
                .iter()
                .map(|(k, v)| {
                    let src = v[1].as_array().expect("source");
                    let name = format!("{prefix}{}", src[1].as_str().expect("ldm name"));
                    let n = |i: usize| usize::try_from(src[i].as_u64().expect("n")).expect("fits");
                    let source = match src[0].as_str().expect("op") {
                        "tensor" => Source::Tensor(name),
                        "transposed" => Source::Transposed(name),
                        "squeezed" => Source::Squeezed(name),
                        "chunk" => Source::Chunk {
                            name,
                            index: n(2),
                            parts: n(3),
                        },
                        op => panic!("op {op}"),
                    };
                    (k.clone(), (shape(&v[0]), source))
                })
                .collect();
            Fixture {
                kind,
                component,
                prefix,
                ldm,
                diffusers,
            }
        })
        .collect()
}

const KINDS: [CheckpointKind; 3] = [
    CheckpointKind::Sd1,
    CheckpointKind::Sd2,
    CheckpointKind::Sdxl,
];

/// The fixtures making up one checkpoint of `kind` (SDXL borrows SD 1.x's VAE: the VAE's
/// names do not depend on the kind).
fn checkpoint_fixtures(all: &[Fixture], kind: CheckpointKind) -> Vec<&Fixture> {
    let mut out: Vec<&Fixture> = all.iter().filter(|f| f.kind == kind).collect();
    if !out.iter().any(|f| f.component == Component::Vae) {
        out.extend(
            all.iter()
                .filter(|f| f.kind == CheckpointKind::Sd1 && f.component == Component::Vae),
        );
    }
    out
}

fn random(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
}

fn random_diffusers(f: &Fixture, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    f.diffusers
        .iter()
        .map(|(name, (shape, _))| (name.clone(), random(&mut rng, shape)))
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values")
}

#[test]
fn fixture_covers_every_kind_and_component() {
    let all = fixtures();
    let have: BTreeSet<String> = all
        .iter()
        .map(|f| format!("{:?} {:?}", f.kind, f.component))
        .collect();
    for want in [
        "Sd1 Unet",
        "Sd1 Vae",
        "Sd1 TextEncoder",
        "Sd2 Unet",
        "Sd2 Vae",
        "Sd2 TextEncoder",
        "Sdxl Unet",
        "Sdxl TextEncoder",
        "Sdxl TextEncoder2",
    ] {
        assert!(have.contains(want), "fixture lacks {want}");
    }
    let ops: BTreeSet<&str> = all
        .iter()
        .flat_map(|f| f.diffusers.values())
        .map(|(_, s)| match s {
            Source::Tensor(_) => "tensor",
            Source::Chunk { .. } => "chunk",
            Source::Transposed(_) => "transposed",
            Source::Squeezed(_) => "squeezed",
        })
        .collect();
    assert_eq!(ops.len(), 4, "every kind of source is exercised: {ops:?}");
}

#[test]
fn key_map_reproduces_diffusers_converter() {
    let all = fixtures();
    for kind in KINDS {
        let parts = checkpoint_fixtures(&all, kind);
        // The whole checkpoint's names, plus things real files carry that map to nothing.
        let mut names: Vec<String> = parts.iter().flat_map(|f| f.ldm.keys().cloned()).collect();
        names.extend([
            "model_ema.decay".to_owned(),
            "model_ema.num_updates".to_owned(),
            "alphas_cumprod".to_owned(),
        ]);
        if kind == CheckpointKind::Sd2 {
            names.push("cond_stage_model.model.logit_scale".to_owned());
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for f in &parts {
            let ours = key_map(kind, f.component, &names)
                .unwrap_or_else(|e| panic!("{kind:?} {:?}: {e}", f.component));
            let mut problems = Vec::new();
            for (name, (_, want)) in &f.diffusers {
                match ours.get(name) {
                    Some(got) if got == want => {}
                    Some(got) => problems.push(format!("{name}: ours {got:?}, diffusers {want:?}")),
                    None => problems.push(format!("{name}: not mapped (diffusers: {want:?})")),
                }
            }
            for (name, got) in &ours {
                if !f.diffusers.contains_key(name) {
                    problems.push(format!(
                        "{name}: mapped from {got:?}, diffusers has no such"
                    ));
                }
            }
            assert!(
                problems.is_empty(),
                "{kind:?} {:?}: {} differences from diffusers, e.g.\n{}",
                f.component,
                problems.len(),
                problems[..problems.len().min(12)].join("\n")
            );
        }
    }
}

#[test]
fn diffusers_to_ldm_gives_the_fixture_layout() {
    for (seed, f) in fixtures().iter().enumerate() {
        let ldm = ldm::diffusers_to_ldm(f.kind, f.component, random_diffusers(f, seed as u64));
        let ours: BTreeMap<String, Vec<usize>> = ldm
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        for (name, dims) in &ours {
            assert_eq!(
                f.ldm.get(name),
                Some(dims),
                "{:?} {:?}: {name}",
                f.kind,
                f.component
            );
        }
        // SD 2.x's file has an OpenCLIP text_projection its CLIPTextModel does not use.
        let only_in_fixture: Vec<&String> =
            f.ldm.keys().filter(|k| !ours.contains_key(*k)).collect();
        let allowed = format!("{}text_projection", f.prefix);
        assert!(
            only_in_fixture.iter().all(|k| **k == allowed),
            "{:?} {:?}: not produced: {only_in_fixture:?}",
            f.kind,
            f.component
        );
    }
}

#[test]
fn single_file_round_trip_through_var_builder() {
    let all = fixtures();
    let dir = tempfile::tempdir().expect("tempdir");
    for (k, kind) in KINDS.into_iter().enumerate() {
        let parts = checkpoint_fixtures(&all, kind);
        let components: Vec<(Component, HashMap<String, Tensor>)> = parts
            .iter()
            .enumerate()
            .map(|(i, f)| (f.component, random_diffusers(f, (k * 10 + i) as u64)))
            .collect();
        let path = dir.path().join(format!("{kind:?}.safetensors"));
        ldm::write_single_file(kind, &components, &path);

        let checkpoint = Arc::new(
            studio_inference::weights::open_checkpoint(std::slice::from_ref(&path)).expect("mmap"),
        );
        let names: Vec<String> = checkpoint.tensors().into_iter().map(|(n, _)| n).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(detect_kind(&names), Some(kind));

        for (component, tensors) in &components {
            let map = key_map(kind, *component, &names).expect("key map");
            assert_eq!(
                map.len(),
                tensors.len(),
                "{kind:?} {component:?}: one source per diffusers tensor"
            );
            let vb = var_builder(checkpoint.clone(), map.clone(), DType::F32, &Device::Cpu);
            for (name, want) in tensors {
                let got = vb
                    .get(want.dims(), name)
                    .unwrap_or_else(|e| panic!("{kind:?} {component:?} {name}: {e}"));
                assert_eq!(got.dtype(), DType::F32);
                assert!(
                    values(&got) == values(want),
                    "{kind:?} {component:?}: {name} differs after the round trip"
                );
                assert!(vb.contains_tensor(name));
            }
            // dtype conversion on get.
            let vb16 = var_builder(checkpoint.clone(), map, DType::F16, &Device::Cpu);
            let (name, want) = tensors.iter().next().expect("a tensor");
            let got = vb16.get(want.dims(), name).expect("f16 get");
            assert_eq!(got.dtype(), DType::F16);
            assert_eq!(
                values(&got),
                values(&want.to_dtype(DType::F16).expect("f16"))
            );
        }
    }
}

#[test]
fn detect_kind_from_text_encoder_prefixes() {
    let unet = "model.diffusion_model.input_blocks.0.0.weight";
    assert_eq!(
        detect_kind(&[
            unet,
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"
        ]),
        Some(CheckpointKind::Sd1)
    );
    assert_eq!(
        detect_kind(&[unet, "cond_stage_model.model.ln_final.weight"]),
        Some(CheckpointKind::Sd2)
    );
    assert_eq!(
        detect_kind(&[
            "conditioner.embedders.1.model.ln_final.weight",
            unet,
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        ]),
        Some(CheckpointKind::Sdxl)
    );
    assert_eq!(
        detect_kind(&[unet, "first_stage_model.quant_conv.weight"]),
        None
    );
    assert_eq!(detect_kind(&[]), None);
}

#[test]
fn missing_tensors_are_named() {
    let all = fixtures();
    let f = all
        .iter()
        .find(|f| f.kind == CheckpointKind::Sd2 && f.component == Component::TextEncoder)
        .expect("Sd2 text encoder fixture");
    let tensors = random_diffusers(f, 7);
    let mut ldm = ldm::diffusers_to_ldm(f.kind, f.component, tensors.clone());
    let full: Vec<String> = ldm.keys().cloned().collect();
    let gone = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight";
    assert!(ldm.remove(gone).is_some());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.safetensors");
    candle_core::safetensors::save(&ldm, &path).expect("save");
    let checkpoint = Arc::new(studio_inference::weights::open_checkpoint(&[path]).expect("mmap"));

    // A map made from names the file does not have (as when a file is truncated).
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let map = key_map(CheckpointKind::Sd2, Component::TextEncoder, &full).expect("map");
    let vb = var_builder(checkpoint.clone(), map, DType::F32, &Device::Cpu);
    let wanted = "text_model.encoder.layers.1.self_attn.k_proj.weight";
    let err = vb
        .get(tensors[wanted].dims(), wanted)
        .expect_err("missing tensor")
        .to_string();
    assert!(err.contains(wanted), "{err}");
    assert!(err.contains(gone), "{err}");
    assert!(!vb.contains_tensor(wanted));

    // A diffusers name the checkpoint has nothing for.
    let names: Vec<String> = checkpoint.tensors().into_iter().map(|(n, _)| n).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let map = key_map(CheckpointKind::Sd2, Component::TextEncoder, &names).expect("map");
    let vb = var_builder(checkpoint, map, DType::F32, &Device::Cpu);
    let err = vb
        .get(tensors[wanted].dims(), wanted)
        .expect_err("unmapped")
        .to_string();
    assert!(err.contains(wanted), "{err}");
    // A wrong shape names the tensor too.
    let ok = "text_model.encoder.layers.0.self_attn.v_proj.weight";
    let err = vb.get((3, 5), ok).expect_err("shape").to_string();
    assert!(err.contains(ok), "{err}");
    // Absent components are refused up front.
    let err = key_map(CheckpointKind::Sd2, Component::Unet, &names)
        .expect_err("no unet")
        .to_string();
    assert!(err.contains("model.diffusion_model."), "{err}");
    assert!(key_map(CheckpointKind::Sd1, Component::TextEncoder2, &names).is_err());
}

#[test]
fn unet_layout_is_read_from_the_names() {
    let all = fixtures();
    let level = |layers, attention, transformer_blocks| UnetLevel {
        layers,
        attention,
        transformer_blocks,
    };
    for (kind, levels, mid, label) in [
        (
            CheckpointKind::Sd1,
            vec![level(2, true, 1), level(2, false, 0)],
            1,
            false,
        ),
        (
            CheckpointKind::Sd2,
            vec![level(1, true, 1), level(1, true, 1), level(1, false, 0)],
            1,
            false,
        ),
        (
            CheckpointKind::Sdxl,
            vec![level(2, false, 0), level(2, true, 1), level(2, true, 2)],
            2,
            true,
        ),
    ] {
        let f = all
            .iter()
            .find(|f| f.kind == kind && f.component == Component::Unet)
            .expect("unet fixture");
        let names: Vec<&str> = f
            .ldm
            .keys()
            .map(|n| n.strip_prefix(&f.prefix).expect("prefix"))
            .collect();
        let layout = unet_layout(&names).expect("layout");
        assert_eq!(layout.levels, levels, "{kind:?}");
        assert_eq!(layout.mid_transformer_blocks, mid, "{kind:?}");
        assert_eq!(layout.label_embedding, label, "{kind:?}");
    }
}
