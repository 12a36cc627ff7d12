#!/usr/bin/env python3
"""Write `config.json` files as transformers 5 saves them, one per family Studio reads
(tests/fixtures/transformers5-configs/<family>.json), for the config tests.

Transformers 5 moves rope settings into `rope_parameters` (per layer type for Gemma 3), writes
`null` for unset ids and windows, adds `layer_types`, and writes `dtype` for `torch_dtype`.
The configs are tiny (no weights); the Rust tests check that each parses and keeps its rope
settings. Nothing is downloaded.

    pip install 'transformers>=5'
    python3 tools/make_transformers5_configs.py [OUT_DIR]

CI never runs this script: the files are committed.
"""

import os
import shutil
import sys
import tempfile

import transformers as T

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(
        **COMMON, num_key_value_heads=2, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "mistral": lambda: T.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen3": lambda: T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8,
                                   rope_theta=1000000.0),
    "phi3": lambda: T.Phi3Config(
        **{**COMMON, "max_position_embeddings": 512}, num_key_value_heads=4,
        original_max_position_embeddings=128, pad_token_id=None,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}),
    "gemma2": lambda: T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=8,
                                     sliding_window=64, query_pre_attn_scalar=8),
    "gemma3_text": lambda: T.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 6}, num_key_value_heads=2, head_dim=8,
        sliding_window=64, query_pre_attn_scalar=8,
        rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "gpt2": lambda: T.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "clip_text": lambda: T.CLIPTextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=16),
}


def main() -> None:
    assert int(T.__version__.split(".")[0]) >= 5, "needs transformers 5"
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        repo_root, "tests", "fixtures", "transformers5-configs")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in CONFIGS.items():
            make().save_pretrained(os.path.join(tmp, name))
            shutil.copy(os.path.join(tmp, name, "config.json"),
                        os.path.join(out_dir, f"{name}.json"))
    print(f"wrote {len(CONFIGS)} configs to {out_dir}")


if __name__ == "__main__":
    main()
