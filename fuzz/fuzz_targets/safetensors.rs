//! A safetensors file's header and tensor lookups through Studio's weights reader (the config
//! checks against tensors are the `config` target's).
#![no_main]
#[path = "common.rs"]
mod common;

use candle_core::{DType, Device};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let weights = common::file("model.safetensors", data);
    if let Ok(w) =
        studio_inference::weights::Weights::open(&[weights.clone()], &Device::Cpu, DType::F32)
    {
        let _ = w.parameter_count();
        let names: Vec<String> = w.names().map(str::to_owned).collect();
        for name in names.iter().take(4) {
            let _ = w.get(name, &[2, 2]);
        }
    }
});
