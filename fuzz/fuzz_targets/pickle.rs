//! Studio's pickle reader: raw bytes as a `data.pkl` (the opcode interpreter, the state dict
//! allowlist and NVIDIA's network walk), as PyTorch's legacy format, and the same bytes as a
//! whole checkpoint file (the zip archive reader, the legacy and inline-storage readers).
#![no_main]
#[path = "common.rs"]
mod common;

use studio_inference::pickle::{network, read_checkpoint, torch, vm};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(p) = vm::parse(data) {
        let _ = torch::state_dict(&p);
        let _ = network::read(&p, "fuzz");
    }
    let _ = torch::legacy(data);
    let path = common::scratch().join("fuzz.pth");
    if std::fs::write(&path, data).is_ok() {
        let _ = read_checkpoint(&path);
    }
});
