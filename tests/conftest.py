"""Shared fixtures: tiny teachers built from config (random weights, a few hundred KB, nothing downloaded)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def tiny_unet(sample_size=8, channels=1, num_classes=10, seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_classes)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A class-conditional 8x8 DDPM teacher folder (matches `digits` at resolution 8)."""
    from diffusers import DDPMScheduler

    from onestep.methods.dsm import save_teacher_folder

    path = tmp_path_factory.mktemp("teacher") / "tiny_unet"
    save_teacher_folder(tiny_unet(), DDPMScheduler(beta_schedule="linear", clip_sample=False), path)
    return str(path)


def tiny_run_config(teacher, out, steps=4, **method):
    from onestep.training.config import config_from_dict

    return config_from_dict({
        "seed": 0, "output_dir": str(out), "teacher": teacher, "data": {"name": "digits", "resolution": 8},
        "method": {"name": "uni_instruct", **method},
        "train": {"steps": steps, "batch_size": 4, "checkpoint_every": 2, "sample_every": 1000, "log_every": 1,
                  "num_sample_images": 4, "keep_checkpoints": 10},
        "eval": {"enabled": False}})
