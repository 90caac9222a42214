"""`OneStepPipeline`: a diffusers pipeline around a distilled one-step (or few-step) generator, registered.

Its generation is `standalone_pipeline.OneStepPipeline` (the same file every export carries as `pipeline.py` for
plain diffusers), so onestep and plain diffusers run one implementation. This subclass adds what needs onestep:
loading without running code from the folder (`GeneratorPipeline.from_pretrained`), building from a trained
`OneStepGenerator` (`from_generator`), the model card (README.md), and the hallucination filter, whose probe needs
a `Denoiser` (the card's teacher, else the generator's own).

The folder it saves is an ordinary diffusers pipeline folder (model_index.json with the sampling config, safetensors
weights, the teacher's scheduler config) plus README.md and `onestep_card.json` (teacher, method, NFE, FID +
protocol), and `pipeline.py` where plain diffusers can load every component.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ImagePipelineOutput

from ..generators import OneStepGenerator
from . import standalone_pipeline
from .base import GeneratorPipeline
from .registry import register_pipeline

CARD_FILE = standalone_pipeline.CARD_FILE
log = logging.getLogger(__name__)


@dataclass
class FilteredImagePipelineOutput(ImagePipelineOutput):
    """Output of a call with `hallucination_filter`: `images` holds the kept samples only, in generation order;
    `hallucination_scores` (float64) scores every generated sample, `kept` gives the indices of `images` among them,
    `hallucination_probe` the probe levels (`sigmas`) and which `denoiser` scored them."""

    hallucination_scores: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    hallucination_probe: dict | None = None


@register_pipeline
class OneStepPipeline(GeneratorPipeline, standalone_pipeline.OneStepPipeline):
    __doc__ = standalone_pipeline.OneStepPipeline.__doc__
    supports_hallucination_filter = True

    @classmethod
    def dummy_components(cls) -> dict:
        """A class-conditional 1x8x8 UNet2DModel under a DDPM linear schedule (random weights)."""
        from diffusers import DDPMScheduler, UNet2DModel

        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=10)
        return {"unet": unet, "scheduler": DDPMScheduler(beta_schedule="linear")}

    @classmethod
    def from_generator(cls, generator: OneStepGenerator, scheduler, card: dict | None = None,
                       edges: dict | None = None, **sampling):
        """Wrap a trained generator; `scheduler` is the teacher's diffusers scheduler (its config travels);
        `edges` are the teacher's VAE / text components and `prompt_pipeline` name, for latent or text teachers;
        `sampling`: the few-step config (default_inference_steps, renoise_sigmas, timestep_shift, ...)."""
        model = generator.denoiser.model
        slot = "transformer" if hasattr(model, "transformer_blocks") else "unet"
        pipe = cls(scheduler=scheduler, sigma_init=generator.sigma_init, **{slot: model}, **(edges or {}),
                   **sampling)
        pipe.card = dict(card or {})
        return pipe

    @property
    def one_step_generator(self) -> OneStepGenerator:
        """The generator as a onestep `OneStepGenerator` (its `Denoiser`: training code, the hallucination probe).
        Built once per (network, scheduler): each new Denoiser adds a forward hook to the network."""
        from ..denoisers import denoiser_from_pretrained

        key = (id(self.network), id(self.scheduler), self.config.sigma_init)
        if getattr(self, "_generator_key", None) != key:
            self._generator = OneStepGenerator(denoiser_from_pretrained(self.network, self.scheduler),
                                               self.config.sigma_init)
            self._generator_key = key
        return self._generator

    @property
    def prompt_encoder(self):
        """The teacher's prompt encoder as onestep's `PromptEncoder` (for training code; generation encodes with
        `encode_prompt`, the same teacher-pipeline call), or None for generators without text."""
        from ..conditioning import PromptEncoder

        if self.config.get("prompt_pipeline") is None:
            return None
        if getattr(self, "_prompt_encoder", None) is None:
            self._prompt_encoder = PromptEncoder.from_components(self.config.prompt_pipeline, self.components)
        return self._prompt_encoder

    # --- the hallucination filter --------------------------------------------------------------------------------
    def __call__(self, *args, hallucination_filter=None, hallucination_denoiser=None, **kwargs):
        """diffusers' call (see `GeneratorCallMixin.__call__`), plus:

        hallucination_filter: a `HalFilter` (keep_n / quantile / threshold): score every sample with the one-step
            probe (`onestep.sampling.hallucination.probe_filter`, before VAE decoding) and return only the kept ones
            in a `FilteredImagePipelineOutput` (with `hallucination_scores` of all samples and `kept` indices).
        hallucination_denoiser: what the probe denoises with: a Denoiser (`onestep.denoisers.load_teacher(path)`)
            or a teacher folder path; default: the teacher named in the model card if it is a local folder that
            loads, else the generator's own denoiser (separates worse; a warning says so).
        """
        if hallucination_filter is None:
            if hallucination_denoiser is not None:
                raise ValueError("hallucination_denoiser is the probe's denoiser: pass hallucination_filter too")
            return super().__call__(*args, **kwargs)
        output_type = kwargs.pop("output_type", "pil")
        return_dict = kwargs.pop("return_dict", True)
        if output_type not in standalone_pipeline.OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(standalone_pipeline.OUTPUT_TYPES)}, got "
                             f"{output_type!r}")
        with torch.no_grad():
            inputs = self.prepare_inputs(*args, **kwargs)
            x = self.generate_latents(**inputs)
            generator = inputs["generator"]
            hal, name = self.probe_hallucinations(x, hallucination_filter, inputs["class_labels"], inputs["prompts"],
                                                  generator[0] if isinstance(generator, list) else generator,
                                                  hallucination_denoiser)
            x = x[hal.kept.to(x.device)]
            if output_type not in standalone_pipeline.LATENT_OUTPUTS:
                x = self.decode_latents(x)
        return self.format_output(x, output_type, return_dict, FilteredImagePipelineOutput,
                                  hallucination_scores=hal.scores, kept=hal.kept,
                                  hallucination_probe={"denoiser": name, "sigmas": hal.sigmas})

    def probe_hallucinations(self, latents, hal_filter, class_labels=None, prompts=None, generator=None,
                             denoiser=None):
        """(ProbeFiltered, description of the denoiser): score generated `latents` (before the VAE) with the one-step
        probe and apply `hal_filter`; conditioning as in generation."""
        from ..sampling.hallucination import probe_filter

        cond = self.conditioning(len(latents), class_labels, prompts, latents.device)
        probe, name = self.hallucination_probe_denoiser(denoiser)
        return probe_filter(latents, probe, hal_filter, generator, **cond), name

    def hallucination_probe_denoiser(self, denoiser=None):
        """(denoiser, description) for the hallucination probe: `denoiser` if given (a Denoiser, or a teacher folder
        to load), else the model card's teacher (`card_teacher`), else the generator's own denoiser (it separates
        worse than the teacher: bench/hallucination_toy.py)."""
        from ..denoisers import load_teacher

        if isinstance(denoiser, (str, Path)):
            return load_teacher(str(denoiser)).to(self.device), f"teacher {denoiser}"
        if denoiser is not None:
            return denoiser, "the given denoiser"
        teacher, folder = self.card_teacher()
        if teacher is not None:
            return teacher.to(self.device), f"teacher {folder}"
        log.warning("the hallucination probe uses the generator's own denoiser, which separates worse than the "
                    "teacher: pass hallucination_denoiser=PATH_TO_TEACHER")
        return self.one_step_generator.denoiser, "the generator's own denoiser"

    # --- saving: weights + model card + the standalone remote code ------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        card = {**self.card, **self.card_facts()}
        (Path(save_directory) / "README.md").write_text(model_card(card, self.standalone_code() is not None))


def _call_signature() -> inspect.Signature:
    """__call__'s signature as users (and diffusers' tests) inspect it: the protocol's parameters + the filter's."""
    parameters = list(inspect.signature(standalone_pipeline.GeneratorCallMixin.__call__).parameters.values())
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("hallucination_filter", "hallucination_denoiser")]
    return inspect.Signature(parameters[:-1] + extra + parameters[-1:])


OneStepPipeline.__call__.__signature__ = _call_signature()


def model_card(card: dict, plain_diffusers: bool = True) -> str:
    """A Hugging Face model card (YAML front matter, then the facts users look for: what it is, how to run it, the
    NFE and the measured numbers with their protocol; Hugging Face's model-card guide,
    huggingface.co/docs/hub/model-cards)."""
    facts = "\n".join(f"| {k} | {v} |" for k, v in card.items())
    plain = ("# or without onestep (torch + diffusers only; runs this folder's pipeline.py):\n"
             "# diffusers.DiffusionPipeline.from_pretrained(\"path/to/this/folder\", trust_remote_code=True)\n"
             if plain_diffusers else "")
    return f"""---
library_name: diffusers
tags: [onestep, one-step-diffusion, distillation]
---
# One-step generator distilled with onestep

| fact | value |
| --- | --- |
{facts}

```python
from onestep.pipelines import load_pipeline
pipe = load_pipeline("path/to/this/folder")
generator = torch.Generator().manual_seed(0)
images = pipe(batch_size=16, num_inference_steps={card.get("nfe", 1)}, generator=generator).images
{plain}```
"""
