"""NitroFusion's head pool: what a head and a pool cost, and the peak memory of training with it.

    python bench/nitrofusion.py score runs/digits16_nitrofusion/pipeline   # FD at 1-4 steps of one export
    python bench/nitrofusion.py pool        # parameters and bytes per head / per pool: digits recipe (built) and
                                            # an SDXL-sized pool (480 heads on the paper's 10 encoder maps, computed)
    python bench/nitrofusion.py memory      # peak RSS of 2 training steps of the digits recipe, pool in place vs
                                            # pool_on_cpu (measured, each in a fresh process, one thread)

    python bench/nitrofusion.py fd          # bench/methods.py's protocol and rows, only the teacher (DDIM-50), the
                                            # initialisation and the NitroFusion rows: FD at 1-4 steps, the
                                            # ablation, images/s at 1 and 4 steps vs DDIM-50, in one process

The initialisation is the recipe's step-0 export (the generator is not updated during the 40 warm-up steps):
    onestep train recipes/digits16_nitrofusion.yaml --set train.steps=1 --set output_dir=runs/digits16_nitrofusion_step0

The same rows are in `python bench/methods.py` (all methods).
Training state of a pool parameter: fp32 weight + gradient + two AdamW moments = 16 B (the undrawn heads have no
gradient, so in steady state about 12 B/param plus 4 B for the drawn heads).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "digits16_nitrofusion.yaml"
INIT = Path("runs/digits16_nitrofusion_step0/pipeline")
STATE_BYTES = 16


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def digits_pool() -> dict:
    from onestep.networks import count_parameters
    from onestep.training.config import load_config
    from onestep.training.trainer import Trainer

    config = load_config(RECIPE, ["output_dir=/tmp/nitrofusion_pool_bench", "train.steps=1"])
    method = Trainer(config).method
    sizes = [count_parameters(method.pool[i]) for i in method.pool.index]
    return {"heads": len(sizes), "levels": method.layers, "params": sum(sizes), "per_head_min": min(sizes),
            "per_head_max": max(sizes), "drawn_per_step": len(method.config.tasks) * len(method.layers),
            "generator_params": count_parameters(method.gen)}


def sdxl_pool(width: int = 64) -> dict:
    """The paper's pool (3 tasks x 4 t* x 10 maps x 4 slots) on SDXL's encoder maps at 1024 px (latent 128): channels
    and sides of conv_in, the 2 resnets + downsampler of block 0, the 2 attentions + downsampler of block 1, the 2
    attentions of block 2, and the mid block; conditional heads project the 1280-d pooled text embedding."""
    from onestep.methods.nitrofusion import Head

    maps = [(320, 128), (320, 128), (320, 128), (320, 64), (640, 64), (640, 64), (640, 32), (1280, 32), (1280, 32),
            (1280, 32)]
    total, per = 0, []
    for task in ("global_cond", "local_cond", "local_uncond"):
        for channels, side in maps:
            side = side if task == "global_cond" else side // 2
            down = min(2, max(0, (side // 4).bit_length() - 1))
            with torch.device("meta"):
                head = Head(channels, width, down, None if task == "local_uncond" else "encoder_hidden_states", 1280)
            n = sum(p.numel() for p in head.parameters())
            per.append(n)
            total += n * 4 * 4  # 4 t* x 4 slots
    return {"heads": 480, "width": width, "params": total, "per_head_min": min(per), "per_head_max": max(per),
            "drawn_per_step": 30}


def cmd_pool(_args):
    rows = [("digits recipe (built)", digits_pool()), ("SDXL, paper's pool (computed)", sdxl_pool())]
    print("| pool | heads | params | per head | state (16 B/param) | drawn per step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        print(f"| {name} | {r['heads']} | {r['params']:,} | {r['per_head_min']:,}-{r['per_head_max']:,} | "
              f"{_mb(r['params'] * STATE_BYTES)} | {r['drawn_per_step']} |")
    print(json.dumps(rows, default=str))


def _measure(pool_on_cpu: bool) -> dict:
    code = f"""
import json, resource, torch
torch.set_num_threads(1)
from onestep.training.config import load_config
from onestep.training.trainer import Trainer
config = load_config({str(RECIPE)!r}, ["output_dir=/tmp/nitrofusion_mem_{int(pool_on_cpu)}", "train.steps=2",
    "train.checkpoint_every=1000", "train.sample_every=1000", "method.pool_on_cpu={str(pool_on_cpu).lower()}"])
import shutil; shutil.rmtree(config.output_dir, ignore_errors=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
trainer = Trainer(config)
built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
trainer.train()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"build_mb": (built - before) / 1024, "peak_mb": peak / 1024,
                  "train_growth_mb": (peak - built) / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def cmd_memory(_args):
    print("| pool | peak RSS | built | growth in 2 steps |")
    print("| --- | ---: | ---: | ---: |")
    for on_cpu in (False, True):
        r = _measure(on_cpu)
        print(f"| {'pool_on_cpu' if on_cpu else 'pool with the networks'} | {r['peak_mb']:.0f} MB | "
              f"{r['build_mb']:.0f} MB | {r['train_growth_mb']:.0f} MB |")


def cmd_fd(args):
    import statistics
    import time

    sys.path.insert(0, str(HERE))
    from methods import ROWS, _artifact, score

    from onestep.data import load_dataset
    from onestep.pipelines import load_pipeline

    data = load_dataset("digits", 16)
    seeds = list(range(1, args.seeds + 1))
    print(f"protocol: bench/methods.py's ({args.num_samples} samples x seeds {seeds}, balanced labels, onestep-digits "
          f"FD vs 1797 digits; images/s at batch 250, {torch.get_num_threads()} thread(s))")
    print("| row | NFE | FD (mean +- sd) | images/s | wall s |\n| --- | ---: | ---: | ---: | ---: |")
    init = [(f"nitrofusion initialisation (step-0 export), {n} step{'s' * (n > 1)}", INIT, n) for n in (1, 2, 3, 4)]
    for name, recipe, shipped, steps in ROWS[:1] + [(n, None, f, k) for n, f, k in init] + ROWS[1:]:
        if not name.startswith(("teacher", "nitrofusion")):
            continue
        folder, source = _artifact(recipe, shipped, False) if recipe else (shipped, "")
        if folder is None or not (Path(folder) / "model_index.json").is_file():
            source = source or f"missing {folder}: see this file's docstring"
            print(f"| {name} | {steps} | - | - | - ({source}) |")
            continue
        t0 = time.time()
        r = score(load_pipeline(folder), data, args.num_samples, seeds, steps)
        sd = statistics.stdev(r["fd"]) if len(r["fd"]) > 1 else 0.0
        print(f"| {name} | {steps} | {statistics.mean(r['fd']):.2f} +- {sd:.2f} | {r['images_per_s']:.1f} | "
              f"{time.time() - t0:.0f} |", flush=True)


def cmd_score(args):
    """FD at 1..max steps of one exported pipeline (bench/methods.py's protocol), without the teacher rows."""
    import statistics
    import time

    sys.path.insert(0, str(HERE))
    from methods import score

    from onestep.data import load_dataset
    from onestep.pipelines import load_pipeline

    data, pipe = load_dataset("digits", 16), load_pipeline(args.folder)
    seeds = list(range(1, args.seeds + 1))
    print(f"{args.folder}: {args.num_samples} samples x seeds {seeds}, onestep-digits FD")
    for steps in range(1, args.max_steps + 1):
        t0 = time.time()
        r = score(pipe, data, args.num_samples, seeds, steps)
        sd = statistics.stdev(r["fd"]) if len(r["fd"]) > 1 else 0.0
        print(f"| {steps} | {statistics.mean(r['fd']):.2f} +- {sd:.2f} | {time.time() - t0:.0f} s |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pool").set_defaults(run=cmd_pool)
    sub.add_parser("memory").set_defaults(run=cmd_memory)
    fd = sub.add_parser("fd")
    fd.add_argument("-n", "--num-samples", type=int, default=1000)
    fd.add_argument("--seeds", type=int, default=3)
    fd.set_defaults(run=cmd_fd)
    sc = sub.add_parser("score")
    sc.add_argument("folder")
    sc.add_argument("-n", "--num-samples", type=int, default=1000)
    sc.add_argument("--seeds", type=int, default=2)
    sc.add_argument("--max-steps", type=int, default=4)
    sc.set_defaults(run=cmd_score)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
