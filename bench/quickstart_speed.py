"""What makes the quickstart's training step cheaper on this CPU, measured side by side in one run.

Each variant builds the quickstart's own Trainer (recipes/quickstart_digits16.yaml plus the variant's settings) and
times full trainer steps; the variants are timed in interleaved rounds so drift of a shared machine hits them alike.

    python bench/quickstart_speed.py                      # the variants below, 1 and 2 threads
    python bench/quickstart_speed.py --threads 1 --rounds 5
    python bench/quickstart_speed.py --compile            # also torch.compile of the UNet's forward + backward
    python bench/quickstart_speed.py --passes --threads 1 # what one UNet pass costs, and a DMD step's sum of them

Variants, each against `default` (both off): channels-last weights (`train.channels_last`), the fake score trained on
the generator step's own samples (`method.fake_samples: generator_step`, DMD2's order, one generator forward less),
and both (what recipes/quickstart_digits16.yaml sets).
"""
import argparse
import json
import statistics
import tempfile
import time

import torch

from onestep.methods.base import batch_from_data
from onestep.resources import recipe_path
from onestep.training.config import load_config
from onestep.training.trainer import Trainer, _Context, step_generator

OFF = ["train.channels_last=false", "method.fake_samples=fresh"]  # the recipe's earlier settings
VARIANTS = {
    "default": OFF,
    "channels_last": [*OFF, "train.channels_last=true"],
    "fake_on_generator_samples": [*OFF, "method.fake_samples=generator_step"],
    "both": ["train.channels_last=true", "method.fake_samples=generator_step"],  # the recipe today
}


def make_step(settings: list[str], out: str, batch: int):
    config = load_config(recipe_path("quickstart_digits16.yaml"),
                         [f"output_dir={out}", f"train.batch_size={batch}", "eval.enabled=false", *settings])
    trainer = Trainer(config)
    method, data, count = trainer.method, trainer.data, [0]

    def step():
        rng = step_generator(0, count[0], 0, "cpu")
        rows = torch.randint(len(data), (batch,), generator=rng)
        method.step(batch_from_data(data, rows), _Context(trainer, count[0], rng))
        trainer.ema.step(trainer.modules["generator"].parameters())
        count[0] += 1
    return step


def compile_check(repeats: int) -> dict:
    """torch.compile of the digits UNet's forward + backward: compile seconds against the per-pass saving."""
    from diffusers import UNet2DModel

    from onestep.resources import DIGITS_TEACHER

    unet = UNet2DModel.from_pretrained(DIGITS_TEACHER / "unet")
    x, t, y = torch.randn(64, 1, 16, 16), torch.full((64,), 440.0), torch.randint(10, (64,))

    def pass_of(model):
        return lambda: model(x, t, class_labels=y).sample.square().mean().backward()

    eager = pass_of(unet)
    compiled_model = torch.compile(unet)
    start = time.perf_counter()
    pass_of(compiled_model)()
    compile_s = time.perf_counter() - start
    times = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for name, fn in (("eager", eager), ("compiled", pass_of(compiled_model))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    eager_ms, compiled_ms = (1000 * statistics.median(times[k]) for k in ("eager", "compiled"))
    return {"compile_s": round(compile_s, 1), "eager_pass_ms": round(eager_ms, 1),
            "compiled_pass_ms": round(compiled_ms, 1), "passes_to_repay_compile":
            round(1000 * compile_s / max(eager_ms - compiled_ms, 1e-9)) if eager_ms > compiled_ms else None}


def passes_check(batch: int, repeats: int) -> dict:
    """The shipped digits UNet (channels-last, as the recipe runs it): forward without gradient and forward +
    backward, median ms; a quickstart (DMD) step is 2 of each: the generator's and the fake score's update, and
    the teacher's and the fake score's forward for the direction."""
    from diffusers import UNet2DModel

    from onestep.resources import DIGITS_TEACHER

    unet = UNet2DModel.from_pretrained(DIGITS_TEACHER / "unet").to(memory_format=torch.channels_last)
    x, t, y = torch.randn(batch, 1, 16, 16), torch.full((batch,), 440.0), torch.randint(10, (batch,))

    def forward():
        with torch.no_grad():
            unet(x, t, class_labels=y)

    def forward_backward():
        unet(x, t, class_labels=y).sample.square().mean().backward()

    from train_step import timed  # bench/ is on sys.path when run as a script

    ms = {"forward_ms": round(1000 * timed(forward, repeats), 1),
          "forward_backward_ms": round(1000 * timed(forward_backward, repeats), 1)}
    return {**ms, "dmd_step_sum_ms": round(2 * ms["forward_ms"] + 2 * ms["forward_backward_ms"], 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads to compare")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps timed per variant per round")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants (default: all; 'default' is always included as the reference)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--passes", action="store_true", help="only time one UNet forward and forward + backward "
                        "per thread count (what a step is made of), then exit")
    args = parser.parse_args()
    if args.passes:
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(json.dumps({"threads": threads, "batch": args.batch,
                              **passes_check(args.batch, args.rounds * args.steps)}), flush=True)
        return

    results = {}
    with tempfile.TemporaryDirectory() as out:
        chosen = ["default", *(v for v in args.variants if v != "default")]
        steps = {name: make_step(VARIANTS[name], f"{out}/{name}", args.batch) for name in chosen}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for step in steps.values():  # warm-up at this thread count
                step()
            times = {name: [] for name in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times[name].append((time.perf_counter() - start) / args.steps)
            base = statistics.median(times["default"])
            results[f"threads_{threads}"] = {
                name: {"step_ms": round(1000 * statistics.median(v), 1),
                       "speedup": round(base / statistics.median(v), 3)} for name, v in times.items()}
            print(json.dumps({"threads": threads, **results[f"threads_{threads}"]}), flush=True)
    if len(args.threads) > 1:
        lo, hi = min(args.threads), max(args.threads)
        print(json.dumps({f"{hi}_threads_over_{lo}": {
            name: round(results[f"threads_{lo}"][name]["step_ms"] / results[f"threads_{hi}"][name]["step_ms"], 3)
            for name in steps}}))
    if args.compile:
        torch.set_num_threads(max(args.threads))
        print(json.dumps({"threads": max(args.threads), "torch_compile": compile_check(args.rounds * args.steps)}))


if __name__ == "__main__":
    main()
