"""`GeneratorPipeline`: the one inference protocol every onestep artifact implements and every consumer uses.

A class provides (see `GeneratorCallMixin` in standalone_pipeline.py, which also gives it diffusers' `__call__`):

    noise_shape -> tuple[int, ...]      per-sample shape of the input noise
    num_classes -> int | None           class labels it takes
    takes_prompt -> bool                whether it takes text
    max_inference_steps -> int          the most network evaluations per sample
    default_inference_steps -> int      the NFE it is meant to be used at (stated in the model card)
    extra_inputs -> dict[str, str]      further generate() inputs, name -> "image" | "text" | "float"
    card -> dict                        facts about the artifact (teacher, method, NFE, FID + protocol)
    generate(noise, num_inference_steps=1, class_labels=None, prompts=None, generator=None, callback=None, **extra)
        -> images (or points) in [-1, 1], decoded to pixels; a pure function of its inputs
    dummy_components() (classmethod)    tiny random components, so the common tests (tests/test_pipeline_common.py)
                                        cover the class the moment it is registered

`onestep sample`, `onestep fid`, `onestep.sampling.bulk`, the demo and bench/ use only these (plus the optional
hallucination filter below), through `onestep.pipelines.load_pipeline`.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import ClassVar

from diffusers import DiffusionPipeline

from .standalone_pipeline import GeneratorCallMixin

log = logging.getLogger(__name__)


class GeneratorPipeline(GeneratorCallMixin, DiffusionPipeline):
    """Base class of registered onestep pipelines: the protocol (GeneratorCallMixin), loading without running code
    from the folder, and the optional pieces consumers ask for by name."""

    # The hallucination filter (onestep.sampling.hallucination) needs a denoiser of the generator's samples; a class
    # that has one sets this and implements `probe_hallucinations`.
    supports_hallucination_filter: ClassVar[bool] = False
    # Custom-component modules a class's exports name in model_index.json for plain diffusers ([module, class], the
    # file <component>/<module>.py beside the weights) -> the onestep module holding the same code, imported instead
    # of the folder's copy (e.g. DD2's generator: "ar_diffusion" -> onestep.pipelines.standalone_ar_diffusion).
    standalone_modules: ClassVar[dict] = {}

    @classmethod
    def accepts(cls, index: dict) -> bool:
        """Whether this class also loads folders saved under another class name (model_index.json `index`), e.g.
        plain diffusers teacher folders for `TeacherPipeline`."""
        return False

    @classmethod
    def dummy_components(cls) -> dict:
        """Tiny random components `cls(**dummy_components())` builds from (CPU, seconds), for the common tests."""
        raise NotImplementedError(f"{cls.__name__} must provide dummy_components() (tests/test_pipeline_common.py)")

    def probe_hallucinations(self, latents, hal_filter, class_labels=None, prompts=None, generator=None,
                             denoiser=None):
        raise ValueError(f"{type(self).__name__} does not support the hallucination filter (it needs a one-step "
                         "denoiser of the generator's samples)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, dtype=None, **kwargs):
        """Load a saved folder (or hub id) without running any code from it: component classes only from
        diffusers/transformers/onestep, network weights only from safetensors. `dtype` is diffusers' newer name for
        `torch_dtype`."""
        import torch

        from ..denoisers import import_trusted_class, load_component, read_model_index
        from .registry import available_pipelines, saved_class_name

        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError(f"pass dtype or torch_dtype, not both ({dtype} vs {torch_dtype})")
        torch_dtype = torch_dtype if torch_dtype is not None else dtype
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"torch_dtype must be a torch.dtype such as torch.float16, got {torch_dtype!r}")
        path = str(pretrained_model_name_or_path)
        index = read_model_index(path)
        saved_as = saved_class_name(index)
        if saved_as not in (None, cls.__name__, *available_pipelines()) and not cls.accepts(index):
            raise ValueError(f"{path}: a {saved_as} folder, not a {cls.__name__} (model_index.json _class_name); "
                             "pass the pipeline/ folder a onestep run exported (onestep.pipelines.load_pipeline "
                             "opens a diffusers teacher without text as a TeacherPipeline)")
        parameters = inspect.signature(cls.__init__).parameters
        modules, _ = cls._get_signature_keys(cls)
        components, config = {}, {}
        for name, entry in index.items():
            if name.startswith("_"):
                continue
            if name in modules:
                if entry is None or (isinstance(entry, list) and entry and entry[0] is None):
                    continue  # an absent optional component ([null, null])
                if isinstance(entry, list) and len(entry) == 2 and entry[0] in cls.standalone_modules:
                    entry = [cls.standalone_modules[entry[0]], entry[1]]
                klass = import_trusted_class(entry, path)
                extra = {"torch_dtype": torch_dtype} if torch_dtype is not None and issubclass(klass, torch.nn.Module) \
                    else {}
                components[name] = load_component(klass, path, name, **extra, **kwargs)
            elif name in parameters:
                config[name] = entry
            else:
                log.warning("%s: model_index.json key %r is not a %s setting; ignored", path, name, cls.__name__)
        try:
            pipe = cls(**components, **config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a loadable {cls.__name__} ({err}); re-export it with onestep") from err
        pipe.register_to_config(_name_or_path=path)
        return pipe

    # --- the teacher named by the model card (the demo's side-by-side view, the hallucination probe) -------------
    def card_teacher(self):
        """(teacher Denoiser, folder) named by the model card when it is a local diffusers folder (as written, under
        the repository, or relative to this pipeline folder) that loads and makes samples of the generator's noise
        shape; else (None, None). Loaded once."""
        if not hasattr(self, "_card_teacher"):
            self._card_teacher = self._load_card_teacher()
        return self._card_teacher

    def _load_card_teacher(self):
        from ..denoisers import load_teacher
        from ..resources import REPO_ROOT, shipped_path

        name = self.card.get("teacher")
        if not isinstance(name, str):
            return None, None
        here = Path(str(self.config.get("_name_or_path", "")))
        for folder in (Path(name), REPO_ROOT / name, shipped_path(name), here / name):
            if (folder / "model_index.json").is_file():
                try:
                    teacher = load_teacher(str(folder))
                except Exception as err:  # noqa: BLE001  (a broken teacher only means no teacher)
                    log.warning("teacher %s does not load (%s)", folder, err)
                    return None, None
                if tuple(teacher.sample_shape) != tuple(self.noise_shape):
                    log.warning("teacher %s makes %s samples, the generator %s", folder, teacher.sample_shape,
                                self.noise_shape)
                    return None, None
                return teacher, str(folder)
        log.info("teacher %r is not a local diffusers folder", name)
        return None, None
