"""Writes tests/fixtures/torch_noise/randn.json: `torch.randn` values from seeded CPU
generators, as ComfyUI and the SD web UI (RNG source "CPU") draw their latent noise, and the
SD web UI's variation-seed `slerp` of two such noises.

Run with PyTorch installed: `python tools/make_torch_noise_fixture.py`. Studio's tests read the
JSON; CI needs no Python.
"""

import json
import pathlib

import torch


def a1111_slerp(val, low, high):
    # modules/processing.py of the SD web UI (v1.10), on (C, H, W) noise: norms over dim 1.
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (
        torch.sin(val * omega) / so
    ).unsqueeze(1) * high


def values(t):
    return [float(x) for x in t.flatten().tolist()]


cases = []
for seed, shape in [
    (0, [16]),
    (0, [1, 4, 8, 8]),
    (1234, [1, 4, 8, 8]),
    # More than 32 bits: the generator keeps the low 32.
    (2**32 + 5, [1, 4, 8, 8]),
    # Not a multiple of 16 elements: the last 16 are drawn again.
    (7, [1, 4, 5, 5]),
    # Fewer than 16 elements: a scalar Box-Muller on doubles, its second value kept.
    (0, [1, 4, 1, 1]),
    (3, [1, 3, 1, 1]),
]:
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=g)
    # The same generator goes on (the sampler's noise after the first).
    second = torch.randn(shape, generator=g)
    cases.append(
        {"seed": seed, "shape": shape, "first": values(first), "second": values(second)}
    )

variations = []
for seed, subseed, strength in [(11, 12, 0.3), (11, 12, 1.0), (5, 99, 0.05)]:
    shape = [4, 8, 8]
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    sub = torch.randn(shape, generator=torch.Generator().manual_seed(subseed))
    variations.append(
        {
            "seed": seed,
            "subseed": subseed,
            "strength": strength,
            "shape": shape,
            "values": values(a1111_slerp(strength, noise, sub)),
        }
    )

out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/torch_noise/randn.json"
out.write_text(
    json.dumps({"torch": torch.__version__, "randn": cases, "variations": variations}, indent=0)
    + "\n"
)
print("wrote", out)
