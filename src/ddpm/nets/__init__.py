"""Denoising networks, torch only: the U-Net of Ho et al. (2020) and an MLP for toy data.

Every network is called as ``net(x_t, t)`` with t a [B] tensor of timesteps (int64 indices or floats)
and keeps its constructor arguments in ``net.config``, a JSON-able dict: ``type(net)(**net.config)``
rebuilds the architecture.
"""

from ddpm.nets.layers import count_parameters, timestep_embedding
from ddpm.nets.mlp import MLP
from ddpm.nets.unet import UNET_PRESETS, UNet, build_unet

__all__ = ["MLP", "UNET_PRESETS", "UNet", "build_unet", "count_parameters", "timestep_embedding"]
