#!/usr/bin/env python3
"""Write the network-pickle fixtures for Studio's pickle reader, as NVIDIA's code pickles them.

NVIDIA's StyleGAN networks (``ffhq.pkl`` from stylegan2-ada-pytorch and stylegan3) are a
``pickle.dump`` of ``{"G": ..., "D": ..., "G_ema": ..., "training_set_kwargs": ...,
"augment_pipe": ...}`` whose networks are ``torch_utils.persistence`` objects. Such an object
pickles, through the decorator's ``__reduce__`` (reproduced below from NVIDIA's
``torch_utils/persistence.py``), as ``_reconstruct_persistent_obj(meta)`` with
``meta = {"type": "class", "version": 6, "module_src": <the class's source code>,
"class_name": ..., "state": <the object's __dict__>}``; its tensors are plain ``torch``
pickles (``_rebuild_parameter`` / ``_rebuild_tensor_v2`` over
``torch.storage._load_from_bytes(<PyTorch's legacy format>)``), its kwargs ``dnnlib.util.EasyDict``.
Python's ``pickle.load`` would *run* ``module_src``; Studio reads only the data.

This script needs no NVIDIA checkout: it writes stand-ins for ``torch_utils.persistence`` and
``dnnlib.util`` (the names the pickles refer to) into a temporary folder and builds the module
tree from a safetensors state dict. Files written:

* ``tests/fixtures/stylegan2/skip.pkl``: ``G_ema`` holding exactly the tensors of
  ``skip.safetensors`` (parameters, and the ``w_avg`` / ``resample_filter`` / ``noise_const``
  buffers), with ``_init_kwargs`` from ``skip.json``. Its ``module_src`` would create
  ``/tmp/studio-pickle-canary-nvidia`` if Python ran it: the Rust tests check it never appears.
* ``tests/fixtures/pickles/stylegan3_r.pkl``: a tiny StyleGAN3-R-shaped ``G_ema``
  (``synthesis.input.*``, ``synthesis.L0_36_512.*``; kwargs with ``conv_kernel=1``,
  ``use_radial_filters=True``) whose source defines ``SynthesisInput``.
* ``tests/fixtures/pickles/tf_network.pkl``: a TensorFlow-era pickle: a tuple of
  ``dnnlib.tflib.network.Network`` objects whose state holds numpy arrays.
* ``tests/fixtures/lpips/vgg16_tiny.pth``: ``torch.save`` of ``vgg16_tiny.safetensors`` (as
  torchvision's ``vgg16-397923af.pth`` is saved).

    pip install torch numpy safetensors
    python3 tools/make_nvidia_pkl_fixtures.py

CI never runs this script: the fixtures are committed.
"""

import collections
import os
import pickle
import sys
import tempfile
import textwrap

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CANARY = "/tmp/studio-pickle-canary-nvidia"

PERSISTENCE = textwrap.dedent('''
    # Stand-in for NVIDIA's torch_utils/persistence.py: the same pickled form.
    _version = 6

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("fixture stand-in: Studio must never call this")

    class Persistent:
        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)
''')

DNNLIB_UTIL = textwrap.dedent('''
    class EasyDict(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name)
        def __setattr__(self, name, value):
            self[name] = value
''')

TFLIB_NETWORK = textwrap.dedent('''
    class Network:
        def __init__(self, state):
            self._state = state
        def __getstate__(self):
            return self._state
        def __setstate__(self, state):
            self._state = state
''')

# What Python would run on load: NVIDIA's networks module, with a line no reader may run.
MODULE_SRC = textwrap.dedent(f'''
    open({CANARY!r}, "w").write("this pickle's code ran")
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class Generator(torch.nn.Module):
        pass
''')

SG3_MODULE_SRC = textwrap.dedent(f'''
    open({CANARY!r}, "w").write("this pickle's code ran")
    class SynthesisInput(torch.nn.Module):
        pass
''')

BUFFERS = ("w_avg", "resample_filter", "noise_const")


def install_stand_ins(tmp):
    for rel, src in [
        ("torch_utils/__init__.py", ""),
        ("torch_utils/persistence.py", PERSISTENCE),
        ("dnnlib/__init__.py", ""),
        ("dnnlib/util.py", DNNLIB_UTIL),
        ("dnnlib/tflib/__init__.py", ""),
        ("dnnlib/tflib/network.py", TFLIB_NETWORK),
    ]:
        path = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(src)
    sys.path.insert(0, tmp)


def easydict(value):
    from dnnlib.util import EasyDict
    if isinstance(value, dict):
        return EasyDict({k: easydict(v) for k, v in value.items()})
    return value


def network(state, class_name, module_src, init_kwargs):
    """A persistent module tree holding `state` (a flat state dict)."""
    from torch_utils.persistence import Persistent

    class Module(Persistent, torch.nn.Module):
        pass

    Module.__module__ = "training.networks"
    Module.__qualname__ = class_name

    def make():
        m = Module()
        m._orig_module_src = module_src
        m._orig_class_name = class_name
        return m

    root = make()
    root._init_kwargs = easydict(init_kwargs)
    root._init_args = ()
    for kw in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"):
        if kw in init_kwargs:
            setattr(root, kw, init_kwargs[kw])
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if part not in m._modules:
                m.add_module(part, make())
            m = m._modules[part]
        if leaf in BUFFERS:
            m.register_buffer(leaf, tensor.clone())
        else:
            m.register_parameter(leaf, torch.nn.Parameter(tensor.clone()))
    # The orig attributes live in each object's __dict__, as NVIDIA's decorator puts them.
    return root


def dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    import json

    tmp = tempfile.mkdtemp()
    install_stand_ins(tmp)
    from dnnlib.util import EasyDict

    sg2 = os.path.join(ROOT, "tests/fixtures/stylegan2")
    state = load_file(os.path.join(sg2, "skip.safetensors"))
    with open(os.path.join(sg2, "skip.json")) as f:
        meta = json.load(f)
    g = network(state, "Generator", MODULE_SRC, meta["init_kwargs"])
    dump(
        {
            "G": g,
            "D": None,
            "G_ema": g,
            "training_set_kwargs": EasyDict(resolution=32, use_labels=False),
            "augment_pipe": None,
        },
        os.path.join(sg2, "skip.pkl"),
    )

    gen = torch.Generator().manual_seed(3)
    sg3_state = collections.OrderedDict(
        [
            ("mapping.fc0.weight", torch.randn(8, 8, generator=gen)),
            ("mapping.w_avg", torch.zeros(8)),
            ("synthesis.input.affine.weight", torch.randn(4, 8, generator=gen)),
            ("synthesis.input.freqs", torch.randn(8, 2, generator=gen)),
            ("synthesis.L0_36_512.weight", torch.randn(8, 8, 1, 1, generator=gen)),
        ]
    )
    sg3_kwargs = {
        "z_dim": 8, "c_dim": 0, "w_dim": 8, "img_resolution": 16, "img_channels": 3,
        "mapping_kwargs": {"num_layers": 1},
        "channel_base": 64, "channel_max": 8, "magnitude_ema_beta": 0.999,
        "conv_kernel": 1, "use_radial_filters": True,
    }
    g3 = network(sg3_state, "Generator", SG3_MODULE_SRC, sg3_kwargs)
    pickles = os.path.join(ROOT, "tests/fixtures/pickles")
    dump({"G": g3, "D": None, "G_ema": g3}, os.path.join(pickles, "stylegan3_r.pkl"))

    from dnnlib.tflib.network import Network

    def tf_net(name):
        return Network(
            {
                "version": 4,
                "name": name,
                "static_kwargs": {"resolution": 16},
                "build_module_src": MODULE_SRC,
                "build_func_name": f"{name}_main",
                "variables": [(f"{name}/Dense0/weight", np.ones((4, 4), np.float32))],
                "components": {},
            }
        )

    dump((tf_net("G"), tf_net("D"), tf_net("Gs")), os.path.join(pickles, "tf_network.pkl"))

    lpips = os.path.join(ROOT, "tests/fixtures/lpips")
    vgg = load_file(os.path.join(lpips, "vgg16_tiny.safetensors"))
    features = collections.OrderedDict(
        (k, v) for k, v in sorted(vgg.items()) if k.startswith("features.")
    )
    out = os.path.join(lpips, "vgg16_tiny.pth")
    torch.save(features, out)
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")
    assert not os.path.exists(CANARY), "the fixture's own code ran while writing it"


if __name__ == "__main__":
    main()
