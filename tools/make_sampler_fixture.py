#!/usr/bin/env python3
"""Reference tables and trajectories for Studio's Stable Diffusion samplers.

Writes tests/fixtures/samplers/diffusers.json, which tests/tests/samplers.rs compares
`studio_inference::diffusion::samplers` against. CI never runs Python: the JSON is committed.

Run (CPU only; a venv with torch and diffusers):

    /tmp/fxenv/bin/python tools/make_sampler_fixture.py

Made with diffusers 0.42.1 and torch 2.x. Everything uses the Stable Diffusion 1.x noise
schedule (1000 steps, scaled_linear betas 0.00085..0.012).

The file holds:

* `tables`: each diffusers scheduler's `timesteps` (and `sigmas` where it has them) for a few
  step counts, keyed "<sampler>/<schedule>/<steps>".
* `trajectories`: a tiny denoising run through the diffusers scheduler's own step loop with
  an analytic "model" (defined in `model()` below and again in the Rust test):
  the model sees the UNet input u (= x_k / sqrt(sigma^2 + 1), which is also diffusers'
  variance-preserving sample for DDIM/DPM-Solver/UniPC/LCM) and the timestep t, and returns

      out_j = 0.8 * tanh(1.5 * u_j) + 0.2 * sin(0.37 * j + 0.004 * t)

  interpreted as epsilon (or v, for the v-prediction runs). `x_init` is the starting x in
  k-diffusion ("sigma") space; schedulers that work in VP space start from x_init / sqrt(1 +
  sigma_0^2). `model_t` records the timestep the model was called with at each step, `noise`
  the standard-normal noise fed to ancestral steps (Euler a, LCM) and `final` the last sample.

Where Studio deliberately follows k-diffusion / the SD web UI instead of a diffusers default,
the diffusers scheduler is configured (or its sigma table replaced) to match, and the comment
at that entry says so.
"""

import json
import math
import os

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import diffusers.schedulers.scheduling_lcm as lcm_module

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
N = 16
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "samplers", "diffusers.json")


def model(u: torch.Tensor, t: float) -> torch.Tensor:
    j = torch.arange(N, dtype=torch.float64)
    return 0.8 * torch.tanh(1.5 * u) + 0.2 * torch.sin(0.37 * j + 0.004 * float(t))


def unit_x() -> torch.Tensor:
    # Shaped (batch, channels) because UniPC's einsum wants a batch dimension.
    j = torch.arange(N, dtype=torch.float64)
    return (1.1 * torch.sin(2.3 * j + 0.5)).reshape(1, N)


def floats(t) -> list:
    if hasattr(t, "reshape"):
        t = t.reshape(-1).tolist()
    return [float(v) for v in t]


def log_sigmas(sched) -> np.ndarray:
    ac = sched.alphas_cumprod.numpy()
    return np.log(((1 - ac) / ac) ** 0.5)


class NoiseFeed:
    """Replaces diffusers' randn_tensor so ancestral steps use noise we record."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        self.drawn.append(noise.clone())
        return noise.to(dtype) if dtype is not None else noise


def run_k_space(sched, name: str, prediction: str, model_ts=None, noise_seed=None) -> dict:
    """Euler-type schedulers: the sample is x_k; the model input is scale_model_input(x_k)."""
    sigmas = sched.sigmas
    x = unit_x() * float(sigmas[0])
    x_init = x.clone()
    feed = None
    if noise_seed is not None:
        feed = NoiseFeed(noise_seed)
        euler_a_module.randn_tensor = feed
    ts = []
    for i, t in enumerate(sched.timesteps):
        mt = float(t) if model_ts is None else model_ts[i]
        ts.append(mt)
        u = sched.scale_model_input(x, t)
        x = sched.step(model(u, mt), t, x).prev_sample
    entry = dict(name=name, prediction=prediction, start=0, x_init=floats(x_init), model_t=ts, final=floats(x))
    if feed is not None:
        # The last step goes to sigma 0, where diffusers draws noise but multiplies it by 0;
        # Studio does not draw it, so only the steps that use noise are recorded.
        entry["noise"] = [floats(n) for n in feed.drawn[: len(sched.timesteps) - 1]]
    return entry


def run_vp_space(sched, name: str, prediction: str, sigma0: float, model_ts=None, noise_seed=None, start=0) -> dict:
    """DDIM / DPM-Solver / UniPC / LCM: the sample is x_vp = x_k / sqrt(1 + sigma^2).

    `start` > 0 is an img2img-style run: it begins at step `start` (sigma0 must be that step's
    sigma) with `set_begin_index(start)`, so multistep history starts empty there."""
    if start > 0:
        sched.set_begin_index(start)
    x_init = unit_x() * sigma0
    x = x_init / math.sqrt(1.0 + sigma0 * sigma0)
    feed = None
    if noise_seed is not None:
        feed = NoiseFeed(noise_seed)
        lcm_module.randn_tensor = feed
    ts = []
    for i, t in enumerate(sched.timesteps):
        if i < start:
            continue
        mt = float(t) if model_ts is None else model_ts[i]
        ts.append(mt)
        u = sched.scale_model_input(x, t)
        x = sched.step(model(u, mt), t, x).prev_sample
    entry = dict(name=name, prediction=prediction, start=start, x_init=floats(x_init), model_t=ts, final=floats(x))
    if feed is not None:
        entry["noise"] = [floats(n) for n in feed.drawn]
    return entry


def sigma_of(sched, t: int) -> float:
    ac = float(sched.alphas_cumprod[int(t)])
    return math.sqrt((1 - ac) / ac)


def main() -> None:
    tables = {}
    trajectories = []

    def euler(**kw):
        return EulerDiscreteScheduler(**SD, timestep_spacing="linspace", **kw)

    # Euler / Euler a / DPM++ 2M share k-diffusion's sigma tables. diffusers' Euler with
    # timestep_spacing="linspace" is k-diffusion's get_sigmas for steps >= 2 (for 1 step
    # diffusers gives t = 0, k-diffusion t = 999; Studio follows k-diffusion).
    for schedule, kw in [("normal", {}), ("karras", dict(use_karras_sigmas=True)), ("exponential", dict(use_exponential_sigmas=True))]:
        for steps in (2, 4, 20, 30):
            s = euler(**kw)
            s.set_timesteps(steps)
            tables[f"euler/{schedule}/{steps}"] = dict(timesteps=floats(s.timesteps), sigmas=floats(s.sigmas))

    # DPM++ 2M Karras: diffusers rounds the karras timesteps; k-diffusion (and Studio) does not.
    for steps in (1, 4, 20, 30):
        s = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
        s.set_timesteps(steps)
        tables[f"dpmpp_2m/karras/{steps}"] = dict(timesteps=floats(s.timesteps), sigmas=floats(s.sigmas))

    # DDIM: the SD 1.x scheduler config (leading spacing, steps_offset=1, set_alpha_to_one=False).
    def ddim():
        return DDIMScheduler(**SD, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False)

    for steps in (1, 4, 20, 30, 50):
        s = ddim()
        s.set_timesteps(steps)
        tables[f"ddim/normal/{steps}"] = dict(timesteps=floats(s.timesteps))

    # UniPC: UniPCMultistepScheduler defaults (order 2, bh2, predict_x0, linspace spacing).
    def unipc(**kw):
        return UniPCMultistepScheduler(**SD, **kw)

    for schedule, kw in [("normal", {}), ("karras", dict(use_karras_sigmas=True)), ("exponential", dict(use_exponential_sigmas=True))]:
        for steps in (1, 4, 20, 30):
            s = unipc(**kw)
            s.set_timesteps(steps)
            tables[f"unipc/{schedule}/{steps}"] = dict(timesteps=floats(s.timesteps), sigmas=floats(s.sigmas))

    # LCM: LCMScheduler defaults (original_inference_steps=50).
    for steps in (1, 2, 4, 8, 50):
        s = LCMScheduler(**SD)
        s.set_timesteps(steps)
        tables[f"lcm/normal/{steps}"] = dict(timesteps=floats(s.timesteps))

    # ---- trajectories ----
    for steps in (4, 20):
        for schedule, kw in [("normal", {}), ("karras", dict(use_karras_sigmas=True)), ("exponential", dict(use_exponential_sigmas=True))]:
            s = euler(**kw)
            s.set_timesteps(steps)
            trajectories.append(run_k_space(s, f"euler/{schedule}/{steps}", "epsilon"))
    s = euler(prediction_type="v_prediction")
    s.set_timesteps(20)
    trajectories.append(run_k_space(s, "euler/normal/20", "v_prediction"))

    for steps in (4, 20):
        s = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace")
        s.set_timesteps(steps)
        trajectories.append(run_k_space(s, f"euler_a/normal/{steps}", "epsilon", noise_seed=1234 + steps))

    for steps in (4, 20):
        s = ddim()
        s.set_timesteps(steps)
        trajectories.append(run_vp_space(s, f"ddim/normal/{steps}", "epsilon", sigma_of(s, s.timesteps[0])))
    s = DDIMScheduler(**SD, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="v_prediction")
    s.set_timesteps(20)
    trajectories.append(run_vp_space(s, "ddim/normal/20", "v_prediction", sigma_of(s, s.timesteps[0])))

    # DPM++ 2M: the solver math is diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2,
    # midpoint, lower_order_final, final sigma 0); the sigma table is replaced by k-diffusion's
    # (diffusers' Euler linspace table) so the run is k-diffusion's sample_dpmpp_2m. For Karras,
    # diffusers' own karras sigmas are used but the model is called at the unrounded timestep,
    # as k-diffusion does.
    for steps in (4, 20):
        e = euler()
        e.set_timesteps(steps)
        s = DPMSolverMultistepScheduler(**SD)
        s.set_timesteps(steps)
        s.sigmas = e.sigmas.clone()
        s.timesteps = e.timesteps.clone()
        s.set_begin_index(0)
        trajectories.append(run_vp_space(s, f"dpmpp_2m/normal/{steps}", "epsilon", float(e.sigmas[0]), model_ts=floats(e.timesteps)))

        s = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
        s.set_timesteps(steps)
        s.set_begin_index(0)
        ls = log_sigmas(s)
        mts = [float(s._sigma_to_t(np.array(float(sig)), ls)) for sig in s.sigmas[:-1]]
        trajectories.append(run_vp_space(s, f"dpmpp_2m/karras/{steps}", "epsilon", float(s.sigmas[0]), model_ts=mts))

    # img2img-style: 20 steps at strength 0.6 start at step 20 - int(0.6 * 20) = 8.
    e = euler()
    e.set_timesteps(20)
    s = DPMSolverMultistepScheduler(**SD)
    s.set_timesteps(20)
    s.sigmas = e.sigmas.clone()
    s.timesteps = e.timesteps.clone()
    trajectories.append(run_vp_space(s, "dpmpp_2m/normal/20", "epsilon", float(e.sigmas[8]), model_ts=floats(e.timesteps), start=8))
    s = unipc()
    s.set_timesteps(20)
    trajectories.append(run_vp_space(s, "unipc/normal/20", "epsilon", float(s.sigmas[8]), start=8))
    s = unipc()
    s.set_timesteps(20)
    trajectories.append(run_vp_space(s, "unipc/normal/20", "epsilon", float(s.sigmas[18]), start=18))

    for steps in (1, 4, 20):
        for schedule, kw in [("normal", {}), ("karras", dict(use_karras_sigmas=True))]:
            s = unipc(**kw)
            s.set_timesteps(steps)
            trajectories.append(run_vp_space(s, f"unipc/{schedule}/{steps}", "epsilon", float(s.sigmas[0])))
    s = unipc(prediction_type="v_prediction")
    s.set_timesteps(20)
    trajectories.append(run_vp_space(s, "unipc/normal/20", "v_prediction", float(s.sigmas[0])))

    for steps in (1, 4, 8):
        s = LCMScheduler(**SD)
        s.set_timesteps(steps)
        trajectories.append(run_vp_space(s, f"lcm/normal/{steps}", "epsilon", sigma_of(s, s.timesteps[0]), noise_seed=99 + steps))

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    doc = dict(
        made_by="tools/make_sampler_fixture.py",
        model="out_j = 0.8*tanh(1.5*u_j) + 0.2*sin(0.37*j + 0.004*t), u = x_k/sqrt(sigma^2+1)",
        tables=tables,
        trajectories=trajectories,
    )
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: {len(tables)} tables, {len(trajectories)} trajectories, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
