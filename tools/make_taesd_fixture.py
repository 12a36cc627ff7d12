#!/usr/bin/env python3
"""Generate the tiny TAESD decoder parity fixture (tests/fixtures/taesd/).

Run from the repository root (CI never runs it; the outputs are committed):

    /tmp/fxenv/bin/python tools/make_taesd_fixture.py [OUT]

(any Python with torch, diffusers and safetensors works).

What it produces in OUT (default ``tests/fixtures/taesd`` under the repo root):

* ``config.json`` - the diffusers ``AutoencoderTiny`` config of a tiny model:
  decoder_block_out_channels (8, 8, 8, 8), num_decoder_blocks (3, 2, 1, 1),
  latent_channels 4, relu, nearest x2 upsampling (the encoder is tiny too but
  its weights are not saved);
* ``diffusion_pytorch_model.safetensors`` - the *decoder* weights only, float32,
  with diffusers' names (``decoder.layers.N...``);
* ``expected.safetensors`` - ``latents`` (1x4x4x4, standard normal times 2 so
  the input clamp tanh(x/3)*3 matters) and ``decoded``: diffusers'
  ``AutoencoderTiny.decode(latents).sample`` (1x3x32x32, in diffusers' [-1, 1]
  convention: 2 * taesd_output - 1, unclamped).

The model is made after ``torch.manual_seed(0)``; then every decoder convolution
is re-initialised (weights ``randn * sqrt(2 / fan_in)``, so activations keep
their scale through the ReLUs and the output depends strongly on the input;
biases ``randn * 0.1``), the latents are drawn, and the last convolution is
rescaled so the output, in TAESD's own [0, 1] convention, has a standard
deviation of 0.15, and its bias shifted so each channel's mean is
0.5 + ``randn * 0.05``. Nearly every value then lies
inside (0, 1), where Studio's decoder clamps, so the comparison checks values,
not the clamp. The script asserts that at least 95% do.
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "tests" / "fixtures" / "taesd"
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(3, 2, 1, 1),
        latent_channels=4,
        act_fn="relu",
        upsample_fn="nearest",
        upsampling_scaling_factor=2,
    ).eval()

    with torch.no_grad():
        convs = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
        for conv in convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn_like(conv.weight) * (2.0 / fan_in) ** 0.5)
            if conv.bias is not None:
                conv.bias.copy_(torch.randn_like(conv.bias) * 0.1)

        latents = torch.randn(1, 4, 4, 4) * 2.0
        # Rescale the last convolution so the output (TAESD convention) is centred on 0.5
        # with a standard deviation of 0.15.
        last = convs[-1]
        raw = (model.decode(latents).sample + 1) / 2
        last.weight.mul_(0.15 / raw.std().item())
        raw = (model.decode(latents).sample + 1) / 2
        last.bias.sub_(raw.mean(dim=(0, 2, 3)) - 0.5 - torch.randn(3) * 0.05)
        decoded = model.decode(latents).sample

    raw = (decoded + 1) / 2
    inside = ((raw > 0) & (raw < 1)).float().mean().item()
    assert inside >= 0.95, f"only {inside:.1%} of the outputs are inside (0, 1)"
    assert raw.std().item() > 0.1, "the output is nearly constant"

    weights = {
        k: v.contiguous().float()
        for k, v in model.state_dict().items()
        if k.startswith("decoder.")
    }
    save_file(weights, str(out / "diffusion_pytorch_model.safetensors"))
    save_file(
        {"latents": latents.contiguous(), "decoded": decoded.contiguous()},
        str(out / "expected.safetensors"),
    )
    config = dict(model.config)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    config["_class_name"] = "AutoencoderTiny"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    import diffusers

    print(
        f"wrote {out} ({len(weights)} tensors; {inside:.1%} of outputs inside (0, 1); "
        f"diffusers {diffusers.__version__}, torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()
