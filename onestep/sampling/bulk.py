"""Long sampling jobs: numbered PNG files written batch by batch, resumable after any interruption.

`onestep sample PIPELINE -n 10000 --out DIR` calls :func:`sample_to_folder`. Guarantees:

* sample i depends only on (seed, i) (its noise comes from its own generator seeded from (seed, i); its class label
  is i mod num_classes) and on the batch it is computed in, [i // batch_size * batch_size, ...) of --batch-size
  samples (a short last batch is padded), so a rerun, or a job extended to a larger -n, regenerates any batch bit
  for bit;
* each file is written under a temporary name and renamed into place, so a file with its final name is complete,
  and a rerun after a kill (or Ctrl-C) writes exactly the missing indices: no duplicates, no gaps; a file is counted
  done only if it is a whole PNG (signature and closing IEND chunk), so one cut short by a full disk or a copy is
  written again;
* one job at a time per folder: DIR/.onestep_sample.lock is held (fcntl.flock) while a job runs, so a second
  `onestep sample` into the same folder is refused at once, and a starting job removes only temporary files of
  jobs that are no longer running;
* DIR/onestep_samples.json records the pipeline (a fingerprint of its weights and configs), seed, steps and batch
  size; a rerun with different settings, or into a folder that onestep did not fill, is refused, never mixed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


MANIFEST = "onestep_samples.json"
LOCK = ".onestep_sample.lock"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = bytes.fromhex("0000000049454e44ae426082")   # the IEND chunk every complete PNG ends with
MAX_SAMPLES = 1_000_000          # file names have 6 digits
MAX_BATCH = 4096
NAME = re.compile(r"^(\d{6})\.png$")
TMP = re.compile(r"^\.\d{6}\.png\.tmp\d+$")


@dataclass
class BulkResult:
    out: Path
    total: int          # samples 0..total-1 now on disk
    written: int        # written by this call
    skipped: int        # already there from an earlier (interrupted) run
    seconds: float


def file_name(index: int) -> str:
    return f"{index:06d}.png"


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s own noise generator (independent streams for every (seed, index))."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def completed_indices(out: Path, num: int) -> set[int]:
    """Indices below num whose file exists under its final name and is a whole PNG (see is_whole_png)."""
    done = set()
    if out.is_dir():
        for entry in os.scandir(out):
            match = NAME.match(entry.name)
            if match and int(match.group(1)) < num and is_whole_png(entry.path):
                done.add(int(match.group(1)))
    return done


def is_whole_png(path) -> bool:
    """Starts with the PNG signature and ends with the IEND chunk (reads 20 bytes): a file cut short is not whole."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return False
            f.seek(0, os.SEEK_END)
            if f.tell() < len(PNG_SIGNATURE) + len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except OSError:
        return False


@contextlib.contextmanager
def folder_lock(out: Path):
    """Hold DIR/.onestep_sample.lock (created with the folder if needed) for one job; another job holding it is
    refused at once with one line. The lock is released when the job ends, however it ends (even SIGKILL)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; give a folder for numbered PNGs (or a .png path for one grid)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create the folder ({err.strerror}); choose another --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ValueError(f"--out {out}: another `onestep sample` (pid {holder}) is writing into this folder; "
                             "wait for it to finish (then rerun to check the job is complete) or choose another "
                             "--out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def pipeline_fingerprint(source: str) -> str:
    """sha256 over the weights and configs of a local pipeline folder (or the hub id itself)."""
    root = Path(source)
    if not root.is_dir():
        return f"id:{source}"
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_folder(out: Path, settings: dict) -> None:
    """Read-only: `out` is absent, empty, or holds an earlier run of the same job (else one-line ValueError)."""
    manifest = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; give a folder for numbered PNGs (or a .png path for one grid)")
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
        except ValueError:
            raise ValueError(f"--out {out}: {MANIFEST} is corrupt; choose a new --out folder") from None
        changed = [k for k in settings if previous.get(k) != settings[k]]
        if changed:
            what = ", ".join(f"{k} {previous.get(k)!r} (now {settings[k]!r})" for k in changed)
            raise ValueError(f"--out {out}: holds samples of another job ({what}); rerun with the same pipeline, "
                             "--seed, --steps and --batch-size to continue it, or choose a new --out folder")
    elif out.is_dir() and any(not TMP.match(name) and name != LOCK for name in os.listdir(out)):
        raise ValueError(f"--out {out}: folder is not empty and was not written by `onestep sample`; choose a new "
                         "or empty folder")


def prepare_folder(out: Path, settings: dict) -> None:
    """Create `out` or check that it holds an earlier run of the same job; drop temporary files of a killed run
    (called holding folder_lock, so no temporary file there belongs to a live job)."""
    check_folder(out, settings)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create the folder ({err.strerror}); choose another --out") from None
    for name in os.listdir(out):
        if TMP.match(name):
            (out / name).unlink(missing_ok=True)
    manifest = out / MANIFEST
    if not manifest.is_file():
        _write_atomic(manifest, (json.dumps(settings, indent=1) + "\n").encode())


@torch.no_grad()
def generate_batch(pipe, indices: range, seed: int, steps: int) -> torch.Tensor:
    """Samples `indices` of the job (images in [-1, 1], on the CPU) from any `GeneratorPipeline`: sample i draws its
    noise, then its re-noising noise, from its own (seed, i) generator, and gets class label i mod num_classes."""
    generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
    noise = randn_tensor((len(indices), *pipe.noise_shape), generator=generators, dtype=torch.float32)
    labels = torch.tensor([i % pipe.num_classes for i in indices]) if pipe.num_classes else None
    return pipe.generate(noise, steps, class_labels=labels, generator=generators).float().cpu()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W, C], rounded like diffusers' numpy_to_pil."""
    images = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (images * 255).round().astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """One PNG, written under a temporary name and renamed into place (a partial file never has the final name)."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:  # a disk filling up mid-file: no half-written temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sample_to_folder(pipe, out_dir, num: int, seed: int = 0, steps: int = 1, batch_size: int = 64,
                     source: str | None = None, progress: bool = True) -> BulkResult:
    """Write samples 0..num-1 of `pipe` (any registered GeneratorPipeline) as out_dir/000000.png, ...; indices
    already on disk (from an interrupted run of the same job) are skipped. `source`: the pipeline folder (for the manifest)."""
    from tqdm.auto import tqdm

    if not 1 <= num <= MAX_SAMPLES:
        raise ValueError(f"--num must be 1..{MAX_SAMPLES} for a folder of PNGs, got {num}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"--batch-size must be 1..{MAX_BATCH}, got {batch_size}")
    if pipe.takes_prompt:
        raise ValueError("this pipeline is text-conditional; `onestep sample` writes class-conditional and "
                         "unconditional samples only (call the pipeline with your prompts)")
    if len(pipe.noise_shape) < 2:  # images, latents, or tokens ([n, d], DD2Pipeline) decoded to images
        raise ValueError(f"this pipeline generates samples of shape {tuple(pipe.noise_shape)}, not 1- or 3-channel "
                         "images; write one plot instead: --out samples.png")
    out = Path(out_dir)
    source = str(source or pipe.config.get("_name_or_path", ""))
    settings = {"format": "png-folder", "pipeline": pipeline_fingerprint(source), "seed": seed, "steps": steps,
                "batch_size": batch_size}
    check_folder(out, settings)  # before the lock file is created in it
    with folder_lock(out):
        prepare_folder(out, settings)
        done = completed_indices(out, num)
        t0, written = time.time(), 0
        bar = tqdm(total=num, initial=len(done), unit="img", desc="sample", disable=not progress, dynamic_ncols=True)
        for start in range(0, num, batch_size):
            todo = [i for i in range(start, min(num, start + batch_size)) if i not in done]
            if not todo:
                continue
            # always the full batch (a short last one is padded), so a job extended with a larger -n gives the same
            # files
            pixels = to_uint8(generate_batch(pipe, range(start, start + batch_size), seed, steps))
            if pixels.shape[-1] not in (1, 3):
                raise ValueError(f"this pipeline generates {pixels.shape[-1]}-channel samples, not 1- or 3-channel "
                                 "images; write one plot instead: --out samples.png")
            for i in todo:
                write_png(out / file_name(i), pixels[i - start])
            written += len(todo)
            bar.update(len(todo))
        bar.close()
    return BulkResult(out, num, written, len(done), time.time() - t0)
