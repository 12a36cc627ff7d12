//! Writes a tiny random-weight Stable Diffusion model (the real architectures, small sizes) to
//! try the Canvas and the image commands offline; its images are noise, not pictures:
//!
//! ```text
//! cargo run --release -p studio-tests --example write_tiny_sd -- sd1 /tmp/tiny-sd
//! studio txt2img --model /tmp/tiny-sd --prompt "a cat" --width 256 --height 256 --out cat.png
//! ```
//!
//! Kinds: `sd1`, `sd2`, `sdxl`, each optionally with `-inpainting` (a 9-channel UNet).

use std::path::PathBuf;

use studio_tests::sd::{TinyKind, TinySd, write_tiny_sd};

fn main() {
    let mut args = std::env::args().skip(1);
    let kind_arg = args.next().unwrap_or_else(|| "sd1".to_owned());
    let (base, inpainting) = match kind_arg.strip_suffix("-inpainting") {
        Some(b) => (b, true),
        None => (kind_arg.as_str(), false),
    };
    let kind = match base {
        "sd1" => TinyKind::Sd1,
        "sd2" => TinyKind::Sd2,
        "sdxl" => TinyKind::Sdxl,
        other => {
            eprintln!("unknown kind `{other}` (sd1, sd2, sdxl, optionally with -inpainting)");
            std::process::exit(2);
        }
    };
    let out = PathBuf::from(args.next().unwrap_or_else(|| "tiny-sd".to_owned()));
    write_tiny_sd(
        &out,
        TinySd {
            inpainting,
            ..TinySd::new(kind)
        },
    );
    println!("wrote a tiny {kind_arg} model to {}", out.display());
}
