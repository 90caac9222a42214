"""Recipe files: YAML validated into typed config. Unknown or ill-typed keys are errors naming the key and what
would be valid; `--set a.b=value` overrides any key from the command line."""
from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from ..checks import first_non_finite, shown
from ..methods.base import MethodConfig, StrictModel, get_method

MAX_RECIPE_BYTES = 1 << 20     # a recipe is a few hundred bytes; /dev/zero or a video is not read to the end
MAX_YAML_VALUES = 100_000      # values after expanding aliases: a "billion laughs" recipe is refused, not expanded


class ConfigError(ValueError):
    """A recipe problem, phrased for the user (one line per problem)."""


class DataConfig(StrictModel):
    name: str = Field("digits", description="gaussian_grid | digits | shapes | folder:<path>")
    resolution: int | None = Field(None, gt=0, le=4096)
    channels: Literal[1, 3] | None = Field(None, description="1 or 3: decode image folders as gray/RGB; repeat gray "
                                           "datasets to RGB (default: the dataset's own)")
    num_samples: int | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _name_names_something(cls, value: str):
        kind, colon, rest = value.partition(":")
        if not value.strip() or (colon and not rest.strip()):
            raise ValueError(f"must name a dataset, got {value!r} (an empty path would read the current folder); "
                             "e.g. digits, folder:PATH, prompts:FILE")
        return value


class TeacherConfig(StrictModel):
    path: str = Field(description="local diffusers pipeline folder or hub id")
    guidance_scale: float = Field(1.0, ge=0, le=50, description="classifier-free guidance inside the teacher score, "
                                  "diffusers convention (1 = none); text teachers only")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="teacher weights; outputs and "
                                                             "losses stay float32")
    cpu_offload: bool = Field(False, description="keep the frozen teacher on the CPU, moving layers to the GPU "
                              "only while they run (accelerate.cpu_offload)")

    @field_validator("path")
    @classmethod
    def _shipped(cls, value: str) -> str:
        """`assets/teachers/...` in a shipped recipe run outside the checkout: the installed package's copy."""
        from ..resources import shipped_path

        resolved = shipped_path(value)
        return value if resolved == Path(value) else str(resolved)


class TrainConfig(StrictModel):
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0, le=65536, description="per process")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_clip_norm: float | None = Field(None, gt=0)
    nan_policy: Literal["skip", "stop"] = Field("skip", description="non-finite loss/gradient: skip the update "
                                                "or stop training")
    max_skipped_steps: int = Field(20, ge=0, description="stop after this many skipped (non-finite) updates")
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    sample_every: int = Field(250, gt=0)
    log_every: int = Field(10, gt=0)
    num_sample_images: int = Field(64, gt=0, le=1024)
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule of every optimizer (diffusers.optimization), over train.steps")
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up steps of the schedule")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="split each update's batch into this "
                                             "many micro-batches (less memory; DDP synchronises on the last only)")
    export_raw: bool = Field(False, description="also export the raw (non-EMA) weights to OUT/pipeline_raw")
    channels_last: bool = Field(False, description="keep every network's 4-D weights channels-last (NHWC), which "
                                "oneDNN (CPU) and cuDNN convolutions run faster; exports are written contiguous. "
                                "Measured: python bench/quickstart_speed.py")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _mixed_precision_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false


class InitFromConfig(StrictModel):
    path: str = Field(description="another run's export (RUN/pipeline) or checkpoint (RUN/checkpoints/step_XXXXXXX)")
    network: str | None = Field(None, description="the network's name in that checkpoint (default: the same name)")
    weights: Literal["ema", "raw"] = Field("ema", description="checkpoints: the EMA copy or the trained weights")


class EMAConfig(StrictModel):
    decay: float = Field(0.999, gt=0, lt=1)
    warmup: bool = Field(True, description="ramp the decay as (1 + n)/(10 + n) early on (diffusers EMAModel)")


class EvalConfig(StrictModel):
    every: int = Field(0, ge=0, description="compute FID every N steps (0: only at the end)")
    num_samples: int = Field(1000, gt=0)
    feature_extractor: str = "onestep-digits"
    enabled: bool = True


class RunConfig(StrictModel):
    seed: int = Field(0, ge=0, lt=2**63)
    output_dir: str = "runs/onestep"
    teacher: TeacherConfig | None = Field(None, description="a path / hub id, or {path, guidance_scale, dtype, "
                                          "cpu_offload}")
    data: DataConfig = DataConfig()
    method: MethodConfig
    init_from: dict[str, InitFromConfig] = Field(default_factory=dict, description="start trainable networks from "
                                                 "another run: {network name: path or {path, network, weights}}")
    train: TrainConfig = TrainConfig()
    ema: EMAConfig = EMAConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_not_empty(cls, value):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError("must name a folder (empty would write into the current folder), e.g. runs/my_run")
        return value

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher_as_path(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @field_validator("init_from", mode="before")
    @classmethod
    def _init_from_as_paths(cls, value):
        if isinstance(value, dict):
            return {k: {"path": v} if isinstance(v, str) else v for k, v in value.items()}
        return value


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply `key.sub=value` overrides, validate. Raises ConfigError with readable lines."""
    path = Path(path)
    raw = load_yaml(read_recipe_text(path), str(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys (seed, teacher, data, method, train, ...); "
                          "see recipes/ for examples")
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw, source=str(path))


def read_recipe_text(path: Path) -> str:
    """The recipe's text: a file, or a pipe / device such as /dev/stdin (read up to MAX_RECIPE_BYTES)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the recipe ({err.strerror}); pass a readable YAML recipe") from None
    if mode is None or stat.S_ISDIR(mode):
        what = "is a folder, not a recipe file" if mode is not None else "recipe file not found"
        raise ConfigError(f"{path}: {what}; pass a YAML recipe (the shipped ones are in recipes/)")
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)):
        raise ConfigError(f"{path}: not a file; pass a YAML recipe (the shipped ones are in recipes/)")
    try:
        with open(path, "rb") as f:
            if f.isatty():
                raise ConfigError(f"{path}: is a terminal; pipe a recipe in (onestep train /dev/stdin < recipe.yaml)"
                                  " or pass a recipe file")
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the recipe ({err.strerror}); pass a readable YAML recipe") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_RECIPE_BYTES // 1024} KB, not a recipe; pass a YAML recipe "
                          "(see recipes/)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); a recipe is a YAML text file, see recipes/") from None


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what SafeLoader resolves silently or expands without bound: a key given twice in
    one mapping (the later one would win unseen), and aliases that expand to more than MAX_YAML_VALUES values or
    refer to themselves ("billion laughs"). The expanded size is counted on the node graph, never built."""

    def compose_document(self):
        node = super().compose_document()
        problem = _expansion_problem(node)
        if problem:
            raise _Refused(problem)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overriding a key is fine
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _Refused(f"duplicate key {shown(key)} at line {line} (first at line {seen[key]}); "
                                       "keep one of them")
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    """A recipe refused by _RecipeLoader (the message never holds the expanded value)."""


def _expansion_problem(root) -> str | None:
    """Why a composed YAML node graph is refused (too many values once aliases are expanded, or a cycle), or None.
    Sizes are memoised per node, so this costs one pass over the graph however large its expansion."""
    def children(node):
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    if root is None:
        return None
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children(node))
            if sizes[key] > MAX_YAML_VALUES:
                return (f"aliases expand to more than {MAX_YAML_VALUES} values (line {node.start_mark.line + 1}); "
                        "a recipe needs a few dozen, write the values out")
            continue
        if key in sizes:
            continue
        if key in on_path:
            return f"an alias refers to itself (line {node.start_mark.line + 1}); write the values out"
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children(node) if id(child) not in sizes)
    return None


def load_yaml(text: str, source: str):
    """Parse recipe YAML with _RecipeLoader; every problem is one ConfigError line naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except _Refused as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{source}: not valid YAML{line} ({str(err).splitlines()[0]}); fix the syntax "
                          "(see recipes/*.yaml for examples)") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a recipe; see recipes/*.yaml for examples") from None


def config_from_dict(raw: dict, source: str = "recipe") -> RunConfig:
    bad = first_non_finite(raw)
    if bad:
        raise ConfigError(f"{source}: {bad[0]}: must be a finite number, got {bad[1]}; NaN and infinity are never "
                          "valid settings")
    method_raw = raw.get("method")
    if not isinstance(method_raw, dict) or not isinstance(method_raw.get("name"), str):
        from ..methods.base import available_methods
        raise ConfigError(f"{source}: method.name is required (a string); valid: "
                          f"{', '.join(sorted(available_methods()))}")
    try:
        method_cls = get_method(method_raw["name"])
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    problems = []
    try:
        method = method_cls.Config.model_validate(method_raw)
    except ValidationError as err:
        problems += _describe(err, method_cls.Config, prefix="method")
    try:
        config = RunConfig.model_validate({**raw, "method": {"name": method_raw["name"]}})
    except ValidationError as err:
        problems += _describe(err, RunConfig)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    return config.model_copy(update={"method": method})


def dump_config(config: RunConfig) -> str:
    data = config.model_dump(mode="json")
    data["method"] = config.method.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {shown(item)}: expected KEY=VALUE, e.g. train.steps=200")
    key, value = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {shown(item)}: {part[:80]} is not a section; set the value itself, e.g. "
                              f"--set {'.'.join(parts[:depth + 1])[:80]}=VALUE")
    try:
        node[parts[-1]] = load_yaml(value, f"--set {shown(item)}")
    except ConfigError as err:
        if "not valid YAML" not in str(err):
            raise
        raise ConfigError(f"--set {shown(item)}: the value is not valid YAML; quote it, e.g. --set "
                          f"'{key[:80]}=\"...\"'") from None


def _describe(err: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if prefix and loc[:1] == [prefix]:
            loc = loc[1:]
        key = ".".join(([prefix] if prefix else []) + loc)
        key = key if len(key) <= 80 else key[:77] + "..."  # a pasted paragraph as a key is not echoed whole
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            hint = difflib.get_close_matches(loc[-1][:200], valid, n=1)
            lines.append(f"{key}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; valid keys here: {', '.join(valid)}")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {shown(got)})"
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}{got}")
    return lines


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
