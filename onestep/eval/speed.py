"""Throughput measured the same way everywhere (quickstart, bench/): warm up once, then best of `repeats`."""
from __future__ import annotations

import time

import torch


def images_per_second(generate, batch_size: int, repeats: int = 3) -> float:
    """`generate()` makes `batch_size` images; returns images/s of the fastest of `repeats` timed calls."""
    generate()  # warm-up: allocator, lazy init, cudnn autotune
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batch_size / best
