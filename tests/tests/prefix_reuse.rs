//! `generate_with(…, reuse: true, …)` keeps the keys and values a model already holds for the start of a new
//! prompt (what inline completion does on every keystroke): only the rest is prefilled, and
//! the continuation equals a fresh generation's. Models that cannot truncate their cache
//! prefill everything.

use std::ops::ControlFlow;

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use studio_inference::llm::generate::{GenerationStats, generate, generate_with};
use studio_inference::llm::gguf;
use studio_inference::llm::sampling::SamplingParams;
use studio_inference::llm::text::Tokenizer;
use studio_inference::models::CausalLm;
use studio_tests::families::write_family_with;
use studio_tests::gguf_writer::{GgufOptions, convert};

fn run(
    model: &mut dyn CausalLm,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    reuse: bool,
) -> (Vec<u32>, GenerationStats) {
    let mut ids = Vec::new();
    let mut on_step = |s: studio_inference::llm::generate::Step<'_>| {
        ids.extend(s.id);
        ControlFlow::Continue(())
    };
    let params = SamplingParams::greedy(8);
    let stats = if reuse {
        generate_with(model, tokenizer, &[], prompt, &params, true, &mut on_step)
    } else {
        generate(model, tokenizer, &[], prompt, &params, &mut on_step)
    }
    .expect("generate");
    (ids, stats)
}

#[test]
fn a_shared_prompt_prefix_is_not_prefilled_again_and_changes_nothing() {
    for (family, dtype) in [
        ("qwen2", GgmlDType::Q8_0),
        ("llama", GgmlDType::F16),
        ("qwen2", GgmlDType::F32),
    ] {
        let tmp = tempfile::tempdir().expect("tmp");
        write_family_with(tmp.path(), family, &serde_json::json!({}), 5);
        let path = tmp.path().join("m.gguf");
        convert(tmp.path(), &path, &GgufOptions::with_dtype(dtype));
        let mut g = gguf::load(&path, &Device::Cpu, &mut |_, _| {}).expect("load");
        let first: Vec<u32> = (1..40).collect();
        // The user typed on: the new prompt shares the first 30 tokens.
        let mut second: Vec<u32> = first[..30].to_vec();
        second.extend(50..60);

        let (_, s1) = run(&mut *g.model, &g.tokenizer, &first, true);
        assert_eq!(s1.reused_tokens, 0, "nothing cached yet");
        let (reused_ids, s2) = run(&mut *g.model, &g.tokenizer, &second, true);
        let (fresh_ids, s3) = run(&mut *g.model, &g.tokenizer, &second, false);
        assert_eq!(s3.reused_tokens, 0, "plain generate starts afresh");
        assert_eq!(
            reused_ids, fresh_ids,
            "{family} {dtype:?}: the same continuation"
        );
        if dtype == GgmlDType::F32 {
            // F32 files run on candle's model, which cannot truncate its cache.
            assert_eq!(s2.reused_tokens, 0, "{family} {dtype:?}");
        } else {
            assert_eq!(s2.reused_tokens, 30, "{family} {dtype:?}");
        }
        // The same prompt again reuses all but its last token.
        let (again, s4) = run(&mut *g.model, &g.tokenizer, &second, true);
        assert_eq!(again, fresh_ids);
        if dtype != GgmlDType::F32 {
            assert_eq!(s4.reused_tokens, second.len() - 1);
        }
    }
}
