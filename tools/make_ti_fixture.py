"""Writes tests/fixtures/embeddings/: a textual-inversion embedding in the SD web UI's `.pt`
format (a pickle: `string_to_token`, `string_to_param`, `name`, `step`), 2 vectors 32 wide
(the tiny test models' text-encoder width), as the web UI's `textual_inversion.py` saves it.

Run with PyTorch installed: `python tools/make_ti_fixture.py`.
"""

import pathlib

import torch

out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/embeddings"
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(3)
vectors = torch.randn(2, 32, generator=g)
torch.save(
    {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vectors},
        "name": "webui-style",
        "step": 500,
        "sd_checkpoint": "abcdef12",
        "sd_checkpoint_name": "tiny",
    },
    out / "webui-style.pt",
)
print("wrote", out)
