//! Code actions: presets (built in and from a folder), prompt building with language, path
//! and context within a budget, and code extraction from replies.

use std::fmt::Write as _;

use studio_inference::code::actions::{
    ActionInput, ActionKind, ContextFile, build_action_prompt, builtin_presets, estimate_tokens,
    extract_code, load_presets, parse_preset, presets_with, rewrite_from_reply,
};
use studio_inference::code::language::language_for_path;

fn preset(id: &str) -> studio_inference::code::actions::ActionPreset {
    builtin_presets()
        .into_iter()
        .find(|p| p.id == id)
        .expect("preset")
}

#[test]
fn builtin_presets_are_the_shipped_files() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets/code-actions");
    let (files, errors) = load_presets(&dir);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(files, builtin_presets());
    let kinds: Vec<(String, ActionKind)> = files.iter().map(|p| (p.id.clone(), p.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("explain".to_owned(), ActionKind::Explain),
            ("fix".to_owned(), ActionKind::Edit),
            ("doc".to_owned(), ActionKind::Edit),
            ("tests".to_owned(), ActionKind::Code),
            ("translate".to_owned(), ActionKind::Code),
            ("instruct".to_owned(), ActionKind::Edit),
        ]
    );
}

#[test]
fn user_presets_replace_and_extend_and_bad_files_are_reported() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(
        tmp.path().join("fix.json"),
        r#"{"id": "fix", "label": "Fix it", "kind": "edit", "system": "S", "template": "Fix {code}"}"#,
    )
    .expect("write");
    std::fs::write(
        tmp.path().join("review.json"),
        r#"{"id": "review", "label": "Review", "kind": "explain", "system": "S", "template": "Review {code}"}"#,
    )
    .expect("write");
    std::fs::write(tmp.path().join("broken.json"), "{ not json").expect("write");
    std::fs::write(
        tmp.path().join("nocode.json"),
        r#"{"id": "x", "label": "X", "kind": "explain", "system": "", "template": "no placeholder"}"#,
    )
    .expect("write");
    let (presets, errors) = presets_with(Some(tmp.path()));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("broken.json")));
    assert!(errors.iter().any(|e| e.contains("{code}")));
    let fix = presets.iter().find(|p| p.id == "fix").expect("fix");
    assert_eq!(fix.label, "Fix it");
    assert!(presets.iter().any(|p| p.id == "review"));
    assert_eq!(presets.len(), 7);
    assert!(
        parse_preset(
            r#"{"id": "", "label": "", "kind": "edit", "system": "", "template": "{code}"}"#
        )
        .is_err()
    );
}

#[test]
fn prompts_name_the_language_and_path_and_fill_placeholders() {
    let input = ActionInput {
        path: "src/lib.rs".to_owned(),
        code: "fn add(a: i32, b: i32) -> i32 { a - b }\n".to_owned(),
        ..ActionInput::default()
    };
    let p = build_action_prompt(&preset("fix"), &input, 4096, &estimate_tokens).expect("prompt");
    assert_eq!(p.kind, ActionKind::Edit);
    assert!(p.user.contains("Rust code from `src/lib.rs`"), "{}", p.user);
    assert!(
        p.user
            .contains("```rs\nfn add(a: i32, b: i32) -> i32 { a - b }\n```"),
        "{}",
        p.user
    );
    assert!(!p.user.contains('{') || !p.user.contains("{context}"));
    assert!(p.cut.is_empty());
    assert_eq!(p.messages().len(), 1);

    // Translation needs a target; the instruction action an instruction.
    assert!(build_action_prompt(&preset("translate"), &input, 4096, &estimate_tokens).is_err());
    let mut t = input.clone();
    t.target_language = "Python".to_owned();
    let p = build_action_prompt(&preset("translate"), &t, 4096, &estimate_tokens).expect("ok");
    assert!(p.user.contains("to Python"), "{}", p.user);
    assert!(build_action_prompt(&preset("instruct"), &input, 4096, &estimate_tokens).is_err());
    let mut i = input.clone();
    i.instruction = "Rename add to sum {code}".to_owned();
    let p = build_action_prompt(&preset("instruct"), &i, 4096, &estimate_tokens).expect("ok");
    // Substituted text is not expanded again.
    assert!(p.user.starts_with("Rename add to sum {code}"), "{}", p.user);

    // Code containing ``` gets a longer fence.
    let mut f = input.clone();
    f.code = "/// ```\n/// x\n/// ```\nfn x() {}\n".to_owned();
    let p = build_action_prompt(&preset("explain"), &f, 4096, &estimate_tokens).expect("ok");
    assert!(p.user.contains("````rs\n"), "{}", p.user);

    // An unknown extension still works.
    let mut u = input;
    u.path = "notes".to_owned();
    let p = build_action_prompt(&preset("explain"), &u, 4096, &estimate_tokens).expect("ok");
    assert!(p.user.contains("source code from `notes`"), "{}", p.user);
    assert_eq!(
        language_for_path("a.py".as_ref()).map(|l| l.token),
        Some("py")
    );
}

#[test]
fn context_files_are_cut_to_the_budget_and_the_cut_is_reported() {
    let big: String = (0..400).fold(String::new(), |mut s, i| {
        let _ = writeln!(s, "def f{i}(): return {i}");
        s
    });
    let input = ActionInput {
        path: "main.py".to_owned(),
        code: "print(f1())\n".to_owned(),
        context: vec![
            ContextFile {
                path: "util.py".to_owned(),
                text: "def f1(): return 1\n".to_owned(),
            },
            ContextFile {
                path: "big.py".to_owned(),
                text: big,
            },
            ContextFile {
                path: "huge.py".to_owned(),
                text: "x = 1\n".repeat(5000),
            },
        ],
        ..ActionInput::default()
    };
    let all = build_action_prompt(&preset("explain"), &input, 1_000_000, &estimate_tokens)
        .expect("prompt");
    assert!(all.cut.is_empty());
    assert!(
        all.user
            .contains("File `util.py`:\n```py\ndef f1(): return 1\n```")
    );
    let budget = 2000;
    let p = build_action_prompt(&preset("explain"), &input, budget, &estimate_tokens).expect("ok");
    assert!(estimate_tokens(&p.system) + estimate_tokens(&p.user) <= budget);
    assert!(p.user.contains("util.py"));
    assert!(!p.user.contains("huge.py"));
    assert_eq!(p.cut.len(), 2, "{:?}", p.cut);
    assert!(p.cut[0].contains("huge.py") && p.cut[0].contains("left out"));
    assert!(
        p.cut[1].contains("big.py") && p.cut[1].contains("first"),
        "{:?}",
        p.cut
    );
    // The code itself never fits in a tiny budget: an error, not a silent cut.
    assert!(build_action_prompt(&preset("explain"), &input, 10, &estimate_tokens).is_err());
}

#[test]
fn code_is_extracted_from_replies() {
    let reply = "Here is the fix:\n\n```rust\nfn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n```\n\nI changed - to +.\n```\nsecond\n```\n";
    assert_eq!(
        extract_code(reply),
        "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n"
    );
    // No fence: the whole reply.
    assert_eq!(extract_code("\nx = 1\ny = 2\n\n"), "x = 1\ny = 2\n");
    // Unterminated (still streaming): up to the end.
    assert_eq!(extract_code("```py\nx = 1\ny"), "x = 1\ny");
    // Tildes and longer fences.
    assert_eq!(extract_code("~~~\na\n~~~\n"), "a\n");
    assert_eq!(
        extract_code("````md\n```\ninner\n```\n````\n"),
        "```\ninner\n```\n"
    );
    // The original's trailing-newline convention is kept.
    assert_eq!(rewrite_from_reply("a\n", "```\nb\n```"), "b\n");
    assert_eq!(rewrite_from_reply("a", "```\nb\n```"), "b");
    assert_eq!(rewrite_from_reply("a\n", "b"), "b\n");
}
