"""Networks that methods build around a denoiser: a fake-score network with an optional discriminator head."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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


def bce_discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE: real -> 1, fake -> 0. At the optimum logit = log(p/q), the density
    ratio (the optimal discriminator p/(p+q), Goodfellow et al. 2014, Prop. 1; docs/uni_instruct.md sec. 5)."""
    return F.softplus(-logit_real) + F.softplus(logit_fake)


def density_ratio(logit: torch.Tensor, logit_clamp: float = 10.0, r_min: float = 0.1, r_max: float = 20.0):
    """r = p/q from a discriminator logit, clamped as in FastGen's f-distill (github.com/NVlabs/FastGen)
    and detached (docs/uni_instruct.md sec. 5)."""
    return logit.detach().clamp(-logit_clamp, logit_clamp).exp().clamp(r_min, r_max)
