"""DD2 on the embedded auto-regressive digits teacher: FD and images/s of the teacher (full AR sampling), the DD2
one-step generator, and an independent-token baseline, measured in one run with one protocol.

    python bench/dd2.py                      # the finished run runs/dd2_digits16 (else the shipped pipeline)
    python bench/dd2.py -n 1000 --seeds 3 --json

Protocol (bench/methods.py's): n samples per seed with balanced class labels, Frechet distance in the project's
digits feature space (`onestep-digits`) against all 1797 16x16 digits, mean +- sd over seeds 1..S; images/s over the
same generation (batch 250, this process's threads), decoding included.

Rows:
* teacher: `AutoregressiveTeacher.sample` (n sequential steps with a KV cache, its folder's CFG / temperature /
  top-k), VQ-decoded;
* DD2: `DD2Pipeline` at 1 step (and at 2 and 3 refinement steps with --refine);
* independent tokens: every token drawn independently from the teacher's per-class per-position marginal, estimated
  from the teacher samples of seed 1 (the "set prediction" baseline DD2's motivating example rules out: right
  marginals, no correlations), VQ-decoded;
* VQ reconstruction of the data: the tokenizer's floor for every row.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from onestep.data import load_dataset
from onestep.data.labels import evaluation_inputs
from onestep.eval import frechet_distance
from onestep.resources import ASSETS, REPO_ROOT
from onestep.teachers_ar import AutoregressiveTeacher

TEACHER = ASSETS / "teachers" / "digits16_ar"
RUN = REPO_ROOT / "runs" / "dd2_digits16" / "pipeline"
SHIPPED = ASSETS / "pipelines" / "digits16_dd2"
PAPER_RATIO = 5.43 / 3.40   # DD2 (arXiv 2510.21003), VAR-d16 teacher vs one step on ImageNet 256


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@torch.no_grad()
def run_rows(teacher, pipe, data, n, seeds, refine=()):
    rows = {"teacher (AR, %d steps)" % teacher.seq_len: [], "DD2 one-step": [], "independent tokens": []}
    for s in refine:
        rows[f"DD2 {s}-step refinement"] = []
    seconds = {k: 0.0 for k in rows}
    counts = {k: 0 for k in rows}
    marginals = None
    k, names = teacher.num_codes, list(rows)
    for seed in seeds:
        images = {name: [] for name in rows}
        teacher_labels = []
        gen = torch.Generator().manual_seed(seed)
        batches = list(evaluation_inputs(data, pipe.noise_shape, n, seed))
        for noise, rows_ in batches:
            labels = data.labels[rows_]
            x, dt = _timed(lambda: teacher.decode(teacher.sample(labels, gen)))
            images[names[0]].append(x)
            seconds[names[0]] += dt
            teacher_labels.append(labels)
            x, dt = _timed(lambda: pipe.generate(noise, 1, class_labels=labels))
            images[names[1]].append(x)
            seconds[names[1]] += dt
            for s in refine:
                x, dt = _timed(lambda: pipe.generate(noise, s, class_labels=labels))
                images[f"DD2 {s}-step refinement"].append(x)
                seconds[f"DD2 {s}-step refinement"] += dt
            for name in rows:
                counts[name] += len(noise)
        if marginals is None:  # per-class per-position code frequencies of the teacher, from fresh teacher samples
            g2 = torch.Generator().manual_seed(10_000 + seed)
            labels = torch.cat(teacher_labels)
            toks = torch.cat([teacher.sample(labels[i:i + 250], g2) for i in range(0, len(labels), 250)])
            marginals = torch.zeros(teacher.num_classes, teacher.seq_len, k)
            for c in range(teacher.num_classes):
                sel = toks[labels == c]
                marginals[c] = torch.nn.functional.one_hot(sel, k).float().mean(0) if len(sel) else 1.0 / k
        g3 = torch.Generator().manual_seed(20_000 + seed)
        for _, rows_ in batches:
            labels = data.labels[rows_]

            def independent():
                p = marginals[labels].reshape(-1, k)
                return teacher.decode(torch.multinomial(p, 1, generator=g3).reshape(len(labels), -1))
            x, dt = _timed(independent)
            images[names[2]].append(x)
            seconds[names[2]] += dt
        for name in rows:
            rows[name].append(frechet_distance(torch.cat(images[name]).float(), data.x))
    return {name: {"fd": rows[name], "images_per_s": counts[name] / max(seconds[name], 1e-9)} for name in rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pipeline", default=None, help="a DD2Pipeline folder (default: the run, else shipped)")
    parser.add_argument("--teacher", default=str(TEACHER))
    parser.add_argument("--refine", action="store_true", help="also 2- and 3-step refinement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from onestep.pipelines import load_pipeline

    folder = Path(args.pipeline) if args.pipeline else (RUN if (RUN / "model_index.json").is_file() else SHIPPED)
    teacher = AutoregressiveTeacher.from_pretrained(args.teacher)
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    data = load_dataset("digits", 16)
    seeds = list(range(1, args.seeds + 1))
    t0 = time.perf_counter()
    results = run_rows(teacher, pipe, data, args.num_samples, seeds, (2, 3) if args.refine else ())
    with torch.no_grad():
        recon = teacher.decode(teacher.encode(data.x))
    floor = frechet_distance(recon, data.x)
    print(f"protocol: {args.num_samples} samples x seeds {seeds}, balanced labels, onestep-digits FD vs 1797 digits "
          f"(16x16); mean +- sd over seeds; images/s at batch 250, {torch.get_num_threads()} thread(s); "
          f"teacher {args.teacher}, DD2 {folder}")
    print(f"{'row':34} {'FD':>14} {'img/s':>9}")
    for name, row in results.items():
        sd = statistics.stdev(row["fd"]) if len(row["fd"]) > 1 else 0.0
        print(f"{name:34} {statistics.mean(row['fd']):>8.2f}+-{sd:<5.2f} {row['images_per_s']:>9.1f}")
    print(f"{'VQ reconstruction of the data':34} {floor:>8.2f}")
    names = list(results)
    teacher_fd, dd2_fd = (statistics.mean(results[n]["fd"]) for n in names[:2])
    speed = results[names[1]]["images_per_s"] / results[names[0]]["images_per_s"]
    print(f"one-step / teacher FD ratio: {dd2_fd / teacher_fd:.2f} (paper: 5.43 / 3.40 = {PAPER_RATIO:.2f}); "
          f"speed-up {speed:.1f}x; wall {time.perf_counter() - t0:.0f} s")
    if args.json:
        print(json.dumps({"rows": results, "vq_reconstruction_fd": floor, "ratio": dd2_fd / teacher_fd,
                          "speedup": speed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
