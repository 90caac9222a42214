"""Control models C: image -> control map, for adding new controls to a one-step generator (`onestep.methods.nct`).

Every control takes images [B, C, H, W] in [-1, 1] and returns maps [B, k, H, W] in [-1, 1] at the same spatial size
(so an adapter sees every control at the image's resolution), needs no downloaded weights and runs without gradients:

=============  =========================================================================================================
``sobel``      Sobel gradient magnitude of the luminance, `scale`-d and clipped (soft edges, 1 channel)
``canny``      Canny's detector (Canny 1986): Sobel gradients, non-maximum suppression along the gradient direction,
               double threshold and hysteresis by iterated 8-connected dilation (binary edges, 1 channel)
``lowres``     the image average-pooled by `factor` and enlarged back with nearest neighbours (the super-resolution
               control of NCT, Luo et al. 2025, sec. 4: 8x there; C channels)
``blur``       a Gaussian blur of standard deviation `sigma` pixels (C channels)
``brightness`` the luminance average-pooled by `factor` (1 channel; a colorisation / relighting control)
=============  =========================================================================================================

Any callable `images -> maps` plugs in: pass it where a name is taken (`control_model(fn)`), or register it under a
name (`register_control`) so that recipes can name it.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def luminance(images: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luminance in [-1, 1] (the image itself when it has one channel)."""
    if images.shape[1] == 1:
        return images
    if images.shape[1] != 3:
        return images.mean(1, keepdim=True)
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _sobel(gray01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray01.dtype,
                      device=gray01.device)
    padded = F.pad(gray01, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx.reshape(1, 1, 3, 3))
    gy = F.conv2d(padded, kx.t().reshape(1, 1, 3, 3))
    return gx, gy


def sobel(images: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Gradient magnitude of the luminance (on the [0, 1] scale) times `scale`, clipped to [0, 1], as [-1, 1]."""
    gx, gy = _sobel((luminance(images) + 1) / 2)
    return (scale * (gx.square() + gy.square()).sqrt()).clamp(0, 1) * 2 - 1


def canny(images: torch.Tensor, low: float = 0.3, high: float = 0.6, iterations: int = 8) -> torch.Tensor:
    """Binary Canny edges (+1 edge, -1 background). Thresholds are on the Sobel magnitude of the [0, 1] luminance;
    weak pixels (>= low) are kept when connected to a strong one (>= high) within `iterations` dilation steps."""
    gx, gy = _sobel((luminance(images) + 1) / 2)
    mag = (gx.square() + gy.square()).sqrt()
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180  # gradient direction, 4 bins: 0, 45, 90, 135 degrees
    direction = ((angle + 22.5) // 45).long() % 4
    padded = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape[-2:]
    shifted = lambda dy, dx: padded[..., 1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]  # noqa: E731
    neighbours = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for d, (a, b) in enumerate(neighbours):
        peak = (mag >= shifted(*a)) & (mag >= shifted(*b))
        keep |= (direction == d) & peak
    mag = mag * keep
    strong, weak = mag >= high, mag >= low
    edges = strong
    for _ in range(iterations):  # hysteresis: grow strong edges through weak pixels
        grown = F.max_pool2d(edges.float(), 3, stride=1, padding=1).bool() & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.to(images.dtype) * 2 - 1


def lowres(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Average-pool by `factor`, then nearest-neighbour back to the input size (the image a factor-x
    super-resolution model starts from)."""
    small = F.avg_pool2d(images, factor, ceil_mode=True)
    return F.interpolate(small, scale_factor=factor, mode="nearest")[..., : images.shape[-2], : images.shape[-1]]


def blur(images: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding, kernel radius ceil(3 sigma))."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-x.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    mode = "reflect" if min(images.shape[-2:]) > radius else "replicate"
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode=mode), kernel.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1),
                   groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode=mode), kernel.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def brightness(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The luminance, average-pooled by `factor` and enlarged back (a coarse brightness layout)."""
    return lowres(luminance(images), factor)


_CONTROLS: dict[str, Callable] = {"sobel": sobel, "canny": canny, "lowres": lowres, "blur": blur,
                                  "brightness": brightness}
_LIMITS = {"scale": (0.0, 1e3), "low": (0.0, 10.0), "high": (0.0, 10.0), "iterations": (0, 1000),
           "factor": (1, 64), "sigma": (0.05, 32.0)}


def register_control(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make `fn(images [-1, 1]) -> maps [-1, 1]` available to recipes as `control: {name: NAME}`."""
    if not callable(fn):
        raise TypeError(f"register_control: {fn!r} is not callable")
    _CONTROLS[name] = fn


def available_controls() -> list[str]:
    return sorted(_CONTROLS)


class ControlModel:
    """A control model: a named function plus its options, called without gradients. `spec` is a JSON-able
    description ({"name": ..., **options}) that exported pipelines store, so they can rebuild it."""

    def __init__(self, fn: Callable, name: str, options: dict):
        self.fn, self.name, self.options = fn, name, dict(options)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.fn(images.float(), **self.options)
        if not (torch.is_tensor(maps) and maps.dim() == 4 and maps.shape[0] == images.shape[0]
                and maps.shape[-2:] == images.shape[-2:]):
            got = tuple(maps.shape) if torch.is_tensor(maps) else type(maps).__name__
            raise ValueError(f"control {self.name}: must return maps [B, k, H, W] of the images' size "
                             f"{tuple(images.shape[-2:])}, got {got}")
        return maps

    @property
    def spec(self) -> dict:
        return {"name": self.name, **self.options}

    def channels(self, image_channels: int) -> int:
        """Channels of the maps for images of `image_channels` channels."""
        return self(torch.zeros(1, image_channels, 16, 16)).shape[1]

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}({options})"


def control_model(spec: str | dict | Callable | ControlModel, **options) -> ControlModel:
    """A `ControlModel` from a name ("sobel"), a spec ({"name": "lowres", "factor": 4}), a registered name, or any
    callable; unknown names and options are one-line errors naming the valid ones."""
    if isinstance(spec, ControlModel):
        return spec
    if callable(spec):
        return ControlModel(spec, getattr(spec, "__name__", "custom"), options)
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None)
        options = {**spec, **options}
    else:
        name = spec
    if not isinstance(name, str) or name not in _CONTROLS:
        raise ValueError(f"control: unknown control model {name!r}; valid: {', '.join(available_controls())} (or "
                         "register a callable with onestep.controls.register_control)")
    fn = _CONTROLS[name]
    accepted = [p for p in inspect.signature(fn).parameters][1:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"control {name}: unknown option(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(accepted) or 'none'}")
    for key, value in options.items():
        if key in _LIMITS and fn in (sobel, canny, lowres, blur, brightness):
            lo, hi = _LIMITS[key]
            whole = isinstance(lo, int)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and lo <= value <= hi and (not whole or float(value).is_integer())
            if not ok:
                kind = "a whole number" if whole else "a finite number"
                raise ValueError(f"control {name}: {key} must be {kind} in [{lo}, {hi}], got {value!r}")
            options[key] = int(value) if whole else float(value)
    if fn is canny and options.get("low", 0.3) > options.get("high", 0.6):
        raise ValueError("control canny: low must not exceed high")
    return ControlModel(fn, name, options)


def consistency(control: ControlModel, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Per-sample control consistency: mean |C(images) - maps| on the [0, 1] scale (NCT's metric, Luo et al. 2025,
    sec. 4: the distance between the control extracted from the output and the given control; lower is better)."""
    return (control(images) - maps).abs().flatten(1).mean(1) / 2
