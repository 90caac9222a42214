"""Teacher samplers as pure functions of (denoiser, noise, sigmas), in the style of k-diffusion. (A one-step
generator's few-step sampling is `OneStepPipeline.generate`, onestep/pipelines/standalone_pipeline.py.)

All work in the VE form of `onestep.denoisers`: x_sigma = x0 + sigma * eps. For a VP teacher, Euler on
integer-timestep sigmas is exactly deterministic DDIM (Song et al. 2021; Karras et al. 2022, sec. 3).
"""
from __future__ import annotations

import torch

from ..schedules import Schedule


def teacher_sigmas(schedule: Schedule, num_steps: int, spacing: str = "uniform", rho: float = 7.0) -> torch.Tensor:
    """num_steps decreasing sigmas followed by 0.

    "uniform": evenly spaced native timesteps from the schedule's largest to its smallest level, snapped to the
    training grid (DDIM's "trailing" spacing for DDPM teachers: the familiar DDIM-N);
    "karras": the rho = 7 spacing of Karras et al. (2022) eq. 5 between the schedule's sigma_min and sigma_max.
    """
    if spacing == "uniform":
        t_max, t_min = (float(schedule.timestep(torch.tensor(s, dtype=torch.float64)))
                        for s in (schedule.sigma_max, schedule.sigma_min))
        t = torch.linspace(t_max, t_min, num_steps + 1, dtype=torch.float64)[:-1]
        sigmas = schedule.round_sigma(schedule.sigma_of_timestep(t))
    elif spacing == "karras":
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        lo, hi = schedule.sigma_min ** (1 / rho), schedule.sigma_max ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
    else:
        raise ValueError(f"spacing must be 'uniform' or 'karras', got {spacing!r}")
    return torch.cat([sigmas.float(), sigmas.new_zeros(1).float()])


@torch.no_grad()
def sample_euler(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, **cond) -> torch.Tensor:
    """Deterministic Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (DDIM for VP)."""
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = denoiser(x, sigma, **cond)
        x = x0 + (sigma_next / sigma) * (x - x0)
    return x


@torch.no_grad()
def sample_heun(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, **cond) -> torch.Tensor:
    """Deterministic Heun (2nd order) on the same ODE, Karras et al. (2022) Algorithm 1 without churn: an Euler step,
    then the average of the slopes at both ends; the last step to sigma = 0 is Euler. 2 network calls per step."""
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        slope = (x - denoiser(x, sigma, **cond)) / sigma
        x_next = x + (sigma_next - sigma) * slope
        if sigma_next > 0:
            slope_next = (x_next - denoiser(x_next, sigma_next, **cond)) / sigma_next
            x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
        x = x_next
    return x
