"""One registry of onestep pipeline classes: an export is loaded by the class its model_index.json names.

    @register_pipeline
    class MyPipeline(GeneratorPipeline): ...

    pipe = load_pipeline("runs/x/pipeline")     # dispatches on model_index.json `_class_name`

`onestep sample`, `onestep fid`, bulk sampling, the demo and the benches load through `load_pipeline` and use only
the `GeneratorPipeline` protocol, so a class works everywhere the day it is registered. `_class_name` is a class
name ("OneStepPipeline") or diffusers' remote-code form ["pipeline", "OneStepPipeline"].
"""
from __future__ import annotations

_REGISTRY: dict[str, type] = {}


def register_pipeline(cls: type) -> type:
    """Class decorator: make `cls` (a GeneratorPipeline subclass) loadable by `load_pipeline`, keyed by its name."""
    from .base import GeneratorPipeline

    if not (isinstance(cls, type) and issubclass(cls, GeneratorPipeline)):
        raise TypeError(f"register_pipeline: {cls!r} is not a GeneratorPipeline subclass")
    known = _REGISTRY.get(cls.__name__)
    if known is not None and known is not cls and known.__module__ != cls.__module__:
        raise ValueError(f"register_pipeline: a pipeline class named {cls.__name__} is registered already (from "
                         f"{known.__module__}); choose another class name")
    _REGISTRY[cls.__name__] = cls
    return cls


def unregister_pipeline(name: str) -> None:
    """Forget a registered class (tests register throw-away classes)."""
    _REGISTRY.pop(name, None)


def available_pipelines() -> dict[str, type]:
    """{class name: class} of every registered pipeline class."""
    return dict(_REGISTRY)


def saved_class_name(index: dict) -> str | None:
    """The pipeline class a model_index.json names (`_class_name`: a name or ["pipeline", name])."""
    name = index.get("_class_name")
    if isinstance(name, list) and name:
        name = name[-1]
    return name if isinstance(name, str) else None


def load_pipeline(path, torch_dtype=None, dtype=None, **kwargs):
    """Load an exported folder (or hub id) with the registered class its model_index.json names; no code from the
    folder runs (its pipeline.py is for plain diffusers). `dtype` is diffusers' newer name for `torch_dtype`."""
    from ..denoisers import read_model_index

    index = read_model_index(str(path))
    name = saved_class_name(index)
    if name not in _REGISTRY:  # a folder saved under another name that a registered class takes (a diffusers teacher)
        name = next((n for n, cls in _REGISTRY.items() if cls.accepts(index)), name)
    if name not in _REGISTRY:
        registered = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(f"{path}: a {name} folder, not a registered onestep pipeline ({registered}; model_index.json "
                         "_class_name); pass the pipeline/ folder a onestep run exported (a teacher with a text "
                         "encoder is distilled with `onestep train`, not sampled here)")
    return _REGISTRY[name].from_pretrained(str(path), torch_dtype=torch_dtype, dtype=dtype, **kwargs)
