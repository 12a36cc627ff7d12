//! A loopback Hugging Face Hub with a tiny GPT-2 repository, for looking at *Get models* by
//! hand (screenshots): `cargo run -p studio-tests --example fake_hub -- DIR` writes the model
//! to `DIR/src` and a starter list naming it to `DIR/presets/models/`, prints the Hub's URL,
//! and serves until killed. Then run Studio with `HF_ENDPOINT=URL`,
//! `STUDIO_PRESETS=DIR/presets` and an empty `HF_HUB_CACHE`.

use std::path::PathBuf;

use studio_tests::hub_server::{FakeFile, FakeHub, FakeRepo};
use studio_tests::{TinyGpt2, write_gpt2_readable};

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: fake_hub DIR"));
    let src = dir.join("src");
    write_gpt2_readable(&src, TinyGpt2::default(), 7);
    let read = |n: &str| std::fs::read(src.join(n)).expect("read");
    let text = |n: &str| String::from_utf8(read(n)).expect("utf-8");
    let repo = FakeRepo::new(
        "studio-demo/tiny-gpt2",
        vec![
            FakeFile::lfs("model.safetensors", read("model.safetensors")),
            FakeFile::small("config.json", &text("config.json")),
            FakeFile::small("tokenizer.json", &text("tokenizer.json")),
        ],
    );
    // A large file (not a model) to watch a download's progress on the throttled CDN.
    let big = FakeRepo::new(
        "studio-demo/big-download-GGUF",
        vec![FakeFile::lfs(
            "big-Q4_K_M.gguf",
            (0..200_000_000u32).map(|i| (i % 251) as u8).collect(),
        )],
    );
    let hub = FakeHub::start(vec![repo, big]);
    hub.set_rate(8_000_000);
    hub.set_catalog(vec![
        "studio-demo/tiny-gpt2".into(),
        "studio-demo/big-download-GGUF".into(),
    ]);
    let models = dir.join("presets/models");
    std::fs::create_dir_all(&models).expect("dir");
    let starter = serde_json::json!({"models": [{
        "name": "Tiny GPT-2 (demo)",
        "repo": "studio-demo/tiny-gpt2",
        "panel": "Chat",
        "size_mb": 1,
        "license": "mit",
        "description": "A random-weight GPT-2 served by the loopback Hub."
    }, {
        "name": "A large download (demo)",
        "repo": "studio-demo/big-download-GGUF",
        "panel": "Chat",
        "size_mb": 200,
        "license": "mit",
        "description": "Not a model: 200 MB to watch the progress of."
    }]});
    std::fs::write(models.join("starter.json"), starter.to_string()).expect("write");
    println!("{}", hub.url);
    loop {
        std::thread::sleep(std::time::Duration::from_hours(1));
    }
}
