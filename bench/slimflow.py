"""SlimFlow measurements beside `python bench/methods.py` (which scores the digits students in its ROWS table).

    python bench/slimflow.py straightness     # 2-D grid: the teacher's ODE vs the 2-rectified flow after reflow
    python bench/slimflow.py speed            # digits: images/s of the SlimFlow student vs the full-size student

straightness: for the same noise z and the same flow-time grid tau_0 = 0.98 > ... > 0 (VE sigma = tau / (1 - tau)),
each network is integrated with Euler in the VE form and its trajectory read in flow coordinates y = x / (1 + sigma)
(the PF-ODE path of the same marginals as a flow, Lipman et al. 2023; Liu et al. 2023). Reported, mean over 4096 noises:
  straightness  S = sum_i (dtau_i / tau_0) ||dy_i / dtau_i - (y_N - y_0) / tau_0||^2  (Liu et al. 2023, sec. 2.3:
                0 for straight paths), and S relative to ||(y_N - y_0) / tau_0||^2;
  1-vs-50 gap   RMS ||x_1 - x_50||, x_k the sample after k Euler steps on the grid (0: one step is exact);
  off-mode      the share of 1-step (50-step) samples farther than 6 mode std from every grid mode;
  modes         how many of the grid's modes hold >= 0.5 % of the samples within 6 mode std (coverage).
Rows: the teacher (assets/teachers/gaussian_grid, EDM MLP) and the 2-RF of recipes/gaussian_grid_slimflow_reflow.yaml
(and of its plain-reflow variant when runs/gaussian_grid_plainflow_reflow exists).

speed: both pipelines generate batches of 250 one-step images in alternation (so machine load hits both alike);
median images/s over --repeats rounds, the ratio, and the parameter ratio's square root (the issue's bar).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def trajectory(denoiser, z: torch.Tensor, taus: torch.Tensor) -> list[torch.Tensor]:
    """Euler in the VE form on sigma = tau / (1 - tau) (then 0), the states in flow coordinates y = x / (1 + sigma)."""
    from onestep.methods.slimflow import sigma_of_tau

    sigmas = torch.cat([sigma_of_tau(taus), torch.zeros(1, dtype=taus.dtype)]).float()
    x = z * sigmas[0]
    ys = [x / (1 + sigmas[0])]
    for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
        x0 = denoiser(x, sigma)
        x = x0 + (nxt / sigma) * (x - x0)
        ys.append(x / (1 + nxt))
    return ys


def straightness(denoiser, z: torch.Tensor, steps: int = 50, tau0: float = 0.98) -> dict:
    from onestep.sampling.toy import GRID_MODE_STD, grid_means, hallucinated

    taus = torch.linspace(tau0, 0, steps + 1, dtype=torch.float64)[:-1]
    ys = trajectory(denoiser, z, taus)
    grid = torch.cat([taus, torch.zeros(1, dtype=torch.float64)]).float()
    mean_velocity = (ys[-1] - ys[0]) / tau0
    s = sum(((ys[i + 1] - ys[i]) / (grid[i] - grid[i + 1]) - mean_velocity).pow(2).sum(1) * (grid[i] - grid[i + 1])
            / tau0 for i in range(steps))
    one = trajectory(denoiser, z, torch.tensor([tau0], dtype=torch.float64))[-1]
    means = grid_means().double()

    def modes_hit(x):  # modes holding >= 0.5 % of the samples within 6 mode std
        near = torch.cdist(x.double(), means).min(dim=1)
        kept = near.indices[~hallucinated(x, means, GRID_MODE_STD)]
        return int((torch.bincount(kept, minlength=len(means)) >= 0.005 * len(x)).sum())

    return {"straightness": s.mean().item(), "straightness_rel": (s.mean() / mean_velocity.pow(2).sum(1).mean()).item(),
            "gap_1_vs_50": (one - ys[-1]).pow(2).sum(1).mean().sqrt().item(),
            "off_mode_1step": hallucinated(one, grid_means(), GRID_MODE_STD).double().mean().item(),
            "off_mode_50step": hallucinated(ys[-1], grid_means(), GRID_MODE_STD).double().mean().item(),
            "modes_hit_1step": modes_hit(one), "modes_hit_50step": modes_hit(ys[-1]), "modes": len(means)}


def run_straightness(args) -> list[dict]:
    from onestep.denoisers import load_teacher

    z = torch.randn((args.num, 2), generator=torch.Generator().manual_seed(args.seed))
    rows = [("teacher ODE (EDM MLP, before reflow)", ROOT / "assets/teachers/gaussian_grid")]
    for name, run in (("2-RF, annealing reflow (SlimFlow)", "gaussian_grid_slimflow_reflow"),
                      ("2-RF, plain reflow", "gaussian_grid_plainflow_reflow")):
        rows.append((name, ROOT / "runs" / run / "pipeline"))
    out = []
    print(f"{args.num} noises, seed {args.seed}, Euler on the flow-time grid 0.98 -> 0 ({args.steps} steps vs 1)")
    print(f"{'network':40} {'straightness':>12} {'relative':>9} {'gap 1-vs-50':>12} {'off-mode 1':>10} "
          f"{'off-mode 50':>11} {'modes 1':>7} {'modes 50':>8}")
    for name, folder in rows:
        if not (folder / "model_index.json").is_file():
            print(f"{name:40} (no {folder.relative_to(ROOT)}: train its recipe first)")
            continue
        r = {"network": name, "folder": str(folder.relative_to(ROOT)), **straightness(load_teacher(str(folder)), z,
                                                                                     args.steps)}
        out.append(r)
        print(f"{name:40} {r['straightness']:>12.4f} {r['straightness_rel']:>9.4f} {r['gap_1_vs_50']:>12.4f} "
              f"{r['off_mode_1step']:>10.3f} {r['off_mode_50step']:>11.3f} {r['modes_hit_1step']:>7} "
              f"{r['modes_hit_50step']:>8}")
    return out


@torch.no_grad()
def run_speed(args) -> dict:
    from onestep.networks import count_parameters
    from onestep.pipelines import load_pipeline

    pipes = {"slimflow": load_pipeline(ROOT / args.student), "full": load_pipeline(ROOT / args.full)}
    params = {k: count_parameters(p.network) for k, p in pipes.items()}
    noise = torch.randn((250, *pipes["full"].noise_shape), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(250) % 10
    rates = {k: [] for k in pipes}
    for _ in range(args.repeats):
        for k, p in pipes.items():
            t0 = time.perf_counter()
            p.generate(noise, 1, class_labels=labels)
            rates[k].append(250 / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"params": params, "images_per_s": med, "speedup": med["slimflow"] / med["full"],
              "bar_sqrt_param_ratio": (params["full"] / params["slimflow"]) ** 0.5, "threads": torch.get_num_threads()}
    print(f"one-step images/s at batch 250, median of {args.repeats} alternating rounds, {result['threads']} thread(s)")
    for k in pipes:
        folder = args.student if k == "slimflow" else args.full
        print(f"  {k:9} {params[k]:>9,} params  {med[k]:8.1f} img/s   ({folder})")
    print(f"  speed-up {result['speedup']:.2f}x; the bar sqrt(param ratio) = {result['bar_sqrt_param_ratio']:.2f}x: "
          f"{'met' if result['speedup'] >= result['bar_sqrt_param_ratio'] else 'NOT met'}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("straightness")
    s.add_argument("-n", "--num", type=int, default=4096)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("speed")
    p.add_argument("--student", default="runs/digits16_slimflow/pipeline")
    p.add_argument("--full", default="assets/pipelines/digits16")
    p.add_argument("--repeats", type=int, default=9)
    for q in (s, p):
        q.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run_straightness(args) if args.what == "straightness" else run_speed(args)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
