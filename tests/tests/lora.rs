//! LoRA / LyCORIS files against diffusers (`tests/fixtures/lora`, made by
//! `tools/make_lora_fixture.py` on the tiny SD 1.x UNet of `tests/fixtures/sd_parity`): a kohya
//! file as diffusers' own loader fuses it, a PEFT-named file, and LoHa / LoKr by LyCORIS's
//! formulas; then the same through `model::load` on a whole tiny model, where loading without
//! the LoRA gives the model's own images back exactly.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use studio_inference::diffusion::lora::{
    LoraBackend, LoraReport, LoraSet, LoraSpec, Part, PartNames,
};
use studio_inference::diffusion::model::{self, ImageModelOptions};
use studio_inference::diffusion::pipeline::{ImageRequest, generate};
use studio_inference::diffusion::samplers::SamplerKind;
use studio_inference::diffusion::unet::{Unet, UnetConfig};
use studio_inference::weights::open_checkpoint;
use studio_tests::sd::{TinyKind, TinySd, write_tiny_lora, write_tiny_sd};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("load")
}

fn spec(name: &str, weight: f64) -> LoraSpec {
    LoraSpec {
        path: fixtures().join("lora").join(name),
        unet: weight,
        text: weight,
    }
}

/// The fixture UNet with `specs` merged as it loads, run on the parity inputs.
fn run_with(specs: &[LoraSpec]) -> (Tensor, Vec<LoraReport>) {
    let dir = fixtures().join("sd_parity/unet_sd1");
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let st = open_checkpoint(&[weights]).expect("open");
    let names: PartNames = BTreeMap::from([(
        Part::Unet,
        st.tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect(),
    )]);
    let set = LoraSet::build(specs, &names).expect("lora set");
    let reports = set.reports.clone();
    let backend = LoraBackend::new(Box::new(st), Arc::new(set), Part::Unet);
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let config =
        UnetConfig::from_json(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("unet config");
    let unet = Unet::new(&vb, config).expect("unet");
    let io = tensors(&dir.join("io.safetensors"));
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sd_parity/cases.json")).expect("cases"),
    )
    .expect("json");
    let out = unet
        .forward(
            &io["sample"],
            cases["timestep"].as_f64().expect("timestep"),
            &io["context"],
            None,
        )
        .expect("forward");
    (out, reports)
}

fn max_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let m = |t: &Tensor| {
        t.abs()
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f32>())
            .expect("max")
    };
    (m(&(a - b).expect("sub")), m(b))
}

#[test]
fn lora_files_merge_as_diffusers_and_lycoris_do() {
    let reference = tensors(&fixtures().join("lora/io.safetensors"));
    for (specs, key, applied) in [
        (vec![spec("kohya.safetensors", 0.8)], "kohya_0.8", 6),
        (vec![spec("peft.safetensors", 1.0)], "peft", 3),
        (vec![spec("lycoris.safetensors", 1.0)], "lycoris", 2),
        (Vec::new(), "base", 0),
    ] {
        let (out, reports) = run_with(&specs);
        let (d, scale) = max_diff(&out, &reference[key]);
        assert!(
            d <= 1e-4 * scale,
            "{key}: differs from the reference by {d:e} (scale {scale})"
        );
        if let Some(r) = reports.first() {
            assert_eq!(r.applied, applied, "{key}");
        }
    }
    // The SD web UI's short hash (SHA-256 after the header; this value from Python's hashlib).
    assert_eq!(
        studio_inference::diffusion::lora::short_hash(&fixtures().join("lora/kohya.safetensors"))
            .expect("hash"),
        "304e59083907"
    );
    // The kohya file also names an SDXL module this UNet lacks: counted, not applied.
    let (_, reports) = run_with(&[spec("kohya.safetensors", 1.0)]);
    assert_eq!(reports[0].ignored, 1);
    assert!(reports[0].ignored_examples[0].contains("input_blocks_4_1_proj_in"));
}

/// A LoRA written for the tiny model's own modules, through `model::load`: it changes the
/// image, a weight of 0 does not, and a load without it gives the model's image back to the bit.
#[test]
fn a_model_loaded_with_and_then_without_a_lora_is_its_own_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("tiny");
    write_tiny_sd(&dir, TinySd::new(TinyKind::Sd1));
    let file = tmp.path().join("style.safetensors");
    write_tiny_lora(&dir, &file);

    let image = |loras: Vec<LoraSpec>| tiny_image(&dir, loras);
    let with = |w: f64| {
        vec![LoraSpec {
            path: file.clone(),
            unet: w,
            text: w,
        }]
    };
    let (own, none) = image(Vec::new());
    assert!(none.is_empty());
    let (styled, reports) = image(with(2.0));
    assert_ne!(styled, own, "the LoRA changes the image");
    assert_eq!(reports[0].name, "style");
    assert!(reports[0].applied > 0 && reports[0].ignored == 0);
    assert_eq!(image(with(0.0)).0, own, "a weight of 0 changes nothing");
    // Many loads with and without: no drift.
    for _ in 0..2 {
        assert_eq!(image(with(1.0)).0, image(with(1.0)).0);
    }
    assert_eq!(
        image(Vec::new()).0,
        own,
        "loaded without it, the model is its own again"
    );

    // Another base's file (SDXL names only): loads, nothing applied, all counted.
    let mut other = HashMap::new();
    other.insert(
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight".to_owned(),
        Tensor::zeros((2, 8), DType::F32, &Device::Cpu).expect("t"),
    );
    other.insert(
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight".to_owned(),
        Tensor::zeros((8, 2), DType::F32, &Device::Cpu).expect("t"),
    );
    let sdxl = tmp.path().join("sdxl-style.safetensors");
    candle_core::safetensors::save(&other, &sdxl).expect("save");
    let (_, reports) = image(vec![LoraSpec {
        path: sdxl,
        unet: 1.0,
        text: 1.0,
    }]);
    assert_eq!((reports[0].applied, reports[0].ignored), (0, 1));
}

/// SDXL's kohya LoRAs name the original UNet's blocks (`lora_unet_input_blocks_4_1_…`): they
/// find their modules in a diffusers folder, whose names Studio maps to those (the map checked
/// here against the tests' own diffusers → original converter).
#[test]
fn sdxl_kohya_loras_with_original_block_names_apply_to_a_diffusers_folder() {
    use studio_inference::diffusion::convert::{CheckpointKind, Component};
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("tiny-xl");
    let w = write_tiny_sd(&dir, TinySd::new(TinyKind::Sdxl));
    let ldm = studio_tests::ldm::diffusers_to_ldm(CheckpointKind::Sdxl, Component::Unet, w.unet);
    let mut lora = HashMap::new();
    let mut targets = 0;
    for (name, t) in &ldm {
        let Some(module) = name
            .strip_prefix("model.diffusion_model.")
            .and_then(|n| n.strip_suffix(".weight"))
        else {
            continue;
        };
        if !(module.ends_with("attn1.to_q") || module.ends_with("attn2.to_v")) {
            continue;
        }
        let (rows, cols) = t.dims2().expect("linear");
        let key = format!("lora_unet_{}", module.replace('.', "_"));
        lora.insert(
            format!("{key}.lora_down.weight"),
            Tensor::ones((2, cols), DType::F32, &Device::Cpu).expect("t"),
        );
        lora.insert(
            format!("{key}.lora_up.weight"),
            Tensor::ones((rows, 2), DType::F32, &Device::Cpu).expect("t"),
        );
        targets += 1;
    }
    assert!(targets >= 2, "the tiny SDXL has attention layers");
    let file = tmp.path().join("xl-style.safetensors");
    candle_core::safetensors::save(&lora, &file).expect("save");
    let m = model::load(
        &dir,
        &ImageModelOptions {
            loras: vec![LoraSpec {
                path: file,
                unet: 0.5,
                text: 0.5,
            }],
            ..ImageModelOptions::default()
        },
        &Device::Cpu,
        &mut |_, _| {},
    )
    .expect("load");
    let r = &m.info.loras[0];
    assert_eq!((r.applied, r.ignored), (targets, 0), "{r:?}");
}

/// A model stored in f16 (as most shared checkpoints are) takes a LoRA as well: the merge is
/// done in f32 before the weights are packed, so the f16 model with a LoRA is the f32 model
/// with it, to f16 rounding, and toggling it leaves the f16 model as it was.
#[test]
fn a_lora_applies_to_a_model_stored_in_f16() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("tiny");
    write_tiny_sd(&dir, TinySd::new(TinyKind::Sd1));
    let file = tmp.path().join("style.safetensors");
    write_tiny_lora(&dir, &file);
    let half = tmp.path().join("tiny-f16");
    for entry in walk(&dir) {
        let rel = entry.strip_prefix(&dir).expect("inside");
        let to = half.join(rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("dir");
        if entry.extension().is_some_and(|e| e == "safetensors") {
            let t: HashMap<String, Tensor> = tensors(&entry)
                .into_iter()
                .map(|(k, v)| (k, v.to_dtype(DType::F16).expect("f16")))
                .collect();
            candle_core::safetensors::save(&t, &to).expect("save f16");
        } else {
            std::fs::copy(&entry, &to).expect("copy");
        }
    }
    let image = |dir: &Path, weight: f64| {
        let loras = if weight == 0.0 {
            Vec::new()
        } else {
            vec![LoraSpec {
                path: file.clone(),
                unet: weight,
                text: weight,
            }]
        };
        tiny_image(dir, loras).0
    };
    let mean_diff = |a: &[u8], b: &[u8]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x.abs_diff(*y)))
            .sum::<f64>()
            / a.len() as f64
    };
    let half_plain = image(&half, 0.0);
    let half_styled = image(&half, 2.0);
    let full_styled = image(&dir, 2.0);
    let change = mean_diff(&half_plain, &half_styled);
    let rounding = mean_diff(&half_styled, &full_styled);
    println!("LoRA change {change:.2}/255, f16 vs f32 with it {rounding:.2}/255");
    assert!(change > 4.0 * rounding.max(0.05), "{change} vs {rounding}");
    assert_eq!(
        image(&half, 0.0),
        half_plain,
        "no drift after a load with it"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A LoRA saved as a PyTorch pickle (`.pt`) is read as data by Studio's own reader and merges
/// exactly as its safetensors form; the gallery lists it, and its short hash is the whole
/// file's SHA-256, as the SD web UI computes it for pickles.
#[test]
fn a_pickled_lora_merges_as_its_safetensors_form() {
    use sha2::{Digest, Sha256};
    let tmp = tempfile::tempdir().expect("tmp");
    let pt = tmp.path().join("kohya-pickled.pt");
    studio_tests::torch_writer::save_torch(
        &tensors(&fixtures().join("lora/kohya.safetensors")),
        false,
        &pt,
    );
    let (from_pt, reports) = run_with(&[LoraSpec {
        path: pt.clone(),
        unet: 0.8,
        text: 0.8,
    }]);
    let (from_st, _) = run_with(&[spec("kohya.safetensors", 0.8)]);
    let (d, _) = max_diff(&from_pt, &from_st);
    assert!(d == 0.0, "the pickle merges the same tensors: {d}");
    assert_eq!(reports[0].applied, 6);
    let listed = studio_inference::diffusion::lora::list_dir(tmp.path());
    assert_eq!(listed, [("kohya-pickled".to_owned(), pt.clone())]);
    let digest = Sha256::digest(std::fs::read(&pt).expect("read"));
    let want = digest[..6].iter().fold(String::new(), |mut s, b| {
        use std::fmt::Write as _;
        let _ = write!(s, "{b:02x}");
        s
    });
    assert_eq!(
        studio_inference::diffusion::lora::short_hash(&pt).expect("hash"),
        want
    );
}

/// A 32×32, 2-step image of the tiny model in `dir` loaded with `loras`, and what they changed.
fn tiny_image(dir: &Path, loras: Vec<LoraSpec>) -> (Vec<u8>, Vec<LoraReport>) {
    let m = model::load(
        dir,
        &ImageModelOptions {
            loras,
            ..ImageModelOptions::default()
        },
        &Device::Cpu,
        &mut |_, _| {},
    )
    .expect("load");
    let req = ImageRequest {
        steps: 2,
        seed: Some(3),
        width: 32,
        height: 32,
        sampler: SamplerKind::Euler,
        ..ImageRequest::new("a red cat")
    };
    let out = generate(&m, &req, &mut |_| ControlFlow::Continue(())).expect("generate");
    (out.images[0].image.pixels.clone(), m.info.loras.clone())
}
