"""Noise schedules seen through one lens: the variance-exploding (VE) noise level sigma.

Every model family in onestep is driven through the EDM / k-diffusion convention

    x_sigma = x0 + sigma * eps,        D(x_sigma, sigma) -> estimate of x0.

A `Schedule` tells how to turn that VE pair into what a particular model was trained on:

    x_model = a(sigma) * x_sigma,      timestep = t(sigma),
    x_model = a * x0 + s * eps  with   s = a * sigma.

and back, through the prediction-type conversions below. Discrete VP (DDPM/DDIM, `alphas_cumprod`) and flow
matching (`FlowMatchEulerDiscreteScheduler`) are the two families diffusers uses; the table
and formulas are in docs/schedules.md. x0 is always computed here, never through
`scheduler.step`, whose clipping would zero gradients.
"""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


# ---------------------------------------------------------------------------------------------------------------
# Prediction-type conversions, for x_t = a x0 + s eps (a, s broadcastable to x_t).
# ---------------------------------------------------------------------------------------------------------------
def x0_from_prediction(output: torch.Tensor, x_t: torch.Tensor, a, s, prediction_type: str) -> torch.Tensor:
    """The x0 implied by a network output of the given prediction type."""
    if prediction_type == "epsilon":
        return (x_t - s * output) / a
    if prediction_type == "v_prediction":  # v = a eps - s x0 with a^2 + s^2 = 1 (VP only)
        return a * x_t - s * output
    if prediction_type == "sample":
        return output
    if prediction_type == "flow":  # v = eps - x0 with a + s = 1: x_t = x0 + s v
        return x_t - s * output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def prediction_from_x0(x0: torch.Tensor, x_t: torch.Tensor, a, s, prediction_type: str) -> torch.Tensor:
    """Inverse of `x0_from_prediction`: the output a perfect network of that type would emit."""
    if prediction_type == "epsilon":
        return (x_t - a * x0) / s
    if prediction_type == "v_prediction":
        eps = (x_t - a * x0) / s
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return (x_t - x0) / s
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def score_from_x0(x0_hat: torch.Tensor, x_t: torch.Tensor, a, s) -> torch.Tensor:
    """grad log p_t(x_t) = (a x0_hat - x_t) / s^2 (Tweedie)."""
    return (a * x0_hat - x_t) / s**2


# ---------------------------------------------------------------------------------------------------------------
# Sigma samplers (pure functions of a torch.Generator, like k-diffusion's samplers).
# ---------------------------------------------------------------------------------------------------------------
def karras_sigmas(n: int, generator: torch.Generator | None = None, sigma_min: float = 0.002,
                  sigma_max: float = 80.0, rho: float = 7.0, u_max: float = 0.8, device=None) -> torch.Tensor:
    """SiD's generator-loss draw: u ~ U[0, u_max], sigma on the Karras rho-grid at position (1-u).

    With u_max = tmax/1000 = 0.8 the range is [0.002, 24.41] with median ~0.97 (SiD `sid_loss.py`).
    """
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64) * u_max
    return karras_sigma_at(u, sigma_min, sigma_max, rho)


def karras_sigma_at(u: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0) -> torch.Tensor:
    """The Karras rho-grid at position (1 - u): u = 0 is sigma_min, u = 1 is sigma_max (increasing in u)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - u) * (lo - hi)) ** rho


def lognormal_sigmas(n: int, generator: torch.Generator | None = None, mean: float = -1.2, std: float = 1.2,
                     device=None) -> torch.Tensor:
    """EDM's training draw sigma = exp(mean + std N(0,1)) (median 0.30 for the defaults)."""
    return torch.exp(mean + std * torch.randn(n, generator=generator, device=device, dtype=torch.float64))


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 for x0-space MSE."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------
class Schedule:
    """How a model family sees the VE noise level sigma. Subclasses fill in the four maps below."""

    prediction_type: str = "epsilon"
    sigma_min: float
    sigma_max: float

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """a(sigma): x_model = a * x_sigma."""
        raise NotImplementedError

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep value the network is conditioned on."""
        raise NotImplementedError

    def sigma_of_timestep(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Snap sigma to a level the network was trained on (identity for continuous schedules)."""
        return sigma.clamp(self.sigma_min, self.sigma_max)

    def training_sigmas(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Sigmas drawn as in the family's native training (used for teacher pretraining and fake-score DSM)."""
        raise NotImplementedError

    def shifted(self, sigma: torch.Tensor) -> torch.Tensor:
        """Move drawn noise levels the way the family's sampler does (identity except for shifted flows)."""
        return sigma

    def distillation_window(self) -> tuple[float, float]:
        """Default native-timestep window [t_min, t_max] for the generator loss's noise levels: the whole range
        the network was trained on (discrete VP schedules narrow it, see there)."""
        return float(self.timestep(torch.tensor(self.sigma_min))), float(self.timestep(torch.tensor(self.sigma_max)))

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Weight that turns ||x0_hat - x0||^2 into the family's native MSE (eps-, v- or flow-MSE)."""
        raise NotImplementedError

    def coefficients(self, sigma: torch.Tensor):
        """(a, s) with x_model = a x0 + s eps."""
        a = self.scale(sigma)
        return a, a * sigma


class DiscreteVPSchedule(Schedule):
    """DDPM-style discrete variance-preserving schedule given by `alphas_cumprod`.

    sigma_VE(t) = sqrt((1 - abar_t) / abar_t); a continuous sigma maps to a fractional timestep by linear
    interpolation in log-sigma (k-diffusion's `DiscreteSchedule`). Training draws integer timesteps, as the
    network was trained on them.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"a VP schedule takes prediction_type epsilon, v_prediction or sample, "
                             f"got {prediction_type!r}")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(1e-12, 1.0)
        self.sigmas = ((1 - abar) / abar).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.prediction_type = prediction_type
        self.num_train_timesteps = len(abar)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def scale(self, sigma):
        return (1 + sigma.double() ** 2).rsqrt().to(sigma.dtype)

    def timestep(self, sigma):
        log_sigma = sigma.double().clamp(self.sigma_min, self.sigma_max).log()
        log_sigmas = self.log_sigmas.to(sigma.device)
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo = hi - 1
        frac = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + frac.clamp(0, 1)).to(sigma.dtype)

    def sigma_of_timestep(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        lo = t.floor().long().clamp(0, self.num_train_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        log_sigmas = self.log_sigmas.to(t.device)
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()

    def round_sigma(self, sigma):
        t = self.timestep(sigma.double()).round()
        return self.sigma_of_timestep(t).to(device=sigma.device, dtype=sigma.dtype)

    def training_sigmas(self, n, generator=None, device=None):
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)
        return self.sigmas.to(t.device)[t]

    def distillation_window(self):
        """[20, 979] of 1000 steps, scaled to num_train_timesteps: the window SiD-LSG (mingyuanzhou/SiD-LSG,
        `sid_training_loop.py`: `torch.randint(tmin=20, tmax=980)`) and DMD2 (tianweiy/DMD2, `min_step_percent`
        0.02, `max_step_percent` 0.98) evaluate discrete teachers in. Near t = 0 the teacher and fake score agree
        to within their errors and the normalised direction is noise; near t = T the input is almost pure noise."""
        n = self.num_train_timesteps
        return float(round(0.02 * n)), float(round(0.979 * n))

    def loss_weight(self, sigma):
        if self.prediction_type == "epsilon":  # ||eps_hat - eps||^2 = ||x0_hat - x0||^2 / sigma^2
            return sigma ** -2
        if self.prediction_type == "v_prediction":  # ||v_hat - v||^2 = ||x0_hat - x0||^2 (1 + sigma^2) / sigma^2
            return (1 + sigma**2) / sigma**2
        return torch.ones_like(sigma)


class FlowMatchSchedule(Schedule):
    """Rectified-flow / flow-matching schedule (diffusers `FlowMatchEulerDiscreteScheduler`, SD3 style).

    x_t = (1 - t) x0 + t eps with t in (0, 1], so sigma_VE = t / (1 - t), a = 1 - t, model timestep = t * N.
    `shift` (SD3's time shift t' = shift t / (1 + (shift - 1) t)) is applied to the training-time draw only:
    the map sigma <-> t is exact whatever the shift. t is capped so that a >= 1e-2 (x0 conversions blow up at t=1).
    """

    prediction_type = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, t_max: float = 0.99):
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.sigma_min = 1.0 / (num_train_timesteps - 1)
        self.sigma_max = t_max / (1 - t_max)

    @staticmethod
    def t_of_sigma(sigma):
        return sigma / (1 + sigma)

    def scale(self, sigma):
        return 1 / (1 + sigma)

    def timestep(self, sigma):
        return self.t_of_sigma(sigma.clamp(self.sigma_min, self.sigma_max)) * self.num_train_timesteps

    def sigma_of_timestep(self, t):
        t = torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps
        return t / (1 - t)

    def training_sigmas(self, n, generator=None, device=None):
        t = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.shifted(t / (1 - t))

    def shifted(self, sigma):
        """SD3's time shift t' = shift t / (1 + (shift - 1) t), applied to VE sigma: distil at the times the teacher
        samples at (github.com/tianweiy/DMD2/issues/62)."""
        t = self.t_of_sigma(sigma)
        t = (self.shift * t / (1 + (self.shift - 1) * t)).clamp(1.0 / self.num_train_timesteps,
                                                                 self.t_of_sigma(self.sigma_max))
        return t / (1 - t)

    def loss_weight(self, sigma):  # ||v_hat - v||^2 = ||x0_hat - x0||^2 / s^2 with s = t
        return self.t_of_sigma(sigma) ** -2


class EDMSchedule(Schedule):
    """Native VE with EDM preconditioning (Karras et al. 2022, Table 1): the model sees c_in x and c_noise."""

    prediction_type = "edm"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 p_mean: float = -1.2, p_std: float = 1.2):
        self.sigma_data = sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.p_mean, self.p_std = p_mean, p_std

    def scale(self, sigma):
        return torch.ones_like(sigma)

    def timestep(self, sigma):  # c_noise
        return 0.25 * sigma.clamp_min(1e-20).log()

    def sigma_of_timestep(self, t):
        return torch.exp(4 * torch.as_tensor(t, dtype=torch.float64))

    def training_sigmas(self, n, generator=None, device=None):
        return lognormal_sigmas(n, generator, self.p_mean, self.p_std, device).clamp(self.sigma_min, self.sigma_max)

    def loss_weight(self, sigma):
        return edm_loss_weight(sigma, self.sigma_data)


def schedule_from_scheduler(scheduler) -> Schedule:
    """Build the Schedule for a diffusers scheduler (instance or config dict).

    The one place that looks at the scheduler family: FlowMatch* -> flow matching, EDM* -> EDM preconditioning,
    anything with a beta schedule -> discrete VP with the config's `prediction_type`.
    """
    from diffusers import DDPMScheduler

    config = dict(getattr(scheduler, "config", scheduler))
    class_name = config.get("_class_name", type(scheduler).__name__)
    if "FlowMatch" in class_name:
        return FlowMatchSchedule(config.get("num_train_timesteps", 1000), config.get("shift", 1.0))
    if class_name.startswith("EDM"):
        return EDMSchedule(config.get("sigma_data", 0.5), config.get("sigma_min", 0.002),
                           config.get("sigma_max", 80.0))
    if "beta_schedule" not in config and "trained_betas" not in config:
        raise ValueError(f"scheduler {class_name} has no beta schedule, flow-matching or EDM config; "
                         "onestep reads DDPM-style (betas), FlowMatchEulerDiscrete and EDM schedulers")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    ddpm = DDPMScheduler(**{k: config[k] for k in keys if k in config})
    return DiscreteVPSchedule(ddpm.alphas_cumprod, config.get("prediction_type", "epsilon"))


def sigma_for_timestep(schedule: Schedule, t: float) -> float:
    """Convenience: the VE sigma of a (possibly fractional) native timestep."""
    return float(schedule.sigma_of_timestep(torch.tensor(float(t))))


def geometric_sigmas(sigma_start: float, sigma_end: float, n: int) -> list[float]:
    """n levels spaced evenly in log-sigma, from sigma_start down to sigma_end."""
    if n == 1:
        return [sigma_start]
    ratio = math.log(sigma_end / sigma_start) / (n - 1)
    return [sigma_start * math.exp(ratio * i) for i in range(n)]
