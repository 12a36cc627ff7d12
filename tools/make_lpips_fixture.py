"""Make the LPIPS (VGG16) parity fixture for `tests/tests/gan_perceptual.rs`.

Builds a *narrow* random VGG16 with torchvision's layer stack and indices (13 3x3
convolutions with padding 1, a ReLU after each, 2x2 max-pools at indices 4, 9, 16, 23, 30),
so its state dict has torchvision's names (`features.{0,2,5,...,28}.weight/.bias`), plus
random non-negative LPIPS linear layers in the `lpips` package's naming
(`lin{0..4}.model.1.weight`, shape (1, C_k, 1, 1)). Then it computes the LPIPS distance of
two small random image batches following the `lpips` package's formula:

    x -> (x - shift) / scale                       (ScalingLayer)
    taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (after features.3/8/15/22/29)
    n(f) = f / (sqrt(sum_c f^2) + 1e-10)
    d_k  = spatial_mean( sum_c w_kc * (n(fa) - n(fb))^2 )
    d    = sum_k d_k

both with the linear layers and with uniform weights (w = 1, `lpips=False`). The reference
runs in float64 (from the float32 weights and inputs), so it is exact to the precision the
Rust test can check.

Outputs (small, committed):

    tests/fixtures/lpips/vgg16_tiny.safetensors   the weights (torchvision + lpips names)
    tests/fixtures/lpips/case.safetensors         a, b (2, 3, 32, 32) in [-1, 1];
                                                  distance, distance_uniform (2,);
                                                  layers, layers_uniform (5, 2)

Usage (needs only torch and safetensors; torchvision and lpips are not used):

    python tools/make_lpips_fixture.py
"""

from pathlib import Path

import torch
from torch import nn
from safetensors.torch import save_file

WIDTHS = [4, 8, 16, 16, 16]  # per VGG block (torchvision: 64, 128, 256, 512, 512)
CONVS_PER_BLOCK = [2, 2, 3, 3, 3]
SHIFT = [-0.030, -0.088, -0.188]
SCALE = [0.458, 0.448, 0.450]
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lpips"


def vgg16_features(widths):
    """torchvision's `vgg16().features` layer list (same indices), with other widths."""
    layers = []
    in_ch = 3
    for block, (width, convs) in enumerate(zip(widths, CONVS_PER_BLOCK)):
        for _ in range(convs):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = width
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


def taps(features, x):
    """The five LPIPS taps: outputs of features[0:4], [4:9], [9:16], [16:23], [23:30]."""
    out = []
    bounds = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
    for lo, hi in bounds:
        for i in range(lo, hi):
            x = features[i](x)
        out.append(x)
    return out


def lpips(features, lins, a, b):
    shift = torch.tensor(SHIFT, dtype=a.dtype).view(1, 3, 1, 1)
    scale = torch.tensor(SCALE, dtype=a.dtype).view(1, 3, 1, 1)
    fa = taps(features, (a - shift) / scale)
    fb = taps(features, (b - shift) / scale)
    layers = []
    for k, (x, y) in enumerate(zip(fa, fb)):
        nx = x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + 1e-10)
        ny = y / (torch.sqrt(torch.sum(y**2, dim=1, keepdim=True)) + 1e-10)
        diff = (nx - ny) ** 2
        if lins is None:
            weighted = diff.sum(dim=1, keepdim=True)
        else:
            weighted = nn.functional.conv2d(diff, lins[k])  # 1x1, no bias
        layers.append(weighted.mean(dim=[2, 3]).reshape(-1))
    layers = torch.stack(layers)  # (5, N)
    return layers.sum(0), layers


def main():
    torch.manual_seed(20260128)
    features = vgg16_features(WIDTHS).float()
    # He initialisation keeps the signal alive through 13 layers (PyTorch's default init
    # shrinks it, so the deep taps would see only the biases and differ by ~1e-9).
    with torch.no_grad():
        for m in features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.uniform_(-0.05, 0.05)
    lins = [torch.rand(1, w, 1, 1) for w in WIDTHS]

    tensors = {}
    for name, t in features.state_dict().items():
        tensors[f"features.{name}"] = t.contiguous()
    for k, w in enumerate(lins):
        tensors[f"lin{k}.model.1.weight"] = w.contiguous()
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / "vgg16_tiny.safetensors"))

    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 3, 32, 32)).clamp(-1, 1)
    f64 = vgg16_features(WIDTHS).double()
    f64.load_state_dict({k: v.double() for k, v in features.state_dict().items()})
    with torch.no_grad():
        dist, layers = lpips(f64, [w.double() for w in lins], a.double(), b.double())
        dist_u, layers_u = lpips(f64, None, a.double(), b.double())
    save_file(
        {
            "a": a.contiguous(),
            "b": b.contiguous(),
            "distance": dist.contiguous(),
            "distance_uniform": dist_u.contiguous(),
            "layers": layers.contiguous(),
            "layers_uniform": layers_u.contiguous(),
        },
        str(OUT / "case.safetensors"),
    )
    print("distance", dist.tolist())
    print("distance_uniform", dist_u.tolist())
    print("layers", layers.tolist())


if __name__ == "__main__":
    main()
