//! Today's model families from Hugging Face folders: tiny random-weight checkpoints with the
//! real tensor names, loaded through Studio's real loader and run through the shared token loop.

use std::ops::ControlFlow;

use candle_core::Device;
use studio_inference::llm::generate::generate;
use studio_inference::llm::loader::{self, Architecture};
use studio_inference::llm::sampling::SamplingParams;
use studio_tests::families::{CONTEXT, FAMILIES, write_family};

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_family_loads_and_generates_deterministically() {
    for &family in FAMILIES {
        let tmp = tempfile::tempdir().expect("tmp");
        write_family(tmp.path(), family, 11);
        let mut m = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        assert!(
            matches!(m.info.architecture, Architecture::Family(_)),
            "{family}"
        );
        assert_eq!(m.info.context_length, CONTEXT, "{family}");
        assert!(
            m.info.parameters > 10_000,
            "{family}: {}",
            m.info.parameters
        );
        assert!(!m.eos_token_ids.is_empty(), "{family}");
        let prompt = m
            .tokenizer
            .encode("Hello there, how are you?")
            .expect("encode");
        let run = |m: &mut loader::LoadedModel| {
            let mut ids = Vec::new();
            generate(
                &mut *m.model,
                &m.tokenizer,
                &[],
                &prompt,
                &SamplingParams::greedy(12),
                &mut |s| {
                    ids.extend(s.id);
                    ControlFlow::Continue(())
                },
            )
            .unwrap_or_else(|e| panic!("{family}: {e}"));
            ids
        };
        let a = run(&mut m);
        assert_eq!(a.len(), 12, "{family}");
        assert_eq!(
            a,
            run(&mut m),
            "{family}: greedy output differs between runs"
        );
    }
}

#[test]
fn kv_cache_steps_match_a_full_prefill() {
    for &family in FAMILIES {
        let tmp = tempfile::tempdir().expect("tmp");
        write_family(tmp.path(), family, 5);
        let mut m = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {}).expect("load");
        let ids: Vec<u32> = vec![5, 17, 42, 3, 88, 61, 9, 200, 23, 7];
        m.model.clear_kv_cache();
        let full = m
            .model
            .forward_last(&ids, 0)
            .expect("full")
            .to_vec1::<f32>()
            .expect("vec");
        m.model.clear_kv_cache();
        m.model.forward_last(&ids[..6], 0).expect("prefill");
        let mut last = Vec::new();
        for (i, &id) in ids.iter().enumerate().skip(6) {
            last = m
                .model
                .forward_last(&[id], i)
                .expect("step")
                .to_vec1::<f32>()
                .expect("vec");
        }
        let d = max_abs_diff(&full, &last);
        assert!(d < 1e-4, "{family}: cached and full logits differ by {d}");
    }
}

#[test]
fn missing_tensors_and_bad_configs_are_named() {
    for family in ["llama", "qwen2"] {
        let tmp = tempfile::tempdir().expect("tmp");
        write_family(tmp.path(), family, 1);
        let weights = tmp.path().join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).expect("load");
        let gone = "model.layers.1.mlp.down_proj.weight";
        assert!(tensors.remove(gone).is_some());
        candle_core::safetensors::save(&tensors, &weights).expect("save");
        let err = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {})
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains(gone), "{family}: {err}");
    }

    let tmp = tempfile::tempdir().expect("tmp");
    write_family(tmp.path(), "qwen2", 1);
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("read")).expect("json");
    cfg.as_object_mut()
        .expect("object")
        .remove("num_key_value_heads");
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let err = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {})
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("num_key_value_heads"), "{err}");
}

#[test]
fn generation_config_eos_lists_are_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    write_family(tmp.path(), "llama", 2);
    std::fs::write(
        tmp.path().join("generation_config.json"),
        r#"{"eos_token_id": [7, 9]}"#,
    )
    .expect("write");
    let m = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {}).expect("load");
    assert_eq!(&m.eos_token_ids[..2], &[7, 9]);
}
