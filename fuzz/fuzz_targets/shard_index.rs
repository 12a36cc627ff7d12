//! `model.safetensors.index.json`: names outside the folder, non-safetensors names, bad JSON.
#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("sharded");
    if !dir.join("config.json").exists() {
        let model = common::model_dir("llama");
        std::fs::create_dir_all(&dir).expect("folder");
        for name in ["config.json", "tokenizer.json"] {
            std::fs::copy(model.join(name), dir.join(name)).expect("copy");
        }
    }
    std::fs::write(dir.join("model.safetensors.index.json"), data).expect("write");
    let _ = studio_inference::llm::loader::resolve(&dir);
});
