#!/usr/bin/env python3
"""The PyTorch peer of `studio bench sd`: diffusers' SD-1.5 UNet and VAE with random weights
of the real shapes (the configs of runwayml/stable-diffusion-v1-5, written out below so
nothing is downloaded), fp32 on the CPU, timed as Studio times them: one UNet step with
classifier-free guidance (batch 2, 77 text tokens) and one VAE decode, per size.

    pip install torch diffusers
    python tools/bench_sd_torch.py --size 256,512 --threads 2 --steps 3

Prints one JSON line per size: {"size", "threads", "unet_step_ms", "vae_decode_ms",
"peak_rss_mb"}.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)


def timed(runs, f):
    f()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="256")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    with torch.no_grad():
        for size in [int(s) for s in a.size.split(",")]:
            lat = size // 8
            x = torch.randn(2, 4, lat, lat)
            ctx = torch.randn(2, 77, 768)
            t = torch.tensor([500.0, 500.0])
            unet_ms = timed(a.steps, lambda: unet(x, t, encoder_hidden_states=ctx))
            z = x[:1]
            vae_ms = timed(a.steps, lambda: vae.decode(z))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"size": size, "threads": a.threads, "unet_step_ms": unet_ms,
                              "vae_decode_ms": vae_ms, "peak_rss_mb": rss}), flush=True)


if __name__ == "__main__":
    main()
