"""Weight arithmetic between model folders: theta_out = theta_custom + (theta_nitro - theta_base).

NitroFusion (Chen et al., CVPR 2025, arXiv 2412.02030, sec. 4.6) moves its few-step training onto a custom fine-tune
of the same base model without training: the difference its training made to the base (nitro - base) is added to
the custom weights. The three inputs are safetensors folders (a diffusers pipeline or model folder, a onestep export:
every *.safetensors below the folder, matched by relative path and tensor name) or single .safetensors files. The
output copies CUSTOM (configs and all) and replaces its weights with the merged ones, in CUSTOM's dtypes; the sum is
computed in float32 (float64 for float64 tensors). Keys, files or shapes that differ between the three are refused
with one line naming the first one: an arithmetic over misaligned tensors would produce a silently broken model.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .safe_io import refuse_pickle, safetensors_problem


def weight_files(root: Path) -> dict[str, Path]:
    """{relative path: file} of the safetensors weights of a folder (recursively) or of one .safetensors file."""
    refuse_pickle(root)
    if root.is_file():
        if root.suffix != ".safetensors":
            raise ValueError(f"{root}: not a .safetensors file; pass a safetensors file or a model folder")
        return {root.name: root}
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder or file")
    files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*.safetensors"))}
    if not files:
        raise ValueError(f"{root}: no *.safetensors weights in this folder; pass a model folder saved with "
                         "safetensors (save_pretrained(..., safe_serialization=True))")
    return files


def _headers(files: dict[str, Path]) -> dict[tuple[str, str], tuple[str, tuple[int, ...]]]:
    """{(file, tensor name): (dtype, shape)} read from the headers only."""
    out = {}
    for rel, path in files.items():
        problem = safetensors_problem(path)
        if problem:
            raise ValueError(f"{path}: {problem}; re-save the weights")
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[(rel, key)] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def check_aligned(base: Path, nitro: Path, custom: Path) -> dict[str, Path]:
    """The custom folder's weight files, once the three folders hold the same files, tensor names and shapes."""
    named = {"BASE": Path(base), "NITRO": Path(nitro), "CUSTOM": Path(custom)}
    files = {name: weight_files(path) for name, path in named.items()}
    headers = {name: _headers(f) for name, f in files.items()}
    reference = headers["BASE"]
    for name in ("NITRO", "CUSTOM"):
        other = headers[name]
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        if missing:
            rel, key = missing[0]
            raise ValueError(f"merge-weights: {name} {named[name]} has no tensor {key!r} ({rel}) that BASE has "
                             f"({len(missing)} missing); the three must be the same architecture")
        if extra:
            rel, key = extra[0]
            raise ValueError(f"merge-weights: {name} {named[name]} has a tensor {key!r} ({rel}) that BASE lacks "
                             f"({len(extra)} extra); the three must be the same architecture")
        for k, (dtype, shape) in reference.items():
            if other[k][1] != shape:
                raise ValueError(f"merge-weights: tensor {k[1]!r} ({k[0]}) is {list(shape)} in BASE but "
                                 f"{list(other[k][1])} in {name}; the three must be the same architecture")
    return files["CUSTOM"]


@torch.no_grad()
def merge_weights(base, nitro, custom, out, scale: float = 1.0) -> dict[str, int]:
    """Write CUSTOM + scale (NITRO - BASE) to `out` (a new folder, or a file when CUSTOM is one). Non-float tensors
    (integer buffers) are taken from CUSTOM. Returns counts of merged and copied tensors."""
    base, nitro, custom, out = Path(base), Path(nitro), Path(custom), Path(out)
    custom_files = check_aligned(base, nitro, custom)
    base_files, nitro_files = weight_files(base), weight_files(nitro)
    if out.exists():
        raise ValueError(f"merge-weights: {out} exists; pass a new --out path")
    if custom.is_dir():
        shutil.copytree(custom, out, ignore=shutil.ignore_patterns("*.safetensors"))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
    merged = copied = 0
    for rel, path in custom_files.items():
        tensors = {}
        with safe_open(str(path), "pt") as fc, safe_open(str(base_files[rel]), "pt") as fb, \
                safe_open(str(nitro_files[rel]), "pt") as fn:
            metadata = fc.metadata()
            for key in fc.keys():
                c = fc.get_tensor(key)
                if not c.is_floating_point():
                    tensors[key], copied = c, copied + 1
                    continue
                work = torch.float64 if c.dtype == torch.float64 else torch.float32
                delta = fn.get_tensor(key).to(work) - fb.get_tensor(key).to(work)
                tensors[key] = (c.to(work) + scale * delta).to(c.dtype).contiguous()
                merged += 1
        target = out if custom.is_file() else out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target), metadata=metadata)
    return {"merged": merged, "copied": copied, "files": len(custom_files)}
