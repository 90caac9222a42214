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

from ..safe_io import PICKLE_SUFFIXES, refuse_pickle, safetensors_problem  # noqa: F401  (re-exported)
from ..checks import is_disk_full

STEP_DIR = re.compile(r"^step_(\d{7})$")
TMP_DIR = re.compile(r"^\.tmp_step_\d{7}_\d+$")
STATE_FILE = "trainer_state.json"
def load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """load_file with errors that name the file and the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {what} file; {_EARLIER}")
    problem = safetensors_problem(path)
    if problem is None:
        try:
            return load_file(path, device="cpu")
        except Exception as err:  # SafetensorError and friends
            problem = str(err).splitlines()[0]
    raise ValueError(f"{path}: corrupt {what} file ({problem}); {_EARLIER}")


_EARLIER = "resume from an earlier checkpoint (--resume PATH/TO/step_XXXXXXX) or start fresh without --resume"


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
            raise FileNotFoundError(f"--resume latest: no checkpoint under {root}; run without --resume to start "
                                    "fresh (or point output_dir at the run you want to continue)")
        return found[-1]
    refuse_pickle(which)
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {which}: not a onestep checkpoint folder (no {STATE_FILE}); pass a "
                                f"{root}/step_XXXXXXX folder or 'latest'")
    return path


METHOD_STATE_FILE = "method_state.safetensors"


def save_checkpoint(root: Path, step: int, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], state: dict, keep: int,
                    method_state: dict[str, torch.Tensor] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():  # a save killed half-way leaves its temporary folder: never a checkpoint, drop it
        if TMP_DIR.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    try:
        tmp.mkdir()
        _write_checkpoint(tmp, step, modules, optimizers, state, method_state)
    except BaseException as err:  # nothing half-written stays behind, whatever stopped the save
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            last = checkpoint_dirs(root)
            kept = f"the last complete checkpoint, {last[-1]}, is intact" if last else "no earlier checkpoint exists"
            raise OSError(f"not saving step {step}: no space left on the device of {root} (the partial checkpoint "
                          f"was removed; {kept}); free space, then continue with --resume latest") from err
        raise
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    # Retention never deletes the checkpoint just written, even when older runs left higher step numbers here.
    others = [p for p in checkpoint_dirs(root) if p != final]
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, step: int, modules: dict[str, torch.nn.Module],
                      optimizers: dict[str, torch.optim.Optimizer], state: dict,
                      method_state: dict[str, torch.Tensor] | None = None) -> None:
    """Every file of checkpoint `step` into the folder `tmp`, fsynced (non-finite weights are refused)."""
    for name, module in modules.items():
        tensors = _contiguous(module.state_dict())
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"not saving step {step}: {name} has non-finite weights ({bad[0]}, ...)")
        save_file(tensors, tmp / f"{name}.safetensors")
    optimizer_meta = {}
    for name, optimizer in optimizers.items():
        tensors, meta = flatten_optimizer_state(optimizer.state_dict())
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"not saving step {step}: optimizer {name} has non-finite state ({bad[0]}, ...)")
        save_file(tensors, tmp / f"optimizer_{name}.safetensors")
        optimizer_meta[name] = meta
    if method_state:  # state of the method that is not a network (a dual variable, a running statistic)
        tensors = _contiguous(method_state)
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"not saving step {step}: method state {bad[0]} is not finite")
        save_file(tensors, tmp / METHOD_STATE_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "optimizers": optimizer_meta}, indent=1))
    for f in tmp.iterdir():
        _fsync(f)


def read_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json (step, counters, method, optimizer structure)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a onestep checkpoint folder (no {STATE_FILE}); {_EARLIER}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / STATE_FILE}: corrupt ({err}); {_EARLIER}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path / STATE_FILE}: corrupt (no step count); {_EARLIER}")
    return state


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], method=None) -> dict:
    """Load weights, optimizer states and the method's own state in place; returns the saved trainer state."""
    state = read_state(path)
    fit = ("it was made with another teacher or network config: resume with the recipe that made it, or start "
           "fresh without --resume")
    for name, module in modules.items():
        tensors = load_safetensors(path / f"{name}.safetensors", f"{name} weights")
        try:
            module.load_state_dict(tensors)
        except RuntimeError as err:
            detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise ValueError(f"{path}: {name} weights do not fit this recipe's network ({detail}); {fit}") from err
    for name, optimizer in optimizers.items():
        tensors = load_safetensors(path / f"optimizer_{name}.safetensors", f"optimizer {name}")
        try:
            optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizers"][name]))
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise ValueError(f"{path}: optimizer {name} state does not fit this recipe ({err}); {fit}") from err
    if method is not None:
        file = path / METHOD_STATE_FILE
        try:
            method.load_state_dict(load_safetensors(file, "method state") if file.is_file() else {})
        except (KeyError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: method state does not fit this recipe ({err}); {fit}") from err
    return state


def load_initial_weights(module: torch.nn.Module, path: str, network: str, weights: str = "ema") -> None:
    """Start `module` from another run's weights (chained stages): `path` is a onestep export (its network
    component: unet / transformer / ...) or a checkpoint folder (`weights` "ema": the EMA copy when `network` is the
    run's EMA network, "raw": `network`'s trained weights). Tensors are matched by the names of the module's own
    diffusers/transformers model, so a denoiser can start a one-step generator of the same architecture."""
    from ..safe_io import refuse_pickle

    refuse_pickle(path)
    folder = Path(path)
    if (folder / STATE_FILE).is_file():
        state = read_state(folder)
        name = "ema" if weights == "ema" and state.get("ema_network", network) == network else network
        source = load_safetensors(folder / f"{name}.safetensors", f"{name} weights")
    elif (folder / "model_index.json").is_file():
        index = json.loads((folder / "model_index.json").read_text())
        slots = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
                 and k not in ("scheduler", "vae") and not k.startswith(("text_encoder", "tokenizer"))]
        slot = next((k for k in ("unet", "transformer", network) if k in slots), slots[0] if slots else None)
        files = sorted((folder / slot).glob("*.safetensors")) if slot else []
        if not files:
            raise FileNotFoundError(f"{path}: no network weights (*.safetensors) in this export; pass the pipeline/ "
                                    "folder of a finished run, or a checkpoints/step_XXXXXXX folder")
        source = {}
        for file in files:
            source.update(load_safetensors(file, f"{slot} weights"))
    else:
        raise FileNotFoundError(f"init_from {path}: neither a onestep export (model_index.json) nor a checkpoint "
                                f"folder ({STATE_FILE}); pass RUN/pipeline or RUN/checkpoints/step_XXXXXXX")
    target = _weights_owner(module, source)
    missing = [k for k in target.state_dict() if k not in source]
    if missing:
        raise ValueError(f"init_from {path}: its {network} weights do not fit this network (no tensor for "
                         f"{missing[0]!r}); start from a run of the same architecture")
    try:
        target.load_state_dict({k: source[k] for k in target.state_dict()})
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ValueError(f"init_from {path}: {network} weights do not fit this network ({detail}); start from a "
                         "run of the same architecture") from None


def _weights_owner(module: torch.nn.Module, source: dict) -> torch.nn.Module:
    """The outermost sub-module of `module` all of whose tensors are in `source` under one common prefix (a
    checkpoint's `denoiser.model.`, or none for an export's component); `source` is re-keyed to its names in place."""
    for _, sub in module.named_modules():
        keys = list(sub.state_dict())
        if not keys:
            continue
        for key in source:
            prefix = key[: len(key) - len(keys[0])]
            if key.endswith(keys[0]) and (not prefix or prefix.endswith(".")) \
                    and all(prefix + k in source for k in keys):
                picked = {k: source[prefix + k] for k in keys}
                source.clear()
                source.update(picked)
                return sub
    return module


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
