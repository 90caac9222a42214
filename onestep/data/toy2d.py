"""The 5x5 Gaussian grid of the mode-interpolation (hallucination) paper, and a mode-coverage metric.

The paper's ``gaussian25`` data: raw means ``2*(i, j)`` for ``i, j in -2..2``, std 0.05, every coordinate divided
by ``sqrt(0.05**2 + 8)`` so the mixture has roughly unit variance.  After normalisation the modes are 0.707 apart
and each has std 0.01767, i.e. modes are very narrow; a CPU-trained one-step generator typically produces wider
modes, which is why :func:`mode_coverage` counts points within a third of the spacing rather than a few stds.
"""

from __future__ import annotations

import math

import torch

GRID_RAW_STD = 0.05
GRID_NORMALISER = math.sqrt(GRID_RAW_STD**2 + 8.0)
GRID_MODE_STD = GRID_RAW_STD / GRID_NORMALISER
GRID_DEFAULT_SAMPLES = 20000


def gaussian_grid_modes() -> torch.Tensor:
    """Return the 25 normalised mode centres, shape [25, 2], row-major over (i, j) with i the x coordinate."""
    axis = torch.arange(-2, 3, dtype=torch.float32) * 2.0
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1) / GRID_NORMALISER


def sample_gaussian_grid(
    num_samples: int = GRID_DEFAULT_SAMPLES, std: float = GRID_MODE_STD, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw points and their mode labels; modes are assigned round-robin (balanced) as in the paper's code.

    ``std`` is in normalised units; pass something wider than the paper's 0.01767 for easier CPU experiments.
    """
    modes = gaussian_grid_modes()
    labels = torch.arange(num_samples, dtype=torch.int64) % len(modes)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, 2, generator=gen, dtype=torch.float32)
    return modes[labels] + std * noise, labels


def min_mode_spacing(modes: torch.Tensor) -> float:
    """Smallest distance between two distinct modes (0.707 for the normalised grid)."""
    dist = torch.cdist(modes.double(), modes.double())
    dist.fill_diagonal_(float("inf"))
    return float(dist.min())


def mode_coverage(
    points: torch.Tensor,
    modes: torch.Tensor,
    std: float = GRID_MODE_STD,
    kappa: float = 6.0,
    min_fraction: float = 0.01,
) -> tuple[float, float]:
    """Return ``(fraction_of_modes_hit, fraction_of_points_near_a_mode)``.

    A point is *near* a mode when it lies within ``radius = min(max(kappa * std, spacing / 3), spacing / 2)`` of it,
    where ``spacing`` is the smallest distance between modes.  For the paper's grid ``kappa * std = 0.106`` is
    smaller than ``spacing / 3 = 0.236``, so the radius is a third of the spacing: tolerant of a generator whose
    modes are several times wider than the data's, yet the balls never overlap (hence the ``spacing / 2`` cap), so
    a point between two modes (a hallucination) is not near either.  A mode is *hit* when at least
    ``min_fraction`` of its balanced share ``N / num_modes`` of the points (and at least one point) are near it;
    the default 1% makes the score a mode-dropping detector, not a balance test.
    """
    points = points.detach().double().reshape(len(points), -1)
    modes = modes.detach().double()
    spacing = min_mode_spacing(modes)
    radius = min(max(kappa * std, spacing / 3.0), spacing / 2.0)
    dist, nearest = torch.cdist(points, modes).min(dim=1)
    near = dist <= radius
    counts = torch.bincount(nearest[near], minlength=len(modes))
    needed = max(1.0, min_fraction * len(points) / len(modes))
    modes_hit = (counts >= needed).double().mean()
    return float(modes_hit), float(near.double().mean())
