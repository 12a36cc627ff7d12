//! Writes a random-weight GPT-2 folder of a real shape, for benchmarks:
//!
//! ```text
//! cargo run --release -p studio-tests --example write_random_gpt2 -- gpt2 /tmp/gpt2-random
//! studio bench generate --model /tmp/gpt2-random
//! ```
//!
//! Shapes: `gpt2` (124M), `gpt2-medium` (355M), `distilgpt2` (82M), `tiny`. Add `-readable`
//! (e.g. `gpt2-readable`) for an LM head that only favours printable ASCII tokens, so the
//! random model's output is legible in screenshots.

use std::path::PathBuf;

use studio_tests::{Gpt2Naming, TinyGpt2, write_gpt2, write_gpt2_readable};

fn main() {
    let mut args = std::env::args().skip(1);
    let shape = args.next().unwrap_or_else(|| "gpt2".to_owned());
    let out = PathBuf::from(
        args.next()
            .unwrap_or_else(|| format!("/tmp/{shape}-random")),
    );
    let (base, readable) = match shape.strip_suffix("-readable") {
        Some(base) => (base, true),
        None => (shape.as_str(), false),
    };
    let cfg = match base {
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
    if readable {
        write_gpt2_readable(&out, cfg, 0);
    } else {
        write_gpt2(&out, cfg, Gpt2Naming::Hub, 0);
    }
    println!("{}", out.display());
}
