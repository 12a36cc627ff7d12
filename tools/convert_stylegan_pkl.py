#!/usr/bin/env python3
"""Converts one of NVIDIA's StyleGAN2 network pickles (.pkl) to safetensors, with NVIDIA's code.

Kept for reference: Studio no longer needs it. Studio opens NVIDIA's .pkl files itself, with
its own pickle reader, which takes out `G_ema`'s tensors and init kwargs as data and runs
nothing (`studio convert ffhq.pkl ffhq.safetensors` writes the same two files). This script
unpickles with Python, which runs whatever code the file contains: use it only on files you
trust. It also converts TensorFlow-era pickles through NVIDIA's `legacy.py`, which Studio does
not read.

Usage:

    git clone https://github.com/NVlabs/stylegan2-ada-pytorch      # or NVlabs/stylegan3
    PYTHONPATH=stylegan2-ada-pytorch python tools/convert_stylegan_pkl.py ffhq.pkl
    PYTHONPATH=stylegan2-ada-pytorch python tools/convert_stylegan_pkl.py ffhq.pkl out/ffhq.safetensors

It needs torch, numpy and safetensors (`pip install torch numpy safetensors`), and NVIDIA's code
on PYTHONPATH (its `legacy.py` reads the pickle; both stylegan2-ada-pytorch and stylegan3
checkouts work, including the TensorFlow-era StyleGAN2 pickles `legacy.py` converts). No GPU
is needed.

It writes, next to each other:

- `NAME.safetensors`: the `G_ema` generator's `state_dict()` in float32 with NVIDIA's own
  tensor names (`mapping.fc0.weight`, `mapping.w_avg`, `synthesis.b4.const`,
  `synthesis.b8.conv0.affine.weight`, `synthesis.b8.torgb.weight`, ...);
- `NAME.json`: the generator's init kwargs (`z_dim`, `c_dim`, `w_dim`, `img_resolution`,
  `mapping_kwargs`, `synthesis_kwargs` with `channel_base`, `channel_max`, `conv_clamp`,
  `architecture`, ...), which Studio reads to build exactly that network. Without the JSON
  Studio infers the architecture from the tensor names and shapes.

`--key G` or `--key D` would export the other networks of a training snapshot; Studio only
uses `G_ema` (the default). StyleGAN3 (alias-free) generators are converted too, but this
version of Studio renders StyleGAN2 only and says so when one is opened.
"""

import argparse
import json
import os
import sys


def jsonable(value):
    """EasyDicts, tuples and numpy scalars to plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pkl", help="NVIDIA network pickle (.pkl)")
    parser.add_argument("out", nargs="?", help="output .safetensors (default: next to the .pkl)")
    parser.add_argument("--key", default="G_ema", help="which network of the pickle (default G_ema)")
    args = parser.parse_args()

    try:
        import torch
        from safetensors.torch import save_file
    except ImportError as e:
        sys.exit(f"needs torch and safetensors: pip install torch numpy safetensors ({e})")
    try:
        import legacy  # NVIDIA's, from PYTHONPATH
    except ImportError:
        sys.exit(
            "cannot import NVIDIA's legacy.py: put a checkout of "
            "https://github.com/NVlabs/stylegan2-ada-pytorch (or NVlabs/stylegan3) on PYTHONPATH"
        )

    out = args.out or os.path.splitext(args.pkl)[0] + ".safetensors"
    if not out.endswith(".safetensors"):
        sys.exit(f"{out}: the output name should end in .safetensors")
    json_path = os.path.splitext(out)[0] + ".json"

    with open(args.pkl, "rb") as f:
        data = legacy.load_network_pkl(f)
    if args.key not in data:
        sys.exit(f"{args.pkl} has no `{args.key}` (it has: {', '.join(map(str, data))})")
    net = data[args.key]

    state = {}
    for name, tensor in net.state_dict().items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        state[name] = t.contiguous().clone()
    if "synthesis.b4.const" not in state and "synthesis.input.affine.weight" in state:
        print("note: this is a StyleGAN3 (alias-free) generator; Studio renders StyleGAN2 only")

    init_kwargs = jsonable(dict(getattr(net, "init_kwargs", {}) or {}))
    meta = {
        "class_name": getattr(net, "_orig_class_name", type(net).__name__),
        "source": os.path.basename(args.pkl),
        "key": args.key,
        "init_kwargs": init_kwargs,
    }
    for attr in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "num_ws"):
        if hasattr(net, attr):
            meta[attr] = jsonable(getattr(net, attr))

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(state, out, metadata={"format": "pt", "source": os.path.basename(args.pkl)})
    with open(json_path, "w") as f:
        json.dump(meta, f, indent=2)
    params = sum(t.numel() for t in state.values())
    print(f"wrote {out} ({len(state)} tensors, {params:,} values) and {json_path}")


if __name__ == "__main__":
    main()
