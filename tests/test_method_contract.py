"""The contract every registered method keeps, in the spirit of diffusers' `PipelineTesterMixin`: built on tiny
components from its own `smoke_recipe`, it trains, checkpoints, resumes bit-exactly, exports a registered pipeline
that loads through `onestep.pipelines.load_pipeline`, samples, and is scored by `onestep fid`. The test iterates
`available_methods()`, so a new method is tested the moment it exists (a method without a smoke recipe fails here).
Two-process training and kill-and-resume of the same recipes are in tests/test_distributed.py and
tests/test_crash_resume.py.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from onestep.methods.base import available_methods
from onestep.training.config import config_from_dict
from onestep.training.trainer import Trainer

STEPS = 4


def contract_cases():
    """(method, variant) pairs: every method of the onestep package, each variant it declares."""
    cases = []
    for name, cls in sorted(available_methods().items()):
        if cls.__module__.startswith("onestep."):
            cases += [(name, variant) for variant in getattr(cls, "smoke_variants", (None,))]
    return cases


def contract_recipe(name: str, variant, teachers: dict, out, steps: int = STEPS, **train) -> dict:
    """The method's smoke recipe with the contract's schedule: checkpoints every 2 steps, no evaluation."""
    cls = available_methods()[name]
    recipe = cls.smoke_recipe(teachers[cls.teacher_kind], variant) if variant else \
        cls.smoke_recipe(teachers[cls.teacher_kind])
    recipe = {"seed": 0, "output_dir": str(out), **recipe, "ema": {"decay": 0.9},
              "train": {"steps": steps, "batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 5,
                        "sample_every": 1000, "log_every": 1, "num_sample_images": 4, **train},
              "eval": {"enabled": False}}
    if teachers[cls.teacher_kind] is None:
        recipe.pop("teacher", None)
    return recipe


def _final_tensors(out) -> dict[str, torch.Tensor]:
    step = max((out / "checkpoints").iterdir())
    return {f"{f.stem}.{k}": v for f in sorted(step.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("name,variant", contract_cases())
def test_train_export_load_sample_score(name, variant, method_teachers, tmp_path, one_thread, capsys):
    from onestep.cli import main
    from onestep.pipelines import load_pipeline

    out = tmp_path / "run"
    Trainer(config_from_dict(contract_recipe(name, variant, method_teachers, out))).train()
    pipe = load_pipeline(out / "pipeline")
    noise = torch.randn((3, *pipe.noise_shape), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3) % pipe.num_classes if pipe.num_classes else None
    images = pipe.generate(noise, class_labels=labels)
    assert images.shape[0] == 3 and torch.isfinite(images).all() and images.abs().max() <= 1
    assert torch.equal(images, pipe.generate(noise, class_labels=labels))  # a pure function of its inputs
    capsys.readouterr()
    assert main(["fid", str(out / "pipeline"), "onestep:digits", "-n", "20", "--batch-size", "10", "--sampling", "index", "--no-cache",
                 "--resolution", str(images.shape[-1]), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] >= 0


@pytest.mark.parametrize("name,variant", contract_cases())
def test_resume_is_bit_exact(name, variant, method_teachers, tmp_path, one_thread):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(config_from_dict(contract_recipe(name, variant, method_teachers, straight))).train()
    Trainer(config_from_dict(contract_recipe(name, variant, method_teachers, resumed, steps=2))).train()
    Trainer(config_from_dict(contract_recipe(name, variant, method_teachers, resumed)), resume="latest").train()
    a, b = _final_tensors(straight), _final_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_every_method_of_the_package_is_in_the_contract():
    names = {name for name, _ in contract_cases()}
    assert {"uni_instruct", "dsm"} <= names
