//! Shared by the fuzz targets: a scratch folder (in /dev/shm when there is one) for the parsers
//! that read files, and tiny real models' files written once per process.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("studio-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    })
}

/// Writes `data` as `name` in the scratch folder.
pub fn file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, data).expect("write a scratch file");
    path
}

/// A folder holding a tiny random-weight model of `model_type` (config, tokenizer, weights).
pub fn model_dir(model_type: &str) -> PathBuf {
    let dir = scratch().join(format!("model-{model_type}"));
    if !dir.join("config.json").exists() {
        studio_tests::families::write_model(&dir, model_type, 1);
    }
    dir
}

/// libFuzzer's panic hook aborts on every panic, even one Studio catches on purpose (candle's
/// Llama loader unwraps a mis-shaped tensor, and the loader turns that panic into an error).
/// This puts the default hook back: a panic that escapes still aborts (libfuzzer-sys does so
/// when the target unwinds), one caught inside is only printed.
pub fn count_only_uncaught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
}
