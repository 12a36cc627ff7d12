//! `studio convert IN OUT.safetensors`: a PyTorch checkpoint (`.ckpt`, `.pt`, `.pth`,
//! `pytorch_model.bin`) or an NVIDIA network pickle (`.pkl`, whose settings go to `OUT.json`)
//! read by Studio's own pickle reader, as data (nothing in it is run), and written as
//! safetensors. Prints one line with what was written.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use studio_inference::pickle::convert;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The PyTorch checkpoint to read.
    pub input: PathBuf,
    /// The safetensors file to write (replaced atomically if it exists).
    pub output: PathBuf,
}

pub fn run_convert(args: &ConvertArgs) -> Result<()> {
    if args
        .output
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("safetensors"))
    {
        bail!(
            "{}: the output must be a .safetensors file",
            args.output.display()
        );
    }
    let done = convert(&args.input, &args.output).with_context(|| {
        format!(
            "converting {} to {}",
            args.input.display(),
            args.output.display()
        )
    })?;
    println!(
        "converted {} tensors ({:.1} MB) from {} to {}{} (read as data: nothing in the pickle \
         ran)",
        done.tensors,
        done.bytes as f64 / 1e6,
        args.input.display(),
        args.output.display(),
        if done.settings {
            format!(
                ", with the network's settings in {}",
                args.output.with_extension("json").display()
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
