"""A onestep generator as a diffusers pipeline that needs only torch and diffusers (no onestep install).

onestep copies this file verbatim as `pipeline.py` into every exported folder, next to model_index.json
(whose `_class_name` is ["pipeline", "OneStepPipeline"]), so that either of

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    images = pipe(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images

gives the same images as onestep's own `onestep.pipelines.OneStepPipeline` (tests/test_standalone_pipeline.py
checks equality for epsilon, v-prediction, flow-matching and EDM teachers). It re-implements onestep's maths in
a few lines instead of importing it, so keep the two in step:

    x_sigma = x0 + sigma * eps                         (the variance-exploding view of any teacher schedule)
    G(z) = D(sigma_init * z, sigma_init)               (one network evaluation)
    steps 2-4: x <- D(x + sigma_k * eps_k, sigma_k)    (sigma_k geometric from sigma_init down to 8% of it)

where D converts the network's output to an x0 estimate under the teacher's scheduler: discrete VP (DDPM-style
betas; epsilon / v_prediction / sample), flow matching (FlowMatch*), or EDM preconditioning (EDM*).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

CARD_FILE = "onestep_card.json"
MAX_STEPS = 4
FEW_STEP_SIGMA_END = 0.08  # the last re-noising level, as a fraction of sigma_init
VP_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")


class VPSchedule:
    """Discrete variance-preserving (DDPM-style) schedule: sigma = sqrt((1 - abar) / abar), fractional timesteps
    by linear interpolation in log-sigma, x_model = x_sigma / sqrt(1 + sigma^2)."""

    def __init__(self, config: dict):
        abar = DDPMScheduler(**{k: config[k] for k in VP_KEYS if k in config}).alphas_cumprod.double().clamp(1e-12, 1)
        sigmas = ((1 - abar) / abar).sqrt()
        self.log_sigmas = sigmas.log()
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])
        self.prediction_type = config.get("prediction_type", "epsilon")

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.double().clamp(self.sigma_min, self.sigma_max).log()
        log_sigmas = self.log_sigmas.to(sigma.device)
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo = hi - 1
        frac = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + frac.clamp(0, 1)).to(sigma.dtype)

    def round_sigma(self, sigma: float) -> float:
        """Snap to the nearest integer timestep the network was trained on."""
        t = int(self.timestep(torch.tensor(sigma, dtype=torch.float64)).round())
        return float(self.log_sigmas[t].exp())

    def denoise(self, model, x, sigma, cond):
        a = _expand((1 + sigma.double() ** 2).rsqrt().to(sigma.dtype), x)
        s = a * _expand(sigma, x)
        x_t = a * x
        out = _run(model, x_t, self.timestep(sigma), cond)[:, : x.shape[1]]
        if self.prediction_type == "epsilon":
            return (x_t - s * out) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * out
        if self.prediction_type == "sample":
            return out
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")


class FlowSchedule:
    """Flow matching: x_t = (1 - t) x0 + t eps, so sigma = t / (1 - t), a = 1 - t, timestep = t * N, t <= 0.99."""

    def __init__(self, config: dict):
        self.num_train_timesteps = config.get("num_train_timesteps", 1000)
        self.sigma_min, self.sigma_max = 1.0 / (self.num_train_timesteps - 1), 0.99 / (1 - 0.99)

    def round_sigma(self, sigma: float) -> float:
        return min(max(sigma, self.sigma_min), self.sigma_max)

    def denoise(self, model, x, sigma, cond):
        a = _expand(1 / (1 + sigma), x)
        s = a * _expand(sigma, x)
        clamped = sigma.clamp(self.sigma_min, self.sigma_max)
        x_t = a * x
        out = _run(model, x_t, clamped / (1 + clamped) * self.num_train_timesteps, cond)[:, : x.shape[1]]
        return x_t - s * out


class EDMSchedule:
    """EDM preconditioning (Karras et al. 2022): D = c_skip x + c_out F(c_in x, c_noise = log(sigma) / 4)."""

    def __init__(self, config: dict):
        self.sigma_data = config.get("sigma_data", 0.5)
        self.sigma_min, self.sigma_max = config.get("sigma_min", 0.002), config.get("sigma_max", 80.0)

    def round_sigma(self, sigma: float) -> float:
        return min(max(sigma, self.sigma_min), self.sigma_max)

    def denoise(self, model, x, sigma, cond):
        sd, sigma = self.sigma_data, _expand(sigma, x)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip * x + c_out * _run(model, c_in * x, 0.25 * sigma.flatten(1)[:, 0].clamp_min(1e-20).log(), cond)


def schedule_for(scheduler):
    """The teacher's scheduler family decides how network outputs become x0 estimates."""
    config = dict(scheduler.config)
    name = config.get("_class_name", type(scheduler).__name__)
    if "FlowMatch" in name:
        return FlowSchedule(config)
    if name.startswith("EDM"):
        return EDMSchedule(config)
    if "beta_schedule" not in config and "trained_betas" not in config:
        raise ValueError(f"scheduler {name}: expected DDPM-style betas, FlowMatch* or EDM*")
    return VPSchedule(config)


def _expand(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (x.dim() - 1))).to(x.device)


def _per_sample(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])


def _run(model, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
    """The network in its dtype; the timestep (EDM's c_noise) stays fp32, as bf16 would round 625 to 624."""
    return model(x.to(model.dtype), timestep=timestep.float(), **cond, return_dict=False)[0].float()


class OneStepPipeline(DiffusionPipeline):
    """Generate with a distilled one-step generator; 2-4 steps re-noise and denoise with the same weights.

    scheduler: the teacher's scheduler (only its config is read); unet or transformer: the generator network;
    sigma_init: the noise level the generator was distilled at (stored in model_index.json).
    """

    _optional_components = ["unet", "transformer"]

    def __init__(self, scheduler, unet=None, transformer=None, sigma_init: float = 2.5):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("OneStepPipeline needs exactly one generator network: unet or transformer")
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer)
        self.register_to_config(sigma_init=float(sigma_init))

    @property
    def network(self):
        return self.unet if self.unet is not None else self.transformer

    @property
    def card(self) -> dict:
        """Teacher, method, NFE, FID + protocol, from the folder's onestep_card.json."""
        card_file = Path(str(self.config.get("_name_or_path", ""))) / CARD_FILE
        return json.loads(card_file.read_text()) if card_file.is_file() else {}

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 1, generator=None,
                 class_labels: torch.Tensor | list[int] | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, **cond):
        """batch_size samples; class_labels default to 0, 1, 2, ... cycling; output_type "pil" | "np" | "pt" |
        "raw" (the generator's output in [-1, 1], as is); latents: the noise z (default: drawn from generator)."""
        if not 1 <= num_inference_steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be 1..{MAX_STEPS}, got {num_inference_steps}")
        model, schedule = self.network, schedule_for(self.scheduler)
        z = latents if latents is not None else randn_tensor((batch_size, *_sample_shape(model)), generator=generator,
                                                             device=self.device, dtype=torch.float32)
        num_classes = model.config.get("num_class_embeds") or model.config.get("num_classes")
        if num_classes:
            if class_labels is None:
                class_labels = torch.arange(batch_size) % num_classes
            cond["class_labels"] = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
        noise_generator = generator[0] if isinstance(generator, list) else generator
        x = self.sample(model, schedule, z, num_inference_steps, noise_generator, cond)
        if output_type == "raw" or x.dim() != 4:
            return ImagePipelineOutput(images=x) if return_dict else (x,)
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def sample(self, model, schedule, z, num_steps: int, noise_generator, cond: dict) -> torch.Tensor:
        """G(z), then re-noise to each next level and denoise again (consistency-model multistep sampling)."""
        sigma_init = schedule.round_sigma(self.config.sigma_init)
        sigmas = [sigma_init]
        if num_steps > 1:
            ratio = math.log(sigma_init * FEW_STEP_SIGMA_END / sigma_init) / (num_steps - 1)
            sigmas = [sigma_init * math.exp(ratio * i) for i in range(num_steps)]
        x = schedule.denoise(model, sigma_init * z, _per_sample(sigma_init, z), cond)
        for sigma in sigmas[1:]:
            eps = torch.randn(x.shape, generator=noise_generator, device=x.device, dtype=x.dtype)
            x = schedule.denoise(model, x + sigma * eps, _per_sample(sigma, x), cond)
        return x

def _sample_shape(model) -> tuple[int, ...]:
    config = model.config
    if "sample_size" in config and "in_channels" in config:
        size = config.sample_size
        return (config.in_channels, *((size, size) if isinstance(size, int) else size))
    return (config.dim,)
