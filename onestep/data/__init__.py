"""Offline datasets (toy 2-D grid, sklearn digits, Simple Shapes, image folders) as in-memory tensors."""

from .datasets import DATASETS, TensorData, load_dataset
from .shapes import generate_simple_shapes, shapes_labeller
from .toy2d import GRID_MODE_STD, gaussian_grid_modes, mode_coverage, sample_gaussian_grid

__all__ = [
    "DATASETS",
    "GRID_MODE_STD",
    "TensorData",
    "gaussian_grid_modes",
    "generate_simple_shapes",
    "load_dataset",
    "mode_coverage",
    "sample_gaussian_grid",
    "shapes_labeller",
]
