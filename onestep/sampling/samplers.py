"""Samplers as pure functions of (denoiser, noise, sigmas), in the style of k-diffusion.

All work in the VE form of `onestep.denoisers`: x_sigma = x0 + sigma * eps. For a VP teacher, Euler on
integer-timestep sigmas is exactly deterministic DDIM (Song et al. 2021; Karras et al. 2022, sec. 3).
"""
from __future__ import annotations

import torch

from ..schedules import Schedule, geometric_sigmas

# Re-noising levels for few-step sampling of a one-step generator end here (as a fraction of sigma_init).
FEW_STEP_SIGMA_END = 0.08


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


def few_step_sigmas(sigma_init: float, num_steps: int) -> list[float]:
    """Noise levels of a 1-4 step path: sigma_init, then geometric re-noising levels down to 8% of it."""
    return geometric_sigmas(sigma_init, sigma_init * FEW_STEP_SIGMA_END, num_steps)


def sample_few_step(generator, z: torch.Tensor, num_steps: int = 1, sigmas: list[float] | None = None,
                    noise_generator: torch.Generator | None = None, **cond) -> torch.Tensor:
    """Run a one-step generator for 1-4 steps: generate, re-noise to the next level, denoise with the same weights.

    Step 1 is G(z); step k > 1 is D_theta(x + sigma_k eps, sigma_k) (the multistep sampling of consistency models,
    Song et al. 2023, Alg. 1, with the generator's own denoiser).
    """
    sigmas = sigmas or few_step_sigmas(generator.sigma_init, num_steps)
    x = generator(z, **cond)
    for sigma in sigmas[1:]:
        eps = torch.randn(x.shape, generator=noise_generator, device=x.device, dtype=x.dtype)
        x = generator.denoiser(x + sigma * eps, sigma, **cond)
    return x
