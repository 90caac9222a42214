"""Networks that methods build: any trusted model class from a config (`build_network`), and around a denoiser a
fake-score network with an optional discriminator head."""
from __future__ import annotations

import torch
from torch import nn

from .denoisers import Denoiser


class LogitHead(nn.Module):
    """A small discriminator head on bottleneck features; returns one logit per sample (spatial mean).

    DMD2 puts a conv head on the fake UNet's bottleneck; SiDA takes the channel mean of the same features. This is a
    light version of the former (conv3x3 -> SiLU -> conv1x1 -> spatial mean) that also accepts [B, C] features.
    """

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        if spatial:
            self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.Conv2d(channels, 1, 1))
        else:
            self.net = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1).mean(1)


class FakeScore(nn.Module):
    """The auxiliary score network D_q (a copy of the teacher) plus, when asked, a logit head on its bottleneck.

    One module so that one optimizer and one DDP wrapper cover both, and one forward pass serves the denoising
    loss and the discriminator (SiDA/DMD2 share the encoder the same way).
    """

    def __init__(self, denoiser: Denoiser, with_head: bool, example_cond: dict | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.head = None
        if with_head:
            shape = self._feature_shape(example_cond or {})
            self.head = LogitHead(shape[0], spatial=len(shape) == 3)

    def forward(self, x, sigma, with_logit: bool = False, **cond):
        if not with_logit:
            return self.denoiser(x, sigma, **cond), None
        x0, features = self.denoiser(x, sigma, return_features=True, **cond)
        return x0, self.head(features)

    @torch.no_grad()
    def _feature_shape(self, example_cond: dict) -> tuple[int, ...]:
        cond = {k: v[:1] for k, v in example_cond.items()}
        probe = torch.zeros(1, *self.denoiser.sample_shape, device=next(self.denoiser.parameters()).device)
        _, features = self.denoiser(probe, 1.0, return_features=True, **cond)
        return tuple(features.shape[1:])


def build_network(class_name: str, config: dict, **defaults) -> nn.Module:
    """A new (randomly initialised) network of a diffusers / transformers / onestep model class from its config: how a
    student smaller than its teacher, a time-free UNet or a discriminator head is made from a recipe.

    `class_name` is a class of diffusers (`UNet2DModel`, `UNet2DConditionModel`, ...), onestep (`MLPModel`, ...) or a
    dotted `library.Class`; `defaults` (sample size, channels, class count read off the data) are overridden by
    `config`. An unknown key or bad value is reported in one line naming the class and its valid keys.
    """
    import inspect

    from .denoisers import import_trusted_class

    library, _, name = class_name.rpartition(".")
    candidates = [library] if library else ["diffusers", "onestep.denoisers", "onestep.networks"]
    klass = None
    for lib in candidates:
        try:
            klass = import_trusted_class([lib, name], "network config")
            break
        except ValueError:
            if lib == candidates[-1]:
                raise ValueError(f"network class {class_name!r} is not a diffusers, transformers or onestep model "
                                 "class; e.g. UNet2DModel, UNet2DConditionModel, MLPModel") from None
    kwargs = {**defaults, **config}
    accepted = set(inspect.signature(klass.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"{name} config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(accepted))}")
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    try:
        return klass(**kwargs)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as err:
        raise ValueError(f"{name} config: cannot build the network ({' '.join(str(err).split())[:300]}); check the "
                         "block types, channel counts and group norms") from None


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
