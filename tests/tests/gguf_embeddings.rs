//! Embeddings from a chat model's hidden states (`CausalLm::hidden_states`,
//! `LoadedModel::embed_tokens`), on Studio's GGUF kernels and from Qwen2/Qwen3 safetensors
//! folders (candle's decoders plus Studio's head): the last row, projected by the
//! model's own output matrix read from the file, gives the logits the model computes, and the
//! pooled embedding is the rows' mean scaled to length 1, or the first or last row when the
//! file's `pooling_type` says so (Qwen3-Embedding is last-token).

use candle_core::Device;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, gguf_file};
use studio_inference::llm::loader;
use studio_tests::families::write_family_with;
use studio_tests::gguf_writer::{GgufOptions, convert};

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// Loads the model at `path` (a GGUF or a folder) and runs "hello there, small world" through it: the model, the
/// token ids, their final hidden states and the logits of the last one.
fn hidden_and_logits(
    path: &std::path::Path,
) -> (loader::LoadedModel, Vec<u32>, candle_core::Tensor, Vec<f32>) {
    let mut m = loader::load(path, &Device::Cpu, &mut |_, _| {}).expect("load");
    let ids = m.tokenizer.encode("hello there, small world").expect("ids");
    let hidden = m.model.hidden_states(&ids).expect("hidden states");
    assert_eq!(hidden.dims2().expect("2-D").0, ids.len());
    let logits: Vec<f32> = m
        .model
        .forward_last(&ids, 0)
        .expect("logits")
        .to_vec1()
        .expect("vec");
    (m, ids, hidden, logits)
}

/// The pooled embedding of `ids` is the mean of their hidden states, of length 1, and
/// embedding leaves the cache empty: the same logits come again.
fn assert_mean_pooled_and_cache_left_empty(
    m: &mut loader::LoadedModel,
    ids: &[u32],
    hidden: &candle_core::Tensor,
    logits: &[f32],
    family: &str,
) {
    let e = m.embed_tokens(ids).expect("embed");
    assert_eq!(e.len(), hidden.dims2().expect("2-D").1, "{family}");
    let mean: Vec<f32> = hidden.mean(0).expect("mean").to_vec1().expect("vec");
    assert!(cosine(&e, &mean) > 0.999_99, "{family}");
    let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{family}: {norm}");
    let again: Vec<f32> = m
        .model
        .forward_last(ids, 0)
        .expect("again")
        .to_vec1()
        .expect("vec");
    assert_eq!(again, logits, "{family}");
}

/// Tensor `name` of the GGUF at `path`, dequantized.
fn file_tensor(path: &std::path::Path, name: &str) -> candle_core::Tensor {
    let mut file = std::fs::File::open(path).expect("open");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    content
        .tensor(&mut file, name, &Device::Cpu)
        .expect("tensor")
        .dequantize(&Device::Cpu)
        .expect("dequantize")
}

/// The last row of `hidden` projected by `w` (`(vocab, hidden)`, as the file stores an output
/// matrix): what the model's logits are made from.
fn last_row_projected(hidden: &candle_core::Tensor, w: &candle_core::Tensor) -> Vec<f32> {
    let (t, _) = hidden.dims2().expect("2-D");
    hidden
        .get(t - 1)
        .expect("last row")
        .unsqueeze(0)
        .expect("row")
        .matmul(&w.t().expect("t"))
        .expect("matmul")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec")
}

#[test]
fn hidden_states_are_what_the_logits_are_made_from_and_pool_to_unit_vectors() {
    for (family, dtype) in [("llama", GgmlDType::Q8_0), ("qwen2", GgmlDType::Q4_0)] {
        // Widths of whole quantization blocks, so the layers run on Studio's kernels.
        let tmp = tempfile::tempdir().expect("tmp");
        write_family_with(
            tmp.path(),
            family,
            &serde_json::json!({"hidden_size": 256, "intermediate_size": 512,
                "num_attention_heads": 4, "num_key_value_heads": 2}),
            3,
        );
        let path = tmp.path().join("model.gguf");
        convert(tmp.path(), &path, &GgufOptions::with_dtype(dtype));
        let (mut m, ids, hidden, logits) = hidden_and_logits(&path);
        // The output matrix as the file stores it (tied to the embeddings when it has none).
        let mut file = std::fs::File::open(&path).expect("open");
        let content = gguf_file::Content::read(&mut file).expect("gguf");
        let name = if content.tensor_infos.contains_key("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let w = file_tensor(&path, name);
        let projected = last_row_projected(&hidden, &w);
        assert_eq!(projected.len(), logits.len(), "{family}");
        let c = cosine(&projected, &logits);
        assert!(c > 0.999, "{family}: cosine {c}");
        assert_mean_pooled_and_cache_left_empty(&mut m, &ids, &hidden, &logits, family);
    }
}

#[test]
fn the_files_pooling_type_picks_the_row_and_a_reranker_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    write_family_with(
        tmp.path(),
        "qwen2",
        &serde_json::json!({"hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 4, "num_key_value_heads": 2}),
        5,
    );
    let load = |pooling: Option<u32>| {
        let path = tmp.path().join(format!("model-{pooling:?}.gguf"));
        let mut opts = GgufOptions::with_dtype(GgmlDType::Q8_0);
        if let Some(p) = pooling {
            opts.overrides
                .push(("qwen2.pooling_type".to_owned(), Value::U32(p)));
        }
        convert(tmp.path(), &path, &opts);
        loader::load(&path, &Device::Cpu, &mut |_, _| {}).expect("load")
    };
    let mut plain = load(None);
    let ids = plain
        .tokenizer
        .encode("pool these few tokens")
        .expect("ids");
    let hidden = plain.model.hidden_states(&ids).expect("hidden");
    let unit = |row: candle_core::Tensor| {
        let mut v: Vec<f32> = row.to_vec1().expect("vec");
        studio_inference::embed::normalize(&mut v);
        v
    };
    let mean = unit(hidden.mean(0).expect("mean"));
    let first = unit(hidden.get(0).expect("first"));
    let last = unit(hidden.get(ids.len() - 1).expect("last"));
    // Nothing said and "none" (0) pool by the mean; 1 mean, 2 CLS (first), 3 last token.
    for (pooling, expected) in [
        (None, &mean),
        (Some(0), &mean),
        (Some(1), &mean),
        (Some(2), &first),
        (Some(3), &last),
    ] {
        let e = load(pooling).embed_tokens(&ids).expect("embed");
        let c = cosine(&e, expected);
        assert!(c > 0.999_99, "pooling_type {pooling:?}: cosine {c}");
    }
    assert!(cosine(&first, &last) < 0.99, "the rows differ");
    // A reranker (4) and an unknown kind load as chat models but give no embeddings.
    for (pooling, says) in [(4, "reranker"), (9, "unknown")] {
        let err = load(Some(pooling))
            .embed_tokens(&ids)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(says) && err.contains("pooling_type"), "{err}");
    }
}

#[test]
fn qwen_safetensors_folders_give_hidden_states_and_others_say_they_cant() {
    for family in ["qwen2", "qwen3"] {
        let tmp = tempfile::tempdir().expect("tmp");
        write_family_with(tmp.path(), family, &serde_json::json!({}), 7);
        let (mut m, ids, hidden, logits) = hidden_and_logits(tmp.path());
        // The head as the folder stores it: `lm_head`, or the tied embeddings.
        let tensors =
            candle_core::safetensors::load(tmp.path().join("model.safetensors"), &Device::Cpu)
                .expect("tensors");
        let head = tensors
            .get("lm_head.weight")
            .or_else(|| tensors.get("model.embed_tokens.weight"))
            .expect("head");
        let projected = last_row_projected(&hidden, head);
        let c = cosine(&projected, &logits);
        assert!(c > 0.999_99, "{family}: cosine {c}");
        assert_mean_pooled_and_cache_left_empty(&mut m, &ids, &hidden, &logits, family);
    }
    let tmp = tempfile::tempdir().expect("tmp");
    write_family_with(tmp.path(), "llama", &serde_json::json!({}), 7);
    let mut m = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {}).expect("load");
    let ids = m.tokenizer.encode("hello").expect("ids");
    let err = m
        .embed_tokens(&ids)
        .expect_err("no hidden states")
        .to_string();
    assert!(
        err.contains("hidden states") && err.contains("Qwen"),
        "{err}"
    );
}

#[test]
fn gemma_gguf_on_candles_ops_gives_hidden_states_too() {
    // An F32 file runs on Studio's Gemma with candle's ops (as on a GPU), not the CPU kernels.
    let tmp = tempfile::tempdir().expect("tmp");
    write_family_with(
        tmp.path(),
        "gemma3_text",
        &serde_json::json!({"hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "query_pre_attn_scalar": 64}),
        3,
    );
    let path = tmp.path().join("model.gguf");
    convert(tmp.path(), &path, &GgufOptions::with_dtype(GgmlDType::F32));
    let (mut m, ids, hidden, logits) = hidden_and_logits(&path);
    let w = file_tensor(&path, "token_embd.weight");
    let projected = last_row_projected(&hidden, &w);
    let c = cosine(&projected, &logits);
    assert!(c > 0.999_9, "cosine {c}");
    assert_eq!(m.embed_tokens(&ids).expect("embed").len(), 256);
}
