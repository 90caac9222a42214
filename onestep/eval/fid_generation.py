"""`onestep fid` generation: features of a pipeline's samples, split over processes, gathered in index order.

Batch b always holds samples [b * B, (b + 1) * B) and gets the same inputs, so 1 or N processes compute the very same
images. Only the `GeneratorPipeline` protocol is used (noise_shape, num_classes, generate), so any registered
pipeline class can be scored.
"""
from __future__ import annotations

import math

import torch

TRAINER_EVAL_BATCH = 250            # onestep.training.trainer.generate's batch_size (its noise / label stream)
INDEX_BATCH = 64                    # onestep sample's default --batch-size (same samples, same PNGs)
SAMPLINGS = ("index", "trainer")


def _uint8_index(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [B, 3, H, W] through `onestep sample`'s own conversion, so features equal the PNGs'."""
    from ..sampling.bulk import to_uint8

    x = torch.from_numpy(to_uint8(x.float().cpu())).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous()


class _TrainerStream:
    """The training evaluation's inputs (`onestep.data.labels.evaluation_inputs`), asked for batch by batch."""

    def __init__(self, data, sample_shape, n: int, batch_size: int, seed: int):
        from ..data.labels import evaluation_inputs

        self.batches = evaluation_inputs(data, sample_shape, n, seed, batch_size)
        self.next_batch = 0

    def draw(self, batch: int):
        """Inputs of batch `batch` (batches must be asked for in increasing order; skipped ones are drawn too)."""
        if batch < self.next_batch:
            raise RuntimeError(f"batch {batch} was drawn already (next is {self.next_batch})")
        while True:
            noise, rows = next(self.batches)
            self.next_batch += 1
            if self.next_batch - 1 == batch:
                return noise, rows


@torch.no_grad()
def generated_features(pipe, feat_extractor, n: int, seed: int, steps: int = 1, sampling: str = "index",
                       batch_size: int = INDEX_BATCH, data=None, accelerator=None, progress: bool = False,
                       desc: str = "generate") -> dict[str, torch.Tensor]:
    """Features of `n` samples of `pipe` (any registered GeneratorPipeline), generated on all processes and
    gathered in index order.

    Batch b holds samples [b * batch_size, ...) and goes to process b mod num_processes; every batch's inputs depend
    only on (seed, b), so the result is the same for any number of processes. Returns {layer: [n, D]} (CPU) on
    every process.
    """
    from tqdm.auto import tqdm

    from ..sampling import bulk
    from .fid import to_uint8_rgb

    procs = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    device = accelerator.device if accelerator else pipe.device
    num_classes = pipe.num_classes
    num_batches = math.ceil(n / batch_size)
    valid = [min(batch_size, n - b * batch_size) for b in range(num_batches)]
    stream = None
    if sampling == "trainer":
        if steps != 1:
            raise ValueError("--sampling trainer reproduces the training evaluation, which is one step; use --steps 1 "
                             "or --sampling index")
        if data is None:
            raise ValueError("--sampling trainer draws class labels from the rows of an embedded dataset: give "
                             "onestep:<dataset> as the other input, or use --sampling index")
        if num_classes and data.labels is None:
            raise ValueError(f"the pipeline is class-conditional but dataset {data.name!r} has no labels")
        stream = _TrainerStream(data, pipe.noise_shape, n, batch_size, seed)
    elif sampling != "index":
        raise ValueError(f"--sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")

    def extract(images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = feat_extractor(images.to(device))
        return feat_extractor.convert_features_tuple_to_dict(out)

    dims: dict[str, int] | None = None
    chunks: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=n, unit="img", desc=desc, dynamic_ncols=True,
               disable=not progress or (accelerator is not None and not accelerator.is_main_process))
    for round_start in range(0, num_batches, procs):
        mine = round_start + rank
        inputs = None
        if stream is not None:  # every process draws every batch of the round, in order, and keeps its own
            for b in range(round_start, min(round_start + procs, num_batches)):
                drawn = stream.draw(b)
                inputs = drawn if b == mine else inputs
        if mine < num_batches:
            start = mine * batch_size
            if stream is None:  # the full batch, like `onestep sample` (a short last batch is padded)
                x = bulk.generate_batch(pipe, range(start, start + batch_size), seed, steps)[:valid[mine]]
                images = _uint8_index(x)
            else:
                noise, rows = inputs
                labels = data.labels[rows] if num_classes else None
                images = to_uint8_rgb(pipe.generate(noise.to(device), 1, class_labels=labels).float().cpu())
            feats = extract(images)
            dims = {k: v.shape[1] for k, v in feats.items()}
            feats = {k: torch.cat([v, v.new_zeros(batch_size - len(v), v.shape[1])]) for k, v in feats.items()}
        else:  # no batch left for this process in the last round: zeros, dropped after the gather
            if dims is None:  # the extractors resize internally, so any image gives the feature sizes
                dims = {k: v.shape[1] for k, v in extract(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).items()}
            feats = {k: torch.zeros(batch_size, d, device=device) for k, d in dims.items()}
        keep = torch.zeros(procs, batch_size, dtype=torch.bool)
        for p in range(procs):
            if round_start + p < num_batches:
                keep[p, :valid[round_start + p]] = True
        for k, v in feats.items():
            gathered = accelerator.gather(v.contiguous()) if accelerator and procs > 1 else v
            chunks.setdefault(k, []).append(gathered.cpu()[keep.flatten()])
        bar.update(int(keep.sum()))
    bar.close()
    return {k: torch.cat(v) for k, v in chunks.items()}

