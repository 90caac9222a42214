"""A small digits CNN registered with torch-fidelity as the ``onestep-digits`` feature extractor.

Inception-v3 is too slow on a CPU (~0.1 s per image) and needs weights from the internet, so CPU-scale
experiments compute Frechet distances in the 64-d penultimate layer of this CNN instead.  Its numbers are only
comparable with each other, never with published FIDs.  Weights are trained by
``scripts/train_feature_extractor.py`` and stored as safetensors (no pickle is ever loaded).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

FEATURE_EXTRACTOR = "onestep-digits"
INPUT_SIZE = 32
FEATURE_DIM = 64
NUM_CLASSES = 10


def default_weights_path(name: str = FEATURE_EXTRACTOR) -> Path:
    """The shipped ``assets/fid/<name>.safetensors`` (in the checkout, or inside the installed package)."""
    from ..resources import ASSETS

    return ASSETS / "fid" / f"{name}.safetensors"


class DigitsCNN(nn.Module):
    """Three conv blocks (32x32 -> 4x4) and a 64-d embedding; ~122k parameters.

    The FID feature is the embedding *before* its ReLU, so no coordinate is clipped to a constant zero for some
    images; the logits head on top gives the accuracy check and Inception-Score-like use.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.embed = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: float [B, 1, 32, 32] in [-1, 1]; returns ``(features [B, 64], logits [B, 10])``."""
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        features = self.embed(x.flatten(1))
        return features, self.head(self.dropout(F.relu(features)))


def preprocess_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 1, 32, 32] in [-1, 1]: channel mean (exact for gray), bilinear resize.

    Training goes through this same function, so generated images at 16 or 64 px are seen exactly like the
    training digits were.
    """
    x = x.float().mean(dim=1, keepdim=True) / 127.5 - 1.0
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


class FeatureExtractorOneStepDigits(FeatureExtractorBase):
    """torch-fidelity wrapper: uint8 Bx3xHxW in, features in ``features_list`` order out."""

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name, features_list)
        path = Path(feature_extractor_weights_path or default_weights_path(name))
        if not path.is_file():
            raise FileNotFoundError(f"{path}: feature extractor weights not found (scripts/train_feature_extractor.py)")
        self.net = DigitsCNN()
        self.net.load_state_dict(load_file(str(path)))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        """A ~1 ms CNN gains nothing from torch.compile, which would need a C++ toolchain on CPU."""
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 Bx3xHxW, got {x.dtype} {tuple(x.shape)}")
        features, logits = self.net(preprocess_uint8(x))
        provided = {"features": features, "logits": logits}
        return tuple(provided[name] for name in self.features_list)


_EXTRACTORS: dict[str, type[FeatureExtractorBase]] = {FEATURE_EXTRACTOR: FeatureExtractorOneStepDigits}


def register_feature_extractors() -> None:
    """Register our extractors with torch-fidelity; safe to call repeatedly (torch-fidelity refuses duplicates)."""
    for name, cls in _EXTRACTORS.items():
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)
