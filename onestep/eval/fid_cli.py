"""`onestep fid` and `scripts/fid.py`: FID (optionally KID, precision/recall, Inception Score) through torch-fidelity
between any two inputs, with the protocol attached to every number.

An input is, in this order of precedence:

1. ``onestep:<dataset>``: an embedded onestep dataset (``digits``, ``shapes``, ``folder:<path>``; see
   ``onestep.data.load_dataset``), all rows, at ``--resolution`` (default: the pipeline's output size);
2. an existing folder with ``model_index.json``: an exported OneStepPipeline, sampled on the fly (batched, split over
   all Accelerate processes, features gathered in index order);
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
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STANDARD_NUM_SAMPLES = 50_000
TRAINER_EVAL_BATCH = 250            # onestep.training.trainer.generate's batch_size (its noise / label stream)
INDEX_BATCH = 64                    # onestep sample's default --batch-size (same samples, same PNGs)
KID_SUBSET_SIZE = 1000              # torch-fidelity's default, lowered to the smaller side when needed
INCEPTION = "inception-v3-compat"
ONESTEP_PREFIX = "onestep:"
DOWNLOAD_TIMEOUT_S = 30
SAMPLINGS = ("index", "trainer")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onestep" / "fid"


def inception_file_name() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3.rsplit("/", 1)[-1]


def inception_cache_path() -> Path:
    """Where torch-fidelity's ``load_state_dict_from_url`` looks first (torch hub's checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_file_name()


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


# --- inputs -----------------------------------------------------------------------------------------------------
@dataclass
class Source:
    spec: str
    kind: str                            # pipeline | folder | registered | onestep
    path: Path | None = None
    pipe: Any = None                     # OneStepPipeline
    data: Any = None                     # onestep TensorData
    files: list[str] = field(default_factory=list)

    @property
    def generated(self) -> bool:
        return self.kind == "pipeline"


def resolve_input(spec: str, which: str) -> Source:
    """One input string -> a Source (see the module docstring for the precedence); cheap, loads nothing big."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    if spec.startswith(ONESTEP_PREFIX):
        name = spec[len(ONESTEP_PREFIX):]
        if not name:
            raise ValueError(f"{which} {spec!r}: name the dataset, e.g. onestep:digits")
        return Source(spec, "onestep")
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return Source(spec, "pipeline", path=path)
        files = _image_files(path)
        if not files:
            raise ValueError(f"{which} {spec}: a folder with no model_index.json (not a pipeline) and no .png/.jpg/"
                             ".jpeg images directly in it (subfolders are not searched)")
        return Source(spec, "folder", path=path, files=files)
    if spec in DATASETS_REGISTRY:
        return Source(spec, "registered")
    if path.exists():
        raise ValueError(f"{which} {spec}: a file; give a pipeline folder, an image folder, a torch-fidelity dataset "
                         "name or onestep:<dataset>")
    registered = ", ".join(sorted(DATASETS_REGISTRY))
    raise ValueError(f"{which} {spec!r}: no such folder, and not a torch-fidelity dataset ({registered}) or "
                     "onestep:<dataset> (digits, shapes, folder:<path>)")


def _image_files(folder: Path) -> list[str]:
    """The files torch-fidelity's folder reader takes with its defaults (png/jpg/jpeg directly in the folder)."""
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.utils import glob_samples_paths

    return glob_samples_paths(str(folder), False, DEFAULTS["samples_find_ext"], None, verbose=False)


def _load_pipeline(source: Source, device) -> None:
    from ..pipelines import OneStepPipeline

    pipe = OneStepPipeline.from_pretrained(str(source.path)).to(device)
    if pipe.prompt_encoder is not None:
        raise ValueError(f"{source.spec}: a text-conditional pipeline; onestep fid samples class-conditional and "
                         "unconditional pipelines only (generate images with your prompts, then compare the folders)")
    shape = tuple(pipe.one_step_generator.sample_shape)
    if len(shape) != 3 or (pipe.vae is None and shape[0] not in (1, 3)):
        raise ValueError(f"{source.spec}: generates samples of shape {shape}, not images; FID needs images")
    source.pipe = pipe


def _pipeline_image_size(source: Source) -> int | None:
    if source.pipe is None or source.pipe.vae is not None:
        return None
    return int(source.pipe.one_step_generator.sample_shape[-1])


def _load_onestep_data(source: Source, resolution: int | None) -> None:
    from ..data import load_dataset

    name = source.spec[len(ONESTEP_PREFIX):]
    data = load_dataset(name, resolution)
    if data.kind != "image" or data.x is None:
        raise ValueError(f"{source.spec}: {data.kind} data, not images; FID needs an image dataset (digits, shapes, "
                         "folder:<path>)")
    source.data = data


# --- extractors -------------------------------------------------------------------------------------------------
def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


@dataclass
class Extractor:
    name: str
    weights_kwarg: str | None            # feature_extractor_weights_path passed to torch-fidelity
    weights_desc: str
    fingerprint: str
    instances: dict = field(default_factory=dict)

    def get(self, layers: tuple[str, ...], cuda: bool):
        """A torch-fidelity extractor for these layers (one per layer set: the reference cache is keyed by it)."""
        key = tuple(sorted(set(layers)))
        if key not in self.instances:
            self.instances[key] = _create_extractor(self.name, list(key), self.weights_kwarg, cuda)
        return self.instances[key]


def _create_extractor(name: str, layers: list[str], weights: str | None, cuda: bool):
    from torch_fidelity.utils import create_feature_extractor

    if name != INCEPTION or weights is not None or inception_cache_path().is_file():
        return create_feature_extractor(name, layers, cuda=cuda, verbose=False, feature_extractor_weights_path=weights)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    said = io.StringIO()  # torch.hub's "Downloading: ..." line: shown on success, dropped for the one-line error
    try:
        with redirect_stderr(said):
            extractor = create_feature_extractor(name, layers, cuda=cuda, verbose=False,
                                                 feature_extractor_weights_path=None)
        sys.stderr.write(said.getvalue())
        return extractor
    except Exception as err:  # URLError, timeouts, HTTP errors, a truncated download: all say the same to the user
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        raise FileNotFoundError(
            f"Inception-v3 weights are not in torch-fidelity's cache and the download failed ({reason}); fetch "
            f"{URL_INCEPTION_V3} elsewhere and place it at {inception_cache_path()}, or pass --inception-weights PATH "
            "(a trusted file only: torch-fidelity unpickles it with torch.load(weights_only=False))") from None
    finally:
        socket.setdefaulttimeout(previous)


def resolve_extractor(name: str, inception_weights: str | None) -> Extractor:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from .features import _EXTRACTORS, default_weights_path, register_feature_extractors

    register_feature_extractors()
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"--extractor {name!r}: not registered with torch-fidelity; valid: "
                         f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    if inception_weights is not None:
        if name != INCEPTION:
            raise ValueError(f"--inception-weights applies to --extractor {INCEPTION}, not {name}")
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path}: no such file (expected torch-fidelity's "
                                    f"{inception_file_name()})")
        return Extractor(name, str(path), str(path), _file_fingerprint(path))
    if name in _EXTRACTORS:  # ours: weights ship in assets/fid
        path = default_weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {name} weights not found (scripts/train_feature_extractor.py)")
        return Extractor(name, None, str(path), _file_fingerprint(path))
    if name == INCEPTION:
        cached = inception_cache_path()
        # not there yet: compute_fid fingerprints it after torch-fidelity's download
        return Extractor(name, None, str(cached), _file_fingerprint(cached) if cached.is_file() else "")
    return Extractor(name, None, "torch-fidelity default (downloaded on first use)", "default")


# --- generation -------------------------------------------------------------------------------------------------
def _uint8_index(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [B, 3, H, W] through `onestep sample`'s own conversion, so features equal the PNGs'."""
    from ..sampling.bulk import to_uint8

    x = torch.from_numpy(to_uint8(x.float().cpu())).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous()


class _TrainerStream:
    """The inputs of `onestep.training.trainer.generate`, batch after batch: noise, then random data rows."""

    def __init__(self, seed: int, sample_shape, num_rows: int, n: int, batch_size: int):
        self.g = torch.Generator().manual_seed(seed)
        self.shape, self.num_rows, self.n, self.batch_size = tuple(sample_shape), num_rows, n, batch_size
        self.next_batch = 0

    def draw(self, batch: int):
        """Inputs of batch `batch` (batches must be asked for in increasing order; skipped ones are drawn too)."""
        if batch < self.next_batch:
            raise RuntimeError(f"batch {batch} was drawn already (next is {self.next_batch})")
        while True:
            b = min(self.batch_size, self.n - self.next_batch * self.batch_size)
            noise = torch.randn((b, *self.shape), generator=self.g)
            rows = torch.randint(self.num_rows, (b,), generator=self.g)
            self.next_batch += 1
            if self.next_batch - 1 == batch:
                return noise, rows


@torch.no_grad()
def generated_features(pipe, feat_extractor, n: int, seed: int, steps: int = 1, sampling: str = "index",
                       batch_size: int = INDEX_BATCH, data=None, accelerator=None, progress: bool = False,
                       desc: str = "generate") -> dict[str, torch.Tensor]:
    """Features of `n` samples of `pipe` (a OneStepPipeline), generated on all processes and gathered in index order.

    Batch b holds samples [b * batch_size, ...) and goes to process b mod num_processes; every batch's inputs depend
    only on (seed, b), so the result is the same for any number of processes. Returns {layer: [n, D]} (CPU) on
    every process.
    """
    from tqdm.auto import tqdm

    from ..latents import LatentSpace
    from ..sampling import bulk
    from .fid import to_uint8_rgb

    procs = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    device = accelerator.device if accelerator else pipe.device
    generator = pipe.one_step_generator
    num_classes = generator.denoiser.num_classes
    latents = LatentSpace(pipe.vae) if pipe.vae is not None else None
    to_pixels = (lambda x: latents.decode(x.to(device))) if latents else (lambda x: x)
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
        stream = _TrainerStream(seed, generator.sample_shape, len(data), n, batch_size)
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
                x = bulk.generate_batch(generator, range(start, start + batch_size), seed, steps, device)[:valid[mine]]
                images = _uint8_index(to_pixels(x))
            else:
                noise, rows = inputs
                cond = {"class_labels": data.labels[rows].to(device)} if num_classes else {}
                images = to_uint8_rgb(to_pixels(generator(noise.to(device), **cond)).float().cpu())
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


# --- reference inputs (cached) ----------------------------------------------------------------------------------
class _LazyDataset(torch.utils.data.Dataset):
    """Builds the real dataset only when torch-fidelity needs its items (not when its statistics are cached)."""

    def __init__(self, build: Callable[[], torch.utils.data.Dataset]):
        self._build, self._ds = build, None

    @property
    def ds(self):
        if self._ds is None:
            self._ds = self._build()
        return self._ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def _reference_dataset(source: Source, datasets_root: str | None, progress: bool) -> tuple[Any, str, int | None]:
    """(lazy Dataset of uint8 [3, H, W] images, cache name, number of images if known without building it)."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    from .fid import _Uint8Images

    if source.kind == "onestep":
        images = _Uint8Images(source.data.x)
        digest = hashlib.sha256(images.images.numpy().tobytes()).hexdigest()[:12]
        h, w = images.images.shape[-2:]
        name = f"onestep-{_safe(source.spec[len(ONESTEP_PREFIX):])}-{h}x{w}-n{len(images)}-{digest}"
        return images, name, len(images)
    if source.kind == "folder":
        digest = hashlib.sha256()
        for f in source.files:
            st = os.stat(f)
            digest.update(f"{os.path.basename(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        name = f"folder-{_safe(source.path.resolve().name)}-n{len(source.files)}-{digest.hexdigest()[:12]}"
        from ..data.images import ImageFolderDataset  # the one image reader: sizes, bombs, 16-bit, errors name files

        return _LazyDataset(lambda: ImageFolderDataset(source.files)), name, len(source.files)
    root = datasets_root or os.path.join(torch.hub._get_torch_home(), "fidelity_datasets")  # torch-fidelity's default

    def build():
        os.makedirs(root, exist_ok=True)
        try:
            return DATASETS_REGISTRY[source.spec](root, True)
        except Exception as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
            raise FileNotFoundError(f"{source.spec}: torch-fidelity could not load it from {root} ({reason}); "
                                    "without network, place the torchvision dataset files there (--datasets-root) "
                                    "or compare against an image folder") from None

    return _LazyDataset(build), _safe(source.spec), None


# --- the whole measurement --------------------------------------------------------------------------------------
def _layers(extractor_name: str, metrics: list[str]) -> dict[str, str]:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if extractor_name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"--extractor {extractor_name!r}: not registered with torch-fidelity; valid: "
                         f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor_name]
    return {m: cls.get_default_feature_layer_for_metric(m) for m in metrics}


def _blas_one_thread():
    """torch-fidelity's np.linalg.eigvals on a 2048x2048 product: ~4 s with one BLAS thread, ~60 s with two spinning
    threads on a contended 2-core machine (measured)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


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


def _reference_inputs(sources, o, extractor, layers, first_layers, binary_layers, cuda, tf_kwargs, cache_root,
                      feats, stats, counts) -> None:
    """Features (when KID/PRC/IS need them) and FID statistics of the inputs that are not generated, through
    torch-fidelity's cached functions (keyed by our cache name); fills feats/stats/counts in place."""
    from torch_fidelity.metric_fid import (
        fid_featuresdict_to_statistics_cached,
        fid_input_id_to_statistics_cached,
    )
    from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

    for i, s in enumerate(sources):
        if s.generated:
            continue
        fe = extractor.get(first_layers if i == 0 else binary_layers, cuda)
        dataset, name, counts[i] = _reference_dataset(s, o.datasets_root, o.progress)
        cache_name = f"{name}-w{extractor.fingerprint or 'default'}"
        kw = {**tf_kwargs, "input1": dataset, "input1_cache_name": cache_name, "verbose": o.progress}
        if o.kid or o.prc or (i == 0 and o.isc):
            feats[i] = extract_featuresdict_from_input_id_cached(1, fe, **kw)
            stats[i] = fid_featuresdict_to_statistics_cached(feats[i], cache_name, fe, layers["fid"], **kw)
        else:  # FID only: cached statistics suffice (the dataset is not even built)
            stats[i] = fid_input_id_to_statistics_cached(1, fe, layers["fid"], **kw)
        counts[i] = counts[i] or _cached_count(Path(cache_root), cache_name, dataset, feats[i], o.cache)


def _cached_count(cache_root: Path, cache_name: str, dataset, feats: dict | None, cache: bool) -> int:
    """Number of reference images; remembered beside torch-fidelity's cache so cached statistics need no dataset."""
    if feats is not None:
        n = len(next(iter(feats.values())))
    else:
        meta = cache_root / f"{cache_name}-onestep.json"
        if cache and meta.is_file():
            return int(json.loads(meta.read_text())["num_samples"])
        n = len(dataset)
    if cache:
        cache_root.mkdir(parents=True, exist_ok=True)
        (cache_root / f"{cache_name}-onestep.json").write_text(json.dumps({"num_samples": n}) + "\n")
    return n


def _validate(o: FidOptions) -> None:
    if o.num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (a covariance needs two samples), got {o.num_samples}")
    if not 0 <= o.seed < 2**63:
        raise ValueError(f"--seed must be 0..2^63-1, got {o.seed}")
    from ..pipelines.onestep import MAX_STEPS
    from ..sampling.bulk import MAX_BATCH

    if not 1 <= o.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be 1..{MAX_STEPS} network evaluations per sample, got {o.steps}")
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
    lines = [f"FID {result['fid']:.6g}"]
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
                      datasets_root=args.datasets_root, progress=not args.no_progress)


def run_from_args(args) -> int:
    result = compute_fid(options_from_args(args))
    if result is not None:  # main process
        print(json.dumps(result, indent=1) if args.json else format_result(result))
        sys.stdout.flush()
    return 0
