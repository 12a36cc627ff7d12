#!/usr/bin/env python3
"""The PyTorch peer of `studio bench gan`: a StyleGAN2 config-F generator with random weights
of the real shapes, fp32 on the CPU, timed per frame (mapping + synthesis, batch 1).

The network is the one of NVIDIA's stylegan2-ada-pytorch `training/networks.py` on the CPU,
written here with plain torch ops as that code's reference paths run them: `fused_modconv`
(the style and demodulation folded into per-sample weights, a grouped convolution), the
up-sampling layers as `conv_transpose2d(stride=2)` followed by the FIR filter (`upfirdn2d`'s
reference: pad, then a depthwise `conv2d`), `bias_act`'s reference (bias, leaky ReLU × √2,
clamp 256), skip architecture with toRGB at every block, const noise.

    pip install torch numpy
    python tools/bench_stylegan2_torch.py --size 256,1024 --threads 2 --frames 5

Prints one JSON line per size: {"size", "threads", "frame_ms", "fps", "peak_rss_mb"}.
"""

import argparse
import json
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F

SQRT2 = np.sqrt(2.0)
CLAMP = 256.0


def channels(res):
    return min(512, 32768 // res)


def fir_filter():
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(x, f, up, pad, gain):
    """Zero-stuff by `up`, pad [x0, x1, y0, y1], convolve each channel with f·gain."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, [max(pad[0], 0), max(pad[1], 0), max(pad[2], 0), max(pad[3], 0)])
    k = (f * gain).flip([0, 1])[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(x, k, groups=c)


def bias_act(x, b, gain=SQRT2, clamp=CLAMP, act=True):
    x = x + b.reshape(1, -1, 1, 1)
    if act:
        x = F.leaky_relu(x, 0.2) * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


class Layer:
    def __init__(self, cin, cout, res, up, w_dim):
        self.aw = torch.randn(cin, w_dim) / np.sqrt(w_dim)
        self.ab = torch.ones(cin)
        self.weight = torch.randn(cout, cin, 3, 3)
        self.bias = torch.zeros(cout)
        self.noise = torch.randn(res, res)
        self.strength = 0.1
        self.up = up

    def __call__(self, x, w, f):
        s = F.linear(w, self.aw, self.ab)  # (1, cin)
        wt = self.weight[None] * s.reshape(1, 1, -1, 1, 1)
        d = (wt.square().sum([2, 3, 4]) + 1e-8).rsqrt()
        wt = (wt * d.reshape(1, -1, 1, 1, 1))[0]
        if self.up:
            y = F.conv_transpose2d(x, wt.transpose(0, 1), stride=2)
            y = upfirdn2d(y, f, 1, [1, 1, 1, 1], 4.0)
        else:
            y = F.conv2d(x, wt, padding=1)
        y = y + self.noise * self.strength
        return bias_act(y, self.bias)


class ToRgb:
    def __init__(self, cin, w_dim):
        self.aw = torch.randn(cin, w_dim) / np.sqrt(w_dim)
        self.ab = torch.ones(cin)
        self.weight = torch.randn(3, cin, 1, 1)
        self.bias = torch.zeros(3)
        self.gain = 1 / np.sqrt(cin)

    def __call__(self, x, w):
        s = F.linear(w, self.aw, self.ab) * self.gain
        wt = self.weight * s.reshape(1, -1, 1, 1)
        return bias_act(F.conv2d(x, wt), self.bias, act=False)


class Generator:
    def __init__(self, res, w_dim=512):
        self.mapping = [(torch.randn(w_dim, w_dim) * 0.01 / np.sqrt(w_dim), torch.zeros(w_dim))
                        for _ in range(8)]
        self.f = fir_filter()
        self.blocks = []
        prev = None
        r = 4
        while r <= res:
            c = channels(r)
            const = torch.randn(1, c, 4, 4) if r == 4 else None
            conv0 = Layer(prev, c, r, True, w_dim) if r > 4 else None
            conv1 = Layer(c, c, r, False, w_dim)
            self.blocks.append((const, conv0, conv1, ToRgb(c, w_dim)))
            prev = c
            r *= 2

    @torch.no_grad()
    def __call__(self, z):
        x = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        for wt, b in self.mapping:
            x = F.leaky_relu(F.linear(x, wt, b), 0.2) * SQRT2
        w = x
        h = img = None
        for const, conv0, conv1, torgb in self.blocks:
            if const is not None:
                h = const
            else:
                h = conv0(h, w, self.f)
            h = conv1(h, w, self.f)
            if img is not None:
                img = upfirdn2d(img, self.f, 2, [2, 1, 2, 1], 4.0)
            y = torgb(h, w)
            img = y if img is None else img + y
        return img


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="256")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frames", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    for size in [int(s) for s in a.size.split(",")]:
        g = Generator(size)
        g(torch.randn(1, 512))  # warm-up
        times = []
        for _ in range(a.frames):
            t = time.perf_counter()
            g(torch.randn(1, 512))
            times.append((time.perf_counter() - t) * 1000)
        ms = float(np.median(times))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"size": size, "threads": a.threads, "frame_ms": ms,
                          "fps": 1000 / ms, "peak_rss_mb": rss}), flush=True)


if __name__ == "__main__":
    main()
