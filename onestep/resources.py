"""Where the project's own files live: recipes/ and assets/ next to the package (editable install / checkout)."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "recipes"
ASSETS = REPO_ROOT / "assets"
DIGITS_TEACHER = ASSETS / "teachers" / "digits16"
GRID_TEACHER = ASSETS / "teachers" / "gaussian_grid"
PRETRAIN_RECIPES = {"digits": "pretrain_digits16.yaml", "gaussian_grid": "pretrain_gaussian_grid.yaml",
                    "shapes": "pretrain_shapes32.yaml"}


def recipe_path(name: str) -> Path:
    path = RECIPES / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe not found (is onestep installed from a checkout with `pip install -e .`?)")
    return path


def pretrain_recipe(data: str) -> Path:
    if data not in PRETRAIN_RECIPES:
        raise ValueError(f"--data: no pretraining recipe for {data!r}; valid: {', '.join(PRETRAIN_RECIPES)}")
    return recipe_path(PRETRAIN_RECIPES[data])
