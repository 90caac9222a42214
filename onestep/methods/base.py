"""What a distillation method is: data (its networks) plus one training step.

A method never loops, logs, saves or moves tensors between devices: the trainer (`onestep.training`) does that for
every method alike. A method says which networks it trains (`trainable`), does one iteration given a batch and a
`StepContext` (alternating updates happen inside, through `ctx.update`), and says what it exports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class StrictModel(BaseModel):
    """Config base: unknown keys are errors, not silently ignored; NaN / infinity are never valid floats."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class OptimizerConfig(StrictModel):
    """Adam(W) settings for one network. SiD/Uni-Instruct use betas (0, 0.999)."""

    lr: float = Field(1e-5, gt=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.0, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class NetworkConfig(StrictModel):
    """How a network copied from the teacher trains: fully, or through LoRA adapters (peft)."""

    lora_rank: int = Field(0, ge=0, le=1024, description="0: train every weight; r > 0: rank-r LoRA adapters only")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator (default: the rank)")
    lora_targets: list[str] | None = Field(None, description="module names to adapt (default: attention "
                                           "projections and residual convolutions)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")


class MethodConfig(StrictModel):
    name: str


def trainable_copy(teacher, network: NetworkConfig):
    """A trainable copy of the teacher's network (student or fake score), full or LoRA, in train mode."""
    from ..lora import add_lora

    copy = teacher.clone().float()  # trainable weights are float32 even when the teacher runs in bf16/fp16
    model = copy.model
    if network.gradient_checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; set "
                             "gradient_checkpointing: false")
        model.enable_gradient_checkpointing()
    if network.lora_rank:
        add_lora(model, network.lora_rank, network.lora_alpha, network.lora_targets)
    else:
        model.requires_grad_(True)
    return copy.train()


@dataclass
class Batch:
    """Data for one step on this process: real samples x [B, ...] in the teacher's space (None for label- or
    prompt-only data), the conditioning keyword tensors the networks take (class_labels, encoder_hidden_states, ...),
    and per-row `extras` that are not network inputs (e.g. the stored noise of a (noise, sample) pair)."""

    x: torch.Tensor | None
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    size: int = 0
    device: torch.device | str = "cpu"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.size

    def rows(self, index: slice | torch.Tensor) -> "Batch":
        """The sub-batch of the given rows (how gradient accumulation splits a batch into micro-batches)."""
        pick = (lambda v: v[index])  # noqa: E731
        size = len(range(self.size)[index]) if isinstance(index, slice) else len(index)
        return Batch(x=None if self.x is None else pick(self.x), cond={k: pick(v) for k, v in self.cond.items()},
                     size=size, device=self.device, extras={k: pick(v) for k, v in self.extras.items()})

    def with_extras(self, **tensors: torch.Tensor) -> "Batch":
        """This batch with more per-row tensors in `extras` (they follow its rows through `rows` and `split`)."""
        return dataclasses.replace(self, extras={**self.extras, **tensors})

    def split(self, parts: int) -> list["Batch"]:
        """`parts` contiguous micro-batches (sizes differ by at most one row)."""
        bounds = [round(i * self.size / parts) for i in range(parts + 1)]
        return [self.rows(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def batch_from_data(data, indices: torch.Tensor) -> Batch:
    """The Batch for dataset rows `indices` (`data.cond` holds the per-row conditioning for the teacher, `data.extras`
    any other per-row tensors)."""
    cond = {k: v[indices] for k, v in (data.cond or {}).items()}
    extras = {k: v[indices] for k, v in (getattr(data, "extras", None) or {}).items()}
    x = None if data.x is None else data.x[indices]
    return Batch(x=x, cond=cond, size=len(indices), device=indices.device, extras=extras)


class StepContext(Protocol):
    """What the trainer lends a method for one step."""

    step: int                       # global step, 0-based
    rng: torch.Generator            # this step's random stream on this process (derived from seed, step, rank)
    shared_rng: torch.Generator     # this step's stream shared by every process (seed and step only): draw here
                                    # whatever all ranks must agree on, e.g. which heads of a pool train this step
    num_processes: int

    def net(self, name: str) -> nn.Module:
        """The trainer-wrapped (DDP/FSDP) module of a trainable network: call it where that network learns."""

    def update(self, name: str, loss_fn: Callable[["Batch"], tuple[torch.Tensor, dict]], batch: "Batch") -> dict:
        """One optimizer step of network `name` on `batch`: `loss_fn(micro_batch) -> (loss, logs)` is called once per
        micro-batch (train.gradient_accumulation_steps; DDP synchronises on the last one only), its gradients are
        accumulated row-weighted, then clipped, checked for non-finite values and applied. Returns the logs averaged
        over the micro-batches."""

    def reset_optimizer_state(self, name: str, parameters) -> None:
        """Forget the optimizer state (Adam moments, step count) of the given parameters of network `name`: for
        parameters that the method re-initialises (a refreshed discriminator head starts as new)."""

    def mean_across_processes(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over all processes (for batch statistics that must agree across ranks)."""


class Method:
    """Base class; subclasses set `name`, `Config`, and implement `trainable`, `step`, `sample`, `export` and
    `smoke_recipe` (the tiny recipe the contract test in tests/test_method_contract.py runs for every method)."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    teacher_kind: ClassVar[str] = "diffusion"   # the bundle `onestep.teachers.open_teacher` opens for this method
    ema_network: ClassVar[str] = "generator"   # which trainable network gets an EMA copy (used for samples/export)
    sparse_networks: ClassVar[tuple[str, ...]] = ()  # networks of which a step may train only a subset: their
    # gradients are averaged over processes by the trainer (not DDP), parameters without a gradient are not stepped
    ddp_find_unused_parameters: ClassVar[bool] = False  # True when a network's forward leaves some parameters out
    # (one network used in two modes): DDP then looks for them each step (torch's `find_unused_parameters`)

    def __init__(self, config: MethodConfig, teacher, data):
        self.config = config
        self.teacher = teacher
        self.data = data

    @property
    def denoiser(self):
        """The denoiser whose conditioning and sample shape the method's networks share (the teacher's)."""
        return self.teacher.denoiser

    @property
    def num_classes(self) -> int | None:
        return self.denoiser.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.denoiser.sample_shape)

    def trainable(self) -> dict[str, tuple[nn.Module, OptimizerConfig]]:
        raise NotImplementedError

    def step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, network: nn.Module, noise: torch.Tensor, **cond) -> torch.Tensor:
        """Samples from (an EMA copy of) the `ema_network`, for sample grids and evaluation."""
        raise NotImplementedError

    def export(self, network: nn.Module, out_dir, card: dict[str, Any]) -> None:
        """Write the trained artifact (a registered onestep pipeline folder) from (an EMA or raw copy of) the
        `ema_network`; `self.teacher.edges` are the VAE / text components the pipeline needs around the network."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Method state that is not a network (a dual variable, a running statistic): saved in every checkpoint and
        restored on resume, so resumed runs stay bit-exact. Tensors only (scalars as 0-d tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"method {self.name} keeps no state, but the checkpoint holds {sorted(state)}")

    smoke_variants: ClassVar[tuple[str, ...] | tuple[None]] = (None,)  # variants the contract test runs

    @classmethod
    def smoke_recipe(cls, teacher: str | None, variant: str | None = None) -> dict:
        """A recipe (as a dict) that trains this method on tiny components in seconds: `teacher` is a tiny folder of
        this method's `teacher_kind` (None for "none"), `variant` one of `smoke_variants`. The contract test
        (tests/test_method_contract.py) runs it for every registered method."""
        raise NotImplementedError(f"method {cls.name} has no smoke_recipe: every method must give one")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTRY[cls.name] = cls


_REGISTRY: dict[str, type[Method]] = {}


def available_methods() -> dict[str, type[Method]]:
    """Every method in `onestep.methods` (each module registers its Method subclass on import)."""
    package = importlib.import_module("onestep.methods")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"onestep.methods.{info.name}")
    return dict(_REGISTRY)


def get_method(name: str) -> type[Method]:
    from ..checks import shown

    methods = available_methods()
    if name not in methods:
        raise ValueError(f"method.name: unknown method {shown(name)}; valid: {', '.join(sorted(methods))}")
    return methods[name]


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Freeze parameters while gradients still flow through the inputs (what SiD/Uni-Instruct need for the
    teacher and fake score in the generator step: SiD, Zhou et al. 2024, Algorithm 1), and put the modules in eval
    mode (dropout off, normalisation statistics fixed), restoring both afterwards."""
    params = [p for m in modules for p in m.parameters()]
    states = [p.requires_grad for p in params]
    submodules = [sub for m in modules for sub in m.modules()]
    modes = [sub.training for sub in submodules]
    for p in params:
        p.requires_grad_(False)
    for sub in submodules:
        sub.training = False
    try:
        yield
    finally:
        for p, state in zip(params, states):
            p.requires_grad_(state)
        for sub, mode in zip(submodules, modes):
            sub.training = mode
