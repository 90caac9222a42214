"""Frechet distances: the float64 formula, agreement with torch-fidelity, the digits extractor, Inception wiring."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from threadpoolctl import threadpool_limits
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
from torchvision.transforms.functional import gaussian_blur

from onestep.data import load_dataset
from onestep.eval import (
    FEATURE_EXTRACTOR,
    default_weights_path,
    fid_protocol,
    frechet_distance,
    frechet_distance_from_features,
    register_feature_extractors,
    to_uint8_rgb,
)
from onestep.eval.fid import _Uint8Images


def scipy_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Textbook float64 formula with scipy.linalg.sqrtm of the (non-symmetric) product."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    diff = f1.mean(axis=0) - f2.mean(axis=0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


def torch_fidelity_frechet(f1: torch.Tensor, f2: torch.Tensor) -> float:
    stats = fid_features_to_statistics(f1), fid_features_to_statistics(f2)
    return fid_statistics_to_metric(*stats, verbose=False)[torch_fidelity.KEY_METRIC_FID]


@pytest.fixture(scope="module")
def digit_sets() -> dict[str, torch.Tensor]:
    """Two disjoint random thirds of the 16 px digits, the second one blurred, and uniform noise."""
    x = load_dataset("digits", resolution=16).x
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    a, b = x[perm[:600]], x[perm[600:1200]]
    noise = torch.rand(b.shape, generator=gen) * 2 - 1
    return {"a": a, "half": b, "blurred": gaussian_blur(b, kernel_size=5, sigma=1.0), "noise": noise}


@pytest.fixture(scope="module")
def tf_features(digit_sets) -> dict[str, torch.Tensor]:
    """Features exactly as torch-fidelity extracts them (float32), through its own helpers."""
    register_feature_extractors()
    extractor = create_feature_extractor(FEATURE_EXTRACTOR, ["features"], cuda=False, verbose=False)
    return {
        name: get_featuresdict_from_dataset(_Uint8Images(x), extractor, 256, False, True, False)["features"]
        for name, x in digit_sets.items()
    }


@pytest.mark.parametrize("n", [500, 40])  # 40 < 48 dimensions: rank-deficient covariances
def test_formula_matches_scipy_sqrtm(n):
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(n, 48)) @ rng.normal(size=(48, 48))
    f2 = rng.normal(0.3, 1.0, size=(n, 48)) @ rng.normal(size=(48, 48))
    ours, ref = frechet_distance_from_features(f1, f2), scipy_frechet(f1, f2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    assert abs(frechet_distance_from_features(f1, f1)) <= 1e-8 * np.trace(np.cov(f1, rowvar=False))


def test_formula_matches_torch_fidelity_on_its_features(tf_features):
    """Same formula to 1e-9 on float64 features; on torch-fidelity's float32 features it takes the mean in
    float32 (``np.mean`` keeps the dtype), which alone moves the result by ~1e-6 relative - hence 5e-6."""
    for other in ("half", "blurred", "noise"):
        f1, f2 = tf_features["a"], tf_features[other]
        ours = frechet_distance_from_features(f1.numpy(), f2.numpy())
        assert abs(torch_fidelity_frechet(f1.double(), f2.double()) - ours) <= 1e-9 * ours
        assert abs(torch_fidelity_frechet(f1, f2) - ours) <= 5e-6 * ours


def test_frechet_distance_is_torch_fidelity_and_orders_degradations(digit_sets, tf_features):
    fd = {name: frechet_distance(digit_sets["a"], digit_sets[name]) for name in ("half", "blurred", "noise")}
    assert fd["noise"] > fd["blurred"] > fd["half"] > 0
    assert fd["blurred"] > 5 * fd["half"]
    expected = torch_fidelity_frechet(tf_features["a"], tf_features["half"])
    assert abs(fd["half"] - expected) <= 1e-12 * expected


def test_registered_extractor_through_calculate_metrics(digit_sets):
    register_feature_extractors()
    register_feature_extractors()  # idempotent
    metrics = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(digit_sets["a"]),
        input2=_Uint8Images(digit_sets["half"]),
        fid=True,
        isc=True,
        feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=str(default_weights_path()),
        cuda=False,
        save_cpu_ram=True,
        verbose=False,
        cache=False,
    )
    assert metrics[torch_fidelity.KEY_METRIC_FID] > 0
    assert metrics[torch_fidelity.KEY_METRIC_ISC_MEAN] > 8  # confident, balanced over 10 classes


def test_to_uint8_rgb_and_protocol():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5]).reshape(1, 1, 1, 5)
    out = to_uint8_rgb(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 5)
    assert out[0, 0, 0].tolist() == [0, 0, 128, 255, 255] and torch.equal(out[:, 0], out[:, 2])
    text = fid_protocol(FEATURE_EXTRACTOR, 2000, 1797, "digits", 1)
    assert text.startswith(f"torch-fidelity {torch_fidelity.__version__} FID, extractor onestep-digits")
    assert "NOT Inception-v3" in text and "2000 generated vs 1797 reference (digits)" in text
    assert text.endswith("resize bilinear to 32x32 inside the extractor, NFE 1")


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception, built from an empty state dict so that its random init survives."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return super().load_state_dict(state_dict, strict=False)


def test_inception_path_is_wired_offline(tmp_path, monkeypatch):
    """torch-fidelity loads ``feature_extractor_weights_path`` with ``torch.load`` as a plain state dict (the
    class's own parameter names); random weights stand in for the real file, so only the wiring is tested."""
    empty, weights = tmp_path / "empty.pth", tmp_path / "inception-random.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    torch.save(_RandomInception("inception-v3-compat", ["2048"], str(empty)).state_dict(), weights)

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", no_network)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1, torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    # torch-fidelity's np.linalg.eigvals on the 2048x2048 product: 4 s with one OpenBLAS thread, 60 s with two
    # spinning threads on a contended 2-core machine.
    with threadpool_limits(limits=1, user_api="blas"):
        fd = frechet_distance(a, b, feature_extractor="inception-v3-compat", weights_path=str(weights))
    assert np.isfinite(fd) and fd > -1e-6
