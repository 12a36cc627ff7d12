//! GGUF files: the tiny random checkpoints of every family converted the way llama.cpp's
//! converter does, loaded through `studio_inference::llm::gguf`, and compared with the same
//! checkpoint loaded from safetensors; the tokenizer rebuilt from GGUF metadata; and the errors
//! a bad file must give.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use studio_inference::Error;
use studio_inference::llm::generate::generate;
use studio_inference::llm::gguf::{self, GgufModel};
use studio_inference::llm::gguf_tokenizer::{byte_level_pre_tokenization_splits, pre_tokenization};
use studio_inference::llm::loader;
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::llm::text::Tokenizer;
use studio_inference::models::CausalLm;
use studio_tests::EOS;
use studio_tests::families::{CONTEXT, VOCAB, write_family};
use studio_tests::gguf_writer::{
    self, GgufOptions, TensorEntry, convert, patch_tensor_dims, patch_tensor_type,
    sentencepiece_metadata, sentencepiece_vocab, write_family_gguf, write_gguf, write_header_only,
};
use studio_tests::logits::argmax;

/// The families candle-transformers (or Studio's own Gemma) runs from GGUF, by `model_type`.
const GGUF_FAMILIES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3_text",
];

const PROMPTS: &[&str] = &[
    "Hello there, how are you?",
    "The capital of France is",
    "日本語のテキストと",
    "fn main() { println!(",
];

fn greedy(model: &mut dyn CausalLm, tokenizer: &Tokenizer, prompt: &[u32]) -> Vec<u32> {
    let mut ids = Vec::new();
    generate(
        model,
        tokenizer,
        &[],
        prompt,
        &SamplingParams::greedy(12),
        &mut |s| {
            ids.extend(s.id);
            ControlFlow::Continue(())
        },
    )
    .expect("generate");
    ids
}

fn load_gguf(path: &Path) -> GgufModel {
    gguf::load(path, &Device::Cpu, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest difference between the two models' logits after `prompt`, relative to the
/// largest logit.
fn logit_difference(a: &mut dyn CausalLm, b: &mut dyn CausalLm, prompt: &[u32]) -> f32 {
    let run = |m: &mut dyn CausalLm| {
        m.clear_kv_cache();
        m.forward_last(prompt, 0)
            .expect("forward")
            .to_vec1::<f32>()
            .expect("vec")
    };
    let (x, y) = (run(a), run(b));
    assert_eq!(x.len(), y.len());
    let scale = x.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    x.iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max)
        / scale
}

/// Fraction of steps where `model` picks the same next token as `reference` did, fed the
/// reference's own continuation (no compounding after a first difference).
fn teacher_forced_agreement(model: &mut dyn CausalLm, prompt: &[u32], reference: &[u32]) -> f32 {
    model.clear_kv_cache();
    let mut logits = model
        .forward_last(prompt, 0)
        .expect("prefill")
        .to_vec1::<f32>()
        .expect("vec");
    let mut same = 0;
    for (i, &want) in reference.iter().enumerate() {
        if argmax(&logits) == want {
            same += 1;
        }
        logits = model
            .forward_last(&[want], prompt.len() + i)
            .expect("step")
            .to_vec1::<f32>()
            .expect("vec");
    }
    same as f32 / reference.len() as f32
}

#[test]
fn every_family_matches_its_safetensors_model() {
    let mut report = Vec::new();
    for &family in GGUF_FAMILIES {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        write_family(dir, family, 21);
        let mut hf = loader::load(dir, &Device::Cpu, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let prompts: Vec<Vec<u32>> = PROMPTS
            .iter()
            .map(|p| hf.tokenizer.encode(p).expect("encode"))
            .collect();
        let expected: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| greedy(&mut *hf.model, &hf.tokenizer, p))
            .collect();

        for dtype in [GgmlDType::F32, GgmlDType::F16] {
            let mut exact_diff = 0.0f32;
            let path = dir.join(format!("model-{dtype:?}.gguf"));
            convert(dir, &path, &GgufOptions::with_dtype(dtype));
            let mut g = load_gguf(&path);
            assert_eq!(g.info.vocab_size, VOCAB, "{family}");
            assert_eq!(g.info.context_length, CONTEXT, "{family}");
            assert_eq!(g.model.context_length(), CONTEXT, "{family}");
            for (prompt, want) in prompts.iter().zip(&expected) {
                // The logits themselves, not only their argmax.
                let d = logit_difference(&mut *hf.model, &mut *g.model, prompt);
                // F32 differs only by summation order; F16 by the rounding of the weights.
                let tol = if dtype == GgmlDType::F32 { 1e-5 } else { 1e-2 };
                assert!(d < tol, "{family} {dtype:?}: logits differ by {d}");
                exact_diff = exact_diff.max(d);
                let got = greedy(&mut *g.model, &g.tokenizer, prompt);
                assert_eq!(&got, want, "{family} {dtype:?}: greedy output differs");
                // Generating again (the KV cache is cleared in between) gives the same.
                assert_eq!(
                    greedy(&mut *g.model, &g.tokenizer, prompt),
                    got,
                    "{family} {dtype:?}: not deterministic"
                );
            }
            report.push(format!(
                "{family:<12} {dtype:?}: greedy identical, max relative logit difference \
                 {exact_diff:.1e}"
            ));
        }

        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let path = dir.join(format!("model-{dtype:?}.gguf"));
            convert(dir, &path, &GgufOptions::with_dtype(dtype));
            let mut g = load_gguf(&path);
            let (mut same, mut total, mut forced, mut max_diff) = (0usize, 0usize, 0.0f32, 0.0f32);
            for (prompt, want) in prompts.iter().zip(&expected) {
                max_diff = max_diff.max(logit_difference(&mut *hf.model, &mut *g.model, prompt));
                let got = greedy(&mut *g.model, &g.tokenizer, prompt);
                same += got.iter().zip(want).filter(|(a, b)| a == b).count();
                total += want.len();
                forced += teacher_forced_agreement(&mut *g.model, prompt, want);
            }
            let rate = same as f32 / total as f32;
            let forced = forced / prompts.len() as f32;
            report.push(format!(
                "{family:<12} {dtype:?}: greedy agreement {rate:.2} (teacher-forced {forced:.2}), \
                 max relative logit difference {max_diff:.3}"
            ));
            if dtype == GgmlDType::Q8_0 {
                assert!(
                    rate >= 0.5,
                    "{family} Q8_0: only {rate:.2} of greedy tokens agree with safetensors"
                );
            }
        }
    }
    println!(
        "GGUF agreement with the safetensors model:\n{}",
        report.join("\n")
    );
}

#[test]
fn kv_cache_steps_and_chunks_match_a_full_prefill() {
    let ids: Vec<u32> = vec![5, 17, 42, 3, 88, 61, 9, 200, 23, 7, 120, 64];
    for &family in GGUF_FAMILIES {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = write_family_gguf(tmp.path(), family, 5, &GgufOptions::default());
        let mut g = load_gguf(&path);
        let m = &mut *g.model;
        m.clear_kv_cache();
        let full = m
            .forward_last(&ids, 0)
            .expect("full")
            .to_vec1::<f32>()
            .expect("vec");
        // Prefill, two single steps, then a chunk of several tokens at a time.
        m.clear_kv_cache();
        m.forward_last(&ids[..6], 0).expect("prefill");
        m.forward_last(&ids[6..7], 6).expect("step");
        m.forward_last(&ids[7..8], 7).expect("step");
        let chunked = m
            .forward_last(&ids[8..], 8)
            .expect("chunk")
            .to_vec1::<f32>()
            .expect("vec");
        let d = full
            .iter()
            .zip(&chunked)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-4, "{family}: cached and full logits differ by {d}");
    }
}

#[test]
fn gemma_sliding_window_is_consistent_between_prefill_and_decode() {
    // A window of 3 over 12 tokens: every layer but the global ones sees only the last 3.
    let ids: Vec<u32> = vec![5, 17, 42, 3, 88, 61, 9, 200, 23, 7, 120, 64];
    for (family, key) in [
        ("gemma3_text", "gemma3.attention.sliding_window"),
        ("gemma2", "gemma2.attention.sliding_window"),
    ] {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut windowed = Vec::new();
        for window in [3u32, 1000] {
            let opts = GgufOptions {
                overrides: vec![(key.to_owned(), Value::U32(window))],
                ..GgufOptions::default()
            };
            let dir = tmp.path().join(format!("w{window}"));
            let path = write_family_gguf(&dir, family, 8, &opts);
            let mut g = load_gguf(&path);
            let m = &mut *g.model;
            m.clear_kv_cache();
            let full = m
                .forward_last(&ids, 0)
                .expect("full")
                .to_vec1::<f32>()
                .expect("v");
            m.clear_kv_cache();
            m.forward_last(&ids[..2], 0).expect("prefill");
            let mut last = Vec::new();
            for (i, &id) in ids.iter().enumerate().skip(2) {
                last = m
                    .forward_last(&[id], i)
                    .expect("step")
                    .to_vec1::<f32>()
                    .expect("v");
            }
            let d = full
                .iter()
                .zip(&last)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                d < 1e-4,
                "{family} window {window}: prefill and decode differ by {d}"
            );
            windowed.push(full);
        }
        let d = windowed[0]
            .iter()
            .zip(&windowed[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d > 1e-4, "{family}: a window of 3 changed nothing");
    }
}

#[test]
fn gguf_tokenizer_matches_the_tokenizer_json_it_came_from() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = write_family_gguf(tmp.path(), "qwen2", 3, &GgufOptions::default());
    let hf = Tokenizer::from_file(&tmp.path().join("tokenizer.json")).expect("hf tokenizer");
    let gg = gguf::load_tokenizer(&path).expect("gguf tokenizer");
    let texts = [
        "Hello there! How are you today? I'm fine, you're kind.",
        "Café crème, naïve façade, jalapeño, São Paulo.",
        "日本語のテキストと中文文本。",
        "Emoji: 🎨🖌️✨ and more 🚀.",
        "<|endoftext|>Hello<|endoftext|> again",
        "  leading spaces\n\n\tand tabs   \n",
        "fn main() { println!(\"hello, world\"); } // 12345 + 678",
        "ünïcödé ÀÉÎÕÜ ß ø å 🤖",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "<start_of_turn>user [INST] hi [/INST]<end_of_turn>",
    ];
    for text in texts {
        let want = hf.encode(text).expect("hf encode");
        let got = gg.encode(text).expect("gguf encode");
        assert_eq!(got, want, "{text:?}");
        assert_eq!(gg.decode(&got).expect("decode"), text, "{text:?}");
    }
    let eos = hf.token_to_id(EOS).expect("eos");
    assert_eq!(gg.encode(EOS).expect("encode"), vec![eos]);
    assert_eq!(gg.token_to_id(EOS), Some(eos));

    // End of generation: EOS, then the end-of-turn control tokens llama.cpp recognizes.
    let info = gguf::inspect(&path).expect("inspect");
    assert_eq!(info.eos_token_ids.first(), Some(&eos));
    for t in ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"] {
        let id = hf.token_to_id(t).expect("chat special");
        assert!(info.eos_token_ids.contains(&id), "{t}");
    }
    let start = hf.token_to_id("<|im_start|>").expect("im_start");
    assert!(!info.eos_token_ids.contains(&start));
    assert_eq!(info.eos_token.as_deref(), Some(EOS));
    assert_eq!(info.tokenizer_model, "gpt2");
    assert!(!info.add_bos_token);
}

#[test]
fn pre_tokenizer_regexes_follow_llama_cpp() {
    let splits = |pre: &str, text: &str| -> Vec<String> {
        byte_level_pre_tokenization_splits(&pre_tokenization(Some(pre)), text).expect("split")
    };
    let text = "I'M 12345 ok";
    // GPT-2: a leading space sticks to the number, numbers are not split.
    assert_eq!(splits("gpt2", text), ["I", "'", "M", "Ġ12345", "Ġok"]);
    // Llama 3: case-insensitive contractions, numbers in groups of up to three digits.
    assert_eq!(
        splits("llama-bpe", text),
        ["I", "'M", "Ġ", "123", "45", "Ġok"]
    );
    // Qwen2: single digits.
    assert_eq!(
        splits("qwen2", text),
        ["I", "'M", "Ġ", "1", "2", "3", "4", "5", "Ġok"]
    );
    // SmolLM: single digits first, then GPT-2's split.
    assert_eq!(
        splits("smollm", text),
        ["I", "'", "M", "Ġ", "1", "2", "3", "4", "5", "Ġok"]
    );
    assert!(pre_tokenization(Some("no-such-pre")).unknown);
    assert!(pre_tokenization(Some("llama-bpe")).ignore_merges);
}

fn write_tokenizer_only(path: &Path, md: &[(String, Value)]) {
    write_gguf(path, md, &[]);
}

fn pieces(ids: &[u32]) -> Vec<String> {
    let vocab = sentencepiece_vocab();
    ids.iter()
        .map(|&i| vocab.tokens[i as usize].clone())
        .collect()
}

#[test]
fn sentencepiece_vocabularies_round_trip() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("spm.gguf");
    write_tokenizer_only(&path, &sentencepiece_metadata(None, 0));
    let t = gguf::load_tokenizer(&path).expect("tokenizer");

    let ids = t.encode("Hello world").expect("encode");
    assert_eq!(pieces(&ids), ["▁Hello", "▁world"]);
    assert_eq!(t.decode(&ids).expect("decode"), "Hello world");

    let ids = t.encode("naïve café").expect("encode");
    assert_eq!(pieces(&ids), ["▁na", "ï", "ve", "▁caf", "é"]);
    assert_eq!(t.decode(&ids).expect("decode"), "naïve café");

    // Characters outside the vocabulary fall back to their UTF-8 bytes.
    let ids = t.encode("über").expect("encode");
    assert_eq!(pieces(&ids), ["▁", "<0xC3>", "<0xBC>", "<0x62>", "e", "r"]);
    assert_eq!(t.decode(&ids).expect("decode"), "über");

    // Control tokens are matched whole; no BOS is added.
    let ids = t.encode("<s>Hello</s>").expect("encode");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(pieces(&ids), ["<s>", "▁Hello", "</s>"]);

    // Gemma: no space prefix.
    let path = tmp.path().join("spm-gemma.gguf");
    write_tokenizer_only(&path, &sentencepiece_metadata(Some(false), 0));
    let t = gguf::load_tokenizer(&path).expect("tokenizer");
    let ids = t.encode("Hello world").expect("encode");
    assert_eq!(pieces(&ids), ["He", "llo", "▁world"]);
    assert_eq!(t.decode(&ids).expect("decode"), "Hello world");
}

#[test]
fn a_model_with_a_sentencepiece_vocabulary_loads_and_generates() {
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = GgufOptions {
        sentencepiece: true,
        dtype: GgmlDType::Q8_0,
        chat_template: Some(
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}".to_owned(),
        ),
        ..GgufOptions::default()
    };
    let path = write_family_gguf(tmp.path(), "llama", 4, &opts);
    let mut g = load_gguf(&path);
    assert_eq!(g.info.tokenizer_model, "llama");
    assert!(
        g.info.add_bos_token,
        "SentencePiece vocabularies start with BOS by default"
    );
    assert_eq!(g.info.bos_token.as_deref(), Some("<s>"));
    assert_eq!(g.info.eos_token.as_deref(), Some("</s>"));
    assert_eq!(g.info.eos_token_ids, vec![2]);
    assert!(
        g.info
            .chat_template
            .as_deref()
            .is_some_and(|t| t.contains("bos_token"))
    );
    assert_eq!(g.info.file_type, "Q8_0");
    let mut prompt = vec![1];
    prompt.extend(g.tokenizer.encode("Hello world").expect("encode"));
    let out = greedy(&mut *g.model, &g.tokenizer, &prompt);
    assert_eq!(out.len(), 12);
    g.tokenizer.decode(&out).expect("decodes");
}

#[test]
fn inspect_reads_the_header_without_the_tensor_data() {
    // A 7B-shaped Llama on paper (about 13 GB of F16), sparse on disk: inspect must not read it.
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("big.gguf");
    let (hidden, ff, layers, vocab, heads) = (4096usize, 11008usize, 32usize, 32000usize, 32usize);
    let f16 = |name: String, dims: &[usize]| TensorEntry::new(&name, dims, GgmlDType::F16, 1);
    let f32 = |name: String, dims: &[usize]| TensorEntry::new(&name, dims, GgmlDType::F32, 0);
    let mut tensors = vec![
        f16("token_embd.weight".into(), &[vocab, hidden]),
        f16("output.weight".into(), &[vocab, hidden]),
        f32("output_norm.weight".into(), &[hidden]),
    ];
    for i in 0..layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        tensors.push(f32(n("attn_norm.weight"), &[hidden]));
        tensors.push(f32(n("ffn_norm.weight"), &[hidden]));
        for s in [
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
        ] {
            tensors.push(f16(n(s), &[hidden, hidden]));
        }
        tensors.push(f16(n("ffn_gate.weight"), &[ff, hidden]));
        tensors.push(f16(n("ffn_up.weight"), &[ff, hidden]));
        tensors.push(f16(n("ffn_down.weight"), &[hidden, ff]));
    }
    let mut md = vec![
        (
            "general.architecture".to_owned(),
            Value::String("llama".into()),
        ),
        (
            "general.name".to_owned(),
            Value::String("Paper Llama 7B".into()),
        ),
        ("general.file_type".to_owned(), Value::U32(1)),
        ("llama.context_length".to_owned(), Value::U32(4096)),
        (
            "llama.embedding_length".to_owned(),
            Value::U32(hidden as u32),
        ),
        ("llama.block_count".to_owned(), Value::U32(layers as u32)),
        (
            "llama.feed_forward_length".to_owned(),
            Value::U32(ff as u32),
        ),
        (
            "llama.attention.head_count".to_owned(),
            Value::U32(heads as u32),
        ),
        (
            "llama.attention.head_count_kv".to_owned(),
            Value::U32(heads as u32),
        ),
        ("llama.rope.dimension_count".to_owned(), Value::U32(128)),
        (
            "llama.attention.layer_norm_rms_epsilon".to_owned(),
            Value::F32(1e-5),
        ),
        (
            "tokenizer.chat_template".to_owned(),
            Value::String("[INST] {{ messages[0].content }} [/INST]".into()),
        ),
    ];
    md.extend(sentencepiece_metadata(None, 0));
    write_header_only(&path, &md, &tensors);
    let size = std::fs::metadata(&path).expect("meta").len();
    assert!(size > 13_000_000_000, "{size}");

    let start = Instant::now();
    let info = gguf::inspect(&path).expect("inspect");
    let took = start.elapsed();
    assert!(took.as_secs_f32() < 2.0, "inspect took {took:?}");
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.name.as_deref(), Some("Paper Llama 7B"));
    assert_eq!(info.context_length, 4096);
    assert_eq!(info.vocab_size, vocab);
    assert_eq!(info.file_type, "F16");
    assert_eq!(info.file_size, size);
    assert!(
        info.chat_template
            .as_deref()
            .is_some_and(|t| t.contains("[INST]"))
    );
    let expected: usize = tensors
        .iter()
        .map(|t| t.dims.iter().product::<usize>())
        .sum();
    assert_eq!(info.parameters, expected);
    assert!((6_000_000_000..7_000_000_000).contains(&info.parameters));
}

fn expect_err(path: &Path) -> Error {
    let from_inspect = gguf::inspect(path).expect_err("inspect must fail");
    let from_load = gguf::load(path, &Device::Cpu, &mut |_, _| {})
        .err()
        .expect("load must fail");
    assert_eq!(from_inspect.to_string(), from_load.to_string());
    from_inspect
}

#[test]
fn bad_files_are_refused_with_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let good = write_family_gguf(
        tmp.path(),
        "llama",
        2,
        &GgufOptions::with_dtype(GgmlDType::Q8_0),
    );
    let bytes = std::fs::read(&good).expect("read");

    // Truncated in the tensor data (an interrupted download).
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).expect("write");
    let e = expect_err(&cut);
    assert!(matches!(e, Error::CorruptWeights { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");

    // Truncated inside the header.
    for n in [3, 20, 500] {
        std::fs::write(&cut, &bytes[..n]).expect("write");
        let e = expect_err(&cut);
        assert!(matches!(e, Error::CorruptWeights { .. }), "{n}: {e}");
    }

    // Not a GGUF file at all.
    let bad = tmp.path().join("bad.gguf");
    let mut other = bytes.clone();
    other[..4].copy_from_slice(b"GGML");
    std::fs::write(&bad, &other).expect("write");
    let e = expect_err(&bad);
    assert!(matches!(e, Error::CorruptWeights { .. }), "{e}");
    assert!(e.to_string().contains("not a GGUF file"), "{e}");
    std::fs::write(&bad, b"{\"not\": \"gguf\"}").expect("write");
    assert!(expect_err(&bad).to_string().contains("not a GGUF file"));

    // An architecture Studio does not run: named in the message.
    let arch = tmp.path().join("mamba.gguf");
    let opts = GgufOptions {
        overrides: vec![(
            "general.architecture".to_owned(),
            Value::String("mamba".to_owned()),
        )],
        ..GgufOptions::default()
    };
    convert(tmp.path(), &arch, &opts);
    let e = expect_err(&arch);
    assert!(matches!(e, Error::UnsupportedArchitecture(..)), "{e}");
    assert!(e.to_string().contains("mamba"), "{e}");

    // A quantization Studio cannot compute with: the type and the tensor are named.
    let iq = tmp.path().join("iq.gguf");
    std::fs::write(&iq, &bytes).expect("write");
    patch_tensor_type(&iq, "blk.0.attn_q.weight", 16);
    let e = expect_err(&iq);
    assert!(matches!(e, Error::InvalidParameter(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("IQ2_XXS") && msg.contains("blk.0.attn_q.weight"),
        "{msg}"
    );

    // Rows that are not whole quantization blocks (the value count still is): the tensor and
    // the block are named.
    let rows = tmp.path().join("rows.gguf");
    std::fs::write(&rows, &bytes).expect("write");
    // attn_q is 32 × 32 in this model: 16 × 64 holds as many values.
    patch_tensor_dims(&rows, "blk.0.attn_q.weight", &[16, 64]);
    let e = expect_err(&rows);
    assert!(matches!(e, Error::CorruptWeights { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("rows of 16") && msg.contains("32"),
        "{msg}"
    );

    // A missing tensor is named.
    let missing = tmp.path().join("missing.gguf");
    let opts = GgufOptions {
        skip_tensors: vec!["blk.1.ffn_down.weight".to_owned()],
        ..GgufOptions::default()
    };
    convert(tmp.path(), &missing, &opts);
    let e = expect_err(&missing);
    assert!(e.to_string().contains("blk.1.ffn_down.weight"), "{e}");

    // A missing hyperparameter is named (candle's loader would only say "cannot find").
    let nohp = tmp.path().join("nohp.gguf");
    let opts = GgufOptions {
        overrides: vec![(
            "llama.attention.layer_norm_rms_epsilon".to_owned(),
            Value::String("oops".to_owned()),
        )],
        ..GgufOptions::default()
    };
    convert(tmp.path(), &nohp, &opts);
    let e = expect_err(&nohp);
    assert!(e.to_string().contains("layer_norm_rms_epsilon"), "{e}");

    // A tokenizer Studio cannot build.
    let t5 = tmp.path().join("t5.gguf");
    let opts = GgufOptions {
        overrides: vec![(
            "tokenizer.ggml.model".to_owned(),
            Value::String("t5".into()),
        )],
        ..GgufOptions::default()
    };
    convert(tmp.path(), &t5, &opts);
    let e = expect_err(&t5);
    assert!(matches!(e, Error::Tokenizer(_)), "{e}");
    assert!(e.to_string().contains("t5"), "{e}");

    // A missing file.
    assert!(matches!(
        gguf::inspect(&tmp.path().join("nope.gguf")),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn info_describes_the_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let template =
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    let opts = GgufOptions {
        dtype: GgmlDType::Q4_0,
        chat_template: Some(template.to_owned()),
        ..GgufOptions::default()
    };
    let path = write_family_gguf(tmp.path(), "qwen3", 1, &opts);
    let mut progress = Vec::new();
    let g = gguf::load(&path, &Device::Cpu, &mut |f, m| {
        progress.push((f, m.to_owned()));
    })
    .expect("load");
    let info = &g.info;
    assert_eq!(info.architecture, "qwen3");
    assert_eq!(info.name.as_deref(), Some("tiny-qwen3"));
    assert_eq!(info.file_type, "Q4_0");
    assert_eq!(info.chat_template.as_deref(), Some(template));
    assert_eq!(info.context_length, CONTEXT);
    assert_eq!(info.trained_context_length, CONTEXT);
    let hf = loader::load(tmp.path(), &Device::Cpu, &mut |_, _| {}).expect("hf");
    assert_eq!(info.parameters, hf.info.parameters);
    assert_eq!(info, &gguf::inspect(&path).expect("inspect"));
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "{progress:?}"
    );
    assert_eq!(progress.last().map(|p| p.0), Some(1.0));
    assert!(progress.iter().any(|(_, m)| m.contains("weights")));
    assert!(g.tokenizer.vocab_size() <= info.vocab_size);
}

/// Environment variable naming the GGUF file [`peak_memory_child`] loads.
const MEMORY_CHILD: &str = "STUDIO_GGUF_MEMORY_CHILD";

/// Writes a Llama of about 110 MB at Q8_0 (8 layers of width 1024).
fn write_llama_q8(path: &Path) {
    let (hidden, ff, layers, heads, vocab) = (1024usize, 2816usize, 8usize, 16usize, 320usize);
    let dev = Device::Cpu;
    let q = |dims: &[usize]| {
        // Cheap pseudo-random values (rand is unoptimized in test builds).
        let n: usize = dims.iter().product();
        let t = (candle_core::Tensor::arange(0u32, n as u32, &dev)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| (t * 0.618_034).and_then(|t| t.sin()))
            .and_then(|t| t * 0.02)
            .and_then(|t| t.reshape(dims)))
        .expect("weights");
        gguf_writer::quantize(&t, GgmlDType::Q8_0)
    };
    let ones = |n: usize| {
        let t = candle_core::Tensor::ones(n, candle_core::DType::F32, &dev).expect("ones");
        gguf_writer::quantize(&t, GgmlDType::F32)
    };
    let mut tensors = vec![
        ("token_embd.weight".to_owned(), q(&[vocab, hidden])),
        ("output.weight".to_owned(), q(&[vocab, hidden])),
        ("output_norm.weight".to_owned(), ones(hidden)),
    ];
    for i in 0..layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        tensors.push((n("attn_norm.weight"), ones(hidden)));
        tensors.push((n("ffn_norm.weight"), ones(hidden)));
        for s in [
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
        ] {
            tensors.push((n(s), q(&[hidden, hidden])));
        }
        tensors.push((n("ffn_gate.weight"), q(&[ff, hidden])));
        tensors.push((n("ffn_up.weight"), q(&[ff, hidden])));
        tensors.push((n("ffn_down.weight"), q(&[hidden, ff])));
    }
    let u = |v: usize| Value::U32(v as u32);
    let mut md = vec![
        (
            "general.architecture".to_owned(),
            Value::String("llama".into()),
        ),
        ("llama.context_length".to_owned(), u(2048)),
        ("llama.embedding_length".to_owned(), u(hidden)),
        ("llama.block_count".to_owned(), u(layers)),
        ("llama.feed_forward_length".to_owned(), u(ff)),
        ("llama.attention.head_count".to_owned(), u(heads)),
        ("llama.attention.head_count_kv".to_owned(), u(heads)),
        ("llama.rope.dimension_count".to_owned(), u(hidden / heads)),
        (
            "llama.attention.layer_norm_rms_epsilon".to_owned(),
            Value::F32(1e-5),
        ),
    ];
    md.extend(sentencepiece_metadata(None, vocab));
    write_gguf(path, &md, &tensors);
}

/// Loading reads tensors one at a time from the file: the process never holds the file's
/// bytes and the weights at once. Measured in a child process (this test binary running
/// [`peak_memory_child`]), whose peak RSS is its own.
#[cfg(target_os = "linux")]
#[test]
fn loading_holds_one_copy_of_the_weights() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("q8.gguf");
    write_llama_q8(&path);
    let size = std::fs::metadata(&path).expect("meta").len() as f64 / (1024.0 * 1024.0);
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--ignored", "--exact", "peak_memory_child", "--nocapture"])
        .env(MEMORY_CHILD, &path)
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}");
    let field = |key: &str| -> f64 {
        stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
    };
    let grown = field("PEAK_AFTER_MB=") - field("PEAK_BEFORE_MB=");
    println!("GGUF of {size:.0} MiB: peak RSS grew by {grown:.0} MiB while loading");
    assert!(
        grown > 0.8 * size,
        "the weights were not loaded? {grown:.0} MiB"
    );
    assert!(
        grown < 1.25 * size + 24.0,
        "loading a {size:.0} MiB file raised the peak RSS by {grown:.0} MiB"
    );
}

#[test]
#[ignore = "run by loading_holds_one_copy_of_the_weights in a child process"]
fn peak_memory_child() {
    let Some(path) = std::env::var_os(MEMORY_CHILD) else {
        return;
    };
    let before = studio_inference::sys::peak_rss_mb().expect("VmHWM");
    let mut m = load_gguf(Path::new(&path));
    let after = studio_inference::sys::peak_rss_mb().expect("VmHWM");
    // It runs.
    m.model.forward_last(&[1, 5, 9], 0).expect("forward");
    println!("PEAK_BEFORE_MB={before} PEAK_AFTER_MB={after}");
}

/// Corrupt headers (truncated anywhere, or with bytes changed) give errors, never panics.
#[test]
fn corrupt_headers_never_panic() {
    let tmp = tempfile::tempdir().expect("tmp");
    let good = write_family_gguf(
        tmp.path(),
        "qwen2",
        6,
        &GgufOptions::with_dtype(GgmlDType::Q8_0),
    );
    let bytes = std::fs::read(&good).expect("read");
    // The header (metadata, mostly the vocabulary, and the tensor directory) ends where the
    // tensor data starts.
    let header_len = {
        let mut f = std::fs::File::open(&good).expect("open");
        candle_core::quantized::gguf_file::Content::read(&mut f)
            .expect("candle reads it")
            .tensor_data_offset as usize
    };
    let bad = tmp.path().join("bad.gguf");
    let try_file = |content: &[u8], what: &str| {
        std::fs::write(&bad, content).expect("write");
        let r = std::panic::catch_unwind(|| {
            if gguf::inspect(&bad).is_ok() {
                // Whatever passed the checks must load (or fail) without panicking.
                let _ = gguf::load(&bad, &Device::Cpu, &mut |_, _| {});
            }
        });
        assert!(r.is_ok(), "{what} panicked");
    };
    for cut in (0..header_len).step_by(997) {
        try_file(&bytes[..cut], &format!("truncated at {cut}"));
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..500 {
        let mut content = bytes.clone();
        for _ in 0..4 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let at = (x >> 33) as usize % header_len.min(content.len());
            content[at] = (x >> 17) as u8;
        }
        try_file(&content, &format!("round {round}"));
    }
}

/// Llama 3's and Qwen2's own `tokenizer.json` pre-tokenizers (as the hub ships them), applied
/// to the test vocabulary: the GGUF tokenizer with the matching `tokenizer.ggml.pre` encodes
/// exactly as they do.
#[test]
fn llama3_and_qwen2_pre_tokenizers_match_their_tokenizer_json() {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let tmp = tempfile::tempdir().expect("tmp");
    write_family(tmp.path(), "llama", 9);
    let json_path = tmp.path().join("tokenizer.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("read")).expect("json");
    let texts = [
        "I'M here, DON'T go; it's 1234567 o'clock.",
        "Hello there!\n\n  How are you?\r\n\tFine.  ",
        "Café crème 2024 — naïve façade 3.14159",
        "日本語のテキストと中文文本。12 34",
        "<|im_start|>user\nWhat's 99+1?<|im_end|>",
    ];
    for (pre, pattern, nfc, ignore_merges) in [
        ("llama-bpe", LLAMA3, false, true),
        ("qwen2", QWEN2, true, false),
    ] {
        let mut json = original.clone();
        json["pre_tokenizer"] = serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                 "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                 "use_regex": false}
            ]
        });
        if nfc {
            json["normalizer"] = serde_json::json!({"type": "NFC"});
        }
        json["model"]["ignore_merges"] = serde_json::json!(ignore_merges);
        std::fs::write(&json_path, json.to_string()).expect("write");
        let hf = Tokenizer::from_file(&json_path).expect("hf");
        let path = tmp.path().join(format!("{pre}.gguf"));
        let opts = GgufOptions {
            pre: pre.to_owned(),
            ..GgufOptions::default()
        };
        convert(tmp.path(), &path, &opts);
        let gg = gguf::load_tokenizer(&path).expect("gguf tokenizer");
        for text in texts {
            assert_eq!(
                gg.encode(text).expect("encode"),
                hf.encode(text).expect("encode"),
                "{pre}: {text:?}"
            );
        }
        let info = gguf::inspect(&path).expect("inspect");
        assert_eq!(info.tokenizer_pre.as_deref(), Some(pre));
        assert_eq!(info.add_bos_token, pre == "llama-bpe", "{pre}");
    }
}

/// The K-quants users download most (Q4_K, Q5_K, Q6_K: the parts of Q4_K_M / Q5_K_M files)
/// need rows that are whole 256-value super-blocks, so this model is 256 wide.
#[test]
fn k_quant_files_load_and_track_the_safetensors_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    studio_tests::families::write_family_with(
        dir,
        "llama",
        &serde_json::json!({
            "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2,
        }),
        21,
    );
    let mut hf =
        studio_inference::llm::loader::load(dir, &Device::Cpu, &mut |_, _| {}).expect("hf");
    let prompt = hf.tokenizer.encode(PROMPTS[0]).expect("encode");
    let want = greedy(&mut *hf.model, &hf.tokenizer, &prompt);
    let mut report = Vec::new();
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let path = dir.join(format!("model-{dtype:?}.gguf"));
        convert(dir, &path, &GgufOptions::with_dtype(dtype));
        let mut g = load_gguf(&path);
        // llama.cpp names the file types after their mix (Q4_K_M, Q5_K_M, Q6_K).
        let name = format!("{dtype:?}");
        if name.ends_with('K') {
            let bits = name.chars().nth(1).expect("digit");
            assert!(
                g.info.file_type.starts_with(&format!("Q{bits}_K")),
                "{dtype:?}: {}",
                g.info.file_type
            );
        }
        let diff = logit_difference(&mut *hf.model, &mut *g.model, &prompt);
        let forced = teacher_forced_agreement(&mut *g.model, &prompt, &want);
        report.push(format!(
            "{dtype:?}: teacher-forced agreement {forced:.2}, max relative logit difference \
             {diff:.3}"
        ));
        // Quantization error grows as bits shrink, but the model must still be the same model.
        // Quantization error grows as bits shrink (random weights are harsher on it than
        // trained ones), but each file must still be the same model.
        let (max_diff, min_agreement) = match dtype {
            GgmlDType::Q8_0 | GgmlDType::Q6K => (0.15, 0.75),
            _ => (1.0, 0.25),
        };
        assert!(diff < max_diff, "{dtype:?}: logits differ by {diff}");
        assert!(
            forced >= min_agreement,
            "{dtype:?}: only {forced:.2} of tokens agree"
        );
    }
    println!("K-quants:\n{}", report.join("\n"));
}

/// NaN, infinite, zero or negative epsilons and rope bases in a GGUF are refused, naming the
/// key, instead of running a model that can only produce NaN.
#[test]
fn non_finite_or_negative_scalars_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    write_family_gguf(tmp.path(), "llama", 2, &GgufOptions::default());
    for (key, v) in [
        ("llama.rope.freq_base", f32::NAN),
        ("llama.rope.freq_base", -1.0),
        ("llama.attention.layer_norm_rms_epsilon", f32::INFINITY),
        ("llama.attention.layer_norm_rms_epsilon", 0.0),
    ] {
        let out = tmp.path().join("bad.gguf");
        let opts = GgufOptions {
            overrides: vec![(key.to_owned(), Value::F32(v))],
            ..GgufOptions::default()
        };
        convert(tmp.path(), &out, &opts);
        let e = expect_err(&out).to_string();
        assert!(e.contains(key), "{key} = {v}: {e}");
    }
}
