"""The one Accelerate loop every method shares.

It owns what methods must not: devices and processes (DDP on GPUs, gloo on CPUs), optimizers, mixed precision,
gradient clipping and the non-finite policy, EMA, per-step randomness, logging (TensorBoard + metrics.jsonl +
tqdm), sample grids, FID, checkpoints (atomic, full state, `--resume latest`) and the final export.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..methods.base import Method, batch_from_data, get_method
from . import checkpoint as ckpt
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
        from ..denoisers import load_teacher

        self.config = config
        self.out = Path(config.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.train.mixed_precision, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        device = self.accelerator.device
        torch.manual_seed(config.seed)  # identical initialisation of new networks on every process

        self.data = load_dataset(config.data.name, config.data.resolution, config.data.num_samples, config.seed)
        method_cls = get_method(config.method.name)
        self.teacher = None
        if method_cls.needs_teacher:
            if not config.teacher:
                raise ValueError(f"teacher: method {config.method.name!r} needs a teacher (a diffusers folder or "
                                 "hub id)")
            self.teacher = load_teacher(config.teacher).to(device)
            check_teacher_matches_data(self.teacher, self.data)
        self.data.x = self.data.x.to(device)
        if self.data.labels is not None:
            self.data.labels = self.data.labels.to(device)
        self.method: Method = method_cls(config.method, self.teacher, self.data)

        nets = self.method.trainable()
        self.modules = {name: module.to(device) for name, (module, _) in nets.items()}
        optimizers = {name: torch.optim.AdamW(module.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                              weight_decay=o.weight_decay)
                      for name, (module, o) in nets.items()}
        names = list(nets)
        prepared = self.accelerator.prepare(*[self.modules[n] for n in names], *[optimizers[n] for n in names])
        self.prepared = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(names, prepared[len(names):]))

        ema_source = self.modules[method_cls.ema_network]
        self.ema_module = copy.deepcopy(ema_source).eval().requires_grad_(False)
        self.ema = EMAModel(ema_source.parameters(), decay=config.ema.decay, use_ema_warmup=False)
        if not config.ema.warmup:
            self.ema.optimization_step = 10**9  # (1 + n)/(10 + n) ~ 1: the decay applies from step 0
        self.start_step, self.skipped_updates = 0, 0
        self._last_grad_norms: dict[str, float] = {}
        self.metrics_file = self.out / "metrics.jsonl"
        if not resume and self.accelerator.is_main_process:
            self.metrics_file.unlink(missing_ok=True)  # a fresh run starts a fresh log
        self.fixed_noise, self.fixed_cond = self._fixed_inputs()
        if resume:
            self._resume(resume)

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
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._last_grad_norms[name] = float(grad_norm)

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, acc = self.config.train, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(self.config))
        acc.init_trackers("onestep", config={"method": self.config.method.name, "seed": self.config.seed})
        num_classes = self.method.num_classes
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps, desc="train",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        t0 = time.time()
        logs = {}
        for step in bar:
            rng = step_generator(self.config.seed, step, acc.process_index, acc.device)
            indices = torch.randint(len(self.data), (cfg.batch_size,), generator=rng, device=acc.device)
            batch = batch_from_data(self.data, indices, num_classes)
            self._last_grad_norms = {}
            with acc.autocast():
                logs = self.method.step(batch, _Context(self, step, rng))
            self.ema.step(self.modules[self.method.ema_network].parameters())
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
        self.ema.copy_to(self.ema_module.parameters())
        return self.ema_module

    def save_sample_grid(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        samples = self.method.sample(self.ema_network(), self.fixed_noise, **self.fixed_cond)
        save_samples(samples, self.out / "samples" / f"step_{step:07d}.png", reference=self.data.x,
                     title=f"step {step}")

    def evaluate(self) -> dict:
        """Frechet distance of EMA samples to the dataset (images only; the extractor named in eval)."""
        if self.data.kind != "image" or not self.accelerator.is_main_process:
            return {}
        from ..eval import frechet_distance

        n = self.config.eval.num_samples
        network = self.ema_network()
        samples = generate(lambda noise, **cond: self.method.sample(network, noise, **cond), self.data, n,
                           self.config.seed + 1, self.method.num_classes, self.accelerator.device)
        fd = frechet_distance(samples, self.data.x.cpu(), feature_extractor=self.config.eval.feature_extractor)
        return {"fid": fd}

    def export(self, result: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        card = {"teacher": self.config.teacher, "dataset": self.config.data.name, "steps": self.config.train.steps}
        if "fid" in result:
            from ..eval import fid_protocol

            card["fid"] = result["fid"]
            card["fid_protocol"] = fid_protocol(self.config.eval.feature_extractor, self.config.eval.num_samples,
                                                len(self.data), self.config.data.name, 1)
        self.method.export(self.ema_network(), self.out / "pipeline", card)

    # --- checkpoints --------------------------------------------------------------------------------------------
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
        modules = {n: self.accelerator.unwrap_model(m) for n, m in self.prepared.items()}
        modules["ema"] = self.ema_module
        state = ckpt.load_checkpoint(path, modules, self.optimizers)
        if state.get("method") != self.config.method.name:
            raise ValueError(f"{path}: checkpoint of method {state.get('method')!r}, recipe says "
                             f"{self.config.method.name!r}")
        self.ema = EMAModel(self.ema_module.parameters(), decay=self.config.ema.decay, use_ema_warmup=False)
        self.ema.optimization_step = state["ema_optimization_step"]
        self.start_step, self.skipped_updates = state["step"], state["skipped_updates"]
        if self.accelerator.is_main_process and self.metrics_file.exists():  # drop rows logged after the checkpoint
            rows = [r for r in self.metrics_file.read_text().splitlines() if r and json.loads(r)["step"] <= state["step"]]
            self.metrics_file.write_text("".join(r + "\n" for r in rows))

    def _log(self, step: int, logs: dict) -> None:
        if not logs:
            return
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

    def _fixed_inputs(self):
        g = torch.Generator().manual_seed(1234)
        n = self.config.train.num_sample_images
        noise = torch.randn((n, *self.method.sample_shape), generator=g).to(self.accelerator.device)
        num_classes = self.method.num_classes
        cond = {"class_labels": (torch.arange(n) % num_classes).to(self.accelerator.device)} if num_classes else {}
        return noise, cond


@torch.no_grad()
def generate(sample_fn, data, n: int, seed: int, num_classes: int | None, device, batch_size: int = 250):
    """n samples of `sample_fn(noise, **cond)`, labels drawn from the data's label distribution. The noise and labels
    depend only on the seed, so two samplers called with the same seed see the same inputs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = torch.randn((b, *data.x.shape[1:]), generator=g).to(device)
        cond = {}
        if num_classes:
            cond["class_labels"] = data.labels.cpu()[torch.randint(len(data), (b,), generator=g)].to(device)
        out.append(sample_fn(noise, **cond).float().cpu())
    return torch.cat(out)


def check_teacher_matches_data(teacher, data) -> None:
    if tuple(teacher.sample_shape) != tuple(data.x.shape[1:]):
        raise ValueError(f"teacher samples have shape {tuple(teacher.sample_shape)} but dataset {data.name!r} has "
                         f"{tuple(data.x.shape[1:])}: set data.resolution (and channels) to match the teacher")
