//! Studio's quantized CPU kernels in the GGUF Gemma 2 / Gemma 3 model (`models::quant_gemma`) against
//! the same model with every linear weight on candle's `QMatMul`, on tiny random-weight files:
//! prompt logits, greedy continuations through the KV cache, and that Studio's kernels (and
//! its quantized embedding lookup) actually run the weights.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};
use serde_json::json;
use studio_inference::llm::gguf;
use studio_inference::models::quant_gemma as gemma;
use studio_inference::quant::{KernelPath, QuantFormat, preferred};
use studio_tests::families::write_family_with;
use studio_tests::gguf_writer::{GgufOptions, convert};
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
            let mut ours = gguf::load_gemma_cpu(&path, true).expect("studio load");
            let mut theirs = gguf::load_gemma_cpu(&path, false).expect("candle load");
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

/// What `gguf::load` builds on the CPU is Studio's own model (`QuantLlama`, one-token steps on
/// the decode team), with Gemma's sliding window crossed (a window of 4 positions) and Gemma
/// 3's rope (global base 1e6 with linear scaling 8, local base 10000): its logits through a
/// prompt and greedy steps against `gemma::Model` (candle ops between the products) on
/// Studio's kernels (the same products: only summation orders differ) and on candle's, and
/// its one-token steps bit for bit the same on any thread count.
#[test]
fn gguf_load_runs_gemma_on_studios_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut report = Vec::new();
    for family in ["gemma2", "gemma3_text"] {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let sub = tmp.path().join(format!("{family}-{dtype:?}-window"));
            std::fs::create_dir_all(&sub).expect("dir");
            write_family_with(
                &sub,
                family,
                &json!({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 64, "query_pre_attn_scalar": 64,
                        "sliding_window": 4}),
                21,
            );
            let mut opts = GgufOptions::with_dtype(dtype);
            if family == "gemma3_text" {
                opts.overrides = vec![
                    ("gemma3.rope.freq_base".to_owned(), Value::F32(1e6)),
                    (
                        "gemma3.rope.scaling.type".to_owned(),
                        Value::String("linear".to_owned()),
                    ),
                    ("gemma3.rope.scaling.factor".to_owned(), Value::F32(8.0)),
                ];
            }
            let path = sub.join("model.gguf");
            convert(&sub, &path, &opts);
            let mut g = gguf::load(&path, &Device::Cpu, &mut |_, _| {}).expect("load");
            let mut same = gguf::load_gemma_cpu(&path, true).expect("studio kernels");
            let mut candle = gguf::load_gemma_cpu(&path, false).expect("candle kernels");
            let m = &mut *g.model;
            let logits = |t: Tensor| -> Vec<f32> { t.to_vec1().expect("logits") };
            let mut tokens = PROMPT.to_vec();
            let (mut d_same, mut d_candle) = (0f32, 0f32);
            let mut a = logits(m.forward_last(&tokens, 0).expect("prefill"));
            let mut b = forward(&mut same, &tokens, 0);
            let mut c = forward(&mut candle, &tokens, 0);
            for _ in 0..STEPS {
                d_same = d_same.max(rel_diff(&b, &a));
                d_candle = d_candle.max(rel_diff(&c, &a));
                let next = argmax(&b);
                let pos = tokens.len();
                tokens.push(next);
                a = logits(m.forward_last(&[next], pos).expect("step"));
                b = forward(&mut same, &[next], pos);
                c = forward(&mut candle, &[next], pos);
            }
            report.push(format!(
                "{family} {dtype:?}: against the same kernels {d_same:.1e}, against candle's \
                 {d_candle:.1e}"
            ));
            assert!(
                d_same < 1e-3,
                "{family} {dtype:?}: {d_same} from the same kernels"
            );
            assert!(
                d_candle < MAX_REL_DIFF,
                "{family} {dtype:?}: {d_candle} from candle's"
            );

            let mut runs = Vec::new();
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                runs.push(pool.install(|| {
                    m.forward_last(&PROMPT, 0).expect("prefill");
                    (0..6u32)
                        .map(|i| {
                            let pos = PROMPT.len() + i as usize;
                            logits(m.forward_last(&[30 + 7 * i], pos).expect("step"))
                        })
                        .collect::<Vec<_>>()
                }));
            }
            assert_eq!(runs[0], runs[1], "{family} {dtype:?}: 1 vs 2 threads");
            assert_eq!(runs[0], runs[2], "{family} {dtype:?}: 1 vs 3 threads");
        }
    }
    eprintln!("{}", report.join("\n"));
}
