//! Fill-in-the-middle prompts at the token-id level for each format, with tokenizers that
//! carry the formats' special tokens (trained byte-level BPE, the same rebuilt from GGUF
//! metadata, and SentencePiece GGUF vocabularies); budgets and what was cut; injection;
//! stop tokens; single/multi-line decisions and trimming; the completion cache.

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use studio_inference::code::complete::{
    CompletionCache, CompletionFilter, CompletionMode, CompletionRequest, completion_mode,
    postprocess, run_completion,
};
use studio_inference::code::fim::{self, FimFormat, build_prompt};
use studio_inference::llm::generate::FinishReason;
use studio_inference::llm::loader::{Architecture, LoadedModel, ModelInfo};
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::llm::text::Tokenizer;
use studio_inference::models::CausalLm;
use studio_tests::code::{
    fim_gguf_tokenizer, fim_sentencepiece_tokenizer, fim_tokenizer, format_specials,
};

fn id(tok: &Tokenizer, s: &str) -> u32 {
    tok.token_to_id(s)
        .unwrap_or_else(|| panic!("{s} not in the vocabulary"))
}

const PREFIX: &str = "def add(a, b):\n    return";
const SUFFIX: &str = "\n\nprint(add(1, 2))\n";

#[test]
fn each_format_is_detected_and_laid_out_by_id() {
    for format in FimFormat::ALL {
        let tok = fim_tokenizer(format);
        let fim = fim::detect(&tok, &[0]).expect("detected");
        assert_eq!(fim.format, format);
        let p = build_prompt(&tok, &fim, PREFIX, SUFFIX, 1024).expect("prompt");
        let pre = tok.encode(PREFIX).expect("encode");
        let suf = tok.encode(SUFFIX).expect("encode");
        let mut want: Vec<u32> = Vec::new();
        match format {
            FimFormat::QwenCoder => {
                want.push(id(&tok, "<|fim_prefix|>"));
                want.extend(&pre);
                want.push(id(&tok, "<|fim_suffix|>"));
                want.extend(&suf);
                want.push(id(&tok, "<|fim_middle|>"));
            }
            FimFormat::StarCoder => {
                want.push(id(&tok, "<fim_prefix>"));
                want.extend(&pre);
                want.push(id(&tok, "<fim_suffix>"));
                want.extend(&suf);
                want.push(id(&tok, "<fim_middle>"));
            }
            FimFormat::CodeLlama => {
                want.push(id(&tok, "<s>"));
                want.push(id(&tok, "▁<PRE>"));
                want.extend(&pre);
                want.push(id(&tok, "▁<SUF>"));
                want.extend(&suf);
                want.push(id(&tok, "▁<MID>"));
            }
            FimFormat::DeepSeekCoder => {
                want.push(id(&tok, "<｜begin▁of▁sentence｜>"));
                want.push(id(&tok, "<｜fim▁begin｜>"));
                want.extend(&pre);
                want.push(id(&tok, "<｜fim▁hole｜>"));
                want.extend(&suf);
                want.push(id(&tok, "<｜fim▁end｜>"));
            }
            FimFormat::Codestral => {
                want.push(id(&tok, "<s>"));
                want.push(id(&tok, "[SUFFIX]"));
                want.extend(&suf);
                want.push(id(&tok, "[PREFIX]"));
                want.extend(&pre);
            }
        }
        assert_eq!(p.tokens, want, "{format}");
        assert_eq!((p.prefix_tokens, p.suffix_tokens), (pre.len(), suf.len()));
        assert_eq!(p.prefix_cut, None);
        assert_eq!(p.suffix_cut, None);
        assert_eq!(p.cut_notice(), None);
    }
}

#[test]
fn gguf_tokenizers_give_the_same_prompts() {
    for format in FimFormat::ALL {
        let hf = fim_tokenizer(format);
        let gguf = fim_gguf_tokenizer(format);
        let a = fim::detect(&hf, &[0]).expect("hf");
        let b = fim::detect(&gguf, &[0]).expect("gguf");
        assert_eq!(b.format, format);
        let pa = build_prompt(&hf, &a, PREFIX, SUFFIX, 1024).expect("prompt");
        let pb = build_prompt(&gguf, &b, PREFIX, SUFFIX, 1024).expect("prompt");
        assert_eq!(pa.tokens, pb.tokens, "{format}");
    }
}

#[test]
fn sentencepiece_codellama_and_codestral() {
    // CodeLlama: `<s> ▁<PRE> {prefix} ▁<SUF>{suffix} ▁<MID>`, the prefix with SentencePiece's
    // leading space, the suffix without.
    let tok = fim_sentencepiece_tokenizer(FimFormat::CodeLlama);
    let fim = fim::detect(&tok, &[2]).expect("codellama");
    assert_eq!(fim.format, FimFormat::CodeLlama);
    assert_eq!(fim.bos, Some(1));
    let p = build_prompt(&tok, &fim, "Hello world", "Hello", 64).expect("prompt");
    let pre = tok.encode("Hello world").expect("encode");
    assert_eq!(p.tokens[..2], [1, id(&tok, "▁<PRE>")]);
    assert_eq!(p.tokens[2..2 + pre.len()], pre[..]);
    let suf_at = 2 + pre.len();
    assert_eq!(p.tokens[suf_at], id(&tok, "▁<SUF>"));
    let suf = &p.tokens[suf_at + 1..p.tokens.len() - 1];
    assert_ne!(suf, tok.encode("Hello").expect("encode").as_slice());
    assert_eq!(tok.decode(suf).expect("decode"), "Hello");
    assert_eq!(p.tokens.last(), Some(&id(&tok, "▁<MID>")));
    assert!(fim.stop_ids.contains(&id(&tok, "▁<EOT>")));
    assert!(fim.stop_ids.contains(&2));

    let tok = fim_sentencepiece_tokenizer(FimFormat::Codestral);
    let fim = fim::detect(&tok, &[2]).expect("codestral");
    assert_eq!(fim.format, FimFormat::Codestral);
    let p = build_prompt(&tok, &fim, "Hello", "world", 64).expect("prompt");
    let mut want = vec![1, id(&tok, "[SUFFIX]")];
    want.extend(tok.encode("world").expect("encode"));
    want.push(id(&tok, "[PREFIX]"));
    want.extend(tok.encode("Hello").expect("encode"));
    assert_eq!(p.tokens, want);
}

#[test]
fn stop_tokens_of_each_format() {
    let cases: [(FimFormat, &[&str]); 5] = [
        (
            FimFormat::QwenCoder,
            &[
                "<|endoftext|>",
                "<|fim_pad|>",
                "<|file_sep|>",
                "<|repo_name|>",
            ],
        ),
        (FimFormat::StarCoder, &["<|endoftext|>", "<file_sep>"]),
        (FimFormat::CodeLlama, &["▁<EOT>", "</s>"]),
        (FimFormat::DeepSeekCoder, &["<｜end▁of▁sentence｜>"]),
        (FimFormat::Codestral, &["</s>"]),
    ];
    for (format, stops) in cases {
        let tok = fim_tokenizer(format);
        // 7 stands for the model's own end-of-text id.
        let fim = fim::detect(&tok, &[7]).expect("detected");
        for s in stops {
            assert!(fim.stop_ids.contains(&id(&tok, s)), "{format}: {s}");
        }
        assert!(fim.stop_ids.contains(&7), "{format}: the model's eos");
        assert!(!fim.stop_ids.contains(&fim.prefix) || format != FimFormat::CodeLlama);
    }
}

#[test]
fn no_fim_tokens_is_a_clear_error_and_overrides_are_checked() {
    let plain = Tokenizer::from_inner(studio_tests::train_tokenizer(300));
    let err = fim::detect(&plain, &[0]).expect_err("no fim").to_string();
    assert!(err.contains("fill-in-the-middle"), "{err}");

    let qwen = fim_tokenizer(FimFormat::QwenCoder);
    let err = fim::resolve(&qwen, Some(FimFormat::CodeLlama), &[0])
        .expect_err("lacks codellama")
        .to_string();
    assert!(err.contains("codellama"), "{err}");
    // A tokenizer with two formats' tokens: detection picks one, the override the other.
    let mut both = format_specials(FimFormat::QwenCoder);
    both.extend(format_specials(FimFormat::StarCoder));
    let tok = Tokenizer::from_inner(studio_tests::code::train_code_tokenizer(312, &both));
    assert_eq!(
        fim::detect(&tok, &[]).expect("fim").format,
        FimFormat::QwenCoder
    );
    assert_eq!(
        fim::resolve(&tok, Some(FimFormat::StarCoder), &[])
            .expect("fim")
            .format,
        FimFormat::StarCoder
    );
    for f in FimFormat::ALL {
        assert_eq!(FimFormat::from_name(f.name()), Some(f));
    }
    assert_eq!(
        FimFormat::from_name("StarCoder2"),
        Some(FimFormat::StarCoder)
    );
    assert_eq!(
        FimFormat::from_name("stable-code"),
        Some(FimFormat::StarCoder)
    );
    assert_eq!(FimFormat::from_name("gpt"), None);
}

#[test]
fn special_tokens_in_user_code_cannot_be_injected() {
    for format in FimFormat::ALL {
        let tok = fim_tokenizer(format);
        let fim = fim::detect(&tok, &[0]).expect("fim");
        let markers = format_specials(format);
        let evil_prefix = format!("x = \"{}{}<|endoftext|>\"\n", markers[0], markers[2]);
        let evil_suffix = format!("# {} {}\n", markers[1], markers[0]);
        let p = build_prompt(&tok, &fim, &evil_prefix, &evil_suffix, 1024).expect("prompt");
        let count = |id: u32| p.tokens.iter().filter(|&&t| t == id).count();
        assert_eq!(count(fim.prefix), 1, "{format}");
        assert_eq!(count(fim.suffix), 1, "{format}");
        if let Some(m) = fim.middle {
            assert_eq!(count(m), 1, "{format}");
        }
        let markers_ids = [Some(fim.prefix), Some(fim.suffix), fim.middle];
        for stop in fim
            .stop_ids
            .iter()
            .filter(|s| !markers_ids.contains(&Some(**s)))
        {
            assert_eq!(count(*stop), 0, "{format}: stop id {stop} injected");
        }
        // The markers are still there, as ordinary text.
        let text = tok.decode(&p.tokens).expect("decode");
        assert!(text.contains(markers[2]), "{format}: {text}");
        assert!(fim.encode_plain(&tok, "<|endoftext|>").expect("enc").len() > 1);
    }
}

fn long_text(lines: usize, tag: &str) -> String {
    let mut s = String::new();
    for i in 0..lines {
        writeln!(s, "    value_{tag}_{i} = compute({i}, \"{tag}\")").expect("write");
    }
    s
}

#[test]
fn budget_is_split_mostly_for_the_prefix_and_cut_on_line_boundaries() {
    let tok = fim_tokenizer(FimFormat::QwenCoder);
    let fim = fim::detect(&tok, &[0]).expect("fim");
    let prefix = long_text(200, "p") + "    total = ";
    let suffix = "\n".to_owned() + &long_text(200, "s");
    let budget = 300;
    let p = build_prompt(&tok, &fim, &prefix, &suffix, budget).expect("prompt");
    assert!(p.tokens.len() <= budget, "{} > {budget}", p.tokens.len());
    assert!(
        p.tokens.len() >= budget - 40,
        "budget mostly used: {}",
        p.tokens.len()
    );
    assert!(
        p.prefix_tokens >= 2 * p.suffix_tokens,
        "{} vs {}",
        p.prefix_tokens,
        p.suffix_tokens
    );
    assert!(p.suffix_tokens > 0);
    let pc = p.prefix_cut.expect("prefix cut");
    let sc = p.suffix_cut.expect("suffix cut");
    assert!(pc.lines > 100 && !pc.mid_line, "{pc:?}");
    assert!(sc.lines > 100 && !sc.mid_line, "{sc:?}");
    // The kept prefix is the end of the prefix from a line start; the kept suffix the start of
    // the suffix up to a line end.
    let kept_prefix = &prefix[pc.bytes..];
    assert!(pc.bytes == 0 || prefix.as_bytes()[pc.bytes - 1] == b'\n');
    let kept_suffix = &suffix[..suffix.len() - sc.bytes];
    assert!(kept_suffix.ends_with('\n'));
    let body = &p.tokens[1..p.tokens.len() - 1];
    let s_at = body
        .iter()
        .position(|&t| t == fim.suffix)
        .expect("suffix marker");
    assert_eq!(tok.decode(&body[..s_at]).expect("decode"), kept_prefix);
    assert_eq!(tok.decode(&body[s_at + 1..]).expect("decode"), kept_suffix);
    let notice = p.cut_notice().expect("notice");
    assert!(notice.contains("before the cursor") && notice.contains("after the cursor"));

    // A short suffix leaves its share to the prefix.
    let q = build_prompt(&tok, &fim, &prefix, "\n}\n", budget).expect("prompt");
    assert!(q.prefix_tokens > budget * 85 / 100, "{}", q.prefix_tokens);
    assert_eq!(q.suffix_cut, None);
    // A short prefix leaves its share to the suffix.
    let r = build_prompt(&tok, &fim, "x = ", &suffix, budget).expect("prompt");
    assert!(r.suffix_tokens > budget * 85 / 100, "{}", r.suffix_tokens);
    assert_eq!(r.prefix_cut, None);

    // One enormous line: cut inside it, keeping its end.
    let line = "x".repeat(5000);
    let s = build_prompt(&tok, &fim, &line, "", 100).expect("prompt");
    assert!(s.tokens.len() <= 100);
    assert!(s.prefix_cut.expect("cut").mid_line);

    // A budget below the markers is refused.
    assert!(build_prompt(&tok, &fim, "a", "b", 3).is_err());
}

#[test]
fn single_or_multi_line_from_context() {
    use CompletionMode::{MultiLine, SingleLine};
    assert_eq!(completion_mode("let x = foo(", ");\n"), SingleLine);
    assert_eq!(completion_mode("fn main() {", "\n}\n"), MultiLine);
    assert_eq!(completion_mode("def f(x):", "\n"), MultiLine);
    assert_eq!(completion_mode("fn f() {\n    ", "\n}"), MultiLine);
    assert_eq!(completion_mode("x = 1\n", ""), MultiLine);
    assert_eq!(completion_mode("    let total = sum", "\n"), SingleLine);
    assert_eq!(completion_mode("print(", ")"), SingleLine);
}

#[test]
fn suggestions_are_trimmed() {
    use CompletionMode::{MultiLine, SingleLine};
    // One line: up to the newline.
    assert_eq!(postprocess("a + b\nprint(1)\n", SingleLine, "\n"), "a + b");
    assert_eq!(postprocess("\nfoo", SingleLine, ""), "");
    // The rest of the cursor's line is not suggested again.
    assert_eq!(postprocess("a, b)\nx", SingleLine, ")\n"), "a, b");
    assert_eq!(postprocess("a, f(b))", SingleLine, ")\n"), "a, f(b)");
    assert_eq!(postprocess("a, f(b)", SingleLine, ")\n"), "a, f(b");
    assert_eq!(postprocess("1;", SingleLine, "  ;"), "1");
    let mut f = CompletionFilter::new(SingleLine, ");\n");
    assert_eq!(f.push("a, b)"), "a, b");
    assert_eq!(f.push(";"), "");
    assert_eq!(f.push(" // sum"), "); // sum");
    assert_eq!(f.push("\n"), "");
    assert!(f.is_stopped());
    let mut f = CompletionFilter::new(SingleLine, ");\n");
    assert_eq!(f.push("a, b)"), "a, b");
    assert_eq!(f.push(";\n"), "");
    // Several: stop where the suffix's first line is repeated; no trailing blank lines or
    // trailing whitespace.
    let suffix = "\n}\n\nfn other() {}\n";
    assert_eq!(
        postprocess(
            "\n    let x = 1;\n    x + 1\n}\n\nfn other() {}\n",
            MultiLine,
            suffix
        ),
        "\n    let x = 1;\n    x + 1"
    );
    assert_eq!(
        postprocess("\n    return a + b   \n\n   \n", MultiLine, "\n"),
        "\n    return a + b"
    );
    assert_eq!(postprocess("   \n\n", MultiLine, ""), "");
    // Streaming gives the same as post-processing, and releases text before the line ends.
    let mut f = CompletionFilter::new(MultiLine, suffix);
    let mut shown = String::new();
    for piece in ["\n    let", " x = 1;", "\n    x", " + 1\n", "}", "\n\nfn"] {
        shown.push_str(&f.push(piece));
        if piece == " x = 1;" {
            assert_eq!(shown, "\n    let x = 1;");
        }
        if f.is_stopped() {
            break;
        }
    }
    assert!(f.is_stopped());
    shown.push_str(&f.finish());
    assert_eq!(shown, "\n    let x = 1;\n    x + 1");
}

#[test]
fn cache_hits_exact_and_typed_through() {
    let mut c = CompletionCache::new(2);
    c.insert("m", "fn main() {\n    let x = ", "\n}", "compute(1);");
    assert_eq!(
        c.get("m", "fn main() {\n    let x = ", "\n}").as_deref(),
        Some("compute(1);")
    );
    // The user typed "comp": the rest of the suggestion.
    assert_eq!(
        c.get("m", "fn main() {\n    let x = comp", "\n}")
            .as_deref(),
        Some("ute(1);")
    );
    assert_eq!(c.get("m", "fn main() {\n    let x = cop", "\n}"), None);
    assert_eq!(c.get("other", "fn main() {\n    let x = ", "\n}"), None);
    assert_eq!(c.get("m", "fn main() {\n    let x = ", "\n}\n"), None);
    // Least recently used goes first.
    c.insert("m", "a", "b", "1");
    let _ = c.get("m", "fn main() {\n    let x = ", "\n}");
    c.insert("m", "c", "d", "2");
    assert_eq!(c.len(), 2);
    assert_eq!(c.get("m", "a", "b"), None);
    assert!(c.get("m", "fn main() {\n    let x = ", "\n}").is_some());
}

/// A model that emits a fixed script of tokens, whatever the prompt.
struct Scripted {
    script: Vec<u32>,
    at: usize,
    vocab: usize,
}

impl CausalLm for Scripted {
    fn forward_last(
        &mut self,
        _tokens: &[u32],
        _offset: usize,
    ) -> studio_inference::Result<Tensor> {
        let mut logits = vec![0f32; self.vocab];
        let next = self.script.get(self.at).copied().unwrap_or(0) as usize;
        logits[next] = 10.0;
        self.at += 1;
        Ok(Tensor::from_vec(logits, self.vocab, &Device::Cpu)?)
    }
    fn clear_kv_cache(&mut self) {
        self.at = 0;
    }
    fn context_length(&self) -> usize {
        4096
    }
    fn set_context_length(&mut self, tokens: usize) -> usize {
        tokens
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

fn scripted_model(tok: &Tokenizer, text_then_stop: (&str, &str)) -> LoadedModel {
    let mut script = tok.encode(text_then_stop.0).expect("encode");
    script.push(id(tok, text_then_stop.1));
    script.extend(tok.encode("garbage after the stop").expect("encode"));
    let vocab = tok.vocab_size();
    LoadedModel {
        model: Box::new(Scripted {
            script,
            at: 0,
            vocab,
        }),
        tokenizer: tok.clone(),
        info: ModelInfo {
            name: "scripted".to_owned(),
            path: PathBuf::new(),
            architecture: Architecture::Gpt2,
            context_length: 4096,
            vocab_size: vocab,
            parameters: 0,
            dtype: "f32".to_owned(),
            chat_format: "plain".to_owned(),
            notes: Vec::new(),
        },
        eos_token_ids: vec![0],
        chat: studio_inference::llm::chat::ChatFormat::Plain { reason: None },
    }
}

#[test]
fn completion_stops_at_the_formats_stop_tokens() {
    for (format, stop) in [
        (FimFormat::QwenCoder, "<|fim_pad|>"),
        (FimFormat::QwenCoder, "<|file_sep|>"),
        (FimFormat::StarCoder, "<file_sep>"),
        (FimFormat::CodeLlama, "▁<EOT>"),
        (FimFormat::DeepSeekCoder, "<｜end▁of▁sentence｜>"),
        (FimFormat::Codestral, "</s>"),
    ] {
        let tok = fim_tokenizer(format);
        let mut m = scripted_model(&tok, ("\n    return a + b", stop));
        let req = CompletionRequest::new("def add(a, b):", "\n", SamplingParams::greedy(64));
        let mut streamed = String::new();
        let out = run_completion(&mut m, &req, &mut |s| {
            streamed.push_str(s.text);
            ControlFlow::Continue(())
        })
        .expect("completion");
        assert_eq!(out.text, "\n    return a + b", "{format} {stop}");
        assert_eq!(streamed, out.text);
        assert_eq!(out.stats.finish, FinishReason::EndOfText, "{format}");
        assert_eq!(out.mode, CompletionMode::MultiLine);
        assert_eq!(out.prompt.format, format);
    }
    // A single-line completion ends at the newline, before any stop token.
    let tok = fim_tokenizer(FimFormat::QwenCoder);
    let mut m = scripted_model(&tok, ("a + b)\nprint(2)", "<|fim_pad|>"));
    let req = CompletionRequest::new("x = add(", ")\n", SamplingParams::greedy(64));
    let out = run_completion(&mut m, &req, &mut |_| ControlFlow::Continue(())).expect("run");
    // … and without the `)` that is already after the cursor.
    assert_eq!(out.text, "a + b");
    assert_eq!(out.mode, CompletionMode::SingleLine);
    assert_eq!(out.stats.finish, FinishReason::StopString);
    // Cancelling ends it as cancelled.
    let mut m = scripted_model(&tok, ("\n    return a + b", "<|fim_pad|>"));
    let req = CompletionRequest::new("def add(a, b):", "\n", SamplingParams::greedy(64));
    let out = run_completion(&mut m, &req, &mut |_| ControlFlow::Break(())).expect("run");
    assert_eq!(out.stats.finish, FinishReason::Cancelled);
}
