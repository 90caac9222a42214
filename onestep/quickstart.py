"""The embedded quickstart: distil the shipped digits teacher on CPU, then measure teacher vs student.

Everything it needs ships with the project (the teacher in assets/teachers/digits16, the digits data with
scikit-learn, the feature extractor in assets/fid), so it runs offline.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .eval import fid_protocol, frechet_distance
from .pipelines.onestep import model_card
from .resources import DIGITS_TEACHER, recipe_path
from .sampling.samplers import sample_euler, teacher_sigmas
from .training.config import load_config
from .training.trainer import Trainer, generate
from .training.visuals import side_by_side

QUICKSTART_RECIPE = "quickstart_digits16.yaml"
TEACHER_STEPS = 50
TIMED_SAMPLES = 64  # images/s of both samplers on one batch when the teacher's FD comes from its card


def run_quickstart(out: str | Path, steps: int | None = None, fid_samples: int | None = None,
                   overrides: list[str] | tuple = (), recompute_teacher_fid: bool = False) -> dict:
    t0 = time.time()
    if not str(out).strip():
        raise ValueError("out: must name a folder, got an empty string (it would mean the current folder)")
    out = Path(out)
    settings = [f"output_dir={out}", f"teacher={DIGITS_TEACHER}", *overrides]
    if steps is not None:
        settings.append(f"train.steps={steps}")
    if fid_samples is not None:
        settings.append(f"eval.num_samples={fid_samples}")
    config = load_config(recipe_path(QUICKSTART_RECIPE), settings)
    trainer = Trainer(config)
    result = trainer.train()  # distils, evaluates the EMA student, exports out/pipeline

    teacher, data, device = trainer.method.denoiser, trainer.data, trainer.accelerator.device  # the teacher's D
    student = trainer.ema_network()
    sigmas = teacher_sigmas(teacher.schedule, TEACHER_STEPS)
    run_teacher = lambda noise, **cond: sample_euler(teacher, noise, sigmas, **cond)  # noqa: E731
    run_student = lambda noise, **cond: student(noise, **cond)  # noqa: E731
    n = config.eval.num_samples
    # Both samplers draw the same inputs as the trainer's final evaluation (seed + 1, balanced labels). The teacher's
    # FD is a property of the shipped teacher and this protocol: it is read from the teacher's card when the card
    # holds it for exactly this protocol, else measured (and then both samplers are timed on all n samples).
    extractor = config.eval.feature_extractor
    protocol = (fid_protocol(extractor, n, len(data), "digits (all 1797, 16x16)", "teacher 50 / student 1")
                + f", balanced labels, seed {config.seed + 1}")
    cached = None if recompute_teacher_fid else teacher_card_fid(protocol)
    timed_n = n if cached is None else min(n, TIMED_SAMPLES)
    draw = lambda run, k: generate(run, data, teacher.sample_shape, k, config.seed + 1, device)  # noqa: E731
    with torch.no_grad():
        teacher_images, teacher_s = timed(draw, run_teacher, timed_n)
        _, student_s = timed(draw, run_student, timed_n)
    teacher_fid = cached if cached is not None else frechet_distance(teacher_images, trainer.pixels.cpu())
    noise, cond = trainer.fixed_noise, trainer.fixed_cond  # the sample grids' inputs: labels cycle 0..9
    with torch.no_grad():
        side_by_side(run_teacher(noise, **cond), run_student(noise, **cond), out / "samples.png",
                     (f"teacher, DDIM {TEACHER_STEPS} steps", "student, 1 step (same noise and labels)"))

    metrics = {
        "teacher_fid": teacher_fid, "student_fid": result["fid"],
        "teacher_fid_source": "teacher card (same protocol)" if cached is not None else "measured now",
        "teacher_nfe": TEACHER_STEPS, "student_nfe": 1,
        "images_per_s_teacher": timed_n / teacher_s, "images_per_s_student": timed_n / student_s,
        "timed_samples": timed_n,
        "speedup": teacher_s / student_s,
        "fid_protocol": protocol,
        "distill_steps": config.train.steps, "train_seconds": result["train_seconds"],
        "wall_s": time.time() - t0,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    card_file = out / "pipeline" / "onestep_card.json"
    card = json.loads(card_file.read_text())
    card.update(fid=metrics["student_fid"], teacher_fid=teacher_fid, fid_protocol=metrics["fid_protocol"])
    card_file.write_text(json.dumps(card, indent=2) + "\n")
    (out / "pipeline" / "README.md").write_text(model_card(card))
    return metrics


def teacher_card_fid(protocol: str, card_file: Path = DIGITS_TEACHER / "onestep_card.json") -> float | None:
    """The shipped teacher's FD under exactly `protocol`, if its card holds it (`fid_by_protocol`)."""
    try:
        value = json.loads(card_file.read_text()).get("fid_by_protocol", {}).get(protocol)
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def timed(fn, *args):
    """(fn(*args), seconds it took)."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start
