"""Hallucination scores: variance of the predicted x0 over the end of a sampling trajectory.

Aithal, Maini, Lipton, Kolter, "Understanding Hallucinations in Diffusion Models through Mode Interpolation",
NeurIPS 2024 (arXiv 2406.09358). Samples that land between modes (support gaps) are produced while the denoiser
is still undecided, so their predicted x0 keeps moving during the last reverse steps. The paper's score
(`train_toy_filter.py` in locuslab/diffusion-model-hallucination) is

    Hal(x) = mean over coordinates of Var_pop( x0_hat^(t) : the last K = 10 recorded steps ),

recorded during ancestral DDPM sampling (no clipping), and its filter keeps the N lowest of N + 2500 samples.

What this module adds (our choices, not in the paper):

* `X0Recorder`, a proxy around any diffusers scheduler, so the score works for any multi-step sampler (DDPM, DDIM,
  Euler, flow matching, a pipeline with CFG: `step` receives the combined output, so the batch is the real one);
  `HalMonitor` installs it on a pipeline for the duration of a `with` block; `generate_filtered` does the
  paper's "generate N + extra, keep the N lowest".
* `TimestepRange` windows besides the paper's `LastK`, and threshold / quantile filters besides keep-N.
* `probe_scores`, a score for samples that have no trajectory (one-step generators): re-noise the sample to a
  few small noise levels, denoise, and take the same variance. See `probe_scores` for the options and
  `bench/hallucination_toy.py` for the measurement that picked the default. `probe_filter` applies it with a
  `HalFilter` to a batch; `OneStepPipeline(..., hallucination_filter=...)`, the demo and `onestep sample --filter`
  all go through it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

# ---------------------------------------------------------------------------------------------------------------
# Windows and the score
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LastK:
    """The last `k` recorded steps in generation order (the paper's window, `start_timestep_var = 10`).

    A trajectory shorter than `k` (a 4-step sampler) is used whole.
    """

    k: int = 10

    @property
    def capacity(self) -> int:
        """How many recorded steps the window needs (the recorder drops older ones)."""
        return self.k

    def accepts(self, timestep) -> bool:
        return True

    def select(self, traj: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        return traj[-self.k:]


@dataclass(frozen=True)
class TimestepRange:
    """Steps whose scheduler timestep `t` satisfies `lo <= t <= hi` (our extension; for a T=1000 DDPM sampled
    with all steps, `TimestepRange(0, 9)` equals `LastK(10)`). Timesteps are the scheduler's own values (0..T-1
    for discrete schedulers), not step indices."""

    lo: float
    hi: float

    @property
    def capacity(self) -> None:
        """No bound: the recorder keeps every step the range accepts."""
        return None

    def accepts(self, timestep) -> bool:
        return self.lo <= float(timestep) <= self.hi

    def select(self, traj: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        if timesteps is None:
            raise ValueError("TimestepRange needs the timesteps recorded with the trajectory")
        t = torch.as_tensor(timesteps, dtype=torch.float64)
        return traj[(t >= self.lo) & (t <= self.hi)]


Window = LastK | TimestepRange


def hal_score(traj: torch.Tensor, window: Window = LastK(10), timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """Hal score per sample: population variance over the window's steps, averaged over coordinates.

    traj: [steps, B, ...] predicted x0 in generation order (noisiest first); timesteps: [steps], needed only by
    `TimestepRange`. Returns float64 [B]. Exactly `np.var(traj[-K:], axis=0).mean(-1)` of the paper for [steps, B, D].
    """
    sel = window.select(traj, timesteps)
    if sel.shape[0] < 2:
        raise ValueError(f"the window holds {sel.shape[0]} step(s); a variance needs at least 2")
    sel = sel.to(torch.float64).flatten(2)
    return sel.var(dim=0, unbiased=False).mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HalFilter:
    """Which samples to keep, given their scores; exactly one criterion.

    threshold: keep `score <= threshold`; quantile: keep `score <= quantile(scores, q)` (about a fraction q);
    keep_n: keep the `keep_n` lowest (the paper's "generate N + 2500, keep N"), ties broken by index (stable).
    """

    threshold: float | None = None
    quantile: float | None = None
    keep_n: int | None = None

    def __post_init__(self):
        given = [v is not None for v in (self.threshold, self.quantile, self.keep_n)]
        if sum(given) != 1:
            raise ValueError("HalFilter takes exactly one of threshold, quantile, keep_n")
        if self.quantile is not None and not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {self.quantile}")
        if self.keep_n is not None and self.keep_n < 0:
            raise ValueError(f"keep_n must be >= 0, got {self.keep_n}")

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean [B]: True for kept samples."""
        scores = torch.as_tensor(scores, dtype=torch.float64)
        if self.keep_n is not None:
            order = torch.sort(scores, stable=True).indices
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep[order[: self.keep_n]] = True
            return keep
        tau = self.threshold if self.threshold is not None else torch.quantile(scores, self.quantile)
        return scores <= tau

    def __call__(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept indices in their original order, all scores)."""
        scores = torch.as_tensor(scores, dtype=torch.float64)
        return self.mask(scores).nonzero().flatten(), scores


# ---------------------------------------------------------------------------------------------------------------
# Recording x0 inside any diffusers scheduler
# ---------------------------------------------------------------------------------------------------------------


def x0_from_output(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                   step_index: int | None = None) -> torch.Tensor:
    """The x0 implied by a model output, for schedulers whose step output does not carry it.

    Flow matching (`FlowMatch*`, x_t = (1-s) x0 + s eps, v = eps - x0): x0 = x_t - s v. Sigma (VE) schedulers
    (Euler family, `init_noise_sigma > 1`; `sample` is x_sigma = x0 + sigma eps, unscaled): eps, v or sample
    prediction with a = 1/sqrt(1+sigma^2). Otherwise discrete VP: alphas_cumprod[timestep]. `step_index` is the
    index into `scheduler.sigmas` of the step just taken (default `scheduler.step_index - 1`: call after `step`).
    Learned-variance outputs (2C channels) use their first C channels.
    """
    out = model_output[:, : sample.shape[1]] if model_output.ndim > 1 else model_output
    x = sample.to(torch.float32)
    config = scheduler.config
    if "FlowMatch" in type(scheduler).__name__ or config.get("prediction_type") == "flow_prediction":
        s = _current_sigma(scheduler, step_index)
        return x - s * out
    prediction = config.get("prediction_type", "epsilon")
    if hasattr(scheduler, "sigmas") and float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:
        sigma = _current_sigma(scheduler, step_index)
        a = 1.0 / math.sqrt(1.0 + sigma**2)
        x_t, alpha, s = a * x, a, a * sigma
    else:
        ab = float(scheduler.alphas_cumprod[int(timestep)])
        x_t, alpha, s = x, math.sqrt(ab), math.sqrt(1.0 - ab)
    if prediction == "epsilon":
        return (x_t - s * out) / alpha
    if prediction == "v_prediction":
        return alpha * x_t - s * out
    if prediction == "sample":
        return out
    raise ValueError(f"cannot read x0 from prediction_type {prediction!r}")


def _current_sigma(scheduler, step_index: int | None) -> float:
    index = scheduler.step_index - 1 if step_index is None else step_index
    return float(scheduler.sigmas[index])


class Run(NamedTuple):
    """One sampler call's recorded trajectory: x0 [steps, B, ...] (float32, CPU) and timesteps [steps]."""

    x0: torch.Tensor
    timesteps: torch.Tensor


def _with_signature_of(target, method):
    """A function calling `method` that reports `target`'s name, docstring and signature."""
    @functools.wraps(target)
    def wrapper(*args, **kwargs):
        return method(*args, **kwargs)
    return wrapper


class X0Recorder:
    """Proxy around a diffusers scheduler that records the predicted x0 of every `step`.

    Everything else (`timesteps`, `init_noise_sigma`, `config`, `order`, `scale_model_input`, attribute writes,
    `len()`) goes to the wrapped scheduler, and `step` / `set_timesteps` keep its signature (pipelines inspect it
    for `eta` / `generator` / `timesteps`), so `pipe.scheduler = X0Recorder(pipe.scheduler)` changes no sample.

    record="sampler" stores what the sampler used (`pred_original_sample` or `denoised` of the step output,
    i.e. clipped if the scheduler clips; the paper's toy sampler does not clip); "raw" always recomputes x0 from
    the model output (`x0_from_output`). `keep` bounds memory: None keeps every step, an int the last `keep`
    steps, a window (`LastK` / `TimestepRange`) only what it will score. Each `set_timesteps` call starts a new
    run (one per pipeline call); `runs` lists them.
    """

    _own = ("scheduler", "window", "record", "runs", "step", "set_timesteps")

    def __init__(self, scheduler, keep: int | Window | None = None, record: str = "sampler"):
        if record not in ("sampler", "raw"):
            raise ValueError(f"record must be 'sampler' or 'raw', got {record!r}")
        window = LastK(keep) if isinstance(keep, int) else keep
        for name, value in (("scheduler", scheduler), ("window", window), ("record", record), ("runs", [])):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "step", _with_signature_of(scheduler.step, self._step))
        object.__setattr__(self, "set_timesteps", _with_signature_of(scheduler.set_timesteps, self._set_timesteps))

    def __getattr__(self, name):  # only called for names not found on the proxy itself
        return getattr(object.__getattribute__(self, "scheduler"), name)

    def __setattr__(self, name, value):
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.scheduler, name, value)

    def __len__(self):
        return len(self.scheduler)

    def _set_timesteps(self, *args, **kwargs):
        self.runs.append(([], []))
        return self.scheduler.set_timesteps(*args, **kwargs)

    def _step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        out = self.scheduler.step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        if self.window is None or self.window.accepts(timestep):
            self._append(timestep, self._x0(out, model_output, timestep, sample))
        return out if return_dict else out.to_tuple()

    def _x0(self, out, model_output, timestep, sample) -> torch.Tensor:
        if self.record == "sampler":
            for name in ("pred_original_sample", "denoised"):
                x0 = getattr(out, name, None)
                if x0 is not None:
                    return x0
        return x0_from_output(self.scheduler, model_output, timestep, sample)

    def _append(self, timestep, x0: torch.Tensor):
        if not self.runs:
            self.runs.append(([], []))
        x0s, ts = self.runs[-1]
        x0s.append(x0.detach().float().cpu())
        ts.append(float(timestep))
        capacity = self.window.capacity if self.window is not None else None
        if capacity is not None and len(x0s) > capacity:
            del x0s[0], ts[0]

    def trajectories(self) -> list[Run]:
        """Every recorded run, stacked: x0 [steps, B, ...], timesteps [steps] (float64)."""
        return [Run(torch.stack(x0s), torch.tensor(ts, dtype=torch.float64)) for x0s, ts in self.runs if x0s]

    def scores(self, window: Window | None = None) -> torch.Tensor:
        """Hal scores of all recorded runs, concatenated along the batch (default: the recorder's window, else
        `LastK(10)`)."""
        window = window or self.window or LastK(10)
        runs = self.trajectories()
        if not runs:
            raise RuntimeError("nothing recorded: no scheduler.step call since the recorder was installed")
        return torch.cat([hal_score(run.x0, window, run.timesteps) for run in runs])


# ---------------------------------------------------------------------------------------------------------------
# Pipeline-level API
# ---------------------------------------------------------------------------------------------------------------


class HalMonitor:
    """Context manager: record x0 on `pipe.scheduler` while inside, restore the original scheduler on exit.

        with HalMonitor(pipe) as mon:
            images = pipe(batch_size=16, generator=g).images
        keep = mon.mask(quantile=0.9)            # bool [16]; mon.scores() -> float64 [16]

    Works with any object that has a `scheduler` attribute and calls `scheduler.step` (diffusers pipelines, the
    toy sampler in `onestep.sampling.toy`). Several pipeline calls inside one block concatenate their batches.
    """

    def __init__(self, pipe, window: Window = LastK(10), record: str = "sampler"):
        self.pipe, self.window, self.record = pipe, window, record
        self.recorder: X0Recorder | None = None
        self._original = None

    def __enter__(self) -> "HalMonitor":
        self._original = self.pipe.scheduler
        self.recorder = X0Recorder(self._original, keep=self.window, record=self.record)
        self.pipe.scheduler = self.recorder
        return self

    def __exit__(self, *exc):
        self.pipe.scheduler = self._original
        return False

    def scores(self) -> torch.Tensor:
        return self.recorder.scores(self.window)

    def mask(self, threshold: float | None = None, quantile: float | None = None,
             keep_n: int | None = None) -> torch.Tensor:
        return HalFilter(threshold, quantile, keep_n).mask(self.scores())


class Filtered(NamedTuple):
    """Result of `generate_filtered`: kept samples, their scores, their indices in the generated batch, and the
    scores of every generated sample."""

    samples: object
    scores: torch.Tensor
    indices: torch.Tensor
    all_scores: torch.Tensor


def generate_filtered(pipe, n_keep: int, oversample: float = 1.025, window: Window = LastK(10),
                      batch_arg: str = "batch_size", record: str = "sampler", **kwargs) -> Filtered:
    """Generate ceil(n_keep * oversample) samples and keep the `n_keep` lowest-Hal ones (the paper's recursive
    training filter: N + 2500 for N = 100k, i.e. oversample 1.025). `kwargs` go to `pipe(...)`; the batch size is
    passed as `batch_arg` (`num_images_per_prompt` for text-to-image pipelines). The pipeline output may be
    a diffusers output with `.images`, a tuple (first item) or the samples themselves (tensor, array or list).
    """
    n_total = math.ceil(n_keep * oversample)
    with HalMonitor(pipe, window, record) as monitor:
        output = pipe(**{batch_arg: n_total}, **kwargs)
    scores = monitor.scores()
    indices, _ = HalFilter(keep_n=n_keep)(scores)
    return Filtered(_take(_samples_of(output), indices), scores[indices], indices, scores)


def _samples_of(output):
    if hasattr(output, "images"):
        return output.images
    return output[0] if isinstance(output, tuple) else output


def _take(samples, indices: torch.Tensor):
    if isinstance(samples, list):
        return [samples[i] for i in indices.tolist()]
    if isinstance(samples, torch.Tensor):
        return samples[indices.to(samples.device)]
    return samples[indices.numpy()]


# ---------------------------------------------------------------------------------------------------------------
# One-step probe (our extension: a one-step sample has no trajectory)
# ---------------------------------------------------------------------------------------------------------------

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def probe_sigmas(alphas_cumprod: torch.Tensor, k: int = 5, draws: int = 4) -> list[float]:
    """Probe levels: the VE sigmas sqrt((1 - ab_t) / ab_t) of the teacher's last `k` timesteps k-1 ... 0, the whole
    list repeated `draws` times (each entry gets its own noise). The default k=5, draws=4 (20 denoiser calls)
    separated best across the toy bench (1-D modes and the 5x5 grid); for a T=1000 linear 0.001->0.2 schedule
    the levels are 0.084 ... 0.032. For a teacher without alphas_cumprod, pass the sigmas of its last k steps."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)[:k].flip(0)
    return ((1 - ab) / ab).sqrt().tolist() * draws


@torch.no_grad()
def probe_trajectory(x0: torch.Tensor, denoise: Denoise, sigmas: Sequence[float],
                     generator: torch.Generator | None = None, noise: str = "independent",
                     mode: str = "parallel") -> torch.Tensor:
    """The x0 predictions a probe scores, [K, B, ...] (K = len(sigmas)).

    parallel: D(x0 + sigma_k eps_k, sigma_k) for every k, each from the sample itself;
    chain: x <- D(x + sigma_k eps_k, sigma_k) in turn (multistep consistency sampling, Song et al. 2023 Alg. 1,
    i.e. a few-step path started from the sample); the sample itself is not included in either.
    noise: "independent" draws eps_k afresh for each k, "shared" uses one eps for all k.
    """
    if noise not in ("independent", "shared"):
        raise ValueError(f"noise must be 'independent' or 'shared', got {noise!r}")
    if mode not in ("parallel", "chain"):
        raise ValueError(f"mode must be 'parallel' or 'chain', got {mode!r}")

    def draw():  # randn_tensor: a CPU generator also serves a GPU batch
        return randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    shared = draw() if noise == "shared" else None
    x, out = x0, []
    for sigma in sigmas:
        eps = shared if shared is not None else draw()
        level = torch.full((x0.shape[0],), float(sigma), dtype=x0.dtype, device=x0.device)
        x = denoise((x if mode == "chain" else x0) + float(sigma) * eps, level)
        out.append(x)
    return torch.stack(out)


def probe_scores(x0: torch.Tensor, denoise: Denoise, sigmas: Sequence[float],
                 generator: torch.Generator | None = None, noise: str = "independent",
                 mode: str = "parallel") -> torch.Tensor:
    """Hal-style score for samples without a trajectory (one-step generators) -- our extension of the paper.

    Re-noise each sample to the K noise levels `sigmas` (VE: x0 + sigma eps), denoise with `denoise(x_sigma,
    sigma[B]) -> x0_hat` (the teacher, or the generator's own denoiser), and take the population variance of the
    K predictions averaged over coordinates, as `hal_score` does on a trajectory. Use `probe_sigmas` for the
    levels; the defaults (parallel, independent noise) are what `bench/hallucination_toy.py` found to separate
    best: on the same teacher samples the probe matched or beat the trajectory score everywhere measured,
    while "shared" noise, "chain" mode, larger levels and the generator's own few-step path were worse.
    Returns float64 [B].
    """
    traj = probe_trajectory(x0, denoise, sigmas, generator, noise, mode)
    return hal_score(traj, LastK(len(sigmas)))


# Probe levels for schedulers without alphas_cumprod (flow matching, EDM): VE sigmas for data in [-1, 1], about the
# size of a DDPM teacher's last few levels (0.01 ... 0.08 for linear 1e-4 -> 0.02 betas).
FALLBACK_PROBE_SIGMAS = (0.3, 0.2, 0.1, 0.05)


def probe_levels(scheduler, k: int = 5, draws: int = 4) -> list[float]:
    """`probe_sigmas(scheduler.alphas_cumprod, k, draws)` for DDPM-style schedulers; `FALLBACK_PROBE_SIGMAS` (one
    draw each) for schedulers without alphas_cumprod (flow matching, EDM) or no scheduler at all."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    return probe_sigmas(alphas_cumprod, k, draws) if alphas_cumprod is not None else list(FALLBACK_PROBE_SIGMAS)


class ProbeFiltered(NamedTuple):
    """Result of `probe_filter`: kept indices (ascending, into the batch), float64 scores of every sample, and the
    probe levels used."""

    kept: torch.Tensor
    scores: torch.Tensor
    sigmas: list[float]


@torch.no_grad()
def probe_filter(x: torch.Tensor, denoiser, hal_filter: HalFilter, generator: torch.Generator | None = None,
                 sigmas: Sequence[float] | None = None, **cond) -> ProbeFiltered:
    """Score a batch of finished samples with the one-step probe and apply `hal_filter`.

    x: samples in the denoiser's space (pixels in [-1, 1], or latents for latent teachers); denoiser: a onestep
    `Denoiser` (`D(x_sigma, sigma, **cond) -> x0`, e.g. `load_teacher(path)`), or any such callable; cond: its
    conditioning (`class_labels=...`), one row per sample. sigmas: the probe levels (default `probe_levels` of
    `denoiser.scheduler`). generator: the probe's noise (seed it for reproducible scores).
    """
    if sigmas is None:
        sigmas = probe_levels(getattr(denoiser, "scheduler", None))
    sigmas = [float(s) for s in sigmas]
    scores = probe_scores(x, lambda xs, sigma: denoiser(xs, sigma, **cond), sigmas, generator)
    kept, scores = hal_filter(scores)
    return ProbeFiltered(kept, scores, sigmas)
