"""Acceptance experiments for the hallucination filter (Aithal et al., NeurIPS 2024, arXiv 2406.09358).

    python bench/hallucination_toy.py [--out runs/hallucination/] [--cache runs/hallucination/cache]

1-D modes {1,2,3} and {1,2,4,5} and the 2-D 5x5 grid, all with the paper's T = 1000 linear 0.001 -> 0.2 DDPM and
Decoder MLP, 20k training points, 20k samples from ancestral DDPM recorded through `HalMonitor`; hallucinated =
farther than 6 std from every mode. Prints one table per experiment: hallucination rate, gap densities (1-D),
placement on nearest-neighbour segments against uniform points (2-D), AUROC and removal at 96 % retention of the
trajectory score (K = 10 and 5), and the one-step probes (our extension) on the same samples and on the samples of
a one-step student distilled from the same teacher. Trained models and samples are cached (safetensors) under
--cache, so a rerun only re-scores. Single-threaded on purpose (shared CPUs). Fixed seeds throughout.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from onestep.sampling import toy
from onestep.sampling.hallucination import HalMonitor, LastK, hal_score, probe_scores, probe_sigmas

N_DATA = N_SAMPLES = 20_000
TEACHER = dict(width=128, batch_size=1000, lr=1e-3)  # paper: batch 10000, 20k steps, constant lr (GPU)
RECIPES_1D = ((10_000, False), (10_000, True))  # (steps, cosine lr decay); the last is the acceptance run
RECIPES_GRID = ((10_000, False), (10_000, True), (30_000, True))
STUDENT = dict(levels=(2.5, 1.08, 0.46, 0.2), n_pairs=20_000, steps=4000, batch_size=1000)
RETENTION = 0.96
SEGMENT_TOL = 0.7071 / 8  # a hallucination "lies on" a neighbour segment within spacing/8 (uniform: ~40 %)


def recipe_tag(steps: int, cosine: bool) -> str:
    return f"{steps // 1000}k-{'cos' if cosine else 'const'}"


# ---------------------------------------------------------------------------------------------------------------
# Cached training and sampling
# ---------------------------------------------------------------------------------------------------------------


def cached_teacher(cache: Path, name: str, data: torch.Tensor, steps: int, cosine: bool) -> toy.Decoder:
    folder = cache / f"teacher-{name}-{recipe_tag(steps, cosine)}"
    if (folder / "config.json").exists():
        return toy.Decoder.from_pretrained(folder).eval()
    model = toy.Decoder(dim=data.shape[1], width=TEACHER["width"])
    started = time.time()
    toy.train_ddpm(model, data, steps, TEACHER["batch_size"], TEACHER["lr"], cosine=cosine,
                   generator=torch.Generator().manual_seed(1234))
    print(f"  trained {folder.name} in {time.time() - started:.0f}s")
    model.save_pretrained(folder)
    return model


def cached_samples(cache: Path, name: str, model: toy.Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples [N, D], last-10 x0 window [10, N, D]) of ancestral DDPM through HalMonitor."""
    path = cache / f"samples-{name}.safetensors"
    if path.exists():
        saved = load_file(path)
        return saved["x"], saved["window"]
    pipe = toy.ToyDDPMPipeline(model)
    started = time.time()
    with HalMonitor(pipe, window=LastK(10)) as monitor:
        x = pipe(N_SAMPLES, generator=torch.Generator().manual_seed(0))
    (run,) = monitor.recorder.trajectories()
    print(f"  sampled {name} in {time.time() - started:.0f}s")
    save_file({"x": x.contiguous(), "window": run.x0.contiguous()}, path)
    return x, run.x0


def cached_student(cache: Path, name: str, teacher: toy.ToyDenoiser, dim: int) -> toy.ToyDenoiser:
    folder = cache / f"student-{name}"
    if (folder / "config.json").exists():
        return toy.ToyDenoiser(toy.Decoder.from_pretrained(folder).eval(), teacher.alphas_cumprod, "sample")
    started = time.time()
    student = toy.distill_one_step(teacher, dim, STUDENT["levels"], STUDENT["n_pairs"], STUDENT["steps"],
                                   STUDENT["batch_size"], generator=torch.Generator().manual_seed(3))
    print(f"  distilled {folder.name} in {time.time() - started:.0f}s")
    student.model.save_pretrained(folder)
    return student


# ---------------------------------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------------------------------


def separation(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(AUROC, fraction of hallucinations removed at the threshold that keeps 96 % of in-support samples)."""
    scores = scores.double()
    tau = torch.quantile(scores[~labels], RETENTION)
    return roc_auc_score(labels.numpy(), scores.numpy()), float((scores[labels] > tau).double().mean())


def probe_rows(x: torch.Tensor, labels: torch.Tensor, teacher: toy.ToyDenoiser, student: toy.ToyDenoiser | None,
               short: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The probe variants compared in the table: teacher denoiser, parallel, independent noise unless stated;
    "last-k xd" = the sigmas of the teacher's last k timesteps, each drawn d times (k*d denoiser calls)."""
    ab = teacher.alphas_cumprod
    variants = [
        ("probe: last-5 x4 (default)", teacher, probe_sigmas(ab), {}),
        ("probe: last-5 x2", teacher, probe_sigmas(ab, 5, 2), {}),
        ("probe: last-10 x1", teacher, probe_sigmas(ab, 10, 1), {}),
        ("probe: last-10 x2", teacher, probe_sigmas(ab, 10, 2), {}),
    ]
    if not short:
        variants += [
            ("probe: last-5 x4, shared noise", teacher, probe_sigmas(ab), {"noise": "shared"}),
            ("probe: last-5 x4, chain (re-noise each estimate)", teacher, probe_sigmas(ab), {"mode": "chain"}),
            ("probe: sigma 0.05 x20", teacher, [0.05] * 20, {}),
            ("probe: sigma 0.3 x20", teacher, [0.3] * 20, {}),
        ]
    if student is not None:
        variants += [
            ("probe: student's own 4-step path (chain)", student, list(STUDENT["levels"][1:]), {"mode": "chain"}),
            ("probe: student as denoiser, its level 0.2 x20", student, [STUDENT["levels"][-1]] * 20, {}),
        ]
    return [(name, probe_scores(x, d, s, torch.Generator().manual_seed(11), **kw)) for name, d, s, kw in variants]


def print_rows(title: str, facts: list[str], rows: list[tuple[str, torch.Tensor]], labels: torch.Tensor):
    print(f"\n== {title}")
    for fact in facts:
        print(f"  {fact}")
    print(f"  {'score':52s} {'AUROC':>7s} {'removed@96%':>12s}")
    for name, scores in rows:
        auc, removed = separation(scores, labels)
        print(f"  {name:52s} {auc:7.4f} {removed:12.3f}")


# ---------------------------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------------------------


def teacher_facts(steps: int, cosine: bool) -> str:
    return (f"teacher: Decoder {TEACHER['width']}, {steps} steps, batch {TEACHER['batch_size']}, lr {TEACHER['lr']}"
            f" {'cosine-decayed' if cosine else 'constant'}; {N_SAMPLES} samples, T=1000 ancestral DDPM")


def trajectory_rows(window: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [("trajectory Hal, K=10 (paper)", hal_score(window, LastK(10))),
            ("trajectory Hal, K=5", hal_score(window, LastK(5)))]


def one_d(cache: Path, means: tuple[float, ...], steps: int, cosine: bool, with_student: bool) -> dict:
    name = "1d-" + "".join(str(int(m)) for m in means)
    run = f"{name}-{recipe_tag(steps, cosine)}"
    data = toy.gaussian_1d(means, N_DATA, generator=torch.Generator().manual_seed(1234))
    model = cached_teacher(cache, name, data, steps, cosine)
    x, window = cached_samples(cache, run, model)
    mu = torch.tensor(means)
    labels = toy.hallucinated(x, mu, toy.MODE_STD_1D)
    gaps = toy.gap_densities(x, means)
    facts = [teacher_facts(steps, cosine),
             f"hallucinated (>6 std from every mode): {labels.double().mean():.4f} ({int(labels.sum())})",
             "gap density (fraction of samples per unit length): " + ", ".join(
                 f"({lo:.2f},{hi:.2f}) {d:.5f}" for lo, hi, d in gaps)]
    teacher = toy.ToyDenoiser(model, toy.toy_scheduler().alphas_cumprod)
    print_rows(f"1-D modes {means}, {run}: teacher samples", facts,
               trajectory_rows(window) + probe_rows(x, labels, teacher, None), labels)
    result = {"name": run, "means": means, "x": x, "labels": labels, "window": window}
    if with_student:
        student = cached_student(cache, run, teacher, 1)
        z = torch.randn(N_SAMPLES, 1, generator=torch.Generator().manual_seed(7))
        xs = student(STUDENT["levels"][0] * z, torch.tensor(STUDENT["levels"][0]))
        labels_s = toy.hallucinated(xs, mu, toy.MODE_STD_1D)
        print_rows(f"1-D modes {means}, {run}: one-step student (trajectory regression, {STUDENT['steps']} steps)",
                   [f"hallucinated: {labels_s.double().mean():.4f} ({int(labels_s.sum())})"],
                   probe_rows(xs, labels_s, teacher, student), labels_s)
        result["xs"] = xs
    return result


def grid(cache: Path, steps: int, cosine: bool, uniform_fraction: float) -> dict:
    run = f"grid-{recipe_tag(steps, cosine)}"
    data = toy.gaussian_grid(N_DATA, generator=torch.Generator().manual_seed(1234))
    model = cached_teacher(cache, "grid", data, steps, cosine)
    x, window = cached_samples(cache, run, model)
    means = toy.grid_means()
    labels = toy.hallucinated(x, means, toy.GRID_MODE_STD)
    on_segment = toy.segment_distance(x[labels], means) <= SEGMENT_TOL
    spread = float(toy.mode_distance(x[~labels], means).pow(2).mean().sqrt()) / 2**0.5
    facts = [teacher_facts(steps, cosine),
             f"hallucinated (>6 std from every mode): {labels.double().mean():.4f} ({int(labels.sum())})",
             f"on a nearest-neighbour segment (within spacing/8): {on_segment.double().mean():.3f} "
             f"(uniform points: {uniform_fraction:.3f})",
             f"in-support per-axis std {spread:.4f} (data {toy.GRID_MODE_STD:.4f}: x{spread / toy.GRID_MODE_STD:.1f})"]
    teacher = toy.ToyDenoiser(model, toy.toy_scheduler().alphas_cumprod)
    rows = trajectory_rows(window) + probe_rows(x, labels, teacher, None, short=True)
    print_rows(f"2-D 5x5 grid, {run}", facts, rows, labels)
    return {"name": run, "x": x, "labels": labels, "window": window}


def uniform_segment_fraction() -> float:
    """Fraction of uniform hallucinated points (in the grid's square) within spacing/8 of a neighbour segment."""
    means = toy.grid_means()
    u = (2 * torch.rand(200_000, 2, generator=torch.Generator().manual_seed(5)) - 1) * float(means.max())
    u = u[toy.hallucinated(u, means, toy.GRID_MODE_STD)]
    return float((toy.segment_distance(u, means) <= SEGMENT_TOL).double().mean())


# ---------------------------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------------------------


def plot(results_1d: list[dict], result_2d: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for col, res in enumerate(results_1d):
        ax = axes[0, col]
        lo, hi = min(res["means"]) - 0.5, max(res["means"]) + 0.5
        ax.hist(res["x"].flatten().numpy(), bins=200, range=(lo, hi), log=True, color="tab:blue",
                label="teacher, DDPM-1000")
        ax.hist(res["xs"].flatten().numpy(), bins=200, range=(lo, hi), log=True, histtype="step",
                color="tab:orange", label="one-step student")
        ax.set_title(f"{res['name']}: samples (log count)")
        ax.legend(fontsize=8)
        score_histogram(axes[1, col], hal_score(res["window"]), res["labels"], f"{res['name']}: log10 Hal (K=10)")
    ax = axes[0, 2]
    x, labels = result_2d["x"], result_2d["labels"]
    ax.scatter(x[~labels, 0], x[~labels, 1], s=1, c="tab:blue", alpha=0.3, label="in support")
    ax.scatter(x[labels, 0], x[labels, 1], s=2, c="tab:red", label="hallucinated")
    ax.set_title(f"{result_2d['name']}: samples")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, markerscale=5, loc="lower left", framealpha=0.9)
    score_histogram(axes[1, 2], hal_score(result_2d["window"]), labels, f"{result_2d['name']}: log10 Hal (K=10)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def score_histogram(ax, scores: torch.Tensor, labels: torch.Tensor, title: str):
    scores = scores.clamp_min(1e-12).log10()
    bins = torch.linspace(float(scores.min()), float(scores.max()), 61).numpy()
    ax.hist(scores[~labels].numpy(), bins=bins, log=True, color="tab:blue", alpha=0.6, label="in support")
    ax.hist(scores[labels].numpy(), bins=bins, log=True, color="tab:red", alpha=0.8, label="hallucinated")
    ax.set_title(title)
    ax.legend(fontsize=8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hallucination"), help="folder for the PNG")
    parser.add_argument("--cache", type=Path, default=None, help="trained models and samples (default OUT/cache)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = args.cache or args.out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results_1d = []
    for means in ((1.0, 2.0, 3.0), (1.0, 2.0, 4.0, 5.0)):
        for k, (steps, cosine) in enumerate(RECIPES_1D):
            final = k == len(RECIPES_1D) - 1
            result = one_d(cache, means, steps, cosine, with_student=final)
        results_1d.append(result)
    uniform = uniform_segment_fraction()
    results_2d = [grid(cache, steps, cosine, uniform) for steps, cosine in RECIPES_GRID]
    figure = args.out / "hallucination_toy.png"
    plot(results_1d, results_2d[-1], figure)
    print(f"\nfigure: {figure}   total {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
