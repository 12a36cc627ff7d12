#!/usr/bin/env python3
"""Generate the ControlNet parity fixture: tests/fixtures/controlnet/.

Tiny random-weight diffusers ``ControlNetModel``s built on the tiny UNets of the Stable
Diffusion parity fixture (``tests/fixtures/sd_parity/unet_sd1`` and ``unet_sdxl``), with a
control image and the reference outputs, so a test can run the same weights through Studio's
own ControlNet and UNet and compare:

* ``sd1/`` and ``sdxl/``: ``ControlNetModel.from_unet(unet,
  conditioning_embedding_out_channels=(4, 4, 8, 8))`` (three stride-2 convolutions in the
  conditioning embedding, so a 64x64 control image lands on the 8x8 latent), every parameter
  then re-drawn at random (diffusers starts the "zero convs" ``controlnet_down_blocks.*``,
  ``controlnet_mid_block`` and ``controlnet_cond_embedding.conv_out`` at zero, which would make
  the residuals vanish and the test prove nothing), saved with diffusers' ``save_pretrained``
  (``config.json`` + ``diffusion_pytorch_model.safetensors``).
  ``io.safetensors`` holds:

  - ``cond``: the control image, (2, 3, 64, 64) in [0, 1] (a different image per batch row);
  - ``down.N`` / ``mid``: the ControlNet's ``down_block_res_samples[N]`` /
    ``mid_block_res_sample`` for the UNet fixture's ``sample`` and ``context`` (SDXL: and its
    ``text_embeds`` / ``time_ids`` as ``added_cond_kwargs``) at the timestep of
    ``sd_parity/cases.json`` with ``conditioning_scale = 0.7``;
  - ``guess_down.N`` / ``guess_mid``: the same with ``guess_mode=True`` (residual N scaled by
    ``logspace(-1, 0, len(down) + 1)[N] * 0.7``, the mid one by ``0.7``);
  - ``unet_out``: the fixture UNet (its weights unchanged) run on the same inputs with
    ``down_block_additional_residuals = down.*`` and ``mid_block_additional_residual = mid``;
  - ``guess_unet_out``: the same with the guess-mode residuals.

  The inputs themselves are not repeated: they are ``sd_parity/unet_*/io.safetensors``'s.

* ``control_sd1_original.safetensors``: the ``sd1`` ControlNet's weights (bit for bit) under the
  ORIGINAL names of lllyasviel's ControlNet / the SD web UI (``control_model.input_blocks.…``,
  ``control_model.input_hint_block.N``, ``control_model.zero_convs.N.0``,
  ``control_model.middle_block_out.0``, …), the format of the released single-file
  ``control_*.safetensors``. Written by inverting diffusers' own converter
  (``diffusers.loaders.single_file_utils.convert_controlnet_checkpoint``), then checked by
  running that converter on the file's state dict: it must give back every diffusers tensor
  exactly, with no key missing or extra (and diffusers' ``ControlNetModel.from_single_file``
  loads it to the same outputs).

Weights: the recipe of ``make_sd_parity_fixture.py`` (every matrix / conv kernel
~ N(0, (1.5 / sqrt(fan_in))^2), biases ~ N(0, 0.1^2), norm scales 1 + N(0, 0.1^2), norm shifts
N(0, 0.1^2)), seeded with ``torch.Generator``. Everything is float32; the whole folder is a few
hundred KiB (it is committed). The script checks that the outputs are finite, depend on the
control image, differ between the batch rows, and that the residuals change the UNet's output.

Run with PyTorch, diffusers and safetensors installed (CI never runs Python):

    python tools/make_controlnet_fixture.py [OUT]

Tested with diffusers 0.42.1, torch 2.15 (CPU).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "tests/fixtures/sd_parity"
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/controlnet"

TIMESTEP = json.loads((PARITY / "cases.json").read_text())["timestep"]
CONDITIONING_SCALE = 0.7
COND_EMBED_CHANNELS = (4, 4, 8, 8)
COND_SIZE = 64
ORIGINAL_PREFIX = "control_model."

# The parity fixture's weight recipe and dependence checks, shared.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd_parity_fixture import init_weights, rel_change, require_dependence  # noqa: E402


def require_finite(what, t):
    if not torch.isfinite(t).all():
        raise SystemExit(f"{what} is not finite")


# --- diffusers -> original (lllyasviel ControlNet / SD web UI) names -------------------------

# ResnetBlock2D names -> ldm ResBlock names (the inverse of update_unet_resnet_ldm_to_diffusers).
RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def resnet_to_ldm(rest):
    head, _, tail = rest.partition(".")
    return f"{RESNET_TO_LDM[head]}.{tail}"


def diffusers_to_original(state, layers_per_block, n_cond_blocks):
    """Rename a diffusers ControlNetModel state dict to the original ControlNet layout.

    Mirrors diffusers' convert_controlnet_checkpoint (see ORIGINAL_MAPPING for the table).
    """
    out = {}
    per_level = layers_per_block + 1  # resnets (+ attentions) then the downsampler
    for key, value in state.items():
        parts = key.split(".")
        new = None
        if parts[0] == "time_embedding":  # linear_1 / linear_2 -> time_embed.0 / .2
            new = f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[parts[1]] }.{parts[2]}"
        elif parts[0] == "add_embedding":  # SDXL only: label_emb.0.0 / .2
            new = f"label_emb.0.{ {'linear_1': 0, 'linear_2': 2}[parts[1]] }.{parts[2]}"
        elif parts[0] == "conv_in":
            new = f"input_blocks.0.0.{parts[1]}"
        elif parts[0] == "controlnet_cond_embedding":
            if parts[1] == "conv_in":
                new = f"input_hint_block.0.{parts[2]}"
            elif parts[1] == "conv_out":
                # diffusers hard-codes 14 here (the 4-entry embedding of every released model:
                # conv, SiLU, 3 x (conv, SiLU, conv stride 2, SiLU), conv).
                assert n_cond_blocks == 6, "input_hint_block.14 assumes 4 embedding widths"
                new = f"input_hint_block.14.{parts[2]}"
            else:  # blocks.k: every other entry of the Sequential (SiLUs in between)
                new = f"input_hint_block.{2 * int(parts[2]) + 2}.{parts[3]}"
        elif parts[0] == "down_blocks":
            level = int(parts[1])
            if parts[2] == "downsamplers":  # down_blocks.L.downsamplers.0.conv -> input_blocks.i.0.op
                i = 1 + level * per_level + layers_per_block
                new = f"input_blocks.{i}.0.op.{parts[-1]}"
            else:
                i = 1 + level * per_level + int(parts[3])
                rest = ".".join(parts[4:])
                if parts[2] == "resnets":
                    new = f"input_blocks.{i}.0.{resnet_to_ldm(rest)}"
                else:  # attentions: Transformer2DModel names are the same in ldm
                    new = f"input_blocks.{i}.1.{rest}"
        elif parts[0] == "controlnet_down_blocks":
            new = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            if parts[1] == "resnets":  # resnets.0 / .1 -> middle_block.0 / .2
                new = f"middle_block.{2 * int(parts[2])}.{resnet_to_ldm(rest)}"
            else:  # attentions.0 -> middle_block.1
                new = f"middle_block.{2 * int(parts[2]) + 1}.{rest}"
        elif parts[0] == "controlnet_mid_block":
            new = f"middle_block_out.0.{parts[1]}"
        if new is None:
            raise SystemExit(f"no original name for {key}")
        assert new not in out, new
        out[new] = value
    return {ORIGINAL_PREFIX + k: v for k, v in out.items()}


# Printed in the summary: original prefix -> diffusers prefix (N: index, i: input block).
ORIGINAL_MAPPING = [
    ("time_embed.0 / time_embed.2", "time_embedding.linear_1 / linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("input_hint_block.0", "controlnet_cond_embedding.conv_in"),
    ("input_hint_block.{2k+2} (k = 0..5)", "controlnet_cond_embedding.blocks.k"),
    ("input_hint_block.14", "controlnet_cond_embedding.conv_out"),
    ("input_blocks.i.0.{in_layers.0,in_layers.2,emb_layers.1,out_layers.0,out_layers.3,skip_connection}",
     "down_blocks.L.resnets.j.{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}"
     "   (i = 1 + L*(layers_per_block+1) + j)"),
    ("input_blocks.i.1.*", "down_blocks.L.attentions.j.* (same inner names)"),
    ("input_blocks.i.0.op", "down_blocks.L.downsamplers.0.conv   (i = 1 + L*(lpb+1) + lpb)"),
    ("zero_convs.N.0", "controlnet_down_blocks.N"),
    ("middle_block.0 / middle_block.2", "mid_block.resnets.0 / resnets.1 (resnet renames as above)"),
    ("middle_block.1.*", "mid_block.attentions.0.*"),
    ("middle_block_out.0", "controlnet_mid_block"),
    ("label_emb.0.0 / label_emb.0.2 (SDXL)", "add_embedding.linear_1 / linear_2"),
]


def write_original(cn, folder_out, io_ref, unet_io, added):
    """control_sd1_original.safetensors, verified with diffusers' own converter."""
    state = {k: v.detach().contiguous().float() for k, v in cn.state_dict().items()}
    n_cond_blocks = len(cn.controlnet_cond_embedding.blocks)
    original = diffusers_to_original(state, cn.config.layers_per_block, n_cond_blocks)
    path = folder_out / "control_sd1_original.safetensors"
    save_file(original, str(path))

    # 1. diffusers' converter on the file's state dict gives back every tensor exactly.
    reread = load_file(str(path))
    converted = convert_controlnet_checkpoint(reread, dict(cn.config))
    missing = sorted(set(state) - set(converted))
    extra = sorted(set(converted) - set(state))
    if missing or extra:
        raise SystemExit(f"converter round trip: missing {missing}, extra {extra}")
    for k, v in state.items():
        c = converted[k]
        if c is None or c.shape != v.shape or not torch.equal(c, v):
            raise SystemExit(f"converter round trip: {k} differs")
    print(f"  original names: {len(original)} tensors; convert_controlnet_checkpoint gives back "
          f"all {len(state)} diffusers tensors exactly")

    # 2. The whole single-file path (model-type detection, conversion, loading) gives the same
    #    outputs; the config comes from the diffusers folder (there is no network here).
    try:
        single = ControlNetModel.from_single_file(str(path), config=str(folder_out / "sd1"),
                                                  local_files_only=True).eval()
    except Exception as e:  # noqa: BLE001 - informative only: step 1 is the check
        print(f"  (from_single_file not checked: {type(e).__name__}: {e})")
        return
    with torch.no_grad():
        res = single(unet_io["sample"], TIMESTEP, encoder_hidden_states=unet_io["context"],
                     controlnet_cond=io_ref["cond"], conditioning_scale=CONDITIONING_SCALE,
                     added_cond_kwargs=added, return_dict=False)
    for n, d in enumerate(res[0]):
        assert torch.equal(d, io_ref[f"down.{n}"]), f"from_single_file down.{n}"
    assert torch.equal(res[1], io_ref["mid"]), "from_single_file mid"
    print("  ControlNetModel.from_single_file(original file) reproduces down.* / mid exactly")


def controlnet_case(name, seed, sdxl):
    print(name)
    src = PARITY / ("unet_sdxl" if sdxl else "unet_sd1")
    unet = UNet2DConditionModel.from_pretrained(str(src)).eval()
    unet_io = load_file(str(src / "io.safetensors"))
    sample, context = unet_io["sample"], unet_io["context"]
    added = None
    if sdxl:
        added = {"text_embeds": unet_io["text_embeds"], "time_ids": unet_io["time_ids"]}

    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_EMBED_CHANNELS)
    zero_at_start = sorted(k for k, v in cn.state_dict().items() if not v.abs().max() > 0)
    print(f"  {len(zero_at_start)} all-zero tensors from from_unet (the zero convs), re-drawn")
    init_weights(cn, seed)
    for k, v in cn.state_dict().items():
        assert v.abs().max() > 0, f"{k} is still zero"
    folder = OUT / name
    cn.save_pretrained(str(folder), safe_serialization=True)

    # The saved folder must be what is run below.
    cn = ControlNetModel.from_pretrained(str(folder)).eval()
    for k, v in init_weights(ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=COND_EMBED_CHANNELS), seed).state_dict().items():
        assert torch.equal(cn.state_dict()[k], v), f"saved {k} differs"

    g = torch.Generator().manual_seed(seed + 100)
    batch = sample.shape[0]
    cond = torch.rand((batch, 3, COND_SIZE, COND_SIZE), generator=g)

    def control(c, guess=False, t=TIMESTEP, ctx=context):
        with torch.no_grad():
            down, mid = cn(sample, t, encoder_hidden_states=ctx, controlnet_cond=c,
                           conditioning_scale=CONDITIONING_SCALE, guess_mode=guess,
                           added_cond_kwargs=added, return_dict=False)
        return list(down), mid

    def run_unet(down=None, mid=None):
        with torch.no_grad():
            return unet(sample, TIMESTEP, encoder_hidden_states=context, added_cond_kwargs=added,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    down, mid = control(cond)
    guess_down, guess_mid = control(cond, guess=True)
    unet_out = run_unet(down, mid)
    guess_unet_out = run_unet(guess_down, guess_mid)
    plain = run_unet()
    assert torch.allclose(plain, unet_io["out"], atol=1e-5), "UNet fixture does not reproduce"

    io = {"cond": cond}
    for n, (d, gd) in enumerate(zip(down, guess_down)):
        io[f"down.{n}"] = d
        io[f"guess_down.{n}"] = gd
    io["mid"] = mid
    io["guess_mid"] = guess_mid
    io["unet_out"] = unet_out
    io["guess_unet_out"] = guess_unet_out
    for k, v in io.items():
        require_finite(k, v)
    print(f"  {len(down)} down residuals {[tuple(d.shape[1:]) for d in down]}, mid {tuple(mid.shape[1:])}")
    print(f"  residual scales: down {[round(d.abs().max().item(), 3) for d in down]}, "
          f"mid {mid.abs().max().item():.3g}")
    # guess mode = the plain residuals times logspace(-1, 0, n + 1) (mid: times 1).
    scales = torch.logspace(-1, 0, len(down) + 1)
    for n in range(len(down)):
        assert torch.allclose(guess_down[n], down[n] * scales[n], rtol=1e-5, atol=1e-6)
    assert torch.allclose(guess_mid, mid, rtol=1e-6, atol=1e-7)
    require_dependence("unet_out vs no residuals", unet_out, plain)
    require_dependence("guess_unet_out vs unet_out", unet_out, guess_unet_out)
    other_down, other_mid = control(1.0 - cond)
    require_dependence("cond (down.0)", down[0], other_down[0])
    require_dependence("cond (mid)", mid, other_mid)
    require_dependence("context (mid)", mid, control(cond, ctx=-context)[1])
    require_dependence("timestep (mid)", mid, control(cond, t=900.0)[1])
    require_dependence("batch rows (mid)", mid[0], mid[1])
    if sdxl:
        a = {"text_embeds": -added["text_embeds"], "time_ids": added["time_ids"]}
        with torch.no_grad():
            m2 = cn(sample, TIMESTEP, encoder_hidden_states=context, controlnet_cond=cond,
                    conditioning_scale=CONDITIONING_SCALE, added_cond_kwargs=a, return_dict=False)[1]
        require_dependence("text_embeds (mid)", mid, m2)
    save_file({k: v.detach().contiguous().float() for k, v in io.items()}, str(folder / "io.safetensors"))
    return cn, io, unet_io, added


def main():
    torch.set_grad_enabled(False)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    cn1, io1, unet_io1, _ = controlnet_case("sd1", 21, sdxl=False)
    controlnet_case("sdxl", 22, sdxl=True)
    print("control_sd1_original.safetensors")
    write_original(cn1, OUT, io1, unet_io1, None)

    print("summary")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            p.chmod(0o644)  # safetensors writes 0600
            print(f"  {p.relative_to(OUT)}: {p.stat().st_size} bytes")
    for name in ("sd1", "sdxl"):
        io = load_file(str(OUT / name / "io.safetensors"))
        print(f"  {name}/io.safetensors: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in io.items()))
    print("  original -> diffusers names:")
    for a, b in ORIGINAL_MAPPING:
        print(f"    {ORIGINAL_PREFIX}{a} -> {b}")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total {total / 1024:.1f} KiB in {OUT}")


if __name__ == "__main__":
    main()
