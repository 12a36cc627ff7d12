"""Convert VGG16 weights for Studio's perceptual (LPIPS) projection loss to safetensors.

Kept for reference: Studio no longer needs it. It reads torchvision's `vgg16-397923af.pth`
(and the `lpips` package's `vgg.pth` beside it) itself, with its own pickle reader, as data.
This script turns torchvision's ImageNet VGG16 state dict, and optionally the LPIPS linear
layers, into one .safetensors file that the Latent Explorer's "perceptual" projection loss
(and `studio_inference::gan::perceptual::Vgg16Lpips`) loads:

    features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight / .bias   (torchvision's names)
    lin{0..4}.model.1.weight                                         (LPIPS's names, optional)

Inputs (download them yourself):

    vgg16-397923af.pth  torchvision's VGG16 (the file `torchvision.models.vgg16(weights=
                        "IMAGENET1K_V1")` downloads to ~/.cache/torch/hub/checkpoints/).
                        Its `classifier.*` tensors are dropped.
    vgg.pth             optional: the LPIPS v0.1 linear layers of the `lpips` package
                        (lpips/weights/v0.1/vgg.pth). Without it Studio weighs every
                        channel equally.

Usage:

    python tools/convert_vgg16.py vgg16-397923af.pth vgg16.safetensors [--lpips vgg.pth]

Both files are read with `torch.load(..., weights_only=True)`, which refuses pickles that
contain anything but tensors and plain containers. Needs torch and safetensors
(`pip install torch safetensors`).
"""

import argparse
import sys

import torch
from safetensors.torch import save_file

CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def load_state_dict(path):
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        sys.exit(f"{path}: expected a state dict (name -> tensor), found {type(data).__name__}")
    # Checkpoints saved from nn.DataParallel prefix every name with `module.`.
    return {
        (k[len("module."):] if k.startswith("module.") else k): v
        for k, v in data.items()
        if isinstance(v, torch.Tensor)
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vgg16", help="torchvision's vgg16-397923af.pth (state dict)")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument("--lpips", metavar="VGG_PTH", help="LPIPS's vgg.pth (linear layers)")
    args = parser.parse_args()

    state = load_state_dict(args.vgg16)
    out = {}
    in_ch = 3
    widths = []
    for index in CONV_INDICES:
        w_name, b_name = f"features.{index}.weight", f"features.{index}.bias"
        if w_name not in state or b_name not in state:
            sys.exit(f"{args.vgg16}: no `{w_name}`/`{b_name}`; is this torchvision's vgg16?")
        w, b = state[w_name], state[b_name]
        if w.dim() != 4 or tuple(w.shape[1:]) != (in_ch, 3, 3) or tuple(b.shape) != (w.shape[0],):
            sys.exit(f"{args.vgg16}: `{w_name}` has shape {tuple(w.shape)}; not a VGG16")
        out[w_name] = w.float().contiguous()
        out[b_name] = b.float().contiguous()
        in_ch = w.shape[0]
        if index in (2, 7, 14, 21, 28):
            widths.append(in_ch)
    dropped = sorted(k for k in state if k not in out)
    if dropped:
        print(f"dropped {len(dropped)} tensors not needed: {', '.join(dropped[:6])}"
              + (", ..." if len(dropped) > 6 else ""))

    if args.lpips:
        lins = load_state_dict(args.lpips)
        for k, width in enumerate(widths):
            name = f"lin{k}.model.1.weight"
            if name not in lins:
                sys.exit(f"{args.lpips}: no `{name}`; is this LPIPS's vgg.pth?")
            w = lins[name]
            if tuple(w.shape) != (1, width, 1, 1):
                sys.exit(f"{args.lpips}: `{name}` has shape {tuple(w.shape)}, "
                         f"expected (1, {width}, 1, 1) for this VGG16")
            if (w < 0).any():
                sys.exit(f"{args.lpips}: `{name}` has negative weights; not LPIPS's layers")
            out[name] = w.float().contiguous()

    save_file(out, args.output)
    print(f"wrote {args.output}: 13 convolutions (widths {widths})"
          + (", LPIPS linear layers" if args.lpips else ", no LPIPS linear layers"))


if __name__ == "__main__":
    main()
