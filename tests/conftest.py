"""Shared fixtures: tiny teachers built from config (random weights, a few hundred KB, nothing downloaded)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


from tiny_teachers import tiny_unet  # noqa: E402,F401  (re-exported for the tests)


# The start of a `python -I` script in which onestep is as good as not installed: `python -I` drops PYTHONPATH, the
# user site and the cwd; onestep's editable install is a meta-path finder (from a .pth file) and a regular install a
# folder in site-packages, and a finder placed first that refuses `onestep` hides both.
_WITHOUT_ONESTEP = r'''
import importlib.abc, json, sys

class HideOnestep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "onestep":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, HideOnestep())
import torch, diffusers
'''


def run_without_onestep(script: str, cases: list, cwd) -> subprocess.CompletedProcess:
    """`script` (after imports of torch and diffusers, `sys.argv[1]` = the JSON `cases`) in a fresh `python -I` with
    onestep hidden, offline, on one thread: the plain-diffusers tests. Fails on a non-zero exit and on diffusers'
    config warnings ("... are not expected" / "... ignored", on stderr)."""
    run = subprocess.run([sys.executable, "-I", "-c", _WITHOUT_ONESTEP + script, json.dumps(cases)], cwd=cwd,
                         capture_output=True, text=True, timeout=600,
                         env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(Path(cwd) / "hf"), "PATH": "/usr/bin:/bin",
                              "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not expected" not in run.stderr and "ignored" not in run.stderr, run.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A class-conditional 8x8 DDPM teacher folder (matches `digits` at resolution 8)."""
    from diffusers import DDPMScheduler

    from onestep.methods.dsm import save_teacher_folder

    path = tmp_path_factory.mktemp("teacher") / "tiny_unet"
    save_teacher_folder(tiny_unet(), DDPMScheduler(beta_schedule="linear", clip_sample=False), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_teacher_dir, tmp_path_factory):
    """A onestep export (OneStepPipeline folder) of the tiny teacher's network at sigma_init 2.5: what a finished
    run writes, as the frozen base of a later stage."""
    from onestep.denoisers import load_teacher
    from onestep.generators import OneStepGenerator
    from onestep.pipelines import OneStepPipeline

    path = tmp_path_factory.mktemp("export") / "pipeline"
    teacher = load_teacher(tiny_teacher_dir)
    OneStepPipeline.from_generator(OneStepGenerator(teacher, 2.5), teacher.scheduler,
                                   {"teacher": tiny_teacher_dir, "method": "none (the teacher at sigma_init)"}
                                   ).save_pretrained(path)
    return str(path)


def tiny_run_config(teacher, out, steps=4, **method):
    from onestep.training.config import config_from_dict

    return config_from_dict({
        "seed": 0, "output_dir": str(out), "teacher": teacher, "data": {"name": "digits", "resolution": 8},
        "method": {"name": "uni_instruct", **method},
        "train": {"steps": steps, "batch_size": 4, "checkpoint_every": 2, "sample_every": 1000, "log_every": 1,
                  "num_sample_images": 4, "keep_checkpoints": 10},
        "eval": {"enabled": False}})


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, restored after: results that must match a one-thread subprocess bit for
    bit, and CPU-heavy tests that should not fight the other jobs on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ar_teacher_dir(tmp_path_factory):
    """A class-conditional (10 classes) auto-regressive teacher folder built from config (random weights): a 2-layer
    GPT-2 over the 16 codes of a 1x8x8 -> 4x4 VQModel (matches `digits` at resolution 8); for DD2's tests."""
    from diffusers import VQModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from onestep.teachers_ar import AutoregressiveTeacher

    torch.manual_seed(0)
    vq = VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                 latent_channels=4, num_vq_embeddings=16, norm_num_groups=4, sample_size=8)
    vocab = 16 + 10 + 1
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=17, n_embd=32, n_layer=2, n_head=4,
                                    bos_token_id=vocab - 1, eos_token_id=vocab - 1))
    path = tmp_path_factory.mktemp("ar_teacher") / "tiny_ar"
    AutoregressiveTeacher(lm, vq, 10, [4, 4]).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def method_teachers(tiny_teacher_dir, tiny_export_dir, tiny_ar_teacher_dir):
    """A tiny folder of each teacher kind a method may declare (the contract, two-process and crash tests)."""
    return {"diffusion": tiny_teacher_dir, "one_step": tiny_export_dir, "autoregressive": tiny_ar_teacher_dir,
            "latents": tiny_teacher_dir, "none": None}
