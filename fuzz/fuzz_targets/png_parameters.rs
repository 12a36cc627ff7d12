//! The `parameters` text chunk of PNGs from the SD web UIs, and its text format alone.
#![no_main]

use studio_inference::image_meta::{GenerationParameters, png_parameters};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some(p)) = png_parameters(data) {
        let _ = p.to_text();
    }
    let p = GenerationParameters::parse(&String::from_utf8_lossy(data));
    let _ = (p.steps(), p.seed(), p.cfg_scale(), p.size(), p.to_text());
});
