"""Noise Consistency Training (NCT): a new control for a frozen one-step generator, with no teacher and no data.

Luo, Xue, Hu & Tang, "Noise Consistency Training: A Native Approach for One-Step Generator in Learning Additional
Controls", NeurIPS 2025 (arXiv 2506.19741), Algorithm 1. A frozen one-step generator f: z -> x (any onestep export),
a control model C: x -> c (`onestep.controls`), and a trainable adapter phi (`onestep.adapters`: ControlNet, zero
initialised so that f_phi(z, c) = f(z) before training). Each step, with z, eps ~ N(0, I) independent:

    x = f(z),  c = C(x)                                       (no gradient: the generator labels its own controls)
    z_t = alpha_t z + sigma_t eps,  alpha_t^2 + sigma_t^2 = 1  (noise diffused in the generator's *input* space)
    k ~ U{0..N-1} on the grid 0 = t_0 < ... < t_N = 1
    L_con   = d(f_phi(z_{t_k+1}, c), sg[f_phi(z_{t_k}, c)])  (same eps: adjacent levels of one path; eq. 10)
    L_bound = d(f_phi(z, c), x)                               (the boundary at t = 0; eq. 11)
    phi    <- phi - lr grad(L_con + lambda L_bound)           (primal step)
    lambda <- max(0, lambda + eta (L_bound - xi))             (dual step: projected ascent on the constraint
                                                               L_bound <= xi of Definition 1)

At t = 0 the pair (z, c) is coupled (z made the image whose control is c); at t = 1, z_1 = eps is independent of c, so
chaining the levels teaches the adapter to map independent (noise, control) pairs to images that have that control.
d is L2 (mean over dimensions) or pseudo-Huber sqrt(|a - b|^2 + c^2) - c (Remark 1; c = 0.00054 sqrt(dim) as iCT),
computed in the generator's output space (latents for latent generators, as the paper's f maps to R^n).

`objective: regression` is the baseline the paper argues against (sec. 3.1): the same adapter trained with
d(f_phi(z, C(x_data)), x_data) on (control, image) pairs of the data, z independent of the image; its optimum is
E[x | c], a blurred image.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..adapters import attached, make_adapter
from ..controls import control_model
from .base import Batch, Method, MethodConfig, OptimizerConfig


# --- the algorithm's pieces, usable on their own (the 2-D oracle in tests/test_nct.py runs them) -----------------
def noise_levels(num_levels: int, schedule: str = "sine") -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_k, sigma_k) for k = 0..N on t_k = k / N: sigma = sin(pi t / 2), alpha = cos (or sigma = t,
    alpha = sqrt(1 - t^2)); alpha_0 = 1, sigma_0 = 0 exactly, alpha_N = 0, sigma_N = 1."""
    t = torch.arange(num_levels + 1, dtype=torch.float64) / num_levels
    if schedule == "sine":
        sigma, alpha = torch.sin(math.pi / 2 * t), torch.cos(math.pi / 2 * t)
        alpha[-1] = 0.0
    else:
        sigma, alpha = t, (1 - t.square()).sqrt()
    return alpha, sigma


def diffuse(z: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_t = alpha z + sigma eps, per sample (alpha, sigma: [B]); N(0, I) again for every level."""
    shape = (-1, *[1] * (z.dim() - 1))
    return alpha.to(z.dtype).reshape(shape) * z + sigma.to(z.dtype).reshape(shape) * eps


def distance(a: torch.Tensor, b: torch.Tensor, kind: str = "pseudo_huber", huber_c: float | None = None):
    """Per-sample d(a, b): L2 as the mean squared difference, or pseudo-Huber sqrt(|a - b|^2 + c^2) - c."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.square().mean(1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if huber_c is None else huber_c
    return (diff.square().sum(1) + c * c).sqrt() - c


def nct_losses(adapted, z, eps, x, c, k, alpha, sigma, kind="pseudo_huber", huber_c=None, consistency=True,
               boundary=True):
    """(L_con, L_bound) per sample for `adapted(z, c) -> output` (the adapted generator, trainable), eqs. 10-11.
    The higher level and the boundary share one batched call; the lower level is a stop-gradient target."""
    n = len(z)
    inputs, controls = [], []
    if consistency:
        inputs.append(diffuse(z, eps, alpha[k + 1], sigma[k + 1]))
        controls.append(c)
    if boundary:
        inputs.append(z)
        controls.append(c)
    out = adapted(torch.cat(inputs), torch.cat(controls))
    zero = torch.zeros(n, device=z.device)
    l_con, l_bound = zero, zero
    if consistency:
        with torch.no_grad():
            target = adapted(diffuse(z, eps, alpha[k], sigma[k]), c)
        l_con = distance(out[:n], target, kind, huber_c)
    if boundary:
        l_bound = distance(out[-n:], x, kind, huber_c)
    return l_con, l_bound


def dual_update(lam: torch.Tensor, l_bound: float, margin: float, step_size: float) -> torch.Tensor:
    """lambda <- max(0, lambda + eta (L_bound - xi)): projected gradient ascent on the Lagrangian of
    min L_con s.t. L_bound <= xi (the paper's primal-dual iteration)."""
    return (lam + step_size * (l_bound - margin)).clamp_min(0.0)


# --- the method ------------------------------------------------------------------------------------------------
class NCTConfig(MethodConfig):
    name: Literal["nct"] = "nct"
    control: str | dict = Field("sobel", description="control model: a name (sobel, canny, lowres, blur, brightness, "
                                "or one registered with onestep.controls.register_control) or {name, ...options}")
    objective: Literal["nct", "regression"] = Field(
        "nct", description="nct: Algorithm 1; regression: the data-pair baseline d(f(z, C(x_data)), x_data)")
    num_levels: int = Field(20, ge=1, le=10_000, description="N: levels of the noise grid t_k = k / N")
    noise_schedule: Literal["sine", "linear"] = Field("sine", description="sigma_t = sin(pi t / 2) or t")
    distance: Literal["pseudo_huber", "l2"] = "pseudo_huber"
    huber_c: float | None = Field(None, gt=0, description="pseudo-Huber c (default 0.00054 sqrt(dim), iCT)")
    margin: float = Field(0.05, ge=0, description="xi: the boundary constraint L_bound <= xi")
    dual_lr: float = Field(0.01, ge=0, description="eta: the dual step size (0: fixed lambda)")
    lambda_init: float = Field(1.0, ge=0, description="lambda_0")
    use_consistency: bool = Field(True, description="ablation switch: false drops L_con")
    use_boundary: bool = Field(True, description="ablation switch: false drops L_bound (and lambda)")
    embedding_channels: list[int] | None = Field(None, description="the adapter's control-embedding widths")
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, betas=(0.9, 0.95))


class NoiseConsistencyTraining(Method):
    name = "nct"
    Config = NCTConfig
    teacher_kind = "one_step"
    ema_network = "adapter"
    smoke_variants = ("nct", "regression")

    def __init__(self, config: NCTConfig, teacher, data):
        super().__init__(config, teacher, data)
        self.base = teacher.generator.requires_grad_(False).eval()
        self.control = control_model(config.control)
        if config.objective == "regression" and data.x is None:
            raise ValueError(f"method.objective: regression trains on (control, image) pairs, but dataset "
                             f"{data.name!r} has no images; use objective: nct")
        with torch.no_grad():  # the control's channels and resolution, from one sample
            probe = self.controls(torch.zeros(1, *self.sample_shape), {k: v[:1] for k, v in (data.cond or {}).items()})
        downscale = probe.shape[-1] // self.sample_shape[-1]
        self.adapter = make_adapter(self.base.denoiser.model, probe.shape[1], max(downscale, 1),
                                    config.embedding_channels and tuple(config.embedding_channels))
        self.alpha, self.sigma = noise_levels(config.num_levels, config.noise_schedule)
        self.lam = torch.tensor(float(config.lambda_init), dtype=torch.float64)

    def trainable(self):
        return {"adapter": (self.adapter, self.config.optimizer)}

    # the adapted generator f_phi(z, c) and the controls C(f(z)) -------------------------------------------------
    def adapted(self, adapter, z, c, cond):
        with attached(self.base.denoiser.model, [(adapter, c, 1.0)]):
            return self.base(z, **cond)

    @torch.no_grad()
    def controls(self, z, cond):
        """C(f(z)) in pixel space (latent generators are decoded first)."""
        return self.control(self.teacher.to_pixels(self.base(z, **cond)))

    # one step ---------------------------------------------------------------------------------------------------
    def step(self, batch: Batch, ctx) -> dict[str, float]:
        cfg, n = self.config, len(batch)
        z = torch.randn((n, *self.sample_shape), generator=ctx.rng, device=batch.device)
        eps = torch.randn(z.shape, generator=ctx.rng, device=batch.device)
        k = torch.randint(0, cfg.num_levels, (n,), generator=ctx.rng, device=batch.device)
        with torch.no_grad():
            x = batch.x if cfg.objective == "regression" else self.base(z, **batch.cond)
            c = self.control(self.teacher.to_pixels(x))
        work = Batch(x=x, cond=batch.cond, size=n, device=batch.device, extras={"z": z, "eps": eps, "k": k, "c": c})
        logs = ctx.update("adapter", lambda b: self.loss(b, ctx), work)
        if cfg.objective == "nct" and cfg.use_boundary:
            l_bound = float(ctx.mean_across_processes(torch.tensor(logs["loss/bound"], device=batch.device)))
            self.lam = dual_update(self.lam, l_bound, cfg.margin, cfg.dual_lr)
        logs["dual/lambda"] = float(self.lam)
        return logs

    def loss(self, b: Batch, ctx) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, e = self.config, b.extras
        net = ctx.net("adapter")
        adapted = lambda z, c: self.adapted(net, z, c, {k: torch.cat([v] * (len(z) // len(b))) for k, v in  # noqa: E731
                                                          b.cond.items()})
        if cfg.objective == "regression":  # z independent of the data image: the optimum is E[x | c]
            loss = distance(adapted(e["z"], e["c"]), b.x, cfg.distance, cfg.huber_c).mean()
            return loss, {"loss/regression": loss.item()}
        l_con, l_bound = nct_losses(adapted, e["z"], e["eps"], b.x, e["c"], e["k"], self.alpha, self.sigma,
                                    cfg.distance, cfg.huber_c, cfg.use_consistency, cfg.use_boundary)
        lam = float(self.lam) if cfg.use_boundary else 0.0
        loss = l_con.mean() + lam * l_bound.mean()
        return loss, {"loss/con": l_con.mean().item(), "loss/bound": l_bound.mean().item()}

    # state, samples, export -------------------------------------------------------------------------------------
    def state_dict(self):
        return {"lambda": self.lam.clone()}

    def load_state_dict(self, state):
        if set(state) != {"lambda"}:
            raise ValueError(f"method nct keeps its dual variable 'lambda'; the checkpoint holds {sorted(state)}")
        self.lam = state["lambda"].to(torch.float64).clone()

    def sample_controls(self, noise, cond) -> torch.Tensor:
        """Controls for sample grids and evaluation: C of base samples from other noise (fixed seed), so the
        adapted samples must follow a control that their own noise did not make."""
        other = torch.randn(noise.shape, generator=torch.Generator().manual_seed(20250624)).to(noise.device)
        return self.controls(other, cond)

    @torch.no_grad()
    def sample(self, network, noise, **cond):
        return self.adapted(network, noise, self.sample_controls(noise, cond), cond)

    def export(self, network, out_dir, card):
        from ..pipelines.controlled import ControlledOneStepPipeline

        card = {"method": f"NCT ({self.config.objective}, control {self.control!r})", **card}
        pipe = ControlledOneStepPipeline.from_generator(self.base, self.teacher.scheduler, card, self.teacher.edges)
        pipe.add_adapter(network, self.control.spec)
        pipe.save_pretrained(Path(out_dir))

    @classmethod
    def smoke_recipe(cls, teacher, variant="nct"):
        return {"teacher": teacher, "data": {"name": "digits", "resolution": 8},
                "method": {"name": cls.name, "objective": variant, "control": {"name": "lowres", "factor": 2},
                           "num_levels": 4, "optimizer": {"lr": 1e-3}}}
