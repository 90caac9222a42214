"""Hallucination scores on Simple Shapes (Aithal et al., NeurIPS 2024, arXiv 2406.09358, section 4 / Fig. 1).

    OMP_NUM_THREADS=1 python bench/hallucination_shapes.py [--out runs/hallucination_shapes] [--samples 1000]

1. Train (or reuse, from OUT/teacher/pipeline) the small unconditional DDPM teacher of recipes/pretrain_shapes32.yaml
   (`onestep pretrain --data shapes`): UNet2DModel (16, 32, 64), T = 1000 linear betas, 32x32 Simple Shapes (the
   paper's 64x64 images area-averaged; 64x64 does not train in minutes on one CPU thread).
2. Sample --samples images with diffusers' own `DDPMPipeline` (ancestral DDPM, --sample-steps steps) inside
   `HalMonitor`. The paper's window is the last K = 10 of T = 1000 steps; with a 100-step sampler the last 10
   steps (t = 90 ... 0) cover the same last 10 % of the trajectory, while t <= 9 would hold a single step. The
   table also shows the last 5 % and 20 %.
3. Score the same samples with the one-step probe (`probe_filter`: re-noise to the teacher's last 5 levels, 4 draws,
   denoise with the teacher): what OneStepPipeline(hallucination_filter=...) and `onestep sample --filter` do.
4. Label with `shapes_labeller` after bilinear upsampling to 64x64 (on training images this gives no false
   hallucination; its pixel-count "artifact" ranges are for native 64x64 shapes, so artifacts are only indicative).

Prints: hallucination rate, AUROC and the fraction of hallucinations removed at the threshold that keeps 96 % of
the other samples, for each score and for a no-model baseline (foreground pixel count: a hallucination has more
foreground), on all samples and on controls that take the easy cases away (no blank samples; a stricter label;
only samples with >= 2 components), and wall times. Writes OUT/extremes.png (lowest / highest scoring samples,
hallucinations framed red). The teacher, the samples and the scores are cached under OUT: a rerun only prints.
Single-threaded on purpose (shared CPUs). Fixed seeds throughout.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from onestep.data.datasets import load_shapes
from onestep.data.shapes import IMAGE_SIZE, shapes_labeller
from onestep.denoisers import load_teacher
from onestep.resources import pretrain_recipe
from onestep.sampling.hallucination import HalFilter, HalMonitor, LastK, hal_score, probe_filter

RETENTION = 0.96
BATCH = 100
WINDOWS = (0.05, 0.10, 0.20)  # fractions of the sampler's steps scored by the trajectory score; 0.10 is the default


def train_teacher(out: Path, steps: int | None) -> tuple[Path, float, str]:
    """(teacher folder, training seconds, description); trained once, then reused."""
    from onestep.training.config import load_config
    from onestep.training.trainer import Trainer

    folder, facts = out / "teacher" / "pipeline", out / "teacher" / "bench.json"
    if (folder / "model_index.json").is_file() and facts.is_file():
        saved = json.loads(facts.read_text())
        return folder, saved["seconds"], saved["description"] + " (cached)"
    overrides = [f"output_dir={out / 'teacher'}"] + ([f"train.steps={steps}"] if steps else [])
    config = load_config(pretrain_recipe("shapes"), overrides)
    started = time.perf_counter()
    Trainer(config).train()
    seconds = time.perf_counter() - started
    model = config.method.model
    description = (f"UNet2DModel {tuple(model['block_out_channels'])}, unconditional, {config.train.steps} steps x "
                   f"batch {config.train.batch_size}, lr {config.method.optimizer.lr}, EMA {config.ema.decay}, "
                   f"{config.data.resolution}x{config.data.resolution}")
    facts.write_text(json.dumps({"seconds": seconds, "description": description}) + "\n")
    return folder, seconds, description


def sample(teacher_dir: Path, out: Path, n: int, steps: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(samples [N, 1, R, R] in [-1, 1], last-20 % x0 window [K, N, 1, R, R], seconds) of DDPMPipeline."""
    from diffusers import DDPMPipeline

    k = max(2, round(max(WINDOWS) * steps))
    path = out / f"samples-n{n}-steps{steps}.safetensors"
    if path.is_file():
        saved = load_file(path)
        return saved["x"], saved["window"], float(saved["seconds"])
    teacher = load_teacher(str(teacher_dir))
    pipe = DDPMPipeline(unet=teacher.model, scheduler=type(teacher.scheduler).from_config(teacher.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    started, images = time.perf_counter(), []
    with HalMonitor(pipe, window=LastK(k)) as monitor:
        for start in range(0, n, BATCH):
            images.append(pipe(batch_size=min(BATCH, n - start), num_inference_steps=steps, generator=generator,
                               output_type="np").images)
            print(f"  sampled {start + len(images[-1])}/{n} ({time.perf_counter() - started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    x = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2) * 2 - 1  # the pipeline's [0, 1] -> [-1, 1]
    window = torch.cat([run.x0 for run in monitor.recorder.trajectories()], dim=1)
    save_file({"x": x.contiguous(), "window": window.contiguous(), "seconds": torch.tensor(seconds)}, path)
    return x, window, seconds


def probe(teacher_dir: Path, out: Path, x: torch.Tensor, tag: str) -> tuple[torch.Tensor, float]:
    """One-step probe scores of the samples (teacher denoiser, default levels) and seconds; cached."""
    path = out / f"probe-{tag}.safetensors"
    if path.is_file():
        saved = load_file(path)
        return saved["scores"], float(saved["seconds"])
    teacher = load_teacher(str(teacher_dir))
    generator = torch.Generator().manual_seed(11)
    started = time.perf_counter()
    scores = torch.cat([probe_filter(x[i:i + BATCH], teacher, HalFilter(quantile=1.0), generator).scores
                        for i in range(0, len(x), BATCH)])
    seconds = time.perf_counter() - started
    save_file({"scores": scores.contiguous(), "seconds": torch.tensor(seconds)}, path)
    return scores, seconds


def label(x: torch.Tensor) -> dict[str, np.ndarray]:
    """shapes_labeller on the samples upsampled (bilinear) to the labeller's 64x64."""
    if x.shape[-1] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return shapes_labeller(x.clamp(-1, 1))


def strict_hallucinations(x: torch.Tensor, min_pixels: int = 16) -> np.ndarray:
    """A stricter label for a robustness check: some strip holds >= 2 components of >= `min_pixels` pixels each at
    64x64 (a drawn shape has 60-72), so speckles of a noisy background do not count."""
    from scipy import ndimage

    from onestep.data.shapes import LABEL_THRESHOLD, STRIP_COLUMNS

    if x.shape[-1] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    foreground = ((x.clamp(-1, 1)[:, 0] + 1) * 127.5).round().numpy() > LABEL_THRESHOLD
    out = np.zeros(len(x), dtype=bool)
    for i, image in enumerate(foreground):
        for lo, hi in STRIP_COLUMNS:
            parts, _ = ndimage.label(image[:, lo:hi], structure=np.ones((3, 3), dtype=bool))
            sizes = np.bincount(parts.ravel())[1:]
            out[i] |= int((sizes >= min_pixels).sum()) >= 2
    return out


def separation(scores: torch.Tensor, hallucinated: torch.Tensor) -> tuple[float, float]:
    """(AUROC, fraction of hallucinations removed at the threshold keeping 96 % of the other samples)."""
    scores = scores.double()
    tau = torch.quantile(scores[~hallucinated], RETENTION)
    return roc_auc_score(hallucinated.numpy(), scores.numpy()), float((scores[hallucinated] > tau).double().mean())


def extremes_png(x: torch.Tensor, hallucinated: torch.Tensor, rows: list[tuple[str, torch.Tensor]], path: Path,
                 per_row: int = 16):
    """For each score: its `per_row` lowest and highest samples, hallucinations (by the labeller) framed red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    n, _, height, width = x.shape
    border = torch.full((n, 3), 0.35)
    border[hallucinated] = torch.tensor([1.0, 0.0, 0.0])
    rgb = border[:, :, None, None].expand(n, 3, height + 2, width + 2).clone()
    rgb[:, :, 1:-1, 1:-1] = ((x.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)
    panels = []
    for name, scores in rows:
        order = torch.argsort(scores)
        panels += [(f"{name}: lowest {per_row}", order[:per_row]), (f"{name}: highest {per_row}", order[-per_row:])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(per_row * 0.7, len(panels) * 1.0), dpi=110)
    for ax, (title, idx) in zip(np.atleast_1d(axes), panels):
        ax.imshow(make_grid(rgb[idx], nrow=per_row, padding=1, pad_value=1.0).permute(1, 2, 0).numpy(),
                  interpolation="nearest")
        ax.set_title(f"{title} ({int(hallucinated[idx].sum())} hallucinated, red)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hallucination_shapes"))
    parser.add_argument("--samples", type=int, default=1000, help="images sampled from the teacher")
    parser.add_argument("--sample-steps", type=int, default=100, help="ancestral DDPM steps (of T = 1000)")
    parser.add_argument("--train-steps", type=int, default=None, help="teacher training steps (default: recipe's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    teacher_dir, train_s, description = train_teacher(args.out, args.train_steps)
    x, window, sample_s = sample(teacher_dir, args.out, args.samples, args.sample_steps)
    probe_scores, probe_s = probe(teacher_dir, args.out, x, f"n{args.samples}-steps{args.sample_steps}")
    labels = label(x)
    hallucinated = torch.from_numpy(labels["hallucinated"])
    real = load_shapes(x.shape[-1], 1000, seed=1).x
    false_rate = label(real)["hallucinated"].mean()

    rows = []
    for fraction in WINDOWS:
        k = max(2, round(fraction * args.sample_steps))
        default = " (default)" if fraction == 0.10 else ""
        rows.append((f"trajectory, last {k} of {args.sample_steps} steps{default}",
                     hal_score(window, LastK(k))))
    rows.append(("one-step probe (teacher, last-5 levels x4)", probe_scores))
    pixels = torch.from_numpy(labels["pixels"].sum(axis=1)).double()
    rows.append(("probe / foreground pixels", probe_scores / pixels.clamp(min=1)))
    rows.append(("baseline without a model: foreground pixels", pixels))

    n, h = len(x), int(hallucinated.sum())
    blank = ~labels["present"].any(axis=1)
    print(f"\n== Simple Shapes hallucination scores ({x.shape[-1]}x{x.shape[-1]}, labelled at 64x64)")
    print(f"  teacher: {description}; trained in {train_s:.0f} s")
    print(f"  samples: {n}, diffusers DDPMPipeline, {args.sample_steps} ancestral steps of T=1000, in {sample_s:.0f} s;"
          f" probe (20 teacher calls per sample) in {probe_s:.0f} s")
    print(f"  hallucinated (a strip with >= 2 shapes): {h}/{n} = {h / n:.1%}; malformed (pixel count out of range, "
          f"indicative at 32x32): {labels['artifact'].mean():.1%}; blank: {blank.mean():.1%}; labeller on 1000 "
          f"training images: {false_rate:.1%} hallucinated")
    print(f"  shapes per strip (triangle, square, pentagon) present: "
          f"{', '.join(f'{p:.0%}' for p in labels['present'].mean(axis=0))} (data: 57% each)")
    shaped = torch.from_numpy(~blank)
    strict = torch.from_numpy(strict_hallucinations(x))
    several = torch.from_numpy(labels["components"].sum(axis=1) >= 2)
    print(f"  controls: (b) without the {int(blank.sum())} blank samples (trivially low scores); (c) same, labelled "
          f"strictly (>= 2 components of >= 16 px in a strip: {int(strict.sum())} samples); (d) only the "
          f"{int(several.sum())} samples with >= 2 components in all (every hallucination has), so that the amount of "
          "foreground alone cannot separate")
    columns = (("(a) all samples", torch.ones(n, dtype=torch.bool), hallucinated),
               ("(b) non-blank", shaped, hallucinated), ("(c) non-blank, strict", shaped, strict),
               ("(d) >= 2 components", several, hallucinated))
    print(f"  {'':50s}" + "".join(f" {title:>22s}" for title, _, _ in columns))
    print(f"  {'score':50s}" + " {:>10s} {:>11s}".format("AUROC", "removed@96%") * len(columns))
    for name, scores in rows:
        cells = []
        for _, subset, labels_ in columns:
            positives = int(labels_[subset].sum())
            if positives < 10 or positives > int(subset.sum()) - 10:
                cells.append(f" {'n/a':>10s} {'n/a':>11s}")
                continue
            auc, removed = separation(scores[subset], labels_[subset])
            cells.append(f" {auc:10.3f} {removed:11.3f}")
        print(f"  {name:50s}" + "".join(cells))
    png = args.out / "extremes.png"
    extremes_png(x, hallucinated, [("trajectory last 10%", rows[1][1]), ("probe", probe_scores)], png)
    print(f"  wall time: this run {time.perf_counter() - started:.0f} s; from scratch {train_s + sample_s + probe_s:.0f}"
          f" s (train {train_s:.0f} + sample {sample_s:.0f} + probe {probe_s:.0f}); wrote {png}")


if __name__ == "__main__":
    main()
