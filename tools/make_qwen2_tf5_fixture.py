#!/usr/bin/env python3
"""Generate the tiny Qwen2 fixture saved by transformers 5 (tests/fixtures/qwen2-tf5/).

Transformers 5 writes `config.json` in its own shape: `rope_parameters` instead of a
top-level `rope_theta`, `"sliding_window": null`, `"bos_token_id": null`, `layer_types`,
`dtype` instead of `torch_dtype`. This fixture is a randomly initialised, tiny
`Qwen2ForCausalLM` (vocab 97, hidden 32, 2 layers, 4 heads, 2 KV heads, rope theta 1e6, untied
output) saved with `save_pretrained` by transformers 5, so the Rust tests check that Studio
loads such a folder and computes what transformers computes:

* ``model.safetensors`` and ``config.json`` as transformers 5 writes them;
* ``expected.json``: ``input_ids`` (10 ids), ``logits`` (the full-sequence logits, 10 x 97,
  float32 on the CPU), ``greedy_new_ids`` (12 tokens of an explicit argmax continuation with
  full recompute: no repeat penalty, as transformers' greedy), and the versions.

Every parameter is re-initialised with ``torch.randn_like(p) * 0.3`` after
``torch.manual_seed(REINIT_SEED)`` so outputs are far from uniform; REINIT_SEED was picked so
the greedy continuation is not one repeated token and every step's top-1/top-2 margin is above
0.01. Nothing is downloaded.

How to run (from the repo root; needs transformers >= 5):

    pip install torch 'transformers>=5' safetensors
    python3 tools/make_qwen2_tf5_fixture.py [OUT_DIR]

CI never runs this script: the fixture is committed and the Rust tests only read it.
"""

import json
import os
import sys

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

INPUT_IDS = [5, 17, 42, 3, 88, 61, 0, 95, 23, 7]
GREEDY_NEW_TOKENS = 12
MIN_GREEDY_MARGIN = 0.01


def build(seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=96,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def greedy(model):
    seq = list(INPUT_IDS)
    new_ids = []
    margin = float("inf")
    with torch.no_grad():
        for _ in range(GREEDY_NEW_TOKENS):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            margin = min(margin, (top2[0] - top2[1]).item())
            nxt = int(torch.argmax(logits).item())
            new_ids.append(nxt)
            seq.append(nxt)
    return new_ids, margin


def main() -> None:
    assert int(transformers.__version__.split(".")[0]) >= 5, "needs transformers 5"
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        repo_root, "tests", "fixtures", "qwen2-tf5")
    os.makedirs(out_dir, exist_ok=True)
    for seed in range(200):
        model = build(seed)
        new_ids, margin = greedy(model)
        if margin > MIN_GREEDY_MARGIN and len(set(new_ids)) > 2 and 96 not in new_ids:
            break
    else:
        raise SystemExit("no seed gave a clean greedy continuation")
    model.save_pretrained(out_dir)
    gen_cfg = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([INPUT_IDS]), use_cache=False).logits[0]
    expected = {
        "input_ids": INPUT_IDS,
        "logits": full.tolist(),
        "greedy_new_ids": new_ids,
        "reinit_seed": seed,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f)
        f.write("\n")
    print(f"wrote {out_dir} (seed {seed}); greedy_new_ids = {new_ids}, margin {margin:.4f}")


if __name__ == "__main__":
    main()
