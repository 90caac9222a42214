"""The one Accelerate loop every method shares.

It owns what methods must not: devices and processes (DDP on GPUs, gloo on CPUs), optimizers, mixed precision,
gradient clipping and the non-finite policy, EMA, per-step randomness, logging (TensorBoard + metrics.jsonl +
tqdm), sample grids, FID, checkpoints (atomic, full state, `--resume latest`) and the final export.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..checks import is_disk_full
from ..methods.base import Method, batch_from_data, get_method
from . import checkpoint as ckpt
from . import outputs
from .config import RunConfig, dump_config
from .visuals import plot_metrics, save_samples


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite updates beyond the policy); the message says why and what to change."""


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """The random stream of one step on one process: a pure function of (seed, step, rank), so resuming at step
    k replays exactly what an uninterrupted run would have drawn."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


class _Context:
    """The StepContext a method sees for one step."""

    def __init__(self, trainer: "Trainer", step: int, rng: torch.Generator):
        self.trainer, self.step, self.rng = trainer, step, rng

    def net(self, name):
        return self.trainer.prepared[name]

    def update(self, name, loss):
        self.trainer.apply_update(name, loss, self.step)

    def mean_across_processes(self, value):
        return self.trainer.accelerator.reduce(value.detach().float(), reduction="mean")


class Trainer:
    def __init__(self, config: RunConfig, resume: str | None = None, accelerator: Accelerator | None = None):
        from ..data import load_dataset

        self.config = config
        self.out = Path(config.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.train.mixed_precision, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        device = self.accelerator.device
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > self.accelerator.num_processes:
            raise RuntimeError(f"{launched} processes were launched but accelerate set up {self.accelerator.num_processes}"
                               " (they would train independently). On CPUs set ACCELERATE_USE_CPU=1 and launch with "
                               "--multi_gpu (see recipes/accelerate/cpu_2proc.yaml)")
        torch.manual_seed(config.seed)  # identical initialisation of new networks on every process

        self.data = load_dataset(config.data.name, config.data.resolution, config.data.num_samples, config.seed,
                                 channels=config.data.channels)
        method_cls = get_method(config.method.name)
        self.teacher, self.latents, self.pixels, self.edges = None, None, self.data.x, {}
        if method_cls.needs_teacher:
            if not config.teacher:
                raise ValueError(f"teacher: method {config.method.name!r} needs a teacher (a diffusers folder or "
                                 "hub id)")
            self.teacher = self._prepare_teacher_and_data(config.teacher, device)
        self.data.x = self.data.x.to(device) if self.data.x is not None else None
        self.data.cond = {k: v.to(device) for k, v in (self.data.cond or {}).items()}
        if self.data.labels is not None:
            self.data.labels = self.data.labels.to(device)
        try:
            self.method: Method = method_cls(config.method, self.teacher, self.data)
        except (TypeError, AttributeError) as err:  # e.g. a model/scheduler config in the recipe with a wrong key
            from .config import ConfigError

            raise ConfigError(f"method: cannot build the {config.method.name} networks from the recipe ({err}); "
                              "check the method's model/scheduler settings against the docs") from err

        nets = self.method.trainable()
        self.modules = {name: module.to(device) for name, (module, _) in nets.items()}
        optimizers = {name: torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=o.lr, betas=o.betas, eps=o.eps,
                                              weight_decay=o.weight_decay)
                      for name, (module, o) in nets.items()}
        names = list(nets)
        prepared = self.accelerator.prepare(*[self.modules[n] for n in names], *[optimizers[n] for n in names])
        self.prepared = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(names, prepared[len(names):]))
        # The schedule's multiplier is set from the step at every update (not stepped), so resume needs no state.
        self.lr_lambdas = {n: get_scheduler(config.train.lr_schedule, optimizers[n],
                                            num_warmup_steps=config.train.lr_warmup_steps,
                                            num_training_steps=config.train.steps).lr_lambdas for n in names}

        ema_source = self.modules[method_cls.ema_network]
        self.ema_mask = [p.requires_grad for p in ema_source.parameters()]  # frozen (LoRA base) weights never move
        self.ema_module = copy.deepcopy(ema_source).eval().requires_grad_(False)
        self.ema = EMAModel(self._ema_params(ema_source), decay=config.ema.decay, use_ema_warmup=False)
        if not config.ema.warmup:
            self.ema.optimization_step = 10**9  # (1 + n)/(10 + n) ~ 1: the decay applies from step 0
        self.start_step, self.skipped_updates = 0, 0
        self._last_grad_norms: dict[str, float] = {}
        self.metrics_file = self.out / "metrics.jsonl"
        outputs.refuse_foreign_files(self.out)  # every process alike, before any of them changes anything
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self._set_aside_earlier_run(resume)
        self.fixed_noise, self.fixed_cond = self._fixed_inputs()
        if resume:
            self._resume(resume)

    def _prepare_teacher_and_data(self, spec, device):
        """Load the frozen teacher (dtype, offload, guidance) and bring the data into its space: images of a
        latent teacher are encoded once, rows get the teacher's conditioning (labels or text embeddings)."""
        from ..conditioning import PromptEncoder, row_conditioning
        from ..denoisers import GuidedDenoiser, load_teacher
        from ..latents import LatentSpace

        teacher = load_teacher(spec.path).to(dtype=getattr(torch, spec.dtype))
        if spec.cpu_offload and device.type != "cpu":
            from accelerate import cpu_offload

            cpu_offload(teacher.model, execution_device=device)
        else:
            teacher.to(device)
        self.latents = LatentSpace.from_pretrained(spec.path)
        if self.latents is not None:
            self.latents.to(device)
            if self.data.x is not None:
                self.data.x = self.latents.encode(self.data.x.to(device)).cpu()
        check_teacher_matches_data(teacher, self.data)
        prompts = PromptEncoder.from_pretrained(spec.path, network=teacher.model)
        self.data.cond, uncond = row_conditioning(self.data, teacher.num_classes, prompts, device)
        if self.latents is not None:  # what the exported pipeline needs around the generator network
            self.edges["vae"] = self.latents.vae
        if prompts is not None:
            self.edges.update(prompts.components, prompt_pipeline=type(prompts.pipeline).__name__)
        if spec.guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("teacher.guidance_scale needs a text-conditional teacher (its empty-prompt "
                                 "embedding is the unconditional branch); set it to 1")
            teacher = GuidedDenoiser(teacher, spec.guidance_scale, uncond)
        return teacher

    # --- one update of one network (called by methods through the StepContext) ----------------------------------
    def apply_update(self, name: str, loss: torch.Tensor, step: int) -> None:
        optimizer = self.optimizers[name]
        self.accelerator.backward(loss)
        params = [p for p in self.modules[name].parameters() if p.requires_grad]
        max_norm = self.config.train.grad_clip_norm or float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(params, max_norm)
        bad = torch.tensor(0.0 if torch.isfinite(loss) and torch.isfinite(grad_norm) else 1.0, device=loss.device)
        if self.accelerator.num_processes > 1:  # every rank must take the same decision
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            policy = self.config.train.nan_policy
            if policy == "stop" or self.skipped_updates > self.config.train.max_skipped_steps:
                raise TrainingStopped(
                    f"step {step}: non-finite {name} loss or gradient (loss={loss.item():.4g}); "
                    f"{self.skipped_updates} update(s) skipped so far (train.nan_policy={policy}, "
                    f"train.max_skipped_steps={self.config.train.max_skipped_steps}). Lower the learning rate, set "
                    "train.grad_clip_norm, or use train.mixed_precision=bf16 instead of fp16.")
            return
        for group, lr_lambda in zip(optimizer.param_groups, self.lr_lambdas[name]):
            group["lr"] = group["initial_lr"] * lr_lambda(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._last_grad_norms[name] = float(grad_norm)

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, acc = self.config.train, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            outputs.mark_run(self.out, dump_config(self.config))
        acc.init_trackers("onestep", config={"method": self.config.method.name, "seed": self.config.seed})
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps, desc="train",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        t0 = time.time()
        logs = {}
        for step in bar:
            rng = step_generator(self.config.seed, step, acc.process_index, acc.device)
            indices = torch.randint(len(self.data), (cfg.batch_size,), generator=rng, device=acc.device)
            batch = batch_from_data(self.data, indices)
            self._last_grad_norms = {}
            with acc.autocast():
                logs = self.method.step(batch, _Context(self, step, rng))
            self.ema.step(self._ema_params(self.modules[self.method.ema_network]))
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                logs.update({f"grad_norm/{k}": v for k, v in self._last_grad_norms.items()})
                self._log(done, logs)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss/")})
            if done % cfg.sample_every == 0 or done == cfg.steps:
                self.save_sample_grid(done)
            if self.config.eval.every and done % self.config.eval.every == 0 and done != cfg.steps:
                self._log(done, self.evaluate())
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                self.save_checkpoint(done)
        result = {"steps": cfg.steps, "train_seconds": time.time() - t0, "skipped_updates": self.skipped_updates}
        if self.config.eval.enabled:
            final = self.evaluate()
            self._log(cfg.steps, final)
            result.update(final)
        self.export(result)
        if acc.is_main_process and self.metrics_file.exists():
            plot_metrics(self.metrics_file, self.out)
        acc.end_training()
        return result

    # --- evaluation, samples, export ----------------------------------------------------------------------------
    def ema_network(self) -> torch.nn.Module:
        self.ema.copy_to(self._ema_params(self.ema_module))
        return self.ema_module

    def _ema_params(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p, trained in zip(module.parameters(), self.ema_mask) if trained]

    def save_sample_grid(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        samples = self.to_pixels(self.method.sample(self.ema_network(), self.fixed_noise, **self.fixed_cond))
        save_samples(samples, self.out / "samples" / f"step_{step:07d}.png", reference=self.pixels,
                     title=f"step {step}")

    def to_pixels(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples in the teacher's space -> what a person (and FID) looks at: decoded images for latent teachers."""
        return self.latents.decode(samples) if self.latents is not None else samples

    def evaluate(self) -> dict:
        """Frechet distance of EMA samples to the dataset's images (the extractor named in eval); needs images."""
        if self.data.kind != "image" or not self.accelerator.is_main_process:
            return {}
        from ..eval import frechet_distance

        network = self.ema_network()
        samples = generate(lambda noise, **cond: self.to_pixels(self.method.sample(network, noise, **cond)),
                           self.data, self.method.sample_shape, self.config.eval.num_samples, self.config.seed + 1,
                           self.accelerator.device)
        fd = frechet_distance(samples, self.pixels.cpu(), feature_extractor=self.config.eval.feature_extractor)
        return {"fid": fd}

    def export(self, result: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        network = self.ema_network()
        bad = [k for k, v in network.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"not exporting: the EMA {self.method.ema_network} has non-finite weights "
                                     f"({bad[0]}, ...); nothing was written. Resume from an earlier checkpoint with "
                                     "a lower learning rate or train.grad_clip_norm set")
        card = {"teacher": self.config.teacher.path if self.config.teacher else None, "dataset": self.config.data.name, "steps": self.config.train.steps}
        if "fid" in result:
            from ..eval import fid_protocol

            card["fid"] = result["fid"]
            card["fid_protocol"] = fid_protocol(self.config.eval.feature_extractor, self.config.eval.num_samples,
                                                len(self.data), self.config.data.name, 1)
        # Written under a temporary name, then swapped in: a crash mid-export leaves the previous export intact.
        final, tmp, old = (self.out / name for name in ("pipeline", f".tmp_pipeline_{os.getpid()}",
                                                         f".old_pipeline_{os.getpid()}"))
        for stale in [*self.out.glob(".tmp_pipeline_*"), *self.out.glob(".old_pipeline_*")]:  # from a killed export
            shutil.rmtree(stale, ignore_errors=True)
        try:
            self.method.export(network, tmp, card, self.edges)
        except BaseException as err:  # a half-written export never stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(err):
                raise OSError(f"not exporting: no space left on the device of {self.out} (the partial export was "
                              f"removed; the checkpoints, and {final} if there was one, are intact); free space, then "
                              "rerun with --resume latest to export") from err
            raise
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    # --- checkpoints --------------------------------------------------------------------------------------------
    def _set_aside_earlier_run(self, resume) -> None:
        """A fresh run into an earlier run's folder moves that run's results (checkpoints, pipeline, metrics, curves)
        to earlier_<time>/: mixed with the new ones, retention could delete the new run's checkpoints and `--resume
        latest` would pick the old run. Files of those names that onestep did not write are refused, never touched
        (onestep.training.outputs)."""
        note = outputs.claim_output_dir(self.out, resume=bool(resume))
        if note:
            print(note)

    def save_checkpoint(self, step: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            modules = {n: acc.unwrap_model(m) for n, m in self.prepared.items()}
            modules["ema"] = self.ema_network()
            state = {"ema_optimization_step": self.ema.optimization_step, "skipped_updates": self.skipped_updates,
                     "method": self.config.method.name}
            ckpt.save_checkpoint(self.out / "checkpoints", step, modules, self.optimizers, state,
                                 self.config.train.keep_checkpoints)
        acc.wait_for_everyone()

    def _resume(self, which: str) -> None:
        path = ckpt.resolve_checkpoint(self.out / "checkpoints", which)
        method = ckpt.read_state(path).get("method")
        if method != self.config.method.name:
            raise ValueError(f"{path}: checkpoint of method {method!r}, recipe says {self.config.method.name!r}; "
                             "resume with the recipe that made it, or start fresh without --resume")
        modules = {n: self.accelerator.unwrap_model(m) for n, m in self.prepared.items()}
        modules["ema"] = self.ema_module
        state = ckpt.load_checkpoint(path, modules, self.optimizers)
        self.ema = EMAModel(self._ema_params(self.ema_module), decay=self.config.ema.decay, use_ema_warmup=False)
        self.ema.optimization_step = state["ema_optimization_step"]
        self.start_step, self.skipped_updates = state["step"], state["skipped_updates"]
        if self.accelerator.is_main_process and self.metrics_file.exists():  # drop rows logged after the checkpoint
            rows = [r for r in self.metrics_file.read_text().splitlines() if _logged_step(r) <= state["step"]]
            tmp = self.metrics_file.with_name(self.metrics_file.name + ".tmp")
            tmp.write_text("".join(r + "\n" for r in rows))
            os.replace(tmp, self.metrics_file)

    def _log(self, step: int, logs: dict) -> None:
        if not logs:
            return
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

    def _fixed_inputs(self):
        """The noise and conditioning of every sample grid: the first rows of the data (digits cycle 0..9)."""
        n = self.config.train.num_sample_images
        noise = torch.randn((n, *self.method.sample_shape), generator=torch.Generator().manual_seed(1234))
        rows = torch.arange(n) % len(self.data)
        return noise.to(self.accelerator.device), {k: v[rows.to(v.device)] for k, v in (self.data.cond or {}).items()}


@torch.no_grad()
def generate(sample_fn, data, sample_shape, n: int, seed: int, device, batch_size: int = 250) -> torch.Tensor:
    """n samples of `sample_fn(noise, **cond)` with conditioning rows drawn at random from the data. The noise and
    rows depend only on the seed, so two samplers called with the same seed see the same inputs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = torch.randn((b, *sample_shape), generator=g).to(device)
        rows = torch.randint(len(data), (b,), generator=g)
        cond = {k: v[rows.to(v.device)].to(device) for k, v in (data.cond or {}).items()}
        out.append(sample_fn(noise, **cond).float().cpu())
    return torch.cat(out)


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl row; a row cut short by a crash sorts after every checkpoint (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def check_teacher_matches_data(teacher, data) -> None:
    if data.x is None:  # prompt-only data: nothing to compare
        return
    want, have = tuple(teacher.sample_shape), tuple(data.x.shape[1:])
    if want != have:
        fixes = []
        if len(want) == len(have) == 3:
            if want[0] != have[0]:
                fixes.append(f"data.channels: {want[0]}")
            if want[1:] != have[1:]:
                fixes.append(f"data.resolution: {want[-1]}")
        fix = f"set {' and '.join(fixes)}" if fixes else "use a dataset of the teacher's kind (images vs points)"
        raise ValueError(f"teacher samples have shape {want} but dataset {data.name!r} has {have}; {fix} to match "
                         "the teacher")
    if teacher.num_classes and data.labels is None:
        raise ValueError(f"the teacher is class-conditional ({teacher.num_classes} classes) but dataset "
                         f"{data.name!r} has no labels; use a labelled dataset (digits, shapes) or an unconditional "
                         "teacher")
