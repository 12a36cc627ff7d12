#!/usr/bin/env python3
"""Generate the tiny GPT-2 parity fixture (tests/fixtures/gpt2-tiny/).

What it produces (in OUT, default ``tests/fixtures/gpt2-tiny`` under the repo root):

* ``model.safetensors`` - float32 weights of a randomly initialised, tiny
  Hugging Face ``GPT2LMHeadModel`` (vocab 97, 64 positions, n_embd 32,
  2 layers, 4 heads, gelu_new, layer_norm_epsilon 1e-5), saved with
  ``save_pretrained(..., safe_serialization=True)`` so tensor names follow
  transformers' naming (``transformer.wte.weight``,
  ``transformer.h.0.attn.c_attn.weight`` (Conv1D layout [in, out]), ...).
  ``lm_head.weight`` is tied to ``transformer.wte.weight`` and is therefore
  not stored.
* ``config.json`` - the transformers GPT2Config.
* ``expected.json`` - reference outputs computed by transformers on PyTorch
  CPU in float32:
    - ``input_ids``: 10 token ids;
    - ``logits``: full-sequence logits, 10 rows x 97;
    - ``incremental_prefill_len`` (6) and ``incremental_logits``: last-position
      logits of a 6-token prefill with use_cache=True, then of each of the
      remaining 4 tokens fed one at a time with past_key_values (5 rows x 97);
    - ``greedy_new_ids``: 12 tokens of greedy (argmax) continuation of the
      10 input ids, computed with an explicit full-recompute argmax loop;
    - ``transformers_version`` / ``torch_version``.

The model is created after ``torch.manual_seed(0)``; then every parameter
(embeddings, layer-norm weights and biases, all linear biases) is
re-initialised, in ``named_parameters()`` order, with
``torch.randn_like(p) * 0.3`` after ``torch.manual_seed(REINIT_SEED)``, so
outputs are far from uniform and biases are non-zero. REINIT_SEED (94) was
picked among seeds 0..149 because its greedy continuation is not a single
repeated token and every greedy step's top-1/top-2 logit margin is > 0.01
(no near-ties that float rounding could flip); most seeds, 0 included, give
a constant greedy continuation. bos/eos token ids are set to 96 (last id,
like GPT-2's 50256) because the default 50256 lies outside this vocabulary;
they do not affect the forward pass.
No weights are downloaded; nothing touches the Hugging Face hub.

How to run (from the repo root):

    pip install torch transformers safetensors
    python3 tools/make_gpt2_fixture.py [OUT_DIR]

CI never runs this script: the generated fixture is committed, and the Rust
tests only read it. Re-run it only to regenerate the fixture deliberately.
"""

import inspect
import json
import os
import sys

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

INPUT_IDS = [5, 17, 42, 3, 88, 61, 0, 96, 23, 7]
PREFILL_LEN = 6
GREEDY_NEW_TOKENS = 12
REINIT_SEED = 94
MIN_GREEDY_MARGIN = 0.01


def build_model() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=97,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=96,
        eos_token_id=96,
    )
    # Eager attention: the plain reference math (softmax(QK^T/sqrt(d)) V).
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()

    # Re-initialise every parameter (tied wte/lm_head is one Parameter and is
    # yielded once by named_parameters()).
    torch.manual_seed(REINIT_SEED)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)

    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), \
        "lm_head must stay tied to transformer.wte"
    for p in model.parameters():
        assert p.dtype == torch.float32
    return model


def last_logits(out) -> list:
    return out.logits[0, -1].tolist()


# Newer transformers renamed the forward kwarg / output field
# ``past_key_values`` to ``cache``; support both.
_CACHE_KW = ("cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters
             else "past_key_values")


def get_cache(out):
    return out[_CACHE_KW] if _CACHE_KW in out else out.past_key_values


def main() -> None:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        repo_root, "tests", "fixtures", "gpt2-tiny")
    os.makedirs(out_dir, exist_ok=True)

    model = build_model()
    model.save_pretrained(out_dir, safe_serialization=True)
    gen_cfg = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)

    ids = torch.tensor([INPUT_IDS], dtype=torch.long)
    with torch.no_grad():
        # (a) full-sequence logits
        full = model(input_ids=ids, use_cache=False).logits[0]  # [10, 97]

        # (b) KV-cache incremental decoding
        inc = []
        out = model(input_ids=ids[:, :PREFILL_LEN], use_cache=True)
        inc.append(last_logits(out))
        past = get_cache(out)
        for t in range(PREFILL_LEN, len(INPUT_IDS)):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{_CACHE_KW: past})
            inc.append(last_logits(out))
            past = get_cache(out)

        # (c) greedy continuation, explicit argmax loop (full recompute)
        seq = list(INPUT_IDS)
        new_ids = []
        min_margin = float("inf")
        for _ in range(GREEDY_NEW_TOKENS):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            min_margin = min(min_margin, (top2[0] - top2[1]).item())
            nxt = int(torch.argmax(logits).item())
            new_ids.append(nxt)
            seq.append(nxt)

    # Sanity: incremental rows must match the full-sequence rows.
    inc_t = torch.tensor(inc)
    ref_t = full[PREFILL_LEN - 1:]
    max_diff = (inc_t - ref_t).abs().max().item()
    assert max_diff < 1e-4, f"incremental vs full mismatch: {max_diff}"
    assert min_margin > MIN_GREEDY_MARGIN, f"greedy near-tie: margin {min_margin}"

    expected = {
        "input_ids": INPUT_IDS,
        "logits": full.tolist(),
        "incremental_prefill_len": PREFILL_LEN,
        "incremental_logits": inc,
        "greedy_new_ids": new_ids,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f)
        f.write("\n")

    print(f"wrote {out_dir}")
    print(f"incremental vs full max |diff| = {max_diff:.3e}")
    print(f"greedy_new_ids = {new_ids} (min top1-top2 margin {min_margin:.4f})")
    print(f"logits range = [{full.min().item():.3f}, {full.max().item():.3f}]")


if __name__ == "__main__":
    main()
