#!/usr/bin/env python3
"""Generate the Stable Diffusion numerical-parity fixture: tests/fixtures/sd_parity/.

Tiny random-weight models of the real architectures, built with diffusers / transformers, with
inputs and the reference outputs, so ``tests/tests/sd_parity.rs`` can run the same weights
through Studio's own networks (``studio_inference::diffusion::{unet, vae, clip}``) and compare:

* ``unet_sd1/``: an SD 1.x-style ``UNet2DConditionModel`` (conv projections, cross-attention on
  the first level, two heads per attention), run on a batch of two latents with two different
  contexts, and on an odd-size latent (7x9: the up blocks must upsample to the skip size);
* ``unet_sdxl/``: an SDXL-style UNet (linear projections, two transformer blocks on the second
  level and in the mid block, ``addition_embed_type: "text_time"``) with pooled text embeds
  and size/crop time ids;
* ``vae/``: an ``AutoencoderKL``: image -> ``latent_dist.mean * scaling_factor`` and
  latents -> ``decode(latents / scaling_factor).sample``;
* ``clip_l/``: a ``CLIPTextModel`` (quick_gelu) and ``clip_g/``: a
  ``CLIPTextModelWithProjection`` (gelu): ``last_hidden_state``, ``hidden_states[-2]`` and
  (projection model) ``text_embeds``, for 77-token rows (clip_l: one padded with <eos> as SD 1.x
  pads; clip_g: two of different lengths padded with id 0 as SDXL's second tokenizer pads).

Each folder holds the model's own ``config.json`` and its ``state_dict()`` under the library's
names (``diffusion_pytorch_model.safetensors`` / ``model.safetensors``; the CLIP text encoders
in the ``text_model.``-prefixed layout of every released SD checkpoint, see ``clip_case``),
plus ``io.safetensors`` with the inputs and reference outputs; ``cases.json`` holds the scalar
inputs (timestep, the eos id). Everything is float32.

The UNets' ``io.safetensors`` also hold ``out_tanh_geglu`` / ``odd_out_tanh_geglu``: diffusers'
output with GEGLU's gate through tanh-approximate GELU (what candle's transformer blocks
compute) instead of the exact one, so the rest of the network can be pinned to float noise.

Weights: every matrix / conv kernel ~ N(0, (1.5 / sqrt(fan_in))^2), embeddings ~ N(0, 1),
biases ~ N(0, 0.1^2), norm scales 1 + N(0, 0.1^2) and norm shifts N(0, 0.1^2): the activations
keep their scale through the stack, attention is neither uniform nor one-hot, and a loader that
skips or swaps a norm parameter shows. The script checks that every output depends on every
input it is meant to (context, timestep, pooled embeds, time ids, ...).

The sizes are smaller than the real models' but keep the structure: group norms with several
channels per group, several heads per attention, several layers where the real ones have them.
(Everything together must stay small: the fixture is committed.)

Run with the fixture venv (CI never runs Python):

    /tmp/fxenv/bin/python tools/make_sd_parity_fixture.py [OUT]

``SD_PARITY_WIDE=1`` makes the UNets 32/64 channels with diffusers' default 32 groups (about
8.5 MB: not committed; write it elsewhere with OUT and point the test at it with
``SD_PARITY_DIR=OUT``).

Tested with diffusers 0.42.1, transformers 5.24.0, torch 2.15 (CPU).
"""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.activations import GEGLU
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/sd_parity"

GAIN = 1.5
TIMESTEP = 500.0
VOCAB = 128
BOS, EOS = 126, 127


def init_weights(model, seed):
    """Seeded re-initialisation of every parameter (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 2)
            module = leaf[-2] if len(leaf) > 1 else ""
            is_norm = "norm" in module
            if is_norm and name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif is_norm or name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif "embedding" in module and p.dim() == 2 and "linear" not in module:
                v = torch.randn(p.shape, generator=g)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                v = GAIN / math.sqrt(fan_in) * torch.randn(p.shape, generator=g)
            p.copy_(v)
    model.eval()
    return model


def rel_change(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def require_dependence(what, base, other, floor=1e-2):
    """The output must change visibly when one input changes."""
    r = rel_change(base, other)
    print(f"  {what}: relative change {r:.3g}")
    if r < floor:
        raise SystemExit(f"output barely depends on {what} ({r:.3g})")


def save_model(model, folder, weights_name):
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    save_file(state, str(folder / weights_name))
    model.save_config(folder)  # diffusers' own config.json


def save_io(folder, tensors):
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, str(folder / "io.safetensors"))


def unet_case(name, seed, kwargs, sdxl):
    print(name)
    model = init_weights(UNet2DConditionModel(**kwargs), seed)
    g = torch.Generator().manual_seed(seed + 100)
    cross = kwargs["cross_attention_dim"]
    batch = 2
    sample = torch.randn((batch, 4, 8, 8), generator=g)
    context = torch.randn((batch, 7, cross), generator=g)
    odd_sample = torch.randn((1, 4, 7, 9), generator=g)
    io = {"sample": sample, "context": context, "odd_sample": odd_sample}
    added = None
    if sdxl:
        pooled_dim = kwargs["projection_class_embeddings_input_dim"] - 6 * kwargs["addition_time_embed_dim"]
        text_embeds = torch.randn((batch, pooled_dim), generator=g)
        # original size, crop top-left, target size (a batch of two different ones).
        time_ids = torch.tensor([[64.0, 72.0, 0.0, 0.0, 64.0, 72.0], [48.0, 96.0, 8.0, 16.0, 56.0, 80.0]])
        io["text_embeds"] = text_embeds
        io["time_ids"] = time_ids
        added = {"text_embeds": text_embeds, "time_ids": time_ids}

    def run(x, t, ctx, add=None):
        with torch.no_grad():
            return model(x, t, encoder_hidden_states=ctx, added_cond_kwargs=add).sample

    odd_add = None
    if sdxl:
        odd_add = {"text_embeds": added["text_embeds"][:1], "time_ids": added["time_ids"][:1]}
    out = run(sample, TIMESTEP, context, added)
    odd_out = run(odd_sample, TIMESTEP, context[:1], odd_add)
    assert odd_out.shape == odd_sample.shape, odd_out.shape
    io["out"] = out
    io["odd_out"] = odd_out
    # The same with GEGLU's gate through the tanh approximation of GELU instead of diffusers'
    # exact (erf) one: candle's transformer blocks compute that, so this reference pins the rest
    # of the network tightly while that difference stands.
    exact_gelu = GEGLU.gelu
    GEGLU.gelu = lambda self, gate: F.gelu(gate, approximate="tanh")
    try:
        io["out_tanh_geglu"] = run(sample, TIMESTEP, context, added)
        io["odd_out_tanh_geglu"] = run(odd_sample, TIMESTEP, context[:1], odd_add)
    finally:
        GEGLU.gelu = exact_gelu
    print(f"  tanh-GELU GEGLU moves the output by {rel_change(out, io['out_tanh_geglu']):.3g} (relative)")
    print(f"  out scale {out.abs().max():.3g}, odd out scale {odd_out.abs().max():.3g}")
    require_dependence("sample", out, run(sample * 0.5, TIMESTEP, context, added))
    require_dependence("timestep", out, run(sample, 900.0, context, added))
    require_dependence("context", out, run(sample, TIMESTEP, -context, added))
    # The two rows of the batch see different inputs, so a batch mix-up shows.
    require_dependence("batch rows", out[0], out[1])
    if sdxl:
        a = dict(added, text_embeds=added["text_embeds"] * -1.0)
        require_dependence("text_embeds", out, run(sample, TIMESTEP, context, a))
        b = dict(added, time_ids=added["time_ids"] + 8.0)
        require_dependence("time_ids", out, run(sample, TIMESTEP, context, b))
    folder = OUT / name
    save_model(model, folder, "diffusion_pytorch_model.safetensors")
    save_io(folder, io)


def vae_case(seed):
    print("vae")
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
        scaling_factor=0.18215,
    )
    model = init_weights(AutoencoderKL(**kwargs), seed)
    g = torch.Generator().manual_seed(seed + 100)
    image = torch.rand((1, 3, 16, 16), generator=g) * 2.0 - 1.0
    sf = model.config.scaling_factor
    latents = torch.randn((1, 4, 4, 4), generator=g) * sf
    with torch.no_grad():
        encoded = model.encode(image).latent_dist.mean * sf
        decoded = model.decode(latents / sf).sample
        encoded2 = model.encode(image.flip(3)).latent_dist.mean * sf
        decoded2 = model.decode(latents.flip(3) / sf).sample
    print(f"  encoded scale {encoded.abs().max():.3g}, decoded scale {decoded.abs().max():.3g}")
    require_dependence("image", encoded, encoded2)
    require_dependence("latents", decoded, decoded2)
    folder = OUT / "vae"
    save_model(model, folder, "diffusion_pytorch_model.safetensors")
    save_io(folder, {"image": image, "encoded": encoded, "latents": latents, "decoded": decoded})


def token_rows(seed, lengths, pad):
    """77-token rows: <bos>, `n` random ids, <eos>, then `pad`."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        body = torch.randint(0, BOS, (n,), generator=g).tolist()
        row = [BOS] + body + [EOS]
        rows.append(row + [pad] * (77 - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def clip_case(name, seed, cls, config, pad, lengths):
    print(name)
    torch.manual_seed(seed)
    model = init_weights(cls(config), seed)
    ids = token_rows(seed + 100, lengths, pad)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        changed = ids.clone()
        changed[:, 1] = (changed[:, 1] + 1) % BOS  # one token different
        other = model(input_ids=changed, output_hidden_states=True)
    io = {
        "input_ids": ids.float(),
        "last_hidden_state": out.last_hidden_state,
        "penultimate": out.hidden_states[-2],
    }
    print(f"  hidden scale {out.last_hidden_state.abs().max():.3g}")
    require_dependence("a token", out.last_hidden_state, other.last_hidden_state)
    if hasattr(out, "text_embeds") and out.text_embeds is not None:
        io["text_embeds"] = out.text_embeds
        require_dependence("a token (pooled)", out.text_embeds, other.text_embeds)
        # transformers pools at the first <eos> (eos_token_id != 2): check against that.
        first = (ids == EOS).int().argmax(-1)
        # (`last_hidden_state` is already after the final layer norm.)
        expect = model.text_projection(out.last_hidden_state[torch.arange(len(lengths)), first])
        assert torch.allclose(expect, out.text_embeds, atol=1e-5), "pooling is not at the first eos"
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    # Every released SD text encoder stores transformers 4's names (`text_model.embeddings.…`,
    # `text_model.encoder.layers.N.…`, `text_projection.weight`). transformers 5's
    # `CLIPTextModel.state_dict()` / `save_pretrained` drops the `text_model.` prefix (its
    # `CLIPTextModelWithProjection` keeps it); write the released layout, which transformers 5
    # still loads (checked below).
    state = {}
    for k, v in model.state_dict().items():
        if not k.startswith(("text_model.", "text_projection.")):
            k = "text_model." + k
        state[k] = v.detach().contiguous().float()
    save_file(state, str(folder / "model.safetensors"))
    config_dict = config.to_dict()
    config_dict["architectures"] = [cls.__name__]
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    save_io(folder, io)
    reloaded = cls.from_pretrained(folder)
    reloaded.eval()
    again = reloaded(input_ids=ids, output_hidden_states=True)
    assert torch.equal(again.last_hidden_state, out.last_hidden_state), "saved names do not reload"


SD1_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 12),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    # diffusers' legacy name for the head *count* (SD 1.x's configs say 8 here).
    attention_head_dim=2,
    cross_attention_dim=32,
    norm_num_groups=4,
)

SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(4, 8),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(1, 2),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    cross_attention_dim=24,
    norm_num_groups=2,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    # pooled text embeds (12) + 6 time ids x addition_time_embed_dim
    projection_class_embeddings_input_dim=12 + 6 * 8,
)

# SD_PARITY_WIDE=1 writes (to the folder given as argument) UNets with diffusers' real
# norm_num_groups (32) and 32/64 channels instead: too large to commit, but a check that the
# UNets match when the group count is the default one.
if os.environ.get("SD_PARITY_WIDE"):
    SD1_UNET.update(block_out_channels=(32, 64), norm_num_groups=32)
    SDXL_UNET.update(block_out_channels=(32, 64), norm_num_groups=32)


def main():
    torch.set_grad_enabled(False)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    unet_case("unet_sd1", 1, SD1_UNET, sdxl=False)
    unet_case("unet_sdxl", 2, SDXL_UNET, sdxl=True)
    vae_case(3)

    common = dict(
        vocab_size=VOCAB,
        max_position_embeddings=77,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attention_dropout=0.0,
    )
    clip_case(
        "clip_l",
        4,
        CLIPTextModel,
        CLIPTextConfig(hidden_size=24, intermediate_size=48, num_attention_heads=3, hidden_act="quick_gelu",
                       pad_token_id=EOS, **common),
        pad=EOS,
        lengths=[9],
    )
    clip_case(
        "clip_g",
        5,
        CLIPTextModelWithProjection,
        CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, hidden_act="gelu",
                       projection_dim=8, pad_token_id=0, **common),
        pad=0,
        lengths=[9, 20],
    )

    (OUT / "cases.json").write_text(json.dumps({"timestep": TIMESTEP, "bos": BOS, "eos": EOS}, indent=2))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total {total / 1024:.1f} KiB in {OUT}")


if __name__ == "__main__":
    main()
