"""The one image reader: every image a user hands to onestep (training folders, `onestep fid` folders, the demo's
control image) is decoded here, so every input gets the same checks and one readable error naming the file.

* decompression bombs: an image whose header declares more than MAX_PIXELS pixels is refused before decoding (a
  small PNG can declare 40000 x 40000 pixels); PIL's own DecompressionBombWarning is an error too;
* truncated or corrupt files: refused with the file named (never skipped, so a broken download does not quietly
  change a training set or an FID);
* 16-bit images (PNG "I;16", 32-bit "I"): scaled to 8 bits by value / 257 (65535 -> 255). PIL's convert("L") clips
  them instead, so a 16-bit PNG turned 95 % white;
* mixed sizes, where one size is required (FID folders): refused naming two files of different sizes.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 64 * 1024 * 1024   # 8192 x 8192; far above any image onestep trains or scores on
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageInputError(ValueError):
    """An image file onestep will not read; the message names the file and what to do."""


def _reason(err: Exception) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only, with the pixel limit applied (no pixel is decoded)."""
    with _opened(path) as img:
        return img.size


class _opened:
    """Image.open with the limits above; errors become ImageInputError naming the file."""

    def __init__(self, path):
        self.path = path

    def __enter__(self) -> Image.Image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self.img = Image.open(self.path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageInputError(f"{self.path}: refused as a decompression bomb ({_reason(err)}); use an image of at "
                                  f"most {MAX_PIXELS} pixels") from None
        except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad files
            raise _unreadable(self.path, err) from None
        width, height = self.img.size
        if width * height > MAX_PIXELS:
            self.img.close()
            raise ImageInputError(f"{self.path}: {width}x{height} pixels is more than the limit of {MAX_PIXELS} "
                                  "(a decompression bomb?); resize the image or remove the file")
        return self.img

    def __exit__(self, *exc):
        self.img.close()


def _unreadable(path, err: Exception) -> ImageInputError:
    return ImageInputError(f"{path}: not a readable image ({_reason(err)}); delete or replace the file")


def open_image(path: str | Path, mode: str) -> Image.Image:
    """Decode one image fully into PIL mode "L" (gray) or "RGB", 8 bits per channel (16-bit scaled, not clipped)."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    with _opened(path) as img:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
                if img.mode in SIXTEEN_BIT:
                    wide = np.asarray(img).astype(np.float64)
                    eight = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
                    return eight if mode == "L" else eight.convert("RGB")
                return img.convert(mode)
        except Exception as err:
            raise _unreadable(path, err) from None


def read_image(path: str | Path, mode: str) -> np.ndarray:
    """open_image as a uint8 array [H, W, C] (C = 1 for "L", 3 for "RGB")."""
    img = open_image(path, mode)
    return np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, -1)


def check_same_size(files: list) -> tuple[int, int]:
    """Every file's header declares the same (width, height); else one error naming two files that differ."""
    first = image_size(files[0])
    for file in files[1:]:
        size = image_size(file)
        if size != first:
            raise ImageInputError(f"{Path(files[0]).parent}: images of different sizes ({Path(files[0]).name} is "
                                  f"{first[0]}x{first[1]}, {Path(file).name} is {size[0]}x{size[1]}); an image set "
                                  "is compared at one size: resize them all to one size first")
    return first


class ImageFolderDataset:
    """A torch Dataset of uint8 RGB tensors [3, H, W] from image files of one size (what torch-fidelity takes; its
    own ImagesPathDataset reads with PIL's convert("RGB"), which clips 16-bit images and checks nothing)."""

    def __init__(self, files: list):
        self.files = list(files)
        if self.files:
            check_same_size(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        import torch

        return torch.tensor(read_image(self.files[i], "RGB")).permute(2, 0, 1).contiguous()
