//! GPT-2 logits against transformers' reference implementation (fixture made by
//! `tools/make_gpt2_fixture.py`), in both checkpoint naming styles, with and without KV cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use studio_inference::llm::sampling::argmax;
use studio_inference::models::CausalLm;
use studio_inference::models::gpt2::{Config, Gpt2};
use studio_inference::weights::Weights;

struct Expected {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    prefill_len: usize,
    incremental: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gpt2-tiny")
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json")).expect("fixture");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let ids = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let rows = |k: &str| -> Vec<Vec<f32>> {
        v[k].as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                r.as_array()
                    .expect("row")
                    .iter()
                    .map(|x| x.as_f64().expect("float") as f32)
                    .collect()
            })
            .collect()
    };
    Expected {
        input_ids: ids("input_ids"),
        logits: rows("logits"),
        prefill_len: v["incremental_prefill_len"].as_u64().expect("len") as usize,
        incremental: rows("incremental_logits"),
        greedy: ids("greedy_new_ids"),
    }
}

fn load(dir: &Path) -> Gpt2 {
    let cfg: Config = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("config.json")).expect("config"),
    )
    .expect("config parses");
    let w = Weights::open(&[dir.join("model.safetensors")], &Device::Cpu, DType::F32)
        .expect("weights open");
    Gpt2::load(&cfg, &w, &mut |_| {}).expect("model loads")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const TOL: f32 = 1e-4;

fn check_full_and_incremental(model: &mut Gpt2, e: &Expected) {
    let all = model
        .forward_all(&e.input_ids, 0)
        .expect("forward")
        .to_vec2::<f32>()
        .expect("vec2");
    for (row, want) in all.iter().zip(&e.logits) {
        let d = max_abs_diff(row, want);
        assert!(d < TOL, "full-sequence logits differ by {d}");
    }

    model.clear_kv_cache();
    let mut got = vec![
        model
            .forward_last(&e.input_ids[..e.prefill_len], 0)
            .expect("prefill")
            .to_vec1::<f32>()
            .expect("vec1"),
    ];
    for (i, &id) in e.input_ids.iter().enumerate().skip(e.prefill_len) {
        got.push(
            model
                .forward_last(&[id], i)
                .expect("step")
                .to_vec1::<f32>()
                .expect("vec1"),
        );
    }
    assert_eq!(got.len(), e.incremental.len());
    for (row, want) in got.iter().zip(&e.incremental) {
        let d = max_abs_diff(row, want);
        assert!(d < TOL, "KV-cache logits differ by {d}");
    }

    // Greedy continuation with the cache, token for token.
    model.clear_kv_cache();
    let mut ids = e.input_ids.clone();
    let mut logits = model.forward_last(&ids, 0).expect("prefill");
    let mut new = Vec::new();
    for _ in 0..e.greedy.len() {
        let next = argmax(&logits.to_vec1::<f32>().expect("vec1"));
        new.push(next);
        ids.push(next);
        logits = model.forward_last(&[next], ids.len() - 1).expect("step");
    }
    assert_eq!(new, e.greedy);
}

#[test]
fn save_pretrained_naming_matches_transformers() {
    let e = expected();
    let mut model = load(&fixture_dir());
    check_full_and_incremental(&mut model, &e);
}

#[test]
fn hub_naming_and_explicit_lm_head_match_transformers() {
    let e = expected();
    let tensors =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)
            .expect("load");
    let hub: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("transformer.").unwrap_or(k).to_owned(),
                v.clone(),
            )
        })
        .collect();
    assert!(hub.contains_key("h.0.attn.c_attn.weight"));
    let tmp = tempfile::tempdir().expect("tmp");
    candle_core::safetensors::save(&hub, tmp.path().join("model.safetensors")).expect("save");
    check_full_and_incremental(&mut load(tmp.path()), &e);

    let mut with_head = tensors.clone();
    with_head.insert(
        "lm_head.weight".to_owned(),
        tensors["transformer.wte.weight"].clone(),
    );
    let tmp2 = tempfile::tempdir().expect("tmp");
    candle_core::safetensors::save(&with_head, tmp2.path().join("model.safetensors"))
        .expect("save");
    check_full_and_incremental(&mut load(tmp2.path()), &e);
}

#[test]
fn transposed_conv1d_is_caught_as_a_shape_error() {
    // Storing c_fc as [out, in] (the Linear layout) must not load silently.
    let mut tensors =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)
            .expect("load");
    let name = "transformer.h.1.mlp.c_fc.weight";
    let t = tensors[name].t().expect("t").contiguous().expect("contig");
    tensors.insert(name.to_owned(), t);
    let tmp = tempfile::tempdir().expect("tmp");
    candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors")).expect("save");
    let cfg: Config = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("config.json")).expect("config"),
    )
    .expect("parse");
    let w = Weights::open(
        &[tmp.path().join("model.safetensors")],
        &Device::Cpu,
        DType::F32,
    )
    .expect("open");
    let err = Gpt2::load(&cfg, &w, &mut |_| {})
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains(name) && err.contains("[128, 32]"), "{err}");
}

/// transformers' `pytorch_model.bin` of the same GPT-2 (`torch.save`, made by
/// `tools/make_pickle_fixtures.py`) loads through Studio's own pickle reader and matches
/// transformers as the safetensors weights do.
#[test]
fn pytorch_model_bin_matches_transformers() {
    let cfg: Config = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("config.json")).expect("config"),
    )
    .expect("config parses");
    let bin = fixture_dir().join("../pickles/gpt2_pytorch_model.bin");
    let w = Weights::open(&[bin], &Device::Cpu, DType::F32).expect("the pickle opens");
    let mut model = Gpt2::load(&cfg, &w, &mut |_| {}).expect("model loads");
    check_full_and_incremental(&mut model, &expected());
}
