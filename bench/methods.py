"""One comparison of every method on the embedded digits teacher, measured in one run with one protocol.

    python bench/methods.py                 # score the finished runs (or the shipped exports) of each row
    python bench/methods.py --train         # first train the rows whose run is missing (minutes to an hour each)
    python bench/methods.py --seeds 3 -n 1000 --json
    python bench/methods.py --only slimflow,plain,sid   # a subset of the rows (names containing these words)

Each row is one method's digits recipe. Its artifact is read from the run's `pipeline/` (output_dir of the recipe) when
that run finished, else from the shipped copy named in ROWS, else trained with --train. Every artifact is loaded
through `onestep.pipelines.load_pipeline` and sampled through the generate protocol, so a new method's row needs no
new code here: add its recipe to ROWS.

Protocol (the same for students and teacher): n samples per seed with balanced class labels (n/10 per digit,
`onestep.data.labels.evaluation_inputs`), Frechet distance in the project's digits feature space (`onestep-digits`,
torch-fidelity; not Inception, so comparable only with numbers from this extractor) against all 1797 digits; mean and
spread (sample standard deviation) over seeds 1..S. Images/s is measured on the same generation (batch 250, this
process's threads). The teacher row is the shipped DDPM teacher sampled with DDIM-50 (TeacherPipeline).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from onestep.data import load_dataset
from onestep.data.labels import evaluation_inputs
from onestep.eval import frechet_distance
from onestep.networks import count_parameters
from onestep.pipelines import load_pipeline
from onestep.resources import ASSETS, DIGITS_TEACHER, RECIPES

# (row name, recipe, shipped artifact used when the recipe's run is not there, inference steps)
ROWS = [
    ("teacher (dsm, DDIM-50)", RECIPES / "pretrain_digits16.yaml", DIGITS_TEACHER, 50),
    ("uni_instruct dmd, 300 steps (quickstart)", RECIPES / "quickstart_digits16.yaml", None, 1),
    ("uni_instruct sid, 2000 steps", RECIPES / "digits16_sid.yaml", ASSETS / "pipelines" / "digits16", 1),
    # NitroFusion, started from the teacher's weights: one model at 1-4 steps, then the ablation (equal steps) at 1
    # and 4; its initialisation on the same grid: python bench/nitrofusion.py fd (docs/nitrofusion.md sec. 6)
    *[(f"nitrofusion pool+refresh, 300 steps, {n} step{'s' * (n > 1)}", RECIPES / "digits16_nitrofusion.yaml", None, n)
      for n in (1, 2, 3, 4)],
    *[(f"nitrofusion {kind}, {n} step{'s' * (n > 1)}", RECIPES / f"digits16_nitrofusion_{recipe}.yaml",
       None, n) for kind, recipe in (("one fixed head, 300 steps", "fixed_head"),
                                     ("pool, no refresh, 300 steps", "no_refresh"))
      for n in (1, 4)],
    # SlimFlow (docs/slimflow.md): students with 0.245x the teacher's parameters; pairs first (recipe headers)
    ("slimflow stage 1: annealed 2-RF, Euler-1", RECIPES / "digits16_slimflow_reflow.yaml", None, 1),
    ("plain reflow 2-RF (ablation), Euler-1", RECIPES / "digits16_plainflow_reflow.yaml", None, 1),
    ("slimflow: anneal + guided distill", RECIPES / "digits16_slimflow.yaml", None, 1),
    ("plain reflow + pair distill (ablation)", RECIPES / "digits16_plainflow.yaml", None, 1),
    # One More Step in front of the flawed digits_brightness teacher (empty OMS prompt; the brightness numbers with
    # and without OMS: python bench/oms_brightness.py)
    ("oms + flawed teacher (DDIM-20)", RECIPES / "digits16_oms.yaml", ASSETS / "pipelines" / "digits16_oms", 20),
    # DD2 distils the AR teacher assets/teachers/digits16_ar, not the DDPM one (its teacher and the
    # independent-token baseline: python bench/dd2.py); stage 1 first: onestep train recipes/dd2_digits16_gts.yaml
    ("dd2 one-step (AR teacher digits16_ar)", RECIPES / "dd2_digits16.yaml", ASSETS / "pipelines" / "digits16_dd2", 1),
]
# NCT (recipes/digits16_nct_*.yaml) adds controls to the shipped generator rather than distilling one; its table
# (control consistency and FD of the base, NCT and the regression baseline, per control) is `python bench/nct.py`.


def _output_dir(recipe: Path) -> Path:
    from onestep.training.config import load_config

    return Path(load_config(recipe).output_dir)


def _artifact(recipe: Path, shipped, train: bool):
    """(pipeline folder, where it came from) for a row, training it first when asked and missing."""
    run = _output_dir(recipe) / "pipeline"
    if (run / "model_index.json").is_file():
        return run, f"finished run {run}"
    if shipped is not None:
        return Path(shipped), f"shipped {shipped}"
    if train:
        subprocess.run([sys.executable, "-m", "onestep", "train", str(recipe)], check=True)
        return run, f"trained now: {run}"
    return None, f"no run (train it: onestep train {recipe}, or pass --train)"


@torch.no_grad()
def score(pipe, data, n: int, seeds: list[int], steps: int) -> dict:
    """FD per seed, and images/s over all generated batches."""
    fds, seconds, count = [], 0.0, 0
    for seed in seeds:
        images = []
        for noise, rows in evaluation_inputs(data, pipe.noise_shape, n, seed):
            labels = data.labels[rows] if pipe.num_classes else None
            t0 = time.perf_counter()
            images.append(pipe.generate(noise, steps, class_labels=labels).float().cpu())
            seconds += time.perf_counter() - t0
            count += len(noise)
        fds.append(frechet_distance(torch.cat(images), data.x))
    return {"fd": fds, "images_per_s": count / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-samples", type=int, default=1000, help="samples per seed (default 1000)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..S (default 3)")
    parser.add_argument("--train", action="store_true", help="train rows whose run is missing")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    parser.add_argument("--only", type=lambda v: [w for w in v.split(",") if w], default=None, metavar="WORDS",
                        help="score only rows whose name contains one of these comma-separated words, e.g. "
                             "--only slimflow,plain,sid (the teacher row, ~20 min of DDIM-50, only if named)")
    args = parser.parse_args(argv)
    if args.num_samples < 2 or args.seeds < 1:
        parser.error("-n must be >= 2 and --seeds >= 1")
    data = load_dataset("digits", 16)
    seeds = list(range(1, args.seeds + 1))
    rows, teacher_fd = [], None
    for name, recipe, shipped, steps in ROWS:
        if args.only and not any(word in name for word in args.only):
            continue
        folder, source = _artifact(recipe, shipped, args.train)
        row = {"method": name, "source": source, "command": f"onestep train {recipe.relative_to(RECIPES.parent)}"}
        if folder is not None:
            pipe = load_pipeline(folder)
            network = getattr(pipe, "network", None)
            card = pipe.card
            row.update(params=count_parameters(network) if network is not None else None, nfe=steps,
                       train_s=card.get("train_seconds"), **score(pipe, data, args.num_samples, seeds, steps))
            if name.startswith("teacher"):
                teacher_fd = row["fd"]
        rows.append(row)
    print(f"protocol: {args.num_samples} samples x seeds {seeds}, balanced labels, onestep-digits FD vs 1797 digits "
          f"(16x16); mean +- sd over seeds; images/s at batch 250, {torch.get_num_threads()} threads")
    print(f"{'method':44} {'params':>9} {'NFE':>4} {'student FD':>15} {'teacher FD':>15} {'img/s':>8} "
          f"{'train s':>8}  command")
    for row in rows:
        if "fd" not in row:
            print(f"{row['method']:44} {'-':>9} {'-':>4} {'-':>15} {'-':>15} {'-':>8} {'-':>8}  {row['source']}")
            continue
        fd = f"{statistics.mean(row['fd']):.2f}+-{statistics.stdev(row['fd']) if len(row['fd']) > 1 else 0:.2f}"
        tfd = (f"{statistics.mean(teacher_fd):.2f}+-{statistics.stdev(teacher_fd) if len(teacher_fd) > 1 else 0:.2f}"
               if teacher_fd else "-")
        train = f"{row['train_s']:.0f}" if row.get("train_s") else "-"
        print(f"{row['method']:44} {row['params'] or 0:>9,} {row['nfe']:>4} {fd:>15} {tfd:>15} "
              f"{row['images_per_s']:>8.1f} {train:>8}  {row['command']}")
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
