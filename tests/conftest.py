"""Shared fixtures: tiny teachers built from config (random weights, a few hundred KB, nothing downloaded)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


from tiny_teachers import tiny_unet  # noqa: E402,F401  (re-exported for the tests)


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
