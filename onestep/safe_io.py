"""The weights policy of the whole package: safetensors only; a Python pickle is refused by name, never opened."""
from __future__ import annotations

import json
from pathlib import Path

# Weight formats that are Python pickles: unpickling can run arbitrary code, so they are refused by name, unread.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickle(path) -> None:
    """Raise a clear error if `path` names a pickle-format weights file (it is never opened)."""
    suffix = Path(str(path)).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: {suffix} files are Python pickles, which can run code when loaded, so onestep "
                         "never opens them; convert the weights to safetensors (load them where you trust the file, "
                         "then save_pretrained(..., safe_serialization=True)) and pass that folder")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (None if it is). Reads the header only."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for a safetensors file"
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            return "truncated (the header runs past the end of the file)"
        try:
            header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file (unreadable header)"
    if size < 8 + header_len + end:
        return f"truncated ({size} of {8 + header_len + end} bytes)"
    return None
