#!/usr/bin/env python3
"""Generate the single-file (LDM naming) conversion fixture: tests/fixtures/ldm/mapping.json.

For a few tiny, randomly configured diffusers / transformers models this records, per
component of a Stable Diffusion single-file checkpoint:

* ``prefix``: the component's prefix in the single file (``model.diffusion_model.``,
  ``first_stage_model.``, ``cond_stage_model.…``, ``conditioner.embedders.N.…``);
* ``ldm``: every tensor name of the original (LDM / OpenCLIP) checkpoint, without that prefix,
  and its shape;
* ``diffusers``: every diffusers / transformers name the component's model expects, as
  ``[shape, source]``, where the source says where diffusers' own converter (``diffusers.loaders.single_file_utils``:
  ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
  ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) takes it from:
  ``["tensor", ldm]``, ``["chunk", ldm, index, parts]`` (rows of a fused q/k/v),
  ``["transposed", ldm]`` or ``["squeezed", ldm]`` (a 1x1 conv weight used as a linear one).
  The VAE's naming does not depend on the checkpoint kind, so SDXL has no VAE entry of its own.

How the reference is obtained: the LDM-named state dict is built here by renaming the tiny
model's diffusers names the other way (the inverse of the converter, written for this script),
with every tensor filled with a unique tag (``tag * 2**20 + arange``, float64). diffusers'
converter is then run on it, and

1. its output must hold exactly the names and shapes of the model's ``state_dict()`` (so the
   hand-built LDM layout is the one diffusers expects: a wrong or missing LDM name fails here);
2. the source of each output tensor is read back from the tags (which tensor, which rows,
   transposed or squeezed), so the recorded mapping is diffusers' own, not this script's.

Only names and shapes are written (no weights). Run with the fixture venv:

    /tmp/fxenv/bin/python tools/make_ldm_fixture.py [OUT]

Tested with diffusers 0.42.1, transformers 5.24.0, torch 2.15.
"""

import json
import re
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TAG = 2**20

# ---------------------------------------------------------------------------------------------
# Inverse renaming (diffusers name -> LDM name), used only to build the input of the converter.

RESNET_UNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_to_ldm(name, cfg):
    lpb = cfg["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    for d, l in UNET_TOP.items():
        if name.startswith(d + "."):
            return l + name[len(d):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", name)
    if m:
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            base = 1 + b * (lpb + 1)
            if kind == "resnets":
                return f"input_blocks.{base + j}.0.{resnet_rest(rest)}"
            if kind == "attentions":
                return f"input_blocks.{base + j}.1.{rest}"
            return f"input_blocks.{base + lpb}.0.op.{rest.removeprefix('conv.')}"
        base = b * (lpb + 1)
        if kind == "resnets":
            return f"output_blocks.{base + j}.0.{resnet_rest(rest)}"
        if kind == "attentions":
            return f"output_blocks.{base + j}.1.{rest}"
        slot = 2 if up_has_attn[b] else 1
        return f"output_blocks.{base + lpb}.{slot}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"middle_block.{2 * j}.{resnet_rest(rest)}"
        return f"middle_block.1.{rest}"
    raise ValueError(f"unet name not handled: {name}")


def resnet_rest(rest):
    for d, l in RESNET_UNET:
        if rest.startswith(d + "."):
            return l + rest[len(d):]
    raise ValueError(rest)


VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def vae_to_ldm(name, n_levels):
    """Returns (ldm name, needs 1x1 unsqueeze)."""
    for d, l in [("conv_norm_out", "norm_out")]:
        for side in ("encoder", "decoder"):
            if name.startswith(f"{side}.{d}."):
                return f"{side}.{l}" + name[len(side) + 1 + len(d):], False
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", name)
    if m:
        side, ud, b, kind, j, rest = m.groups()
        b, j = int(b), int(j)
        level = b if ud == "down" else n_levels - 1 - b
        if kind == "resnets":
            return f"{side}.{ud}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}", False
        return f"{side}.{ud}.{level}.{'downsample' if ud == 'down' else 'upsample'}.{rest}", False
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        side, kind, j, rest = m.groups()
        if kind == "resnets":
            return f"{side}.mid.block_{int(j) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}", False
        for d, l in VAE_ATTN:
            if rest.startswith(d + "."):
                return f"{side}.mid.attn_1.{l}{rest[len(d):]}", rest.endswith("weight") and d != "group_norm"
    return name, False  # conv_in, conv_out, quant_conv, post_quant_conv


OPENCLIP = [
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
]


def openclip_ldm(diff_sd, prefix, with_projection):
    """Builds OpenCLIP names/shapes (fused in_proj) from a CLIPTextModel state dict."""
    out = {}
    top = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    hidden = None
    for name, shape in diff_sd.items():
        if name in top:
            out[prefix + top[name]] = list(shape)
            continue
        if name == "text_projection.weight":
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", name)
        if m:
            i, qkv, wb = m.groups()
            hidden = shape[-1]
            if qkv == "q":
                fused = [3 * shape[0]] + list(shape[1:])
                out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{wb}"] = fused
            continue
        l = name
        for d, o in OPENCLIP:
            l = l.replace(d, o)
        if l == name:
            raise ValueError(name)
        out[prefix + l] = list(shape)
    if with_projection:
        out[prefix + "text_projection"] = [hidden, hidden]
    return out


# ---------------------------------------------------------------------------------------------


def tagged(ldm_shapes):
    sd = {}
    tags = {}
    for i, (name, shape) in enumerate(sorted(ldm_shapes.items())):
        n = 1
        for s in shape:
            n *= s
        assert n < TAG
        sd[name] = (torch.arange(n, dtype=torch.float64) + (i + 1) * TAG).reshape(shape)
        tags[i + 1] = name
    return sd, tags


def source_of(t, sd, tags):
    first = int(t.flatten()[0].item())
    name = tags[first // TAG]
    src = sd[name]
    if t.shape == src.shape and torch.equal(t, src):
        return ["tensor", name]
    if t.dim() == 2 and src.dim() == 2 and t.shape == src.T.shape and torch.equal(t, src.T):
        return ["transposed", name]
    if src.dim() > t.dim() and t.numel() == src.numel() and torch.equal(t.flatten(), src.flatten()):
        return ["squeezed", name]
    rows = t.shape[0]
    assert src.shape[1:] == t.shape[1:] and src.shape[0] % rows == 0, name
    row_numel = t.numel() // rows
    start = (first % TAG) // row_numel
    index, parts = start // rows, src.shape[0] // rows
    assert torch.equal(t, src[index * rows : (index + 1) * rows]), name
    return ["chunk", name, index, parts]


def record(kind, component, ldm_shapes, expected, convert, prefix):
    """Runs diffusers' converter on a tagged LDM state dict; checks and records its output.
    LDM names are written without the component's `prefix` (kept once, to keep the file small)."""
    sd, tags = tagged(ldm_shapes)
    out = convert(dict(sd))
    out = {k: v for k, v in out.items() if v is not None}
    got = {k: list(v.shape) for k, v in out.items()}
    exp = {k: list(v) for k, v in expected.items()}
    if got != exp:
        missing = sorted(set(exp) - set(got))[:10]
        extra = sorted(set(got) - set(exp))[:10]
        bad = sorted(k for k in set(got) & set(exp) if got[k] != exp[k])[:10]
        raise SystemExit(f"{kind} {component}: diffusers' conversion does not give the model's names: "
                         f"missing {missing}, extra {extra}, shape {bad}")
    def short(source):
        assert source[1].startswith(prefix)
        return [source[0], source[1][len(prefix):]] + source[2:]

    diffusers = {k: [exp[k], short(source_of(out[k], sd, tags))] for k in sorted(out)}
    return {
        "kind": kind,
        "component": component,
        "prefix": prefix,
        "ldm": {k[len(prefix):]: list(v) for k, v in sorted(ldm_shapes.items())},
        "diffusers": diffusers,
    }


def unet_fixture(kind, model):
    cfg = dict(model.config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    ldm = {}
    for name, shape in shapes.items():
        ldm["model.diffusion_model." + unet_to_ldm(name, cfg)] = list(shape)
    return record(kind, "Unet", ldm, shapes, lambda sd: convert_ldm_unet_checkpoint(sd, cfg), "model.diffusion_model.")


def vae_fixture(kind, model):
    cfg = dict(model.config)
    n = len(cfg["down_block_types"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    ldm = {}
    for name, shape in shapes.items():
        l, unsq = vae_to_ldm(name, n)
        ldm["first_stage_model." + l] = list(shape) + ([1, 1] if unsq else [])
    return record(kind, "Vae", ldm, shapes, lambda sd: convert_ldm_vae_checkpoint(sd, cfg), "first_stage_model.")


def with_text_model(model):
    """transformers >= 5.6 flattens CLIPTextModel; diffusers' converter (and Studio) use
    the `text_model.` names."""
    sd = {k: v.shape for k, v in model.state_dict().items()}
    if hasattr(model, "text_model"):
        return sd
    return {"text_model." + k: v for k, v in sd.items()}


def clip_fixture(kind, component, model, prefix):
    shapes = with_text_model(model)
    ldm = {prefix + k: list(v) for k, v in shapes.items()}
    return record(kind, component, ldm, shapes, lambda sd: convert_ldm_clip_checkpoint(sd), prefix)


def open_clip_fixture(kind, component, model, prefix, projection_in_model):
    shapes = with_text_model(model)
    ldm = openclip_ldm(shapes, prefix, True)
    expected = dict(shapes)
    if not projection_in_model:
        # SD 2.x: the LDM file has text_projection; CLIPTextModel has none (diffusers drops it).
        expected.pop("text_projection.weight", None)
    return record(kind, component, ldm, expected, lambda sd: convert_open_clip_checkpoint(model, sd, prefix=prefix), prefix)


def clip_config(hidden, layers, heads):
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 5,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=99,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def main():
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests/fixtures/ldm"
    torch.manual_seed(0)
    fixtures = []

    # SD 1.x style: 2 levels, attention at level 0, layers_per_block 2, conv projections.
    unet1 = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae1 = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )
    fixtures.append(unet_fixture("Sd1", unet1))
    fixtures.append(vae_fixture("Sd1", vae1))
    fixtures.append(clip_fixture("Sd1", "TextEncoder", CLIPTextModel(clip_config(32, 2, 4)), "cond_stage_model.transformer."))

    # SD 2.x style inpainting: 3 levels, attention at levels 0-1, layers_per_block 1, linear
    # projections, per-level head dims, 9 input channels.
    unet2 = UNet2DConditionModel(
        sample_size=16,
        in_channels=9,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    vae2 = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    fixtures.append(unet_fixture("Sd2", unet2))
    fixtures.append(vae_fixture("Sd2", vae2))
    fixtures.append(
        open_clip_fixture("Sd2", "TextEncoder", CLIPTextModel(clip_config(24, 3, 4)), "cond_stage_model.model.", False)
    )

    # SDXL style: 3 levels, no attention at level 0, several transformer blocks, text_time.
    unetxl = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=32,
    )
    fixtures.append(unet_fixture("Sdxl", unetxl))
    fixtures.append(
        clip_fixture("Sdxl", "TextEncoder", CLIPTextModel(clip_config(32, 2, 4)), "conditioner.embedders.0.transformer.")
    )
    fixtures.append(
        open_clip_fixture(
            "Sdxl",
            "TextEncoder2",
            CLIPTextModelWithProjection(clip_config(32, 3, 4)),
            "conditioner.embedders.1.model.",
            True,
        )
    )

    import diffusers
    import transformers

    doc = {
        "generator": "tools/make_ldm_fixture.py",
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "fixtures": fixtures,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, separators=(",", ":"))
    (out_dir / "mapping.json").write_text(text + "\n")
    print(f"wrote {out_dir / 'mapping.json'}: {len(text)} bytes, {len(fixtures)} fixtures")
    for f in fixtures:
        ops = {}
        for d in f["diffusers"].values():
            ops[d[1][0]] = ops.get(d[1][0], 0) + 1
        print(f"  {f['kind']} {f['component']}: {len(f['ldm'])} ldm, {len(f['diffusers'])} diffusers, {ops}")


if __name__ == "__main__":
    main()
