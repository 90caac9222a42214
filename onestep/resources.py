"""Where the project's own files live, installed or not.

The repository keeps one copy of what the package ships, at its root: `assets/` (the digits and 2-D grid teachers,
the shipped student pipeline, the FID extractor weights), `recipes/` and `demo/`. A wheel carries the same files
inside the package (setup.py maps them to `onestep/assets`, `onestep/recipes`, `onestep/demo`), so a non-editable
install finds them there; a checkout or editable install finds them at the repository root.
"""
from __future__ import annotations

import shutil
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent      # the checkout (in a wheel install: site-packages, with no assets/ in it)
SHIPPED = ("assets", "recipes", "demo")


def shipped_dir(name: str) -> Path:
    """The shipped folder `name` (assets, recipes, demo): inside the installed package, else the checkout's."""
    inside = PACKAGE_ROOT / name
    return inside if inside.is_dir() else REPO_ROOT / name


ASSETS = shipped_dir("assets")
RECIPES = shipped_dir("recipes")
DEMO_APP = shipped_dir("demo") / "app.py"
DIGITS_TEACHER = ASSETS / "teachers" / "digits16"
GRID_TEACHER = ASSETS / "teachers" / "gaussian_grid"
DIGITS_PIPELINE = ASSETS / "pipelines" / "digits16"
PRETRAIN_RECIPES = {"digits": "pretrain_digits16.yaml", "gaussian_grid": "pretrain_gaussian_grid.yaml",
                    "shapes": "pretrain_shapes32.yaml"}


def shipped_path(path: str | Path) -> Path:
    """A path as written in recipes and model cards (`assets/teachers/digits16`, relative to the repository root):
    as given when it exists from the working directory, else the shipped copy when it names one, else as given."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] not in SHIPPED:
        return path
    candidate = shipped_dir(path.parts[0]).joinpath(*path.parts[1:])
    return candidate if candidate.exists() else path


def recipe_path(name: str) -> Path:
    path = RECIPES / name
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such shipped recipe; valid: {', '.join(list_recipes())}")
    return path


def list_recipes() -> list[str]:
    """The shipped recipes, as paths relative to the recipes folder (accelerate configs included)."""
    return sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml"))


def copy_recipe(name: str, dest: str | Path) -> Path:
    """Copy shipped recipe `name` to `dest` (a file, or a folder to put it in); refuses to overwrite a file."""
    source = recipe_path(name)
    as_folder = str(dest).endswith(("/", "\\")) or Path(dest).is_dir()
    dest = Path(dest) / Path(name).name if as_folder else Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest}: exists; pass another destination or remove it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return dest


def pretrain_recipe(data: str) -> Path:
    if data not in PRETRAIN_RECIPES:
        raise ValueError(f"--data: no pretraining recipe for {data!r}; valid: {', '.join(PRETRAIN_RECIPES)}")
    return recipe_path(PRETRAIN_RECIPES[data])
