#!/usr/bin/env python3
"""Write a random-weight Stable Diffusion 1.5 checkpoint in the original single-file layout.

What it is for: a stand-in for ``v1-5-pruned-emaonly.safetensors`` (nothing is downloaded)
for

* the stable-diffusion.cpp peer measurement of issue 15 (``sd-cli -m THIS_FILE ...``), and
* Studio's end-to-end memory check on a full-size SD-1.5 single-file checkpoint.

The file holds the real SD-1.5 tensor names and shapes, in the CompVis / "ldm" layout:

* ``model.diffusion_model.*``: the UNet (channels 320/640/1280/1280, 2 layers per block,
  8 heads, context 768, conv ``proj_in`` / ``proj_out``);
* ``first_stage_model.*``: the VAE (channels 128/256/512/512, 4 latent channels, 1x1-conv
  attention weights as in the original);
* ``cond_stage_model.transformer.text_model.*``: the CLIP ViT-L/14 text encoder (12 layers,
  768 hidden, 12 heads, vocab 49408, 77 positions).

The names and shapes come from diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` and
transformers' ``CLIPTextModel`` built with the SD-1.5 configs (written out below) on the
``meta`` device (no weights are allocated), renamed diffusers -> ldm by the inverse of
diffusers' single-file converter (reimplemented here). The schedule buffers of the original
file (``alphas_cumprod``, ``betas``, ...), ``model_ema.*`` and the CLIP ``position_ids``
buffer are not written; loaders do not need them.

Weights: normal(0, 0.02) for every weight, zeros for every bias, ones for the weights of the
norms (GroupNorm / LayerNorm), so nothing overflows in fp16. They are drawn in fp32 from one
``torch.Generator`` seeded with ``--seed``, tensor by tensor in name order, cast to
``--dtype`` and streamed to the file, so memory stays near the size of the largest tensor
(the file is byte-identical for the same seed and dtype). Pure CPU.

    pip install torch diffusers transformers safetensors
    python tools/make_sd15_checkpoint.py --out /tmp/sd15-f32.safetensors --dtype f32 --seed 0
    python tools/make_sd15_checkpoint.py --out /tmp/sd15-f16.safetensors --dtype f16 --seed 0

``--check`` additionally runs diffusers' own single-file converter
(``diffusers.loaders.single_file_utils``) on the written names and shapes (on ``meta``
tensors) and fails unless it gives back exactly the models' diffusers names and shapes.

Tested with torch 2.15, diffusers 0.42.1, transformers 5.25.0.
"""

import argparse
import json
import struct
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

# SD-1.5 configs (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/); the UNet's and the
# VAE's are the PyTorch peer's (bench_sd_torch.py), so both measure the same shapes.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sd_torch import UNET, VAE  # noqa: E402

CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
# diffusers name -> ldm name: the mapping of make_ldm_fixture.py (the inverse of diffusers'
# convert_ldm_*_checkpoint), shared with the parity fixtures.
from make_ldm_fixture import unet_to_ldm, vae_to_ldm  # noqa: E402


def norm_names(model):
    """Module names of the GroupNorm / LayerNorm modules."""
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}


def init_kind(diff_name, norms):
    """'zeros' (biases), 'ones' (norm weights) or 'normal'."""
    module, _, leaf = diff_name.rpartition(".")
    if leaf == "bias":
        return "zeros"
    if module in norms:
        return "ones"
    return "normal"


def build_models():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        clip = CLIPTextModel(CLIPTextConfig(**CLIP))
    return unet, vae, clip


def clip_state_names(clip):
    """transformers >= 5.6 flattens CLIPTextModel (no `text_model.` level); the ldm file (and
    diffusers' converter) use the `text_model.` names."""
    sd = clip.state_dict()
    norms = norm_names(clip)
    if hasattr(clip, "text_model"):
        return sd, norms, lambda n: n
    return ({"text_model." + k: v for k, v in sd.items()},
            {"text_model." + n for n in norms},
            lambda n: n.removeprefix("text_model."))


def plan(unet, vae, clip):
    """[(ldm name, shape, init kind)] for the whole checkpoint, plus the per-model
    {diffusers name: shape} for --check."""
    entries = []
    expected = {}

    ucfg = dict(unet.config)
    unorms = norm_names(unet)
    usd = unet.state_dict()
    expected["unet"] = {k: tuple(v.shape) for k, v in usd.items()}
    for name, t in usd.items():
        entries.append((UNET_PREFIX + unet_to_ldm(name, ucfg), tuple(t.shape), init_kind(name, unorms)))

    vnorms = norm_names(vae)
    vsd = vae.state_dict()
    n_levels = len(VAE["down_block_types"])
    expected["vae"] = {k: tuple(v.shape) for k, v in vsd.items()}
    for name, t in vsd.items():
        ldm, unsqueeze = vae_to_ldm(name, n_levels)
        shape = tuple(t.shape) + ((1, 1) if unsqueeze else ())
        entries.append((VAE_PREFIX + ldm, shape, init_kind(name, vnorms)))

    csd, cnorms, _ = clip_state_names(clip)
    expected["clip"] = {k: tuple(v.shape) for k, v in csd.items()}
    for name, t in csd.items():
        entries.append((CLIP_PREFIX + name, tuple(t.shape), init_kind(name, cnorms)))

    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise SystemExit("internal error: duplicate ldm names")
    entries.sort(key=lambda e: e[0])
    return entries, expected


def check(entries, expected, unet, vae):
    """Runs diffusers' single-file converter on the planned names/shapes (meta tensors)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sd = {name: torch.empty(shape, device="meta") for name, shape, _ in entries}
    results = {
        "unet": convert_ldm_unet_checkpoint(dict(sd), dict(unet.config)),
        "vae": convert_ldm_vae_checkpoint(dict(sd), dict(vae.config)),
        "clip": convert_ldm_clip_checkpoint(dict(sd)),
    }
    ok = True
    for part, out in results.items():
        got = {k: tuple(v.shape) for k, v in out.items() if v is not None}
        exp = expected[part]
        if part == "clip":
            exp = {k: v for k, v in exp.items() if k != "text_model.embeddings.position_ids"}
        if got != exp:
            ok = False
            missing = sorted(set(exp) - set(got))[:10]
            extra = sorted(set(got) - set(exp))[:10]
            bad = sorted(k for k in set(got) & set(exp) if got[k] != exp[k])[:10]
            print(f"check {part}: FAILED: missing {missing}, extra {extra}, shape {bad}", file=sys.stderr)
        else:
            print(f"check {part}: ok ({len(got)} tensors)", file=sys.stderr)
    if not ok:
        raise SystemExit(1)


DTYPES = {"f32": (torch.float32, "F32", 4), "f16": (torch.float16, "F16", 2)}


def write(entries, out, dtype, seed):
    """Streams a safetensors file: header, then each tensor drawn and cast in turn."""
    torch_dtype, st_dtype, size = DTYPES[dtype]
    header = {"__metadata__": {"format": "pt", "generator": "tools/make_sd15_checkpoint.py",
                               "seed": str(seed), "init": "normal*0.02, norm weights 1, biases 0"}}
    offset = 0
    for name, shape, _ in entries:
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n * size]}
        offset += n * size
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)

    gen = torch.Generator().manual_seed(seed)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, kind in entries:
            if kind == "zeros":
                t = torch.zeros(shape, dtype=torch.float32)
            elif kind == "ones":
                t = torch.ones(shape, dtype=torch.float32)
            else:
                t = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
            f.write(t.to(torch_dtype).contiguous().numpy().tobytes())
    return 8 + len(hb) + offset


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="also check the names/shapes against diffusers' single-file converter")
    a = p.parse_args()

    unet, vae, clip = build_models()
    entries, expected = plan(unet, vae, clip)
    if a.check:
        check(entries, expected, unet, vae)
    params = {}
    for name, shape, _ in entries:
        part = name.split(".")[0]
        n = 1
        for s in shape:
            n *= s
        params[part] = params.get(part, 0) + n
    total = write(entries, a.out, a.dtype, a.seed)
    print(json.dumps({"out": a.out, "dtype": a.dtype, "seed": a.seed, "tensors": len(entries),
                      "params": params, "bytes": total}))


if __name__ == "__main__":
    main()
