"""Evaluation: Frechet distances through torch-fidelity with an offline digits feature extractor; `onestep fid`
(fid_cli: options, measurement, protocol; fid_inputs, fid_extractors, fid_generation, fid_statistics by concern)."""

from .features import FEATURE_EXTRACTOR, default_weights_path, register_feature_extractors
from .fid import fid_protocol, frechet_distance, frechet_distance_from_features, to_uint8_rgb
from .fid_cli import FidOptions, compute_fid

__all__ = [
    "FEATURE_EXTRACTOR",
    "FidOptions",
    "compute_fid",
    "default_weights_path",
    "fid_protocol",
    "frechet_distance",
    "frechet_distance_from_features",
    "register_feature_extractors",
    "to_uint8_rgb",
]
