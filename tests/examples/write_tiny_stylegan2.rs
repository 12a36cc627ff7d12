//! Writes a small random-weight StyleGAN2 generator in NVIDIA's naming, to try the Latent
//! Explorer and the `gan` commands offline (its images are coloured noise, not faces):
//!
//! ```text
//! cargo run --release -p studio-tests --example write_tiny_stylegan2 -- 128 /tmp/g.safetensors
//! studio gan --model /tmp/g.safetensors --seed 7 --out seed7.png
//! ```
//!
//! A third argument `config-f` writes config F's widths instead (z and w 512, 8 mapping
//! layers, channels `min(512, 32768/res)`): the size people run, for timing the Explorer.

use std::path::PathBuf;

use studio_tests::gan::{TinyStyleGan2, write_stylegan2};

fn main() {
    let mut args = std::env::args().skip(1);
    let resolution: usize = args
        .next()
        .and_then(|r| r.parse().ok())
        .filter(|r: &usize| r.is_power_of_two() && (8..=1024).contains(r))
        .unwrap_or(128);
    let out = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "tiny-stylegan2.safetensors".into()),
    );
    let config_f = args.next().as_deref() == Some("config-f");
    let cfg = if config_f {
        TinyStyleGan2 {
            z_dim: 512,
            w_dim: 512,
            resolution,
            mapping_layers: 8,
            channel_base: 32768,
            channel_max: 512,
            ..TinyStyleGan2::default()
        }
    } else {
        TinyStyleGan2 {
            z_dim: 64,
            w_dim: 64,
            resolution,
            mapping_layers: 4,
            channel_base: 2048,
            channel_max: 64,
            ..TinyStyleGan2::default()
        }
    };
    write_stylegan2(&out, cfg, 1, true);
    println!(
        "wrote a {resolution}x{resolution} random StyleGAN2 to {}",
        out.display()
    );
}
