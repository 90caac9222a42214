"""Helper for the distributed tests: launch a recipe on two real CPU processes (gloo) and read back both ranks."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")


def launch_cpu_processes(args: list[str], num_processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` on `num_processes` CPU processes (gloo), one thread each; args: a script and its
    arguments, or -m MODULE ...; this checkout's onestep is imported. Asserts a zero exit."""
    tests = Path(__file__).parent
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def run_two_processes(recipe, out: Path, overrides: list[str]) -> list[dict]:
    launch_cpu_processes([str(WORKER), str(recipe), str(out), *overrides])
    return [load_file(out / f"rank{r}_of_2.safetensors") for r in (0, 1)]


def assert_ranks_identical(ranks: list[dict]) -> None:
    a, b = ranks
    assert not torch.equal(a.pop("first_rows"), b.pop("first_rows"))  # each rank trained on its own data
    assert float(a["generator_moved"]) > 0                            # the generator really trained
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key
