"""The `onestep` command. Heavy imports happen inside each subcommand so that `--help` answers at once."""
from __future__ import annotations

import argparse
import sys
import textwrap

DESCRIPTION = """\
onestep turns a multi-step diffusion teacher into a one-step generator.

  onestep quickstart --out runs/quickstart      distil the shipped digits teacher on this CPU (~4 min)
  onestep train recipes/digits16_sid.yaml       run a recipe (any method, any diffusers teacher)
  accelerate launch -m onestep train RECIPE     the same on N GPUs / N CPU processes, no code change
  onestep pretrain --data digits --out DIR      train a small teacher on a built-in dataset
  onestep pretrain-ar --out DIR                 train a small VQ + GPT-2 auto-regressive teacher (DD2's)
  onestep pairs TEACHER --out DIR -n 10000      (noise, sample) pairs of a teacher's ODE, data: pairs:DIR
  onestep sample runs/quickstart/pipeline -n 64 --out grid.png
  onestep sample runs/quickstart/pipeline -n 64 --out grid.png --filter keep    drop likely hallucinations
  onestep fid runs/quickstart/pipeline onestep:digits -n 1000 --seed 1    its FID (= the quickstart's student_fid)
  onestep demo runs/quickstart/pipeline         a Gradio app on http://127.0.0.1:7860 (pip install -e ".[demo]")

Run `onestep COMMAND --help` for the options of a command."""


class _UsageError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (`onestep CMD: error: ...`, exit 2), like every other onestep error, instead of
    the usage block (subcommand parsers inherit the class)."""

    def error(self, message):
        raise _UsageError(self.prog, message)


def _whole(lo: int, hi: int | None = None, what: str = ""):
    """An argparse type: a whole number in lo..hi. 0 is refused where it is out of range (it never means "the
    default": leave the flag out for that)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            default = "; leave the flag out for the default" if value == 0 else ""
            raise argparse.ArgumentTypeError(f"must be a whole number {span}{what}, got {shown(text)}{default}")
        return value
    parse.__name__ = "whole number"
    return parse


def _number(lo: float, hi: float):
    """An argparse type: a finite number in lo..hi (nan and inf refused)."""
    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"must be a finite number in {lo:g}..{hi:g}, got {shown(text)}")
        return value
    parse.__name__ = "number"
    return parse


def _path(text: str) -> str:
    """An argparse type: a path that names something (an empty one would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a path, got an empty string (it would mean the current folder)")
    return text


def shown(value) -> str:
    from .checks import shown as _shown

    return _shown(value)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="onestep", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_pretrain(sub)
    _add_pretrain_ar(sub)
    _add_pairs(sub)
    _add_quickstart(sub)
    _add_sample(sub)
    _add_fid(sub)
    _add_demo(sub)
    _add_recipes(sub)
    _add_merge_weights(sub)
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(f"{err.prog}: error: {err}; see `{err.prog} --help`", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        if args.command == "sample":
            print("onestep sample: interrupted (finished files are complete; rerun the same command to write the "
                  "rest)", file=sys.stderr)
        elif args.command == "pairs":
            print("onestep pairs: interrupted (finished shards are complete; rerun the same command to write the "
                  "rest)", file=sys.stderr)
        elif args.command == "fid":
            print("onestep fid: interrupted (nothing was measured; cached reference statistics are complete)",
                  file=sys.stderr)
        else:
            print("onestep: interrupted (the last checkpoint is intact; continue with --resume latest)",
                  file=sys.stderr)
        return 130
    except Exception as err:  # one readable line unless --debug
        if args.debug or not _is_user_error(err):
            raise
        message = _one_line(str(err))
        if _disk_full(err) and "no space left on the device" not in message:  # a bare OSError: what it means here
            next_step = DISK_FULL_NEXT.get(args.command, DISK_FULL_NEXT[None])
            message = f"no space left on the device ({' '.join(message.split())[:300]}); {next_step}"
        print(f"onestep {args.command}: error: {message}", file=sys.stderr)
        return 2


DISK_FULL_NEXT = {
    "sample": "finished files are complete: free space, then rerun the same command to write the rest",
    "fid": "nothing was measured: free space (or pass --no-cache), then rerun",
    None: "the last complete checkpoint is intact: free space, then continue with --resume latest",
}


def _disk_full(err: Exception) -> bool:
    from .checks import is_disk_full

    return is_disk_full(err)


def _one_line(message: str, limit: int = 2000) -> str:
    """An error message as printed: lines kept (a recipe's several problems), each cut to `limit` characters."""
    return "\n".join(line if len(line) <= limit else line[: limit - 3] + "..." for line in message.splitlines())


def _is_user_error(err: Exception) -> bool:
    # TrainingStopped only exists once the trainer was imported: don't import it (and diffusers) to print an error
    trainer = sys.modules.get("onestep.training.trainer")
    stopped = (trainer.TrainingStopped,) if trainer is not None else ()
    return isinstance(err, (ValueError, OSError, FloatingPointError, *stopped)) or _disk_full(err)


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


# --- train ------------------------------------------------------------------------------------------------------
def _add_train(sub):
    p = sub.add_parser("train", help="run a recipe (YAML)", formatter_class=_formatter, description=textwrap.dedent("""\
        Train with a recipe: which teacher, which data, which method, how long. Examples:
          onestep train recipes/digits16_sid.yaml
          onestep train recipes/digits16_sid.yaml --set train.steps=200 --set method.divergence=fkl --set method.loss=ui
          onestep train recipes/digits16_sid.yaml --resume latest          # continue after a crash or Ctrl-C
          accelerate launch --num_processes 2 -m onestep train recipes/digits16_sid.yaml
        Outputs in output_dir: checkpoints/, samples/*.png, metrics.jsonl, loss_curve.png, logs/ (TensorBoard),
        pipeline/ (the exported diffusers pipeline)."""))
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. train.steps=100 (repeatable)")
    p.add_argument("--resume", metavar="latest|PATH", help="resume from the newest checkpoint or a given one")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(run=_run_train)


def _run_train(args):
    from .training.config import dump_config, load_config

    config = load_config(args.recipe, args.overrides)
    if args.dry_run:
        print(dump_config(config), end="")
        return 0
    from .training.trainer import Trainer

    result = Trainer(config, resume=args.resume).train()
    _print_result(result, config.output_dir)


def _print_result(result: dict, out: str):
    import json

    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
    print(f"exported pipeline: {out}/pipeline")


# --- pretrain ---------------------------------------------------------------------------------------------------
def _add_pretrain(sub):
    p = sub.add_parser("pretrain", help="train a small teacher on a built-in dataset", formatter_class=_formatter,
                       description=textwrap.dedent("""\
        Train a small diffusers teacher with denoising score matching on built-in data (no download):
          digits         a class-conditional UNet2DModel (~1 M params), DDPM linear schedule, 16x16
          gaussian_grid  an MLP denoiser with EDM preconditioning on the 5x5 grid
          shapes         an unconditional UNet2DModel (~0.6 M params), DDPM linear schedule, Simple Shapes at 32x32
                         (Aithal et al. 2024; bench/hallucination_shapes.py measures hallucinations on it)
        The result is a diffusers pipeline folder usable as `teacher:` in any recipe."""))
    p.add_argument("--data", default="digits", choices=["digits", "gaussian_grid", "shapes"])
    p.add_argument("--resolution", type=_whole(1, 4096), default=None, help="image size (digits: 16 or 32)")
    p.add_argument("--steps", type=_whole(1), default=None, help="training steps (default: the recipe's)")
    p.add_argument("--out", required=True, type=_path, help="output folder (the teacher is written to OUT/pipeline)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args):
    from .resources import pretrain_recipe
    from .training.config import load_config
    from .training.trainer import Trainer

    overrides = [f"output_dir={args.out}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.resolution is not None:
        overrides.append(f"data.resolution={args.resolution}")
    config = load_config(pretrain_recipe(args.data), overrides)
    _print_result(Trainer(config).train(), config.output_dir)


# --- pretrain-ar (the auto-regressive teacher DD2 distils) ----------------------------------------------------
def _add_pretrain_ar(sub):
    p = sub.add_parser("pretrain-ar", help="train a small VQ tokenizer + GPT-2 auto-regressive teacher",
                       formatter_class=_formatter, description=textwrap.dedent("""\
        Train a small image auto-regressive teacher on built-in data (no download): a diffusers VQModel tokenizer
        (16x16 -> 4x4 codes of a 64-entry codebook) and a class-conditional transformers GPT2LMHeadModel over the
        codes (class token prefix, null class for guidance), saved as an AutoregressiveTeacher folder, the
        teacher of `method: dd2` recipes. The shipped one is assets/teachers/digits16_ar."""))
    p.add_argument("--data", default="digits", choices=["digits", "shapes"])
    p.add_argument("--resolution", type=_whole(8, 256), default=16, help="image size (default 16)")
    p.add_argument("--vq-steps", type=_whole(1), default=None, help="tokenizer training steps (default 800)")
    p.add_argument("--lm-steps", type=_whole(1), default=None, help="transformer training steps (default 2000)")
    p.add_argument("--codes", type=_whole(2, 65536), default=None, help="codebook size (default 64)")
    p.add_argument("--seed", type=_whole(0), default=0)
    p.add_argument("--out", required=True, type=_path, help="output folder (the teacher folder itself)")
    p.set_defaults(run=_run_pretrain_ar)


def _run_pretrain_ar(args):
    from .pretrain_ar import PretrainARConfig, pretrain_ar

    cfg = PretrainARConfig(data=args.data, resolution=args.resolution, seed=args.seed)
    for field, value in (("vq_steps", args.vq_steps), ("lm_steps", args.lm_steps), ("codes", args.codes)):
        if value is not None:
            setattr(cfg, field, value)
    pretrain_ar(args.out, cfg)
    print(f"teacher: {args.out}")


# --- pairs ------------------------------------------------------------------------------------------------------
def _add_pairs(sub):
    p = sub.add_parser("pairs", help="write (noise, sample) pairs of a teacher's deterministic sampler",
                       formatter_class=_formatter, description=textwrap.dedent("""\
        Sample a diffusers teacher's probability-flow ODE (deterministic Euler = DDIM for DDPM teachers) from stored
        Gaussian noise and write the pairs as safetensors shards, the data `pairs:DIR` of reflow-style recipes:
          onestep pairs assets/teachers/digits16 --out runs/pairs -n 10000 --steps 50
          accelerate launch -m onestep pairs TEACHER --out DIR -n 100000       shards split over processes
        Class-conditional teachers get balanced labels (row i: i mod the number of classes). Samples are in the
        teacher's space (latents for a latent teacher). Shard s depends only on --seed and s, so any number of
        processes writes the same files, and rerunning the same command after an interruption writes only the
        missing shards."""))
    p.add_argument("teacher", help="diffusers teacher folder (unconditional or class-conditional)")
    p.add_argument("--out", required=True, help="output folder (pairs_XXXXXX.safetensors + pairs.json)")
    p.add_argument("-n", "--num", type=int, required=True, help="number of pairs")
    p.add_argument("--steps", type=int, default=50, help="Euler steps of the teacher's ODE (default 50)")
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler",
                   help="euler (DDIM for DDPM teachers) or heun (Karras et al. 2022, 2 network calls per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="samples per teacher call")
    p.add_argument("--shard-size", type=int, default=1024, help="pairs per shard file (the unit of resume)")
    p.set_defaults(run=_run_pairs)


def _run_pairs(args):
    from pathlib import Path

    from .data.pairs import write_pairs
    from .denoisers import load_teacher, read_model_index

    if not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be 1..1000 Euler steps, got {args.steps}")
    index = read_model_index(args.teacher)
    if isinstance(index.get("text_encoder"), list) and index["text_encoder"][0] is not None:
        raise ValueError(f"{args.teacher}: a text-to-image teacher needs prompts; onestep pairs writes pairs of "
                         "unconditional and class-conditional teachers")
    from accelerate import PartialState

    from .sampling.samplers import sample_euler, sample_heun, teacher_sigmas

    device = PartialState().device
    teacher = load_teacher(args.teacher).to(device)
    sigmas = teacher_sigmas(teacher.schedule, args.steps).to(device)

    def sample_fn(noise, class_labels):
        cond = {} if class_labels is None else {"class_labels": class_labels}
        return (sample_heun if args.sampler == "heun" else sample_euler)(teacher, noise, sigmas, **cond)

    local = Path(args.teacher)
    source = {"teacher": str(local.resolve()) if local.is_dir() else args.teacher, "sampler": args.sampler,
              "steps": args.steps}
    result = write_pairs(sample_fn, teacher.sample_shape, args.num, args.out, num_classes=teacher.num_classes,
                         seed=args.seed, shard_size=args.shard_size, batch_size=args.batch_size, source=source)
    if PartialState().is_main_process:
        print(f"{result.out}: {result.num} pairs in {result.shards} shards complete ({result.written} written now, "
              f"{result.skipped} already there, by this process) in {result.seconds:.1f} s; use data.name: "
              f"pairs:{result.out}")


# --- quickstart -------------------------------------------------------------------------------------------------
def _add_quickstart(sub):
    p = sub.add_parser("quickstart", help="distil the shipped digits teacher on CPU and report FID / speed",
                       formatter_class=_formatter, description=textwrap.dedent("""\
        Distil the small digits teacher shipped in assets/ into a one-step generator with Uni-Instruct (SiD
        special case), on CPU, then write:
          OUT/pipeline/      the exported OneStepPipeline (diffusers folder, safetensors)
          OUT/samples.png    teacher 50-step vs student 1-step on the same seeds
          OUT/metrics.json   teacher_fid, student_fid, NFEs, images/s of both, fid_protocol, wall_s"""))
    p.add_argument("--out", default="runs/quickstart", type=_path)
    p.add_argument("--steps", type=_whole(1), default=None, help="distillation steps (default: the recipe's)")
    p.add_argument("--fid-samples", type=_whole(2), default=None, help="samples per side for the Frechet distance")
    p.add_argument("--recompute-teacher-fid", action="store_true",
                   help="measure the teacher's FD even when its card holds it for this protocol")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(run=_run_quickstart)


def _run_quickstart(args):
    from .quickstart import run_quickstart

    metrics = run_quickstart(args.out, steps=args.steps, fid_samples=args.fid_samples, overrides=args.overrides,
                             recompute_teacher_fid=args.recompute_teacher_fid)
    print(f"teacher FID {metrics['teacher_fid']:.2f} ({metrics['teacher_nfe']} NFE) | student FID "
          f"{metrics['student_fid']:.2f} ({metrics['student_nfe']} NFE) | {metrics['speedup']:.1f}x faster | "
          f"{metrics['wall_s']:.0f} s")
    print(f"wrote {args.out}/pipeline, {args.out}/samples.png, {args.out}/metrics.json")


# --- sample -----------------------------------------------------------------------------------------------------
def _add_sample(sub):
    p = sub.add_parser("sample", help="generate from an exported pipeline", formatter_class=_formatter,
                       description=textwrap.dedent("""\
        Generate with an exported pipeline folder (any registered onestep pipeline class):
          onestep sample runs/quickstart/pipeline -n 64 --out grid.png         one grid PNG (up to 4096 samples)
          onestep sample runs/quickstart/pipeline -n 10000 --out samples/       numbered PNGs 000000.png, ...
        A folder is filled batch by batch; sample i depends only on --seed and i (at a given --batch-size), so
        rerunning the same command after an interruption writes exactly the missing files.

        Hallucination filter (grid PNG only; Aithal et al. 2024's variance score, one-step probe version):
          onestep sample PIPELINE -n 64 --out grid.png --filter keep              64 lowest of ceil(64 x 1.25) = 80
          onestep sample PIPELINE -n 64 --out grid.png --filter quantile:0.9      of 64, those <= the 0.9-quantile
          onestep sample PIPELINE -n 64 --out grid.png --filter threshold:2e-4    of 64, those scoring <= 2e-4
        Each sample is re-noised to the teacher's last 5 noise levels (4 draws each), denoised, and scored by the
        variance of the 20 predictions (high: the teacher is undecided, e.g. between two modes). The probe denoises
        with --teacher PATH, else the teacher in the pipeline's model card if it is a local folder, else the
        generator's own network (worse). Writes the kept samples' grid and beside it grid.scores.json: every
        sample's score, the kept indices, the filter, the probe levels and the denoiser used."""))
    p.add_argument("pipeline", help="exported pipeline folder")
    p.add_argument("-n", "--num", type=int, default=64, help="number of samples (grid: 1..4096, folder: 1..10^6)")
    p.add_argument("--steps", type=int, default=1, help="1..4 network evaluations per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", type=_path,
                   help="a .png path (one grid) or a folder (numbered PNGs)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per network call when writing a folder")
    p.add_argument("--filter", dest="hal_filter", default=None, metavar="keep|quantile:Q|threshold:T",
                   help="drop likely hallucinations (grid PNG only): keep the -n lowest-scoring of ceil(n x "
                        "--oversample), or of -n those <= the Q-quantile / <= T")
    p.add_argument("--oversample", type=_number(1.0, 4.0), default=1.25,
                   help="--filter keep: candidates per kept sample, 1..4 (default 1.25)")
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="--filter: the diffusers teacher folder the probe denoises with (default: the model card's)")
    # NCT's controlled generators (ControlledOneStepPipeline): the control image(s), grid PNG only
    p.add_argument("--control", default=None, metavar="IMAGE_OR_FOLDER", type=_path,
                   help="control image for a pipeline with control adapters (NCT): one image for every sample, or a "
                        "folder of images used in name order, sample i taking image i mod their number")
    p.add_argument("--control-from-image", action="store_true",
                   help="--control holds ordinary images: compute the control maps with the pipeline's control model")
    # One More Step (onestep/pipelines/oms.py): an OMS pipeline in front of another base, steered by a prompt
    p.add_argument("--base", default=None, metavar="PIPELINE",
                   help="OMS pipelines: put the OMS module in front of this diffusion teacher folder instead")
    p.add_argument("--oms-prompt", default=None, metavar="TEXT", help="OMS pipelines: the low-frequency prompt "
                   "(e.g. dark, bright; grid PNG only)")
    p.add_argument("--oms-guidance-scale", type=_number(0.0, 50.0), default=None, metavar="W",
                   help="OMS pipelines: classifier-free guidance of the OMS step (grid PNG only)")
    p.set_defaults(run=_run_sample)


def _oms_options(pipe, args):
    """(pipeline, extra generate() inputs) for --base / --oms-prompt / --oms-guidance-scale."""
    from .pipelines import load_pipeline

    extras = {k: v for k, v in (("oms_prompt", getattr(args, "oms_prompt", None)),
                                ("oms_guidance_scale", getattr(args, "oms_guidance_scale", None))) if v is not None}
    if (getattr(args, "base", None) or extras) and not hasattr(pipe, "wrap"):
        raise ValueError(f"--base / --oms-prompt / --oms-guidance-scale apply to One More Step pipelines (OMSPipeline); "
                         f"{type(pipe).__name__} is not one")
    if getattr(args, "base", None):
        base = load_pipeline(args.base)
        pipe = pipe.wrap(base)
        pipe.set_progress_bar_config(disable=True)
    return pipe, extras


FILTER_FORMS = "keep, quantile:Q (0 < Q <= 1) or threshold:T (a number >= 0)"


def parse_filter(spec: str, num: int, oversample: float):
    """`--filter` / `--oversample` -> (HalFilter, number of samples to generate); ValueError naming the flag."""
    import math

    from .sampling.hallucination import HalFilter

    kind, _, value = spec.strip().partition(":")
    if kind == "keep" and not value:
        if not (math.isfinite(oversample) and 1.0 <= oversample <= 4.0):
            raise ValueError(f"--oversample must be a number in 1..4 (candidates per kept sample), got {oversample}")
        return HalFilter(keep_n=num), math.ceil(num * oversample)
    try:
        number = float(value) if kind in ("quantile", "threshold") and value else None
    except ValueError:
        number = None
    if number is not None and kind == "quantile" and 0.0 < number <= 1.0:
        return HalFilter(quantile=number), num
    if number is not None and kind == "threshold" and math.isfinite(number) and number >= 0.0:
        return HalFilter(threshold=number), num
    raise ValueError(f"--filter must be {FILTER_FORMS}, got {shown(spec)}")


def _run_sample(args):
    from pathlib import Path

    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from .pipelines import load_pipeline
    from .sampling import bulk
    from .training.visuals import save_samples

    if args.steps < 1:
        raise ValueError(f"--steps must be 1 or more network evaluations per sample, got {args.steps}; use 1 for the "
                         "one-step generator")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be 0..2^63-1, got {args.seed}")
    grid = Path(args.out).suffix.lower() == ".png"
    if not grid and _image_suffix(args.out):
        raise ValueError(f"--out {args.out}: a grid is written as PNG only (.png); pass a .png path for one "
                         "grid, or a folder name without an image extension for numbered PNGs")
    if grid and not 1 <= args.num <= 4096:
        raise ValueError(f"--num must be 1..4096 for one grid PNG, got {args.num}; for more samples write numbered "
                         "PNGs to a folder: --out DIR")
    if not grid and not 1 <= args.num <= bulk.MAX_SAMPLES:
        raise ValueError(f"--num must be 1..{bulk.MAX_SAMPLES} for a folder of PNGs, got {args.num}; split larger "
                         "jobs over several --out folders (or --seed values)")
    if not 1 <= args.batch_size <= bulk.MAX_BATCH:
        raise ValueError(f"--batch-size must be 1..{bulk.MAX_BATCH}, got {args.batch_size}; lower it if memory "
                         "runs out")
    if grid:
        _check_grid_target(Path(args.out), with_scores=args.hal_filter is not None)
    if args.hal_filter is not None and not grid:
        raise ValueError("--filter writes one grid PNG (--out FILE.png); filtering a folder of numbered PNGs is not "
                         "supported (it would break the file-per-index resume)")
    if args.teacher is not None and args.hal_filter is None:
        raise ValueError("--teacher is the hallucination probe's denoiser: it needs --filter")
    if args.hal_filter is not None:
        hal_filter, total = parse_filter(args.hal_filter, args.num, args.oversample)
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe, extras = _oms_options(pipe, args)
    if extras and not grid:
        raise ValueError("--oms-prompt / --oms-guidance-scale: grid PNG only (--out FILE.png)")
    if not 1 <= args.steps <= pipe.max_inference_steps:
        raise ValueError(f"--steps must be 1..{pipe.max_inference_steps} network evaluations per sample, got "
                         f"{args.steps}; use 1 for the one-step generator")
    if pipe.takes_prompt:
        raise ValueError(f"{args.pipeline}: a text-conditional pipeline; `onestep sample` draws class-conditional and "
                         "unconditional samples (call the pipeline with your prompts in Python)")
    if args.hal_filter is not None:
        if not pipe.supports_hallucination_filter:
            raise ValueError(f"--filter: {type(pipe).__name__} does not support the hallucination filter (it needs a "
                             "one-step denoiser of the generator's samples)")
        return _sample_filtered(pipe, args, hal_filter, total)
    if not grid and args.control is not None:
        raise ValueError("--control writes one grid PNG (--out FILE.png); numbered PNGs in a folder take no control")
    if not grid:
        result = bulk.sample_to_folder(pipe, args.out, args.num, seed=args.seed, steps=args.steps,
                                       batch_size=args.batch_size, source=args.pipeline)
        print(f"{result.out}: samples 0..{result.total - 1} complete ({result.written} written now, "
              f"{result.skipped} already there) in {result.seconds:.1f} s")
        return 0
    generator = torch.Generator().manual_seed(args.seed)  # as pipe(batch_size=n, generator=seed) draws
    noise = randn_tensor((args.num, *pipe.noise_shape), generator=generator, dtype=torch.float32)
    x = pipe.generate(noise, args.steps, generator=generator, **extras, **_control_inputs(pipe, args, args.num))
    save_samples(x, Path(args.out))
    print(f"wrote {args.out} ({args.num} samples, {args.steps} step(s))")


def _control_inputs(pipe, args, n: int) -> dict:
    """`--control IMAGE_OR_FOLDER` as the pipeline's `control_image` for n samples ({} without --control)."""
    from pathlib import Path

    from .data.images import open_image

    if args.control is None:
        if args.control_from_image:
            raise ValueError("--control-from-image needs --control IMAGE_OR_FOLDER")
        return {}
    if "control_image" not in pipe.extra_inputs:
        raise ValueError(f"--control: {args.pipeline} has no control adapter (a {type(pipe).__name__}); pass the "
                         "pipeline/ folder of an NCT run")
    source = Path(args.control)
    if source.is_dir():
        files = sorted(f for f in source.iterdir() if f.is_file() and _image_suffix(str(f)))
        if not files:
            raise ValueError(f"--control {source}: the folder holds no images (.png, .jpg, ...)")
    elif source.is_file():
        files = [source]
    else:
        raise ValueError(f"--control {source}: no such image or folder")
    images = [open_image(f, "RGB") for f in files]
    images = [images[i % len(images)] for i in range(n)]
    if len(pipe.adapters) > 1:
        raise ValueError("--control: this pipeline has several adapters; call it from Python with one control per "
                         "adapter (control_image=[...])")
    return {"control_image": pipe.extract_control(images) if args.control_from_image else images}


def _check_grid_target(out, with_scores: bool) -> None:
    """A grid replaces an earlier grid of `onestep sample`, never a file of the user's of the same name."""
    from .training.visuals import written_by_onestep

    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; pass a new .png path for one grid, or a folder path without "
                         "the .png extension for numbered PNGs")
    if out.exists() and not written_by_onestep(out):
        raise ValueError(f"--out {out}: exists and was not written by `onestep sample`; choose another name (the "
                         "file was left as it is)")
    scores = out.with_suffix(".scores.json")
    if with_scores and scores.exists() and not (out.exists() and written_by_onestep(out)):
        raise ValueError(f"--out {out}: {scores.name} exists beside it and was not written with this grid; choose "
                         "another name")


def _image_suffix(path: str) -> bool:
    """Does `path` end in an image file extension PIL knows (.jpg, .webp, .gif, ...)? Then it is not a folder name."""
    from pathlib import Path

    from PIL import Image

    return Path(path).suffix.lower() in Image.registered_extensions()


def _sample_filtered(pipe, args, hal_filter, total: int):
    import json
    from pathlib import Path

    import torch

    from .training.visuals import save_samples

    out = pipe(batch_size=total, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
               output_type="latent", hallucination_filter=hal_filter, hallucination_denoiser=args.teacher)
    grid = Path(args.out)
    report = grid.with_suffix(".scores.json")
    kept, scores = out.kept.tolist(), out.hallucination_scores.tolist()
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({
        "pipeline": str(args.pipeline), "seed": args.seed, "steps": args.steps, "filter": args.hal_filter,
        "oversample": args.oversample if hal_filter.keep_n is not None else None, "generated": total,
        "kept": kept, "scores": scores, "probe_sigmas": out.hallucination_probe["sigmas"],
        "denoiser": out.hallucination_probe["denoiser"], "grid": str(grid)}, indent=1) + "\n")
    if not kept:
        raise ValueError(f"--filter {args.hal_filter}: no sample passed (scores {min(scores):.3g}..{max(scores):.3g}, "
                         f"all in {report}); raise the threshold")
    save_samples(pipe.decode_latents(out.images), grid)
    print(f"wrote {grid} ({len(kept)} of {total} samples kept by --filter {args.hal_filter}, probe: "
          f"{out.hallucination_probe['denoiser']}) and {report}")


# --- fid --------------------------------------------------------------------------------------------------------
def _add_fid(sub):
    p = sub.add_parser("fid", help="FID (and KID, precision/recall, IS) with its protocol, through torch-fidelity",
                       formatter_class=_formatter, description=textwrap.dedent("""\
        Frechet distance between two image sets, computed by torch-fidelity; optionally KID, precision/recall and
        Inception Score. Each INPUT is one of (first match wins):
          onestep:<dataset>   an embedded onestep dataset, all rows: onestep:digits, onestep:shapes, onestep:folder:DIR
          PIPELINE_DIR        an exported pipeline (has model_index.json): -n images are generated on the fly
          IMAGE_DIR           the .png/.jpg/.jpeg files directly in a folder
          NAME                a torch-fidelity dataset: cifar10-train, cifar10-val, stl10-train, ... (downloaded once)
        Examples:
          onestep fid runs/quickstart/pipeline onestep:digits -n 1000 --seed 1
              = the quickstart's student_fid (training evaluation: seed = recipe seed + 1, eval.num_samples samples)
          onestep fid PIPELINE cifar10-train                       standard: Inception-v3, 50k samples, uint8
          onestep fid PIPELINE cifar10-train --inception-weights ~/weights-inception-2015-12-05-6726825d.pth
          onestep fid my_samples/ reference_images/ --kid --prc --isc --json
          accelerate launch -m onestep fid PIPELINE cifar10-train  generation split over processes, same result
        Extractor: inception-v3-compat (torch-fidelity's TF-compatible Inception: the published-FID protocol), but
        onestep-digits when an input is onestep:<dataset> (the project's offline extractor, the quickstart's; its
        numbers are NOT comparable with published FIDs). Inception weights come from torch-fidelity's cache
        ($TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth, downloaded on first use) or from
        --inception-weights PATH; that file is unpickled (torch.load(weights_only=False)): pass only files you trust.
        Sampling: a pipeline's samples are the same for any number of processes.
          --sampling index    (default) sample i from (seed, i), label i mod classes: the PNGs that
                              `onestep sample PIPELINE -n N --out DIR` writes at the same --seed and --batch-size
          --sampling trainer  (default against onestep:<dataset>) the training evaluation's noise and labels
                              (labels of random dataset rows, batches of 250)
        Reference features/statistics are cached in --cache-dir (default ~/.cache/onestep/fid) under a name holding
        the input, its size and content fingerprint, the extractor and its weights' fingerprint. Every result comes
        with its protocol (library + version, extractor, samples per side, reference, resize rule, NFE); --json
        prints {"fid": ..., "kid_mean": ..., "protocol": {...}, "protocol_text": "..."}."""))
    p.add_argument("input1", help="generated side: pipeline folder, image folder, dataset name or onestep:<dataset>")
    p.add_argument("input2", help="reference side (same kinds), e.g. onestep:digits or cifar10-train")
    p.add_argument("-n", "--num-samples", type=int, default=50_000,
                   help="images generated per pipeline input (default 50000, the standard)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (training evaluation: recipe seed + 1)")
    p.add_argument("--seeds", type=_whole(1, 100), default=1, metavar="S",
                   help="measure with seeds SEED..SEED+S-1 and report mean +- sd and each (one draw is not a result)")
    p.add_argument("--steps", type=int, default=1, help="network evaluations per sample, 1..4 (the NFE)")
    p.add_argument("--sampling", choices=["index", "trainer"], default=None,
                   help="how noise and labels are drawn (default: trainer vs onestep:<dataset>, else index)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per network and extractor call (default 64; trainer sampling: 250, fixed)")
    p.add_argument("--extractor", default=None, metavar="NAME",
                   help="torch-fidelity feature extractor (default inception-v3-compat, or onestep-digits vs "
                        "onestep:<dataset>)")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="a trusted local copy of torch-fidelity's Inception weights (.pth, unpickled)")
    p.add_argument("--kid", action="store_true", help="also Kernel Inception Distance (100 subsets of <= 1000)")
    p.add_argument("--prc", action="store_true", help="also precision/recall (3-NN manifolds, same extractor)")
    p.add_argument("--isc", action="store_true", help="also the Inception Score of input1")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size of onestep:<dataset> inputs (default: the pipeline's, else the dataset's)")
    p.add_argument("--cache-dir", default=None, help="reference cache folder (default ~/.cache/onestep/fid)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    p.add_argument("--datasets-root", default=None,
                   help="where torch-fidelity keeps its datasets (default $TORCH_HOME/fidelity_datasets)")
    p.add_argument("--json", action="store_true", help="print one JSON object (numbers + protocol) instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--base", default=None, metavar="PIPELINE",
                   help="input1 an OMS pipeline: put its OMS module in front of this diffusion teacher folder")
    p.set_defaults(run=_run_fid)


def _run_fid(args):
    from .eval.fid_cli import run_from_args

    return run_from_args(args)


# --- demo -------------------------------------------------------------------------------------------------------
def _add_demo(sub):
    p = sub.add_parser("demo", help="a Gradio app over an exported pipeline", formatter_class=_formatter,
                       description=textwrap.dedent("""\
        Serve demo/app.py (a Gradio app: gallery, latency per image, model card, teacher side by side) over an
        exported pipeline folder. Local only: no share link, analytics off, no outbound connection.
          onestep demo                                  assets/pipelines/digits16, else runs/quickstart/pipeline
          onestep demo runs/quickstart/pipeline --port 7861"""))
    p.add_argument("pipeline", nargs="?", help="exported pipeline folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the demo to your network)")
    p.add_argument("--port", type=_whole(1, 65535, " (a TCP port)"), default=7860)
    p.add_argument("--max-images", type=_whole(1, 1024), default=16, help="cap on images per request (1..1024)")
    p.add_argument("--concurrency", type=_whole(1, 64), default=2, help="requests generated at the same time (1..64)")
    p.add_argument("--base", default=None, metavar="PIPELINE",
                   help="an OMS pipeline: put its OMS module in front of this diffusion teacher folder")
    p.set_defaults(run=_run_demo)


def _run_demo(args):
    """demo/app.py ships like recipes/ and assets/ (the checkout's, or the installed package's copy)."""
    import importlib.util

    from .resources import DEMO_APP as path

    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo app is missing from this installation; reinstall onestep")
    spec = importlib.util.spec_from_file_location("onestep_demo_app", path)
    app = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(app)
    app.run(args)


# --- recipes ----------------------------------------------------------------------------------------------------
def _add_recipes(sub):
    p = sub.add_parser("recipes", help="list the shipped recipes, or copy one to start from",
                       formatter_class=_formatter, description=textwrap.dedent("""\
        The recipes that ship with onestep (teacher + data + method + schedule), as YAML files:
          onestep recipes                                   list them
          onestep recipes digits16_sid.yaml                 print one
          onestep recipes digits16_sid.yaml --copy my.yaml  copy it (to a file, or into a folder), then
          onestep train my.yaml                             (paths like assets/teachers/... find the shipped copy)"""))
    p.add_argument("name", nargs="?", help="a recipe name from the list")
    p.add_argument("--copy", metavar="DEST", help="write the recipe to DEST (a file, or a folder to put it in)")
    p.set_defaults(run=_run_recipes)


def _run_recipes(args):
    from .resources import RECIPES, copy_recipe, list_recipes, recipe_path

    if args.name is None:
        if args.copy:
            raise ValueError("--copy: name the recipe to copy; `onestep recipes` lists them")
        print(f"shipped recipes ({RECIPES}):")
        for name in list_recipes():
            first = recipe_path(name).read_text().splitlines()[:1]
            note = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
            print(f"  {name:32s} {note[:80]}")
        return 0
    if args.copy:
        print(f"wrote {copy_recipe(args.name, args.copy)}")
    else:
        print(recipe_path(args.name).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- merge-weights ----------------------------------------------------------------------------------------------
def _add_merge_weights(sub):
    p = sub.add_parser("merge-weights", help="CUSTOM + (NITRO - BASE): move a distillation onto a custom fine-tune",
                       formatter_class=_formatter, description=textwrap.dedent("""\
        NitroFusion's weight arithmetic (Chen et al. 2025, sec. 4.6): the change that distillation made to BASE
        (NITRO - BASE) is added to CUSTOM, a fine-tune of the same BASE, and written to a new folder. Each input is
        a safetensors folder (diffusers model or pipeline folder, onestep export; files matched by relative path) or
        a .safetensors file; different tensor names or shapes are refused.
          onestep merge-weights sd-base/unet nitro/unet my-finetune/unet --out merged/unet"""))
    p.add_argument("base", type=_path, help="the base model the distillation started from")
    p.add_argument("nitro", type=_path, help="the distilled model (started from BASE)")
    p.add_argument("custom", type=_path, help="a fine-tune of BASE to receive the distillation")
    p.add_argument("--out", required=True, type=_path, help="new output folder (or file)")
    p.add_argument("--scale", type=_number(-100, 100), default=1.0, help="multiplier of NITRO - BASE (default 1)")
    p.set_defaults(run=_run_merge_weights)


def _run_merge_weights(args):
    from .merge import merge_weights

    counts = merge_weights(args.base, args.nitro, args.custom, args.out, args.scale)
    print(f"{args.out}: {counts['merged']} tensors merged ({counts['copied']} integer tensors copied from CUSTOM) in "
          f"{counts['files']} file(s)")
