"""The one-step generator: a denoiser evaluated at one fixed noise level.

    G_theta(z, c) = D_theta(sigma_init * z, sigma_init, c)

(SiD, Zhou et al. 2024, sec. 4; DMD2's `conditioning_sigma`). Initialised from the teacher, so at step 0 the
generator *is* the teacher's one-step x0 prediction. sigma_init is snapped to a level the network was trained on
(t_init = 440 for DDPM-linear at 2.5) and must travel with the weights: changing it after training breaks the
model (the fixed-init_sigma convention of Diff-Instruct and SiD; see
github.com/maple-research-lab/SIM/issues/4, where changing it at inference gives bad images).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .denoisers import Denoiser


class OneStepGenerator(nn.Module):
    def __init__(self, denoiser: Denoiser, sigma_init: float = 2.5):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(denoiser.round_sigma(check_sigma_init(sigma_init, denoiser.schedule)))

    def forward(self, z: torch.Tensor, **cond) -> torch.Tensor:
        return self.denoiser(self.sigma_init * z, self.sigma_init, **cond)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.denoiser.sample_shape


def check_sigma_init(sigma_init, schedule) -> float:
    """sigma_init as a float in the teacher's noise range (0, sigma_max]: NaN, infinity or a level the network never
    saw would be clamped or propagate silently (an all-NaN or an out-of-range generator)."""
    from .checks import shown

    try:
        sigma = float(sigma_init)
    except (TypeError, ValueError):
        sigma = math.nan
    hi = float(schedule.sigma_max)
    if not (math.isfinite(sigma) and 0 < sigma <= hi * (1 + 1e-6)):
        raise ValueError(f"sigma_init must be a finite noise level in (0, {hi:.4g}] (the teacher's range), got "
                         f"{shown(sigma_init)}; set method.sigma_init (or the pipeline's model_index.json) to e.g. 2.5")
    return sigma
