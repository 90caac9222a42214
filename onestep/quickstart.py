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
from .eval.speed import images_per_second
from .resources import DIGITS_TEACHER, recipe_path
from .sampling.samplers import sample_euler, teacher_sigmas
from .training.config import load_config
from .training.trainer import Trainer, generate
from .training.visuals import side_by_side

QUICKSTART_RECIPE = "quickstart_digits16.yaml"
TEACHER_STEPS = 50
THROUGHPUT_BATCH = 256


def run_quickstart(out: str | Path, steps: int | None = None, fid_samples: int | None = None,
                   overrides: list[str] | tuple = ()) -> dict:
    t0 = time.time()
    out = Path(out)
    settings = [f"output_dir={out}", f"teacher={DIGITS_TEACHER}", *overrides]
    if steps:
        settings.append(f"train.steps={steps}")
    if fid_samples:
        settings.append(f"eval.num_samples={fid_samples}")
    config = load_config(recipe_path(QUICKSTART_RECIPE), settings)
    trainer = Trainer(config)
    result = trainer.train()  # distils, evaluates the EMA student, exports out/pipeline

    teacher, data, device = trainer.teacher, trainer.data, trainer.accelerator.device
    student = trainer.ema_network()
    sigmas = teacher_sigmas(teacher.schedule, TEACHER_STEPS)
    run_teacher = lambda noise, **cond: sample_euler(teacher, noise, sigmas, **cond)  # noqa: E731
    run_student = lambda noise, **cond: student(noise, **cond)  # noqa: E731
    n = config.eval.num_samples
    teacher_fid = frechet_distance(generate(run_teacher, data, teacher.sample_shape, n, config.seed + 1, device),
                                   trainer.pixels.cpu())
    noise, cond = trainer.fixed_noise, trainer.fixed_cond  # the sample grids' inputs: labels cycle 0..9
    with torch.no_grad():
        side_by_side(run_teacher(noise, **cond), run_student(noise, **cond), out / "samples.png",
                     (f"teacher, DDIM {TEACHER_STEPS} steps", "student, 1 step (same noise and labels)"))
    speed = throughput(run_teacher, run_student, teacher, data, device)

    extractor = config.eval.feature_extractor
    metrics = {
        "teacher_fid": teacher_fid, "student_fid": result["fid"],
        "teacher_nfe": TEACHER_STEPS, "student_nfe": 1,
        "images_per_s_teacher": speed["teacher"], "images_per_s_student": speed["student"],
        "speedup": speed["student"] / speed["teacher"],
        "fid_protocol": fid_protocol(extractor, n, len(data), "digits (all 1797, 16x16)", "teacher 50 / student 1"),
        "distill_steps": config.train.steps, "train_seconds": result["train_seconds"],
        "wall_s": time.time() - t0,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    card_file = out / "pipeline" / "onestep_card.json"
    card = json.loads(card_file.read_text())
    card.update(fid=metrics["student_fid"], teacher_fid=teacher_fid, fid_protocol=metrics["fid_protocol"])
    card_file.write_text(json.dumps(card, indent=2) + "\n")
    return metrics


def throughput(run_teacher, run_student, teacher, data, device, batch: int = THROUGHPUT_BATCH) -> dict:
    """Images/s of the teacher (50 steps) and the student (1 step), measured side by side on the same batch."""
    noise = torch.randn((batch, *teacher.sample_shape), generator=torch.Generator().manual_seed(0)).to(device)
    rows = torch.arange(batch) % len(data)
    cond = {k: v[rows.to(v.device)] for k, v in (data.cond or {}).items()}
    with torch.no_grad():
        return {"student": images_per_second(lambda: run_student(noise, **cond), batch, repeats=5),
                "teacher": images_per_second(lambda: run_teacher(noise, **cond), batch, repeats=1)}
