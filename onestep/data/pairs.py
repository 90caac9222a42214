"""(noise, sample) pairs of a teacher's deterministic sampler, written as safetensors shards and read back as data.

The paired-data setting of Rectified Flow / InstaFlow reflow (Liu et al. 2023, arXiv 2209.03003 and 2309.06380),
SlimFlow (Zhu et al. 2024) and Knowledge Distillation of the ODE (Luhman & Luhman 2021): a student regresses the
sample the teacher's ODE reaches from a given noise. Writing the pairs is the expensive part, so it is resumable
and splits over processes:

    OUT/pairs.json                  what was asked: num, shard_size, noise_shape, num_classes, seed, source
    OUT/pairs_000000.safetensors    rows 0..shard_size-1: noise [r, *noise_shape] (unit Gaussian), sample [r, ...],
    OUT/pairs_000001.safetensors    class_labels [r] (row i has label i mod num_classes) for conditional teachers
    ...

Shard s holds rows s*shard_size .. and its noise comes from a generator seeded by (seed, s) alone, so the files are
the same whether 1 or N processes wrote them (process p writes shards p, p+N, ...) and a rerun after a kill writes
exactly the missing or incomplete shards (each is written under a temporary name, then renamed into place).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SHARD_NAME = "pairs_{:06d}.safetensors"
SHARD_RE = re.compile(r"^pairs_(\d{6})\.safetensors$")
TMP_RE = re.compile(r"^\.pairs_\d{6}\.safetensors\.\d+\.tmp$")
MANIFEST = "pairs.json"
META_KEY = "onestep_pairs"
FORMAT = "onestep-pairs/1"
DEFAULT_SHARD_SIZE = 1024
DEFAULT_BATCH_SIZE = 64
MAX_SHARDS = 10**6
_WRITER = "write them with `onestep pairs TEACHER --out DIR -n N` (or onestep.data.pairs.write_pairs)"


@dataclass
class PairsResult:
    out: Path
    num: int            # rows in the whole folder
    shards: int         # shards in the whole folder
    written: int        # shards this process wrote now
    skipped: int        # shards this process found complete
    seconds: float


def shard_generator(seed: int, shard: int) -> torch.Generator:
    """The CPU generator of shard `shard`'s noise: a function of (seed, shard) only (numpy SeedSequence mixing)."""
    state = np.random.SeedSequence([seed, shard]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def write_pairs(sample_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], noise_shape, num: int,
                out_dir, num_classes: int | None = None, seed: int = 0, shard_size: int = DEFAULT_SHARD_SIZE,
                batch_size: int = DEFAULT_BATCH_SIZE, source: dict | None = None, progress: bool = True) -> PairsResult:
    """Write `num` pairs (noise, sample_fn(noise, class_labels)) into `out_dir`, resuming what is there.

    sample_fn gets a [b, *noise_shape] float32 batch on the process's device (accelerate's PartialState) and the
    batch's labels (None for unconditional) and returns the [b, ...] samples. Under `accelerate launch` every process
    calls this with the same arguments and writes its share of the shards. `source` (JSON) describes how the samples
    were made (teacher, sampler, steps); it is recorded, and a rerun must match it like every other argument.
    """
    from accelerate import PartialState
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..safe_io import safetensors_problem

    noise_shape = _check_args(noise_shape, num, num_classes, seed, shard_size, batch_size)
    out = Path(out_dir)
    num_shards = math.ceil(num / shard_size)
    manifest = {"format": FORMAT, "num": num, "shard_size": shard_size, "noise_shape": list(noise_shape),
                "num_classes": num_classes, "seed": seed, "source": source}
    state = PartialState()
    _check_out(out, manifest)  # on every process, before anything is written: all refuse alike
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.iterdir():  # a killed writer's temporary file: never a shard
            if TMP_RE.match(stale.name):
                stale.unlink(missing_ok=True)
        if not (out / MANIFEST).is_file():
            _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    state.wait_for_everyone()

    start, written, skipped = time.perf_counter(), 0, 0
    mine = list(range(state.process_index, num_shards, state.num_processes))
    bar = tqdm(total=sum(_rows(s, num, shard_size) for s in mine), unit="pair", desc=f"pairs -> {out}",
               disable=not (progress and state.is_main_process))
    for shard in mine:
        path, rows = out / SHARD_NAME.format(shard), _rows(shard, num, shard_size)
        if path.is_file() and safetensors_problem(path) is None:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get(META_KEY) == _shard_meta(shard, shard_size, rows, seed):
                    skipped += 1
                    bar.update(rows)
                    continue
        first = shard * shard_size
        noise = torch.randn((rows, *noise_shape), generator=shard_generator(seed, shard))
        labels = None if num_classes is None else torch.arange(first, first + rows) % num_classes
        samples = []
        for b in range(0, rows, batch_size):
            batch_labels = None if labels is None else labels[b: b + batch_size].to(state.device)
            sample = sample_fn(noise[b: b + batch_size].to(state.device), batch_labels)
            if not torch.is_tensor(sample) or len(sample) != len(noise[b: b + batch_size]):
                raise ValueError(f"sample_fn must return a tensor with one row per noise row, got "
                                 f"{type(sample).__name__} {list(getattr(sample, 'shape', []))}")
            samples.append(sample.detach().float().cpu())
            bar.update(len(sample))
        tensors = {"noise": noise, "sample": torch.cat(samples).contiguous()}
        if labels is not None:
            tensors["class_labels"] = labels
        tmp = out / f".{path.name}.{os.getpid()}.tmp"
        save_file(tensors, tmp, metadata={META_KEY: _shard_meta(shard, shard_size, rows, seed)})
        _fsync(tmp)
        os.replace(tmp, path)
        written += 1
    bar.close()
    state.wait_for_everyone()
    return PairsResult(out, num, num_shards, written, skipped, time.perf_counter() - start)


def load_pairs(folder) -> dict:
    """Read every shard of a pairs folder: {"noise", "sample", "class_labels" (or None), "num_classes"}, rows in
    order. Refuses, in one line each, a missing folder, no shards, missing shards (per pairs.json), a corrupt or
    truncated shard and shards whose tensors disagree in shape."""
    from safetensors.torch import load_file

    from ..safe_io import safetensors_problem

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory; set data.name to pairs:<folder of pairs_*.safetensors>, "
                         f"{_WRITER}")
    shards = sorted(p for p in folder.iterdir() if SHARD_RE.match(p.name))
    if not shards:
        raise ValueError(f"{folder}: no pairs_XXXXXX.safetensors shards; {_WRITER}")
    manifest = _read_manifest(folder)
    num_classes = None
    if manifest is not None:
        expected = math.ceil(manifest["num"] / manifest["shard_size"])
        have = {int(SHARD_RE.match(p.name).group(1)) for p in shards}
        missing = sorted(set(range(expected)) - have)
        if missing:
            raise ValueError(f"{folder}: incomplete, {len(missing)} of {expected} shards missing (first "
                             f"{SHARD_NAME.format(missing[0])}); rerun the same writer command to finish it")
        shards = [folder / SHARD_NAME.format(s) for s in range(expected)]
        num_classes = manifest.get("num_classes")
    parts, reference = [], None
    for path in shards:
        problem = safetensors_problem(path)
        if problem is None:
            try:
                tensors = load_file(path)
            except Exception as err:  # SafetensorError and friends
                problem = " ".join(str(err).split())[:200]
        if problem is not None:
            raise ValueError(f"{path}: corrupt shard ({problem}); delete it and rerun the writer, which rewrites it")
        layout = _layout(path, tensors)
        if reference is None:
            reference = (path, layout)
        elif layout != reference[1]:
            raise ValueError(f"{path}: shapes {_describe(layout)} do not match {reference[0].name}'s "
                             f"{_describe(reference[1])}; every shard of a pairs folder must come from one writer run")
        parts.append(tensors)
    labels = torch.cat([p["class_labels"] for p in parts]).long() if "class_labels" in parts[0] else None
    if labels is not None and num_classes is None:
        num_classes = int(labels.max()) + 1
    return {"noise": torch.cat([p["noise"] for p in parts]).float(),
            "sample": torch.cat([p["sample"] for p in parts]).float(), "class_labels": labels,
            "num_classes": num_classes}


def _layout(path: Path, tensors: dict) -> tuple:
    if "noise" not in tensors or "sample" not in tensors:
        raise ValueError(f"{path}: a pairs shard needs tensors 'noise' and 'sample' (has {sorted(tensors)}); "
                         f"{_WRITER}")
    rows = {k: len(v) for k, v in tensors.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"{path}: tensors have different row counts {rows}; delete the shard and rerun the writer")
    return (tuple(tensors["noise"].shape[1:]), tuple(tensors["sample"].shape[1:]), "class_labels" in tensors)


def _describe(layout: tuple) -> str:
    noise, sample, labelled = layout
    return f"noise {list(noise)}, sample {list(sample)}{', class_labels' if labelled else ''}"


def _shard_meta(shard: int, shard_size: int, rows: int, seed: int) -> str:
    """The shard's header metadata, one JSON string (a single key keeps the file bytes independent of the writer:
    safetensors stores metadata in a hash map, whose order varies between processes)."""
    return json.dumps({"shard": shard, "first_row": shard * shard_size, "rows": rows, "seed": seed}, sort_keys=True)


def _rows(shard: int, num: int, shard_size: int) -> int:
    return min(shard_size, num - shard * shard_size)


def _check_args(noise_shape, num, num_classes, seed, shard_size, batch_size) -> tuple[int, ...]:
    def positive_int(value):
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    shape = tuple(noise_shape) if isinstance(noise_shape, (list, tuple, torch.Size)) else None
    if not shape or not all(positive_int(v) for v in shape):
        raise ValueError(f"noise_shape must be a tuple of positive ints (one sample's shape), got {noise_shape!r}")
    if not positive_int(num):
        raise ValueError(f"num (-n) must be a positive int, got {num!r}")
    if num_classes is not None and not positive_int(num_classes):
        raise ValueError(f"num_classes must be a positive int or None (unconditional), got {num_classes!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in 0..2^63-1, got {seed!r}")
    if not positive_int(shard_size) or not positive_int(batch_size):
        raise ValueError(f"shard_size and batch_size must be positive ints, got {shard_size!r}, {batch_size!r}")
    if math.ceil(num / shard_size) > MAX_SHARDS:
        raise ValueError(f"{num} pairs in shards of {shard_size} is more than {MAX_SHARDS} shards; raise shard_size")
    return shape


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({' '.join(str(err).split())}); delete it only together with "
                         "the shards, or rewrite the folder") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("num"), int) and isinstance(manifest.get("shard_size"), int)
            and manifest["num"] > 0 and manifest["shard_size"] > 0):
        raise ValueError(f"{path}: not a {FORMAT} manifest; {_WRITER}")
    return manifest


def _check_out(out: Path, manifest: dict) -> None:
    """The output folder is new, empty, or a pairs folder of the same settings (then it is resumed)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; pass a folder for the pairs (--out DIR)")
    if not out.is_dir():
        return
    found = _read_manifest(out)
    if found is None:
        if any(out.iterdir()):
            raise ValueError(f"{out}: folder is not empty and was not written by the pair writer (no {MANIFEST}); "
                             "choose a new or empty folder")
        return
    differ = [k for k in manifest if found.get(k) != manifest[k]]
    if differ:
        was = ", ".join(f"{k}={found.get(k)!r}" for k in differ)
        now = ", ".join(f"{k}={manifest[k]!r}" for k in differ)
        raise ValueError(f"{out}: holds pairs written with other settings ({was}; now {now}); rerun with those "
                         "settings to finish that folder, or write to a new --out")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
