#!/usr/bin/env python3
"""Write a tiny CLIP tokenizer folder and transformers' token ids for a few prompts
(tests/fixtures/clip-tiny-tokenizer/): `vocab.json` and `merges.txt` as a diffusers
`tokenizer/` folder holds them, with a 70-id vocabulary (lower-case letters and `!,.`, each
also with `</w>`, ten merges, `<|startoftext|>`, `<|endoftext|>`), far from OpenAI's 49,408 ids,
and `expected.json` with `CLIPTokenizer(...)(prompt, add_special_tokens=False)` ids. Bytes
outside the vocabulary become `<|endoftext|>`, as in transformers.

    pip install transformers tokenizers
    python3 tools/make_clip_tokenizer_fixture.py [OUT_DIR]

CI never runs this script: the fixture is committed.
"""

import json
import os
import sys

import transformers
from transformers import CLIPTokenizer

PROMPTS = ["a cat and the DOG!", "  red   dogs, cats.", "café 42 🙂", "the red dog", ""]


def main() -> None:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        repo_root, "tests", "fixtures", "clip-tiny-tokenizer")
    os.makedirs(out_dir, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz!,.")
    vocab = {}
    for s in chars:
        vocab[s] = len(vocab)
    for s in chars:
        vocab[s + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "n"),
              ("an", "d</w>"), ("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(out_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    tok = CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"))
    expected = {
        "vocab_size": len(vocab),
        "prompts": [{"text": p, "ids": tok(p, add_special_tokens=False)["input_ids"]}
                    for p in PROMPTS],
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
