"""Teachers as bundles: a folder is opened once and handed to a method in the form the method declares it needs.

A method names one kind (`Method.teacher_kind`); `open_teacher` returns the matching bundle:

=================  ===================================================================================================
``diffusion``      `DiffusionTeacher`: a frozen VE `Denoiser` (any diffusers UNet / transformer + scheduler, or the
                   network of a onestep export), its latent space, prompt encoder, classifier-free guidance, and the
                   components an export needs around a network distilled from it.
``one_step``       `OneStepSource`: a onestep export's frozen generator G(z) = D(sigma_init z, sigma_init) with its
                   latent space and prompt encoder, so a trained student can be the frozen base of a later recipe.
``autoregressive`` `AutoregressiveTeacher` (`onestep.teachers_ar`): a transformers causal LM over the codes of a
                   diffusers `VQModel` tokenizer.
``none``           no teacher (data-free methods, and methods that train their own network from data).
=================  ===================================================================================================

Every bundle also brings the data into its space (`prepare_data`: images of a latent teacher are encoded once, rows
get the teacher's conditioning) and back to pixels (`to_pixels`), so the trainer never asks what a teacher is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

TEACHER_KINDS = ("diffusion", "one_step", "autoregressive", "none", "latents")


@dataclass
class _Bundle:
    """What every teacher bundle carries: where it came from, its latent space, prompt encoder and the components
    an exported pipeline needs around a network trained from it (`edges`: vae, text encoders, prompt_pipeline)."""

    kind: ClassVar[str]
    path: str
    latents: Any = None
    prompts: Any = None
    uncond: dict | None = None
    edges: dict = field(default_factory=dict)

    # --- what methods and the trainer ask of every bundle ---------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int | None:
        raise NotImplementedError

    def to_pixels(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples in the teacher's space -> what a person (and FID) looks at: decoded images for latent teachers."""
        return self.latents.decode(samples) if self.latents is not None else samples

    def prepare_data(self, data, device) -> None:
        """Bring `data` into the teacher's space in place: encode images of a latent teacher once, check shapes,
        and give each row the teacher's conditioning (`data.cond`: class labels or text embeddings)."""
        from .conditioning import row_conditioning

        if self.latents is not None and data.x is not None:
            data.x = self.latents.encode(data.x.to(device)).cpu()
        check_teacher_matches_data(self, data)
        data.cond, self.uncond = row_conditioning(data, self.num_classes, self.prompts, device)


@dataclass
class DiffusionTeacher(_Bundle):
    """A frozen multi-step diffusion teacher seen as one VE denoiser D(x_sigma, sigma, **cond) -> x0."""

    kind: ClassVar[str] = "diffusion"
    denoiser: Any = None

    @property
    def sample_shape(self):
        return tuple(self.denoiser.sample_shape)

    @property
    def num_classes(self):
        return self.denoiser.num_classes

    @property
    def scheduler(self):
        return self.denoiser.scheduler

    def with_guidance(self, guidance_scale: float) -> None:
        """Classifier-free guidance inside the teacher score (text teachers: the empty prompt is unconditional)."""
        from .denoisers import GuidedDenoiser

        if guidance_scale == 1.0:
            return
        if self.uncond is None:
            raise ValueError("teacher.guidance_scale needs a text-conditional teacher (its empty-prompt embedding is "
                             "the unconditional branch); set it to 1")
        self.denoiser = GuidedDenoiser(self.denoiser, guidance_scale, self.uncond)


@dataclass
class LatentSpaceTeacher(DiffusionTeacher):
    """kind "latents": a diffusion teacher folder of which a method uses only the space its samples live in (the
    VAE of a latent model) and, frozen and never called, its network for the export (One More Step trains a module
    in front of the frozen base). Rows keep their own captions / labels: the method conditions its own network."""

    kind: ClassVar[str] = "latents"

    def prepare_data(self, data, device) -> None:
        if data.x is None:
            raise ValueError(f"dataset {data.name!r} has no images; a latents teacher needs images to encode")
        if self.latents is not None:
            data.x = self.latents.encode(data.x.to(device)).cpu()
        want, have = tuple(self.sample_shape), tuple(data.x.shape[1:])
        if want != have:
            raise ValueError(f"teacher samples have shape {want} but dataset {data.name!r} has {have}; set "
                             f"data.resolution / data.channels to match the teacher")
        data.cond = {"class_labels": data.labels} if self.num_classes and data.labels is not None else {}
        self.uncond = None


@dataclass
class OneStepSource(_Bundle):
    """A frozen onestep export: its generator G(z) (with the sigma_init it was trained at) and its denoiser."""

    kind: ClassVar[str] = "one_step"
    generator: Any = None

    @property
    def denoiser(self):
        return self.generator.denoiser

    @property
    def sample_shape(self):
        return tuple(self.generator.sample_shape)

    @property
    def num_classes(self):
        return self.generator.denoiser.num_classes

    @property
    def scheduler(self):
        return self.generator.denoiser.scheduler


@dataclass
class AutoregressiveSource(_Bundle):
    """An image auto-regressive teacher (`onestep.teachers_ar.AutoregressiveTeacher`: causal LM over VQ codes).
    Samples live in its codebook-embedding space, [n tokens, d]; `to_pixels` decodes them with the VQ decoder."""

    kind: ClassVar[str] = "autoregressive"
    model: Any = None

    @property
    def sample_shape(self):
        return (self.model.seq_len, int(self.model.codebook.shape[1]))

    @property
    def num_classes(self):
        return self.model.num_classes

    def to_pixels(self, samples: torch.Tensor) -> torch.Tensor:
        return self.model.decode_embeddings(samples)

    def prepare_data(self, data, device) -> None:
        """Rows get class labels (the class prefix token); the data's images, if any, are not the teacher's space."""
        if self.num_classes and data.labels is None:
            raise ValueError(f"the teacher is class-conditional ({self.num_classes} classes) but dataset "
                             f"{data.name!r} has no labels; use classes:{self.num_classes} or a labelled dataset")
        data.cond = {"class_labels": data.labels} if self.num_classes else {}


def open_teacher(spec, kind: str, device, data=None):
    """Open the folder `spec.path` once as a teacher of `kind` (see the module docstring), frozen, in `spec.dtype`,
    on `device` (or CPU-offloaded), and bring `data` into its space. Returns the bundle, or None for kind "none"."""
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teacher kind must be one of {TEACHER_KINDS}, got {kind!r}")
    if kind == "none":
        return None
    if spec is None:
        raise ValueError(f"teacher: this method needs a {kind} teacher (a folder path or hub id); set teacher.path")
    dtype = getattr(torch, spec.dtype)
    if kind == "autoregressive":
        from .teachers_ar import AutoregressiveTeacher

        bundle = AutoregressiveSource(path=spec.path, model=AutoregressiveTeacher.from_pretrained(
            spec.path, device=device, torch_dtype=dtype))
    else:
        bundle = _open_pipeline_folder(spec, kind, device, dtype)
    if data is not None:
        bundle.prepare_data(data, device)
    if kind == "diffusion":
        bundle.with_guidance(spec.guidance_scale)
    elif kind == "latents" and spec.guidance_scale != 1.0:
        raise ValueError("teacher.guidance_scale: a latents teacher is never sampled during training; set it to 1")
    elif spec.guidance_scale != 1.0:
        raise ValueError(f"teacher.guidance_scale applies to diffusion teachers; a {kind} teacher takes its own "
                         "guidance setting in the method section")
    return bundle


def _open_pipeline_folder(spec, kind: str, device, dtype):
    """A diffusers folder (diffusion teachers) or a onestep export (either kind): network, latents, prompts."""
    from .conditioning import PromptEncoder
    from .denoisers import load_teacher, read_model_index
    from .latents import LatentSpace

    if "sigma_init" in read_model_index(spec.path):  # a onestep export: read through its own pipeline class
        from .pipelines import OneStepPipeline

        pipe = OneStepPipeline.from_pretrained(spec.path, torch_dtype=dtype)
        generator = pipe.one_step_generator.requires_grad_(False).eval()
        denoiser, vae, prompts = generator.denoiser, pipe.vae, pipe.prompt_encoder
    elif kind == "one_step":
        raise ValueError(f"{spec.path}: not a onestep export (no sigma_init in model_index.json); a one-step source "
                         "is the pipeline/ folder of a finished onestep run")
    else:
        denoiser = load_teacher(spec.path).to(dtype=dtype)
        latents = LatentSpace.from_pretrained(spec.path)
        vae = latents.vae if latents is not None else None
        prompts = PromptEncoder.from_pretrained(spec.path, network=denoiser.model)
    edges = {}
    if vae is not None:
        edges["vae"] = vae
    if prompts is not None:
        edges.update(prompts.components, prompt_pipeline=type(prompts.pipeline).__name__)
    latents = LatentSpace(vae).to(device) if vae is not None else None
    if kind == "latents":
        bundle = LatentSpaceTeacher(path=spec.path, latents=latents, prompts=prompts, edges=edges, denoiser=denoiser)
    elif kind == "one_step":
        bundle = OneStepSource(path=spec.path, latents=latents, prompts=prompts, edges=edges, generator=generator)
    else:
        bundle = DiffusionTeacher(path=spec.path, latents=latents, prompts=prompts, edges=edges, denoiser=denoiser)
    if getattr(spec, "cpu_offload", False) and torch.device(device).type != "cpu":
        from accelerate import cpu_offload

        cpu_offload(denoiser.model, execution_device=device)
    else:
        denoiser.to(device)
    return bundle


def check_teacher_matches_data(teacher, data) -> None:
    """Samples of `data` must have the teacher's sample shape, and a class-conditional teacher needs labels."""
    if data.x is None:  # prompt- or label-only data: nothing to compare
        pass
    else:
        want, have = tuple(teacher.sample_shape), tuple(data.x.shape[1:])
        if want != have:
            fixes = []
            if len(want) == len(have) == 3:
                if want[0] != have[0]:
                    fixes.append(f"data.channels: {want[0]}")
                if want[1:] != have[1:]:
                    fixes.append(f"data.resolution: {want[-1]}")
            fix = f"set {' and '.join(fixes)}" if fixes else "use a dataset of the teacher's kind (images vs points)"
            raise ValueError(f"teacher samples have shape {want} but dataset {data.name!r} has {have}; {fix} to "
                             "match the teacher")
    if teacher.num_classes and data.labels is None and getattr(data, "prompts", None) is None:
        raise ValueError(f"the teacher is class-conditional ({teacher.num_classes} classes) but dataset "
                         f"{data.name!r} has no labels; use a labelled dataset (digits, shapes, classes:K) or an "
                         "unconditional teacher")
