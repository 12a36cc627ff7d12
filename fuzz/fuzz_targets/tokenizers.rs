//! The CLIP BPE tokenizer (both paddings, with prompt chunking and emphasis) and a byte-level
//! BPE `tokenizer.json` tokenizer, on arbitrary bytes.
#![no_main]

use std::sync::OnceLock;

use studio_inference::diffusion::prompt::{ClipTokenizer, Padding, parse_emphasis};
use studio_inference::llm::text::Tokenizer;

fn tokenizers() -> &'static (ClipTokenizer, ClipTokenizer, Tokenizer) {
    static T: OnceLock<(ClipTokenizer, ClipTokenizer, Tokenizer)> = OnceLock::new();
    T.get_or_init(|| {
        (
            ClipTokenizer::bundled(Padding::Eos),
            ClipTokenizer::bundled(Padding::Exclamation),
            Tokenizer::from_inner(studio_tests::train_tokenizer(300)),
        )
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (clip, open_clip, bpe) = tokenizers();
    let _ = clip.encode(&text);
    let _ = open_clip.chunks(&text, 1);
    let _ = parse_emphasis(&text);
    if let Ok(ids) = bpe.encode(&text) {
        let _ = bpe.decode(&ids);
    }
    let ids: Vec<u32> = data
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .collect();
    let _ = bpe.decode(&ids);
});
