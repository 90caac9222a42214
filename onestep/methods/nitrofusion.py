"""NitroFusion: adversarial distillation against a dynamic pool of discriminator heads; 1-4 steps from one model.

Chen, Bandyopadhyay, Zou, Song, "NitroFusion: High-Fidelity Single-Step Diffusion through Dynamic Adversarial
Training", CVPR 2025 (arXiv 2412.02030). Only inference was released (github.com/ChenDarYen/NitroFusion), so the
training below is rebuilt from the paper's sec. 3; every choice the paper leaves open is a config field, and
docs/nitrofusion.md lists which value this file takes and why. In the VE view of `onestep.denoisers`
(x_sigma = x0 + sigma eps), with a frozen teacher D_psi, its encoder E (conv_in, down blocks, mid block: the
platform's feature taps), a pool H[task][t*][level][slot] of small heads and the student D_theta:

    real:  x0  = teacher sampler from z (the same noise the student gets)                          (sec. 3.1)
    fake:  x0^ = D_theta(x_n, sigma_n), n ~ U{1..k}: on-policy path of the n-step grid, all earlier
           steps without gradient (bottom-up refinement, stage k trains paths of 1..k steps)       (sec. 3.5)
    t* ~ U(disc_timesteps);  for every task m and feature level l one head H[m][t*][l][slot ~ U]    (sec. 3.2)
    logit_ml(x) = H(E(view_m(x + sigma_t* eps), sigma_t*, cond_m)[l], cond_m)
                  views: global = the whole sample; local = a random crop; cond_m: the class / text for the
                  conditional tasks, the teacher's unconditional input (when it has one) for local-unconditional;
                  conditional heads add a projection term <W c, pooled h> (Miyato & Koyama 2018)        (sec. 3.3)
    generator step:     L_G = mean_ml GAN_G(logit_ml(x0^) [, logit_ml(x0)])   (gradient through the frozen E)
    discriminator step: L_D = mean_ml GAN_D(logit_ml(x0), logit_ml(sg x0^))   (only the drawn heads)
    refresh: re-initialise R = max(1, round(0.01 |pool|)) heads drawn from the whole pool, Adam state reset (sec. 3.2)
    (reconstruction knobs for small budgets, defaults = the paper: refresh_every, disc_warmup_steps, disc_updates)

The n-step grid (teacher timesteps, `grid`: the first n levels of one grid, or LCM's rows) is moved to lower
timesteps by the paper's shift e(tau) = floor(tau * shift / 1000) (sec. 3.5; the released TimestepShiftLCMScheduler);
the student is evaluated at the shifted level, the way every onestep generator is (G(z) = D(sigma_1 z, sigma_1)).
Head draws and refreshes come from `ctx.shared_rng`, so every process trains the same heads (`sparse_networks`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..losses import GANLoss
from ..sampling.samplers import sample_euler, teacher_sigmas
from .base import Batch, Method, MethodConfig, NetworkConfig, OptimizerConfig, frozen, trainable_copy

TASKS = ("global_cond", "local_cond", "local_uncond")
HISTORY = 10_000  # steps of drawn / refreshed head indices kept for inspection


class NitroFusionConfig(MethodConfig):
    name: Literal["nitrofusion"] = "nitrofusion"
    # --- the student's step grid (1..max_steps from one set of weights) --------------------------------------------
    max_steps: int = Field(4, ge=1, le=16, description="the most steps the exported model takes")
    grid: Literal["prefix", "lcm"] = Field("prefix", description="n-step timesteps: 'prefix' = the first n of "
                                           "tau_i = T - 1 - i T/max_steps (a k-step path refines the (k-1)-step one); "
                                           "'lcm' = LCMScheduler's rows with original_inference_steps = max_steps "
                                           "(the paper's sampler: 2 steps = [999, 499])")
    shift: float = Field(250.0, gt=0, le=1000, description="timestep shift: the student runs at e(tau) = "
                         "floor(tau * shift / 1000) (paper: 250 Realism, 500 Vibrant; 1000 = no shift)")
    stage_starts: list[int] = Field([0], description="bottom-up refinement: stage k (trains paths of 1..k steps, "
                                    "n ~ U{1..k} per sample) starts at step stage_starts[k-1]")
    # --- real samples ---------------------------------------------------------------------------------------------
    teacher_steps: int = Field(25, ge=1, description="teacher sampler steps (deterministic DDIM/Euler) for the real "
                               "sample from the student's noise; unused with pairs data, whose stored noise and "
                               "sample are used as they are")
    # --- the discriminator: frozen teacher encoder + pool of heads ----------------------------------------------------
    disc_timesteps: list[float] = Field([10, 250, 500, 750], min_length=1, description="t*: the discriminator's "
                                        "noise levels in teacher timesteps (one drawn per step)")
    tasks: list[Literal[TASKS]] = Field(list(TASKS), min_length=1)
    slots: int = Field(4, ge=1, description="heads per (task, t*, level): one is drawn per step")
    feature_layers: Literal["skips", "blocks"] | list[str] = Field(
        "skips", description="teacher layers the heads read: 'skips' = conv_in, every skip-connection tensor of the "
        "down blocks (each resnet / attention output, each downsampler) and the mid block (10 maps for SDXL, the "
        "paper's); 'blocks' = conv_in, each down block's output, the mid block; or a list of layer names")
    head_width: int = Field(64, ge=1, description="channels inside a head (1x1 in-projection from the feature map)")
    head_downsamples: int = Field(2, ge=0, description="most 4x4 stride-2 conv + GroupNorm + SiLU blocks per head "
                                  "(fewer on small maps: down to 4x4)")
    projection: bool = Field(True, description="conditional heads add <embed(c), pooled features>")
    crop_fraction: float = Field(0.5, gt=0, le=1, description="local heads' crop side / sample side")
    refresh_fraction: float = Field(0.01, ge=0, le=1, description="share of the pool re-initialised per step "
                                    "(at least one head when > 0; 0: no refresh)")
    refresh_every: int = Field(1, ge=1, description="refresh once every this many steps (paper: every step); "
                               "a small pool trained for few steps needs its heads to live long enough to learn")
    disc_warmup_steps: int = Field(0, ge=0, description="the first steps update only the drawn heads, never the "
                                   "generator (not in the paper, which starts from trained heads' scale: a pool of "
                                   "fresh heads otherwise hands the generator noise for its first updates)")
    disc_updates: int = Field(1, ge=1, description="discriminator updates per step (same batch, same drawn heads)")
    skip_decoder: bool = Field(True, description="stop the backbone pass after the last feature layer (the UNet's "
                               "up blocks never run; same features, about half the cost); false: the platform's "
                               "full-pass feature taps")
    shared_disc_noise: bool = Field(False, description="real and fake get the same noise at t* (else independent)")
    gan_loss: Literal["non_saturating", "hinge", "relativistic"] = "non_saturating"
    # --- optimisation ---------------------------------------------------------------------------------------------
    generator_optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5, betas=(0.0, 0.99))
    discriminator_optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, betas=(0.0, 0.99))
    generator_network: NetworkConfig = NetworkConfig()
    pool_on_cpu: bool = Field(False, description="keep the pool in host memory; the drawn heads' weights are copied "
                              "to the accelerator for each pass (one process only: gradients stay on the host)")
    default_inference_steps: int = Field(1, ge=1, description="the NFE the export is meant to be used at")

    @model_validator(mode="after")
    def _check(self):
        starts = self.stage_starts
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"stage_starts: need increasing steps starting at 0, got {starts}")
        if len(starts) > self.max_steps:
            raise ValueError(f"stage_starts: {len(starts)} stages but max_steps is {self.max_steps}")
        if self.default_inference_steps > self.max_steps:
            raise ValueError(f"default_inference_steps: {self.default_inference_steps} > max_steps {self.max_steps}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: listed twice in {self.tasks}")
        return self


# --- the n-step grid -------------------------------------------------------------------------------------------------
def step_timesteps(num_train_timesteps: int, max_steps: int, grid: str) -> list[list[int]]:
    """Row n-1: the n original (unshifted) teacher timesteps of the n-step path, n = 1..max_steps.

    'lcm': diffusers' LCMScheduler.set_timesteps with original_inference_steps = max_steps: origin timesteps
    c i - 1 (c = T / max_steps), n of them taken evenly from the top (T = 1000, 4: [999], [999, 499],
    [999, 749, 499], [999, 749, 499, 249]). 'prefix': the first n of the max_steps row."""
    c = num_train_timesteps // max_steps
    origin = [c * i - 1 for i in range(max_steps, 0, -1)]           # descending: 999, 749, 499, 249
    if grid == "prefix":
        return [origin[:n] for n in range(1, max_steps + 1)]
    rows = []
    for n in range(1, max_steps + 1):
        skip = max_steps // n
        rows.append([origin[int(i * skip)] for i in range(n)] if n < max_steps else origin)
    return rows


def shifted(tau: int, shift: float) -> int:
    """The paper's timestep shift e(tau) = floor(tau * shift / 1000) (TimestepShiftLCMScheduler)."""
    return int(math.floor(tau * shift / 1000))


def encoder_layers(denoiser, which) -> list[str]:
    """The backbone layers the heads read (see NitroFusionConfig.feature_layers)."""
    if not isinstance(which, str):
        return list(which)
    model = denoiser.model
    blocks = list(getattr(model, "down_blocks", None) or [])
    if not blocks or getattr(model, "mid_block", None) is None:
        raise ValueError(f"method.feature_layers: {type(model).__name__} has no UNet encoder (down_blocks, mid_block); "
                         f"list layer names from {denoiser.feature_layers()}")
    if which == "blocks":
        return ["conv_in"] + [f"down_blocks.{i}" for i in range(len(blocks))] + ["mid_block"]
    names = ["conv_in"]
    for i, block in enumerate(blocks):   # the tensors a UNet's down path hands to its up path (its skip connections)
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            names.append(f"down_blocks.{i}.attentions.{j}" if attentions is not None and len(attentions) > j
                         else f"down_blocks.{i}.resnets.{j}")
        names += [f"down_blocks.{i}.downsamplers.{k}" for k in range(len(getattr(block, "downsamplers", None) or []))]
    return names + ["mid_block"]


class NitroGenerator(nn.Module):
    """The student D_theta with its step grid: `forward(x, sigma)` is one evaluation (x0 estimate); `sample(z, n)`
    is the n-step path: x_1 = sigma_1 z, x^ = D(x_i, sigma_i), x_{i+1} = x^ + sigma_{i+1} eps (consistency-model
    multistep sampling, Song et al. 2023, Alg. 1; what OneStepPipeline does at 2..N steps)."""

    def __init__(self, denoiser, sigma_rows: list[list[float]], timestep_rows: list[list[int]], shift: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_rows = [[float(s) for s in row] for row in sigma_rows]
        self.timestep_rows, self.shift = timestep_rows, shift

    @property
    def sigma_init(self) -> float:
        return self.sigma_rows[0][0]

    @property
    def max_steps(self) -> int:
        return len(self.sigma_rows)

    def forward(self, x, sigma, **cond):
        return self.denoiser(x, sigma, **cond)

    @torch.no_grad()
    def sample(self, z, steps: int = 1, generator: torch.Generator | None = None, **cond):
        sigmas = self.sigma_rows[steps - 1]
        x = self.denoiser(sigmas[0] * z, sigmas[0], **cond)
        for sigma in sigmas[1:]:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self.denoiser(x + sigma * eps, sigma, **cond)
        return x


# --- discriminator heads ---------------------------------------------------------------------------------------------
class Head(nn.Module):
    """Conv1x1(C -> w) -> [Conv4x4 s2 -> GroupNorm -> SiLU] x d -> Conv1x1(w -> 1): a map of patch logits (DMD2's head,
    tianweiy/DMD2 `sd_guidance.py`, narrowed by the in-projection so a pool of hundreds stays small), plus, for a
    conditional head, the projection term <embed(c), mean-pooled features> / sqrt(w) on every logit."""

    def __init__(self, channels: int, width: int, downsamples: int, cond_kind: str | None, cond_dim: int):
        super().__init__()
        groups = math.gcd(width, 32)
        self.inp = nn.Conv2d(channels, width, 1)
        self.body = nn.Sequential(*[m for _ in range(downsamples) for m in
                                    (nn.Conv2d(width, width, 4, 2, 1), nn.GroupNorm(groups, width), nn.SiLU())])
        self.out = nn.Conv2d(width, 1, 1)
        self.cond_kind = cond_kind
        if cond_kind == "class_labels":
            self.embed = nn.Embedding(cond_dim, width)
        elif cond_kind == "encoder_hidden_states":
            self.embed = nn.Linear(cond_dim, width)
        else:
            self.embed = None

    def forward(self, h: torch.Tensor, cond: dict) -> torch.Tensor:
        h = self.body(self.inp(h))
        logits = self.out(h).flatten(1)                              # [B, patches]
        if self.embed is not None:
            c = cond[self.cond_kind]
            e = self.embed(c) if self.cond_kind == "class_labels" else self.embed(c.float().mean(1))
            logits = logits + (e * h.mean((2, 3))).sum(1, keepdim=True) / math.sqrt(h.shape[1])
        return logits

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """The construction init, drawn from `generator`: weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
        default bound for the bias, with gain 1), biases 0, GroupNorm (1, 0), class embeddings N(0, 1)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                bound = 1 / math.sqrt(module.weight[0].numel())
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 2 * bound - bound)
                module.bias.zero_()
            elif isinstance(module, nn.GroupNorm):
                module.weight.fill_(1)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))


class HeadPool(nn.Module):
    """Heads indexed (task, t* index, level, slot), flat index in that order; keys "task-tIDX-lLEVEL-sSLOT".
    With `on_cpu`, moving the module to an accelerator leaves it in host memory (see `NitroFusion.pool_on_cpu`)."""

    def __init__(self, tasks, num_timesteps: int, num_levels: int, slots: int, make_head):
        super().__init__()
        self.index = [(m, t, lvl, s) for m in tasks for t in range(num_timesteps) for lvl in range(num_levels)
                      for s in range(slots)]
        self.heads = nn.ModuleDict({self.key(*i): make_head(*i) for i in self.index})
        self.on_cpu = False

    @staticmethod
    def key(task: str, t: int, level: int, slot: int) -> str:
        return f"{task}-t{t}-l{level}-s{slot}"

    def __getitem__(self, index: tuple) -> Head:
        return self.heads[self.key(*index)]

    def __len__(self) -> int:
        return len(self.index)

    def _apply(self, fn, *args, **kwargs):
        if self.on_cpu:  # device moves are refused: probe where fn would put a tensor
            probe = fn(torch.zeros(()))
            if probe.device.type != "cpu":
                return self
        return super()._apply(fn, *args, **kwargs)


class _EncoderDone(Exception):
    """Raised before the backbone's first up block: the heads have every feature they read."""


def _crop(x: torch.Tensor, offsets: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-sample crops x[i, :, top_i:top_i+h, left_i:left_i+w] (offsets [B, 2] = (top, left))."""
    h, w = size
    rows = offsets[:, :1] + torch.arange(h, device=x.device)                       # [B, h]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)                       # [B, w]
    b = torch.arange(len(x), device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# --- the method ------------------------------------------------------------------------------------------------------
class NitroFusion(Method):
    name = "nitrofusion"
    Config = NitroFusionConfig
    sparse_networks = ("pool",)
    smoke_variants = ("non_saturating", "relativistic")

    def __init__(self, config: NitroFusionConfig, teacher, data):
        super().__init__(config, teacher, data)
        schedule = teacher.denoiser.schedule
        self.backbone = teacher.denoiser                       # frozen by open_teacher; read through feature taps
        if len(self.sample_shape) != 3:
            raise ValueError(f"method nitrofusion: the heads read image feature maps, but the teacher makes samples "
                             f"of shape {self.sample_shape}; use an image (or latent image) teacher")
        num_t = int(round(float(schedule.timestep(torch.tensor(schedule.sigma_max, dtype=torch.float64))))) + 1
        self.timestep_rows = step_timesteps(num_t, config.max_steps, config.grid)
        sigma_rows = [[self._sigma(shifted(tau, config.shift)) for tau in row] for row in self.timestep_rows]
        self.gen = NitroGenerator(trainable_copy(teacher.denoiser, config.generator_network), sigma_rows,
                                  self.timestep_rows, config.shift)
        self.disc_sigmas = [self._sigma(t) for t in config.disc_timesteps]
        self.layers = encoder_layers(self.backbone, config.feature_layers)
        self.gan = GANLoss(config.gan_loss)
        self.cond_kind, cond_dim = self._head_conditioning(data)
        _, h, w = self.sample_shape
        self.crop_size = self._crop_size(h), self._crop_size(w)
        shapes = {view: self._feature_shapes(size) for view, size in (("global", (h, w)), ("local", self.crop_size))}

        def make_head(task, t, level, slot):
            c, fh, fw = shapes["global" if task == "global_cond" else "local"][level]
            down = min(config.head_downsamples, max(0, int(math.log2(max(min(fh, fw), 1) / 4))))
            conditional = config.projection and task != "local_uncond" and self.cond_kind is not None
            return Head(c, config.head_width, down, self.cond_kind if conditional else None, cond_dim)

        self.pool = HeadPool(config.tasks, len(config.disc_timesteps), len(self.layers), config.slots, make_head)
        init = torch.Generator().manual_seed(int(torch.randint(2**62, ())))  # same on every process (trainer seed)
        for index in self.pool.index:
            self.pool[index].reset(init)
        self.pool.on_cpu = config.pool_on_cpu
        self.drawn: list[list[int]] = []        # flat pool indices trained at each step (tests read them)
        self.refreshed: list[list[int]] = []

    # --- setup helpers -------------------------------------------------------------------------------------------
    def _sigma(self, timestep: float) -> float:
        schedule = self.teacher.denoiser.schedule
        return float(schedule.round_sigma(schedule.sigma_of_timestep(torch.tensor(float(timestep),
                                                                                  dtype=torch.float64))))

    def _crop_size(self, side: int) -> int:
        """crop_fraction of the side, a multiple of the UNet's total downsampling (so every level has a map)."""
        blocks = getattr(self.backbone.model, "down_blocks", None)
        unit = 2 ** (len(blocks) - 1) if blocks else 1
        return max(unit, int(side * self.config.crop_fraction) // unit * unit)

    def _head_conditioning(self, data) -> tuple[str | None, int]:
        cond = data.cond or {}
        if "class_labels" in cond and self.num_classes:
            return "class_labels", int(self.num_classes)
        if "encoder_hidden_states" in cond:
            return "encoder_hidden_states", int(cond["encoder_hidden_states"].shape[-1])
        return None, 0

    @torch.no_grad()
    def _feature_shapes(self, size) -> list[tuple[int, int, int]]:
        x = torch.zeros(1, self.sample_shape[0], *size, device=self._device())
        cond = {k: v[:1].to(x.device) for k, v in (self.data.cond or {}).items()}
        feats = self.features(x, self.disc_sigmas[0], **cond)
        for name, f in zip(self.layers, feats):
            if f.dim() != 4:
                raise ValueError(f"method.feature_layers: layer {name!r} gives {tuple(f.shape)} activations; the "
                                 "heads need image feature maps [B, C, H, W]")
        return [tuple(f.shape[1:]) for f in feats]

    def _device(self):
        return next(self.backbone.parameters()).device

    # --- what the trainer asks -------------------------------------------------------------------------------------
    def trainable(self):
        return {"generator": (self.gen, self.config.generator_optimizer),
                "pool": (self.pool, self.config.discriminator_optimizer)}

    def stage(self, step: int) -> int:
        """k: this step trains paths of 1..k steps."""
        return sum(1 for s in self.config.stage_starts if s <= step)

    def step(self, batch: Batch, ctx) -> dict[str, float]:
        cfg = self.config
        heads = self.draw_heads(ctx.shared_rng)
        self.drawn.append([self.pool.index.index(h) for h in heads])
        del self.drawn[:-HISTORY], self.refreshed[:-HISTORY]
        batch = self.prepare(batch, ctx)
        logs = {"stage": float(self.stage(ctx.step))}
        if ctx.step >= cfg.disc_warmup_steps:
            with frozen(self.pool):
                logs.update(ctx.update("generator", lambda b: self.generator_loss(b, heads, ctx), batch))
        for _ in range(cfg.disc_updates):
            logs.update(ctx.update("pool", lambda b: self.discriminator_loss(b, heads), batch))
        due = cfg.refresh_fraction > 0 and (ctx.step + 1) % cfg.refresh_every == 0
        self.refreshed.append(self.refresh(ctx) if due else [])
        return logs

    def draw_heads(self, rng: torch.Generator) -> list[tuple]:
        """One t* for the step, and for every (task, level) one slot: from the stream all processes share."""
        cfg = self.config
        t = int(torch.randint(len(cfg.disc_timesteps), (), generator=rng, device=rng.device))
        slots = torch.randint(cfg.slots, (len(cfg.tasks), len(self.layers)), generator=rng, device=rng.device)
        return [(m, t, lvl, int(slots[i, lvl])) for i, m in enumerate(cfg.tasks) for lvl in range(len(self.layers))]

    def refresh(self, ctx) -> list[int]:
        """Re-initialise max(1, round(refresh_fraction |pool|)) heads drawn from the whole pool and forget their Adam
        moments and step counts (a fresh head must not inherit the moments of the one it replaces)."""
        count = max(1, round(self.config.refresh_fraction * len(self.pool)))
        picked = torch.randperm(len(self.pool), generator=ctx.shared_rng, device=ctx.shared_rng.device)[:count]
        init = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=ctx.shared_rng,
                                                               device=ctx.shared_rng.device)))
        for i in sorted(picked.tolist()):
            head = self.pool[self.pool.index[i]]
            head.reset(init)
            ctx.reset_optimizer_state("pool", head.parameters())
        return sorted(picked.tolist())

    def prepare(self, batch: Batch, ctx) -> Batch:
        """Per-row draws for this step, kept in `extras` so both updates (and every micro-batch) see the same ones:
        the noise z and the teacher's sample from it, path lengths, re-noising, t* noise, crop offsets."""
        cfg, n, device = self.config, len(batch), batch.device
        shape = self.sample_shape
        extras = dict(batch.extras)
        if "noise" in extras and batch.x is not None:   # pairs data: (noise, teacher sample) stored together
            z, real = extras["noise"].float(), batch.x.float()
        else:
            z = torch.randn((n, *shape), generator=ctx.rng, device=device)
            sigmas = teacher_sigmas(self.backbone.schedule, cfg.teacher_steps).to(device)
            real = sample_euler(self.backbone, z, sigmas, **batch.cond)
        k = self.stage(ctx.step)
        extras.update(z=z, real=real, n=torch.randint(1, k + 1, (n,), generator=ctx.rng, device=device),
                      renoise=torch.randn((n, max(k - 1, 1), *shape), generator=ctx.rng, device=device),
                      eps_fake=torch.randn((n, *shape), generator=ctx.rng, device=device))
        extras["eps_real"] = extras["eps_fake"] if cfg.shared_disc_noise else \
            torch.randn((n, *shape), generator=ctx.rng, device=device)
        for task in cfg.tasks:
            if task.startswith("local"):
                hi = torch.tensor([shape[1] - self.crop_size[0] + 1, shape[2] - self.crop_size[1] + 1], device=device)
                extras[f"crop_{task}"] = (torch.rand((n, 2), generator=ctx.rng, device=device) * hi).long()
        return Batch(x=batch.x, cond=batch.cond, size=n, device=device, extras=extras)

    # --- the student's paths --------------------------------------------------------------------------------------
    def fake_samples(self, net, batch: Batch) -> torch.Tensor:
        """x0^ of each row's n-step path (n = extras["n"]): earlier steps by the student without gradient, the
        last one through `net` (with gradient where grad is enabled)."""
        e = batch.extras
        n = e["n"]
        rows = torch.tensor([row + [row[-1]] * (self.gen.max_steps - len(row)) for row in self.gen.sigma_rows],
                            device=n.device, dtype=torch.float32)[n - 1]            # [B, max_steps]
        x = rows[:, 0].reshape(-1, 1, 1, 1) * e["z"]
        with torch.no_grad():
            for i in range(int(n.max()) - 1):
                more = n > i + 1
                x0 = self.gen(x, rows[:, i], **batch.cond)
                nxt = x0 + rows[:, i + 1].reshape(-1, 1, 1, 1) * e["renoise"][:, i]
                x = torch.where(more.reshape(-1, 1, 1, 1), nxt, x)
        last = rows.gather(1, (n - 1)[:, None])[:, 0]
        return net(x, last, **batch.cond)

    # --- the discriminator -----------------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor, eps: torch.Tensor, batch: Batch, heads, backbone_grad: bool):
        """Patch logits [B, P] of each drawn head, in the order of `heads`."""
        t = heads[0][1]
        sigma = self.disc_sigmas[t]
        x_t = x + sigma * eps
        out = {}
        for task in self.config.tasks:
            view = x_t if task == "global_cond" else _crop(x_t, batch.extras[f"crop_{task}"], self.crop_size)
            cond = batch.cond
            if task == "local_uncond" and self.teacher.uncond:
                cond = {k: v.expand(len(x), *v.shape[1:]).to(x.device) for k, v in self.teacher.uncond.items()}
            with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
                feats = self.features(view, sigma, **cond)
            out[task] = (feats, batch.cond)
        results = []
        for head in heads:
            feats, cond = out[head[0]]
            results.append(self._head(head)(feats[head[2]], cond))
        return results

    def features(self, x, sigma, **cond) -> list[torch.Tensor]:
        """The backbone's activations at `self.layers` (frozen teacher: gradients reach x, never its weights).
        With skip_decoder, the pass stops where the decoder would start (`up_blocks`, after the mid block)."""
        model = self.backbone.model
        decoder = any(n.startswith(("up_blocks", "conv_norm_out", "conv_out")) for n in self.layers)
        stop_at = getattr(model, "up_blocks", None) if self.config.skip_decoder and not decoder else None
        if stop_at is None or not len(stop_at):
            return self.backbone(x, sigma, return_features=self.layers, **cond)[1]
        captured = {}

        def keep(name):
            return lambda module, inputs, output: captured.__setitem__(
                name, output[0] if isinstance(output, tuple) else output)

        def stop(module, inputs):
            raise _EncoderDone

        handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in dict.fromkeys(self.layers)]
        handles.append(stop_at[0].register_forward_pre_hook(stop))
        try:
            self.backbone(x, sigma, **cond)
        except _EncoderDone:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [captured[name] for name in self.layers]

    def _head(self, index):
        head = self.pool[index]
        if not self.pool.on_cpu:
            return head
        device = self._device()
        params = {k: v.to(device) for k, v in head.named_parameters()}   # differentiable copies: grads reach the host
        return lambda h, cond: torch.func.functional_call(head, params, (h, cond))

    def generator_loss(self, batch: Batch, heads, ctx) -> tuple[torch.Tensor, dict[str, float]]:
        e = batch.extras
        fake = self.fake_samples(ctx.net("generator"), batch)
        logit_fake = self.logits(fake, e["eps_fake"], batch, heads, backbone_grad=True)
        logit_real = [None] * len(heads)
        if self.config.gan_loss == "relativistic":
            with torch.no_grad():
                logit_real = self.logits(e["real"], e["eps_real"], batch, heads, backbone_grad=False)
        loss = torch.stack([self.gan.generator(f, r) for f, r in zip(logit_fake, logit_real)]).mean()
        return loss, {"loss/generator": loss.item(), "logit/fake": torch.cat(logit_fake, 1).mean().item()}

    def discriminator_loss(self, batch: Batch, heads) -> tuple[torch.Tensor, dict[str, float]]:
        e = batch.extras
        with torch.no_grad():
            fake = self.fake_samples(self.gen, batch)
        logit_real = self.logits(e["real"], e["eps_real"], batch, heads, backbone_grad=False)
        logit_fake = self.logits(fake, e["eps_fake"], batch, heads, backbone_grad=False)
        loss = torch.stack([self.gan.discriminator(r, f) for r, f in zip(logit_real, logit_fake)]).mean()
        return loss, {"loss/discriminator": loss.item(), "logit/real": torch.cat(logit_real, 1).mean().item()}

    # --- sampling and export ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, network, noise, steps: int = 1, generator=None, **cond):
        return network.sample(noise, steps, generator, **cond)

    def export(self, network, out_dir, card):
        from ..lora import has_lora, merge_lora
        from ..pipelines import OneStepPipeline
        from ..pipelines.nitrofusion import NitroFusionPipeline

        cfg = self.config
        if has_lora(network.denoiser.model):
            import copy

            network = copy.deepcopy(network)
            merge_lora(network.denoiser.model)
        card = {"method": f"NitroFusion ({cfg.gan_loss}, pool {len(self.pool)} heads)", **card,
                "step_timesteps": self.timestep_rows, "timestep_shift_e": f"floor(tau * {cfg.shift:g} / 1000)"}
        if cfg.grid == "prefix":  # the k-step levels are the first k of one list: OneStepPipeline carries them
            pipe = OneStepPipeline.from_generator(network, self.teacher.scheduler, card, self.teacher.edges,
                                                  default_inference_steps=cfg.default_inference_steps,
                                                  renoise_sigmas=network.sigma_rows[-1][1:])
        else:
            pipe = NitroFusionPipeline.from_generator(network, self.teacher.scheduler, card, self.teacher.edges,
                                                      default_inference_steps=cfg.default_inference_steps,
                                                      step_sigmas=network.sigma_rows)
        pipe.save_pretrained(Path(out_dir))

    @classmethod
    def smoke_recipe(cls, teacher, variant="non_saturating"):
        """Two stages (1 then 1-2 steps), 3 t*, 2 slots: a pool of 3 x 3 x 4 x 2 = 72 heads on the tiny UNet."""
        return {"teacher": teacher, "data": {"name": "digits", "resolution": 8},
                "method": {"name": cls.name, "gan_loss": variant, "max_steps": 2, "stage_starts": [0, 2],
                           "teacher_steps": 2, "disc_timesteps": [10, 500, 750], "slots": 2, "head_width": 8,
                           "grid": "prefix" if variant == "non_saturating" else "lcm", "shift": 500,
                           "generator_optimizer": {"lr": 1e-3}, "discriminator_optimizer": {"lr": 1e-3}}}
