"""Simple Shapes (Aithal et al., NeurIPS 2024, ``shapes/gen_simple_shapes_dataset.py``) and a hallucination labeller.

Each 64x64 image is three vertical strips of 21x63 pixels - triangle, square, pentagon from left to right - each
shape present independently with probability 0.5 at a random position, drawn white on black with PIL.  Row 63
and column 63 stay black and all-black images are skipped, so each shape is present with probability
0.5 / 0.875 = 0.571.  A diffusion model trained on it "hallucinates" by interpolating between modes, e.g. two
squares stacked in the square strip, which :func:`shapes_labeller` detects.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

SHAPES = ("triangle", "square", "pentagon")
STRIP_WIDTH, STRIP_HEIGHT = 21, 63
IMAGE_SIZE = 64
SHAPES_DEFAULT_SAMPLES = 5000
PRESENCE_P = 0.5
NOMINAL_AREA = 60
# Side lengths derived from the nominal area exactly as the paper's script does (int truncation included).
SQUARE_SIDE = int(math.sqrt(NOMINAL_AREA))  # 7 -> an 8x8 = 64 px filled rectangle
TRIANGLE_SIDE = int(math.sqrt(4 * NOMINAL_AREA / math.sqrt(3)))  # 11
TRIANGLE_HEIGHT = int(TRIANGLE_SIDE * math.sqrt(3) / 2)  # 9
PENTAGON_RADIUS = int(math.sqrt(4 * NOMINAL_AREA / math.sqrt(5 * (5 + 2 * math.sqrt(5)))))  # 5
# Pixel counts a well-formed shape has after thresholding (the third-party VSM validator's ranges).
PIXEL_RANGES = {"triangle": (63, 67), "square": (60, 68), "pentagon": (68, 72)}
STRIP_COLUMNS = tuple((k * STRIP_WIDTH, (k + 1) * STRIP_WIDTH) for k in range(len(SHAPES)))
LABEL_THRESHOLD = 127
# 8-connectivity: the thin apex of a small rasterised triangle may touch its body only diagonally.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _draw_triangle(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    """Apex-down equilateral-ish triangle, 65 +- 2 px."""
    x1 = rng.randint(0, STRIP_WIDTH - TRIANGLE_SIDE)
    y1 = rng.randint(0, STRIP_HEIGHT - TRIANGLE_SIDE)
    vertices = [(x1, y1), (x1 + TRIANGLE_SIDE, y1), (x1 + TRIANGLE_SIDE // 2, y1 + TRIANGLE_HEIGHT)]
    draw.polygon(vertices, fill=255, outline=255)


def _draw_square(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    """8x8 = 64 px square (PIL rectangles include both corners)."""
    x1 = rng.randint(1, STRIP_WIDTH - 2 * SQUARE_SIDE)
    y1 = rng.randint(1, STRIP_HEIGHT - 2 * SQUARE_SIDE)
    draw.rectangle([x1, y1, x1 + SQUARE_SIDE, y1 + SQUARE_SIDE], fill=255, outline=255)


def _draw_pentagon(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    """Pentagon with circumradius 5 around (x1, y1), vertices at 72, 144, ..., 360 degrees, 70 +- 2 px."""
    x1 = rng.randint(PENTAGON_RADIUS, STRIP_WIDTH - PENTAGON_RADIUS)
    y1 = rng.randint(PENTAGON_RADIUS, STRIP_HEIGHT - PENTAGON_RADIUS)
    angles = [math.radians(72 * k) for k in range(1, 6)]
    vertices = [(x1 + PENTAGON_RADIUS * math.cos(a), y1 - PENTAGON_RADIUS * math.sin(a)) for a in angles]
    draw.polygon(vertices, fill=255, outline=255)


_DRAWERS = {"triangle": _draw_triangle, "square": _draw_square, "pentagon": _draw_pentagon}


def _strip(shape: str, rng: random.Random) -> tuple[np.ndarray, bool]:
    """One 63x21 strip; the presence draw precedes the position draws, as in the paper's script."""
    canvas = Image.new("L", (STRIP_WIDTH, STRIP_HEIGHT), color=0)
    present = rng.random() <= PRESENCE_P
    if present:
        _DRAWERS[shape](ImageDraw.Draw(canvas), rng)
    return np.asarray(canvas, dtype=np.uint8), present


def generate_simple_shapes(num_images: int = SHAPES_DEFAULT_SAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 64, 64] in {0, 255}, presence bool [N, 3])`` for N kept (non-black) images."""
    rng = random.Random(seed)
    images = np.zeros((num_images, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    presence = np.zeros((num_images, len(SHAPES)), dtype=bool)
    kept = 0
    while kept < num_images:
        strips, present = zip(*(_strip(shape, rng) for shape in SHAPES), strict=True)
        if not any(present):
            continue
        images[kept, :STRIP_HEIGHT, : STRIP_WIDTH * len(SHAPES)] = np.concatenate(strips, axis=1)
        presence[kept] = present
        kept += 1
    return images, presence


def presence_labels(presence: np.ndarray) -> np.ndarray:
    """3-bit class code: bit 0 triangle, bit 1 square, bit 2 pentagon (1..7 for valid images; 8 classes)."""
    return (presence.astype(np.int64) * (1 << np.arange(len(SHAPES)))).sum(axis=1)


def _as_uint8_64(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Accept uint8 [0, 255] or float [-1, 1] images shaped [N, 64, 64] or [N, 1, 64, 64]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 4:
        if images.shape[1] != 1:
            raise ValueError(f"shapes_labeller expects 1-channel images, got shape {images.shape}")
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"shapes_labeller expects [N, 64, 64] images, got shape {images.shape}")
    if images.dtype != np.uint8:
        images = np.clip(np.round((images.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return images


def shapes_labeller(images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Label generated 64x64 Simple Shapes images.

    Pixels > 127 are foreground; each strip (columns [0:21], [21:42], [42:63]) is analysed separately with
    8-connected components (``scipy.ndimage.label``).  Returns arrays:

    * ``components`` [N, 3] int: connected components per strip;
    * ``pixels`` [N, 3] int: foreground pixels per strip;
    * ``present`` [N, 3] bool: strip has any foreground;
    * ``hallucinated`` [N] bool: some strip holds >= 2 components (e.g. two squares stacked - mode interpolation,
      our labelling rule: the paper's exact one is not public);
    * ``artifact`` [N] bool: not hallucinated, but a present shape's pixel count is outside the validator's range
      (triangle 63-67, square 60-68, pentagon 68-72) - malformed shapes reported separately from hallucinations.
    """
    images = _as_uint8_64(images)
    foreground = images > LABEL_THRESHOLD
    n = len(images)
    components = np.zeros((n, len(SHAPES)), dtype=np.int64)
    pixels = np.zeros((n, len(SHAPES)), dtype=np.int64)
    for k, (lo, hi) in enumerate(STRIP_COLUMNS):
        strips = foreground[:, :, lo:hi]
        pixels[:, k] = strips.sum(axis=(1, 2))
        components[:, k] = [ndimage.label(s, structure=_CONNECTIVITY)[1] for s in strips]
    hallucinated = (components >= 2).any(axis=1)
    bounds = np.array([PIXEL_RANGES[s] for s in SHAPES])
    malformed = (pixels > 0) & ((pixels < bounds[:, 0]) | (pixels > bounds[:, 1]))
    return {
        "components": components,
        "pixels": pixels,
        "present": pixels > 0,
        "hallucinated": hallucinated,
        "artifact": ~hallucinated & malformed.any(axis=1),
    }
