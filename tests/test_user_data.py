"""Never lose user data: a run never replaces files it did not write, sets an earlier run's results aside, and a disk
that fills up while a checkpoint is written leaves the last complete checkpoint, no temporary folder and one line
saying what happened (a real small tmpfs where this process may mount one, else ENOSPC simulated)."""
import errno
import hashlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from onestep.cli import main
from onestep.training import checkpoint as ckpt


def _recipe(folder: Path, teacher: str, out, steps: int = 4) -> Path:
    recipe = folder / f"recipe_{uuid.uuid4().hex[:6]}.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed": 0, "output_dir": str(out), "teacher": teacher, "data": {"name": "digits", "resolution": 8},
        "method": {"name": "uni_instruct", "loss": "sid"},
        "train": {"steps": steps, "batch_size": 4, "checkpoint_every": 2, "sample_every": 1000, "log_every": 1,
                  "num_sample_images": 4, "keep_checkpoints": 10},
        "eval": {"enabled": False}}))
    return recipe


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capfd) -> str:
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip() and "train:" not in line[:7]]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_never_replaces_files_it_did_not_write(tiny_teacher_dir, tmp_path, capfd, resume):
    """`--set output_dir=.` in a folder where the user keeps their own pipeline/, metrics.jsonl and config.yaml:
    refused before anything is written, every file byte-identical, nothing added (also with --resume PATH)."""
    mine = tmp_path / "mine"
    (mine / "pipeline").mkdir(parents=True)
    (mine / "pipeline" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}\n')
    (mine / "metrics.jsonl").write_text('{"my": "numbers"}\n')
    (mine / "config.yaml").write_text("mine: true\n")
    (mine / "notes.txt").write_text("keep me\n")
    argv = ["train", str(_recipe(tmp_path, tiny_teacher_dir, mine)), "--set", f"output_dir={mine}"]
    if resume:
        other = tmp_path / "other"
        assert main(["train", str(_recipe(tmp_path, tiny_teacher_dir, other, steps=2))]) == 0
        argv += ["--resume", str(other / "checkpoints" / "step_0000002")]
    before = _snapshot(mine)
    capfd.readouterr()
    assert main(argv) == 2
    line = _one_error_line(capfd)
    assert line.startswith("onestep train: error: output_dir") and "holds pipeline (and metrics.jsonl, config.yaml)" \
        in line and "onestep did not write" in line and "nothing was changed" in line
    assert _snapshot(mine) == before and sorted(os.listdir(mine)) == ["config.yaml", "metrics.jsonl", "notes.txt",
                                                                      "pipeline"]


def test_a_fresh_run_into_a_finished_runs_folder_sets_its_results_aside(tiny_teacher_dir, tmp_path, capfd):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_teacher_dir, run, steps=2)
    assert main(["train", str(recipe)]) == 0
    first = _snapshot(run)
    assert {"pipeline/model_index.json", "metrics.jsonl", "loss_curve.png", "onestep_run.json"} <= set(first)
    capfd.readouterr()
    assert main(["train", str(recipe), "--set", "seed=1"]) == 0  # a new run, no --resume
    assert "held an earlier run's results" in capfd.readouterr().out
    (aside,) = run.glob("earlier_*")
    assert _snapshot(aside) == first  # every file of the first run, byte-identical
    assert _snapshot(run / "pipeline") != _snapshot(aside / "pipeline")  # the new run exported its own


def _disk_full_run(tmp_path, teacher, out: Path, fill, capfd) -> str:
    """Train 4 steps (checkpoints at 2 and 4) into `out`, calling fill() right after checkpoint 2 is saved."""
    from onestep.training.trainer import Trainer

    save = Trainer.save_checkpoint

    def save_then_fill(self, step):
        save(self, step)
        if step == 2:
            fill()

    recipe = _recipe(tmp_path, teacher, out)
    capfd.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "save_checkpoint", save_then_fill)
        assert main(["train", str(recipe)]) == 2
    line = _one_error_line(capfd)
    checkpoints = out / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["step_0000002"]  # no .tmp_step_* folder left behind
    assert all(ckpt.safetensors_problem(f) is None for f in (checkpoints / "step_0000002").glob("*.safetensors"))
    assert ckpt.read_state(checkpoints / "step_0000002")["step"] == 2
    return line, recipe


def test_a_full_disk_during_a_checkpoint_simulated(tiny_teacher_dir, tmp_path, capfd):
    """ENOSPC from the writer half-way through checkpoint 4 (as a full disk does): cleaned up, one line."""
    out = tmp_path / "run"
    real_save = ckpt.save_file

    def fill():
        def save_file_on_a_full_disk(tensors, path, *args, **kwargs):
            Path(path).write_bytes(b"\0" * 100)  # a part of the file, then the device is full
            raise OSError(errno.ENOSPC, "No space left on device")
        ckpt.save_file = save_file_on_a_full_disk

    try:
        line, _ = _disk_full_run(tmp_path, tiny_teacher_dir, out, fill, capfd)
    finally:
        ckpt.save_file = real_save
    assert line.startswith("onestep train: error: not saving step 4: no space left on the device of")
    assert "partial checkpoint was removed" in line and "step_0000002, is intact" in line and "--resume latest" in line


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 MB tmpfs mounted at tmp_path/disk (needs CAP_SYS_ADMIN: root in a container); skipped where not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_disk_that_fills_up_during_training_on_a_real_tmpfs(tiny_teacher_dir, tmp_path, small_tmpfs, capfd):
    """Another program fills the disk right after checkpoint 2, leaving half a checkpoint's room: checkpoint 4 fails
    in safetensors' own writer; the last complete checkpoint survives, and with space freed the run resumes."""
    out, ballast = small_tmpfs / "run", small_tmpfs / "ballast"

    def fill():
        size = sum(f.stat().st_size for f in (out / "checkpoints" / "step_0000002").iterdir())
        st = os.statvfs(small_tmpfs)
        with ballast.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - size // 2)

    line, recipe = _disk_full_run(tmp_path, tiny_teacher_dir, out, fill, capfd)
    assert line.startswith("onestep train: error: not saving step 4: no space left on the device of")
    assert "step_0000002, is intact" in line
    ballast.unlink()
    assert main(["train", str(recipe), "--resume", "latest"]) == 0
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "checkpoints" / "step_0000004").is_dir()
