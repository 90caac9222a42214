"""PNG outputs of a run: sample grids (images or 2-D points) and loss / FID curves."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


PNG_TAG = ("onestep", "sample grid")   # a PNG text chunk: how `onestep sample` knows a grid.png is its own


def written_by_onestep(path: Path) -> bool:
    """Is `path` a PNG that save_samples wrote (it carries PNG_TAG)? Reads the header chunks only."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return getattr(img, "text", {}).get(PNG_TAG[0]) == PNG_TAG[1]
    except Exception:  # not an image at all: not ours
        return False


def save_samples(samples: torch.Tensor, path: Path, reference: torch.Tensor | None = None, title: str = "") -> None:
    """Images in [-1, 1] -> a grid PNG; 2-D points -> a scatter PNG over the reference data (both tagged PNG_TAG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().float().cpu()
    if samples.dim() == 4:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        nrow = max(1, int(len(samples) ** 0.5))
        grid = make_grid((samples + 1) / 2, nrow=nrow, padding=1, pad_value=1.0).clamp(0, 1)
        pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()  # as save_image
        info = PngInfo()
        info.add_text(*PNG_TAG)
        Image.fromarray(pixels).save(path, format="PNG", pnginfo=info)
        return
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ax.scatter(*reference[:5000, :2].cpu().T, s=1, c="lightgray", label="data")
    ax.scatter(*samples[:, :2].T, s=2, c="tab:blue", label="samples")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=dict([PNG_TAG]))
    plt.close(fig)


def side_by_side(left: torch.Tensor, right: torch.Tensor, path: Path, labels: tuple[str, str]) -> None:
    """Two image grids next to each other with titles (teacher vs student on the same seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8), dpi=110)
    for ax, images, label in zip(axes, (left, right), labels):
        grid = make_grid((images.float().cpu() + 1) / 2, nrow=max(1, int(len(images) ** 0.5)), padding=1,
                         pad_value=1.0).clamp(0, 1)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_metrics(metrics_file: Path, out_dir: Path) -> list[Path]:
    """loss_curve.png (every logged loss/* series) and fid_curve.png (if FID was logged) from metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    written = []
    for prefix, name, ylabel in (("loss/", "loss_curve.png", "loss"), ("fid", "fid_curve.png", "Frechet distance")):
        series = sorted({k for r in rows for k in r if k.startswith(prefix)})
        if not series:
            continue
        fig, axes = plt.subplots(len(series), 1, figsize=(6, 2.2 * len(series)), dpi=100, squeeze=False)
        for ax, key in zip(axes[:, 0], series):
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), lw=1)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written
