"""GPU check (<= 8 minutes): a short bf16 distillation of a CIFAR-size UNet, then one-step vs 50-step DDIM
throughput on the same card, printed as ratios.

    bash bench/gpu_check.sh            # or: python bench/gpu_check.py --steps 200

The teacher is google/ddpm-cifar10-32's architecture (UNet2DModel, 35.7 M parameters) with random weights built
from its config (nothing downloaded): the timings depend on the architecture, not on the weights.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import REAL  # noqa: E402  (the published configs)

from onestep.methods.dsm import save_teacher_folder  # noqa: E402
from onestep.training.config import config_from_dict  # noqa: E402
from onestep.training.trainer import Trainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="distillation steps (bf16)")
    parser.add_argument("--batch", type=int, default=64, help="distillation batch")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test this script without a GPU")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        sys.exit("gpu_check: no CUDA device; this script measures the GPU paths")
    root = Path(tempfile.mkdtemp())
    _, unet_config = REAL["ddpm_cifar10"]
    save_teacher_folder(UNet2DModel(**unet_config), DDPMScheduler(), root / "teacher")
    config = config_from_dict({
        "output_dir": str(root / "run"), "teacher": {"path": str(root / "teacher"), "dtype": "bfloat16"},
        "data": {"name": "digits", "resolution": 32, "channels": 3},
        "method": {"name": "uni_instruct", "loss": "sid", "generator_optimizer": {"lr": 1e-5},
                   "fake_optimizer": {"lr": 1e-5}},
        "train": {"steps": args.steps, "batch_size": args.batch, "mixed_precision": "bf16",
                  "checkpoint_every": args.steps, "sample_every": args.steps, "log_every": 20},
        "eval": {"enabled": False}})
    trainer = Trainer(config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "distill_steps": args.steps, "batch": args.batch,
                      "ms_per_step": round(1000 * result["train_seconds"] / args.steps, 1),
                      "skipped_updates": result["skipped_updates"], "run_wall_s": round(wall, 1),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}))
    batch = "256" if cuda else "4"
    sys.argv = [sys.argv[0], "--teacher", str(root / "teacher"), "--batch", batch, "--dtype", "bfloat16",
                "--repeats", "3" if cuda else "1"]
    import sampling

    sampling.main()


if __name__ == "__main__":
    main()
