"""Uni-Instruct: one-step generators by expanded f-divergence minimisation, and the methods it contains.

Wang et al., "Uni-Instruct: One-step Diffusion Model through Unified Diffusion Divergence Instruction",
NeurIPS 2025 (arXiv 2505.20755). With x0 = G(z), x_t = x0 + sigma eps (VE), frozen teacher D_p and fake score D_q,
delta = s_p - s_q = (D_p - D_q)/sigma^2, B = s_q - grad log q(x_t|x0) = (D_q - x0)/sigma^2 and r = p_t/q_t, the
gradient of the expanded divergence  int w(t) E_q[h(r) ||delta||^2] dt  (h = r^2 f'') equals the pathwise
gradient of (Wang et al. 2025, Theorem 3.3; `onestep.losses.UniInstructLoss`; docs/uni_instruct.md sec. 2):

    L_UI = w [ 2 sg[h] delta.B  +  sg[h - r h'] ||delta||^2  +  sg[-r^2 h'' ||delta||^2 delta + 2 r h' (delta.B) delta] . x_t ]
              ("sim" term)          ("fgm" term)                 ("di" term: a frozen direction)

with the SiD weight w = sigma^4 / wf, wf = mean|x0 - D_p| (Zhou et al. 2024). Special cases, all selectable here:

* SiD(alpha) (Zhou et al., ICML 2024, eq. 8): reverse KL with term weights (1/2, 1 - alpha, 0);
* Diff-Instruct / DMD / DMD2 / f-distill (Luo et al. 2023; Yin et al. 2024; Xu et al. 2025): `loss: dmd`, the
  per-time f-divergence whose gradient is the frozen direction h(r) (D_q - D_p)/wf on x0 (h = 1: DI/DMD);
* the density ratio r comes from a logit head on the fake-score bottleneck trained with BCE (optimal logit
  log p/q), clamped and mean-normalised as in FastGen's f-distill; an optional GAN term as in SiDA/DMD2.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..generators import OneStepGenerator
from ..lora import has_lora, merge_lora
from ..losses import DIVERGENCES, DistributionMatchingLoss, GANLoss, UniInstructLoss, density_ratio, h_terms
from ..networks import FakeScore
from ..schedules import karras_sigma_at, lognormal_sigmas
from .base import Batch, Method, MethodConfig, NetworkConfig, OptimizerConfig, frozen, trainable_copy


# --------------------------------------------------------------------------------------------------------------
class UniInstructConfig(MethodConfig):
    name: Literal["uni_instruct"] = "uni_instruct"
    loss: Literal["ui", "sid", "dmd"] = Field("sid", description="ui: 3-term surrogate; sid: SiD(alpha); dmd: "
                                              "frozen direction (Diff-Instruct/DMD2/f-distill)")
    divergence: Literal[DIVERGENCES] = "rkl"
    alpha: float = Field(1.2, description="SiD alpha (loss: sid only)")
    terms: tuple[float, float, float] = Field((1.0, 1.0, 1.0), description="UI (sim, fgm, di) term weights")
    sigma_init: float = Field(2.5, gt=0)
    tmax: int = Field(800, gt=0, le=1000, description="generator-loss sigma: Karras grid position u <= tmax/1000")
    generator_timesteps: tuple[float, float] | None = Field(
        None, description="[t_min, t_max] in the teacher's native timesteps: the generator-loss noise level is drawn "
        "within this window (a truncated draw, nothing piles up on its ends); default: the teacher schedule's, "
        "[20, 979] of 1000 steps for DDPM-style teachers as in SiD-LSG and DMD2, the full range otherwise")
    generator_sigma: Literal["karras", "uniform"] = Field(
        "karras", description="generator-loss noise level within the window: karras: SiD's Karras draw (see tmax); "
        "uniform: the native timestep uniform on the window, as DMD2 draws it (`randint(min_step, max_step)`)")
    fake_sigma: Literal["native", "lognormal"] = "native"
    generator_loss_scale: float = Field(100.0, gt=0)        # SiD's lsg
    gan_weight: float = Field(0.0, ge=0, description="generator GAN term weight, 0 = off (needs real samples). Not "
                              "SiDA's number: SiDA's lsg_gan 0.01 is 0.01 mean(C*H*W / wf) here, measured 22 for "
                              "1x16x16 digits and 1.4 on the 2-D grid (bench/gan_scale.py, docs/uni_instruct.md "
                              "sec. 8)")
    discriminator_weight: float = Field(1.0, ge=0)
    fake_steps_per_generator_step: int = Field(1, ge=1)
    fake_samples: Literal["fresh", "generator_step"] = Field(
        "fresh", description="what the fake score's first update of a step trains on: fresh: a new generator draw "
        "(SiD's order: fake update, then generator update); generator_step: the generator update's own samples, "
        "detached (DMD2's order: generator update first), which saves one generator forward per step")
    generator_start_step: int = Field(0, ge=0, description="fake-score warm-up: no generator update before this")
    divergence_start_step: int = Field(0, ge=0, description="the reverse-KL loss (SiD alpha = 1; DMD for loss: dmd) "
                                       "before this step, the chosen divergence from it on")
    gan_start_step: int = Field(0, ge=0)
    normalize_h: bool = True
    generator_optimizer: OptimizerConfig = OptimizerConfig()
    fake_optimizer: OptimizerConfig = OptimizerConfig()
    generator_network: NetworkConfig = NetworkConfig()
    fake_network: NetworkConfig = NetworkConfig()
    export: Literal["merged", "lora"] = Field("merged", description="LoRA students: merge the adapter into the "
                                              "exported weights, or keep it as a separate file")

    @model_validator(mode="after")
    def _check(self):
        if self.generator_timesteps is not None and not self.generator_timesteps[0] < self.generator_timesteps[1]:
            raise ValueError(f"generator_timesteps: need t_min < t_max, got {list(self.generator_timesteps)}")
        if self.loss == "sid" and self.divergence != "rkl":
            raise ValueError("loss 'sid' is the reverse-KL (Fisher) case: set divergence: rkl, or use loss: ui "
                             f"for divergence {self.divergence!r}")
        return self

    @property
    def needs_ratio(self) -> bool:
        return self.divergence != "rkl"


class UniInstruct(Method):
    name = "uni_instruct"
    Config = UniInstructConfig
    smoke_variants = ("sid", "dmd", "ui")

    def __init__(self, config: UniInstructConfig, teacher, data):
        super().__init__(config, teacher, data)
        self._samples: list[torch.Tensor] = []  # the last generator update's detached x0, per micro-batch
        self.gen = OneStepGenerator(trainable_copy(teacher.denoiser, config.generator_network), config.sigma_init)
        example = {k: v[:1] for k, v in (data.cond or {}).items()}
        with_head = config.needs_ratio or config.gan_weight > 0
        if with_head and data.x is None:
            raise ValueError("method: the density ratio (divergence other than rkl) and the GAN term need real "
                             f"samples, but dataset {data.name!r} has none; use divergence: rkl and gan_weight: 0")
        self.fake = FakeScore(trainable_copy(teacher.denoiser, config.fake_network), with_head, example)
        self.gan = GANLoss("non_saturating")
        if config.loss == "dmd":
            self.loss = DistributionMatchingLoss(config.divergence)
        elif config.loss == "sid":
            self.loss = UniInstructLoss.sid(config.alpha)
        else:
            self.loss = UniInstructLoss(config.divergence, *config.terms)

    def trainable(self):
        return {"fake_score": (self.fake, self.config.fake_optimizer),
                "generator": (self.gen, self.config.generator_optimizer)}

    def step(self, batch: Batch, ctx) -> dict[str, float]:
        logs, cfg = {}, self.config
        train_generator = ctx.step >= cfg.generator_start_step
        reuse = train_generator and cfg.fake_samples == "generator_step"
        if reuse:  # DMD2's order: the generator update first; its detached samples train the fake score
            logs.update(self.generator_step(batch, ctx))
            samples = torch.cat(self._samples)  # micro-batches in row order
        for i in range(cfg.fake_steps_per_generator_step):
            logs.update(self.fake_score_step(batch.with_extras(generator_samples=samples) if reuse and i == 0
                                             else batch, ctx))
        if train_generator and not reuse:
            logs.update(self.generator_step(batch, ctx))
        return logs

    # (A) fake score (+ discriminator): denoising score matching on detached generator samples
    def fake_score_step(self, batch: Batch, ctx) -> dict[str, float]:
        return ctx.update("fake_score", lambda b: self.fake_score_loss(b, ctx), batch)

    def fake_score_loss(self, batch: Batch, ctx) -> tuple[torch.Tensor, dict[str, float]]:
        """DSM of the fake score on the batch's `generator_samples` (detached), else on a fresh generator draw."""
        cfg, n = self.config, len(batch)
        x_g = batch.extras.get("generator_samples")
        if x_g is None:
            with torch.no_grad():
                x_g = self.gen(self.noise(batch, ctx), **batch.cond)
        sigma = self.fake_sigmas(n, ctx, batch.device)
        eps = torch.randn(x_g.shape, generator=ctx.rng, device=x_g.device)
        train_d = self.fake.head is not None
        x_in, cond = x_g + _bc(sigma, x_g) * eps, batch.cond
        if train_d:  # one pass over fakes and reals, same sigma and noise for both (SiDA)
            x_in = torch.cat([x_in, batch.x + _bc(sigma, x_g) * eps])
            cond = {k: torch.cat([v, v]) for k, v in batch.cond.items()}
            sigma2 = torch.cat([sigma, sigma])
        d_fake, logit = ctx.net("fake_score")(x_in, sigma2 if train_d else sigma, with_logit=train_d, **cond)
        weight = self.denoiser.schedule.loss_weight(sigma)
        loss_dsm = (weight * (d_fake[:n] - x_g).flatten(1).pow(2).sum(1)).mean()
        logs = {"loss/fake_dsm": loss_dsm.item()}
        loss = loss_dsm
        if train_d:
            loss_d = self.gan.discriminator(logit_real=logit[n:], logit_fake=logit[:n])
            loss = loss + cfg.discriminator_weight * loss_d
            logs["loss/discriminator"] = loss_d.item()
        return loss, logs

    # (B) generator: the Uni-Instruct / SiD / DMD surrogate through frozen teacher and fake score
    def generator_step(self, batch: Batch, ctx) -> dict[str, float]:
        self._samples = []  # each micro-batch's detached x0, in row order
        with frozen(self.fake):  # through backward too: gradient checkpointing re-runs the fake's forward there
            return ctx.update("generator", lambda b: self.generator_loss(b, ctx), batch)

    def generator_loss(self, batch: Batch, ctx) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        x0 = ctx.net("generator")(self.noise(batch, ctx), **batch.cond)
        self._samples.append(x0.detach())  # for fake_samples: generator_step
        sigma = self.generator_sigmas(len(batch), ctx, x0.device)
        x_t = x0 + _bc(sigma, x0) * torch.randn(x0.shape, generator=ctx.rng, device=x0.device)
        use_ratio = cfg.needs_ratio and ctx.step >= cfg.divergence_start_step
        use_gan = cfg.gan_weight > 0 and ctx.step >= cfg.gan_start_step
        # divergence warm-up: the reverse-KL loss itself (not r = 1 put into another divergence's terms)
        loss_fn = self.loss if use_ratio or not cfg.needs_ratio else _reverse_kl_form(self.loss)
        input_grads = not isinstance(loss_fn, DistributionMatchingLoss) or use_gan  # DMD's direction is detached
        with torch.set_grad_enabled(input_grads):
            d_teacher = self.denoiser(x_t, sigma, **batch.cond)
            d_fake, logit = self.fake(x_t, sigma, with_logit=use_ratio or use_gan, **batch.cond)
        wf = (x0 - d_teacher).abs().flatten(1).mean(1).detach().clamp_min(1e-5)
        r = density_ratio(logit) if use_ratio else torch.ones_like(sigma)
        per_sample = loss_fn(x0, d_teacher, d_fake, r, wf, sigma)
        if use_ratio and cfg.normalize_h:  # mean-normalised h (FastGen f-distill): only the step size changes
            per_sample = per_sample / ctx.mean_across_processes(h_terms(cfg.divergence, r)[0].mean())
        loss = cfg.generator_loss_scale * per_sample.mean()
        logs = {"loss/generator": loss.item(), "ratio/mean": r.mean().item()}
        if use_gan:
            loss_gan = self.gan.generator(logit_fake=logit)   # non-saturating GAN (SiDA, DMD2)
            loss = loss + cfg.gan_weight * loss_gan
            logs["loss/generator_gan"] = loss_gan.item()
        return loss, logs

    # --- helpers ---------------------------------------------------------------------------------------------
    def noise(self, batch: Batch, ctx) -> torch.Tensor:
        return torch.randn((len(batch), *self.sample_shape), generator=ctx.rng, device=batch.device)

    def generator_sigmas(self, n, ctx, device):
        """SiD's Karras draw (u ~ U[0, tmax/1000], `karras_sigmas`), shifted as the teacher samples, conditioned on
        the timestep window [t_min, t_max]: u is drawn uniformly on the sub-interval of [0, u_max] whose noise level
        falls inside the window (the level increases with u), so the in-window density is the Karras one and no
        draw is clamped onto an end (clamping put 17.7 % of SD's draws at t = 0 and 9.6 % at t = 999).
        `generator_sigma: uniform` draws the native timestep uniformly on the window instead (DMD2,
        github.com/tianweiy/DMD2, `torch.randint(min_step, max_step)`)."""
        schedule = self.denoiser.schedule
        t_min, t_max = self.config.generator_timesteps or schedule.distillation_window()
        if self.config.generator_sigma == "uniform":
            t = t_min + torch.rand(n, generator=ctx.rng, device=device, dtype=torch.float64) * (t_max - t_min)
            return self.denoiser.round_sigma(schedule.sigma_of_timestep(t)).float().to(device)
        lo, hi = (float(schedule.sigma_of_timestep(torch.tensor(t, dtype=torch.float64))) for t in (t_min, t_max))
        level = lambda u: float(schedule.shifted(karras_sigma_at(torch.tensor(u, dtype=torch.float64))))  # noqa: E731
        u_max = self.config.tmax / 1000
        u_lo, u_hi = _first_u_at_or_above(level, lo, 0.0, u_max), _last_u_at_or_below(level, hi, 0.0, u_max)
        if not (u_lo <= u_hi and lo * (1 - 1e-6) <= level(u_lo) <= hi * (1 + 1e-6)):
            raise ValueError(f"method.generator_timesteps: the window [{t_min:g}, {t_max:g}] (sigma {lo:.4g} to "
                             f"{hi:.4g}) holds no noise level of the Karras draw with tmax {self.config.tmax}; "
                             "widen the window or raise tmax")
        u = u_lo + torch.rand(n, generator=ctx.rng, device=device, dtype=torch.float64) * (u_hi - u_lo)
        sigma = schedule.shifted(karras_sigma_at(u))
        return self.denoiser.round_sigma(sigma).float().to(device)

    def fake_sigmas(self, n, ctx, device):
        if self.config.fake_sigma == "native":
            sigma = self.denoiser.schedule.training_sigmas(n, ctx.rng, device=device)
        else:
            sigma = self.denoiser.schedule.shifted(lognormal_sigmas(n, ctx.rng, device=device))
        return self.denoiser.round_sigma(sigma).float().to(device)

    @torch.no_grad()
    def sample(self, network, noise, **cond):
        return network(noise, **cond)

    def export(self, network, out_dir, card):
        from ..pipelines import OneStepPipeline

        card = {"method": f"Uni-Instruct ({self.config.loss}, {self.config.divergence})", **card}
        if has_lora(network.denoiser.model) and self.config.export == "merged":
            network = copy.deepcopy(network)
            merge_lora(network.denoiser.model)
        OneStepPipeline.from_generator(network, self.teacher.scheduler, card, self.teacher.edges).save_pretrained(
            Path(out_dir))

    def generator(self) -> OneStepGenerator:
        return self.gen

    @classmethod
    def smoke_recipe(cls, teacher, variant="ui"):
        """sid / dmd: the reverse-KL cases; ui: forward KL with the density-ratio head and the GAN term."""
        method = {"sid": {"loss": "sid"}, "dmd": {"loss": "dmd"},
                  "ui": {"loss": "ui", "divergence": "fkl", "gan_weight": 1.0}}[variant]
        return {"teacher": teacher, "data": {"name": "digits", "resolution": 8},
                "method": {"name": cls.name, **method, "generator_optimizer": {"lr": 1e-3},
                           "fake_optimizer": {"lr": 1e-3}}}


def _reverse_kl_form(loss):
    """The reverse-KL loss of the same family, used before `divergence_start_step`: for the Uni-Instruct surrogate
    SiD with alpha = 1, (D_p - D_q).(D_q - x0) / wf, which is the official Uni-Instruct generator loss before its
    density ratio switches on (a-little-hoof/Uni_Instruct, `fsim_loss.py`); for the frozen direction, h = 1 (DMD)."""
    if isinstance(loss, DistributionMatchingLoss):
        return DistributionMatchingLoss("rkl")
    return UniInstructLoss.sid(alpha=1.0)


def _first_u_at_or_above(level, value: float, a: float, b: float) -> float:
    """Smallest u in [a, b] with level(u) >= value, for a non-decreasing level(u) (b if none), by bisection."""
    if level(a) >= value or level(b) < value:
        return a if level(a) >= value else b
    for _ in range(80):
        mid = (a + b) / 2
        a, b = (a, mid) if level(mid) >= value else (mid, b)
    return b


def _last_u_at_or_below(level, value: float, a: float, b: float) -> float:
    """Largest u in [a, b] with level(u) <= value, for a non-decreasing level(u) (a if none), by bisection."""
    if level(b) <= value or level(a) > value:
        return b if level(b) <= value else a
    for _ in range(80):
        mid = (a + b) / 2
        a, b = (mid, b) if level(mid) <= value else (a, mid)
    return a


def _bc(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample sigma [B] against x [B, ...]."""
    return sigma.reshape(-1, *([1] * (x.dim() - 1)))

