"""Writes random-weight F16 GGUF files of real model shapes, for speed benchmarks only.

Usage: PYTHONPATH=<llama.cpp>/gguf-py python3 tools/make_bench_gguf.py OUT_DIR

Writes `qwen05b-f16.gguf` (Qwen2-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied) and `llama1b-f16.gguf` (Llama-3.2-1B: hidden 2048,
16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied). Quantize them with
llama.cpp's own `llama-quantize` (with `--pure` for uniform files, without it for the mixes
people download), then compare `studio bench generate` with `llama-bench` on the same files.

Weights are N(0, 0.02) (norms 1): the speed of a product does not depend on the values.
The tokenizer is a synthetic byte-level BPE of the right size (every byte, then all pairs
of bytes, then triples, each merge joining a token's prefix with its last byte), enough for
both programs to load the file; the text it makes is meaningless. Nothing is downloaded.
"""

import sys
from pathlib import Path

import numpy as np

import gguf

SHAPES = {
    "qwen05b": dict(
        arch="qwen2",
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        ffn=4864,
        vocab=151936,
        rope=1_000_000.0,
        ctx=32768,
        bias=True,
    ),
    "llama1b": dict(
        arch="llama",
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        ffn=8192,
        vocab=128256,
        rope=500_000.0,
        ctx=131072,
        bias=False,
    ),
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_chars():
    """GPT-2's printable stand-ins for the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def vocab(size):
    chars = byte_chars()
    normal = size - len(SPECIALS)
    tokens, merges = list(chars), []
    width = 2
    while len(tokens) < normal:
        idx = len(tokens) - 256 - sum(256**w for w in range(2, width))
        if idx >= 256**width:
            width += 1
            continue
        digits = [(idx // 256**p) % 256 for p in reversed(range(width))]
        text = "".join(chars[d] for d in digits)
        tokens.append(text)
        merges.append(f"{text[:-1]} {text[-1]}")
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(SPECIALS)
    return tokens + SPECIALS, types, merges


def write(path, s, rng):
    w = gguf.GGUFWriter(str(path), s["arch"])
    head_dim = s["hidden"] // s["heads"]
    w.add_name(path.stem)
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_freq_base(s["rope"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges = vocab(s["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = tokens.index("<|endoftext|>")
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))

    def ones(name, n):
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    h, kv = s["hidden"], s["kv_heads"] * head_dim
    t("token_embd.weight", s["vocab"], h)
    ones("output_norm.weight", h)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", h)
        ones(p + "ffn_norm.weight", h)
        t(p + "attn_q.weight", h, h)
        t(p + "attn_k.weight", kv, h)
        t(p + "attn_v.weight", kv, h)
        t(p + "attn_output.weight", h, h)
        if s["bias"]:
            for name, n in (("attn_q.bias", h), ("attn_k.bias", kv), ("attn_v.bias", kv)):
                w.add_tensor(p + name, rng.standard_normal(n, dtype=np.float32) * 0.02)
        t(p + "ffn_gate.weight", s["ffn"], h)
        t(p + "ffn_up.weight", s["ffn"], h)
        t(p + "ffn_down.weight", h, s["ffn"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        path = out / f"{name}-f16.gguf"
        write(path, shape, rng)
        print(path, path.stat().st_size)


if __name__ == "__main__":
    main()
