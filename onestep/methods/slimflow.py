"""SlimFlow: a one-step student several times smaller than its teacher, in two trained stages after the pairs.

Zhu, Liu, Liu, "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow", ECCV 2024
(arXiv 2407.12718; code github.com/yuanzhi-zhu/SlimFlow). The stages chain through folders (docs/slimflow.md):

0. pairs (`onestep pairs TEACHER --out DIR`): noise z and the teacher's deterministic ODE sample x = T(z).
1. `slimflow_reflow` -- annealing reflow (paper eq. 9): a small rectified flow v trained *from scratch* on the pairs,
   with the noise end blended with fresh noise xi by a coefficient beta annealed from 1 to 0,

       z_beta = sqrt(1 - beta_k^2) z + beta_k xi,   x_tau = (1 - tau) x + tau z_beta,
       L = || v(x_tau, tau) - (z_beta - x) ||^2

   (beta = 1: a 1-rectified flow on the teacher's samples; beta = 0: plain reflow), optionally with the same
   horizontal flip of both ends of a pair. Its export is a flow-matching teacher folder
   (`FlowMatchEulerDiscreteScheduler`) that any onestep method opens as a diffusion teacher.
2. `slimflow_distill` -- flow-guided distillation (paper eqs. 11-13, Alg. 1): a one-step student G, started from the
   stage-1 weights, the stage-1 EMA frozen as the guide v_T:

       L_pair  = d(G(z), x)                                                    on the pairs
       L_guide = d(G(zeta), x~),  x~ = y - tau v_T(y, tau),  y = tau zeta + (1 - tau) sg[G(zeta)]   on fresh noise

   i.e. the student takes the first Euler step (its own straight line from zeta to G(zeta), stopped gradient) and the
   guide the second; the total is L_pair + L_guide at equal weights.

Time convention. Everything here is in diffusers' flow-matching convention (tau = 1 is noise, the network regresses
v = z - x and is fed timestep 1000 tau), seen through onestep's VE denoiser: sigma = tau / (1 - tau) and
D(x + sigma z, sigma) = x_tau - tau v(x_tau, tau). SlimFlow's code uses data-time t = 1 - tau and u = x - z = -v
(`to_slimflow` / `from_slimflow` below). In the VE view the guide's target is D_T(sg[G(zeta)] + sigma zeta, sigma):
the guide denoises the student's sample re-noised with the *same* noise, so any diffusion teacher can guide.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..generators import OneStepGenerator
from ..networks import build_network, count_parameters
from ..sampling.samplers import sample_euler, teacher_sigmas
from .base import Batch, Method, MethodConfig, NetworkConfig, OptimizerConfig, trainable_copy

log = logging.getLogger(__name__)

FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
DEFAULT_STUDENT = {  # the digits teacher's UNet (32, 64, 64) at half width: 260,849 parameters, 0.245x the teacher's
    "block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "time_embedding_dim": 48,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
BETA_SCHEDULES = ("linear", "cosine", "exp", "constant")


# --- conventions -------------------------------------------------------------------------------------------------
def to_slimflow(sigma: torch.Tensor, v: torch.Tensor | None = None):
    """(t, u) of SlimFlow's code (t: 0 noise, 1 data; u = x - z) from onestep's VE sigma and a diffusers flow
    velocity v = z - x: tau = sigma / (1 + sigma), t = 1 - tau = 1 / (1 + sigma), u = -v."""
    t = 1 / (1 + sigma)
    return t if v is None else (t, -v)


def from_slimflow(t: torch.Tensor, u: torch.Tensor | None = None):
    """Inverse of `to_slimflow`: (sigma, v) from SlimFlow's (t, u); sigma = (1 - t) / t."""
    sigma = (1 - t) / t
    return sigma if u is None else (sigma, -u)


def sigma_of_tau(tau: torch.Tensor) -> torch.Tensor:
    """VE noise level of flow time tau (x_tau = (1 - tau) x + tau z = (1 - tau)(x + sigma z))."""
    return tau / (1 - tau)


def beta_schedule(step: int, kind: str, steps: int, value: float = 0.0) -> float:
    """SlimFlow's annealing coefficient beta_k (its code's `x0_randomness`): linear 1 - min(1, k/K), cosine
    (1 + cos(pi min(1, k/K)))/2, exp exp(-k/K), constant `value` (0: plain reflow, 1: 1-rectified flow)."""
    if kind == "constant":
        return float(value)
    r = min(1.0, step / steps)
    if kind == "linear":
        return 1.0 - r
    if kind == "cosine":
        return (1.0 + math.cos(math.pi * r)) / 2
    if kind == "exp":
        return math.exp(-step / steps)
    raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {kind!r}")


def blend_noise(z: torch.Tensor, xi: torch.Tensor, beta: float) -> torch.Tensor:
    """z_beta = sqrt(1 - beta^2) z + beta xi: still N(0, I), correlated sqrt(1 - beta^2) with the pair's noise."""
    return math.sqrt(max(0.0, 1.0 - beta * beta)) * z + beta * xi


def flip_pairs(x: torch.Tensor, z: torch.Tensor, coin: torch.Tensor):
    """Flip both ends of the pairs with coin == True horizontally (the last axis): a pair stays a pair."""
    mask = coin.reshape(-1, *[1] * (x.dim() - 1))
    return torch.where(mask, x.flip(-1), x), torch.where(mask, z.flip(-1), z)


# --- distances for the distillation losses -------------------------------------------------------------------------
class Distance:
    """Per-sample distance d(a, b) -> [B]: l2 (mean squared error over dimensions), pseudo_huber
    (sqrt(||a - b||^2 + c^2) - c, Song & Dhariwal 2023), lpips (the `lpips` package's VGG, images resized to 64 px
    as SlimFlow does; needs its weights on disk), digits_features (an LPIPS-like distance in the conv layers of
    onestep's digits CNN, channel-normalised; note: the same network scores FD, so do not benchmark with it)."""

    def __init__(self, kind: str, huber_c: float | None = None):
        self.kind, self.huber_c, self.net = kind, huber_c, None
        if kind == "lpips":
            try:
                import lpips

                self.net = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
            except Exception as err:  # not installed, or its VGG weights cannot be fetched offline
                raise ValueError(f"method.distance lpips: the lpips package or its VGG weights are not available "
                                 f"({' '.join(str(err).split())[:160]}); use l2, pseudo_huber or digits_features"
                                 ) from None
        elif kind == "digits_features":
            from safetensors.torch import load_file

            from ..eval.features import DigitsCNN, default_weights_path

            self.net = DigitsCNN()
            self.net.load_state_dict(load_file(default_weights_path()))
            self.net.eval().requires_grad_(False)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = (a - b).flatten(1)
        if self.kind == "l2":
            return diff.pow(2).mean(1)
        if self.kind == "pseudo_huber":
            c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(diff.shape[1])
            return (diff.pow(2).sum(1) + c * c).sqrt() - c
        if self.kind == "lpips":
            self.net.to(a.device)
            up = lambda v: torch.nn.functional.interpolate(  # noqa: E731
                v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v, size=(64, 64), mode="bilinear", align_corners=True)
            return self.net(up(a), up(b)).flatten()
        return self._features(a, b)

    def _features(self, a, b):
        import torch.nn.functional as F

        self.net.to(a.device)
        prep = lambda v: F.interpolate(v.mean(1, keepdim=True), size=(32, 32), mode="bilinear",  # noqa: E731
                                       align_corners=False)
        fa, fb, total = prep(a), prep(b), 0.0
        for conv in (self.net.conv1, self.net.conv2, self.net.conv3):
            fa, fb = F.relu(conv(fa)), F.relu(conv(fb))
            na = fa / (fa.pow(2).sum(1, keepdim=True) + 1e-10).sqrt()
            nb = fb / (fb.pow(2).sum(1, keepdim=True) + 1e-10).sqrt()
            total = total + (na - nb).pow(2).sum(1).mean((1, 2))
            fa, fb = F.max_pool2d(fa, 2), F.max_pool2d(fb, 2)
        return total


# --- stage 1: annealing reflow -------------------------------------------------------------------------------------
class SlimFlowReflowConfig(MethodConfig):
    name: Literal["slimflow_reflow"] = "slimflow_reflow"
    model_class: str = Field("UNet2DModel", description="the student's class: UNet2DModel, UNet2DConditionModel, "
                             "MLPModel (2-D points), ...")
    model: dict = Field(default_factory=lambda: dict(DEFAULT_STUDENT), description="the student's config (sample "
                        "size, channels and class count are read off the teacher)")
    beta_schedule: Literal[BETA_SCHEDULES] = Field("linear", description="annealing of the noise blend beta from 1 "
                                                   "to 0 (constant: beta_value throughout; 0 is plain reflow)")
    beta_steps: int = Field(300_000, gt=0, description="K: beta reaches 0 at step K (linear, cosine); exp: e^-k/K")
    beta_value: float = Field(0.0, ge=0, le=1, description="beta of the constant schedule")
    hflip: bool = Field(False, description="flip both ends of a pair horizontally with probability 1/2 (only for "
                        "teachers that are flip-equivariant: not for digits or text)")
    tau_min: float = Field(1e-3, gt=0, lt=0.5, description="smallest flow time drawn (SlimFlow's eps)")
    sample_steps: int = Field(4, gt=0, le=1000, description="Euler steps of the sample grids")
    optimizer: OptimizerConfig = OptimizerConfig(lr=2e-4, betas=(0.9, 0.999))


class SlimFlowReflow(Method):
    """Stage 1: annealing reflow of a small rectified flow on a teacher's (noise, sample) pairs (paper eq. 9)."""

    name = "slimflow_reflow"
    Config = SlimFlowReflowConfig
    ema_network = "model"

    def __init__(self, config: SlimFlowReflowConfig, teacher, data):
        super().__init__(config, teacher, data)
        from diffusers import FlowMatchEulerDiscreteScheduler

        from ..denoisers import denoiser_from_pretrained

        if data.extras is None or "noise" not in data.extras:
            raise ValueError(f"method slimflow_reflow trains on (noise, sample) pairs, but dataset {data.name!r} "
                             "has no stored noise; set data.name: pairs:DIR (written by `onestep pairs TEACHER "
                             "--out DIR`)")
        shape, classes = self.teacher.sample_shape, self.teacher.num_classes
        if config.hflip and len(shape) != 3:
            raise ValueError(f"method.hflip: flips need images, the teacher's samples have shape {list(shape)}")
        if len(shape) == 1:
            defaults = {"dim": shape[0], "num_classes": classes}
        else:
            defaults = {"sample_size": shape[-1], "in_channels": shape[0], "out_channels": shape[0],
                        "num_class_embeds": classes}
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLOW_SCHEDULER)
        self.student = denoiser_from_pretrained(build_network(config.model_class, config.model, **defaults),
                                                self.scheduler)
        self.num_parameters = count_parameters(self.student)
        self.teacher_parameters = count_parameters(self.teacher.denoiser)
        print(f"slimflow_reflow: student {config.model_class} {self.num_parameters:,} parameters, teacher "
              f"{self.teacher_parameters:,} ({self.num_parameters / self.teacher_parameters:.3f}x)")

    @property
    def denoiser(self):
        return self.student

    def trainable(self):
        return {"model": (self.student, self.config.optimizer)}

    def step(self, batch: Batch, ctx) -> dict[str, float]:
        return ctx.update("model", lambda b: self.loss(b, ctx), batch)

    def beta(self, step: int) -> float:
        cfg = self.config
        return beta_schedule(step, cfg.beta_schedule, cfg.beta_steps, cfg.beta_value)

    def loss(self, batch: Batch, ctx) -> tuple[torch.Tensor, dict[str, float]]:
        x, z = batch.x, batch.extras["noise"]
        beta = self.beta(ctx.step)
        z_beta = blend_noise(z, torch.randn(z.shape, generator=ctx.rng, device=z.device), beta)
        if self.config.hflip:
            x, z_beta = flip_pairs(x, z_beta, torch.rand(len(x), generator=ctx.rng, device=x.device) < 0.5)
        schedule = self.student.schedule
        tau_max = schedule.sigma_max / (1 + schedule.sigma_max)  # the student's largest trained flow time
        tau_min = self.config.tau_min
        tau = tau_min + torch.rand(len(x), generator=ctx.rng, device=x.device) * (tau_max - tau_min)
        sigma = sigma_of_tau(tau)
        # D(x + sigma z_beta, sigma) - x = -tau (v_hat - (z_beta - x)): the flow-matching loss through the VE view
        x0_hat = ctx.net("model")(x + sigma.reshape(-1, *[1] * (x.dim() - 1)) * z_beta, sigma, **batch.cond)
        per_sample = schedule.loss_weight(sigma) * (x0_hat - x).flatten(1).pow(2).mean(1)
        loss = per_sample.mean()
        return loss, {"loss/reflow": loss.item(), "beta": beta}

    @torch.no_grad()
    def sample(self, network, noise, **cond):
        return sample_euler(network, noise, teacher_sigmas(network.schedule, self.config.sample_steps), **cond)

    def export(self, network, out_dir, card):
        card = {"method": f"SlimFlow annealing reflow (beta {self.config.beta_schedule}, K {self.config.beta_steps}, "
                          f"hflip {self.config.hflip})", "parameters": self.num_parameters,
                "teacher_parameters": self.teacher_parameters, **card}
        save_flow_folder(network.model, self.scheduler, Path(out_dir), card, self.teacher.edges.get("vae"))

    @classmethod
    def smoke_recipe(cls, teacher, variant=None):
        return {"teacher": teacher, "data": {"name": f"pairs:{smoke_pairs(teacher)}"},
                "method": {"name": cls.name, "beta_steps": 3, "hflip": True, "sample_steps": 2,
                           "model": {"block_out_channels": [4, 8], "norm_num_groups": 4, "layers_per_block": 1,
                                     "down_block_types": ["DownBlock2D", "DownBlock2D"],
                                     "up_block_types": ["UpBlock2D", "UpBlock2D"]}}}


# --- stage 2: flow-guided distillation -----------------------------------------------------------------------------
class SlimFlowDistillConfig(MethodConfig):
    name: Literal["slimflow_distill"] = "slimflow_distill"
    sigma_init: float | None = Field(None, gt=0, description="the one-step generator's input level "
                                     "G(z) = D(sigma_init z, sigma_init); default: the guide's largest (99 = flow "
                                     "time 0.99 for a flow guide)")
    distance: Literal["l2", "pseudo_huber", "lpips", "digits_features"] = Field(
        "l2", description="d(., .) of both losses; SlimFlow uses LPIPS, which needs the lpips package's weights")
    huber_c: float | None = Field(None, gt=0, description="pseudo-Huber c (default 0.00054 sqrt(dim))")
    pair_weight: float = Field(1.0, ge=0, description="weight of the pair loss d(G(z), x)")
    guidance_weight: float = Field(1.0, ge=0, description="weight of the 2-step guidance loss (0: pair "
                                   "distillation only)")
    guidance_times: tuple[float, float] = Field((0.2, 0.8), description="flow times tau ~ U[a, b] where the guide "
                                                "takes its step (SlimFlow's code: 0.2..0.8)")
    guidance_first_step: Literal["student", "teacher"] = Field(
        "student", description="who takes the first of the two Euler steps (the paper's better variant: student)")
    generator_network: NetworkConfig = NetworkConfig()
    optimizer: OptimizerConfig = OptimizerConfig(lr=2e-4, betas=(0.9, 0.999))

    @model_validator(mode="after")
    def _check(self):
        a, b = self.guidance_times
        if not 0 < a <= b < 1:
            raise ValueError(f"guidance_times: need 0 < a <= b < 1 (flow times), got {[a, b]}")
        if self.pair_weight == 0 and self.guidance_weight == 0:
            raise ValueError("pair_weight and guidance_weight are both 0: nothing to train")
        return self


class SlimFlowDistill(Method):
    """Stage 2: a one-step student from the stage-1 weights, pair loss + flow guidance by the frozen stage-1 EMA
    (the teacher folder of this recipe)."""

    name = "slimflow_distill"
    Config = SlimFlowDistillConfig
    smoke_variants = ("student", "teacher")

    def __init__(self, config: SlimFlowDistillConfig, teacher, data):
        super().__init__(config, teacher, data)
        has_pairs = data.extras is not None and "noise" in data.extras
        if config.pair_weight > 0 and not has_pairs:
            raise ValueError(f"method slimflow_distill: the pair loss needs (noise, sample) pairs, but dataset "
                             f"{data.name!r} has no stored noise; set data.name: pairs:DIR, or pair_weight: 0")
        sigma_init = config.sigma_init if config.sigma_init is not None else teacher.denoiser.schedule.sigma_max
        self.gen = OneStepGenerator(trainable_copy(teacher.denoiser, config.generator_network), sigma_init)
        self.distance = Distance(config.distance, config.huber_c)
        self.num_parameters = count_parameters(self.gen)

    def trainable(self):
        return {"generator": (self.gen, self.config.optimizer)}

    def step(self, batch: Batch, ctx) -> dict[str, float]:
        return ctx.update("generator", lambda b: self.loss(b, ctx), batch)

    def loss(self, batch: Batch, ctx) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, n, guide = self.config, len(batch), self.denoiser
        zeta = torch.randn((n, *self.sample_shape), generator=ctx.rng, device=batch.device)
        use_pairs = cfg.pair_weight > 0
        noise = torch.cat([batch.extras["noise"], zeta]) if use_pairs else zeta
        cond = {k: torch.cat([v, v]) if use_pairs else v for k, v in batch.cond.items()}
        out = ctx.net("generator")(noise, **cond)                     # one pass for both losses
        x_pair, x_hat = (out[:n], out[n:]) if use_pairs else (None, out)
        loss, logs = out.new_zeros(()), {}
        if use_pairs:                                                   # (A) d(G(z), x) on the teacher's pairs
            loss_pair = self.distance(x_pair, batch.x).mean()
            loss = loss + cfg.pair_weight * loss_pair
            logs["loss/pair"] = loss_pair.item()
        if cfg.guidance_weight > 0:                                     # (B) 2-step Euler target from fresh noise
            a, b = cfg.guidance_times
            sigma = sigma_of_tau(a + torch.rand(n, generator=ctx.rng, device=batch.device) * (b - a))
            with torch.no_grad():
                first = x_hat if cfg.guidance_first_step == "student" else \
                    guide(self.gen.sigma_init * zeta, self.gen.sigma_init, **batch.cond)
                target = guide(first.detach() + sigma.reshape(-1, *[1] * (zeta.dim() - 1)) * zeta, sigma,
                               **batch.cond)
            loss_guide = self.distance(x_hat, target).mean()
            loss = loss + cfg.guidance_weight * loss_guide
            logs["loss/guidance"] = loss_guide.item()
        return loss, logs

    @torch.no_grad()
    def sample(self, network, noise, **cond):
        return network(noise, **cond)

    def export(self, network, out_dir, card):
        from ..pipelines import OneStepPipeline

        card = {"method": f"SlimFlow flow-guided distillation ({self.config.distance}, pair {self.config.pair_weight}"
                          f", guidance {self.config.guidance_weight})", "parameters": self.num_parameters, **card}
        OneStepPipeline.from_generator(network, self.teacher.scheduler, card, self.teacher.edges).save_pretrained(
            Path(out_dir))

    @classmethod
    def smoke_recipe(cls, teacher, variant="student"):
        return {"teacher": teacher, "data": {"name": f"pairs:{smoke_pairs(teacher)}"},
                "method": {"name": cls.name, "distance": "pseudo_huber", "guidance_first_step": variant}}


# --- folders -------------------------------------------------------------------------------------------------------
def save_flow_folder(model, scheduler, out_dir: Path, card: dict | None = None, vae=None) -> None:
    """A diffusers folder of a rectified flow (model_index.json, unet/, scheduler/ with the flow-matching config,
    vae/ for a latent teacher's pairs) that `onestep.denoisers.load_teacher` and `load_pipeline` read as a teacher."""
    from .dsm import save_teacher_folder

    save_teacher_folder(model, scheduler, out_dir, card)
    if vae is not None:
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
        index = json.loads((out_dir / "model_index.json").read_text())
        index["vae"] = [type(vae).__module__.split(".")[0], type(vae).__name__]
        (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def smoke_pairs(teacher: str, num: int = 16) -> Path:
    """A few (noise, sample) pairs of `teacher` (2 Euler steps) in a cache folder, for the smoke recipes."""
    import hashlib
    import tempfile

    from ..data.pairs import write_pairs
    from ..denoisers import load_teacher

    key = hashlib.sha1(str(Path(teacher).resolve()).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / "onestep_slimflow_smoke" / key
    network = load_teacher(teacher)
    sigmas = teacher_sigmas(network.schedule, 2)

    def sample_fn(noise, class_labels):
        return sample_euler(network, noise, sigmas, **({} if class_labels is None else {"class_labels": class_labels}))

    write_pairs(sample_fn, network.sample_shape, num, out, num_classes=network.num_classes, shard_size=num,
                source={"teacher": str(Path(teacher).resolve()), "sampler": "euler", "steps": 2}, progress=False)
    return out
