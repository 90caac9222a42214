"""What a distillation method is: data (its networks) plus one training step.

A method never loops, logs, saves or moves tensors between devices: the trainer (`onestep.training`) does that for
every method alike. A method says which networks it trains (`trainable`), does one iteration given a batch and a
`StepContext` (alternating updates happen inside, through `ctx.update`), and says what it exports.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass, field
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
    """Data for one step on this process: real samples x [B, ...] in the teacher's space (None for prompt-only
    data) and the conditioning keyword tensors the networks take (class_labels, encoder_hidden_states, ...)."""

    x: torch.Tensor | None
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    size: int = 0
    device: torch.device | str = "cpu"

    def __len__(self) -> int:
        return self.size


def batch_from_data(data, indices: torch.Tensor) -> Batch:
    """The Batch for dataset rows `indices` (`data.cond` holds the per-row conditioning for the teacher)."""
    cond = {k: v[indices] for k, v in (data.cond or {}).items()}
    x = None if data.x is None else data.x[indices]
    return Batch(x=x, cond=cond, size=len(indices), device=indices.device)


class StepContext(Protocol):
    """What the trainer lends a method for one step."""

    step: int                       # global step, 0-based
    rng: torch.Generator            # this step's random stream on this process (derived from seed, step, rank)

    def net(self, name: str) -> nn.Module:
        """The trainer-wrapped (DDP/FSDP) module of a trainable network: call it where that network learns."""

    def update(self, name: str, loss: torch.Tensor) -> None:
        """Backward `loss` into network `name` and take its optimizer step (clipping, NaN policy inside)."""

    def mean_across_processes(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over all processes (for batch statistics that must agree across ranks)."""


class Method:
    """Base class; subclasses set `name`, `Config`, and implement the four methods below."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    ema_network: ClassVar[str] = "generator"   # which trainable network gets an EMA copy (used for samples/export)
    needs_teacher: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, teacher, data):
        self.config = config
        self.teacher = teacher
        self.data = data

    @property
    def denoiser(self):
        """The denoiser whose conditioning and sample shape the method's networks share (the teacher's)."""
        return self.teacher

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

    def export(self, network: nn.Module, out_dir, card: dict[str, Any], edges: dict[str, Any]) -> None:
        """Write the trained artifact (a diffusers pipeline folder) from (an EMA copy of) the `ema_network`;
        `edges` are the teacher's VAE / text components that the pipeline needs around the network."""
        raise NotImplementedError

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
    teacher and fake score in the generator step; notes sec. 8.1)."""
    params = [p for m in modules for p in m.parameters()]
    states = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, state in zip(params, states):
            p.requires_grad_(state)
