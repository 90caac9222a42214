"""Evaluation: Frechet distances through torch-fidelity with an offline digits feature extractor."""

from .features import FEATURE_EXTRACTOR, default_weights_path, register_feature_extractors
from .fid import fid_protocol, frechet_distance, frechet_distance_from_features, to_uint8_rgb

__all__ = [
    "FEATURE_EXTRACTOR",
    "default_weights_path",
    "fid_protocol",
    "frechet_distance",
    "frechet_distance_from_features",
    "register_feature_extractors",
    "to_uint8_rgb",
]
