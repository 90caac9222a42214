"""DD2: one-step sampling of an image auto-regressive teacher by conditional score distillation.

Distilled Decoding 2 (Liu et al., NeurIPS 2025, arXiv 2510.21003), on top of Distilled Decoding 1 (Liu et al., ICLR
2025, arXiv 2412.17153). The teacher's law of token i given its prefix, sum_j p_j delta(c_j) over code vectors, is a
Gaussian mixture once noised, with the closed-form denoiser D_T (`onestep.ar_diffusion.teacher_denoiser`). The KL chain
rule KL(p_G || p_T) = sum_i E_{q_<i ~ p_G} KL(p_G(q_i | q_<i) || p_T(q_i | q_<i)) turns matching the joint law into
matching every per-position conditional law along the generator's own prefixes, which score distillation does
position by position. Two stages, both networks `onestep.ar_diffusion.ARDiffusionModel` (teacher backbone + diffusion
head), chained by `init_from`:

* `dd2_gts`, stage 1, ground-truth-score initialisation (DD2 sec. 3.3): regress the AR-diffusion model on the
  teacher's analytic denoiser, L_GTS = E ||D_A(x_t, t | q_<i) - D_T(x_t, t; p_i)||^2, prefixes q sampled from the
  teacher (data-free);
* `dd2`, stage 2, conditional score distillation (DD2 sec. 3.2, Alg. 1), alternating
  (a) the guidance network F (the generator's conditional score): denoising score matching on generator samples,
      L_F = E ||F(x_t, t | ids_<i) - q_i||^2;
  (b) the generator q = G(eps, c), prefix ids = nearest codes of sg(q), teacher laws p_i from one teacher-forcing pass
      over ids, and at every position the SiD loss (Zhou et al., ICML 2024, eq. 8; `UniInstructLoss.sid`):
      L_G = mean_{b,i} [(1 - alpha) ||D_T - D_F||^2 + (D_T - D_F).(D_F - q_i)] / wf_{b,i}, x_t = (1 - t) q + t e,
      gradients reaching q_i only through position i (the prefix is a stop-gradient code sequence).
  Both G and F start from the stage-1 model (`init_from`), as DD2's ablation requires.

Reconstruction choices (DD2 released no training code; each is a config field): the flow-matching path and uniform
t in [t_min, t_max]; x0-space MSE weights; the SiD normaliser wf = mean |q_i - D_T|; the head, preconditioning and
generator wiring of `ARDiffusionModel`; alpha 1.2; one guidance update per generator update.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..ar_diffusion import ARDiffusionModel, ar_diffusion_from_teacher, nearest_codes, teacher_denoiser
from ..losses import UniInstructLoss
from .base import Batch, Method, MethodConfig, OptimizerConfig, StrictModel, frozen


class HeadConfig(StrictModel):
    """The diffusion head of `ARDiffusionModel` (MAR-style; DD2 publishes no head architecture)."""

    head_width: int = Field(128, gt=0, description="width of the diffusion head's residual MLP")
    res_blocks: int = Field(3, ge=1, description="adaLN residual blocks in the head (MAR uses 3)")
    time_embed_dim: int = Field(64, gt=1)
    generator_t: float = Field(0.714, gt=0, le=1, description="the generator's noise level t_gen: G(eps) = "
                               "D(t_gen eps, t_gen); 0.714 is SiD's sigma_init 2.5 on the flow path (t = s/(1+s))")


class _DD2Base(MethodConfig):
    t_min: float = Field(0.02, gt=0, lt=1, description="noise levels t ~ U[t_min, t_max] per position")
    t_max: float = Field(0.98, gt=0, le=1)
    head: HeadConfig = HeadConfig()
    guidance_scale: float | None = Field(None, description="the teacher's CFG scale (default: its folder's)")
    temperature: float | None = Field(None, gt=0, description="the teacher's temperature (default: its folder's)")
    top_k: int | None = Field(None, ge=1, description="the teacher's top-k (default: its folder's)")

    @model_validator(mode="after")
    def _check(self):
        if not self.t_min < self.t_max:
            raise ValueError(f"t_min must be < t_max, got {self.t_min} and {self.t_max}")
        return self


class DD2GroundTruthScoreConfig(_DD2Base):
    name: Literal["dd2_gts"] = "dd2_gts"
    prefix: Literal["teacher", "data"] = Field("teacher", description="prefixes: teacher samples (data-free) or the "
                                               "data's images encoded by the teacher's tokenizer")
    prefix_pool: int = Field(0, ge=0, description="teacher prefixes: 0 draws fresh samples every step; N > 0 draws a "
                             "pool of N (balanced labels, seed 0) once and picks rows from it (n sequential teacher "
                             "steps per batch is most of a CPU step)")
    optimizer: OptimizerConfig = OptimizerConfig(lr=3e-4, betas=(0.9, 0.999))


class DD2Config(_DD2Base):
    name: Literal["dd2"] = "dd2"
    alpha: float = Field(1.2, description="SiD alpha: (1 - alpha) ||D_T - D_F||^2 + (D_T - D_F).(D_F - q)")
    generator_loss_scale: float = Field(1.0, gt=0)
    normalizer: Literal["position", "sample"] = Field("position", description="SiD's wf = mean |q - D_T| over one "
                                                      "position's d dims, or over the whole sample (n x d, SiD's own "
                                                      "per-image rule; steadier when d is small)")
    guidance_steps_per_generator_step: int = Field(1, ge=1)
    generator_start_step: int = Field(0, ge=0, description="guidance-network warm-up: no generator update before")
    # the guidance network must track the generator's law: 10x the generator's step (equal steps oscillated
    # between modes on the two-token toy of tests/test_dd2.py)
    generator_optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4)
    guidance_optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3)


class _TeacherLaw:
    """The teacher's per-position law p_i by teacher forcing, under the sampling transform its FD is quoted with."""

    def teacher_log_probs(self, ids: torch.Tensor, labels) -> torch.Tensor:
        cfg, model = self.config, self.teacher.model
        with torch.no_grad():
            logits = model.logits(ids, labels, guidance_scale=cfg.guidance_scale)
            return model.probs(logits, cfg.temperature, cfg.top_k).log()

    @property
    def codebook(self) -> torch.Tensor:
        return self.teacher.model.codebook.detach().float()

    @property
    def sample_shape(self):
        return tuple(self.teacher.sample_shape)

    @property
    def num_classes(self):
        return self.teacher.num_classes

    def noise_levels(self, shape, ctx, device) -> torch.Tensor:
        u = torch.rand(shape, generator=ctx.rng, device=device)
        return self.config.t_min + (self.config.t_max - self.config.t_min) * u

    def new_network(self) -> ARDiffusionModel:
        head = self.config.head.model_dump()
        return ar_diffusion_from_teacher(self.teacher.model, **head).float().train()

    @torch.no_grad()
    def sample(self, network, noise, **cond):
        return network.generate(noise, cond.get("class_labels"))

    def export(self, network, out_dir, card):
        from ..pipelines.dd2 import DD2Pipeline

        card = {"teacher": self.teacher.path, "method": self.card_method, **card}
        pipe = DD2Pipeline(generator=network, vq=self.teacher.model.vq, token_grid=list(self.teacher.model.token_grid))
        pipe.card = card
        pipe.save_pretrained(Path(out_dir))


class DD2GroundTruthScore(_TeacherLaw, Method):
    """Stage 1: the AR-diffusion model regressed on the teacher's analytic denoiser (GTS)."""

    name = "dd2_gts"
    Config = DD2GroundTruthScoreConfig
    teacher_kind = "autoregressive"
    ddp_find_unused_parameters = True  # ARDiffusionModel as denoiser skips `noise_in`, as G the token embedding
    ema_network = "model"
    card_method = "DD2 stage 1 (ground-truth score); exported as its untrained one-step generator"

    def __init__(self, config: DD2GroundTruthScoreConfig, teacher, data):
        super().__init__(config, teacher, data)
        if config.prefix == "data" and data.x is None:
            raise ValueError(f"method.prefix: data needs images, but dataset {data.name!r} has none; use teacher")
        self.model = self.new_network()
        self.pool = None
        if config.prefix == "teacher" and config.prefix_pool:
            self.pool = self._teacher_pool(config.prefix_pool)

    def trainable(self):
        return {"model": (self.model, self.config.optimizer)}

    def step(self, batch: Batch, ctx) -> dict[str, float]:
        return ctx.update("model", lambda b: self.loss(b, ctx), batch)

    @torch.no_grad()
    def _teacher_pool(self, size: int):
        """(ids [N, n], labels [N] or None): teacher samples drawn once, deterministically."""
        g = torch.Generator(device=self.codebook.device).manual_seed(0)
        k = self.num_classes
        labels = torch.arange(size, device=self.codebook.device) % k if k else None
        ids = torch.cat([self.teacher.model.sample(None if labels is None else labels[i:i + 256], g,
                                                   self.config.guidance_scale, self.config.temperature,
                                                   self.config.top_k, batch_size=min(256, size - i))
                         for i in range(0, size, 256)])
        return ids, labels

    def prefixes(self, batch: Batch, ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prefix ids [B, n], their class labels)."""
        labels = batch.cond.get("class_labels")
        if self.config.prefix == "data":
            return self.teacher.model.encode(batch.x), labels
        if self.pool is not None:
            ids, pool_labels = self.pool
            rows = torch.randint(len(ids), (len(batch),), generator=ctx.rng, device=ids.device)
            return ids[rows], None if pool_labels is None else pool_labels[rows]
        return self.teacher.model.sample(labels, ctx.rng, self.config.guidance_scale, self.config.temperature,
                                         self.config.top_k, batch_size=len(batch)), labels

    def loss(self, batch: Batch, ctx):
        ids, labels = self.prefixes(batch, ctx)
        log_p = self.teacher_log_probs(ids, labels)
        x0 = self.codebook[ids]
        t = self.noise_levels(ids.shape, ctx, x0.device)
        x_t = (1 - t[..., None]) * x0 + t[..., None] * torch.randn(x0.shape, generator=ctx.rng, device=x0.device)
        target = teacher_denoiser(x_t, t, log_p, self.codebook)
        pred = ctx.net("model")(x_t, t, ids, labels)
        loss = (pred - target).pow(2).sum(-1).mean()
        with torch.no_grad():  # DSM's noisier target, for comparison in the logs
            dsm = (pred - x0).pow(2).sum(-1).mean()
        return loss, {"loss/gts": loss.item(), "loss/dsm_equivalent": dsm.item()}

    @classmethod
    def smoke_recipe(cls, teacher, variant=None):
        return {"teacher": teacher, "data": {"name": "digits", "resolution": 8},
                "method": {"name": cls.name, "head": {"head_width": 16, "res_blocks": 1}, "prefix_pool": 8}}


class DD2(_TeacherLaw, Method):
    """Stage 2: alternating conditional score distillation (generator) and denoising (guidance network)."""

    name = "dd2"
    Config = DD2Config
    teacher_kind = "autoregressive"
    ddp_find_unused_parameters = True  # ARDiffusionModel as denoiser skips `noise_in`, as G the token embedding
    ema_network = "generator"
    card_method = "DD2 (conditional score distillation, one step)"

    def __init__(self, config: DD2Config, teacher, data):
        super().__init__(config, teacher, data)
        self.gen = self.new_network()
        self.guidance = self.new_network()
        self.sid = UniInstructLoss.sid(config.alpha)

    def trainable(self):
        return {"guidance": (self.guidance, self.config.guidance_optimizer),
                "generator": (self.gen, self.config.generator_optimizer)}

    def step(self, batch: Batch, ctx) -> dict[str, float]:
        logs = {}
        for _ in range(self.config.guidance_steps_per_generator_step):
            logs.update(ctx.update("guidance", lambda b: self.guidance_loss(b, ctx), batch))
        if ctx.step >= self.config.generator_start_step:
            with frozen(self.guidance):
                logs.update(ctx.update("generator", lambda b: self.generator_loss(b, ctx), batch))
        return logs

    def noise(self, batch: Batch, ctx) -> torch.Tensor:
        return torch.randn((len(batch), *self.sample_shape), generator=ctx.rng, device=batch.device)

    # (a) the guidance network: the generator's conditional score, by denoising its (detached) samples
    def guidance_loss(self, batch: Batch, ctx):
        labels = batch.cond.get("class_labels")
        with torch.no_grad():
            q = self.gen.generate(self.noise(batch, ctx), labels)
            ids = nearest_codes(q, self.codebook)
        t = self.noise_levels(ids.shape, ctx, q.device)
        x_t = (1 - t[..., None]) * q + t[..., None] * torch.randn(q.shape, generator=ctx.rng, device=q.device)
        loss = (ctx.net("guidance")(x_t, t, ids, labels) - q).pow(2).sum(-1).mean()
        return loss, {"loss/guidance": loss.item()}

    # (b) the generator: SiD at every position against the teacher's analytic conditional score
    def generator_loss(self, batch: Batch, ctx):
        labels = batch.cond.get("class_labels")
        q = ctx.net("generator")(noise=self.noise(batch, ctx), class_labels=labels)  # forward: DDP syncs the gradient
        loss, logs = self.csd_loss(q, labels, ctx)
        return self.config.generator_loss_scale * loss, logs

    def csd_loss(self, q: torch.Tensor, labels, ctx, per_position: bool = False):
        """mean over (sample, position) of the SiD loss of q_i given the quantised stop-gradient prefix."""
        ids = nearest_codes(q.detach(), self.codebook)
        log_p = self.teacher_log_probs(ids, labels)
        t = self.noise_levels(ids.shape, ctx, q.device)
        x_t = (1 - t[..., None]) * q + t[..., None] * torch.randn(q.shape, generator=ctx.rng, device=q.device)
        d_teacher = teacher_denoiser(x_t, t, log_p, self.codebook)
        d_guide = self.guidance(x_t, t, ids, labels)
        flat = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731  one "sample" per (b, i) position
        wf = (q - d_teacher).abs().detach()
        wf = wf.mean(-1) if self.config.normalizer == "position" else wf.mean((1, 2))[:, None].expand(ids.shape)
        wf = wf.clamp_min(1e-4).reshape(-1)
        per = self.sid(flat(q), flat(d_teacher), flat(d_guide), torch.ones_like(wf), wf, t.reshape(-1))
        per = per.reshape(ids.shape)
        logs = {"loss/csd": per.mean().item(), "csd/teacher_minus_guidance": (d_teacher - d_guide).norm(dim=-1)
                .mean().item(), "csd/distance_to_code": (q - self.codebook[ids]).norm(dim=-1).mean().item()}
        return (per if per_position else per.mean()), logs

    @classmethod
    def smoke_recipe(cls, teacher, variant=None):
        return {"teacher": teacher, "data": {"name": "digits", "resolution": 8},
                "method": {"name": cls.name, "head": {"head_width": 16, "res_blocks": 1},
                           "generator_optimizer": {"lr": 1e-3}, "guidance_optimizer": {"lr": 1e-3}}}


def chain_rule_kl(p_gen: torch.Tensor, p_teacher: torch.Tensor) -> tuple[float, float]:
    """For a joint law over n tokens given as full tables [K]*n: (joint KL(p_G || p_T), the sum over positions of
    E_{q_<i ~ p_G} KL(p_G(q_i | q_<i) || p_T(q_i | q_<i))), the decomposition DD2's per-position losses rely on."""
    joint = (p_gen * (p_gen.clamp_min(1e-300).log() - p_teacher.clamp_min(1e-300).log())).sum().item()
    n, total = p_gen.dim(), 0.0
    for i in range(n):
        dims = tuple(range(i + 1, n))
        g = p_gen.sum(dim=dims) if dims else p_gen           # marginal of q_<=i
        h = p_teacher.sum(dim=dims) if dims else p_teacher
        g_cond = g / g.sum(-1, keepdim=True).clamp_min(1e-300)
        h_cond = h / h.sum(-1, keepdim=True).clamp_min(1e-300)
        prefix = g.sum(-1, keepdim=True)                       # p_G(q_<i)
        kl = (g_cond * (g_cond.clamp_min(1e-300).log() - h_cond.clamp_min(1e-300).log())).sum(-1, keepdim=True)
        total += (prefix * kl).sum().item()
    return joint, total

