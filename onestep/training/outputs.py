"""What a training run writes into its output_dir, and what a new run does with a folder that already holds such files.

A run marks its folder (RUN_MARKER, written before anything else) so that a later run can tell an earlier onestep
run's results from a user's own files of the same names (`--set output_dir=.` next to a `pipeline/` of their own):

* a fresh run into an earlier run's folder moves that run's results (checkpoints, pipeline, metrics, curves,
  samples, logs, config) to `earlier_<time>/` in the same folder, so nothing is replaced and `--resume latest` never
  picks the earlier run;
* any run (fresh or `--resume`) into a folder holding one of these names that onestep did not write is refused
  before anything is written: nothing of the user's is moved, replaced or deleted.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

RUN_MARKER = "onestep_run.json"
# Everything a run (train, pretrain, quickstart) writes into output_dir, marker last (moved with the rest).
RESULTS = ("checkpoints", "pipeline", "pipeline_raw", "samples", "logs", "metrics.jsonl", "loss_curve.png", "fid_curve.png",
           "config.yaml", "samples.png", "metrics.json", RUN_MARKER)
# Names whose presence in a folder not written by onestep means a run would replace or delete the user's files
# (logs/ is not one: TensorBoard only adds files to it).
WOULD_REPLACE = tuple(name for name in RESULTS if name not in ("logs", RUN_MARKER))


def written_by_onestep(out: Path) -> bool:
    """Is `out` an earlier onestep run's folder? Its marker; for runs older than the marker, an exported pipeline
    with onestep's model card, or a checkpoint with the trainer's state file."""
    from ..pipelines.onestep import CARD_FILE

    if (out / RUN_MARKER).is_file() or (out / "pipeline" / CARD_FILE).is_file():
        return True
    checkpoints = out / "checkpoints"
    return checkpoints.is_dir() and any((p / "trainer_state.json").is_file() for p in checkpoints.glob("step_*"))


def _present(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def refuse_foreign_files(out: Path) -> list[str]:
    """Read-only (safe on every process at once): raise ValueError if `out` is not a folder, or holds files a run
    would replace that onestep did not write. Returns the names of an earlier run's results present in it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out}: is a file, not a folder; choose a new output_dir")
    if not out.is_dir():
        return []
    present = [name for name in RESULTS if _present(out / name)]
    if present and not written_by_onestep(out):
        foreign = [name for name in present if name in WOULD_REPLACE]
        if foreign:
            more = f" (and {', '.join(foreign[1:])})" if foreign[1:] else ""
            raise ValueError(f"output_dir {out}: holds {foreign[0]}{more}, which onestep did not write and a run "
                             "would replace; nothing was changed: choose a new or empty output_dir, or move those "
                             "files away")
        return []
    return present


def claim_output_dir(out: Path, resume: bool) -> str | None:
    """Make `out` ready for a run before it writes anything (see the module docstring; call it on one process).
    Returns a line saying what was set aside (None if nothing); raises ValueError, having changed nothing, for a
    folder holding files that onestep did not write."""
    present = refuse_foreign_files(out)
    if not present or resume:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = out / f"earlier_{stamp}", 1
    while aside.exists():
        n += 1
        aside = out / f"earlier_{stamp}_{n}"
    aside.mkdir()
    for name in present:
        os.replace(out / name, aside / name)
    return (f"{out} held an earlier run's results ({', '.join(present)}): moved to {aside} (continue a run with "
            "--resume latest instead)")


def mark_run(out: Path, config_text: str) -> None:
    """Write the marker (first) and the run's config.yaml into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    marker = {"written_by": "onestep", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}
    if not (out / RUN_MARKER).is_file():
        (out / RUN_MARKER).write_text(json.dumps(marker) + "\n")
    (out / "config.yaml").write_text(config_text)


