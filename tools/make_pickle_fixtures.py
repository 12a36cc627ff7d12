#!/usr/bin/env python3
"""Write the PyTorch checkpoint fixtures for Studio's pickle reader (tests/fixtures/pickles/).

Checkpoints written by `torch.save` (the zip format every PyTorch since 1.6 writes), each with
a safetensors twin holding the same tensors (`safetensors.torch.save_file`), so the Rust tests
check that Studio reads them value for value:

* ``state_dict.pth``: float32 / float16 / bfloat16 / int64 / bool tensors, an `nn.Parameter`,
  a transposed (non-contiguous) view, two views sharing one storage at different offsets, a
  0-d tensor, an empty tensor, and a nested `OrderedDict`;
* ``sd_like.ckpt``: ``{"state_dict": {...}, "global_step": 10, "epoch": 1}`` as SD and Lightning
  checkpoints are saved;
* ``gpt2_pytorch_model.bin``: the GPT-2 parity fixture's weights (`tests/fixtures/gpt2-tiny`)
  saved with `torch.save`, as transformers' `pytorch_model.bin`;
* ``legacy.pth``: the pre-1.6 format (``_use_new_zipfile_serialization=False``): a view at an
  offset into a shared storage, float16, a transposed view.

Hostile files, each a zip archive whose ``data.pkl`` was written byte by byte: if Python's
pickle ran them, they would create ``/tmp/studio-pickle-canary-<name>``; Studio must refuse
each, or read it as inert data, and never create the file:

* ``hostile_reduce.pth``: ``posix.system("touch …")`` via GLOBAL + REDUCE as a state dict value;
* ``hostile_inst.pth``: the same through INST; ``hostile_obj.pth`` through OBJ;
* ``hostile_eval.pth``: ``builtins.eval`` via STACK_GLOBAL + REDUCE at the root;
* ``hostile_build.pth``: BUILD applied to a list;
* ``hostile_memo.pth``: LONG_BINGET of an index never stored (4 294 967 295);
* ``hostile_recursive.pth``: a dict that contains itself;
* ``hostile_storage.pth``: a tensor reading past the end of its storage;
* ``hostile_compressed.pth``: a deflated ``data.pkl`` (a zip bomb's shape).

    pip install torch safetensors
    python3 tools/make_pickle_fixtures.py [OUT_DIR]

CI never runs this script: the fixtures are committed.
"""

import collections
import os
import struct
import sys
import zipfile

import torch
from safetensors.torch import load_file, save_file


def canary(name: str) -> str:
    return f"/tmp/studio-pickle-canary-{name}"


def zip_with_pickle(path: str, pkl: bytes, storages=None, compress=False) -> None:
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", mode) as z:
        z.writestr("archive/data.pkl", pkl)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)


def short_str(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def dict_of(key: str, value: bytes) -> bytes:
    # {key: value}
    return b"\x80\x02}" + short_str(key) + value + b"s."


def system_call(name: str) -> bytes:
    return b"cposix\nsystem\n" + short_str(f"touch {canary(name)}") + b"\x85R"


def main() -> None:
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        repo_root, "tests", "fixtures", "pickles")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)

    base = torch.randn(6, 4)
    shared = torch.arange(10, dtype=torch.float32)
    sd = collections.OrderedDict()
    sd["linear.weight"] = torch.nn.Parameter(torch.randn(3, 5))
    sd["linear.bias"] = torch.randn(3)
    sd["half"] = torch.randn(2, 3).half()
    sd["bf16"] = torch.randn(4).bfloat16()
    sd["steps"] = torch.tensor([1, 2, 3], dtype=torch.int64)
    sd["mask"] = torch.tensor([True, False, True])
    sd["transposed"] = base.t()
    sd["view_a"] = shared[2:5]
    sd["view_b"] = shared[5:9]
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["block"] = collections.OrderedDict(conv=torch.randn(2, 1, 3, 3))
    torch.save(sd, os.path.join(out, "state_dict.pth"))
    flat = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                flat[f"{k}.{k2}"] = v2.detach().contiguous().clone()
        else:
            flat[k] = v.detach().contiguous().clone()
    save_file(flat, os.path.join(out, "state_dict.safetensors"))

    inner = {"model.diffusion_model.out.weight": torch.randn(4, 8),
             "first_stage_model.decoder.conv_in.bias": torch.randn(8).half()}
    torch.save({"state_dict": inner, "global_step": 10, "epoch": 1},
               os.path.join(out, "sd_like.ckpt"))
    save_file({k: v.contiguous() for k, v in inner.items()},
              os.path.join(out, "sd_like.safetensors"))

    # The GPT-2 parity fixture's weights as transformers' `pytorch_model.bin` (for the window's
    # conversion offer).
    gpt2_dir = os.path.join(repo_root, "tests", "fixtures", "gpt2-tiny")
    torch.save(load_file(os.path.join(gpt2_dir, "model.safetensors")),
               os.path.join(out, "gpt2_pytorch_model.bin"))

    shared_legacy = torch.arange(10, dtype=torch.float32)
    legacy = {"w": torch.randn(2, 2), "v": shared_legacy[3:7], "h": torch.randn(3).half(),
              "t": torch.randn(3, 2).t()}
    torch.save(legacy, os.path.join(out, "legacy.pth"), _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous().clone() for k, v in legacy.items()},
              os.path.join(out, "legacy.safetensors"))

    zip_with_pickle(os.path.join(out, "hostile_reduce.pth"),
                    dict_of("weight", system_call("reduce")))
    zip_with_pickle(os.path.join(out, "hostile_inst.pth"),
                    b"\x80\x02}" + short_str("weight") + b"(" + short_str(
                        f"touch {canary('inst')}") + b"iposix\nsystem\ns.")
    zip_with_pickle(os.path.join(out, "hostile_obj.pth"),
                    b"\x80\x02}" + short_str("weight") + b"(cposix\nsystem\n" + short_str(
                        f"touch {canary('obj')}") + b"os.")
    zip_with_pickle(os.path.join(out, "hostile_eval.pth"),
                    b"\x80\x04" + short_str("builtins") + short_str("eval") + b"\x93"
                    + short_str(f"__import__('os').system('touch {canary('eval')}')")
                    + b"\x85R.")
    zip_with_pickle(os.path.join(out, "hostile_build.pth"),
                    b"\x80\x02}" + short_str("weight") + b"]" + system_call("build")
                    + b"bs.")
    zip_with_pickle(os.path.join(out, "hostile_memo.pth"),
                    b"\x80\x02}" + short_str("weight") + b"j\xff\xff\xff\xffs.")
    # d = {}; d["self"] = d
    zip_with_pickle(os.path.join(out, "hostile_recursive.pth"),
                    b"\x80\x02}q\x00" + short_str("self") + b"h\x00s.")
    # A float32 tensor of 100 elements over a storage of 4.
    storage_ref = (b"(" + short_str("storage") + b"ctorch\nFloatStorage\n" + short_str("0")
                   + short_str("cpu") + b"K\x04tQ")
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage_ref + b"K\x00K\x64\x85K\x01\x85"
              + b"\x89ccollections\nOrderedDict\n)Rtq\x01R")
    zip_with_pickle(os.path.join(out, "hostile_storage.pth"),
                    dict_of("weight", tensor), {"0": struct.pack("<4f", 1, 2, 3, 4)})
    zip_with_pickle(os.path.join(out, "hostile_compressed.pth"),
                    dict_of("weight", b"N") + b"\x00" * 100000, compress=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
