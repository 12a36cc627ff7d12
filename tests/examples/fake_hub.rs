//! A loopback Hugging Face Hub with a tiny GPT-2 repository, for looking at *Get models* by
//! hand (screenshots): `cargo run -p studio-tests --example fake_hub -- DIR` writes the model
//! to `DIR/src` and a starter list naming it to `DIR/presets/models/`, prints the Hub's URL,
//! and serves until killed. Then run Studio with `HF_ENDPOINT=URL`,
//! `STUDIO_PRESETS=DIR/presets` and an empty `HF_HUB_CACHE`.
//!
//! The bundled demo models (`assets/models/`) are served too, as `studio-demo/<folder>`
//! repositories in the starter list, so every panel's *Load in …* can be tried on a download.

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
    // An NVIDIA network pickle (the tiny random StyleGAN2 fixture) under the Latent Explorer
    // starter's name, to try a pinned pickle download and its safe-mode load.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let pickle = FakeRepo::new(
        "studio-demo/stylegan2-pickle",
        vec![FakeFile::lfs(
            "stylegan2-tiny-32x32.pkl",
            std::fs::read(fixtures.join("stylegan2/skip.pkl")).expect("read the fixture"),
        )],
    );
    let pickle_commit = pickle.commit.clone();
    let demos = bundled_repos();
    let mut catalog = vec![
        "studio-demo/tiny-gpt2".to_owned(),
        "studio-demo/big-download-GGUF".to_owned(),
        "studio-demo/stylegan2-pickle".to_owned(),
    ];
    catalog.extend(demos.iter().map(|(r, _)| r.id.clone()));
    let mut starters = vec![
        serde_json::json!({
            "name": "Tiny GPT-2 (demo)",
            "repo": "studio-demo/tiny-gpt2",
            "panel": "Chat",
            "size_mb": 1,
            "license": "mit",
            "description": "A random-weight GPT-2 served by the loopback Hub."
        }),
        serde_json::json!({
            "name": "A large download (demo)",
            "repo": "studio-demo/big-download-GGUF",
            "panel": "Chat",
            "size_mb": 200,
            "license": "mit",
            "description": "Not a model: 200 MB to watch the progress of."
        }),
        serde_json::json!({
            "name": "StyleGAN2 pickle (demo, pinned)",
            "repo": "studio-demo/stylegan2-pickle",
            "file": "stylegan2-tiny-32x32.pkl",
            "revision": pickle_commit,
            "panel": "Explorer",
            "size_mb": 1,
            "license": "mit",
            "description": "A random-weight network pickle, read as data in safe mode."
        }),
    ];
    for (r, panel) in &demos {
        let bytes: usize = r.files.iter().map(|f| f.bytes.len()).sum();
        starters.push(serde_json::json!({
            "name": format!("{} (bundled, served by the loopback Hub)", r.id),
            "repo": r.id,
            "panel": panel,
            "size_mb": bytes.div_ceil(1_000_000),
            "license": "see MODEL.md",
            "description": "One of Studio's demo models, to try a download for this panel."
        }));
    }
    let mut repos = vec![repo, big, pickle];
    repos.extend(demos.into_iter().map(|(r, _)| r));
    let hub = FakeHub::start(repos);
    hub.set_rate(8_000_000);
    hub.set_catalog(catalog);
    let models = dir.join("presets/models");
    std::fs::create_dir_all(&models).expect("dir");
    let starter = serde_json::json!({ "models": starters });
    std::fs::write(models.join("starter.json"), starter.to_string()).expect("write");
    println!("{}", hub.url);
    loop {
        std::thread::sleep(std::time::Duration::from_hours(1));
    }
}

/// The bundled demo models, each folder of `assets/models/` a repository with the panel it
/// serves (weights and images as LFS files).
fn bundled_repos() -> Vec<(FakeRepo, &'static str)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models");
    let mut repos = Vec::new();
    for (folder, panel) in [
        ("studio-demo-lm", "Code"),
        ("studio-demo-sd", "Canvas"),
        ("gan", "Explorer"),
    ] {
        let dir = root.join(folder);
        let mut files = Vec::new();
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let name = p
                    .strip_prefix(&dir)
                    .expect("inside")
                    .to_string_lossy()
                    .replace('\\', "/");
                let bytes = std::fs::read(&p).expect("read");
                files.push(match String::from_utf8(bytes) {
                    Ok(text) if !name.ends_with(".safetensors") => FakeFile::small(&name, &text),
                    Ok(text) => FakeFile::lfs(&name, text.into_bytes()),
                    Err(e) => FakeFile::lfs(&name, e.into_bytes()),
                });
            }
        }
        if !files.is_empty() {
            repos.push((
                FakeRepo::new(&format!("studio-demo/{folder}"), files),
                panel,
            ));
        }
    }
    repos
}
