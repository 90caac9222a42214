"""The package as a user installs it: build the wheel, install it (not editable) into a fresh virtual environment
that reuses the installed dependencies, then run the quickstart's smallest variant, `onestep sample`, `onestep fid`
with the shipped extractor and `onestep recipes` from a folder outside the checkout. Runs in CI (marker `wheel`)."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.wheel


def _run(cmd, cwd, timeout=900, **env):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", **env}
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=environ, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _source_copy(dest: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files (what a clone holds), so that the build writes its
    build/ and egg-info into a scratch copy, never into the checkout."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_wheel_installs_and_runs_from_another_directory(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clone holds")
    src = _source_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", wheels], src)
    (wheel,) = wheels.glob("onestep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("onestep/assets/teachers/digits16/unet/diffusion_pytorch_model.safetensors",
                    "onestep/assets/teachers/gaussian_grid/model_index.json",
                    "onestep/assets/pipelines/digits16/unet/diffusion_pytorch_model.safetensors",
                    "onestep/assets/fid/onestep-digits.safetensors", "onestep/recipes/quickstart_digits16.yaml",
                    "onestep/recipes/accelerate/cpu_2proc.yaml", "onestep/demo/app.py"):
        assert shipped in names, shipped
    assert not any(n.endswith(".png") for n in names)  # the README's plots stay in the repository

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python, onestep = bin_dir / "python", bin_dir / "onestep"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = json.loads(_run([python, "-c", "import json, onestep, onestep.resources as r; print(json.dumps("
                                           "[onestep.__file__, str(r.ASSETS), str(r.RECIPES), str(r.DEMO_APP)]))"],
                            work))
    for path in where:  # the installed copy, not the checkout (an editable install may sit in the base env)
        assert Path(path).resolve().is_relative_to(venv.resolve()) and Path(path).exists(), where

    _run([onestep, "quickstart", "--steps", "2", "--fid-samples", "100", "--out", "qs"], work)
    metrics = json.loads((work / "qs" / "metrics.json").read_text())
    assert metrics["distill_steps"] == 2 and metrics["teacher_fid"] > 0 and metrics["student_fid"] > 0
    assert (work / "qs" / "pipeline" / "model_index.json").is_file() and (work / "qs" / "samples.png").is_file()

    _run([onestep, "sample", "qs/pipeline", "-n", "4", "--out", "grid.png"], work)
    assert (work / "grid.png").stat().st_size > 0
    fid = json.loads(_run([onestep, "fid", "qs/pipeline", "onestep:digits", "-n", "100", "--extractor",
                           "onestep-digits", "--json", "--no-progress", "--cache-dir", "fidcache"], work))
    assert fid["fid"] > 0 and fid["protocol"]["extractor"] == "onestep-digits"

    listing = _run([onestep, "recipes"], work)
    assert "quickstart_digits16.yaml" in listing and "digits16_sid.yaml" in listing
    _run([onestep, "recipes", "gaussian_grid_sid.yaml", "--copy", "my_recipes/"], work)
    assert (work / "my_recipes" / "gaussian_grid_sid.yaml").is_file()
    # a copied recipe names its teacher as assets/teachers/...: the shipped copy is found from anywhere
    dry = _run([onestep, "train", "my_recipes/gaussian_grid_sid.yaml", "--dry-run"], work)
    assert str(Path(where[1]) / "teachers" / "gaussian_grid") in dry
