"""Offline datasets: Simple Shapes oracles (Aithal et al., NeurIPS 2024), digits, the Gaussian grid, folders, errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from onestep.data import (
    DATASETS,
    gaussian_grid_modes,
    generate_simple_shapes,
    load_dataset,
    mode_coverage,
    shapes_labeller,
)

STRIPS = ((0, 21), (21, 42), (42, 63))


@pytest.fixture(scope="module")
def shapes() -> tuple[np.ndarray, np.ndarray]:
    return generate_simple_shapes(5000, seed=0)


def test_shapes_geometry(shapes):
    images, _ = shapes
    assert images.shape == (5000, 64, 64) and images.dtype == np.uint8
    assert not images[:, 63, :].any() and not images[:, :, 63].any()
    assert images.reshape(5000, -1).max(axis=1).min() == 255  # no all-black image
    for k, (lo, hi) in enumerate(STRIPS):
        strips = images[:, :, lo:hi] > 127
        assert max(ndimage.label(s)[1] for s in strips) <= 1
        counts = strips.sum(axis=(1, 2))
        counts = counts[counts > 0]
        bounds = [(63, 67), (64, 64), (68, 72)][k]
        assert bounds[0] <= counts.min() and counts.max() <= bounds[1], (k, counts.min(), counts.max())


def test_shapes_statistics(shapes):
    _, presence = shapes
    assert np.all(np.abs(presence.mean(axis=0) - 0.5 / 0.875) <= 0.03)
    count_rates = np.bincount(presence.sum(axis=1), minlength=4)[1:] / len(presence)
    assert np.all(np.abs(count_rates - np.array([3, 3, 1]) / 7) <= 0.03)


def test_shapes_labeller(shapes):
    images, presence = shapes
    result = shapes_labeller(images)
    assert not result["hallucinated"].any() and not result["artifact"].any()
    np.testing.assert_array_equal(result["present"], presence)

    two_squares = np.zeros((1, 64, 64), dtype=np.uint8)
    two_squares[0, 5:13, 25:33] = 255
    two_squares[0, 40:48, 25:33] = 255
    flagged = shapes_labeller(torch.from_numpy(two_squares).float()[:, None] / 127.5 - 1)
    assert flagged["hallucinated"].tolist() == [True]
    assert flagged["components"].tolist() == [[0, 2, 0]]


def test_shapes_dataset_and_determinism():
    data = load_dataset("shapes", num_samples=64, seed=3)
    again = load_dataset("shapes", num_samples=64, seed=3)
    assert data.x.shape == (64, 1, 64, 64) and data.kind == "image" and data.num_classes == 8
    assert torch.equal(data.x, again.x) and data.x.min() == -1 and data.x.max() == 1
    assert set(data.labels.tolist()) <= set(range(1, 8))
    small = load_dataset("shapes", resolution=32, num_samples=64, seed=3)
    assert small.x.shape == (64, 1, 32, 32)
    torch.testing.assert_close(small.x, torch.nn.functional.avg_pool2d(data.x, 2))


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits(resolution):
    data = load_dataset("digits", resolution=resolution)
    assert data.x.shape == (1797, 1, resolution, resolution) and data.x.dtype == torch.float32
    assert data.x.min() == -1 and data.x.max() <= 1 and data.x.max() > 0.9
    assert (data.x[:, :, 0, 0] == -1).all()  # background corner
    assert data.labels.dtype == torch.int64 and sorted(data.labels.unique().tolist()) == list(range(10))
    assert data.num_classes == 10 and len(data) == 1797
    subset = load_dataset("digits", num_samples=100, seed=1)
    assert len(subset) == 100 and torch.equal(subset.x, load_dataset("digits", num_samples=100, seed=1).x)


def test_gaussian_grid():
    modes = gaussian_grid_modes()
    norm = math.sqrt(0.05**2 + 8)
    assert modes.shape == (25, 2)
    assert torch.allclose(modes.abs().max(), torch.tensor(4 / norm))
    assert math.isclose(torch.pdist(modes).min().item(), 2 / norm, rel_tol=1e-6)
    data = load_dataset("gaussian_grid", seed=0)
    assert data.x.shape == (20000, 2) and data.kind == "points" and data.num_classes == 25
    assert math.isclose(data.mode_std, 0.05 / norm) and abs(data.mode_std - 0.01767) < 1e-5
    assert torch.bincount(data.labels).tolist() == [800] * 25
    spread = (data.x - data.modes[data.labels]).std().item()
    assert abs(spread / data.mode_std - 1) < 0.03
    assert mode_coverage(data.x, data.modes, data.mode_std) == (1.0, 1.0)


def test_mode_coverage_tolerates_wide_modes_and_detects_drops_and_gaps():
    modes = gaussian_grid_modes()
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(5000) % 20  # 5 of 25 modes dropped
    wide = modes[labels] + 0.06 * torch.randn(5000, 2, generator=gen)  # 3.4x the data's std
    hit, near = mode_coverage(wide, modes)
    assert hit == 20 / 25 and near > 0.95
    midpoints = (modes[:-1] + modes[1:]) / 2  # between neighbours: near no mode
    assert mode_coverage(midpoints, modes)[1] == 0.0


def test_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    data = load_dataset(f"folder:{tmp_path}", resolution=16)
    assert data.x.shape == (2, 3, 16, 16) and data.labels is None and data.kind == "image"
    assert -1 <= data.x.min() and data.x.max() <= 1
    assert load_dataset(f"folder:{tmp_path}", resolution=8, channels=1).x.shape == (2, 1, 8, 8)

    corrupt = tmp_path / "sub" / "broken.png"
    corrupt.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=re.escape(f"{corrupt}: not a readable image (")):
        load_dataset(f"folder:{tmp_path}", resolution=16)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError) as err:
        load_dataset("mnist")
    assert all(name in str(err.value) for name in DATASETS)
    assert {"pairs:<path>", "captions:<path>", "classes:<K>", "none"} <= set(DATASETS)


def test_captioned_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a red  circle\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("ein grüner Kreis", encoding="utf-8")
    data = load_dataset(f"captions:{tmp_path}", resolution=8)
    assert data.prompts == ["a red circle", "", "ein grüner Kreis"]  # sorted paths: a.jpg, b.png, sub/c.png
    assert data.x.shape == (3, 3, 8, 8) and data.kind == "image" and len(data) == 3
    assert torch.equal(data.x, load_dataset(f"folder:{tmp_path}", resolution=8).x)  # the same pixels as folder:
    sub = load_dataset(f"captions:{tmp_path}", resolution=8, num_samples=2, seed=1)
    for x, prompt in zip(sub.x, sub.prompts):                                # subsets keep image and caption together
        assert torch.equal(x, data.x[data.prompts.index(prompt)])


@pytest.mark.parametrize("content, message", [
    (None, "missing caption of c.png; every image of a captions: folder needs a sidecar .txt"),
    ("caf\xe9".encode("latin-1"), "caption is not UTF-8 text"),
    (("x" * 2001).encode(), "caption is 2001 characters, more than 2000")])
def test_captioned_folder_errors(tmp_path, content, message):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "c.png")
    if content is not None:
        (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        load_dataset(f"captions:{tmp_path}")
    assert "\n" not in str(err.value) and str(tmp_path / "c.txt") in str(err.value)
    with pytest.raises(ValueError, match="not a directory; set data.name to captions:"):
        load_dataset(f"captions:{tmp_path / 'missing'}")


def test_classes_and_none():
    data = load_dataset("classes:10")
    assert data.x is None and data.num_classes == 10 and len(data) == 1000 and data.kind == "classes"
    assert torch.equal(torch.bincount(data.labels), torch.full((10,), 100))
    assert torch.equal(load_dataset("classes:3", num_samples=7).labels, torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    nothing = load_dataset("none", num_samples=64)
    assert len(nothing) == 64 and nothing.x is None and nothing.labels is None and nothing.prompts is None
    assert len(load_dataset("none")) > 0
    for bad in ("classes:0", "classes:-3", "classes:ten", "classes:", "classes:2.5"):
        with pytest.raises(ValueError, match="K must be a positive int .the number of classes., e.g. classes:10"):
            load_dataset(bad)
    with pytest.raises(ValueError, match="classes:10: has no images; remove data.resolution"):
        load_dataset("classes:10", resolution=16)
    with pytest.raises(ValueError, match="none: has no images; remove data.channels"):
        load_dataset("none", channels=3)


def test_extras_ride_with_the_rows():
    from dataclasses import replace

    from onestep.data.datasets import _subset

    data = load_dataset("digits", resolution=8)
    data = replace(data, extras={"noise": data.x * 3})
    sub = _subset(data, 50, seed=2)
    assert torch.equal(sub.extras["noise"], sub.x * 3) and sub.labels.shape == (50,)
    rgb = load_dataset("digits", resolution=8, channels=3, num_samples=5)
    assert rgb.x.shape == (5, 3, 8, 8) and rgb.labels.shape == (5,)
