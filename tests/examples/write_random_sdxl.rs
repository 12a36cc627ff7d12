//! Writes a random-weight SDXL base 1.0 at its real size (f16, about 7 GB) in the diffusers
//! folder layout, to measure memory and speed at 1024² offline; its images are noise:
//!
//! ```text
//! cargo run --release -p studio-tests --example write_random_sdxl -- /tmp/sdxl-random
//! studio txt2img --model /tmp/sdxl-random --prompt "a cat" --width 1024 --height 1024 \
//!     --steps 1 --out /tmp/sdxl.png
//! ```

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "sdxl-random".to_owned()),
    );
    studio_tests::sd::write_random_sdxl(&out, 7);
    println!("wrote a random-weight SDXL to {}", out.display());
}
