"""Class labels for evaluation: balanced (stratified) and a pure function of the seed.

Drawing evaluation labels from random data rows lets one run of 1000 digits hold 76 to 118 samples of a class, and
that alone moves a Frechet distance by more than the difference between two models. `balanced_labels` gives every
class n // K or n // K + 1 samples, in an order and with a remainder that depend only on (n, K, seed), so the
trainer's evaluation, `onestep fid` and any script that calls it agree sample by sample.
"""
from __future__ import annotations

import torch


def balanced_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """n class labels in [0, num_classes): each class n // K times, the n % K remaining ones to distinct classes
    chosen by the seed, the whole sequence in a seeded random order. Returns int64 [n] on the CPU; exactly the same
    for the same (n, num_classes, seed) on every machine and process (a CPU torch.Generator)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    extra = torch.randperm(num_classes, generator=g)[: n % num_classes]
    labels = torch.cat([torch.arange(num_classes).repeat(n // num_classes), extra])
    return labels[torch.randperm(n, generator=g)]


def rows_with_labels(data_labels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each wanted label, the index of a data row with that label (the k-th occurrence of class c takes the
    k-th row of class c, cycling), so that per-row conditioning can be gathered for balanced labels."""
    data_labels, labels = data_labels.cpu().long(), labels.cpu().long()
    rows = torch.empty_like(labels)
    for c in labels.unique().tolist():
        want = (labels == c).nonzero().flatten()
        have = (data_labels == c).nonzero().flatten()
        if len(have) == 0:
            raise ValueError(f"class {c} has no row in the data; the evaluation needs at least one sample per class")
        rows[want] = have[torch.arange(len(want)) % len(have)]
    return rows


def evaluation_inputs(data, sample_shape, n: int, seed: int, batch_size: int = 250):
    """The inputs of every evaluation sample, batch after batch: (noise [b, *sample_shape], data rows [b]).

    The one stream the trainer's evaluation (`onestep.training.trainer.generate`) and `onestep fid --sampling trainer`
    share: one CPU generator seeded with `seed`; each batch draws its noise, then random rows (drawn in every case so
    the noise stream is the same with or without labels); for class-labelled data the rows are replaced by rows of
    the balanced labels `balanced_labels(n, K, seed)`.
    """
    g = torch.Generator().manual_seed(seed)
    balanced = None
    if data.labels is not None and data.num_classes:
        balanced = rows_with_labels(data.labels, balanced_labels(n, data.num_classes, seed))
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = torch.randn((b, *sample_shape), generator=g)
        rows = torch.randint(len(data), (b,), generator=g)
        yield noise, (balanced[start: start + b] if balanced is not None else rows)
