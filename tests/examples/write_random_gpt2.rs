//! Writes a random-weight GPT-2 folder of a real shape, for benchmarks:
//!
//! ```text
//! cargo run --release -p studio-tests --example write_random_gpt2 -- gpt2 /tmp/gpt2-random
//! studio bench generate --model /tmp/gpt2-random
//! ```
//!
//! Shapes: `gpt2` (124M), `gpt2-medium` (355M), `distilgpt2` (82M), `tiny`.

use std::path::PathBuf;

use studio_tests::{Gpt2Naming, TinyGpt2, write_gpt2};

fn main() {
    let mut args = std::env::args().skip(1);
    let shape = args.next().unwrap_or_else(|| "gpt2".to_owned());
    let out = PathBuf::from(
        args.next()
            .unwrap_or_else(|| format!("/tmp/{shape}-random")),
    );
    let cfg = match shape.as_str() {
        "gpt2" => TinyGpt2 {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
        },
        "gpt2-medium" => TinyGpt2 {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 1024,
            n_layer: 24,
            n_head: 16,
        },
        "distilgpt2" => TinyGpt2 {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 6,
            n_head: 12,
        },
        "tiny" => TinyGpt2::default(),
        other => {
            eprintln!("unknown shape `{other}` (gpt2, gpt2-medium, distilgpt2, tiny)");
            std::process::exit(2);
        }
    };
    write_gpt2(&out, cfg, Gpt2Naming::Hub, 0);
    println!("{}", out.display());
}
