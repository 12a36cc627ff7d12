//! The GGUF reader: header, metadata and tensor infos, then (as loading does, for a file that
//! passed those checks) the tokenizer its metadata describes.
#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = common::file("model.gguf", data);
    if studio_inference::llm::gguf::inspect(&path).is_ok() {
        let _ = studio_inference::llm::gguf::load_tokenizer(&path);
    }
});
