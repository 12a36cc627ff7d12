#!/usr/bin/env python3
"""Peer benchmark for `studio bench generate`: the same GPT-2 folder in Hugging Face
transformers (PyTorch, CPU), measured the same way.

    pip install torch transformers safetensors
    python3 tools/bench_transformers_gpt2.py MODEL_DIR [--prompt-tokens 128] [--gen-tokens 64]
        [--threads 2] [--repeat 5]

Prefill: one forward pass over the prompt (timed to the first sampled token, like Studio's
`ttft_ms`); decode: single-token forward passes with the KV cache, greedy, no EOS stop. One
warm-up run, then the median of --repeat runs. Prints one JSON object with the same keys as
`studio bench generate --json`. For humans comparing numbers; CI never runs it.
"""

import argparse
import inspect
import json
import resource
import statistics
import time

import torch
from transformers import GPT2LMHeadModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = GPT2LMHeadModel.from_pretrained(a.model, use_safetensors=True, torch_dtype=torch.float32).eval()
    # transformers 5.x renamed `past_key_values` to `cache`.
    fwd = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in fwd else "past_key_values"
    vocab = model.config.vocab_size
    # Same xorshift prompt as Studio's bench.
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    ids = []
    for _ in range(a.prompt_tokens):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        ids.append(x % vocab)
    prompt = torch.tensor([ids])
    prefill, decode, ttft = [], [], []
    with torch.inference_mode():
        for run in range(a.repeat + 1):
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            nxt = out.logits[0, -1].argmax()
            t1 = time.perf_counter()
            past = getattr(out, "cache", None) or out.past_key_values
            steps = 0
            for _ in range(a.gen_tokens - 1):
                out = model(nxt.view(1, 1), use_cache=True, **{cache_kw: past})
                past = getattr(out, "cache", None) or out.past_key_values
                nxt = out.logits[0, -1].argmax()
                steps += 1
            t2 = time.perf_counter()
            if run > 0:
                prefill.append(a.prompt_tokens / (t1 - t0))
                decode.append(steps / (t2 - t1))
                ttft.append((t1 - t0) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "peer": f"transformers {__import__('transformers').__version__} / torch {torch.__version__}",
        "threads": a.threads,
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "repeat": a.repeat,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "ttft_ms": statistics.median(ttft),
        "peak_rss_mb": peak,
    }))


if __name__ == "__main__":
    main()
