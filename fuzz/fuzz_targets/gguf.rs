//! The GGUF reader: header, metadata, tensor infos and the tokenizer it describes.
#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = common::file("model.gguf", data);
    let _ = studio_inference::gguf::inspect(&path);
    let _ = studio_inference::gguf::load_tokenizer(&path);
});
