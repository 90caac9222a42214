"""The exported `pipeline.py` (onestep/pipelines/standalone_pipeline.py) is a second implementation of
OneStepPipeline for users without onestep. These tests keep the two from drifting: same images, bit for bit, for
every scheduler family, loaded by plain diffusers in a fresh interpreter where onestep cannot be imported."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from conftest import tiny_unet
from onestep.denoisers import MLPModel, denoiser_from_pretrained
from onestep.generators import OneStepGenerator
from onestep.pipelines import OneStepPipeline, standalone_pipeline

SCHEDULERS = {
    "epsilon": lambda: DDPMScheduler(beta_schedule="linear", prediction_type="epsilon"),
    "v_prediction": lambda: DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type="v_prediction"),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "edm": lambda: EDMEulerScheduler(sigma_data=0.5),
}
OUTPUTS = [(1, "raw"), (4, "raw"), (2, "pt")]

# Runs in `python -I` (no PYTHONPATH, no user site, no cwd on sys.path). The editable install of onestep is a
# meta-path finder installed by a .pth file, and a regular install would be a folder in site-packages; a finder
# placed first that refuses `onestep` hides it in both cases, exactly as if it were not installed.
FRESH_PROCESS = r'''
import importlib.abc, json, sys

class HideOnestep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "onestep":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, HideOnestep())
import torch, diffusers

for case in json.loads(sys.argv[1]):
    route = {"custom_pipeline": case["dir"]} if case["custom_pipeline"] else {}
    pipe = diffusers.DiffusionPipeline.from_pretrained(case["dir"], trust_remote_code=True, **route)
    assert type(pipe).__name__ == "OneStepPipeline" and not type(pipe).__module__.startswith("onestep"), type(pipe)
    for steps, output_type in case["outputs"]:
        images = pipe(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                      output_type=output_type).images
        torch.save(images, f"{case['dir']}/got_{steps}_{output_type}.pt")
    print(case["name"], pipe.card["teacher"])
assert not any(name.partition(".")[0] == "onestep" for name in sys.modules)
'''


def _export(scheduler, path: Path, model=None) -> OneStepPipeline:
    denoiser = denoiser_from_pretrained(model or tiny_unet(), scheduler)
    pipe = OneStepPipeline.from_generator(OneStepGenerator(denoiser, 2.5), denoiser.scheduler,
                                          {"teacher": "tiny", "method": "test"})
    pipe.save_pretrained(path)
    return pipe


def _images(pipe, steps: int, output_type: str) -> torch.Tensor:
    return pipe(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                output_type=output_type).images


def test_plain_diffusers_without_onestep_gives_identical_images(tmp_path, one_thread):  # as the child process
    cases, expected = [], {}
    for i, (name, scheduler) in enumerate(SCHEDULERS.items()):
        folder = tmp_path / name
        pipe = _export(scheduler(), folder)
        expected[name] = {(s, o): _images(pipe, s, o) for s, o in OUTPUTS}
        cases.append({"name": name, "dir": str(folder), "outputs": OUTPUTS, "custom_pipeline": i % 2 == 1})
    run = subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS, json.dumps(cases)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    for name in SCHEDULERS:
        assert f"{name} tiny" in run.stdout
        for steps, output_type in OUTPUTS:
            got = torch.load(tmp_path / name / f"got_{steps}_{output_type}.pt", weights_only=True)
            want = expected[name][steps, output_type]
            assert torch.equal(got, want), f"{name}, {steps} step(s): max |diff| {(got - want).abs().max():.3g}"


def test_points_generator_through_the_standalone_class(tmp_path):
    """Non-image generators (MLPModel: its class is onestep's, so onestep must be installed for this one)."""
    pipe = _export(EDMEulerScheduler(sigma_data=0.5), tmp_path, MLPModel(dim=2, hidden=16, depth=2))
    standalone = standalone_pipeline.OneStepPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    for steps in (1, 3):
        got = _images(standalone, steps, "raw")
        assert got.shape == (3, 2) and torch.equal(got, _images(pipe, steps, "raw"))
    assert standalone.card["method"] == "test"


def test_exported_file_is_the_module_verbatim_and_needs_only_torch_and_diffusers(tmp_path):
    _export(SCHEDULERS["epsilon"](), tmp_path)
    source = Path(standalone_pipeline.__file__).read_text()
    assert (tmp_path / "pipeline.py").read_text() == source
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == ["pipeline", "OneStepPipeline"]
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.partition(".")[0])
    assert imported <= {"__future__", "json", "math", "pathlib", "torch", "diffusers"}, imported


def test_standalone_validates_steps(tmp_path):
    _export(SCHEDULERS["flow"](), tmp_path)
    with pytest.raises(ValueError, match="num_inference_steps must be 1..4"):
        standalone_pipeline.OneStepPipeline.from_pretrained(tmp_path, trust_remote_code=True)(num_inference_steps=0)
