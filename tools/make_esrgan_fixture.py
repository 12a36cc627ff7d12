"""Writes tests/fixtures/esrgan/: tiny random-weight RRDBNet upscalers (the ESRGAN /
Real-ESRGAN generator) and their PyTorch outputs, to check Studio's implementation.

The network is written out here as BasicSR's `RRDBNet` (basicsr/archs/rrdbnet_arch.py) defines
it, in its published tensor names (`conv_first`, `body.N.rdbK.convJ`, `conv_body`,
`conv_up1`, `conv_up2`, `conv_hr`, `conv_last`); x2 and x1 models pixel-unshuffle their input.
One file is also saved in the original ESRGAN repository's names (`model.0`,
`model.1.sub.N.RDBK.convJ.0`, `model.3`, …), as `RRDB_ESRGAN_x4.pth` and many community
upscalers have them.

Run with PyTorch installed: `python tools/make_esrgan_fixture.py`. CI reads only the output.
"""

import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat, num_grow_ch):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat, num_grow_ch):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x):
        out = self.rdb1(x)
        out = self.rdb2(out)
        out = self.rdb3(out)
        return out * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, scale, num_feat, num_block, num_grow_ch):
        super().__init__()
        self.scale = scale
        num_in_ch = 3 * {4: 1, 2: 4, 1: 16}[scale]
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        if self.scale == 2:
            feat = F.pixel_unshuffle(x, 2)
        elif self.scale == 1:
            feat = F.pixel_unshuffle(x, 4)
        else:
            feat = x
        feat = self.conv_first(feat)
        body_feat = self.conv_body(self.body(feat))
        feat = feat + body_feat
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def old_names(sd, num_block):
    """BasicSR names → the original ESRGAN repository's."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "conv_first":
            n = "model.0." + parts[1]
        elif parts[0] == "body":
            # body.N.rdbK.convJ.weight → model.1.sub.N.RDBK.convJ.0.weight
            n = f"model.1.sub.{parts[1]}.RDB{parts[2][3:]}.{parts[3]}.0.{parts[4]}"
        elif parts[0] == "conv_body":
            n = f"model.1.sub.{num_block}.{parts[1]}"
        else:
            idx = {"conv_up1": 3, "conv_up2": 6, "conv_hr": 8, "conv_last": 10}[parts[0]]
            n = f"model.{idx}.{parts[1]}"
        out[n] = v
    return out


out_dir = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/esrgan"
out_dir.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
image = torch.rand(1, 3, 12, 16)
tensors = {"input": image.contiguous()}
for scale, num_block, name in [(4, 2, "x4"), (2, 1, "x2")]:
    net = RRDBNet(scale, num_feat=8, num_block=num_block, num_grow_ch=4).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # livelier than the default init at this width
        out = net(image)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(out_dir / f"rrdb-{name}.safetensors"))
    if scale == 4:
        save_file(old_names(sd, num_block), str(out_dir / f"rrdb-{name}-esrgan-names.safetensors"))
    tensors[f"output_{name}"] = out.contiguous()
save_file(tensors, str(out_dir / "io.safetensors"))
print("wrote", out_dir)
