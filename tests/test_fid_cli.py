"""`onestep fid` / scripts/fid.py: reproduces the training evaluation's FID, gives the same statistics on 1 and 2
processes, equals the FID of the PNGs `onestep sample` writes, caches references, wires Inception end to end offline
(random weights: only the wiring is tested), and fails in one line on bad inputs."""
import json
import os
import runpy
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from conftest import tiny_run_config

from onestep.cli import main
from onestep.eval import fid_cli

REPO = Path(__file__).resolve().parents[1]


def _fid(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["fid", *map(str, argv), "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["fid", *map(str, argv), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onestep fid: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def tiny_run(tiny_teacher_dir, tmp_path_factory):
    """A 4-step distillation on 8x8 digits whose training evaluation (2 batches of the stream: 300 samples) ran."""
    from onestep.training.config import config_from_dict
    from onestep.training.trainer import Trainer

    out = tmp_path_factory.mktemp("fidrun")
    config = tiny_run_config(tiny_teacher_dir, out).model_dump()
    config["eval"] = {"enabled": True, "num_samples": 300, "feature_extractor": "onestep-digits"}
    config = config_from_dict(config)
    result = Trainer(config).train()
    return {"pipeline": out / "pipeline", "fid": result["fid"], "seed": config.seed + 1, "n": 300}


def test_reproduces_the_training_evaluation_fid_and_caches_the_reference(tiny_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = (tiny_run["pipeline"], "onestep:digits", "-n", tiny_run["n"], "--seed", tiny_run["seed"], "--cache-dir",
            cache)
    first = _fid(capsys, *args)
    assert abs(first["fid"] - tiny_run["fid"]) <= 1e-6 * tiny_run["fid"]
    p = first["protocol"]
    assert p["sampling"] == "trainer" and p["extractor"] == "onestep-digits" and p["nfe"] == 1
    assert (p["num_samples_1"], p["num_samples_2"]) == (300, 1797) and p["library_version"] == torch_fidelity.__version__
    assert first["protocol_text"].startswith(f"torch-fidelity {torch_fidelity.__version__} FID, extractor onestep-digits")
    assert "300 generated vs 1797 reference (onestep:digits, all rows, 8x8)" in first["protocol_text"]
    cached = sorted(f.name for f in cache.iterdir())
    assert any("onestep-digits-8x8-n1797" in name and "stat-fid" in name for name in cached), cached
    assert _fid(capsys, *args)["fid"] == first["fid"]  # from the cached reference statistics
    # human-readable output: the number, then its protocol
    assert main(["fid", *map(str, args), "--no-progress"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith("FID ") and text[1].startswith("protocol: torch-fidelity")


def test_index_sampling_equals_the_png_folder_of_onestep_sample(tiny_run, tmp_path, capsys):
    """--sampling index generates exactly what `onestep sample -n N --out DIR` writes (same seed and batch size)."""
    folder = tmp_path / "pngs"
    assert main(["sample", str(tiny_run["pipeline"]), "-n", "37", "--batch-size", "8", "--seed", "5",
                 "--out", str(folder)]) == 0
    capsys.readouterr()
    # same --batch-size on both sides: the extractor then sees the same batches (its float results depend on
    # the batch size at the 1e-8 level)
    common = ("onestep:digits", "--resolution", "8", "--no-cache", "--kid", "--batch-size", 8)
    from_pipe = _fid(capsys, tiny_run["pipeline"], *common, "-n", 37, "--seed", 5, "--sampling", "index")
    from_folder = _fid(capsys, folder, *common)
    assert from_pipe["fid"] == from_folder["fid"] and from_pipe["kid_mean"] == from_folder["kid_mean"]
    assert from_folder["protocol"]["nfe"] is None and from_folder["protocol"]["num_samples_1"] == 37
    assert "image folder" in from_folder["protocol"]["input1"]


WORKER = """
import json, sys
from onestep.eval.fid_cli import FidOptions, compute_fid
pipe, cache, out = sys.argv[1:4]
results = {}
for name, extra in {"trainer": dict(num_samples=520), "index": dict(num_samples=37, batch_size=8, kid=True)}.items():
    r = compute_fid(FidOptions(pipe, "onestep:digits", seed=3, sampling=name, cache_dir=cache, progress=False, **extra))
    if r is not None:
        results[name] = r
if results:
    open(out, "w").write(json.dumps(results))
"""


def test_two_processes_give_the_same_statistics_as_one(tiny_run, tmp_path, one_thread):  # as the workers
    """Generation split over 2 gloo CPU processes (batches round-robin, one process idle in the last round) and
    gathered: the same features, hence the same FID/KID to the last bit, for both samplings."""
    worker, out = tmp_path / "worker.py", tmp_path / "two.json"
    worker.write_text(WORKER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(worker), str(tiny_run["pipeline"]), str(tmp_path / "cache"), str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two = json.loads(out.read_text())
    for name, extra in {"trainer": dict(num_samples=520), "index": dict(num_samples=37, batch_size=8, kid=True)}.items():
        one = fid_cli.compute_fid(fid_cli.FidOptions(str(tiny_run["pipeline"]), "onestep:digits", seed=3,
                                                     sampling=name, cache_dir=str(tmp_path / "cache"),
                                                     progress=False, **extra))
        assert two[name]["protocol"]["processes"] == 2 and one["protocol"]["processes"] == 1
        assert two[name]["fid"] == one["fid"], name
        assert two[name].get("kid_mean") == one.get("kid_mean")


def test_generated_features_identical_for_any_process_split(tiny_run):
    """The gather bookkeeping (round-robin batches, padding, idle ranks) returns features in index order: simulated
    here with fake ranks against a single-process run (the real 2-process run is the test above)."""
    from torch_fidelity.utils import create_feature_extractor

    from onestep.data import load_dataset
    from onestep.eval.features import register_feature_extractors
    from onestep.pipelines import load_pipeline

    register_feature_extractors()
    pipe = load_pipeline(tiny_run["pipeline"])
    fe = create_feature_extractor("onestep-digits", ["features"], cuda=False, verbose=False)
    data = load_dataset("digits", 8)

    class FakeRank:  # rank `rank` of `procs`; its gather records what it sends and returns `answers` in turn
        def __init__(self, rank, procs, answers=None):
            self.process_index, self.num_processes, self.device = rank, procs, "cpu"
            self.is_main_process, self.sent, self.answers = rank == 0, [], answers

        def gather(self, v):
            self.sent.append(v.clone())
            return self.answers.pop(0) if self.answers else torch.zeros(self.num_processes * len(v), v.shape[1])

    procs = 3
    for sampling, n, batch in (("index", 21, 5), ("trainer", 260, 250)):  # rank 2 idle in the last round
        def run(acc=None, n=n, sampling=sampling, batch=batch):
            return fid_cli.generated_features(pipe, fe, n, 1, sampling=sampling, batch_size=batch, data=data,
                                              accelerator=acc)["features"]

        ref = run()
        assert ref.shape == (n, 64)
        ranks = [FakeRank(r, procs) for r in range(procs)]
        for acc in ranks:
            run(acc)
        rounds = [torch.cat([acc.sent[k] for acc in ranks]) for k in range(len(ranks[0].sent))]
        assert torch.equal(run(FakeRank(0, procs, rounds)), ref), sampling


def test_inception_path_wired_end_to_end_offline(tiny_run, tmp_path, capsys, monkeypatch):
    """inception-v3-compat through the CLI with a weights file made here from random init (plumbing only), pipeline
    vs image folder, with KID, precision/recall and IS; nothing touches the network."""
    from PIL import Image
    from test_fid import _RandomInception

    empty, weights = tmp_path / "empty.pth", tmp_path / "inception-random.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    torch.save(_RandomInception("inception-v3-compat", ["2048"], str(empty)).state_dict(), weights)
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", no_network)
    result = _fid(capsys, tiny_run["pipeline"], ref, "-n", 10, "--inception-weights", weights, "--kid", "--prc",
                  "--isc", "--cache-dir", tmp_path / "cache")
    assert np.isfinite(result["fid"]) and result["fid"] > -1e-6
    assert all(np.isfinite(result[k]) for k in ("kid_mean", "precision", "recall", "isc_mean"))
    p = result["protocol"]
    assert p["extractor"] == "inception-v3-compat" and p["extractor_weights"] == str(weights)
    assert p["sampling"] == "index" and p["feature_layers"]["isc"] == "logits_unbiased"
    assert p["kid_subset_size"] == 10 and any("standard 50000" in note for note in p["notes"])
    assert "TF1-compatible bilinear to 299x299" in result["protocol_text"]


def test_one_line_errors(tiny_run, tmp_path, capsys, monkeypatch):
    assert "no such folder" in _error(capsys, tmp_path / "nope", "onestep:digits")
    (tmp_path / "empty").mkdir()
    assert "no .png/.jpg/.jpeg images" in _error(capsys, tmp_path / "empty", "onestep:digits")
    assert "name the dataset" in _error(capsys, tiny_run["pipeline"], "onestep:")
    assert "not images" in _error(capsys, tiny_run["pipeline"], "onestep:gaussian_grid")
    assert "--sampling trainer draws class labels" in _error(capsys, tiny_run["pipeline"], tiny_run["pipeline"],
                                                             "--sampling", "trainer", "-n", 4)
    assert "batches of 250" in _error(capsys, tiny_run["pipeline"], "onestep:digits", "--batch-size", 8)
    assert "--inception-weights" in _error(capsys, tiny_run["pipeline"], "onestep:digits", "--inception-weights",
                                           tmp_path / "w.pth")
    assert "no such file" in _error(capsys, tiny_run["pipeline"], tiny_run["pipeline"], "--inception-weights",
                                    tmp_path / "w.pth")
    assert "at least 2" in _error(capsys, tiny_run["pipeline"], "onestep:digits", "-n", 1)

    # a registered torch-fidelity dataset that is not on disk, offline
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    err = _error(capsys, tiny_run["pipeline"], "cifar10-val", "--extractor", "onestep-digits", "--datasets-root",
                 tmp_path / "datasets", "--no-cache")
    assert f"cifar10-val: torch-fidelity could not load it from {tmp_path / 'datasets'}" in err

    # Inception not cached and the download fails: one line naming the file, where it goes, and the option
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    err = _error(capsys, tiny_run["pipeline"], tiny_run["pipeline"], "-n", 4)
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert str(expected) in err and "--inception-weights PATH" in err and "URLError" in err


def test_script_is_the_same_command(tiny_run, tmp_path, capsys, monkeypatch):
    argv = [str(tiny_run["pipeline"]), "onestep:digits", "-n", "300", "--seed", str(tiny_run["seed"]), "--json",
            "--no-progress", "--cache-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [str(REPO / "scripts" / "fid.py"), *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "scripts" / "fid.py"), run_name="__main__")
    assert done.value.code == 0
    assert abs(json.loads(capsys.readouterr().out)["fid"] - tiny_run["fid"]) <= 1e-6 * tiny_run["fid"]


def test_several_seeds_give_mean_spread_and_each_value(tiny_run, tmp_path, capsys):
    """--seeds S: S draws at seeds SEED..SEED+S-1; the first equals a single run at SEED, the mean is reported."""
    args = (tiny_run["pipeline"], "onestep:digits", "-n", tiny_run["n"], "--seed", tiny_run["seed"], "--cache-dir",
            tmp_path / "cache")
    single = _fid(capsys, *args)
    other = _fid(capsys, *args[:5], int(tiny_run["seed"]) + 1, *args[6:])
    both = _fid(capsys, *args, "--seeds", 2)
    assert both["fid_per_seed"] == [single["fid"], other["fid"]] and both["seeds"][0] == int(tiny_run["seed"])
    assert both["fid"] == pytest.approx((single["fid"] + other["fid"]) / 2)
    assert both["fid_sd"] > 0 and "mean +- sd over 2 seeds" in both["protocol_text"]
