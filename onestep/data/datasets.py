"""In-memory datasets that need no download: toy points, sklearn digits, Simple Shapes and image folders.

Everything is returned as one :class:`TensorData` so trainers, samplers and FID code share a single format:
images are float32 [N, C, H, W] in [-1, 1] (background -1), points are float32 [N, D].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import ImageInputError, open_image
from .shapes import IMAGE_SIZE as SHAPES_SIZE
from .shapes import SHAPES, SHAPES_DEFAULT_SAMPLES, generate_simple_shapes, presence_labels
from .toy2d import GRID_DEFAULT_SAMPLES, GRID_MODE_STD, gaussian_grid_modes, sample_gaussian_grid

DATASETS: tuple[str, ...] = ("gaussian_grid", "digits", "shapes", "folder:<path>", "prompts:<file.txt>")
MAX_PROMPT_CHARS = 2000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DIGITS_DEFAULT_RESOLUTION = 16
FOLDER_DEFAULT_RESOLUTION = 64


@dataclass
class TensorData:
    """A whole dataset held as tensors.

    ``modes``/``mode_std`` are set for mixtures with known components (the Gaussian grid) so that coverage and
    hallucination metrics need not hard-code them.
    """

    x: torch.Tensor | None           # None for prompt-only data (data-free distillation of text-to-image teachers)
    labels: torch.Tensor | None
    num_classes: int | None
    kind: str
    name: str
    modes: torch.Tensor | None = None
    mode_std: float | None = None
    prompts: list[str] | None = None   # one text prompt per row (kind "prompts")
    cond: dict[str, torch.Tensor] | None = None  # per-row network kwargs, filled in for a given teacher

    def __len__(self) -> int:
        return len(self.x) if self.x is not None else len(self.prompts)


def _subset(data: TensorData, num_samples: int | None, seed: int) -> TensorData:
    """Keep a seeded random subset of a fixed-size dataset (digits, folders); too many asked for is an error."""
    if num_samples is None or num_samples == len(data):
        return data
    if not 0 < num_samples <= len(data):
        raise ValueError(f"{data.name}: num_samples must be in 1..{len(data)}, got {num_samples}; set "
                         f"data.num_samples to at most {len(data)} (or leave it out to use all)")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:num_samples]
    labels = None if data.labels is None else data.labels[idx]
    x = None if data.x is None else data.x[idx]
    prompts = None if data.prompts is None else [data.prompts[i] for i in idx]
    return TensorData(x, labels, data.num_classes, data.kind, data.name, data.modes, data.mode_std, prompts)


def _to_unit_range(x01: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] to [-1, 1], clamping interpolation overshoot."""
    return (x01 * 2.0 - 1.0).clamp(-1.0, 1.0)


def load_gaussian_grid(num_samples: int | None = None, seed: int = 0) -> TensorData:
    """The paper's normalised 5x5 grid (mode std 0.01767); labels are mode indices."""
    points, labels = sample_gaussian_grid(num_samples or GRID_DEFAULT_SAMPLES, GRID_MODE_STD, seed)
    return TensorData(points, labels, 25, "points", "gaussian_grid", gaussian_grid_modes(), GRID_MODE_STD)


def load_digits_images(resolution: int | None = None) -> TensorData:
    """sklearn's 1797 8x8 digits (values 0..16), bilinearly upscaled (antialiased) to ``resolution`` (16)."""
    from sklearn.datasets import load_digits

    resolution = resolution or DIGITS_DEFAULT_RESOLUTION
    if resolution < 8:
        raise ValueError(f"digits: resolution must be >= 8, got {resolution}; set data.resolution to 8 or more "
                         "(16 for the shipped teacher)")
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return TensorData(_to_unit_range(x), labels, 10, "image", "digits")


def load_shapes(resolution: int | None = None, num_samples: int | None = None, seed: int = 0) -> TensorData:
    """Simple Shapes at 64x64 (or any size dividing 64, by area averaging); labels are the 3-bit presence code."""
    resolution = resolution or SHAPES_SIZE
    if resolution > SHAPES_SIZE or SHAPES_SIZE % resolution:
        raise ValueError(f"shapes: resolution must divide {SHAPES_SIZE}, got {resolution}; set data.resolution to "
                         f"one of {', '.join(str(r) for r in (8, 16, 32, 64))}")
    images, presence = generate_simple_shapes(num_samples or SHAPES_DEFAULT_SAMPLES, seed)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    if resolution != SHAPES_SIZE:
        x = F.interpolate(x, size=(resolution, resolution), mode="area")
    labels = torch.from_numpy(presence_labels(presence))
    return TensorData(_to_unit_range(x), labels, 2 ** len(SHAPES), "image", "shapes")


def _read_image(path: Path, mode: str, resolution: int) -> np.ndarray:
    """Decode (onestep.data.images: limits, 16-bit, errors naming the file), center-crop to a square and resize."""
    try:
        img = open_image(path, mode)
    except ImageInputError as err:
        raise ImageInputError(f"{err} (every png/jpg/jpeg/webp in the folder is used)") from None
    img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).reshape(resolution, resolution, -1)


def load_image_folder(
    folder: str | Path, resolution: int | None = None, channels: int = 3, num_samples: int | None = None, seed: int = 0
) -> TensorData:
    """Every png/jpg/jpeg/webp below ``folder`` (recursive, sorted); other extensions are ignored.

    A file with an image extension that cannot be decoded is an error rather than silently dropped, so a
    truncated download does not quietly change the training set.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory; set data.name to folder:<path of a folder of images>")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}; set data.channels to 1 (gray) or 3 (RGB)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); "
                         "put images there or point data.name at the folder that holds them")
    resolution = resolution or FOLDER_DEFAULT_RESOLUTION
    mode = "L" if channels == 1 else "RGB"
    pixels = np.stack([_read_image(p, mode, resolution) for p in files])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    data = TensorData(_to_unit_range(x), None, None, "image", f"folder:{folder}")
    return _subset(data, num_samples, seed)


def load_prompts(path: str | Path) -> TensorData:
    """A text file with one prompt per line (blank lines and lines starting with # are skipped): the data of a
    data-free text-to-image distillation, which needs prompts but no images."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: prompt file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    too_long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if too_long is not None:
        raise ValueError(f"{path}: prompt {too_long + 1} is longer than {MAX_PROMPT_CHARS} characters")
    return TensorData(None, None, None, "prompts", f"prompts:{path}", prompts=prompts)


def _with_channels(data: TensorData, channels: int | None) -> TensorData:
    """Repeat a grayscale dataset to 3 channels when asked (e.g. for RGB-only models)."""
    if channels is None or channels == data.x.shape[1]:
        return data
    if data.kind != "image" or data.x.shape[1] != 1 or channels != 3:
        raise ValueError(f"{data.name}: cannot provide {channels} channels (has {data.x.shape[1]}); set "
                         f"data.channels to {data.x.shape[1]} or leave it out")
    return TensorData(data.x.repeat(1, 3, 1, 1), data.labels, data.num_classes, data.kind, data.name)


def load_dataset(
    name: str, resolution: int | None = None, num_samples: int | None = None, seed: int = 0, channels: int | None = None
) -> TensorData:
    """Load a dataset by name (see :data:`DATASETS`); deterministic for a given seed.

    ``resolution`` applies to image datasets; ``num_samples`` is the number generated (grid, shapes) or a seeded
    subset (digits, folders); ``channels`` picks L/RGB decoding for folders and repeats gray to 3 channels for
    digits and shapes.
    """
    if name.startswith("prompts:"):
        return _subset(load_prompts(name[len("prompts:") :]), num_samples, seed)
    if name.startswith("folder:"):
        return load_image_folder(name[len("folder:") :], resolution, channels or 3, num_samples, seed)
    if name == "gaussian_grid":
        if channels is not None:
            raise ValueError("gaussian_grid: points have no channels; remove data.channels")
        return load_gaussian_grid(num_samples, seed)
    if name == "digits":
        return _with_channels(_subset(load_digits_images(resolution), num_samples, seed), channels)
    if name == "shapes":
        return _with_channels(load_shapes(resolution, num_samples, seed), channels)
    from ..checks import shown

    raise ValueError(f"unknown dataset {shown(name)}; set data.name to one of: {', '.join(DATASETS)}")
