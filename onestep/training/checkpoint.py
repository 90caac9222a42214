"""Full-state checkpoints that survive a crash: safetensors + JSON only, written atomically.

A checkpoint folder `step_XXXXXXX/` holds every trainable network, the EMA copy, every optimizer's state
(tensors in safetensors, structure in JSON) and the trainer's counters. Randomness needs no saving: each step's
random stream is derived from (seed, step, rank). The folder is assembled under a temporary name, every file is
fsynced, then the folder is renamed into place: a kill at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{7})$")
STATE_FILE = "trainer_state.json"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()),
                  key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(root: Path, which: str) -> Path:
    """`latest` -> the newest complete checkpoint under root; otherwise a checkpoint folder path."""
    if which == "latest":
        found = checkpoint_dirs(root)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {root}")
        return found[-1]
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {which}: not a onestep checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(root: Path, step: int, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], state: dict, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        tensors = _contiguous(module.state_dict())
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FloatingPointError(f"not saving step {step}: {name} has non-finite weights ({bad[0]}, ...)")
        save_file(tensors, tmp / f"{name}.safetensors")
    optimizer_meta = {}
    for name, optimizer in optimizers.items():
        tensors, meta = flatten_optimizer_state(optimizer.state_dict())
        save_file(tensors, tmp / f"optimizer_{name}.safetensors")
        optimizer_meta[name] = meta
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizers": optimizer_meta}, indent=1))
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Load weights and optimizer states in place; returns the saved trainer state (step, counters)."""
    state = json.loads((path / STATE_FILE).read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(path / f"{name}.safetensors", device="cpu"))
    for name, optimizer in optimizers.items():
        tensors = load_file(path / f"optimizer_{name}.safetensors", device="cpu")
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizers"][name]))
    return state


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able structure)."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _contiguous(state_dict: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
