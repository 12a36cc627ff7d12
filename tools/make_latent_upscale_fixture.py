"""Writes tests/fixtures/latent_upscale/io.safetensors: a small latent and what PyTorch's
`torch.nn.functional.interpolate` makes of it in each of the SD web UI's "Latent" hires
upscale modes (`bilinear`, `bilinear` antialiased, `bicubic`, `bicubic` antialiased, `nearest`,
`nearest-exact`; align_corners off), at two enlargements (x2 and a non-integer one).

Run with PyTorch installed: `python tools/make_latent_upscale_fixture.py`.
"""

import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/latent_upscale"
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(3)
x = torch.randn(1, 4, 5, 7, generator=g)
tensors = {"input": x}
modes = {
    "bilinear": dict(mode="bilinear", antialias=False),
    "bilinear_aa": dict(mode="bilinear", antialias=True),
    "bicubic": dict(mode="bicubic", antialias=False),
    "bicubic_aa": dict(mode="bicubic", antialias=True),
    "nearest": dict(mode="nearest"),
    "nearest_exact": dict(mode="nearest-exact"),
}
for name, kw in modes.items():
    for size in [(10, 14), (11, 17)]:
        kwargs = dict(kw)
        if kwargs["mode"] in ("bilinear", "bicubic"):
            kwargs["align_corners"] = False
        y = F.interpolate(x, size=size, **kwargs)
        tensors[f"{name}_{size[0]}x{size[1]}"] = y.contiguous()
save_file(tensors, str(out / "io.safetensors"))
print("wrote", len(tensors), "tensors")
