//! Writes the model `studio bench complete` is measured on (not a test; ignored by default):
//!
//! ```text
//! STUDIO_CODE_GGUF=/tmp/qwen2-0.5b-code.gguf \
//!   cargo test -p studio-tests --test code_bench_model -- --ignored
//! studio bench complete --model /tmp/qwen2-0.5b-code.gguf --prefix-tokens 2000
//! ```
//!
//! A Qwen2-0.5B-shaped random-weight GGUF (Q8_0 unless `STUDIO_CODE_GGUF_TYPE=f16|f32|q4_0`)
//! whose tokenizer has Qwen2.5-Coder's FIM tokens.

use candle_core::quantized::GgmlDType;
use studio_tests::code::{qwen2_0_5b_shape, write_code_gguf};

#[test]
#[ignore = "writes a 0.5B-parameter GGUF to $STUDIO_CODE_GGUF for the completion benchmark"]
fn write_qwen2_0_5b_code_gguf() {
    let out = std::env::var_os("STUDIO_CODE_GGUF").expect("set STUDIO_CODE_GGUF to the output");
    let dtype = match std::env::var("STUDIO_CODE_GGUF_TYPE").as_deref() {
        Ok("f32") => GgmlDType::F32,
        Ok("f16") => GgmlDType::F16,
        Ok("q4_0") => GgmlDType::Q4_0,
        _ => GgmlDType::Q8_0,
    };
    write_code_gguf(out.as_ref(), &qwen2_0_5b_shape(), dtype);
}
