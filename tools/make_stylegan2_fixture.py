#!/usr/bin/env python3
"""Regenerates tests/fixtures/stylegan2: tiny random-weight StyleGAN2 generators built with
NVIDIA's own PyTorch code, and what that code computes for a few seeds.

Studio's StyleGAN2 (inference/src/gan/stylegan2.rs) is checked against these files by
tests/tests/stylegan2.rs. CI never runs this script; the outputs are committed.

NVIDIA's code is not part of Studio (its licence is non-commercial). Put a checkout of it on
PYTHONPATH:

    git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/sg2ada
    git -C /tmp/sg2ada checkout d72cc7d041b42ec8e806021a205ed9349f87c6a4
    PYTHONPATH=/tmp/sg2ada python tools/make_stylegan2_fixture.py

Needs torch (CPU is enough: without the CUDA plugin NVIDIA's ops run their reference
implementations), numpy and safetensors.

Two generators are written, each as `<name>.safetensors` (the `G.state_dict()` names, exactly
what tools/convert_stylegan_pkl.py writes for a real G_ema) plus `<name>.json` (the init kwargs):

- `skip`: unconditional, 'skip' architecture (StyleGAN2 config F), conv_clamp 256;
- `resnet_cond`: class-conditioned (c_dim 3), 'resnet' architecture, a small conv_clamp so
  the clamp is exercised.

Random weights are seeded; biases, noise strengths and w_avg are set non-zero so every term of
the forward pass matters. `expected.safetensors` holds, for each model and seed, the numpy z
(`np.random.RandomState(seed).randn(1, z_dim)`, as NVIDIA's gen_images.py makes it), ws at
several truncations and images at noise_mode 'const' / 'none', plus one intermediate layer.
"""

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from training.networks import Generator  # NVIDIA's, from PYTHONPATH

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "stylegan2")

MODELS = {
    "skip": dict(
        z_dim=32,
        c_dim=0,
        w_dim=32,
        img_resolution=32,
        img_channels=3,
        mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(
            channel_base=128, channel_max=32, num_fp16_res=0, conv_clamp=256, architecture="skip"
        ),
    ),
    "resnet_cond": dict(
        z_dim=16,
        c_dim=3,
        w_dim=16,
        img_resolution=32,
        img_channels=3,
        mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(
            channel_base=128, channel_max=16, num_fp16_res=0, conv_clamp=1.5, architecture="resnet"
        ),
    ),
}


def randomize(G, seed):
    """Non-trivial values for everything the default init leaves at zero or one."""
    g = torch.Generator().manual_seed(seed)
    sd = G.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if name.endswith("resample_filter"):
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("affine.bias"):
                t.copy_(1.0 + 0.2 * r)
            elif name.startswith("mapping.fc") and name.endswith(".bias"):
                t.copy_(20.0 * r)  # times lr_multiplier 0.01 in the forward pass
            elif name.startswith("mapping.fc") and name.endswith(".weight"):
                t.copy_(r / 0.01)  # stored divided by lr_multiplier, as the init does
            elif name.endswith(".bias"):
                t.copy_(0.2 * r)
            elif name.endswith("noise_strength"):
                t.copy_(0.1 + 0.3 * torch.rand(t.shape, generator=g))
            elif name == "mapping.w_avg":
                t.copy_(0.5 * r)
            else:
                t.copy_(r)  # weights, const, noise_const: standard normal like the init


def numpy_z(seed, z_dim):
    return np.random.RandomState(seed).randn(1, z_dim)


def main():
    os.makedirs(OUT, exist_ok=True)
    expected = {}
    for mi, (name, kwargs) in enumerate(MODELS.items()):
        torch.manual_seed(100 + mi)
        G = Generator(**kwargs).eval().requires_grad_(False)
        randomize(G, 200 + mi)
        sd = {k: v.detach().contiguous().clone() for k, v in G.state_dict().items()}
        save_file(sd, os.path.join(OUT, f"{name}.safetensors"))
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(
                {"class_name": "training.networks.Generator", "init_kwargs": kwargs}, f, indent=2
            )

        # An intermediate activation for the layer view.
        captured = {}
        hook = G.synthesis.b16.conv0.register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("x", out.detach().clone())
        )

        seeds = [0, 1, 42] if name == "skip" else [0, 7]
        for si, seed in enumerate(seeds):
            z64 = numpy_z(seed, G.z_dim)
            z = torch.from_numpy(z64).to(torch.float32)
            c = None
            if G.c_dim > 0:
                c = torch.zeros([1, G.c_dim])
                c[0, (si + 1) % G.c_dim] = 1.0
                expected[f"{name}.seed{seed}.c"] = c.clone()
            else:
                c = torch.zeros([1, 0])
            p = f"{name}.seed{seed}"
            expected[f"{p}.z"] = torch.from_numpy(z64.copy())  # float64, exactly numpy's
            with torch.no_grad():
                ws1 = G.mapping(z, c, truncation_psi=1)
                ws07 = G.mapping(z, c, truncation_psi=0.7)
                ws05c = G.mapping(z, c, truncation_psi=0.5, truncation_cutoff=3)
                expected[f"{p}.ws.psi1"] = ws1
                expected[f"{p}.ws.psi0.7"] = ws07
                expected[f"{p}.ws.psi0.5.cutoff3"] = ws05c
                expected[f"{p}.img.const.psi1"] = G.synthesis(ws1, noise_mode="const")
                if si == 0:
                    expected[f"{p}.layer.b16.conv0"] = captured["x"]
                if si == 0:
                    expected[f"{p}.img.const.psi0.7"] = G.synthesis(ws07, noise_mode="const")
                    expected[f"{p}.img.none.psi1"] = G.synthesis(ws1, noise_mode="none")
                    ws0 = G.mapping(z, c, truncation_psi=0)
                    expected[f"{p}.img.const.psi0"] = G.synthesis(ws0, noise_mode="const")
            img = expected[f"{p}.img.const.psi1"]
            print(f"{p}: ws {tuple(ws1.shape)} img {tuple(img.shape)} range "
                  f"[{img.min():.3f}, {img.max():.3f}] std {img.std():.3f}")
        hook.remove()

        # How much the clamp matters: the same image without it.
        if kwargs["synthesis_kwargs"]["conv_clamp"] < 10:
            kw2 = json.loads(json.dumps(kwargs))
            kw2["synthesis_kwargs"]["conv_clamp"] = None
            G2 = Generator(**kw2).eval()
            G2.load_state_dict(G.state_dict())
            ws = expected[f"{name}.seed0.ws.psi1"]
            with torch.no_grad():
                d = (G2.synthesis(ws, noise_mode="const") - expected[f"{name}.seed0.img.const.psi1"]).abs().max()
            print(f"{name}: max change when the clamp is removed {d:.3f}")

    expected = {k: v.contiguous() for k, v in expected.items()}
    save_file(expected, os.path.join(OUT, "expected.safetensors"))
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
