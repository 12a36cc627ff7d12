"""Writes tests/fixtures/swinir/: tiny random-weight SwinIR upscalers and their PyTorch outputs,
to check Studio's implementation (`inference/src/upscale/swinir.rs`).

The reference is the SwinIR architecture as chaiNNer's `spandrel` package carries it (a copy of
JingyunLiang/SwinIR's `network_swinir.py`), in the published tensor names (`conv_first`,
`patch_embed.norm`, `layers.N.residual_group.blocks.M.{norm1,attn.qkv,attn.proj,
attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}`, `layers.N.conv`, `norm`,
`conv_after_body`, then the up-sampler's). One model per up-sampler the published files use:

- `swinir-x2-pixelshuffle.safetensors`: classical SR (`001_classicalSR_*`), `1conv`;
- `swinir-x4-nearest-3conv.pth`: real-world SR (`003_realSR_*`, the SD web UI's `SwinIR_4x`),
  `3conv`, saved as those files are: `{"params_ema": state_dict}` in a PyTorch zip;
- `swinir-x3-direct.safetensors`: lightweight SR (`002_lightweightSR_*`, `pixelshuffledirect`).

The input (10 × 14) is not a multiple of the window (4), so the reflection padding and the
shifted-window masks at an unseen size are exercised.

Run with PyTorch and spandrel installed (`pip install torch spandrel safetensors`):
`python tools/make_swinir_fixture.py`. CI reads only the output.
"""

import pathlib

import torch
from safetensors.torch import save_file
from spandrel.architectures.SwinIR import SwinIR

out_dir = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/swinir"
out_dir.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
image = torch.rand(1, 3, 10, 14)
tensors = {"input": image.contiguous()}

configs = [
    ("swinir-x2-pixelshuffle", "safetensors",
     dict(upscale=2, embed_dim=12, depths=[2, 2], num_heads=[2, 3], upsampler="pixelshuffle",
          resi_connection="1conv")),
    ("swinir-x4-nearest-3conv", "pth",
     dict(upscale=4, embed_dim=16, depths=[2], num_heads=[4], upsampler="nearest+conv",
          resi_connection="3conv")),
    ("swinir-x3-direct", "safetensors",
     dict(upscale=3, embed_dim=8, depths=[2], num_heads=[2], upsampler="pixelshuffledirect",
          resi_connection="1conv")),
]
for name, ext, cfg in configs:
    net = SwinIR(img_size=16, window_size=4, mlp_ratio=2.0, img_range=1.0, **cfg).eval()
    with torch.no_grad():
        for pname, p in net.named_parameters():
            if pname.endswith("norm1.weight") or pname.endswith("norm2.weight") or \
                    pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_position_bias_table" in pname:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.06 * torch.randn_like(p))
        out = net(image)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    if ext == "pth":
        torch.save({"params_ema": sd}, str(out_dir / f"{name}.pth"))
    else:
        save_file(sd, str(out_dir / f"{name}.safetensors"))
    tensors[f"output_{name}"] = out.contiguous()
    print(name, tuple(out.shape), float(out.abs().mean()))
save_file(tensors, str(out_dir / "io.safetensors"))
print("wrote", out_dir)
