//! The hires fix's "Latent" upscalers against PyTorch's `interpolate` (fixture from
//! `tools/make_latent_upscale_fixture.py`), in every mode the SD web UI offers.

use std::path::Path;

use candle_core::Device;
use studio_inference::diffusion::hires::LatentUpscale;

#[test]
fn latent_upscale_modes_match_pytorch_interpolate() {
    let io = candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/latent_upscale/io.safetensors"),
        &Device::Cpu,
    )
    .expect("fixture");
    let input = &io["input"];
    for (mode, key) in [
        (LatentUpscale::Bilinear, "bilinear"),
        (LatentUpscale::BilinearAntialiased, "bilinear_aa"),
        (LatentUpscale::Bicubic, "bicubic"),
        (LatentUpscale::BicubicAntialiased, "bicubic_aa"),
        (LatentUpscale::Nearest, "nearest"),
        (LatentUpscale::NearestExact, "nearest_exact"),
    ] {
        for (h, w) in [(10, 14), (11, 17)] {
            let want = &io[&format!("{key}_{h}x{w}")];
            let got = mode.resize(input, (h, w)).expect("resize");
            let d = (got - want)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert!(d < 1e-5, "{} at {h}x{w}: max diff {d}", mode.name());
        }
        assert_eq!(LatentUpscale::parse(mode.name()), Some(mode));
    }
}
