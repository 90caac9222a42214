"""Two real CPU processes (gloo) through `accelerate launch`: DDP keeps every rank's weights identical."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.parametrize("method", ["sid", "ui_fkl_gan"])
def test_two_cpu_processes_end_with_identical_parameters(tiny_teacher_dir, tmp_path, method):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(WORKER), tiny_teacher_dir, str(tmp_path), method]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}_of_2.safetensors") for r in (0, 1)]
    assert not torch.equal(ranks[0].pop("first_batch_labels"), ranks[1].pop("first_batch_labels"))  # own data
    assert float(ranks[0]["generator_moved"]) > 0  # the generator really trained
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert (tmp_path / "pipeline" / "model_index.json").is_file()  # the main process exported
