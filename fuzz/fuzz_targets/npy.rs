//! NumPy `.npy` latents (the Latent Explorer's z / w files).
#![no_main]

use candle_core::Device;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(array) = studio_inference::gan::npy::parse(data) {
        let _ = array.to_tensor(&Device::Cpu);
    }
});
