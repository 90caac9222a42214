"""Toy reproduction kit for the hallucination paper (Aithal et al., NeurIPS 2024, arXiv 2406.09358).

Settings follow the paper's code (locuslab/diffusion-model-hallucination, `gaussian_experiments/`): 1-D Gaussian
modes (std 0.05, unnormalised), the 5x5 grid (`gaussian25`, normalised by sqrt(0.05^2 + 8)), the `Decoder` MLP
(`toy/toy_model.py`), DDPM with T = 1000 and linear betas 0.001 -> 0.2, eps-prediction and MSE, ancestral
sampling with fixed-large variance and no clipping. Deviations, all for CPU minutes instead of GPU hours: batch
1000 instead of 10000, 10k steps, and the lr decayed to 0 on a cosine (`train_ddpm(cosine=True)`); at constant
lr and this budget the trained modes stay wide and their tails, labelled as hallucinations, have a low score
(measured in `bench/hallucination_toy.py`). The one-step student is distilled by trajectory regression (Luhman &
Luhman 2021), which the paper does not have.

Sampling runs a real `diffusers.DDPMScheduler` inside `ToyDDPMPipeline`, so `HalMonitor` / `X0Recorder` score it
through the same code path as any diffusers pipeline. `ToyDenoiser` exposes a trained network as a VE denoiser
`D(x_sigma, sigma) -> x0_hat` for the one-step probe.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

MODE_STD_1D = 0.05
GRID_NORMALISER = math.sqrt(0.05**2 + 8.0)
GRID_MODE_STD = 0.05 / GRID_NORMALISER
KAPPA = 6.0

# ---------------------------------------------------------------------------------------------------------------
# Data (toy_data.py: modes assigned round-robin, so every mode holds n / M samples)
# ---------------------------------------------------------------------------------------------------------------


def gaussian_1d(means: Sequence[float], n: int, std: float = MODE_STD_1D,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, 1] points; sample i belongs to mode i mod M (paper's `gaussian1d`, unnormalised)."""
    mu = torch.as_tensor(means, dtype=torch.float32)[torch.arange(n) % len(means)]
    return (mu + std * torch.randn(n, generator=generator)).unsqueeze(1)


def grid_means() -> torch.Tensor:
    """[25, 2] normalised means of the 5x5 grid: 2 (i, j) / sqrt(0.05^2 + 8), i, j in -2..2 (spacing 0.707)."""
    axis = 2.0 * torch.arange(-2, 3, dtype=torch.float32)
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], dim=1) / GRID_NORMALISER


def gaussian_grid(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, 2] points of the paper's `gaussian25` (std 0.01767 after normalisation), round-robin modes."""
    means = grid_means()
    mu = means[torch.arange(n) % len(means)]
    return mu + GRID_MODE_STD * torch.randn(n, 2, generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# Labels (our rule: a sample is hallucinated when it lies farther than kappa mode std from every mode; the
# paper's exact labelling is not public)
# ---------------------------------------------------------------------------------------------------------------


def mode_distance(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[N] distance from each point to its nearest mode."""
    means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, x.shape[1])
    return torch.cdist(x.double(), means).min(dim=1).values


def hallucinated(x: torch.Tensor, means: torch.Tensor, std: float, kappa: float = KAPPA) -> torch.Tensor:
    """Bool [N]: farther than kappa * std from every mode (gap midpoints are >= 10 std away)."""
    return mode_distance(x, means) > kappa * std


def gap_densities(x: torch.Tensor, means: Sequence[float], std: float = MODE_STD_1D,
                  kappa: float = KAPPA) -> list[tuple[float, float, float]]:
    """1-D: for each gap between consecutive modes, (lo, hi, density) with the gap taken as
    (mu_i + kappa std, mu_{i+1} - kappa std) and density = fraction of samples in it per unit length."""
    mu = sorted(float(m) for m in means)
    x = x.flatten().double()
    out = []
    for a, b in zip(mu[:-1], mu[1:]):
        lo, hi = a + kappa * std, b - kappa * std
        out.append((lo, hi, float(((x > lo) & (x < hi)).double().mean()) / (hi - lo)))
    return out


def neighbour_segments(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Endpoints ([S, D], [S, D]) of the segments joining nearest-neighbour modes (pairs at the minimum spacing;
    40 grid edges for the 5x5 grid)."""
    means = means.double()
    dist = torch.cdist(means, means)
    dist.fill_diagonal_(float("inf"))
    i, j = torch.nonzero(dist <= dist.min() * (1 + 1e-6), as_tuple=True)
    keep = i < j
    return means[i[keep]], means[j[keep]]


def segment_distance(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """[N] distance from each point to the nearest nearest-neighbour segment (interpolation between adjacent
    modes lies on such a segment; a lattice makes "the two closest modes are neighbours" true of any point)."""
    a, b = neighbour_segments(means)
    x = x.double()[:, None, :]
    ab = b - a
    u = (((x - a) * ab).sum(-1) / (ab * ab).sum(-1)).clamp(0, 1)
    return (x - (a + u[..., None] * ab)).norm(dim=-1).min(dim=1).values


# ---------------------------------------------------------------------------------------------------------------
# Network (toy_model.py::Decoder)
# ---------------------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """fairseq sinusoid [sin | cos], base 10000, divisor half - 1 (ddpm_torch `get_timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = t.float().reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TemporalLayer(nn.Module):
    """LN -> LeakyReLU -> Linear -> + Linear(t_emb) -> LN -> LeakyReLU -> Linear, plus identity skip."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width, bias=False)
        self.fc2 = nn.Linear(width, width, bias=False)
        self.enc = nn.Linear(width, width)

    def forward(self, x, t_emb):
        out = self.fc1(F.leaky_relu(self.norm1(x), 0.02)) + self.enc(t_emb)
        return self.fc2(F.leaky_relu(self.norm2(out), 0.02)) + x


class Decoder(ModelMixin, ConfigMixin):
    """The paper's toy network: in_fc (no bias) -> one TemporalLayer applied `depth` times (the repo's
    `[layer] * 3` shares weights) -> LayerNorm -> out_fc. Xavier-uniform weights, zero biases.

    `forward(sample [B, D], timestep [B] or scalar)`; a scalar timestep embeds once for the whole batch.
    """

    @register_to_config
    def __init__(self, dim: int = 1, width: int = 128, depth: int = 3):
        super().__init__()
        self.in_fc = nn.Linear(dim, width, bias=False)
        self.layer = TemporalLayer(width)
        self.out_norm = nn.LayerNorm(width)
        self.out_fc = nn.Linear(width, dim)
        self.t_proj = nn.Linear(width, width)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=sample.device)
        t_emb = F.leaky_relu(self.t_proj(timestep_embedding(t, self.config.width)), 0.02)
        h = self.in_fc(sample)
        for _ in range(self.config.depth):
            h = self.layer(h, t_emb)
        return self.out_fc(self.out_norm(h))


# ---------------------------------------------------------------------------------------------------------------
# DDPM: schedule, training, ancestral sampling through a diffusers scheduler
# ---------------------------------------------------------------------------------------------------------------


def toy_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The paper's schedule in diffusers: linear betas 0.001 -> 0.2, eps, fixed-large variance, no clipping
    (diffusers' default `clip_sample=True` would clamp x0 to [-1, 1] and change the score).

    alphas_cumprod is recomputed in float64 as in the paper's code: this schedule reaches ab ~ 1e-51 at t = 999,
    which float32 rounds to 0, making the first DDPM steps 0 * inf = NaN.
    """
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=0.001,
                              beta_end=0.2, prediction_type="epsilon", variance_type="fixed_large",
                              clip_sample=False)
    scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas.double(), dim=0)
    return scheduler


def train_ddpm(model: nn.Module, data: torch.Tensor, steps: int, batch_size: int, lr: float = 1e-3,
               cosine: bool = False, generator: torch.Generator | None = None,
               num_train_timesteps: int = 1000) -> list[float]:
    """eps-prediction MSE with uniform integer timesteps, Adam (0.9, 0.999), batches from shuffled epochs (the
    paper's recipe at constant lr). `cosine=True` decays lr to 0 (our addition, for short CPU budgets).
    Returns the loss per step."""
    ab = toy_scheduler(num_train_timesteps).alphas_cumprod
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    order, pos, losses = torch.randperm(len(data), generator=generator), 0, []
    model.train()
    for _ in range(steps):
        if pos + batch_size > len(data):
            order, pos = torch.randperm(len(data), generator=generator), 0
        x0 = data[order[pos: pos + batch_size]]
        pos += batch_size
        t = torch.randint(0, num_train_timesteps, (len(x0),), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = ab[t].unsqueeze(1).float()
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


class ToyDDPMPipeline:
    """Ancestral sampling of a toy eps-model with a diffusers scheduler, shaped like a diffusers pipeline
    (`pipe.scheduler`, `pipe(batch_size=..., generator=...)`) so `HalMonitor` and `generate_filtered` apply."""

    def __init__(self, model: nn.Module, scheduler=None):
        self.model = model
        self.scheduler = scheduler if scheduler is not None else toy_scheduler()

    @torch.no_grad()
    def __call__(self, batch_size: int, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps or self.scheduler.config.num_train_timesteps)
        x = torch.randn(batch_size, self.model.config.dim, generator=generator) * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            eps = self.model(self.scheduler.scale_model_input(x, t), t)
            x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        return x


# ---------------------------------------------------------------------------------------------------------------
# VE denoiser view, deterministic teacher ODE, one-step student
# ---------------------------------------------------------------------------------------------------------------


class ToyDenoiser:
    """A discrete-VP toy network as a VE denoiser `D(x_sigma, sigma[B]) -> x0_hat` (the `onestep.denoisers`
    interface): x_t = x_sigma / sqrt(1 + sigma^2), t = the fractional timestep whose sigma_VE =
    sqrt((1 - ab_t) / ab_t) equals sigma (linear interpolation in log sigma), and x0 = x_sigma - sigma eps_hat
    (prediction "epsilon") or the output itself ("sample")."""

    def __init__(self, model: nn.Module, alphas_cumprod: torch.Tensor, prediction: str = "epsilon"):
        if prediction not in ("epsilon", "sample"):
            raise ValueError(f"prediction must be 'epsilon' or 'sample', got {prediction!r}")
        self.model, self.prediction = model, prediction
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.log_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.double().log().clamp(float(self.log_sigmas[0]), float(self.log_sigmas[-1]))
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo = hi - 1
        frac = (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return (lo + frac).float()

    def forward(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Differentiable D(x_sigma, sigma); `sigma` a scalar or [B]."""
        sigma = torch.as_tensor(sigma, dtype=x_sigma.dtype).expand(x_sigma.shape[0])
        s = sigma.reshape(-1, *([1] * (x_sigma.ndim - 1)))
        out = self.model(x_sigma / (1 + s**2).sqrt(), self.timestep(sigma))
        return x_sigma - s * out if self.prediction == "epsilon" else out

    @torch.no_grad()
    def __call__(self, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.forward(x_sigma, sigma)


@torch.no_grad()
def teacher_ode(denoise: ToyDenoiser, z: torch.Tensor, sigmas: Sequence[float]) -> list[torch.Tensor]:
    """Deterministic Euler on dx/dsigma = (x - D(x, sigma)) / sigma from x = sigmas[0] z (DDIM for a VP teacher,
    Karras et al. 2022 sec. 3). Returns the states at every sigma followed by the final x0 estimate."""
    x, states = sigmas[0] * z, []
    for sigma, sigma_next in zip(sigmas, list(sigmas[1:]) + [0.0]):
        states.append(x)
        x0 = denoise(x, torch.tensor(sigma))
        x = x0 + (sigma_next / sigma) * (x - x0)
    return states + [x]


def distill_one_step(teacher: ToyDenoiser, dim: int, levels: Sequence[float], n_pairs: int, steps: int,
                     batch_size: int, ode_steps: int = 100, sigma_start: float = 80.0, lr: float = 1e-3,
                     generator: torch.Generator | None = None) -> ToyDenoiser:
    """A one-step student by trajectory regression (Luhman & Luhman 2021, "Knowledge distillation in iterative
    generative models"), extended to the noise `levels` of its own few-step path: with teacher ODE paths
    x(sigma) from z, train D_theta(x(sigma_l), sigma_l) -> x(0) for each level (the consistency target on the
    teacher's path). The ODE starts at x = sigma_start z (80, as in EDM: the data's std is negligible there; this
    schedule's own sigma_max ~ 1e25 overflows float32) and takes `ode_steps` log-spaced Euler steps down to the
    teacher's t = 0 level, then one step to 0. The
    generator is G(z) = D_theta(levels[0] z, levels[0]); few-step sampling re-noises to levels[1:] (multistep
    consistency sampling). Returns the student as a sample-prediction `ToyDenoiser`.
    """
    sigma_end = float(teacher.log_sigmas[0].exp())  # the teacher's t = 0, as DDIM ends
    grid = torch.exp(torch.linspace(math.log(sigma_start), math.log(sigma_end), ode_steps)).tolist()
    grid = sorted(set(grid) | {float(s) for s in levels}, reverse=True)
    z = torch.randn(n_pairs, dim, generator=generator)
    states = teacher_ode(teacher, z, grid)
    target = states[-1]
    inputs = [levels[0] * z] + [states[grid.index(float(s))] for s in levels[1:]]
    inputs = torch.stack(inputs)  # [L, n, dim]
    student = ToyDenoiser(Decoder(dim=dim), teacher.alphas_cumprod, prediction="sample")
    optimizer = torch.optim.Adam(student.model.parameters(), lr=lr)
    level_sigmas = torch.tensor([float(s) for s in levels])
    student.model.train()
    for _ in range(steps):
        idx = torch.randint(0, n_pairs, (batch_size,), generator=generator)
        lvl = torch.randint(0, len(levels), (batch_size,), generator=generator)
        loss = F.mse_loss(student.forward(inputs[lvl, idx], level_sigmas[lvl]), target[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    student.model.eval()
    return student
