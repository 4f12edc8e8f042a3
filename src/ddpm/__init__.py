"""ddpm: denoising diffusion probabilistic models (Ho et al. 2020), exact, tested, fast on a CPU.

The math (``schedules``, ``diffusion``, ``losses``) and the algorithms that take a network as a
callable (``likelihood``, ``samplers``, ``oracle``, ``guidance``, ``editing``) are imported here; the
networks, data, training and CLI load on first use so that ``import ddpm`` stays light.
"""

from __future__ import annotations

import importlib
import os

# OpenMP threads that spin while waiting for work steal the CPU from everything else. One training
# step of the tiny U-Net (batch 64, 8x8) on this 2-core machine: beside two busy processes, libgomp's
# default spinning took > 5 s, PASSIVE 391 ms, PASSIVE with a short spin (GOMP_SPINCOUNT=10000) 265 ms;
# on the quiet machine all three land at 100-150 ms (run-to-run noise ~15%). It must be set before
# torch loads OpenMP, so here (the CLI imports ddpm first); explicit user values win.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from ddpm.diffusion import (
    PMeanVariance,
    eps_from_v,
    eps_from_x0,
    p_mean_variance,
    p_sample_step,
    q_posterior_mean_variance,
    q_sample,
    q_step,
    target_for,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from ddpm.editing import ddim_invert, ddim_reconstruct, inpaint, interpolate, sdedit, slerp
from ddpm.errors import DDPMError
from ddpm.guidance import classifier_free_guidance
from ddpm.likelihood import BoundTerms, variational_bound
from ddpm.losses import decoder_nll, normal_kl, prior_kl, simple_loss, vlb_term
from ddpm.oracle import GaussianMixture
from ddpm.samplers import (
    SAMPLERS,
    ancestral_sample,
    dpm_solver_step,
    euler_step,
    heun_step,
    multistep_order,
    sample,
    sde_dpm_solver_step,
    unipc_correct,
    unipc_step,
)
from ddpm.schedules import BETA_SCHEDULES, NoiseSchedule, respace

__version__ = "0.1.0"

# name -> module holding it, imported on first access (PEP 562).
_LAZY = {
    "UNet": "ddpm.nets",
    "MLP": "ddpm.nets",
    "build_unet": "ddpm.nets",
    "load_dataset": "ddpm.data",
    "train": "ddpm.train",
    "sample_run": "ddpm.runs",
    "RunConfig": "ddpm.config",
    "nll_run": "ddpm.evaluate",
    "eval_run": "ddpm.evaluate",
    "import_diffusers": "ddpm.interop",
    "export_diffusers": "ddpm.interop",
    "inpaint_run": "ddpm.edit",
    "sdedit_run": "ddpm.edit",
    "invert_run": "ddpm.edit",
    "interpolate_run": "ddpm.edit",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")


__all__ = [
    "BETA_SCHEDULES",
    "SAMPLERS",
    "BoundTerms",
    "DDPMError",
    "GaussianMixture",
    "NoiseSchedule",
    "PMeanVariance",
    "ancestral_sample",
    "classifier_free_guidance",
    "ddim_invert",
    "ddim_reconstruct",
    "decoder_nll",
    "dpm_solver_step",
    "eps_from_v",
    "eps_from_x0",
    "euler_step",
    "heun_step",
    "multistep_order",
    "inpaint",
    "interpolate",
    "normal_kl",
    "p_mean_variance",
    "p_sample_step",
    "prior_kl",
    "q_posterior_mean_variance",
    "q_sample",
    "q_step",
    "respace",
    "sample",
    "sde_dpm_solver_step",
    "sdedit",
    "simple_loss",
    "slerp",
    "target_for",
    "unipc_correct",
    "unipc_step",
    "v_from_x0_eps",
    "variational_bound",
    "vlb_term",
    "x0_from_eps",
    "x0_from_v",
    *_LAZY,
]
