"""One denoiser interface for every teacher, student and fake-score network.

    D(x_sigma, sigma, **cond) -> x0_hat          (variance-exploding form, x_sigma = x0 + sigma * eps)

`DiffusersDenoiser` adapts any diffusers model that takes `(sample, timestep=..., **cond)` under a DDPM-style or
flow-matching schedule; `EDMDenoiser` adapts natively EDM-preconditioned networks (the small MLPs used for 1-D/2-D
data). `denoiser_from_pretrained` is the only place that looks at the model family: methods never branch on it.
Conditioning (`class_labels`, `encoder_hidden_states`, ...) passes through as keyword arguments.
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import re
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .schedules import EDMSchedule, Schedule, schedule_from_scheduler, x0_from_prediction

# Modules whose classes a model_index.json may name; anything else is refused (no arbitrary imports from files).
TRUSTED_LIBRARIES = ("diffusers", "transformers", "onestep")


class Denoiser(nn.Module):
    """Base class. Subclasses implement `denoise`; `forward` can also return the activations of named layers of the
    network (`return_features`), read by forward hooks during that one pass, so discriminator heads need no second
    pass. `feature_layers()` lists the encoder layers a UNet offers: conv_in, each down block, the mid block.

    sigma is a number, one level per sample ([B]), or one per token, shaped like the leading dimensions of x
    ([B, n] for x [B, n, d]: AR-diffusion heads, DD2); the network then receives timesteps of that shape."""

    schedule: Schedule

    def __init__(self, model: nn.Module, schedule: Schedule):
        super().__init__()
        self.model = model
        self.schedule = schedule

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float,
                return_features: bool | tuple[str, ...] | list[str] = False, **cond):
        """x0 estimate; with `return_features=True` also the bottleneck activations, with a tuple of layer names
        (see `feature_layers`) also the list of those layers' activations, in that order."""
        sigma = _per_sample(sigma, x)
        if not return_features:
            return self.denoise(x, sigma, **cond)
        names = [self.bottleneck] if return_features is True else list(return_features)
        if None in names:
            raise RuntimeError(f"{type(self.model).__name__} exposes no bottleneck (mid_block) to read features from")
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for name in dict.fromkeys(names):
            try:
                layer = self.model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{type(self.model).__name__} has no layer {name!r}; feature layers: "
                                 f"{', '.join(self.feature_layers())}") from None
            handles.append(layer.register_forward_hook(
                lambda module, inputs, output, name=name: captured.__setitem__(
                    name, output[0] if isinstance(output, tuple) else output)))
        try:
            x0 = self.denoise(x, sigma, **cond)
        finally:
            for handle in handles:
                handle.remove()
        features = [captured[name] for name in names]
        return x0, (features[0] if return_features is True else features)

    @property
    def bottleneck(self) -> str | None:
        """The layer whose activations `return_features=True` returns: the mid block (or a transformer's middle)."""
        if getattr(self.model, "mid_block", None) is not None:
            return "mid_block"
        blocks = getattr(self.model, "transformer_blocks", None)
        return f"transformer_blocks.{len(blocks) // 2}" if blocks is not None and len(blocks) else None

    def feature_layers(self) -> list[str]:
        """The encoder layers whose activations `forward(..., return_features=names)` can return."""
        names = [name for name in ("conv_in",) if getattr(self.model, name, None) is not None]
        names += [f"down_blocks.{i}" for i in range(len(getattr(self.model, "down_blocks", None) or []))]
        names += [f"transformer_blocks.{i}" for i in range(len(getattr(self.model, "transformer_blocks", None) or []))]
        return names + ([self.bottleneck] if self.bottleneck and self.bottleneck not in names else [])

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        raise NotImplementedError

    def clone(self) -> "Denoiser":
        """An independent copy (new weights, same schedule): how students and fake scores start from a teacher."""
        twin = type(self)(copy.deepcopy(self.model), self.schedule)
        twin.scheduler = self.scheduler
        return twin

    # --- facts about the network that recipes and trainers need -------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (without batch)."""
        config = self.model.config
        if "sample_size" in config and "in_channels" in config:
            size = config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            return (config.in_channels, *size)
        return (config.dim,)

    @property
    def num_classes(self) -> int | None:
        """Number of class labels the network takes (None: not class-conditional)."""
        config = self.model.config
        return config.get("num_class_embeds") or config.get("num_classes") or None

    def round_sigma(self, sigma):
        return self.schedule.round_sigma(torch.as_tensor(sigma, dtype=torch.float64))


class DiffusersDenoiser(Denoiser):
    """A diffusers model under a VP or flow-matching schedule, seen as a VE denoiser (the table in
    docs/schedules.md)."""

    def denoise(self, x, sigma, **cond):
        a, s = (_expand(c, x) for c in self.schedule.coefficients(sigma))
        x_t = a * x
        t = self.schedule.timestep(sigma)
        dtype = self.model.dtype
        # the timestep stays fp32 whatever the network's dtype (bf16 would turn 625 into 624 and 999 into 1000);
        # diffusers' timestep embeddings compute their sinusoids in fp32 and cast the result themselves
        out = self.model(x_t.to(dtype), timestep=t.float(), **_cast(cond, dtype), return_dict=False)[0].float()
        out = out[:, : x.shape[1]]  # learned-variance models emit 2C channels; the first C are the prediction
        return x0_from_prediction(out, x_t.float(), a.float(), s.float(), self.schedule.prediction_type)


class EDMDenoiser(Denoiser):
    """EDM preconditioning (Karras et al. 2022, eq. 7): D = c_skip x + c_out F(c_in x, c_noise)."""

    schedule: EDMSchedule

    def denoise(self, x, sigma, **cond):
        sd = self.schedule.sigma_data
        c_noise = self.schedule.timestep(sigma.float())  # shaped like sigma: [B], or [B, n] per token
        sigma = _expand(sigma, x).float()
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        dtype = self.model.dtype
        out = self.model((c_in * x).to(dtype), timestep=c_noise.float(), **_cast(cond, dtype),  # c_noise in fp32
                         return_dict=False)[0].float()
        return c_skip * x + c_out * out


class MLPModel(ModelMixin, ConfigMixin):
    """Small residual MLP for 1-D/2-D data, called like a diffusers model: `model(x, timestep, class_labels)`.

    The timestep is embedded with Fourier features; `num_classes` adds a label embedding. Saved and loaded with
    `save_pretrained` / `from_pretrained` like any diffusers model.
    """

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int | None = None,
                 time_embed_dim: int = 32):
        super().__init__()
        self.time_freqs = nn.Parameter(torch.randn(time_embed_dim // 2) * 4.0, requires_grad=False)
        self.inp = nn.Linear(dim + time_embed_dim, hidden)
        self.label_embed = nn.Embedding(num_classes, hidden) if num_classes else None
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.mid_block = nn.Identity()  # where discriminator heads read features, as on UNets
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        # sample [..., dim] (e.g. [B, dim] points or [B, n, dim] tokens); timestep and labels per leading index or
        # broadcast along the trailing leading dims (a [B] timestep is shared by the n tokens of a row)
        lead = sample.shape[:-1]
        t = _lead(timestep.float(), lead).reshape(-1, 1)   # Fourier features in fp32, then cast
        angles = 2 * math.pi * t * self.time_freqs.float()
        h = self.inp(torch.cat([sample.reshape(-1, sample.shape[-1]), angles.sin().to(sample.dtype),
                                angles.cos().to(sample.dtype)], dim=1))
        if self.label_embed is not None:
            h = h + self.label_embed(_lead(class_labels, lead).reshape(-1))
        for i, block in enumerate(self.blocks):
            h = h + block(h)
            if i == len(self.blocks) // 2:
                h = self.mid_block(h)
        out = self.out(h).reshape(sample.shape)
        return UNet2DOutput(sample=out) if return_dict else (out,)


class GuidedDenoiser(Denoiser):
    """Classifier-free guidance inside a teacher (Ho & Salimans 2022), in diffusers' convention:

        D_w = D(x, uncond) + w * (D(x, cond) - D(x, uncond)),   w = guidance_scale (1: no guidance).

    Used for the teacher's score in distillation (DMD2 uses w = 1.75 for SD1.5, SiD-LSG applies it on both real and
    fake scores). Both branches run as one batch. Students and fake scores start from the *network*, so `clone`
    returns an unguided copy.
    """

    def __init__(self, inner: Denoiser, guidance_scale: float, uncond: dict[str, torch.Tensor]):
        nn.Module.__init__(self)
        self.inner, self.guidance_scale, self.uncond = inner, float(guidance_scale), uncond
        self.schedule = inner.schedule

    @property
    def model(self):
        return self.inner.model

    @property
    def scheduler(self):
        return self.inner.scheduler

    def forward(self, x, sigma, return_features: bool = False, **cond):
        if return_features:
            raise ValueError("a guided teacher exposes no features; discriminators read the fake score")
        sigma = _per_sample(sigma, x)
        n = x.shape[0]
        uncond = {k: v.expand(n, *v.shape[1:]).to(x.device) for k, v in self.uncond.items()}
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]),
                          **{k: torch.cat([cond[k], uncond[k]]) for k in cond})
        x0_cond, x0_uncond = both.chunk(2)
        return x0_uncond + self.guidance_scale * (x0_cond - x0_uncond)

    def clone(self) -> Denoiser:
        return self.inner.clone()


def denoiser_from_pretrained(model: nn.Module, scheduler) -> Denoiser:
    """Wrap a diffusers-style model and its scheduler (instance or config) into the right Denoiser."""
    schedule = schedule_from_scheduler(scheduler)
    denoiser = (EDMDenoiser if isinstance(schedule, EDMSchedule) else DiffusersDenoiser)(model, schedule)
    denoiser.scheduler = scheduler  # the diffusers scheduler travels with the network into exported pipelines
    return denoiser


def load_pretrained_model(path_or_id: str, subfolder: str | None = None):
    """Load (model, scheduler) from a diffusers pipeline folder or hub id.

    The folder's `model_index.json` names the classes; only classes from diffusers, transformers and onestep are
    accepted. The model is `unet` or `transformer` (whichever the pipeline has), the scheduler `scheduler`.
    """
    index = read_model_index(path_or_id)
    name = subfolder or next((k for k in ("unet", "transformer") if k in index), None)
    if name is None or "scheduler" not in index:
        raise ValueError(f"{path_or_id}: model_index.json must list a 'unet' or 'transformer' and a 'scheduler' "
                         f"component (found {sorted(k for k in index if not k.startswith('_'))}); pass a diffusers "
                         "pipeline folder of a UNet/transformer diffusion model")
    model = load_component(import_trusted_class(index[name], path_or_id), path_or_id, name)
    scheduler = load_component(import_trusted_class(index["scheduler"], path_or_id), path_or_id, "scheduler")
    return model, scheduler


def load_teacher(path_or_id: str) -> Denoiser:
    """A frozen teacher Denoiser from a local diffusers folder or a hub id."""
    model, scheduler = load_pretrained_model(path_or_id)
    teacher = denoiser_from_pretrained(model, scheduler)
    teacher.requires_grad_(False).eval()
    return teacher


_FOLDER = "a diffusers pipeline folder (model_index.json, unet/ or transformer/, scheduler/)"
_REEXPORT = "re-export or re-download the folder"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def read_model_index(path_or_id: str) -> dict:
    from .safe_io import refuse_pickle

    path_or_id = str(path_or_id)
    local = Path(path_or_id)
    if not local.is_dir():
        refuse_pickle(path_or_id)
    if local.is_file():
        raise ValueError(f"{path_or_id}: is a file; pass {_FOLDER}")
    if local.is_dir():
        index_file = local / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{path_or_id}: not a diffusers pipeline folder (no model_index.json); pass "
                                    f"{_FOLDER}")
    elif not _HUB_ID.match(path_or_id) or ".." in path_or_id:
        raise FileNotFoundError(f"{path_or_id}: no such folder; pass {_FOLDER} or a Hugging Face hub id (org/name)")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index_file = Path(hf_hub_download(path_or_id, "model_index.json"))
        except Exception as err:  # offline, unknown repo, gated, no model_index.json, ...
            raise FileNotFoundError(f"{path_or_id}: no such local folder, and no model_index.json for it on the "
                                    f"Hugging Face hub ({_short(err)}); check the path (relative to {Path.cwd()}) "
                                    "or the hub id and your connection") from err
    try:
        index = json.loads(index_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{index_file}: not valid JSON ({_short(err)}); {_REEXPORT}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{index_file}: must be a JSON object naming the pipeline's components; {_REEXPORT}")
    check_finite_json(index_file, index)
    return index


def check_finite_json(file, data) -> None:
    """JSON allows NaN and Infinity (Python writes them); no onestep or diffusers setting may be either."""
    from .checks import first_non_finite

    bad = first_non_finite(data)
    if bad:
        raise ValueError(f"{file}: {bad[0]} is {bad[1]}, not a finite number; set a finite value (or re-export the "
                         "folder with onestep)")


def import_trusted_class(entry, where: str):
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2
            and all(e is None or isinstance(e, str) for e in entry)):
        raise ValueError(f"{where}: model_index.json entry {entry!r} is not [library, class name]; {_REEXPORT}")
    library, class_name = entry
    if library is None or library.split(".")[0] not in TRUSTED_LIBRARIES:
        raise ValueError(f"{where}: component class {entry} is not from {TRUSTED_LIBRARIES}; refusing to import it "
                         "(edit model_index.json to name a diffusers/transformers class, or re-export the folder)")
    try:
        klass = getattr(importlib.import_module(library), str(class_name))
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{where}: model_index.json names {library}.{class_name}, which is not in this "
                         f"installation ({_short(err)}); fix the class name or upgrade {library.split('.')[0]}") \
            from err
    if not (isinstance(klass, type) and hasattr(klass, "from_pretrained")):
        raise ValueError(f"{where}: model_index.json names {library}.{class_name}, which is not a loadable "
                         f"component class; {_REEXPORT}")
    return klass


def load_component(klass, path_or_id: str, name: str, **kwargs):
    """Load component `name` of a pipeline folder or hub id. Networks load from safetensors only: a folder whose
    weights are a pickle (.bin/.pt/.ckpt/...) is refused without opening it. Every failure names the folder, what is
    wrong and the fix (a corrupt/truncated file, a missing component, a config that does not match the weights)."""
    from safetensors import SafetensorError

    folder = Path(str(path_or_id)) / name
    is_network = issubclass(klass, nn.Module)
    check_component_files(klass, path_or_id, name)
    try:
        if is_network:
            kwargs.setdefault("use_safetensors", True)
        return klass.from_pretrained(str(path_or_id), subfolder=name, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, SafetensorError) as err:
        raise ValueError(f"{folder}: cannot load {name!r} ({_short(err)}); the folder is incomplete, corrupt, or its "
                         f"config does not match its weights: {_REEXPORT}") from err


def check_component_files(klass, path_or_id: str, name: str) -> None:
    """For a local folder: component `name` exists and, if it is a network, has complete safetensors weights; a
    pickle (.bin/.pt/.ckpt/...) in their place is refused by name, unread. Whatever the class (an Auto class or a
    pipeline named for a network slot loads weights too, and may unpickle them), a component folder that holds a
    pickle anywhere is refused unless the class is a network, which loads safetensors only. (Hub ids are checked
    when loading.)"""
    from .safe_io import PICKLE_SUFFIXES, refuse_pickle, safetensors_problem

    folder = Path(str(path_or_id)) / name
    if not Path(str(path_or_id)).is_dir():
        return
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: component folder missing (model_index.json lists {name!r}); {_REEXPORT}")
    for config in folder.glob("*config.json"):  # e.g. scheduler_config.json with "beta_start": NaN
        try:
            check_finite_json(config, json.loads(config.read_text()))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass  # not JSON: the class's own loader says so
    if not issubclass(klass, nn.Module):
        pickles = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            refuse_pickle(pickles[0])
        return
    weights = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if not weights and pickles:
        refuse_pickle(pickles[0])
    if not weights:
        raise FileNotFoundError(f"{folder}: no weights (*.safetensors) for {name!r}; {_REEXPORT}")
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"{file}: corrupt weights file ({problem}); {_REEXPORT}")


def _short(err: Exception, limit: int = 200) -> str:
    """The first sentence of an exception message, on one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > limit:
        cut = text.find(". ", 40)
        text = text[: cut + 1] if 0 < cut < limit else text[:limit] + "..."
    return text


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """Noise levels as [B] (one per sample), or shaped like the leading dimensions of x when given so (per token:
    [B, n] for x [B, n, d]); a scalar is shared by the batch."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.numel() == 1:
        return sigma.reshape(-1).expand(x.shape[0])
    if sigma.numel() != x.shape[0] and 1 < sigma.dim() < x.dim() and sigma.shape == x.shape[: sigma.dim()]:
        return sigma
    return sigma.reshape(-1)


def _cast(cond: dict, dtype: torch.dtype) -> dict:
    """Floating conditioning (text embeddings) in the network's dtype; labels stay integers."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}


def _expand(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] (or per-token [B, n]) coefficient with trailing singleton dims, to broadcast against x."""
    lead = tuple(c.shape) if c.dim() > 1 else (-1,)
    return c.reshape(*lead, *[1] * (x.dim() - len(lead))).to(x.device)


def _lead(v: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """A scalar, [1], [B] or lead-shaped tensor broadcast to the leading shape `lead` ([B] or [B, n])."""
    if v.dim() == 0 or v.dim() > len(lead):
        v = v.reshape(-1)
    return v.reshape(*v.shape, *[1] * (len(lead) - v.dim())).expand(*lead)
