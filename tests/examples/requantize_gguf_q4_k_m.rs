//! Rewrites an F16/F32 GGUF with llama-quantize's `Q4_K_M` choice of types, for benchmarks on
//! the kind of file people download when llama.cpp's own tool is not at hand:
//!
//! ```text
//! cargo run --release -p studio-tests --example requantize_gguf_q4_k_m -- IN.gguf OUT.gguf
//! ```
//!
//! As llama.cpp's `Q4_K_M`: `Q6_K` for `output.weight` (or the tied embeddings) and for `attn_v` / `ffn_down` in the
//! first and last eighth of the layers and every third layer between, `Q4_K` for the other
//! 2-D weights; where a row is not a whole number of 256-value super-blocks (Qwen2-0.5B's
//! width of 896), the fallback llama.cpp uses (`Q5_0` for `Q4_K`, `Q8_0` for `Q6_K`).
//! 1-D tensors stay F32. Metadata is copied, with `general.file_type` set to 15 (Q4_K_M).

use std::path::PathBuf;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

fn main() {
    let mut args = std::env::args().skip(1);
    let input = PathBuf::from(args.next().expect("usage: requantize_gguf_q4_k_m IN OUT"));
    let output = PathBuf::from(args.next().expect("usage: requantize_gguf_q4_k_m IN OUT"));
    let mut file = std::fs::File::open(&input).expect("open");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let layers = content
        .metadata
        .iter()
        .find(|(k, _)| k.ends_with(".block_count"))
        .and_then(|(_, v)| v.to_u32().ok())
        .unwrap_or(1) as usize;
    let more_bits = |layer: usize| {
        layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
    };
    // With tied embeddings the embedding table is also the output projection, and gets its type.
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let t = content
            .tensor(&mut file, name, &Device::Cpu)
            .expect("tensor");
        let dims = t.shape().dims().to_vec();
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        let high = name == "output.weight"
            || (name == "token_embd.weight" && tied)
            || ((name.contains("attn_v") || name.contains("ffn_down"))
                && layer.is_some_and(more_bits));
        let dtype = if dims.len() < 2 {
            GgmlDType::F32
        } else {
            let cols = dims[dims.len() - 1];
            match (high, cols.is_multiple_of(256)) {
                (true, true) => GgmlDType::Q6K,
                (true, false) => GgmlDType::Q8_0,
                (false, true) => GgmlDType::Q4K,
                (false, false) => GgmlDType::Q5_0,
            }
        };
        let f = t.dequantize(&Device::Cpu).expect("dequantize");
        let q = QTensor::quantize(&f, dtype).expect("quantize");
        eprintln!("{name} {dims:?} -> {dtype:?}");
        tensors.push((name.clone(), q));
    }
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push(("general.file_type".into(), gguf_file::Value::U32(15)));
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&output).expect("create"));
    gguf_file::write(&mut out, &md, &ts).expect("write");
    println!("wrote {}", output.display());
}
