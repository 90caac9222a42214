"""`onestep fid` inputs: what an input string names (an embedded onestep dataset, a pipeline folder, an image folder,
a torch-fidelity dataset), loading it, and the reference datasets torch-fidelity reads (with their cache names)."""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ONESTEP_PREFIX = "onestep:"


@dataclass
class Source:
    spec: str
    kind: str                            # pipeline | folder | registered | onestep
    path: Path | None = None
    pipe: Any = None                     # a registered GeneratorPipeline
    data: Any = None                     # onestep TensorData
    files: list[str] = field(default_factory=list)
    image_shape: tuple[int, ...] | None = None   # a pipeline's output (C, H, W)

    @property
    def generated(self) -> bool:
        return self.kind == "pipeline"


def resolve_input(spec: str, which: str) -> Source:
    """One input string -> a Source (see the module docstring for the precedence); cheap, loads nothing big."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    if spec.startswith(ONESTEP_PREFIX):
        name = spec[len(ONESTEP_PREFIX):]
        if not name:
            raise ValueError(f"{which} {spec!r}: name the dataset, e.g. onestep:digits")
        return Source(spec, "onestep")
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return Source(spec, "pipeline", path=path)
        files = _image_files(path)
        if not files:
            raise ValueError(f"{which} {spec}: a folder with no model_index.json (not a pipeline) and no .png/.jpg/"
                             ".jpeg images directly in it (subfolders are not searched)")
        return Source(spec, "folder", path=path, files=files)
    if spec in DATASETS_REGISTRY:
        return Source(spec, "registered")
    if path.exists():
        raise ValueError(f"{which} {spec}: a file; give a pipeline folder, an image folder, a torch-fidelity dataset "
                         "name or onestep:<dataset>")
    registered = ", ".join(sorted(DATASETS_REGISTRY))
    raise ValueError(f"{which} {spec!r}: no such folder, and not a torch-fidelity dataset ({registered}) or "
                     "onestep:<dataset> (digits, shapes, folder:<path>)")


def _image_files(folder: Path) -> list[str]:
    """The files torch-fidelity's folder reader takes with its defaults (png/jpg/jpeg directly in the folder)."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.utils import glob_samples_paths

    return glob_samples_paths(str(folder), False, DEFAULTS["samples_find_ext"], None, verbose=False)


def _load_pipeline(source: Source, device) -> None:
    """Load a pipeline input (any registered class) and check, by generating one sample, that it makes images."""
    from ..pipelines import load_pipeline

    pipe = load_pipeline(str(source.path)).to(device)
    if pipe.takes_prompt:
        raise ValueError(f"{source.spec}: a text-conditional pipeline; onestep fid samples class-conditional and "
                         "unconditional pipelines only (generate images with your prompts, then compare the folders)")
    shape = tuple(pipe.noise_shape)
    if len(shape) >= 2:  # latents or tokens ([n, d] for DD2Pipeline): the decoded shape is what counts
        with torch.no_grad():
            shape = tuple(pipe.generate(torch.zeros(1, *shape), 1).shape[1:])
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"{source.spec}: generates samples of shape {shape}, not images; FID needs images")
    source.pipe, source.image_shape = pipe, shape


def _pipeline_image_size(source: Source) -> int | None:
    return None if source.pipe is None else int(source.image_shape[-1])


def _load_onestep_data(source: Source, resolution: int | None) -> None:
    from ..data import load_dataset

    name = source.spec[len(ONESTEP_PREFIX):]
    data = load_dataset(name, resolution)
    if data.kind != "image" or data.x is None:
        raise ValueError(f"{source.spec}: {data.kind} data, not images; FID needs an image dataset (digits, shapes, "
                         "folder:<path>)")
    source.data = data



class _LazyDataset(torch.utils.data.Dataset):
    """Builds the real dataset only when torch-fidelity needs its items (not when its statistics are cached)."""

    def __init__(self, build: Callable[[], torch.utils.data.Dataset]):
        self._build, self._ds = build, None

    @property
    def ds(self):
        if self._ds is None:
            self._ds = self._build()
        return self._ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def _reference_dataset(source: Source, datasets_root: str | None, progress: bool) -> tuple[Any, str, int | None]:
    """(lazy Dataset of uint8 [3, H, W] images, cache name, number of images if known without building it)."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    from .fid import _Uint8Images

    if source.kind == "onestep":
        images = _Uint8Images(source.data.x)
        digest = hashlib.sha256(images.images.numpy().tobytes()).hexdigest()[:12]
        h, w = images.images.shape[-2:]
        name = f"onestep-{_safe(source.spec[len(ONESTEP_PREFIX):])}-{h}x{w}-n{len(images)}-{digest}"
        return images, name, len(images)
    if source.kind == "folder":
        digest = hashlib.sha256()
        for f in source.files:
            st = os.stat(f)
            digest.update(f"{os.path.basename(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        name = f"folder-{_safe(source.path.resolve().name)}-n{len(source.files)}-{digest.hexdigest()[:12]}"
        from ..data.images import ImageFolderDataset  # the one image reader: sizes, bombs, 16-bit, errors name files

        return _LazyDataset(lambda: ImageFolderDataset(source.files)), name, len(source.files)
    root = datasets_root or os.path.join(torch.hub._get_torch_home(), "fidelity_datasets")  # torch-fidelity's default

    def build():
        os.makedirs(root, exist_ok=True)
        try:
            return DATASETS_REGISTRY[source.spec](root, True)
        except Exception as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
            raise FileNotFoundError(f"{source.spec}: torch-fidelity could not load it from {root} ({reason}); "
                                    "without network, place the torchvision dataset files there (--datasets-root) "
                                    "or compare against an image folder") from None

    return _LazyDataset(build), _safe(source.spec), None

