"""Crash safety and numerical faults.

For every method `available_methods()` finds: SIGKILL a training subprocess in the middle of a checkpoint save (the
previous checkpoint must still load), resume it with `--resume latest`, SIGKILL it again at a random step, resume to
the end, and compare with an uninterrupted run: every tensor of the final checkpoint (weights, EMA, optimizer
states) and of the exported pipeline must be bit-identical (torch.equal). Kill points come from a seeded RNG.

Then: Inf in a gradient is detected; with nan_policy=skip no NaN/Inf reaches weights, checkpoints or the export;
export and checkpoints refuse non-finite weights; retention never deletes the newest checkpoint.
"""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_run_config
from onestep.cli import main
from onestep.methods.base import available_methods
from onestep.training import checkpoint as ckpt
from onestep.training.config import load_config
from onestep.training.trainer import Trainer, TrainingStopped

WORKER = Path(__file__).with_name("crash_worker.py")
STEPS = 6


def _write_recipe(path: Path, method: str, teachers: dict, out: Path) -> Path:
    """The method's own smoke recipe (every method has one: the contract test needs it too), checkpointing every step."""
    cls = available_methods()[method]
    recipe = {"seed": 0, "output_dir": str(out), **cls.smoke_recipe(teachers[cls.teacher_kind]), "ema": {"decay": 0.9},
              "train": {"steps": STEPS, "batch_size": 4, "checkpoint_every": 1, "keep_checkpoints": 2,
                        "sample_every": 1000, "log_every": 1, "num_sample_images": 4},
              "eval": {"enabled": False}}
    if teachers[cls.teacher_kind] is None:
        recipe.pop("teacher", None)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    # Same thread count as this process, so the subprocess computes bit-identically to the in-process runs.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, condition, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before the kill point:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(folder)}/{k}": v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def _step_of(path: Path) -> int:
    return int(ckpt.STEP_DIR.match(path.name).group(1))


@pytest.mark.parametrize("method", sorted(n for n, c in available_methods().items() if c.__module__.startswith("onestep.")))
def test_killed_runs_resume_to_identical_weights(method, method_teachers, tmp_path):
    rng = random.Random(f"crash-resume-{method}")
    kill_in_save = rng.randint(2, STEPS - 2)            # killed while checkpoint `kill_in_save` is being written
    kill_after = rng.randint(kill_in_save, STEPS - 1)    # killed mid-run once checkpoint `kill_after` exists
    run, ref = tmp_path / "run", tmp_path / "ref"
    recipe = _write_recipe(tmp_path / "recipe.yaml", method, method_teachers, run)
    checkpoints = run / "checkpoints"

    # 1. SIGKILL during a checkpoint save: its files are in the temporary folder, not yet renamed into place
    marker = tmp_path / "saving"
    proc = _spawn(["--hang-at-save", str(kill_in_save), "--marker", str(marker), "--", "train", str(recipe)],
                  tmp_path / "log1.txt")
    _kill_when(proc, marker.exists, tmp_path / "log1.txt")
    assert list(checkpoints.glob(f".tmp_step_{kill_in_save:07d}_*")), "the kill did not land inside the save"
    assert _step_of(ckpt.checkpoint_dirs(checkpoints)[-1]) == kill_in_save - 1
    previous = Trainer(load_config(recipe), resume="latest")  # the previous checkpoint still loads, in full
    assert previous.start_step == kill_in_save - 1
    del previous

    # 2. resume with --resume latest, SIGKILL at a random step while the run is in progress
    proc = _spawn(["--step-delay", "0.3", "--", "train", str(recipe), "--resume", "latest"], tmp_path / "log2.txt")
    _kill_when(proc, lambda: (checkpoints / f"step_{kill_after:07d}" / ckpt.STATE_FILE).is_file(),
               tmp_path / "log2.txt")
    latest = _step_of(ckpt.checkpoint_dirs(checkpoints)[-1])
    assert kill_after <= latest < STEPS
    with (run / "metrics.jsonl").open("a") as f:  # a log row torn by the kill must not break the resume
        f.write('{"step": 4, "loss/')

    # 3. resume to the end (in-process, through the CLI), and an uninterrupted reference run
    assert main(["train", str(recipe), "--resume", "latest"]) == 0
    ref_recipe = _write_recipe(tmp_path / "ref.yaml", method, method_teachers, ref)
    assert main(["train", str(ref_recipe)]) == 0

    final, expected = _tensors(checkpoints / f"step_{STEPS:07d}"), _tensors(ref / "checkpoints" / f"step_{STEPS:07d}")
    assert final.keys() == expected.keys() and len(final) > 20
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    exported, expected_export = _tensors(run / "pipeline"), _tensors(ref / "pipeline")
    assert exported.keys() == expected_export.keys() and exported
    for key in expected_export:
        assert torch.equal(exported[key], expected_export[key]), key
    state = json.loads((checkpoints / f"step_{STEPS:07d}" / ckpt.STATE_FILE).read_text())
    assert state == json.loads((ref / "checkpoints" / f"step_{STEPS:07d}" / ckpt.STATE_FILE).read_text())
    steps = [json.loads(row)["step"] for row in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # no duplicated or missing log rows
    assert [p.name for p in checkpoints.iterdir()] and not list(checkpoints.glob(".tmp*"))
    assert len(ckpt.checkpoint_dirs(checkpoints)) == 2  # retention (keep_checkpoints: 2) held across the kills


# --- numerical faults ---------------------------------------------------------------------------------------------
def _all_finite(folder: Path) -> int:
    files = sorted(folder.rglob("*.safetensors"))
    for f in files:
        for key, value in load_file(f).items():
            assert not value.is_floating_point() or torch.isfinite(value).all(), f"{f}: {key} is not finite"
    return len(files)


def _faulty_trainer(teacher, out, steps, faults, policy="skip"):
    """A trainer whose updates go non-finite at chosen (step, network): 'nan_loss' multiplies the loss by NaN,
    'inf_grad' turns the network's gradient to Inf (a tensor hook on its first parameter)."""
    config = tiny_run_config(teacher, out, steps=steps, loss="ui", divergence="fkl", gan_weight=0.01)
    config.train.nan_policy = policy
    config.train.checkpoint_every = 1
    trainer = Trainer(config)
    now = {"step": -1}
    for name in ("generator", "fake_score"):
        param = next(p for p in trainer.modules[name].parameters() if p.requires_grad)
        param.register_hook(lambda g, name=name: torch.full_like(g, float("inf"))
                            if faults.get((now["step"], name)) == "inf_grad" else g)
    step = trainer.method.step

    def faulty_step(batch, ctx):
        now["step"] = ctx.step
        update = ctx.update

        def maybe_poisoned(name, loss_fn, batch):
            def poisoned(b):
                loss, logs = loss_fn(b)
                return (loss * float("nan") if faults.get((ctx.step, name)) == "nan_loss" else loss), logs
            return update(name, poisoned, batch)

        ctx.update = maybe_poisoned
        return step(batch, ctx)

    trainer.method.step = faulty_step
    return trainer


def test_inf_gradient_is_detected_and_the_update_skipped(tiny_teacher_dir, tmp_path):
    trainer = _faulty_trainer(tiny_teacher_dir, tmp_path, 3, {(s, "generator"): "inf_grad" for s in range(3)})
    before = {k: v.clone() for k, v in trainer.method.gen.state_dict().items()}
    assert trainer.train()["skipped_updates"] == 3
    after = trainer.method.gen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the generator never stepped on an Inf gradient


def test_inf_gradient_with_policy_stop_stops_clearly_and_writes_nothing(tiny_teacher_dir, tmp_path):
    trainer = _faulty_trainer(tiny_teacher_dir, tmp_path, 3, {(1, "fake_score"): "inf_grad"}, policy="stop")
    with pytest.raises(TrainingStopped, match=r"step 1: non-finite fake_score loss or gradient.*Lower the learning"):
        trainer.train()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "checkpoints")] == ["step_0000001"]  # before the fault
    assert not (tmp_path / "pipeline").exists()


def test_skip_policy_keeps_non_finite_values_out_of_every_file(tiny_teacher_dir, tmp_path):
    faults = {(0, "generator"): "inf_grad", (1, "fake_score"): "nan_loss", (2, "fake_score"): "inf_grad",
              (3, "generator"): "nan_loss"}
    trainer = _faulty_trainer(tiny_teacher_dir, tmp_path, 5, faults)
    result = trainer.train()
    assert result["skipped_updates"] == len(faults)
    assert _all_finite(tmp_path / "checkpoints") >= 2 * 5  # weights + optimizer files of every kept checkpoint
    assert _all_finite(tmp_path / "pipeline") >= 1
    for name, module in trainer.modules.items():
        assert all(torch.isfinite(p).all() for p in module.parameters()), name


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_non_finite_weights_and_keeps_the_previous_export(tiny_teacher_dir, tmp_path):
    trainer = Trainer(tiny_run_config(tiny_teacher_dir, tmp_path, steps=1))
    trainer.train()
    before = _hashes(tmp_path / "pipeline")
    with torch.no_grad():
        trainer.ema.shadow_params[0].view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match="not exporting: the EMA generator has non-finite weights"):
        trainer.export({})
    assert _hashes(tmp_path / "pipeline") == before
    assert not list(tmp_path.glob(".tmp_pipeline_*"))


def test_checkpoints_refuse_non_finite_optimizer_state(tmp_path):
    module = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 2)).sum().backward()
    opt.step()
    opt.state[module.weight]["exp_avg_sq"].fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="optimizer net has non-finite state"):
        ckpt.save_checkpoint(tmp_path, 1, {"net": module}, {"net": opt}, {}, keep=1)
    assert ckpt.checkpoint_dirs(tmp_path) == [] and not list(tmp_path.glob(".tmp*"))


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    module = torch.nn.Linear(2, 2)
    for step in (9, 10):  # left by an earlier, longer run in the same output_dir
        ckpt.save_checkpoint(tmp_path, step, {"net": module}, {}, {}, keep=5)
    (tmp_path / ".tmp_step_0000011_999").mkdir()  # a save killed half-way
    ckpt.save_checkpoint(tmp_path, 1, {"net": module}, {}, {}, keep=1)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_0000001"]
    assert not list(tmp_path.glob(".tmp*"))  # the stale temporary folder was cleaned up
    ckpt.save_checkpoint(tmp_path, 2, {"net": module}, {}, {}, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_0000001", "step_0000002"]
