"""NCT on the embedded digits: control consistency and FD of the unadapted generator, NCT and the regression baseline.

    python bench/nct.py                       # score the finished runs (train them first, 12-32 min each here):
        onestep train recipes/digits16_nct_edges.yaml
        onestep train recipes/digits16_nct_edges.yaml --set method.objective=regression \
            --set output_dir=runs/digits16_regression_edges
        (the same with _lowres)
    python bench/nct.py --png assets/nct_digits16.png      # also write the picture: controls | base | NCT | regression

Protocol, for each control (Sobel edges; 4x lower resolution): n samples per seed with balanced class labels
(`onestep.data.labels.evaluation_inputs`, as bench/methods.py); sample i gets the class label of data row r_i and
noise z_i, and a control from one of two sources, both scored:

  data controls   C(x_data[r_i]), the control of that real digit (independent of z_i);
  base controls   C(f(z'_i, label)), the control of the base generator's own sample from other noise z'_i (seed
                  + 1000). An adapter that follows it perfectly and keeps the base's conditional law keeps the base's
                  marginal, so this FD isolates what the adapter costs the base (NCT's own criterion, Luo et al. 2025,
                  sec. 3: the adapted generator targets p_base(x | c)); real-digit controls also ask for images the
                  base never makes, which moves FD for any adapter.

Rows:

  (a) base        the shipped one-step generator (assets/pipelines/digits16), which ignores the control;
  (b) NCT         the same generator with the NCT adapter (`onestep.methods.nct`, objective nct);
  (c) regression  the same adapter trained by regression on (control, image) pairs of the data (objective regression).

consistency = mean |C(output) - control| on the [0, 1] scale (lower is better; NCT, Luo et al. 2025, sec. 4);
FD = Frechet distance in the onestep-digits feature space (not Inception) against all 1797 digits, as bench/methods.py.
Mean +- sd over seeds 1..S.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from onestep.controls import consistency, control_model
from onestep.data import load_dataset
from onestep.data.labels import evaluation_inputs
from onestep.eval import frechet_distance
from onestep.pipelines import load_pipeline
from onestep.resources import ASSETS

BASE = ASSETS / "pipelines" / "digits16"
CONTROLS = {  # control name -> (control spec, NCT run, regression run)
    "edges (sobel)": ({"name": "sobel"}, "runs/digits16_nct_edges", "runs/digits16_regression_edges"),
    "lowres (4x)": ({"name": "lowres", "factor": 4}, "runs/digits16_nct_lowres", "runs/digits16_regression_lowres"),
}


@torch.no_grad()
def score(pipe, control, data, n: int, seeds: list[int], use_control: bool, base=None) -> dict:
    """Consistency and FD per seed; the controls are the data rows' (base None) or those of `base`'s samples."""
    cons, fds = [], []
    for seed in seeds:
        images, dists = [], []
        others = evaluation_inputs(data, pipe.noise_shape, n, seed + 1000)
        for (noise, rows), (other, _) in zip(evaluation_inputs(data, pipe.noise_shape, n, seed), others):
            labels = data.labels[rows]
            c = control(data.x[rows] if base is None else base.generate(other, 1, class_labels=labels).float())
            extra = {"control_image": c} if use_control else {}
            x = pipe.generate(noise, 1, class_labels=labels, **extra).float()
            images.append(x)
            dists.append(consistency(control, x, c))
        cons.append(float(torch.cat(dists).mean()))
        fds.append(frechet_distance(torch.cat(images), data.x))
    return {"consistency": cons, "fd": fds}


def _ms(values) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f}+-{sd:.4f}" if values[0] < 1 else f"{statistics.mean(values):.2f}+-{sd:.2f}"


@torch.no_grad()
def picture(path: Path, data, pipes: dict) -> None:
    """For each control: a row of controls of ten real digits (0..9), then the base, NCT and regression outputs
    for the same noise and labels."""
    from PIL import Image, ImageDraw

    rows_idx = torch.tensor([int((data.labels == d).nonzero()[0]) for d in range(10)])
    noise = torch.randn((10, *data.x.shape[1:]), generator=torch.Generator().manual_seed(7))
    base = load_pipeline(BASE)
    strips = []
    for name, (spec, nct, regression) in CONTROLS.items():
        control = control_model(spec)
        c = control(data.x[rows_idx])
        labels = data.labels[rows_idx]
        strips.append((f"{name}: control", c))
        strips.append(("base (no adapter)", base.generate(noise, 1, class_labels=labels)))
        for label, pipe in (("NCT", pipes.get((name, "nct"))), ("regression", pipes.get((name, "regression")))):
            if pipe is not None:
                strips.append((label, pipe.generate(noise, 1, class_labels=labels, control_image=c)))
    scale, pad, text_w = 3, 2, 120
    side = data.x.shape[-1] * scale
    canvas = Image.new("L", (text_w + 10 * (side + pad), len(strips) * (side + pad)), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, x) in enumerate(strips):
        y0 = r * (side + pad)
        draw.text((4, y0 + side // 3), label, fill=0)
        for i, img in enumerate(((x.clamp(-1, 1) + 1) * 127.5).round().byte()[:, 0]):
            tile = Image.fromarray(img.numpy()).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (text_w + i * (side + pad), y0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


class _scaled:
    """A controlled pipeline called at another adapter scale."""

    def __init__(self, pipe, scale: float):
        self.pipe, self.scale = pipe, scale
        self.noise_shape, self.card = pipe.noise_shape, pipe.card

    def generate(self, *args, **kwargs):
        return self.pipe.generate(*args, adapter_scale=self.scale, **kwargs)


def from_checkpoint(ema_file: Path, control):
    """A controlled pipeline from a run still training: the base plus the EMA adapter of its latest checkpoint."""
    from safetensors.torch import load_file

    from onestep.adapters import make_adapter
    from onestep.pipelines import ControlledOneStepPipeline

    base = load_pipeline(BASE)
    adapter = make_adapter(base.unet, control.channels(base.noise_shape[0]))
    adapter.load_state_dict(load_file(ema_file))
    pipe = ControlledOneStepPipeline.from_generator(base.one_step_generator, base.scheduler, base.card)
    pipe.add_adapter(adapter, control.spec)
    return pipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--png", type=Path, default=None, help="also write the comparison picture here")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scales", type=lambda v: [float(x) for x in v.split(",")], default=[1.0, 0.5],
                        help="adapter scales of the NCT rows, comma-separated (default 1,0.5)")
    parser.add_argument("--checkpoints", action="store_true",
                        help="score runs without an export from their latest checkpoint's EMA adapter")
    args = parser.parse_args(argv)
    if args.num_samples < 2 or args.seeds < 1:
        parser.error("-n must be >= 2 and --seeds >= 1")
    data = load_dataset("digits", 16)
    seeds = list(range(1, args.seeds + 1))
    base = load_pipeline(BASE)
    results, pipes = [], {}
    for name, (spec, nct, regression) in CONTROLS.items():
        control = control_model(spec)
        rows = [("(a) base, unadapted", base, False, str(BASE))]
        runs = [("(b) NCT", nct, "nct"), ("(c) regression on data pairs", regression, "regression")]
        for label, run, key in runs:
            folder = Path(run) / "pipeline"
            if (folder / "model_index.json").is_file():
                pipes[(name, key)] = load_pipeline(folder)
                rows.append((label, pipes[(name, key)], True, str(folder)))
            elif args.checkpoints and sorted(Path(run).glob("checkpoints/step_*/ema.safetensors")):
                ema = sorted(Path(run).glob("checkpoints/step_*/ema.safetensors"))[-1]
                pipes[(name, key)] = from_checkpoint(ema, control)
                rows.append((label + f" @{ema.parent.name}", pipes[(name, key)], True, str(ema)))
            else:
                results.append({"control": name, "row": label, "source": f"missing: {folder}"})
        if (name, "nct") in pipes:  # the adapter scale trades control for fidelity (ControlNet's conditioning scale)
            rows += [(f"(b) NCT at adapter_scale {s:g}", _scaled(pipes[(name, "nct")], s), True, rows[1][3])
                     for s in args.scales if s != 1.0]
        for label, pipe, use, source in rows:
            card = pipe.card
            on_base = score(pipe, control, data, args.num_samples, seeds, use, base=base)
            results.append({"control": name, "row": label, "source": source, "train_s": card.get("train_seconds"),
                            "steps": card.get("steps"), **score(pipe, control, data, args.num_samples, seeds, use),
                            "consistency_base_controls": on_base["consistency"], "fd_base_controls": on_base["fd"]})
    print(f"protocol: {args.num_samples} samples x seeds {seeds}, balanced labels, independent noise; controls of "
          "the data row's digit | of the base's sample from other noise; consistency = mean |C(out) - c| on [0, 1]; "
          "onestep-digits FD vs 1797 digits")
    print(f"{'':51} {'---- data controls ----':>31}   {'---- base controls ----':>31}")
    print(f"{'control':14} {'row':36} {'consistency':>17} {'FD':>13}   {'consistency':>17} {'FD':>13} "
          f"{'train s':>8}  source")
    for r in results:
        if "fd" not in r:
            print(f"{r['control']:14} {r['row']:36} {'-':>17} {'-':>13}   {'-':>17} {'-':>13} {'-':>8}  {r['source']}")
            continue
        train = f"{r['train_s']:.0f}" if r.get("train_s") else "-"
        print(f"{r['control']:14} {r['row']:36} {_ms(r['consistency']):>17} {_ms(r['fd']):>13}   "
              f"{_ms(r['consistency_base_controls']):>17} {_ms(r['fd_base_controls']):>13} {train:>8}  "
              f"{r['source']}")
    if args.png:
        picture(args.png, data, pipes)
        print(f"wrote {args.png}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
