"""Writes tests/fixtures/lora/: LoRA / LyCORIS files for the tiny SD 1.x UNet of
tests/fixtures/sd_parity/unet_sd1, and the UNet's output with each applied, from diffusers.

- `kohya.safetensors`: a kohya / SD web UI LoRA (`lora_unet_…` keys with `alpha`) on linear
  and 1×1 / 3×3 convolution modules (LoCon). Loaded by diffusers' own loader
  (`lora_state_dict`, which converts kohya keys, then `load_lora_adapter` and `fuse_lora` at
  the weight given), so the names and the `alpha / rank` scale are diffusers'.
- `peft.safetensors`: the same kind of change in diffusers' PEFT naming
  (`unet.<module>.lora_A.weight` / `lora_B.weight`).
- `lycoris.safetensors`: LoHa and LoKr modules, merged here by LyCORIS's formulas
  (`ΔW = alpha/rank · (w1a·w1b) ⊙ (w2a·w2b)` and `ΔW = kron(w1, w2)`).

`io.safetensors` holds the UNet's output for the parity fixture's inputs with each file.
Run with PyTorch, diffusers and peft installed: `python tools/make_lora_fixture.py`.
"""

import json
import pathlib

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

root = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures"
src = root / "sd_parity/unet_sd1"
out_dir = root / "lora"
out_dir.mkdir(exist_ok=True)
io = load_file(str(src / "io.safetensors"))
cases = json.loads((root / "sd_parity/cases.json").read_text())
timestep = cases["timestep"]


def fresh_unet():
    unet = UNet2DConditionModel.from_pretrained(str(src)).eval()
    return unet


def run(unet):
    with torch.no_grad():
        return unet(io["sample"], timestep, encoder_hidden_states=io["context"]).sample


g = torch.Generator().manual_seed(7)


def rand(*shape, scale=0.3):
    return (torch.randn(*shape, generator=g) * scale).contiguous()


base = fresh_unet()
weights = dict(base.state_dict())
targets = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": None,
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": None,
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": None,
    "down_blocks.0.attentions.0.proj_in": None,
    "mid_block.resnets.0.conv1": None,
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": None,
}
rank = 2
kohya = {}
for module in targets:
    w = weights[module + ".weight"]
    key = "lora_unet_" + module.replace(".", "_")
    if w.dim() == 4:
        out_c, in_c, kh, kw = w.shape
        kohya[key + ".lora_down.weight"] = rand(rank, in_c, kh, kw)
        kohya[key + ".lora_up.weight"] = rand(out_c, rank, 1, 1)
    else:
        out_c, in_c = w.shape
        kohya[key + ".lora_down.weight"] = rand(rank, in_c)
        kohya[key + ".lora_up.weight"] = rand(out_c, rank)
    kohya[key + ".alpha"] = torch.tensor(1.0)
# A key for a module this UNet does not have (an SDXL name): ignored.
kohya["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"] = rand(rank, 8)
kohya["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"] = rand(8, rank)
save_file(kohya, str(out_dir / "kohya.safetensors"))

weight = 0.8
state_dict, alphas = StableDiffusionPipeline.lora_state_dict(
    {k: v for k, v in kohya.items() if "input_blocks" not in k}
)
unet = fresh_unet()
unet.load_lora_adapter(state_dict, prefix="unet", network_alphas=alphas, adapter_name="k")
unet.fuse_lora(lora_scale=weight, adapter_names=["k"])
out_kohya = run(unet)

# PEFT naming: lora_A (down), lora_B (up), no alpha (scale 1).
peft = {}
for module in list(targets)[:3]:
    w = weights[module + ".weight"]
    out_c, in_c = w.shape
    peft[f"unet.{module}.lora_A.weight"] = rand(rank, in_c)
    peft[f"unet.{module}.lora_B.weight"] = rand(out_c, rank)
save_file(peft, str(out_dir / "peft.safetensors"))
unet = fresh_unet()
unet.load_lora_adapter(peft, prefix="unet", adapter_name="p")
unet.fuse_lora(lora_scale=1.0, adapter_names=["p"])
out_peft = run(unet)

# LyCORIS: LoHa on a linear layer, LoKr on another, merged by their formulas.
lyco = {}
merged = dict(weights)
m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
out_c, in_c = weights[m + ".weight"].shape
key = "lora_unet_" + m.replace(".", "_")
w1a, w1b, w2a, w2b = rand(out_c, rank), rand(rank, in_c), rand(out_c, rank), rand(rank, in_c)
lyco.update({key + ".hada_w1_a": w1a, key + ".hada_w1_b": w1b, key + ".hada_w2_a": w2a,
             key + ".hada_w2_b": w2b, key + ".alpha": torch.tensor(4.0)})
merged[m + ".weight"] = merged[m + ".weight"] + (4.0 / rank) * (w1a @ w1b) * (w2a @ w2b)
m = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
out_c, in_c = weights[m + ".weight"].shape
key = "lora_unet_" + m.replace(".", "_")
w1 = rand(2, 4)
w2 = rand(out_c // 2, in_c // 4)
lyco.update({key + ".lokr_w1": w1, key + ".lokr_w2": w2})
merged[m + ".weight"] = merged[m + ".weight"] + torch.kron(w1, w2)
save_file(lyco, str(out_dir / "lycoris.safetensors"))
unet = fresh_unet()
unet.load_state_dict(merged)
out_lyco = run(unet)

save_file(
    {
        "kohya_0.8": out_kohya.contiguous(),
        "peft": out_peft.contiguous(),
        "lycoris": out_lyco.contiguous(),
        "base": run(fresh_unet()).contiguous(),
    },
    str(out_dir / "io.safetensors"),
)
print("wrote", out_dir)
