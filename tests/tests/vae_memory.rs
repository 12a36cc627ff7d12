//! The VAE's bounded-memory pieces give the same numbers as computing in one piece: the banded
//! 3×3 convolution against candle's convolution, and a tiny VAE with a budget so small that
//! every convolution runs one row at a time and attention one query at a time.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use studio_inference::diffusion::vae::{Vae, VaeConfig};
use studio_inference::diffusion::vae_blocks::{MemoryBudget, Padding, conv3x3_banded};
use studio_tests::max_abs_diff;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("randn")
}

/// Budgets giving bands of 1, 2, 5 rows and one band (the plain path), for `row_bytes` per
/// output row.
fn budgets(row_bytes: usize) -> [usize; 5] {
    [1, row_bytes, 2 * row_bytes, 5 * row_bytes + 7, usize::MAX]
}

#[test]
fn banded_conv_equals_plain_conv_stride_1() {
    for &(b, c_in, c_out, h, w) in &[(1, 8, 5, 17, 13), (2, 3, 4, 9, 20), (1, 4, 4, 3, 3)] {
        let xs = randn(&[b, c_in, h, w]);
        let weight = randn(&[c_out, c_in, 3, 3]);
        let plain = xs.conv2d(&weight, 1, 1, 1, 1).expect("conv");
        for budget in budgets(b * w * c_in * 9 * 4) {
            let banded =
                conv3x3_banded(&xs, &weight, 1, Padding::same(1), budget).expect("banded conv");
            let d = max_abs_diff(&plain, &banded);
            assert!(d <= 1e-5, "{h}x{w}, budget {budget}: max diff {d}");
        }
    }
}

#[test]
fn banded_conv_equals_plain_conv_stride_2_downsample() {
    // diffusers' encoder downsampler: zero row below, zero column right, stride 2, padding 0.
    for &(b, c, h, w) in &[(1, 6, 16, 16), (1, 5, 17, 11), (2, 3, 10, 7), (1, 2, 2, 2)] {
        let xs = randn(&[b, c, h, w]);
        let weight = randn(&[c, c, 3, 3]);
        let plain = xs
            .pad_with_zeros(2, 0, 1)
            .and_then(|x| x.pad_with_zeros(3, 0, 1))
            .and_then(|x| x.conv2d(&weight, 0, 2, 1, 1))
            .expect("conv");
        let w_out = w.div_ceil(2);
        for budget in budgets(b * w_out * c * 9 * 4) {
            let banded = conv3x3_banded(&xs, &weight, 2, Padding::bottom_right(), budget)
                .expect("banded conv");
            let d = max_abs_diff(&plain, &banded);
            assert!(d <= 1e-5, "{h}x{w}, budget {budget}: max diff {d}");
        }
    }
}

#[test]
fn banded_conv_with_symmetric_padding_and_stride_2() {
    let xs = randn(&[1, 4, 15, 12]);
    let weight = randn(&[3, 4, 3, 3]);
    let plain = xs.conv2d(&weight, 1, 2, 1, 1).expect("conv");
    for budget in budgets(6 * 4 * 9 * 4) {
        let banded = conv3x3_banded(&xs, &weight, 2, Padding::same(1), budget).expect("banded");
        assert!(max_abs_diff(&plain, &banded) <= 1e-5, "budget {budget}");
    }
}

fn tiny_config() -> VaeConfig {
    VaeConfig {
        block_out_channels: vec![8, 16, 16, 16],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 4,
        scaling_factor: 0.18215,
        use_quant_conv: true,
        use_post_quant_conv: true,
    }
}

fn tiny_budget() -> MemoryBudget {
    MemoryBudget {
        conv_bytes: 1,
        attention_bytes: 1,
    }
}

#[test]
fn tiny_vae_is_the_same_with_any_budget() {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let unlimited = Vae::new(&vb, tiny_config())
        .expect("vae")
        .with_memory_budget(MemoryBudget::unlimited());
    let tiny = Vae::new(&vb, tiny_config())
        .expect("vae")
        .with_memory_budget(tiny_budget());
    let default = Vae::new(&vb, tiny_config()).expect("vae");
    assert_eq!(default.memory_budget(), MemoryBudget::default());

    let image = randn(&[1, 3, 48, 40]);
    let a = unlimited.encode(&image).expect("encode");
    let b = tiny.encode(&image).expect("encode");
    assert_eq!(a.dims(), &[1, 4, 6, 5]);
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-5, "encode: max diff {d}");

    let latents = randn(&[2, 4, 7, 5]);
    let a = unlimited.decode(&latents).expect("decode");
    let b = tiny.decode(&latents).expect("decode");
    let c = default.decode(&latents).expect("decode");
    assert_eq!(a.dims(), &[2, 3, 56, 40]);
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-5, "decode: max diff {d}");
    assert!(max_abs_diff(&a, &c) <= 1e-5);
}

#[test]
fn attention_reads_conv_shaped_and_legacy_projections() {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let reference = Vae::new(&vb, tiny_config()).expect("vae");
    let tensors: HashMap<String, Tensor> = map
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    // A fresh VarMap gets the legacy names (`query`, …, `proj_attn`), as candle's block did.
    assert!(tensors.contains_key("decoder.mid_block.attentions.0.query.weight"));
    let modern_conv_shaped: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| {
            let renamed = n
                .replace(".query.", ".to_q.")
                .replace(".key.", ".to_k.")
                .replace(".value.", ".to_v.")
                .replace(".proj_attn.", ".to_out.0.");
            let t = if renamed != *n && n.ends_with(".weight") {
                t.unsqueeze(2)
                    .and_then(|t| t.unsqueeze(3))
                    .expect("1x1 shape")
            } else {
                t.clone()
            };
            (renamed, t)
        })
        .collect();
    let loaded = Vae::new(
        &VarBuilder::from_tensors(modern_conv_shaped, DType::F32, &Device::Cpu),
        tiny_config(),
    )
    .expect("vae from to_q/[c,c,1,1] weights");
    let latents = randn(&[1, 4, 4, 6]);
    let d = max_abs_diff(
        &reference.decode(&latents).expect("decode"),
        &loaded.decode(&latents).expect("decode"),
    );
    assert!(d == 0.0, "max diff {d}");
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The SD-1.5-shaped VAE decoding one latent of `STUDIO_VAE_SIZE` pixels (default 512), timed,
/// with the process's peak RSS (`STUDIO_VAE_UNLIMITED` set: no budget); run alone:
/// `cargo test --release -p studio-tests --test vae_memory -- --ignored --nocapture sd_vae_decode_peak`.
#[test]
#[ignore = "measurement: seconds to minutes of CPU"]
fn sd_vae_decode_peak() {
    let size: usize = std::env::var("STUDIO_VAE_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let unlimited = std::env::var_os("STUDIO_VAE_UNLIMITED").is_some();
    let mut vae = Vae::new(&vb, VaeConfig::sd(0.18215)).expect("vae");
    if unlimited {
        vae = vae.with_memory_budget(MemoryBudget::unlimited());
    }
    let built = peak_rss_mib();
    let latents = randn(&[1, 4, size / 8, size / 8]);
    let t = std::time::Instant::now();
    let image = vae.decode(&latents).expect("decode");
    assert_eq!(image.dims(), &[1, 3, size, size]);
    println!(
        "{size}x{size} VAE decode: {:.1} s, peak RSS {built:.0} MiB after building, {:.0} MiB after decoding",
        t.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
}
