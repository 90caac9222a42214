"""Frechet distances through torch-fidelity, plus an independent float64 reference and a protocol description.

Every number is computed by ``torch_fidelity.calculate_metrics`` so that it means what the literature means by
FID given the same extractor; :func:`frechet_distance_from_features` exists to check that and to score features
obtained elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset

from .features import FEATURE_EXTRACTOR, INPUT_SIZE, register_feature_extractors

INCEPTION = "inception-v3-compat"


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [N, C, H, W] (C = 1 or 3) -> uint8 [N, 3, H, W], rounding to the nearest level."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W], got {tuple(x.shape)}")
    x = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()


class _Uint8Images(Dataset):
    """torch-fidelity's Dataset input: one uint8 [3, H, W] tensor per item."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = to_uint8_rgb(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def frechet_distance(
    a: torch.Tensor,
    b: torch.Tensor,
    feature_extractor: str = FEATURE_EXTRACTOR,
    weights_path: str | None = None,
    batch_size: int = 256,
) -> float:
    """Frechet distance between two image sets in [-1, 1], computed by torch-fidelity.

    ``weights_path`` is passed on as torch-fidelity's ``feature_extractor_weights_path``: ``None`` means the
    repository's trained weights for our extractor, but a download for torch-fidelity's own extractors such as
    ``"inception-v3-compat"`` (which fails offline).  No disk cache is used, and
    ``save_cpu_ram`` keeps torch-fidelity from spawning 4 loader workers.
    """
    register_feature_extractors()
    metrics = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(a),
        input2=_Uint8Images(b),
        fid=True,
        feature_extractor=feature_extractor,
        feature_extractor_weights_path=weights_path,
        batch_size=batch_size,
        cuda=torch.cuda.is_available(),
        save_cpu_ram=True,
        verbose=False,
        cache=False,
    )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (tiny negative eigenvalues from rounding are clipped)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Float64 Frechet distance between Gaussians fitted to two feature sets [N, D] (unbiased covariances).

    ``tr sqrt(S1 S2)`` is computed as ``tr sqrt(S1^1/2 S2 S1^1/2)``, a symmetric PSD matrix, so the result is
    real and stable even for rank-deficient covariances (fewer samples than dimensions).
    """
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


_EXTRACTOR_NOTES = {
    FEATURE_EXTRACTOR: (
        "small CNN trained on sklearn digits; NOT Inception-v3, not comparable to published FIDs",
        f"bilinear to {INPUT_SIZE}x{INPUT_SIZE} inside the extractor",
    ),
    INCEPTION: (
        "Inception-v3 pool3, 2048-d",
        "TF1-compatible bilinear to 299x299 inside the extractor",
    ),
}


def fid_protocol(
    feature_extractor: str, n_a: int, n_b: int, reference: str, nfe: int, resize: str | None = None
) -> str:
    """One line saying how an FID was measured, to print next to every number.

    ``resize`` describes how images reach the extractor's input size; by default the extractor's own resize.
    """
    note, default_resize = _EXTRACTOR_NOTES.get(feature_extractor, ("custom extractor", "extractor's own"))
    return (
        f"torch-fidelity {torch_fidelity.__version__} FID, extractor {feature_extractor} ({note}), "
        f"{n_a} generated vs {n_b} reference ({reference}), resize {resize or default_resize}, NFE {nfe}"
    )
