"""Checks of values that come from users (recipes, command-line flags, demo requests, Python API arguments), shared
so that every entry point refuses a bad value with the same one-line message."""
from __future__ import annotations

import errno
import math

SHOWN_CHARS = 80  # a value echoed in an error is cut to this many characters (a 1 MB label is not printed back)


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """repr(value) on one line, cut to `limit` characters with the full length said, for error messages."""
    text = value if isinstance(value, str) else None
    out = repr(value)
    if len(out) <= limit:
        return out
    size = f" ({len(text)} characters)" if text is not None else ""
    return out[: limit - 3] + "..." + size


def finite_number(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                  hi_open: bool = False) -> float:
    """`value` as a float, finite and within [lo, hi] (or open ends); ValueError naming `name` and the range."""
    bounds = (("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}") + ", "
              + ("inf" if hi is None else f"{hi:g}") + (")" if hi_open else "]"))
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    ok = math.isfinite(number)
    if ok and lo is not None:
        ok = number > lo if lo_open else number >= lo
    if ok and hi is not None:
        ok = number < hi if hi_open else number <= hi
    if not ok:
        raise ValueError(f"{name} must be a finite number in {bounds}, got {shown(value)}")
    return number


def first_non_finite(value, key: str = ""):
    """(dotted key, value) of the first float that is NaN or infinite in parsed YAML/JSON (dicts, lists), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = first_non_finite(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def is_disk_full(err: BaseException) -> bool:
    """Did a write fail because the device (or the user's quota) is full? OSError ENOSPC/EDQUOT, or safetensors'
    own error (a Rust io::Error "StorageFull", not an OSError)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text
