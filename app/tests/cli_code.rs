//! `studio complete`, `studio code` and `studio bench complete`, run as a person would: the
//! real binary on a tiny random-weight Qwen2 whose tokenizer has Qwen2.5-Coder's FIM tokens.

use std::path::{Path, PathBuf};

use studio_tests::code::write_code_model;
use studio_tests::gguf_writer::{GgufOptions, convert};

mod cli_common;
use cli_common::{failed, ok, path, studio};

const SOURCE: &str = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n";

fn setup(fim: bool) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    write_code_model(&model, 3, fim);
    let file = tmp.path().join("add.py");
    std::fs::write(&file, SOURCE).expect("write");
    (tmp, model, file)
}

fn complete(model: &Path, file: &Path, line: &str, column: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "complete",
        "--model",
        path(model),
        "--file",
        path(file),
        "--line",
        line,
        "--column",
        column,
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ];
    args.extend(extra);
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn run(args: &[String]) -> std::process::Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    studio(&refs)
}

#[test]
fn complete_prints_the_same_suggestion_as_text_and_json() {
    let (_tmp, model, file) = setup(true);
    let text = ok(&run(&complete(
        &model,
        &file,
        "2",
        "12",
        &["--mode", "block"],
    )));
    assert!(text.ends_with('\n'));
    let again = ok(&run(&complete(
        &model,
        &file,
        "2",
        "12",
        &["--mode", "block"],
    )));
    assert_eq!(text, again, "greedy is deterministic");

    let json = ok(&run(&complete(
        &model,
        &file,
        "2",
        "12",
        &["--mode", "block", "--json"],
    )));
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let (summary, tokens) = lines.split_last().expect("summary");
    assert_eq!(summary["done"], true);
    assert_eq!(summary["fim_format"], "qwen2.5-coder");
    assert_eq!(summary["mode"], "block");
    assert!(summary["prompt_tokens"].as_u64().expect("n") > 10);
    assert!(summary["ttft_ms"].as_f64().is_some());
    let joined: String = tokens
        .iter()
        .map(|t| {
            assert!(t["id"].as_u64().is_some());
            t["text"].as_str().expect("text").to_owned()
        })
        .collect();
    assert_eq!(joined, text.strip_suffix('\n').expect("newline"));
    assert!(tokens.len() <= 8);

    // A single-line suggestion never spans lines; the cursor may sit at a line's very end or
    // on the empty line after the last newline.
    let one = ok(&run(&complete(
        &model,
        &file,
        "1",
        "5",
        &["--mode", "line"],
    )));
    assert_eq!(
        one.trim_end_matches('\n').lines().count().max(1),
        1,
        "{one:?}"
    );
    ok(&run(&complete(&model, &file, "4", "17", &[])));
    ok(&run(&complete(&model, &file, "5", "1", &[])));
}

#[test]
fn complete_works_on_a_gguf_code_model() {
    let (tmp, model, file) = setup(true);
    let gguf = tmp.path().join("code.gguf");
    convert(&model, &gguf, &GgufOptions::default());
    let out = run(&complete(&gguf, &file, "2", "12", &["--json"]));
    let text = ok(&out);
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("line")).expect("json");
    assert_eq!(last["fim_format"], "qwen2.5-coder");
}

#[test]
fn complete_refuses_bad_input_clearly() {
    let (tmp, model, file) = setup(true);
    let err = failed(&run(&complete(&model, &file, "9", "1", &[])));
    assert!(err.contains("line 9 is past the end"), "{err}");
    let err = failed(&run(&complete(&model, &file, "2", "40", &[])));
    assert!(
        err.contains("column 40 is past the end of line 2") && err.contains("column 17"),
        "{err}"
    );
    let err = failed(&run(&complete(&model, &file, "0", "1", &[])));
    assert!(err.contains("1-based"), "{err}");

    let binary = tmp.path().join("blob.bin");
    std::fs::write(&binary, b"\x7fELF\x00\x01\x02binary").expect("write");
    let err = failed(&run(&complete(&model, &binary, "1", "1", &[])));
    assert!(err.contains("binary"), "{err}");
    let latin1 = tmp.path().join("latin1.py");
    std::fs::write(&latin1, b"s = 'caf\xe9'\n").expect("write");
    let err = failed(&run(&complete(&model, &latin1, "1", "1", &[])));
    assert!(
        err.contains("not valid UTF-8") && err.contains("offset 8"),
        "{err}"
    );

    let err = failed(&run(&complete(
        &model,
        &file,
        "2",
        "12",
        &["--fim-format", "codellama"],
    )));
    assert!(err.contains("codellama"), "{err}");

    let (_tmp2, plain, file2) = setup(false);
    let err = failed(&run(&complete(&plain, &file2, "2", "12", &[])));
    assert!(err.contains("fill-in-the-middle"), "{err}");
}

fn code(model: &Path, file: &Path, action: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "code",
        "--model",
        path(model),
        "--file",
        path(file),
        "--action",
        action,
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ];
    args.extend(extra);
    studio(&args)
}

#[test]
fn code_actions_stream_or_print_a_diff() {
    let (_tmp, model, file) = setup(true);
    let explained = ok(&code(&model, &file, "explain", &[]));
    assert!(!explained.trim().is_empty());
    ok(&code(&model, &file, "translate:rust", &["--lines", "1-2"]));
    ok(&code(&model, &file, "tests", &[]));

    // An edit prints a unified diff of the file (or nothing when the model changes nothing).
    let diff = ok(&code(&model, &file, "fix", &["--lines", "1-2"]));
    let name = path(&file);
    assert!(
        diff.is_empty() || diff.starts_with(&format!("--- a/{name}\n+++ b/{name}\n@@ ")),
        "{diff}"
    );
    // Lines outside the selection are never touched.
    for line in diff
        .lines()
        .filter(|l| l.starts_with('-') && !l.starts_with("---"))
    {
        assert!(
            ["-def add(a, b):", "-    return a + b"].contains(&line),
            "{line}"
        );
    }
    let json = ok(&code(
        &model,
        &file,
        "instruct",
        &["--instruction", "Rename add to plus", "--json"],
    ));
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    assert_eq!(v["done"], true);
    assert!(v["diff"].is_string() && v["reply"].is_string());

    let err = failed(&code(&model, &file, "instruct", &[]));
    assert!(err.contains("instruction"), "{err}");
    let err = failed(&code(&model, &file, "translate", &[]));
    assert!(err.contains("target language"), "{err}");
    let err = failed(&code(&model, &file, "poem", &[]));
    assert!(
        err.contains("unknown --action") && err.contains("translate:LANG"),
        "{err}"
    );
    let err = failed(&code(&model, &file, "fix", &["--lines", "3-9"]));
    assert!(err.contains("has 4 lines"), "{err}");
}

#[test]
fn bench_complete_reports_first_token_and_prefill() {
    let (_tmp, model, _file) = setup(true);
    let out = ok(&studio(&[
        "bench",
        "complete",
        "--model",
        path(&model),
        "--prefix-tokens",
        "120",
        "--gen-tokens",
        "2",
        "--repeat",
        "1",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["fim_format"], "qwen2.5-coder");
    let prompt = v["prompt_tokens"].as_u64().expect("prompt tokens");
    // The prefix (at most 120 tokens) plus the short suffix and the three markers.
    assert!((100..=150).contains(&prompt), "{prompt}");
    assert!(v["keystroke_to_first_token_ms"].as_f64().expect("ms") > 0.0);
    assert!(v["prefill_tok_s"].as_f64().expect("tok/s") > 0.0);
}
