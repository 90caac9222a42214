"""`onestep fid` feature extractors: torch-fidelity's (Inception-v3 with its cached or given weights, downloaded with
a timeout and a one-line error) and onestep's own, each with a fingerprint of its weights for the cache names."""
from __future__ import annotations

import hashlib
import io
import socket
import sys
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path

import torch

INCEPTION = "inception-v3-compat"
DOWNLOAD_TIMEOUT_S = 30


def inception_file_name() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3.rsplit("/", 1)[-1]


def inception_cache_path() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` looks first (torch hub's checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_file_name()



def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


@dataclass
class Extractor:
    name: str
    weights_kwarg: str | None            # feature_extractor_weights_path passed to torch-fidelity
    weights_desc: str
    fingerprint: str
    instances: dict = field(default_factory=dict)

    def get(self, layers: tuple[str, ...], cuda: bool):
        """A torch-fidelity extractor for these layers (one per layer set: the reference cache is keyed by it)."""
        key = tuple(sorted(set(layers)))
        if key not in self.instances:
            self.instances[key] = _create_extractor(self.name, list(key), self.weights_kwarg, cuda)
        return self.instances[key]


def _create_extractor(name: str, layers: list[str], weights: str | None, cuda: bool):
    from torch_fidelity.utils import create_feature_extractor

    if name != INCEPTION or weights is not None or inception_cache_path().is_file():
        return create_feature_extractor(name, layers, cuda=cuda, verbose=False, feature_extractor_weights_path=weights)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    said = io.StringIO()  # torch.hub's "Downloading: ..." line: shown on success, dropped for the one-line error
    try:
        with redirect_stderr(said):
            extractor = create_feature_extractor(name, layers, cuda=cuda, verbose=False,
                                                 feature_extractor_weights_path=None)
        sys.stderr.write(said.getvalue())
        return extractor
    except Exception as err:  # URLError, timeouts, HTTP errors, a truncated download: all say the same to the user
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        raise FileNotFoundError(
            f"Inception-v3 weights are not in torch-fidelity's cache and the download failed ({reason}); fetch "
            f"{URL_INCEPTION_V3} elsewhere and place it at {inception_cache_path()}, or pass --inception-weights PATH "
            "(a trusted file only: torch-fidelity unpickles it with torch.load(weights_only=False))") from None
    finally:
        socket.setdefaulttimeout(previous)


def resolve_extractor(name: str, inception_weights: str | None) -> Extractor:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from .features import _EXTRACTORS, default_weights_path, register_feature_extractors

    register_feature_extractors()
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"--extractor {name!r}: not registered with torch-fidelity; valid: "
                         f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    if inception_weights is not None:
        if name != INCEPTION:
            raise ValueError(f"--inception-weights applies to --extractor {INCEPTION}, not {name}")
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path}: no such file (expected torch-fidelity's "
                                    f"{inception_file_name()})")
        return Extractor(name, str(path), str(path), _file_fingerprint(path))
    if name in _EXTRACTORS:  # ours: weights ship in assets/fid
        path = default_weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {name} weights not found (scripts/train_feature_extractor.py)")
        return Extractor(name, None, str(path), _file_fingerprint(path))
    if name == INCEPTION:
        cached = inception_cache_path()
        # not there yet: compute_fid fingerprints it after torch-fidelity's download
        return Extractor(name, None, str(cached), _file_fingerprint(cached) if cached.is_file() else "")
    return Extractor(name, None, "torch-fidelity default (downloaded on first use)", "default")


def _layers(extractor_name: str, metrics: list[str]) -> dict[str, str]:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if extractor_name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"--extractor {extractor_name!r}: not registered with torch-fidelity; valid: "
                         f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor_name]
    return {m: cls.get_default_feature_layer_for_metric(m) for m in metrics}

