"""One More Step on the embedded flawed teacher: does the extra step restore the data's brightness range, at what cost?

    python bench/oms_brightness.py                   # 1000 samples, seed 1, writes assets/oms_digits16_grid.png
    python bench/oms_brightness.py -n 500 --json

Base: assets/teachers/digits16_flawed (class-conditional UNet2DModel on digits_brightness under Stable Diffusion's
scaled-linear schedule, terminal alpha-bar 0.0047), sampled by TeacherPipeline with DDIM-20 from pure noise. OMS:
assets/pipelines/digits16_oms (the same base behind a trained OMS module). Every variant sees the same noise and the
same balanced digit labels (`onestep.data.labels.evaluation_inputs`); OMS is prompted with the caption ("dark" /
"bright") of the data row each sample takes its label from, so the target is the data distribution itself.

Printed per variant: W1 = 1-D Wasserstein distance between the per-image mean brightness of the samples and of the
1797 data images; FD in the project's digits feature space (onestep-digits) against the data; the fraction of bright
(mean > 0) samples; images/s (batch 250, this process's threads). Then the oracle: prompted "bright" / "dark" for
every sample, the fraction bright / dark at OMS guidance scales 1, 2, 3.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from onestep.data import load_dataset
from onestep.data.labels import evaluation_inputs
from onestep.eval import frechet_distance
from onestep.pipelines import load_pipeline
from onestep.resources import ASSETS

TEACHER = ASSETS / "teachers" / "digits16_flawed"
OMS = ASSETS / "pipelines" / "digits16_oms"
STEPS = 20


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 between two empirical 1-D distributions (integral of |F_a - F_b|)."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a.double().numpy(), b.double().numpy()))


@torch.no_grad()
def run(pipe, data, n, seed, **extra):
    images, seconds = [], 0.0
    for noise, rows in evaluation_inputs(data, pipe.noise_shape, n, seed):
        kw = {k: (v(rows) if callable(v) else v) for k, v in extra.items()}
        t0 = time.perf_counter()
        images.append(pipe.generate(noise, STEPS, class_labels=data.labels[rows], **kw).float().cpu())
        seconds += time.perf_counter() - t0
    images = torch.cat(images)
    return images, len(images) / seconds


@torch.no_grad()
def extra_step_cost(base, oms, n: int = 250, repeats: int = 3) -> dict:
    """images/s of the base alone and with the OMS step, timed alternately on the same batch (best of `repeats`:
    on a shared machine the minimum is the least disturbed)."""
    noise = torch.randn(n, *base.noise_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 10
    best = {"base": float("inf"), "oms": float("inf")}
    for _ in range(repeats):
        for key, call in (("base", lambda: base.generate(noise, STEPS, class_labels=labels)),
                          ("oms", lambda: oms.generate(noise, STEPS, class_labels=labels, oms_prompt="bright"))):
            t0 = time.perf_counter()
            call()
            best[key] = min(best[key], time.perf_counter() - t0)
    return {k: n / v for k, v in best.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--teacher", default=str(TEACHER))
    parser.add_argument("--oms", default=str(OMS))
    parser.add_argument("--grid", default=str(ASSETS / "oms_digits16_grid.png"), help="'' to skip the PNG")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cost-only", action="store_true", help="only the images/s cost of the extra step")
    args = parser.parse_args(argv)
    data = load_dataset("digits_brightness", 16)
    base, oms = load_pipeline(args.teacher), load_pipeline(args.oms)
    for p in (base, oms):
        p.set_progress_bar_config(disable=True)
    cost = extra_step_cost(base, oms)
    print(f"cost of the extra step (batch 250, DDIM-{STEPS}, best of 3 interleaved runs): base {cost['base']:.1f} "
          f"img/s, OMS + base {cost['oms']:.1f} img/s ({100 * (cost['base'] / cost['oms'] - 1):+.1f} % time)")
    if args.cost_only:
        return 0
    data_mean = data.x.mean((1, 2, 3))
    captions = lambda rows: [data.prompts[int(i)] for i in rows]  # noqa: E731
    rows = []

    def record(name, images, speed):
        means = images.mean((1, 2, 3))
        rows.append({"variant": name, "w1_brightness": wasserstein_1d(means, data_mean),
                     "fd": frechet_distance(images, data.x), "bright_fraction": float((means > 0).float().mean()),
                     "images_per_s": speed})
        return images

    t0 = time.perf_counter()
    plain = record("base DDIM-20 from N(0, I)", *run(base, data, args.num_samples, args.seed))
    with_oms = record("OMS (row captions, w=1) + base DDIM-20",
                      *run(oms, data, args.num_samples, args.seed, oms_prompt=captions))
    record("OMS (row captions, w=2) + base DDIM-20",
           *run(oms, data, args.num_samples, args.seed, oms_prompt=captions, oms_guidance_scale=2.0))
    oracle = []
    for w in (1.0, 2.0, 3.0):
        for word in ("bright", "dark"):
            images, _ = run(oms, data, args.num_samples, args.seed, oms_prompt=word, oms_guidance_scale=w)
            means = images.mean((1, 2, 3))
            frac = float(((means > 0) if word == "bright" else (means < 0)).float().mean())
            oracle.append({"oms_prompt": word, "oms_guidance_scale": w, "fraction_as_prompted": frac})
    wall = time.perf_counter() - t0

    print(f"protocol: {args.num_samples} samples, seed {args.seed}, balanced digit labels, DDIM-{STEPS} base; W1 of "
          f"per-image mean brightness vs the 1797 digits_brightness images; onestep-digits FD vs the same; "
          f"{torch.get_num_threads()} threads; wall {wall:.0f} s")
    print(f"{'variant':44} {'W1 bright':>10} {'FD':>8} {'bright %':>9} {'img/s':>8}")
    for r in rows:
        print(f"{r['variant']:44} {r['w1_brightness']:>10.4f} {r['fd']:>8.2f} {100 * r['bright_fraction']:>8.1f}% "
              f"{r['images_per_s']:>8.1f}")
    print(f"{'data':44} {0:>10.4f} {'-':>8} {100 * float((data_mean > 0).float().mean()):>8.1f}%")
    print("oracle (every sample prompted): " + ", ".join(
        f"{o['oms_prompt']}@w={o['oms_guidance_scale']:g}: {100 * o['fraction_as_prompted']:.1f}%" for o in oracle))
    if args.grid:
        from PIL import Image
        from torchvision.utils import make_grid

        k = 10  # one row of each: data, base, OMS with captions, OMS "dark" x2, OMS "bright" x2 (w=2)
        dark, _ = run(oms, data, k, args.seed, oms_prompt="dark", oms_guidance_scale=2.0)
        bright, _ = run(oms, data, k, args.seed, oms_prompt="bright", oms_guidance_scale=2.0)
        picks = torch.cat([data.x[:k], plain[:k], with_oms[:k], dark, bright])
        grid = make_grid((picks + 1) / 2, nrow=k, padding=1, pad_value=1.0).clamp(0, 1)
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()).save(args.grid)
        print(f"grid: {args.grid} (rows: data, base, OMS with row captions, OMS 'dark' w=2, OMS 'bright' w=2)")
    if args.json:
        print(json.dumps({"rows": rows, "oracle": oracle}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
