"""Train the ``onestep-digits`` FID feature extractor on sklearn digits and save it as safetensors.

Trains on digits rendered at 16 and 32 px, both passed through the extractor's own uint8 preprocessing, with
small random shifts/scales/rotations so that features vary smoothly for imperfect generated digits.  Prints the
validation accuracy (80/20 split) and sanity Frechet distances that must order noise > blurred > half-split.

    python scripts/train_feature_extractor.py      # ~25 s on one free CPU thread (PYTHONPATH=. if not installed)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.transforms.functional import gaussian_blur

from onestep.data import load_dataset
from onestep.eval import FEATURE_EXTRACTOR, default_weights_path, frechet_distance, to_uint8_rgb
from onestep.eval.features import DigitsCNN, preprocess_uint8

RESOLUTIONS = (16, 32)


def split_indices(n: int, seed: int, val_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded 80/20 split shared by every resolution, so no validation digit is seen at another size."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def extractor_inputs(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as the extractor sees them: quantised to uint8, then its own preprocessing."""
    data = load_dataset("digits", resolution=resolution)
    return preprocess_uint8(to_uint8_rgb(data.x)), data.labels


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random scale 0.9-1.1, rotation +-8 degrees, shift +-2 px; the border is filled with background (-1)."""
    n = len(x)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    angle = math.radians(8.0) * (2 * torch.rand(n, generator=gen) - 1)
    max_shift = 2.0 * 2 / x.shape[-1]  # 2 px; affine grids span [-1, 1], i.e. 2 / size per pixel
    shift = (2 * torch.rand(n, 2, generator=gen) - 1) * max_shift
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, align_corners=False) - 1.0


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> DigitsCNN:
    """Adam with cosine decay on augmented batches."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitsCNN()
    steps = epochs * math.ceil(len(x) / batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            _, logits = net(augment(x[idx], gen))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x)[1].argmax(dim=1) == y).float().mean())


def sanity_distances(weights: Path, seed: int) -> dict[str, float]:
    """Frechet distances from one random half of the 16 px digits to the other half, blurred, and noise."""
    real = load_dataset("digits", resolution=16).x
    first, second = split_indices(len(real), seed, val_fraction=0.5)
    a, b = real[first], real[second]
    noise = torch.rand(b.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    others = {"real half": b, "blurred half": gaussian_blur(b, kernel_size=5, sigma=1.0), "uniform noise": noise}
    return {name: frechet_distance(a, other, weights_path=str(weights)) for name, other in others.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=default_weights_path(FEATURE_EXTRACTOR))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    inputs = {r: extractor_inputs(r) for r in RESOLUTIONS}
    train_idx, val_idx = split_indices(len(inputs[16][0]), args.seed)
    x_train = torch.cat([inputs[r][0][train_idx] for r in RESOLUTIONS])
    y_train = torch.cat([inputs[r][1][train_idx] for r in RESOLUTIONS])
    net = train(x_train, y_train, args.epochs, args.batch_size, args.lr, args.seed)
    val_acc = {r: accuracy(net, inputs[r][0][val_idx], inputs[r][1][val_idx]) for r in RESOLUTIONS}
    print(
        f"trained in {time.perf_counter() - start:.1f} s on {len(x_train)} images ({len(train_idx)} digits x 2 sizes)"
    )
    for r, acc in val_acc.items():
        print(f"val accuracy at {r} px: {acc:.4f} ({len(val_idx)} digits)")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    # One JSON metadata entry: safetensors writes several entries in random order, which would make the
    # file's bytes differ between identical runs.
    info = {
        "epochs": args.epochs,
        "seed": args.seed,
        "train": "sklearn load_digits, 80% split",
        "val_accuracy": {f"{r}px": round(acc, 4) for r, acc in val_acc.items()},
    }
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(args.output), metadata={"onestep": json.dumps(info, sort_keys=True)})
    print(f"saved {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")

    distances = sanity_distances(args.output, args.seed)
    for name, fd in distances.items():
        print(f"Frechet distance real half vs {name}: {fd:.2f}")
    ordered = distances["uniform noise"] > distances["blurred half"] > distances["real half"]
    print("ordering noise > blurred > real half:", "OK" if ordered else "VIOLATED")
    if not ordered:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
