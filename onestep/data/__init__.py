"""Offline datasets (toy 2-D grid, sklearn digits, Simple Shapes, image folders, teacher pairs, data-free kinds) as
in-memory tensors, and the resumable multi-process pair writer."""

from .datasets import DATASETS, TensorData, load_dataset
from .pairs import load_pairs, write_pairs
from .shapes import generate_simple_shapes, shapes_labeller
from .toy2d import GRID_MODE_STD, gaussian_grid_modes, mode_coverage, sample_gaussian_grid

__all__ = [
    "DATASETS",
    "GRID_MODE_STD",
    "TensorData",
    "gaussian_grid_modes",
    "generate_simple_shapes",
    "load_dataset",
    "load_pairs",
    "mode_coverage",
    "sample_gaussian_grid",
    "shapes_labeller",
    "write_pairs",
]
