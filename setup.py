"""Packaging layout only (metadata is in pyproject.toml): the wheel carries the shipped files inside the package.

The repository keeps one copy of them at its root (assets/, recipes/, demo/); here they are mapped to the
sub-packages onestep.assets, onestep.recipes and onestep.demo, so `pip install .` puts real files under
site-packages/onestep/ where onestep.resources finds them. Only what the package uses is shipped (not the README's
reference plots and screenshot)."""
from setuptools import find_packages, setup

SHIPPED = {"onestep.assets": "assets", "onestep.recipes": "recipes", "onestep.demo": "demo"}

setup(
    packages=find_packages(include=["onestep", "onestep.*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={
        "onestep.assets": ["teachers/**/*", "pipelines/**/*", "fid/*.safetensors"],
        "onestep.recipes": ["*.yaml", "accelerate/*.yaml", "prompts/*.txt"],
        "onestep.demo": ["*.py"],
    },
    exclude_package_data={"": ["__pycache__/*", "*.pyc"]},
)
