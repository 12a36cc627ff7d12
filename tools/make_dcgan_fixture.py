#!/usr/bin/env python3
"""Regenerates tests/fixtures/dcgan: a tiny random-weight DCGAN generator, and what PyTorch
computes with it.

Studio's DCGAN (inference/src/gan/dcgan.rs) is checked against these files by
tests/tests/dcgan.rs. CI never runs this script; the outputs are committed.

The generator is the one of pytorch/examples `dcgan/main.py` (and the official PyTorch DCGAN
tutorial), written out here so that its `state_dict()` has the same names: `main.0.weight`
(ConvTranspose2d, no bias), `main.1.{weight,bias,running_mean,running_var,num_batches_tracked}`
(BatchNorm2d), `main.3.weight`, ... Here nz 8, ngf 4, nc 3 and four transposed convolutions,
so the output is 32x32 (the 64x64 tutorial network has five).

Run it with any Python that has torch, numpy and safetensors (CPU is enough), e.g.

    /tmp/fxenv/bin/python tools/make_dcgan_fixture.py

Writes:
- `generator.safetensors`: `G.state_dict()` as is (`num_batches_tracked` kept, int64);
- `expected.safetensors`: `z` (2, nz, 1, 1) from torch, `image` = G(z); `z_seed7` =
  `np.random.RandomState(7).randn(1, nz, 1, 1)` as float32 and `image_seed7` = G(z_seed7).
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn
from safetensors.torch import save_file

NZ, NGF, NC = 8, 4, 3
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dcgan"


class Generator(nn.Module):
    """pytorch/examples dcgan Generator, with one block fewer (32x32 output)."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(NZ, NGF * 4, 4, 1, 0, bias=False),
            nn.BatchNorm2d(NGF * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(NGF * 4, NGF * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(NGF * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(NGF * 2, NGF, 4, 2, 1, bias=False),
            nn.BatchNorm2d(NGF),
            nn.ReLU(True),
            nn.ConvTranspose2d(NGF, NC, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, x):
        return self.main(x)


def main():
    torch.manual_seed(1234)
    g = Generator()
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, nn.ConvTranspose2d):
                # A bit larger than the tutorial's N(0, 0.02) so tanh is not saturated nor linear.
                m.weight.normal_(0.0, 0.25)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.3, 2.0)
                m.num_batches_tracked.fill_(1000)
    g.eval()

    z = torch.randn(2, NZ, 1, 1)
    z7 = torch.from_numpy(np.random.RandomState(7).randn(1, NZ, 1, 1).astype(np.float32))
    with torch.no_grad():
        image = g(z)
        image7 = g(z7)

    OUT.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in g.state_dict().items()}
    save_file(state, str(OUT / "generator.safetensors"))
    save_file(
        {
            "z": z.contiguous(),
            "image": image.contiguous(),
            "z_seed7": z7.contiguous(),
            "image_seed7": image7.contiguous(),
        },
        str(OUT / "expected.safetensors"),
    )
    print("image range", float(image.min()), float(image.max()))
    for k, v in state.items():
        print(k, tuple(v.shape), v.dtype)


if __name__ == "__main__":
    main()
