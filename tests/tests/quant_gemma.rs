//! Studio's quantized CPU kernels in the GGUF Gemma 2 / Gemma 3 model (`gguf::gemma`) against
//! the same model with every linear weight on candle's `QMatMul`, on tiny random-weight files:
//! prompt logits, greedy continuations through the KV cache, and that Studio's kernels (and
//! its quantized embedding lookup) actually run the weights.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use serde_json::json;
use studio_inference::gguf::{self, gemma};
use studio_inference::quant::{KernelPath, QuantFormat, preferred};
use studio_tests::families::write_family_with;
use studio_tests::gguf_writer::{GgufOptions, convert, patch_tensor_type};
use studio_tests::logits::{argmax, rel_diff};

/// Both kernels quantize activations to 8 bits per block, but in different orders of
/// summation and (for candle's Q4_0/Q8_0) with its own activation rounding: the logits agree
/// to about 1% of their largest magnitude.
const MAX_REL_DIFF: f32 = 2e-2;

const PROMPT: [u32; 9] = [5, 17, 42, 3, 88, 61, 9, 200, 23];
const STEPS: usize = 10;

/// A tiny Gemma of `family` (hidden 256, 4 heads of 64, 2 key/value heads, 2 layers, tied
/// embeddings as Gemma has them) in `dtype`.
fn write(dir: &Path, family: &str, dtype: GgmlDType) -> PathBuf {
    let sub = dir.join(format!("{family}-{dtype:?}"));
    std::fs::create_dir_all(&sub).expect("dir");
    write_family_with(
        &sub,
        family,
        &json!({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 64, "query_pre_attn_scalar": 64}),
        13,
    );
    let out = sub.join("model.gguf");
    convert(&sub, &out, &GgufOptions::with_dtype(dtype));
    out
}

fn forward(m: &mut gemma::Model, tokens: &[u32], offset: usize) -> Vec<f32> {
    let x = Tensor::new(tokens, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("input");
    m.forward(&x, offset)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("forward")
}

/// The prompt's logits, then `STEPS` greedy tokens fed back one at a time through the cache.
fn greedy(m: &mut gemma::Model) -> (Vec<f32>, Vec<u32>) {
    m.clear_kv_cache();
    let first = forward(m, &PROMPT, 0);
    let mut next = argmax(&first);
    let mut out = vec![next];
    for i in 0..STEPS - 1 {
        let logits = forward(m, &[next], PROMPT.len() + i);
        next = argmax(&logits);
        out.push(next);
    }
    (first, out)
}

#[test]
fn studio_kernels_run_gemma_and_match_candle() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut report = Vec::new();
    for family in ["gemma2", "gemma3_text"] {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let path = write(tmp.path(), family, dtype);
            let mut ours = gemma::load_cpu(&path, true).expect("studio load");
            let mut theirs = gemma::load_cpu(&path, false).expect("candle load");
            assert_eq!(theirs.studio_weights(), 0, "{family} {dtype:?}");
            assert!(!theirs.studio_embeddings(), "{family} {dtype:?}");
            let format = QuantFormat::from_ggml(dtype).expect("format");
            if preferred(format, KernelPath::detect()) {
                // 7 per layer, 2 layers, and the (tied) output projection.
                assert_eq!(ours.studio_weights(), 15, "{family} {dtype:?}");
                assert!(ours.fallbacks().is_empty(), "{:?}", ours.fallbacks());
                assert!(ours.studio_embeddings(), "{family} {dtype:?}");
            } else {
                assert_eq!(ours.studio_weights(), 0, "{family} {dtype:?}");
            }

            let (a, ta) = greedy(&mut ours);
            let (b, tb) = greedy(&mut theirs);
            let d = rel_diff(&a, &b);
            let agree = ta.iter().zip(&tb).filter(|(x, y)| x == y).count();
            report.push(format!(
                "{family} {dtype:?}: rel diff {d:.2e}, greedy agreement {agree}/{STEPS}"
            ));
            assert!(d < MAX_REL_DIFF, "{family} {dtype:?}: logits differ by {d}");
            assert_eq!(argmax(&a), argmax(&b), "{family} {dtype:?}: first token");
            assert!(
                agree * 10 >= STEPS * 7,
                "{family} {dtype:?}: greedy {ta:?} vs candle's {tb:?}"
            );

            // Prefill and one-token steps on Studio's kernels agree with a full prefill.
            ours.clear_kv_cache();
            let full = forward(&mut ours, &PROMPT, 0);
            ours.clear_kv_cache();
            forward(&mut ours, &PROMPT[..3], 0);
            let mut last = Vec::new();
            for (i, &id) in PROMPT.iter().enumerate().skip(3) {
                last = forward(&mut ours, &[id], i);
            }
            let d = rel_diff(&full, &last);
            assert!(d < 1e-3, "{family} {dtype:?}: cached vs full {d}");
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// What `gguf::load` builds on the CPU is the model on Studio's kernels.
#[test]
fn gguf_load_runs_gemma_on_studio_kernels() {
    let tmp = tempfile::tempdir().expect("tmp");
    for family in ["gemma2", "gemma3_text"] {
        let path = write(tmp.path(), family, GgmlDType::Q8_0);
        let mut g = gguf::load(&path, &Device::Cpu, &mut |_, _| {}).expect("load");
        let m = &mut *g.model;
        m.clear_kv_cache();
        let loaded = m
            .forward_last(&PROMPT, 0)
            .expect("forward")
            .to_vec1::<f32>()
            .expect("logits");
        let mut ours = gemma::load_cpu(&path, true).expect("studio load");
        let direct = forward(&mut ours, &PROMPT, 0);
        let d = rel_diff(&direct, &loaded);
        assert!(d < 1e-5, "{family}: gguf::load and load_cpu differ by {d}");
    }
}

/// IQ4_NL and IQ4_XS run only on Studio's Llama/Qwen/Phi-3 model: a Gemma file with such a
/// tensor is read (`inspect`) but refused on load, naming the tensor, its type and why.
#[test]
fn a_gemma_file_with_iq4_tensors_is_refused_clearly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = write(tmp.path(), "gemma2", GgmlDType::Q4_0);
    // Q4_0 and IQ4_NL blocks are both 18 bytes for 32 values: the file stays well formed.
    patch_tensor_type(&path, "blk.0.attn_q.weight", 20);
    gguf::inspect(&path).expect("the header is valid");
    let msg = gguf::load(&path, &Device::Cpu, &mut |_, _| {})
        .err()
        .expect("load must fail")
        .to_string();
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("IQ4_NL") && msg.contains("gemma2"),
        "{msg}"
    );
}
