"""Overhead of onestep's Uni-Instruct step: the full trainer step over the summed time of its network passes
timed bare (the same UNet calls with no denoiser wrapper, loss, optimizer or trainer around them).

    python bench/train_step.py                       # shipped digits teacher, batch 64, SiD loss
    python bench/train_step.py --loss ui --divergence fkl --batch 64

A ratio near 1 means the framework adds little; the passes themselves are the cost.
"""
import argparse
import json
import statistics
import tempfile
import time

import torch

from onestep.resources import DIGITS_TEACHER
from onestep.training.config import config_from_dict
from onestep.training.trainer import Trainer, _Context, step_generator
from onestep.methods.base import batch_from_data


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(DIGITS_TEACHER))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loss", default="sid", choices=["sid", "ui", "dmd"])
    parser.add_argument("--divergence", default="rkl")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        config = config_from_dict({"teacher": args.teacher, "output_dir": out, "data": {"name": "digits"},
                                   "method": {"name": "uni_instruct", "loss": args.loss, "divergence": args.divergence},
                                   "train": {"batch_size": args.batch}, "eval": {"enabled": False}})
        trainer = Trainer(config)
        method, data = trainer.method, trainer.data
        step = [0]

        def full_step():
            rng = step_generator(0, step[0], 0, "cpu")
            batch = batch_from_data(data, torch.randint(len(data), (args.batch,), generator=rng))
            method.step(batch, _Context(trainer, 10_000 + step[0], rng))
            trainer.ema.step(method.gen.parameters())
            step[0] += 1

        unet_g, unet_f, unet_t = method.gen.denoiser.model, method.fake.denoiser.model, method.denoiser.model
        x = torch.randn(args.batch, *method.sample_shape)
        t = torch.full((args.batch,), 440.0)
        labels = torch.randint(10, (args.batch,))

        def bare_passes():
            with torch.no_grad():                                  # (A) generator sample, detached
                unet_g(x, t, class_labels=labels)
            unet_f(x, t, class_labels=labels).sample.sum().backward()  # (A) fake score DSM
            unet_f.requires_grad_(False)
            x_t = unet_g(x, t, class_labels=labels).sample           # (B) generator -> teacher and fake
            loss = unet_t(x_t, t, class_labels=labels).sample.sum() + unet_f(x_t, t, class_labels=labels).sample.sum()
            loss.backward()
            unet_f.requires_grad_(True)

        t_step = timed(full_step, args.repeats)
        t_bare = timed(bare_passes, args.repeats)
    print(json.dumps({"threads": torch.get_num_threads(), "batch": args.batch, "loss": args.loss,
                      "step_ms": round(1000 * t_step, 1), "bare_passes_ms": round(1000 * t_bare, 1),
                      "overhead_ratio": round(t_step / t_bare, 3)}))


if __name__ == "__main__":
    main()
