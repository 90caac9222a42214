"""Every bad input is refused in one clear line: the corpus in tests/bad_inputs/ (one case per file, see its README).

Each case runs the real CLI (`onestep.cli.main`, in-process for speed; a few also as `python -m onestep` subprocesses
to prove exit codes and stderr end to end) and must: exit non-zero; print exactly one line on stderr, starting
`onestep <cmd>: error:` and matching the case's `problem` and `fix`; show no traceback (unless --debug); leave every
pre-existing file of its working folder unchanged; and never unpickle anything (torch.load is booby-trapped, and the
corpus's pickles would create $CASE/PWNED if they were ever loaded).
"""
import copy
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from onestep.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*.yaml"))
SUBPROCESS_CASES = ["yaml_unclosed_brace", "teacher_bin_weights_only"]
BASE_RECIPE = {
    "seed": 0, "output_dir": "$CASE/out", "teacher": "$CASE/teacher", "data": {"name": "digits", "resolution": 8},
    "method": {"name": "uni_instruct", "loss": "sid", "gan_weight": 0.01},
    "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 1, "sample_every": 1000, "log_every": 1,
              "num_sample_images": 4, "keep_checkpoints": 10},
    "eval": {"enabled": False}}


class Unpickled:
    """If this is ever unpickled, it creates PWNED next to itself: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- shared fixtures: a finished tiny run (checkpoints + exported pipeline), a points pipeline, a sampling job -----
@pytest.fixture(scope="module")
def sources(tiny_teacher_dir, tmp_path_factory):
    from conftest import tiny_run_config
    from diffusers import EDMEulerScheduler

    from onestep.denoisers import MLPModel, denoiser_from_pretrained
    from onestep.generators import OneStepGenerator
    from onestep.pipelines import OneStepPipeline
    from onestep.training.trainer import Trainer

    root = tmp_path_factory.mktemp("bad_input_sources")
    method = {k: v for k, v in BASE_RECIPE["method"].items() if k != "name"}
    config = tiny_run_config(tiny_teacher_dir, root / "run", steps=2, **method)
    config.train.checkpoint_every = 1
    Trainer(config).train()
    points = OneStepPipeline.from_generator(
        OneStepGenerator(denoiser_from_pretrained(MLPModel(dim=2, hidden=16, depth=2), EDMEulerScheduler()), 2.5),
        EDMEulerScheduler())
    points.save_pretrained(root / "points_pipeline")
    assert main(["sample", str(root / "run" / "pipeline"), "-n", "4", "--out", str(root / "sample_job")]) == 0
    from tiny_teachers import stable_diffusion

    return {"teacher": Path(tiny_teacher_dir), "run": root / "run", "pipeline": root / "run" / "pipeline",
            "points_pipeline": root / "points_pipeline", "sample_job": root / "sample_job",
            "sd_teacher": Path(stable_diffusion(root / "sd_teacher"))}


# --- building a case's working folder -----------------------------------------------------------------------------
def _subst(value, case: Path):
    if isinstance(value, str):
        return value.replace("$CASE", str(case))
    if isinstance(value, dict):
        return {k: _subst(v, case) for k, v in value.items()}
    if isinstance(value, list):
        return [_subst(v, case) for v in value]
    return value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _png(path: Path, size, truncated=False):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(path)
    if truncated:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit gray pixels and holds none: a decompression bomb's header (57 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _build(name: str, spec, case: Path, sources: dict) -> None:
    path = case / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, str):
        path.write_text(_subst(spec, case))
    elif "copy" in spec:
        shutil.copytree(sources[spec["copy"]], path)
        for rel in spec.get("delete", []):
            target = path / rel
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        for rel in spec.get("truncate", []):
            data = (path / rel).read_bytes()
            (path / rel).write_bytes(data[: len(data) // 2])
        for rel, text in spec.get("write", {}).items():
            (path / rel).write_bytes(text.encode("latin-1"))
        for rel, keys in spec.get("json", {}).items():
            (path / rel).write_text(json.dumps(_merge(json.loads((path / rel).read_text()), keys)))
        for rel in spec.get("evil_pickle", []):
            (path / rel).write_bytes(pickle.dumps(Unpickled(case / "PWNED")))
        for src, dst in spec.get("rename", {}).items():
            os.replace(path / src, path / dst)
        for src, dst in spec.get("duplicate", {}).items():
            shutil.copyfile(path / src, path / dst)
    elif "recipe" in spec:
        path.write_text(yaml.safe_dump(_subst(_merge(BASE_RECIPE, spec["recipe"]), case), sort_keys=False))
    elif "bytes" in spec:
        path.write_bytes(bytes.fromhex(spec["bytes"]))
    elif "png" in spec:
        _png(path, spec["png"])
    elif "png_declared" in spec:
        path.write_bytes(_png_header_only(*spec["png_declared"]))
    elif "png_truncated" in spec:
        _png(path, spec["png_truncated"], truncated=True)
    elif "evil_pickle" in spec:
        path.write_bytes(pickle.dumps(Unpickled(case / "PWNED")))
    elif "dir" in spec:
        path.mkdir()
    else:
        raise AssertionError(f"unknown file spec {spec!r}")


def _prepare(case_file: Path, root: Path, sources: dict):
    spec = yaml.safe_load(case_file.read_text())
    case = root / case_file.stem.split("_", 1)[1]
    case.mkdir()
    files = spec.get("files") or {}
    for name, file_spec in files.items():
        _build(name, file_spec, case, sources)
    recipe = files.get("recipe.yaml")
    if isinstance(recipe, dict) and "recipe" in recipe and "teacher" not in files:
        shutil.copytree(sources["teacher"], case / "teacher")  # every input a case reads lives in its folder
    argv = shlex.split(_subst(spec["command"], case))
    return spec, case, argv


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check(spec, case: Path, before: dict, rc, stderr: str, command: str):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc not in (0, None), f"exit status {rc}; stderr: {stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert "Traceback" not in stderr
    assert line.startswith(f"onestep {command}: error: "), line
    assert re.search(spec["problem"], line), f"problem /{spec['problem']}/ not named in: {line}"
    assert re.search(spec["fix"], line), f"fix /{spec['fix']}/ not named in: {line}"
    after = _snapshot(case)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"pre-existing files changed or removed: {changed}"
    assert not (case / "PWNED").exists(), "a pickle was unpickled"


def _never_unpickle(*args, **kwargs):
    raise AssertionError("torch.load was called on a bad input: pickles must be refused unread")


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 30
    assert {re.sub(r"^\d+_", "", p.stem) for p in CASES} >= set(SUBPROCESS_CASES)


@pytest.mark.parametrize("case_file", CASES, ids=lambda p: p.stem)
def test_bad_input_is_refused_in_one_clear_line(case_file, sources, tmp_path, capfd, monkeypatch):
    spec, case, argv = _prepare(case_file, tmp_path, sources)
    before = _snapshot(case)
    monkeypatch.setattr(torch, "load", _never_unpickle)
    monkeypatch.chdir(case)
    capfd.readouterr()
    rc = main(argv)
    _, err = capfd.readouterr()
    _check(spec, case, before, rc, err, argv[0])


def test_debug_shows_the_traceback(sources, tmp_path):
    spec, case, argv = _prepare(CORPUS / "49_teacher_weights_truncated.yaml", tmp_path, sources)
    with pytest.raises(ValueError, match=spec["problem"]):
        main(["--debug", *argv])


def test_exit_status_and_stderr_end_to_end(sources, tmp_path):
    """The same cases through `python -m onestep` in fresh processes (run concurrently), plus one with --debug."""
    by_name = {re.sub(r"^\d+_", "", p.stem): p for p in CASES}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = []
    for name in SUBPROCESS_CASES:
        spec, case, argv = _prepare(by_name[name], tmp_path, sources)
        proc = subprocess.Popen([sys.executable, "-m", "onestep", *argv], cwd=case, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs.append((spec, case, _snapshot(case), argv[0], proc))
    debug_root = tmp_path / "debug"
    debug_root.mkdir()
    _, debug_case, debug_argv = _prepare(by_name[SUBPROCESS_CASES[0]], debug_root, sources)
    debug = subprocess.Popen([sys.executable, "-m", "onestep", "--debug", *debug_argv], cwd=debug_case, env=env,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for spec, case, before, command, proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2
        _check(spec, case, before, proc.returncode, err, command)
    _, err = debug.communicate(timeout=300)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in err


# --- never hang, never silently do something else ------------------------------------------------------------------
@pytest.mark.parametrize("case", ["87_yaml_alias_bomb", "89_yaml_merge_key_bomb", "88_yaml_alias_cycle"])
def test_an_alias_bomb_is_refused_within_two_seconds(case, tmp_path):
    from onestep.training.config import ConfigError, load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_load((CORPUS / f"{case}.yaml").read_text())["files"]["recipe.yaml"])
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than|refers to itself") as err:
        load_config(recipe)
    assert time.perf_counter() - start < 2.0
    assert len(str(err.value)) < 300 and "lol" not in str(err.value)  # the expanded value is never printed


def test_yaml_anchors_merges_and_overrides_still_load(tmp_path):
    from onestep.training.config import load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("opt: &opt {lr: 2.0e-5, betas: [0.0, 0.99]}\nmethod:\n  name: uni_instruct\n"
                      "  generator_optimizer: *opt\n  fake_optimizer: {<<: *opt, lr: 1.0e-5}\n")
    with pytest.raises(Exception, match="opt: unknown key"):  # anchors live in known keys only; the merge is fine
        load_config(recipe)
    recipe.write_text("method:\n  name: uni_instruct\n  generator_optimizer: &opt {lr: 2.0e-5, betas: [0.0, 0.99]}\n"
                      "  fake_optimizer: {<<: *opt, lr: 1.0e-5}\n")
    config = load_config(recipe)
    assert config.method.fake_optimizer.lr == 1e-5 and config.method.fake_optimizer.betas == (0.0, 0.99)
    assert config.method.generator_optimizer.lr == 2e-5


def test_every_config_float_refuses_nan_and_infinity():
    """The Python API too (configs built without a recipe): pydantic's allow_inf_nan=False on every config model."""
    from pydantic import ValidationError

    from onestep.methods.base import OptimizerConfig
    from onestep.methods.uni_instruct import UniInstructConfig
    from onestep.training.config import EMAConfig, TeacherConfig

    for model, field in [(UniInstructConfig, "alpha"), (UniInstructConfig, "sigma_init"), (OptimizerConfig, "lr"),
                         (EMAConfig, "decay"), (TeacherConfig, "guidance_scale")]:
        for bad in (float("nan"), float("inf"), -float("inf")):
            extra = {"path": "x"} if model is TeacherConfig else {}
            with pytest.raises(ValidationError, match="finite number"):
                model(**extra, **{field: bad})


def test_a_recipe_is_read_from_stdin(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "onestep", "train", "/dev/stdin", "--dry-run"], cwd=tmp_path,
                          input="method: {name: uni_instruct, alpha: 0.5}\n", capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "alpha: 0.5" in done.stdout


# --- the Python API: one-line ValueErrors too -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, r"^batch_size must be a whole number in 1\.\.1048576, got 0$"),
    ({"batch_size": -2}, r"^batch_size must be a whole number in 1\.\.1048576, got -2$"),
    ({"batch_size": 2, "class_labels": [3, 10]}, r"^class_labels must be in 0\.\.9 \(this generator has 10 classes\), "
                                                  r"got 10$"),
    ({"batch_size": 2, "class_labels": [-1, 0]}, r"^class_labels must be in 0\.\.9 .*got -1$"),
    ({"batch_size": 2, "class_labels": [0.5, 1]}, r"^class_labels must be whole numbers in 0\.\.9, got 0\.5$"),
    ({"batch_size": 3, "class_labels": [1, 2]}, r"^got 2 class_labels for 3 samples: pass one, or one per sample$"),
])
def test_the_pipeline_refuses_bad_arguments_in_one_line(sources, kwargs, message):
    from onestep.pipelines import OneStepPipeline

    pipe = OneStepPipeline.from_pretrained(sources["pipeline"])
    with pytest.raises(ValueError, match=message) as err:
        pipe(**kwargs, output_type="pt")
    assert "\n" not in str(err.value)
    one = pipe(batch_size=3, class_labels=[7], output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert one.shape[0] == 3  # a single label applies to every sample
    whole = pipe(batch_size=2, class_labels=[3.0, 4.0], output_type="pt", generator=torch.Generator().manual_seed(0))
    assert torch.equal(whole.images, pipe(batch_size=2, class_labels=[3, 4], output_type="pt",
                                          generator=torch.Generator().manual_seed(0)).images)  # 3.0 is label 3
