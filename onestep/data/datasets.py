"""In-memory datasets that need no download: toy points, sklearn digits, Simple Shapes, image folders (optionally
captioned), teacher (noise, sample) pairs, and the data-free kinds (prompts, class labels only, nothing).

Everything is returned as one :class:`TensorData` so trainers, samplers and FID code share a single format:
images are float32 [N, C, H, W] in [-1, 1] (background -1), points are float32 [N, D].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import ImageInputError, open_image
from .shapes import IMAGE_SIZE as SHAPES_SIZE
from .shapes import SHAPES, SHAPES_DEFAULT_SAMPLES, generate_simple_shapes, presence_labels
from .toy2d import GRID_DEFAULT_SAMPLES, GRID_MODE_STD, gaussian_grid_modes, sample_gaussian_grid

DATASETS: tuple[str, ...] = ("gaussian_grid", "digits", "shapes", "folder:<path>", "captions:<path>", "pairs:<path>",
                             "prompts:<file.txt>", "classes:<K>", "none", "digits_brightness", "shapes_brightness")
MAX_PROMPT_CHARS = 2000
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DIGITS_DEFAULT_RESOLUTION = 16
FOLDER_DEFAULT_RESOLUTION = 64
CLASSES_ROWS_PER_CLASS = 100  # classes:K has K * 100 rows unless data.num_samples says otherwise
NONE_DEFAULT_LENGTH = 1000   # rows of `none` unless data.num_samples says otherwise


@dataclass
class TensorData:
    """A whole dataset held as tensors.

    ``modes``/``mode_std`` are set for mixtures with known components (the Gaussian grid) so that coverage and
    hallucination metrics need not hard-code them. ``extras`` holds per-row tensors indexed with the rows like the
    labels (the stored noise of (noise, sample) pairs: ``extras["noise"]``). Data-free kinds (``classes:K``,
    ``none``) have no x; their size is the labels' length or ``length``.
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
    extras: dict[str, torch.Tensor] | None = None  # per-row tensors beside x (pairs: "noise")
    length: int | None = None         # number of rows when there is no x, prompts or labels (kind "none")

    def __len__(self) -> int:
        for rows in (self.x, self.prompts, self.labels):
            if rows is not None:
                return len(rows)
        return self.length


def _subset(data: TensorData, num_samples: int | None, seed: int) -> TensorData:
    """Keep a seeded random subset of a fixed-size dataset (digits, folders); too many asked for is an error."""
    if num_samples is None or num_samples == len(data):
        return data
    if not 0 < num_samples <= len(data):
        raise ValueError(f"{data.name}: num_samples must be in 1..{len(data)}, got {num_samples}; set "
                         f"data.num_samples to at most {len(data)} (or leave it out to use all)")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return replace(data, x=None if data.x is None else data.x[idx],
                   labels=None if data.labels is None else data.labels[idx],
                   prompts=None if data.prompts is None else [data.prompts[i] for i in idx],
                   cond=None if data.cond is None else {k: v[idx] for k, v in data.cond.items()},
                   extras=None if data.extras is None else {k: v[idx] for k, v in data.extras.items()})


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


def _image_files(folder: Path, kind: str) -> list[Path]:
    """Every png/jpg/jpeg/webp below ``folder`` (recursive, sorted); ``kind`` (folder, captions) names the data.name
    form in errors."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory; set data.name to {kind}:<path of a folder of images>")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); "
                         "put images there or point data.name at the folder that holds them")
    return files


def _read_images(files: list[Path], resolution: int | None, channels: int) -> torch.Tensor:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}; set data.channels to 1 (gray) or 3 (RGB)")
    resolution = resolution or FOLDER_DEFAULT_RESOLUTION
    mode = "L" if channels == 1 else "RGB"
    pixels = np.stack([_read_image(p, mode, resolution) for p in files])
    return _to_unit_range(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0)


def load_image_folder(
    folder: str | Path, resolution: int | None = None, channels: int = 3, num_samples: int | None = None, seed: int = 0
) -> TensorData:
    """Every png/jpg/jpeg/webp below ``folder`` (recursive, sorted); other extensions are ignored.

    A file with an image extension that cannot be decoded is an error rather than silently dropped, so a
    truncated download does not quietly change the training set.
    """
    folder = Path(folder)
    files = _image_files(folder, "folder")
    data = TensorData(_read_images(files, resolution, channels), None, None, "image", f"folder:{folder}")
    return _subset(data, num_samples, seed)


def _read_caption(image: Path) -> str:
    path = image.with_suffix(".txt")
    if not path.is_file():
        raise ValueError(f"{path}: missing caption of {image.name}; every image of a captions: folder needs a "
                         "sidecar .txt of the same name (one caption, UTF-8)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: caption is not UTF-8 text ({err.reason}); re-save it as UTF-8") from None
    caption = " ".join(text.split())
    if len(caption) > MAX_PROMPT_CHARS:
        raise ValueError(f"{path}: caption is {len(caption)} characters, more than {MAX_PROMPT_CHARS}; shorten it")
    return caption


def load_captioned_folder(
    folder: str | Path, resolution: int | None = None, channels: int = 3, num_samples: int | None = None, seed: int = 0
) -> TensorData:
    """An image folder (as ``folder:``) where each image ``a.png`` has its caption in ``a.txt`` beside it (the
    layout of diffusers' text-to-image examples' imagefolder datasets and kohya-ss sd-scripts): images + prompts.
    Whitespace in a caption is collapsed to single spaces; an empty caption is kept (an unconditional row)."""
    folder = Path(folder)
    files = _image_files(folder, "captions")
    prompts = [_read_caption(p) for p in files]
    data = TensorData(_read_images(files, resolution, channels), None, None, "image", f"captions:{folder}",
                      prompts=prompts)
    return _subset(data, num_samples, seed)


def load_pair_folder(folder: str | Path, resolution: int | None = None, channels: int | None = None,
                     num_samples: int | None = None, seed: int = 0) -> TensorData:
    """(noise, sample[, class_labels]) shards written by :func:`onestep.data.pairs.write_pairs`: x = the teacher's
    samples, labels, extras["noise"] = the noise each came from."""
    from .pairs import load_pairs

    pairs = load_pairs(folder)
    x = pairs["sample"]
    kind = "image" if x.dim() == 4 else "points" if x.dim() == 2 else "tensor"
    name = f"pairs:{folder}"
    if resolution is not None and (kind != "image" or tuple(x.shape[2:]) != (resolution, resolution)):
        raise ValueError(f"{name}: samples are {list(x.shape[1:])}, not at resolution {resolution}; remove "
                         "data.resolution (pairs are used as written) or write pairs at that size")
    if channels is not None and (kind != "image" or x.shape[1] != channels):
        raise ValueError(f"{name}: samples are {list(x.shape[1:])}, not {channels}-channel images; remove "
                         "data.channels (pairs are used as written)")
    data = TensorData(x, pairs["class_labels"], pairs["num_classes"], kind, name, extras={"noise": pairs["noise"]})
    return _subset(data, num_samples, seed)


def load_class_labels(k: str, num_samples: int | None = None) -> TensorData:
    """``classes:K``: no images, only labels 0..K-1 in turn (row i has label i mod K), K * 100 rows unless
    ``num_samples`` is given: the data of data-free distillation of a class-conditional teacher."""
    if not (k.isascii() and k.isdigit() and int(k) > 0):
        raise ValueError(f"classes:{k}: K must be a positive int (the number of classes), e.g. classes:10")
    num_classes = int(k)
    rows = num_samples or num_classes * CLASSES_ROWS_PER_CLASS
    return TensorData(None, torch.arange(rows) % num_classes, num_classes, "classes", f"classes:{num_classes}")


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
    return replace(data, x=data.x.repeat(1, 3, 1, 1))


def load_dataset(
    name: str, resolution: int | None = None, num_samples: int | None = None, seed: int = 0, channels: int | None = None
) -> TensorData:
    """Load a dataset by name (see :data:`DATASETS`); deterministic for a given seed.

    ``resolution`` applies to image datasets; ``num_samples`` is the number generated (grid, shapes), a seeded
    subset (digits, folders, pairs, prompts) or the length (classes, none); ``channels`` picks L/RGB decoding for
    folders and repeats gray to 3 channels for digits and shapes.
    """
    if name.startswith("prompts:"):
        return _subset(load_prompts(name[len("prompts:") :]), num_samples, seed)
    if name.startswith("folder:"):
        return load_image_folder(name[len("folder:") :], resolution, channels or 3, num_samples, seed)
    if name.startswith("captions:"):
        return load_captioned_folder(name[len("captions:") :], resolution, channels or 3, num_samples, seed)
    if name.startswith("pairs:"):
        return load_pair_folder(name[len("pairs:") :], resolution, channels, num_samples, seed)
    if name.startswith("classes:") or name == "none":
        for field, value in (("resolution", resolution), ("channels", channels)):
            if value is not None:
                raise ValueError(f"{name}: has no images; remove data.{field}")
        if name == "none":
            return TensorData(None, None, None, "none", "none", length=num_samples or NONE_DEFAULT_LENGTH)
        return load_class_labels(name[len("classes:") :], num_samples)
    if name == "gaussian_grid":
        if channels is not None:
            raise ValueError("gaussian_grid: points have no channels; remove data.channels")
        return load_gaussian_grid(num_samples, seed)
    if name in ("digits_brightness", "shapes_brightness"):
        base = load_dataset(name.split("_")[0], resolution, num_samples, seed, channels)
        return with_random_brightness(base, seed)
    if name == "digits":
        return _with_channels(_subset(load_digits_images(resolution), num_samples, seed), channels)
    if name == "shapes":
        return _with_channels(load_shapes(resolution, num_samples, seed), channels)
    from ..checks import shown

    raise ValueError(f"unknown dataset {shown(name)}; set data.name to one of: {', '.join(DATASETS)}")


BRIGHTNESS_RANGE = (0.5, 0.85)   # |per-image mean| of the *_brightness datasets
BRIGHTNESS_CONTRAST = 0.3        # how much of the original image rides on that mean


def with_random_brightness(data: TensorData, seed: int = 0) -> TensorData:
    """A random global brightness per image (the low-frequency content a schedule with terminal alpha-bar > 0 leaks,
    Hu et al. 2024, One More Step): x = clamp(b + 0.3 (x - mean x), -1, 1) with b = +-U(0.5, 0.85) (sign equiprobable),
    so per-image means cover [-0.85, -0.5] and [0.5, 0.85]. Labels are kept; each row gets the caption "bright" or
    "dark" (the sign of its mean) as its prompt (`prompts`). Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed + 7919)
    n = len(data.x)
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    lo, hi = BRIGHTNESS_RANGE
    level = sign * (lo + (hi - lo) * torch.rand(n, generator=g))
    centred = data.x - data.x.mean(dim=(1, 2, 3), keepdim=True)
    x = (level.view(-1, 1, 1, 1) + BRIGHTNESS_CONTRAST * centred).clamp(-1.0, 1.0)
    prompts = ["bright" if m > 0 else "dark" for m in x.mean(dim=(1, 2, 3)).tolist()]
    return replace(data, x=x, prompts=prompts, name=f"{data.name}_brightness")
