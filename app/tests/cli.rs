//! The `studio` command-line contract, run as a person would: the real binary on a tiny
//! random-weight GPT-2 written by the test.

use studio_tests::{
    Gpt2Naming, TinyGpt2, copy_fixture, json_ids, word_prompt, write_gpt2, write_gpt2_readable,
    write_word_level_tokenizer,
};

mod cli_common;
use cli_common::{path, studio};

fn model() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tmp");
    write_gpt2_readable(tmp.path(), TinyGpt2::default(), 5);
    tmp
}

#[test]
fn generate_streams_the_raw_continuation() {
    let m = model();
    let out = studio(&[
        "generate",
        "--model",
        path(m.path()),
        "--prompt",
        "Hello",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.trim_end().len() > 3, "{text:?}");
}

#[test]
fn generate_json_prints_one_object_per_token_then_a_summary() {
    let m = model();
    let run = |seed: &str| {
        let out = studio(&[
            "generate",
            "--model",
            path(m.path()),
            "--prompt",
            "The quick brown",
            "--max-tokens",
            "16",
            "--temperature",
            "1.2",
            "--top-k",
            "50",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let a = run("3");
    let lines: Vec<serde_json::Value> = a
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let (summary, tokens) = lines.split_last().expect("lines");
    assert_eq!(summary["done"], true);
    for key in ["prompt_tokens", "ttft_ms", "prefill_tok_s", "decode_tok_s"] {
        assert!(summary[key].is_number(), "{key} missing in {summary}");
    }
    assert_eq!(
        summary["generated_tokens"].as_u64(),
        Some(tokens.len() as u64)
    );
    assert!(!tokens.is_empty());
    for t in tokens {
        assert!(t["id"].is_u64() && t["text"].is_string(), "{t}");
        assert_eq!(t.as_object().expect("object").len(), 2);
    }
    // Same seed, same tokens (timings differ).
    let ids = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.contains("\"id\""))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(ids(&a), ids(&run("3")));
}

#[test]
fn errors_go_to_stderr_with_a_non_zero_exit() {
    let m = model();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--model".into(),
                "/nonexistent/model".into(),
                "--prompt".into(),
                "x".into(),
            ],
            "no such file",
        ),
        (
            vec![
                "--model".into(),
                path(m.path()).into(),
                "--prompt".into(),
                String::new(),
            ],
            "prompt is empty",
        ),
        (
            vec![
                "--model".into(),
                path(m.path()).into(),
                "--prompt".into(),
                "The quick brown fox jumps over the lazy dog. ".repeat(40),
            ],
            "context is 128 tokens",
        ),
        (
            vec![
                "--model".into(),
                path(m.path()).into(),
                "--prompt".into(),
                "x".into(),
                "--top-p".into(),
                "0".into(),
            ],
            "top-p",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["generate".to_owned()];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = studio(&refs);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{all:?} succeeded");
        assert!(err.contains(expected), "{all:?}: {err}");
        assert!(out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("error"));
    }

    let pickle = m.path().join("pytorch_model.bin");
    std::fs::write(&pickle, b"\x80\x04").expect("write");
    let out = studio(&["generate", "--model", path(&pickle), "--prompt", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pytorch_model.bin") && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn bench_generate_reports_rates_and_memory() {
    let tmp = tempfile::tempdir().expect("tmp");
    write_gpt2(tmp.path(), TinyGpt2::default(), Gpt2Naming::Hub, 1);
    let out = studio(&[
        "bench",
        "generate",
        "--model",
        path(tmp.path()),
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "8",
        "--repeat",
        "2",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in ["prefill_tok_s", "decode_tok_s", "peak_rss_mb", "ttft_ms"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert_eq!(v["threads"], 1);
}

#[test]
fn chat_applies_the_models_template_and_prints_json_lines() {
    let tmp = tempfile::tempdir().expect("tmp");
    studio_tests::families::write_family(tmp.path(), "qwen2", 4);
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>"}).to_string(),
    )
    .expect("write");
    let out = studio(&[
        "chat",
        "--model",
        path(tmp.path()),
        "--system",
        "Be brief.",
        "--message",
        "Hi",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("lines")).expect("json");
    assert_eq!(last["done"], true);
    // "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    // is 3 + 3 + 3 markers/roles plus the words: far more than the 4 tokens of a raw "Hi".
    assert!(last["prompt_tokens"].as_u64().expect("n") > 10, "{last}");

    // A template that always raises: the reply still comes, in the plain format, with a note.
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        serde_json::json!({"chat_template": "{{ raise_exception('no') }}"}).to_string(),
    )
    .expect("write");
    let out = studio(&[
        "chat",
        "--model",
        path(tmp.path()),
        "--message",
        "Hi",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("plain transcript"));
}

/// Runs `studio` with `STUDIO_CPU_PATH` set to `value`.
fn studio_on_path(value: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_studio"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env("STUDIO_CPU_PATH", value)
        .output()
        .expect("run studio")
}

#[test]
fn studio_cpu_path_forces_a_path_and_refuses_a_bad_one() {
    use studio_inference::quant::KernelPath;
    let m = model();
    let bench = [
        "bench",
        "generate",
        "--model",
        path(m.path()),
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "2",
        "--repeat",
        "1",
        "--json",
    ];
    let out = studio_on_path("scalar", &bench);
    let json: serde_json::Value =
        serde_json::from_str(cli_common::ok(&out).trim()).expect("one JSON object");
    assert_eq!(json["cpu_path"], "scalar", "{json}");

    let err = cli_common::failed(&studio_on_path("avx1024", &bench));
    assert!(
        err.contains("STUDIO_CPU_PATH") && err.contains("avx512, avx2 or scalar"),
        "{err}"
    );
    match KernelPath::ALL.into_iter().find(|p| !p.cpu_has()) {
        Some(missing) => {
            let name = match missing {
                KernelPath::Avx512Vnni => "avx512",
                KernelPath::Avx2 => "avx2",
                KernelPath::Scalar => "scalar",
            };
            let err = cli_common::failed(&studio_on_path(name, &bench));
            assert!(
                err.contains("this CPU lacks") && err.contains(&missing.to_string()),
                "{err}"
            );
        }
        None => eprintln!(
            "skipped the lacking-path case: this CPU has every kernel path ({:?})",
            KernelPath::ALL
        ),
    }
}

/// Absurd numeric flags are refused by the parser with the flag named (status 2), before
/// anything is sized from them: the issue's SIGABRT, panic and hang cases.
#[test]
fn absurd_flag_values_are_refused_with_the_flag_named() {
    // The model path does not exist: the parser must refuse the value before it is looked at.
    let cases = [
        "inpaint --model /none --prompt x --init a.png --mask m.png --out o.png --mask-blur 1e9",
        "inpaint --model /none --prompt x --init a.png --mask m.png --out o.png --mask-blur inf",
        "bench generate --model /none --prompt-tokens 18446744073709551615",
        "bench memory --repeat 18446744073709551615",
        "bench memory --threads 5000",
        "gan --model /none --out o.png --psi nan",
        "gan-project --model /none --image a.png --out-w w.npy --lr nan",
        "generate --model /none --prompt x --max-tokens 0",
    ];
    for case in cases {
        let args: Vec<&str> = case.split(' ').collect();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_studio"))
            .args(&args)
            .output()
            .expect("run studio");
        let err = String::from_utf8_lossy(&out.stderr);
        let flag = args[args.len() - 2];
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(flag) && err.contains("invalid value"),
            "{args:?}: {err}"
        );
    }
}

/// `--temperature 0` with no other flag is transformers' greedy decoding: the ids of the GPT-2
/// and transformers-5 Qwen2 fixtures' argmax continuations (no repeat penalty by default).
#[test]
fn temperature_zero_with_default_flags_is_transformers_greedy() {
    for fixture in ["gpt2-tiny", "qwen2-tf5"] {
        let tmp = tempfile::tempdir().expect("tmp");
        copy_fixture(fixture, tmp.path());
        write_word_level_tokenizer(tmp.path(), 97);
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("expected.json")).expect("expected"),
        )
        .expect("json");
        let greedy = json_ids(&expected, "greedy_new_ids");
        let out = studio(&[
            "generate",
            "--model",
            path(tmp.path()),
            "--prompt",
            &word_prompt(&json_ids(&expected, "input_ids")),
            "--max-tokens",
            &greedy.len().to_string(),
            "--temperature",
            "0",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{fixture}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let got: Vec<u32> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
            .filter_map(|v| v["id"].as_u64())
            .map(|id| u32::try_from(id).expect("u32"))
            .collect();
        assert_eq!(got, greedy, "{fixture}");
    }
}

/// `studio convert` turns a `torch.save` checkpoint into safetensors with the same tensors,
/// and refuses a hostile pickle without running it.
#[test]
fn convert_reads_a_pickle_as_data_and_writes_safetensors() {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pickles");
    let tmp = tempfile::tempdir().expect("tmp");
    let out_path = tmp.path().join("sd.safetensors");
    let out = studio(&[
        "convert",
        path(&fixtures.join("sd_like.ckpt")),
        path(&out_path),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("converted 2 tensors"));
    let written = std::fs::read(&out_path).expect("written");
    let twin = std::fs::read(fixtures.join("sd_like.safetensors")).expect("twin");
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&written).expect("out"),
        safetensors::SafeTensors::deserialize(&twin).expect("twin"),
    );
    for name in b.names() {
        assert_eq!(
            a.tensor(name).expect(name).data(),
            b.tensor(name).expect(name).data()
        );
    }
    let canary = std::path::Path::new("/tmp/studio-pickle-canary-reduce");
    let _ = std::fs::remove_file(canary);
    let out = studio(&[
        "convert",
        path(&fixtures.join("hostile_reduce.pth")),
        path(&tmp.path().join("x.safetensors")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("posix.system"));
    assert!(!canary.exists() && !tmp.path().join("x.safetensors").exists());
}

/// `studio embed --model M --text …`: one JSON line per text, sentence-transformers'
/// embeddings (the fixture's); a text over the model's length is refused with its count.
#[test]
fn embed_prints_sentence_transformers_embeddings() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/sentence_embeddings/bge-cls");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("../expected.json")).expect("read"),
    )
    .expect("json");
    let texts = expected["texts"].as_array().expect("texts");
    let (a, b) = (
        texts[0].as_str().expect("text"),
        texts[1].as_str().expect("text"),
    );
    let out = cli_common::ok(&studio(&[
        "embed",
        "--model",
        path(&model),
        "--text",
        a,
        "--text",
        b,
    ]));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i);
        assert!(line["tokens"].as_u64().is_some_and(|t| t > 2));
        let ours = line["embedding"].as_array().expect("embedding");
        let theirs = expected["bge-cls"][i].as_array().expect("expected");
        assert_eq!(ours.len(), theirs.len());
        for (x, y) in ours.iter().zip(theirs) {
            let (x, y) = (x.as_f64().expect("x"), y.as_f64().expect("y"));
            assert!((x - y).abs() < 1e-4, "{x} {y}");
        }
    }
    let long = "dog ".repeat(60);
    let e = cli_common::failed(&studio(&[
        "embed",
        "--model",
        path(&model),
        "--text",
        &long,
    ]));
    assert!(e.contains("62 tokens") && e.contains("at most 48"), "{e}");
}

/// `studio generate --json-schema FILE` and `studio chat --grammar FILE`: the output keeps to
/// the schema or grammar whatever the random weights want; a schema Studio can't enforce is
/// refused with the keyword named.
#[test]
fn generate_and_chat_keep_to_a_json_schema_or_grammar() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("qwen2");
    studio_tests::families::write_family(&model, "qwen2", 4);
    let schema = tmp.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"ok": {"type": "boolean"},
            "n": {"type": "integer"}}, "required": ["ok", "n"]}"#,
    )
    .expect("write");
    for seed in ["1", "2"] {
        let out = cli_common::ok(&studio(&[
            "generate",
            "--model",
            path(&model),
            "--prompt",
            "JSON:",
            "--json-schema",
            path(&schema),
            "--temperature",
            "1",
            "--seed",
            seed,
            "--max-tokens",
            "200",
        ]));
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        assert!(v["ok"].is_boolean() && v["n"].is_i64(), "{v}");
    }
    let grammar = tmp.path().join("yes.gbnf");
    std::fs::write(&grammar, "root ::= \"yes\" | \"no\"\n").expect("write");
    let out = cli_common::ok(&studio(&[
        "chat",
        "--model",
        path(&model),
        "--message",
        "Well?",
        "--grammar",
        path(&grammar),
        "--temperature",
        "1",
    ]));
    assert!(["yes", "no"].contains(&out.trim()), "{out:?}");
    std::fs::write(&schema, r#"{"type": "string", "pattern": "a+"}"#).expect("write");
    let e = cli_common::failed(&studio(&[
        "generate",
        "--model",
        path(&model),
        "--prompt",
        "x",
        "--json-schema",
        path(&schema),
    ]));
    assert!(e.contains("`pattern`"), "{e}");
}

/// `studio embed` with a GGUF chat model on Studio's kernels: its hidden states, mean-pooled,
/// length 1; with a model that gives none (a Llama safetensors folder), an error that says
/// what can.
#[test]
fn embed_with_a_gguf_chat_model_pools_its_hidden_states() {
    let tmp = tempfile::tempdir().expect("tmp");
    studio_tests::families::write_family_with(
        tmp.path(),
        "llama",
        &serde_json::json!({"hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 4, "num_key_value_heads": 2}),
        3,
    );
    let gguf = tmp.path().join("model.gguf");
    studio_tests::gguf_writer::convert(
        tmp.path(),
        &gguf,
        &studio_tests::gguf_writer::GgufOptions::with_dtype(
            candle_core::quantized::GgmlDType::Q8_0,
        ),
    );
    let out = cli_common::ok(&studio(&[
        "embed",
        "--model",
        path(&gguf),
        "--text",
        "hello there",
    ]));
    let line: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let v: Vec<f64> = line["embedding"]
        .as_array()
        .expect("embedding")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect();
    assert_eq!(v.len(), 256);
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    let e = cli_common::failed(&studio(&[
        "embed",
        "--model",
        path(tmp.path()),
        "--text",
        "hi",
    ]));
    assert!(e.contains("--embedding-model") || e.contains("GGUF"), "{e}");
}
