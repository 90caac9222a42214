"""The one Accelerate loop every method shares.

It owns what methods must not: devices and processes (DDP on GPUs, gloo on CPUs), optimizers, mixed precision,
gradient clipping and the non-finite policy, EMA, per-step randomness, logging (TensorBoard + metrics.jsonl +
tqdm), sample grids, FID, checkpoints (atomic, full state, `--resume latest`) and the final export.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..checks import is_disk_full
from ..methods.base import Batch, Method, batch_from_data, get_method
from ..teachers import open_teacher
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


def shared_step_generator(seed: int, step: int, device) -> torch.Generator:
    """The random stream of one step that every process shares: a pure function of (seed, step) alone (a separate
    spawn key keeps it apart from every rank's own stream)."""
    state = np.random.SeedSequence([seed, step], spawn_key=(1,)).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


class _Context:
    """The StepContext a method sees for one step."""

    def __init__(self, trainer: "Trainer", step: int, rng: torch.Generator):
        self.trainer, self.step, self.rng = trainer, step, rng
        self.num_processes = trainer.accelerator.num_processes
        self._shared_rng = None

    @property
    def shared_rng(self) -> torch.Generator:
        if self._shared_rng is None:
            self._shared_rng = shared_step_generator(self.trainer.config.seed, self.step, self.trainer.accelerator.device)
        return self._shared_rng

    def net(self, name):
        return self.trainer.prepared[name]

    def update(self, name, loss_fn, batch):
        return self.trainer.apply_update(name, loss_fn, batch, self.step)

    def reset_optimizer_state(self, name, parameters):
        self.trainer.reset_optimizer_state(name, parameters)

    def mean_across_processes(self, value):
        return self.trainer.accelerator.reduce(value.detach().float(), reduction="mean")


class Trainer:
    def __init__(self, config: RunConfig, resume: str | None = None, accelerator: Accelerator | None = None):
        from ..data import load_dataset

        self.config = config
        self.out = Path(config.output_dir)
        method_cls = get_method(config.method.name)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.train.mixed_precision, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters=method_cls.ddp_find_unused_parameters)])
        device = self.accelerator.device
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > self.accelerator.num_processes:
            raise RuntimeError(f"{launched} processes were launched but accelerate set up {self.accelerator.num_processes}"
                               " (they would train independently). On CPUs set ACCELERATE_USE_CPU=1 and launch with "
                               "--multi_gpu (see recipes/accelerate/cpu_2proc.yaml)")
        torch.manual_seed(config.seed)  # identical initialisation of new networks on every process

        self.data = load_dataset(config.data.name, config.data.resolution, config.data.num_samples, config.seed,
                                 channels=config.data.channels)
        self.pixels = self.data.x  # what samples are compared with (before a latent teacher encodes the data)
        if method_cls.teacher_kind == "none" and config.teacher is not None:
            raise ValueError(f"teacher: method {config.method.name!r} uses no teacher; remove the teacher key")
        self.teacher = open_teacher(config.teacher, method_cls.teacher_kind, device, self.data)
        for key in ("x", "labels"):
            if getattr(self.data, key) is not None:
                setattr(self.data, key, getattr(self.data, key).to(device))
        self.data.cond = {k: v.to(device) for k, v in (self.data.cond or {}).items()}
        if getattr(self.data, "extras", None):
            self.data.extras = {k: v.to(device) for k, v in self.data.extras.items()}
        try:
            self.method: Method = method_cls(config.method, self.teacher, self.data)
        except (TypeError, AttributeError) as err:  # e.g. a model/scheduler config in the recipe with a wrong key
            from .config import ConfigError

            raise ConfigError(f"method: cannot build the {config.method.name} networks from the recipe ({err}); "
                              "check the method's model/scheduler settings against the docs") from err

        nets = self.method.trainable()
        for name, init in config.init_from.items():  # chained stages: start a network from another run's weights
            if name not in nets:
                raise ValueError(f"init_from.{name}: method {config.method.name} trains no network {name!r}; "
                                 f"valid: {', '.join(nets)}")
            ckpt.load_initial_weights(nets[name][0], init.path, init.network or name, init.weights)
        if config.train.channels_last:  # NHWC weights: convolutions take oneDNN's / cuDNN's faster path
            for module in _modules_of(*(m for m, _ in nets.values()), self.method, self.teacher):
                module.to(memory_format=torch.channels_last)
        self.modules = {name: module.to(device) for name, (module, _) in nets.items()}
        optimizers = {name: torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=o.lr,
                                              betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
                      for name, (module, o) in nets.items()}
        names = list(nets)
        self.sparse = set(method_cls.sparse_networks)
        if self.sparse - set(names):
            raise ValueError(f"method {config.method.name}: sparse_networks {sorted(self.sparse - set(names))} are not "
                             "among its trainable networks")
        dense = [n for n in names if n not in self.sparse]  # DDP-wrapped; sparse ones average gradients themselves
        prepared = self.accelerator.prepare(*[self.modules[n] for n in dense], *[optimizers[n] for n in names])
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)  # one object comes back bare
        self.prepared = {**{n: self.modules[n] for n in names}, **dict(zip(dense, prepared[: len(dense)]))}
        self.optimizers = dict(zip(names, prepared[len(dense):]))
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

    # --- one update of one network (called by methods through the StepContext) ----------------------------------
    def apply_update(self, name: str, loss_fn, batch: Batch, step: int) -> dict[str, float]:
        """Micro-batches of `batch` (train.gradient_accumulation_steps), backward of each row-weighted loss (DDP
        synchronises on the last one only), then clipping, the non-finite policy and the optimizer step."""
        optimizer, module = self.optimizers[name], self.prepared[name]
        parts = batch.split(min(self.config.train.gradient_accumulation_steps, len(batch)))
        total, logs = 0.0, {}
        for i, part in enumerate(parts):
            weight = len(part) / len(batch)
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last or name in self.sparse else self.accelerator.no_sync(module)
            with sync:
                loss, part_logs = loss_fn(part)
                self.accelerator.backward(loss * weight)
            total = total + loss.detach().float() * weight
            for key, value in part_logs.items():
                logs[key] = logs.get(key, 0.0) + value * weight
        if name in self.sparse:
            self._average_sparse_gradients(name)
        params = [p for p in self.modules[name].parameters() if p.requires_grad and p.grad is not None]
        max_norm = self.config.train.grad_clip_norm or float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        bad = torch.tensor(0.0 if torch.isfinite(total) and torch.isfinite(grad_norm) else 1.0, device=total.device)
        if self.accelerator.num_processes > 1:  # every rank must take the same decision
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            policy = self.config.train.nan_policy
            if policy == "stop" or self.skipped_updates > self.config.train.max_skipped_steps:
                raise TrainingStopped(
                    f"step {step}: non-finite {name} loss or gradient (loss={total.item():.4g}); "
                    f"{self.skipped_updates} update(s) skipped so far (train.nan_policy={policy}, "
                    f"train.max_skipped_steps={self.config.train.max_skipped_steps}). Lower the learning rate, set "
                    "train.grad_clip_norm, or use train.mixed_precision=bf16 instead of fp16.")
            return logs
        for group, lr_lambda in zip(optimizer.param_groups, self.lr_lambdas[name]):
            group["lr"] = group["initial_lr"] * lr_lambda(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._last_grad_norms[name] = float(grad_norm)
        return logs

    def _average_sparse_gradients(self, name: str) -> None:
        """Average the gradients of a sparsely updated network over processes, parameter by parameter, for exactly
        the parameters that received one (the same on every rank when the subset came from `ctx.shared_rng`);
        the others keep no gradient, so the optimizer leaves them (and their moments) untouched."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        used = [i for i, p in enumerate(self.modules[name].parameters()) if p.grad is not None]
        signature = torch.tensor([len(used), sum(used)], device=acc.device, dtype=torch.float64)
        if not (acc.gather(signature[None]) == signature).all():
            raise RuntimeError(f"network {name}: processes trained different parameter subsets this step; draw the "
                               "subset from ctx.shared_rng (shared by all ranks), not ctx.rng")
        grads = [p.grad for p in self.modules[name].parameters() if p.grad is not None]
        if grads:
            flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
            for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))

    def reset_optimizer_state(self, name: str, parameters) -> None:
        optimizer = self.optimizers[name]
        inner = getattr(optimizer, "optimizer", optimizer)
        for p in parameters:
            inner.state.pop(p, None)

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
        return self.teacher.to_pixels(samples) if self.teacher is not None else samples

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
        card = {"teacher": self.config.teacher.path if self.config.teacher else None, "dataset": self.config.data.name,
                "steps": self.config.train.steps, "train_seconds": round(result.get("train_seconds", 0.0), 1)}
        if "fid" in result:
            from ..eval import fid_protocol

            card["fid"] = result["fid"]
            card["fid_protocol"] = fid_protocol(self.config.eval.feature_extractor, self.config.eval.num_samples,
                                                len(self.data), self.config.data.name, 1)
        self._export_atomically(self.ema_network(), "pipeline", {**card, "weights": "ema"})
        if self.config.train.export_raw:  # the raw (non-EMA) weights too, e.g. for a later stage's init_from
            raw = self.accelerator.unwrap_model(self.prepared[self.method.ema_network])
            self._export_atomically(raw, "pipeline_raw", {k: v for k, v in card.items() if k != "fid"} | {"weights": "raw"})

    def _export_atomically(self, network, folder: str, card: dict) -> None:
        bad = [k for k, v in network.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"not exporting: the {card['weights'].replace('ema', 'EMA')} {self.method.ema_network} has non-finite "
                                     f"weights ({bad[0]}, ...); nothing was written. Resume from an earlier checkpoint "
                                     "with a lower learning rate or train.grad_clip_norm set")
        # Written under a temporary name, then swapped in: a crash mid-export leaves the previous export intact.
        final, tmp, old = (self.out / name for name in (folder, f".tmp_{folder}_{os.getpid()}",
                                                         f".old_{folder}_{os.getpid()}"))
        for stale in [*self.out.glob(f".tmp_{folder}_*"), *self.out.glob(f".old_{folder}_*")]:  # a killed export
            shutil.rmtree(stale, ignore_errors=True)
        if self.config.train.channels_last:  # safetensors stores contiguous tensors only
            network = copy.deepcopy(network).to(memory_format=torch.contiguous_format)
        try:
            self.method.export(network, tmp, card)
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
                     "method": self.config.method.name, "ema_network": self.method.ema_network}
            ckpt.save_checkpoint(self.out / "checkpoints", step, modules, self.optimizers, state,
                                 self.config.train.keep_checkpoints, self.method.state_dict())
        acc.wait_for_everyone()

    def _resume(self, which: str) -> None:
        path = ckpt.resolve_checkpoint(self.out / "checkpoints", which)
        method = ckpt.read_state(path).get("method")
        if method != self.config.method.name:
            raise ValueError(f"{path}: checkpoint of method {method!r}, recipe says {self.config.method.name!r}; "
                             "resume with the recipe that made it, or start fresh without --resume")
        modules = {n: self.accelerator.unwrap_model(m) for n, m in self.prepared.items()}
        modules["ema"] = self.ema_module
        configured = {n: [g["initial_lr"] for g in o.param_groups] for n, o in self.optimizers.items()}
        state = ckpt.load_checkpoint(path, modules, self.optimizers, self.method)
        for name, optimizer in self.optimizers.items():  # the recipe's learning rates, not the checkpoint's
            for group, lr in zip(optimizer.param_groups, configured[name]):
                if group["initial_lr"] != lr and self.accelerator.is_main_process:
                    print(f"resume: {name} learning rate {group['initial_lr']:g} -> {lr:g} (the recipe's)")
                group["initial_lr"] = lr
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
    """n samples of `sample_fn(noise, **cond)` on the evaluation stream (`onestep.data.labels.evaluation_inputs`:
    balanced labels for class-labelled data, each sample taking the conditioning of a row of its class). Noise and
    rows depend only on the seed, so two samplers called with the same seed see the same inputs."""
    from ..data.labels import evaluation_inputs

    out = []
    for noise, rows in evaluation_inputs(data, sample_shape, n, seed, batch_size):
        cond = {k: v[rows.to(v.device)].to(device) for k, v in (data.cond or {}).items()}
        out.append(sample_fn(noise.to(device), **cond).float().cpu())
    return torch.cat(out)


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl row; a row cut short by a crash sorts after every checkpoint (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _modules_of(*objects) -> list[torch.nn.Module]:
    """The distinct modules among `objects` and their attributes (a method's or a teacher bundle's networks)."""
    found = {}
    for obj in objects:
        candidates = [obj] if isinstance(obj, torch.nn.Module) else list(vars(obj).values()) if obj is not None else []
        found.update({id(m): m for m in candidates if isinstance(m, torch.nn.Module)})
    return list(found.values())
