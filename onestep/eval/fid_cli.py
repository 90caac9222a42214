"""`onestep fid` and `scripts/fid.py`: FID (optionally KID, precision/recall, Inception Score) through torch-fidelity
between any two inputs, with the protocol attached to every number.

An input is, in this order of precedence:

1. ``onestep:<dataset>``: an embedded onestep dataset (``digits``, ``shapes``, ``folder:<path>``; see
   ``onestep.data.load_dataset``), all rows, at ``--resolution`` (default: the pipeline's output size);
2. an existing folder with ``model_index.json``: an exported pipeline (any registered class, through
   ``onestep.pipelines.load_pipeline``), sampled on the fly (batched, split over all Accelerate processes, features
   gathered in index order);
3. any other existing folder: the ``.png/.jpg/.jpeg`` images directly in it (torch-fidelity's folder reader);
4. a torch-fidelity registered dataset name (``cifar10-train``, ``stl10-test``, ...).

Numbers come from torch-fidelity's own functions (feature extraction, ``fid_features_to_statistics``,
``fid_statistics_to_metric``, KID/PRC/ISC); onestep only decides the inputs, splits generation over processes and
caches reference features/statistics under ``--cache-dir`` by a name that holds the input, its size, the extractor
and a fingerprint of the extractor weights.

Generation is deterministic per sample index, whatever the number of processes: batch ``b`` always holds samples
``[b * B, (b + 1) * B)`` and gets the same inputs, so 1 or N processes compute the very same images. Two ways to draw
the inputs (``--sampling``):

* ``index``: sample i gets noise from its own generator seeded from (seed, i) and class label i mod num_classes:
  the samples (and PNG rounding) of ``onestep sample PIPELINE -n N --out DIR`` at the same --seed and --batch-size;
* ``trainer``: the training evaluation's stream (``onestep.training.trainer.generate``): one
  ``torch.Generator(seed)``, batches of 250, each batch's noise then class labels of random rows of the embedded
  dataset. With ``--seed`` = recipe seed + 1 and ``--num-samples`` = eval.num_samples this reproduces the ``fid``
  of a run's metrics (and the quickstart's ``student_fid``).

By concern: ``fid_inputs`` (what an input names, loading it, reference datasets and their cache names),
``fid_extractors`` (torch-fidelity / onestep feature extractors and their weights), ``fid_generation`` (a
pipeline's features, split over processes), ``fid_statistics`` (cached reference statistics); this module holds the
options, the measurement, its protocol and the command line.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .fid_extractors import INCEPTION, _file_fingerprint, _layers, inception_cache_path, resolve_extractor
from .fid_generation import INDEX_BATCH, SAMPLINGS, TRAINER_EVAL_BATCH, generated_features
from .fid_inputs import Source, _load_onestep_data, _load_pipeline, _pipeline_image_size, resolve_input
from .fid_statistics import _blas_one_thread, _reference_inputs

STANDARD_NUM_SAMPLES = 50_000
KID_SUBSET_SIZE = 1000              # torch-fidelity's default, lowered to the smaller side when needed

__all__ = ["FidOptions", "compute_fid", "format_result", "generated_features", "options_from_args", "protocol_text",
           "resolve_input", "run_from_args"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onestep" / "fid"


@dataclass
class FidOptions:
    input1: str
    input2: str
    num_samples: int = STANDARD_NUM_SAMPLES
    seed: int = 0
    steps: int = 1
    sampling: str | None = None          # None: "trainer" against an embedded dataset, else "index"
    batch_size: int | None = None        # None: 250 (trainer) / 64 (index)
    extractor: str | None = None         # None: onestep-digits with an embedded dataset, else inception-v3-compat
    inception_weights: str | None = None
    kid: bool = False
    prc: bool = False
    isc: bool = False
    resolution: int | None = None
    cache_dir: str | None = None
    cache: bool = True
    datasets_root: str | None = None
    progress: bool = True
    base: str | None = None              # input1 an OMS pipeline: the diffusion base it goes in front of


# --- the whole measurement --------------------------------------------------------------------------------------
def compute_fid(options: FidOptions, accelerator=None) -> dict | None:
    """Measure; returns the result dict on the main process and None on the others."""
    import torch_fidelity
    from accelerate import Accelerator
    from torch_fidelity.metric_fid import (
        fid_features_to_statistics,
        fid_statistics_to_metric,
    )

    from .features import FEATURE_EXTRACTOR, register_feature_extractors

    register_feature_extractors()
    acc = accelerator or Accelerator()
    o = options
    _validate(o)
    sources = [resolve_input(o.input1, "input1"), resolve_input(o.input2, "input2")]
    for s in sources:
        if s.kind == "pipeline":
            _load_pipeline(s, acc.device)
            if getattr(o, "base", None) and s is sources[0]:  # One More Step in front of another base
                from ..cli import _oms_options

                s.pipe = _oms_options(s.pipe, o)[0].to(acc.device)
            if o.steps > s.pipe.max_inference_steps:
                raise ValueError(f"--steps must be 1..{s.pipe.max_inference_steps} network evaluations per sample "
                                 f"for {s.spec}, got {o.steps}")
    embedded = [s for s in sources if s.kind == "onestep"]
    resolution = o.resolution or next((r for r in map(_pipeline_image_size, sources) if r), None)
    for s in embedded:
        _load_onestep_data(s, resolution)
    sampling = o.sampling or ("trainer" if embedded else "index")
    batch_size = o.batch_size or (TRAINER_EVAL_BATCH if sampling == "trainer" else INDEX_BATCH)
    if sampling == "trainer" and batch_size != TRAINER_EVAL_BATCH and any(s.generated for s in sources):
        raise ValueError(f"--sampling trainer uses the training evaluation's batches of {TRAINER_EVAL_BATCH} (they "
                         f"fix its random stream); drop --batch-size {batch_size} or use --sampling index")
    if sampling == "trainer" and any(s.generated for s in sources):
        if not embedded:
            raise ValueError("--sampling trainer draws class labels from the rows of an embedded dataset: give "
                             "onestep:<dataset> as the other input, or use --sampling index")
        if o.steps != 1:
            raise ValueError("--sampling trainer reproduces the training evaluation, which is one step; use --steps 1 "
                             "or --sampling index")
    extractor_name = o.extractor or (FEATURE_EXTRACTOR if embedded else INCEPTION)
    metrics = ["fid"] + [m for m in ("kid", "prc") if getattr(o, m)]
    layers = _layers(extractor_name, metrics + (["isc"] if o.isc else []))
    binary_layers = tuple(layers[m] for m in metrics)
    first_layers = binary_layers + ((layers["isc"],) if o.isc else ())
    cuda = acc.device.type == "cuda"
    with acc.main_process_first():  # the main process downloads the Inception weights (if it may) before the others
        extractor = resolve_extractor(extractor_name, o.inception_weights)
        if any(s.generated for s in sources) or acc.is_main_process:
            extractor.get(first_layers, cuda)
    if not extractor.fingerprint and extractor_name == INCEPTION and inception_cache_path().is_file():
        extractor.fingerprint = _file_fingerprint(inception_cache_path())  # just downloaded
    cache_root = str(Path(o.cache_dir).expanduser() if o.cache_dir else default_cache_dir())
    tf_kwargs = dict(cuda=cuda, batch_size=batch_size, save_cpu_ram=True, verbose=False, cache=o.cache,
                     cache_root=cache_root, rng_seed=2020)
    feats: list[dict | None] = [None, None]
    stats: list[dict | None] = [None, None]
    counts: list[int | None] = [None, None]

    # reference inputs first (main process only): a missing dataset or weights file fails before any generation
    if acc.is_main_process:
        with redirect_stdout(sys.stderr):  # torchvision datasets print to stdout; keep it for the result (--json)
            _reference_inputs(sources, o, extractor, layers, first_layers, binary_layers, cuda, tf_kwargs,
                              cache_root, feats, stats, counts)
    acc.wait_for_everyone()

    for i, s in enumerate(sources):
        if not s.generated:
            continue
        data = next((e.data for e in embedded), None)
        fe = extractor.get(first_layers if i == 0 else binary_layers, cuda)
        feats[i] = generated_features(s.pipe, fe, o.num_samples, o.seed, o.steps, sampling, batch_size, data, acc,
                                      o.progress, desc=f"input{i + 1}: generate + features")
        counts[i] = o.num_samples
    if not acc.is_main_process:
        return None
    for i, s in enumerate(sources):
        if s.generated:
            stats[i] = fid_features_to_statistics(feats[i][layers["fid"]])

    result: dict[str, Any] = {}
    with _blas_one_thread():
        result["fid"] = float(fid_statistics_to_metric(stats[0], stats[1], False)[torch_fidelity.KEY_METRIC_FID])
        kw = {**tf_kwargs, "kid_subset_size": min(KID_SUBSET_SIZE, *counts)}
        if o.kid:
            from torch_fidelity.metric_kid import kid_featuresdict_to_metric

            kid = kid_featuresdict_to_metric(feats[0], feats[1], layers["kid"], **kw)
            result["kid_mean"] = float(kid[torch_fidelity.KEY_METRIC_KID_MEAN])
            result["kid_std"] = float(kid[torch_fidelity.KEY_METRIC_KID_STD])
        if o.prc:
            from torch_fidelity.metric_prc import prc_featuresdict_to_metric

            prc = prc_featuresdict_to_metric(feats[0], feats[1], layers["prc"], **kw)
            result.update(precision=float(prc[torch_fidelity.KEY_METRIC_PRECISION]),
                          recall=float(prc[torch_fidelity.KEY_METRIC_RECALL]),
                          f_score=float(prc[torch_fidelity.KEY_METRIC_F_SCORE]))
        if o.isc:
            from torch_fidelity.metric_isc import isc_featuresdict_to_metric

            isc = isc_featuresdict_to_metric(feats[0], layers["isc"], **kw)
            result["isc_mean"] = float(isc[torch_fidelity.KEY_METRIC_ISC_MEAN])
            result["isc_std"] = float(isc[torch_fidelity.KEY_METRIC_ISC_STD])
    protocol = _protocol(o, sources, counts, extractor, layers, sampling, batch_size, kw["kid_subset_size"],
                         acc.num_processes, cache_root)
    result["protocol"] = protocol
    result["protocol_text"] = protocol_text(protocol)
    return result


def _validate(o: FidOptions) -> None:
    if o.num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (a covariance needs two samples), got {o.num_samples}")
    if not 0 <= o.seed < 2**63:
        raise ValueError(f"--seed must be 0..2^63-1, got {o.seed}")
    from ..sampling.bulk import MAX_BATCH

    if o.steps < 1:
        raise ValueError(f"--steps must be 1 or more network evaluations per sample, got {o.steps}")
    if o.batch_size is not None and not 1 <= o.batch_size <= MAX_BATCH:
        raise ValueError(f"--batch-size must be 1..{MAX_BATCH}, got {o.batch_size}")
    if o.sampling is not None and o.sampling not in SAMPLINGS:
        raise ValueError(f"--sampling must be one of {', '.join(SAMPLINGS)}, got {o.sampling!r}")
    if o.resolution is not None and not 1 <= o.resolution <= 4096:
        raise ValueError(f"--resolution must be 1..4096, got {o.resolution}")


# --- protocol ---------------------------------------------------------------------------------------------------
def _reference_label(s: Source) -> str:
    if s.kind == "onestep":
        h, w = s.data.x.shape[-2:]
        return f"{s.spec}, all rows, {h}x{w}"
    return {"pipeline": "pipeline ", "folder": "image folder "}.get(s.kind, "") + s.spec


def _describe(s: Source, n: int, o: FidOptions, sampling: str, batch_size: int) -> str:
    if s.kind == "pipeline":
        return (f"pipeline {s.spec}, {n} samples, seed {o.seed}, sampling {sampling} (batches of {batch_size}), "
                f"NFE {o.steps}")
    if s.kind == "onestep":
        h, w = s.data.x.shape[-2:]
        return f"{s.spec} (all {n} images, {h}x{w})"
    if s.kind == "folder":
        return f"image folder {s.spec} ({n} images)"
    return f"{s.spec} (torch-fidelity registered dataset, {n} images)"


def _protocol(o, sources, counts, extractor, layers, sampling, batch_size, kid_subset_size, procs, cache_root):
    import torch_fidelity

    from .fid import _EXTRACTOR_NOTES

    note, resize = _EXTRACTOR_NOTES.get(extractor.name, ("custom extractor", "the extractor's own"))
    generated = [s for s in sources if s.generated]
    notes = []
    if extractor.name == INCEPTION and min(counts) < STANDARD_NUM_SAMPLES:
        notes.append(f"fewer than the standard {STANDARD_NUM_SAMPLES} samples on a side: FID is biased upward at "
                     "small N; compare only numbers measured with the same N")
    if o.prc:
        notes.append(f"precision/recall in {extractor.name} features (torch-fidelity's own default for them is vgg16)")
    if extractor.name != INCEPTION:
        notes.append(f"extractor {extractor.name}, not Inception-v3: comparable only with numbers from the same "
                     "extractor")
    protocol = {
        "library": "torch-fidelity",
        "library_version": torch_fidelity.__version__,
        "extractor": extractor.name,
        "extractor_note": note,
        "extractor_weights": extractor.weights_desc,
        "extractor_weights_sha256_12": extractor.fingerprint or None,
        "feature_layers": layers,
        "input1": _describe(sources[0], counts[0], o, sampling, batch_size),
        "input2": _describe(sources[1], counts[1], o, sampling, batch_size),
        "num_samples_1": counts[0],
        "num_samples_2": counts[1],
        "reference": _reference_label(sources[1]),
        "resize": f"{resize}; uint8 RGB inputs (gray repeated to 3 channels), no resize before the extractor",
        "nfe": o.steps if generated else None,
        "seed": o.seed if generated else None,
        "sampling": sampling if generated else None,
        "batch_size": batch_size,
        "processes": procs,
        "kid_subsets": 100 if o.kid else None,
        "kid_subset_size": kid_subset_size if o.kid else None,
        "prc_neighborhood": 3 if o.prc else None,
        "isc_splits": 10 if o.isc else None,
        "cache_dir": cache_root if o.cache else None,
        "notes": notes,
    }
    return protocol


def protocol_text(p: dict) -> str:
    """One line: the project's fid_protocol wording, plus what input1 was."""
    from .fid import fid_protocol

    nfe = p["nfe"] if p["nfe"] is not None else "n/a (no generation)"
    text = fid_protocol(p["extractor"], p["num_samples_1"], p["num_samples_2"], p["reference"], nfe,
                        resize=p["resize"].split(";")[0])
    return f"{text}; input1: {p['input1']}"


def format_result(result: dict) -> str:
    lines = [f"FID {result['fid']:.6g}" + (f" +- {result['fid_sd']:.3g} over seeds {result['seeds']} (each: "
                                           f"{', '.join(f'{v:.4g}' for v in result['fid_per_seed'])})"
                                           if "fid_sd" in result else "")]
    if "kid_mean" in result:
        lines.append(f"KID {result['kid_mean']:.6g} +- {result['kid_std']:.3g}")
    if "precision" in result:
        lines.append(f"precision {result['precision']:.4f}, recall {result['recall']:.4f}, "
                     f"F-score {result['f_score']:.4f}")
    if "isc_mean" in result:
        lines.append(f"Inception Score of input1 ({result['protocol']['extractor']} "
                     f"{result['protocol']['feature_layers']['isc']}) {result['isc_mean']:.6g} +- "
                     f"{result['isc_std']:.3g}")
    lines.append(f"protocol: {result['protocol_text']}")
    lines.extend(f"note: {n}" for n in result["protocol"]["notes"])
    return "\n".join(lines)


# --- command line (shared by `onestep fid` and scripts/fid.py) -------------------------------------------------
def options_from_args(args) -> FidOptions:
    return FidOptions(input1=args.input1, input2=args.input2, num_samples=args.num_samples, seed=args.seed,
                      steps=args.steps, sampling=args.sampling, batch_size=args.batch_size, extractor=args.extractor,
                      inception_weights=args.inception_weights, kid=args.kid, prc=args.prc, isc=args.isc,
                      resolution=args.resolution, cache_dir=args.cache_dir, cache=not args.no_cache,
                      datasets_root=args.datasets_root, progress=not args.no_progress,
                      base=getattr(args, "base", None))


def over_seeds(options: FidOptions, seeds: int, accelerator=None) -> dict | None:
    """`compute_fid` at seeds seed..seed+S-1 (reference statistics computed once, from the cache): the result of the
    first seed with `fid` = the mean, `fid_sd` (sample standard deviation), `fid_per_seed` and `seeds`."""
    import statistics

    results = [compute_fid(replace(options, seed=options.seed + k), accelerator) for k in range(seeds)]
    if results[0] is None or seeds == 1:
        return results[0]
    values = [r["fid"] for r in results]
    result = {**results[0], "fid": statistics.mean(values), "fid_sd": statistics.stdev(values),
              "fid_per_seed": values, "seeds": [options.seed + k for k in range(seeds)]}
    result["protocol_text"] += f"; mean +- sd over {seeds} seeds ({options.seed}..{options.seed + seeds - 1})"
    return result


def run_from_args(args) -> int:
    result = over_seeds(options_from_args(args), getattr(args, "seeds", 1))
    if result is not None:  # main process
        print(json.dumps(result, indent=1) if args.json else format_result(result))
        sys.stdout.flush()
    return 0
