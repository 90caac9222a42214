"""Long sampling jobs (`onestep sample PIPE -n N --out DIR`): numbered PNGs written batch by batch, deterministic per
index, resumable after SIGKILL with no duplicates or gaps, identical to an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import tiny_unet
from onestep.cli import main
from onestep.denoisers import denoiser_from_pretrained
from onestep.generators import OneStepGenerator
from onestep.pipelines import OneStepPipeline
from onestep.sampling import bulk

WORKER = Path(__file__).with_name("crash_worker.py")
N, BATCH = 48, 8


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bulk") / "pipeline"
    scheduler = DDPMScheduler(beta_schedule="linear", clip_sample=False)
    generator = OneStepGenerator(denoiser_from_pretrained(tiny_unet(seed=3), scheduler), 2.5)
    OneStepPipeline.from_generator(generator, scheduler, {"teacher": "tiny"}).save_pretrained(path)
    return str(path)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _sample(pipeline_dir, out, n=N, *extra):
    assert main(["sample", pipeline_dir, "-n", str(n), "--batch-size", str(BATCH), "--out", str(out), *extra]) == 0


def test_sigkilled_job_resumes_without_duplicates_or_gaps(pipeline_dir, tmp_path):
    reference = tmp_path / "reference"
    _sample(pipeline_dir, reference)
    expected = _pngs(reference)
    assert sorted(expected) == [f"{i:06d}.png" for i in range(N)]

    out, log = tmp_path / "killed", tmp_path / "log.txt"
    kill_at = random.Random("bulk-sampling").randint(5, N - 12)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKER), "--write-delay", "0.05", "--", "sample", pipeline_dir,
                             "-n", str(N), "--batch-size", str(BATCH), "--out", str(out)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while len(list(out.glob("*.png"))) < kill_at:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert kill_at <= len(survivors) < N
    (out / f".{N - 1:06d}.png.tmp12345").write_bytes(b"\x89PNG half a file")  # as a kill mid-write leaves it

    _sample(pipeline_dir, out)  # the same command again
    assert _pngs(out) == expected  # exactly 0..N-1, byte-identical to the uninterrupted run
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png") if p.name in survivors} \
        == survivors  # files finished before the kill were not written again
    assert sorted(os.listdir(out)) == sorted([*expected, bulk.MANIFEST, bulk.LOCK])  # no temporary files left


def test_sample_i_depends_only_on_seed_and_i(pipeline_dir, tmp_path):
    _sample(pipeline_dir, tmp_path / "a", 12)
    _sample(pipeline_dir, tmp_path / "a", 20)  # extending a finished job writes only the new indices
    _sample(pipeline_dir, tmp_path / "b", 20)
    _sample(pipeline_dir, tmp_path / "c", 20, "--seed", "1")
    a, b, c = (_pngs(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 20
    assert sum(a[k] != c[k] for k in a) == 20  # another seed, other samples
    assert len(set(a.values())) == 20  # no two indices share their noise


def test_few_step_folder_matches_per_index_and_differs_from_one_step(pipeline_dir, tmp_path):
    _sample(pipeline_dir, tmp_path / "two", 10, "--steps", "2")
    _sample(pipeline_dir, tmp_path / "two_again", 10, "--steps", "2")
    _sample(pipeline_dir, tmp_path / "one", 10)
    two = _pngs(tmp_path / "two")
    assert two == _pngs(tmp_path / "two_again") and two != _pngs(tmp_path / "one")


def test_a_png_path_still_writes_one_grid(pipeline_dir, tmp_path):
    assert main(["sample", pipeline_dir, "-n", "9", "--out", str(tmp_path / "grid.png")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_other_settings_never_mix_into_a_job(pipeline_dir, tmp_path, capsys):
    _sample(pipeline_dir, tmp_path / "job", 8)
    before = _pngs(tmp_path / "job")
    for extra in (["--seed", "2"], ["--steps", "2"]):
        assert main(["sample", pipeline_dir, "-n", "16", "--batch-size", str(BATCH), "--out", str(tmp_path / "job"),
                     *extra]) == 2
        assert "holds samples of another job" in capsys.readouterr().err
    assert _pngs(tmp_path / "job") == before


def test_a_truncated_png_is_written_again(pipeline_dir, tmp_path):
    """A file under its final name cut short (a full disk, a partial copy) is not counted as done: rewritten."""
    _sample(pipeline_dir, tmp_path / "job", 16)
    expected = _pngs(tmp_path / "job")
    cut = tmp_path / "job" / "000003.png"
    cut.write_bytes(expected["000003.png"][:-20])  # the image data is there, the closing chunks are not
    (tmp_path / "job" / "000005.png").write_bytes(b"")
    assert bulk.completed_indices(tmp_path / "job", 16) == set(range(16)) - {3, 5}
    _sample(pipeline_dir, tmp_path / "job", 16)
    assert _pngs(tmp_path / "job") == expected


def test_a_second_job_into_a_locked_folder_is_refused_and_touches_nothing(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "job"
    _sample(pipeline_dir, out, 8)
    live_tmp = out / f".{9:06d}.png.tmp{os.getpid()}"  # a temporary file of the job holding the lock
    with bulk.folder_lock(out):
        live_tmp.write_bytes(b"being written")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        capsys.readouterr()
        assert main(["sample", pipeline_dir, "-n", "16", "--batch-size", str(BATCH), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("onestep sample: error: --out") and "\n" not in err
        assert f"another `onestep sample` (pid {os.getpid()}) is writing into this folder" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the live job's temp file survives
    live_tmp.unlink()
    _sample(pipeline_dir, out, 16)  # the lock is released with its holder


def test_two_concurrent_samplers_into_one_folder_never_mix(pipeline_dir, tmp_path, one_thread):
    """Two `onestep sample` processes started together on one folder: one writes, the other is refused at once (or,
    started after the first finished, finds the job complete); the folder ends identical to a single run."""
    _sample(pipeline_dir, tmp_path / "reference", N)
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(WORKER), "--write-delay", "0.02", "--", "sample", pipeline_dir, "-n", str(N),
           "--batch-size", str(BATCH), "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert sorted(rc for rc, _ in results)[0] == 0, results
    for rc, err in results:
        if rc:
            lines = [line for line in err.splitlines() if line.strip() and not line.startswith("sample")]
            assert rc == 2 and lines[-1].startswith("onestep sample: error: --out") and "another" in lines[-1], err
    assert _pngs(out) == _pngs(tmp_path / "reference")
    assert sorted(os.listdir(out)) == sorted([*_pngs(out), bulk.MANIFEST, bulk.LOCK])
