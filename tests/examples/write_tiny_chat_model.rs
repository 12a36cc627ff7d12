//! Writes a tiny random-weight model of a real family with a chat template, for trying the
//! window, `studio chat` or `studio serve` by hand (its replies are noise).
//!
//! `cargo run -p studio-tests --example write_tiny_chat_model -- DIR [FAMILY] [TEMPLATE]`:
//! FAMILY is a `model_type` (`qwen2` by default), TEMPLATE a `.jinja` file to use as its chat
//! template (such as `tests/fixtures/templates/qwen2.5-instruct.jinja`, whose tool section lets
//! the server's tool calling be tried).

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .expect("usage: write_tiny_chat_model DIR [FAMILY] [TEMPLATE]"),
    );
    let family = args.next().unwrap_or_else(|| "qwen2".to_owned());
    // A context long enough for a tools list and a few turns.
    studio_tests::families::write_family_with(
        &dir,
        &family,
        &serde_json::json!({"max_position_embeddings": 4096}),
        7,
    );
    if let Some(template) = args.next() {
        let source = std::fs::read_to_string(&template).expect("read the template");
        let config = serde_json::json!({"chat_template": source, "eos_token": "<|im_end|>"});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string())
            .expect("write tokenizer_config.json");
    }
    println!("wrote {}", dir.display());
}
