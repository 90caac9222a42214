"""`TeacherPipeline`: a multi-step diffusion teacher (any diffusers UNet / transformer + scheduler folder without text,
such as the teachers `onestep pretrain` writes or google/ddpm-cifar10-32) behind the same protocol as every onestep
artifact, sampled by the deterministic probability-flow ODE (Euler in the VE view; DDIM for VP teachers, Song et al.
2021; Karras et al. 2022, sec. 3). So `onestep sample`, `onestep fid`, the demo and bench/ measure a teacher and its
students with the same code: `load_pipeline` opens a teacher folder with it.
"""
from __future__ import annotations

import torch

from .base import GeneratorPipeline
from .registry import register_pipeline
from .standalone_pipeline import NetworkFacts, _whole


@register_pipeline
class TeacherPipeline(NetworkFacts, GeneratorPipeline):
    """Sample a diffusion teacher with `num_inference_steps` Euler (DDIM) steps on its native timestep grid.

    scheduler: the teacher's scheduler (its config says how network outputs become x0); unet or transformer: the
    denoising network; vae: latent teachers only (decodes the final latents).
    """

    _optional_components = ["unet", "transformer", "vae"]
    _network_slots = ("unet", "transformer", "vae")

    def __init__(self, scheduler, unet=None, transformer=None, vae=None, default_inference_steps: int = 50,
                 max_inference_steps: int = 1000):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("TeacherPipeline needs exactly one denoising network: unet or transformer")
        max_inference_steps = _whole("max_inference_steps", max_inference_steps, 1, 100_000)
        default_inference_steps = _whole("default_inference_steps", default_inference_steps, 1, max_inference_steps)
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae)
        self.register_to_config(default_inference_steps=default_inference_steps,
                                max_inference_steps=max_inference_steps)

    @classmethod
    def accepts(cls, index: dict) -> bool:
        """A diffusers folder this class samples: a scheduler and one network, no text encoder."""
        def present(name):
            entry = index.get(name)
            return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None

        return present("scheduler") and (present("unet") or present("transformer")) and not present("text_encoder") \
            and "sigma_init" not in index

    @classmethod
    def dummy_components(cls) -> dict:
        from .onestep import OneStepPipeline

        components = {k: v for k, v in OneStepPipeline.dummy_components().items() if k in ("unet", "scheduler")}
        return {**components, "default_inference_steps": 2}  # a few steps keep the common tests quick

    @property
    def denoiser(self):
        """The VE denoiser view of the network (built once per network and scheduler)."""
        from ..denoisers import denoiser_from_pretrained

        key = (id(self.network), id(self.scheduler))
        if getattr(self, "_denoiser_key", None) != key:
            self._denoiser, self._denoiser_key = denoiser_from_pretrained(self.network, self.scheduler), key
        return self._denoiser

    @torch.no_grad()
    def generate_latents(self, noise, num_inference_steps=None, class_labels=None, prompts=None, generator=None,
                         callback=None, **extra):
        from ..sampling.samplers import teacher_sigmas

        steps = self._checked_steps(num_inference_steps, extra)
        noise = noise.to(device=self._execution_device, dtype=torch.float32)
        sigmas = teacher_sigmas(self.denoiser.schedule, steps).to(noise.device)
        cond = self.conditioning(len(noise), class_labels, prompts, noise.device)
        x = noise.float() * sigmas[0]
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            x0 = self.denoiser(x, sigma, **cond)
            x = x0 + (sigma_next / sigma) * (x - x0)
            if callback is not None:
                x = callback(i, float(sigma), x)
        return x

    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x.clamp(-1, 1) if x.dim() == 4 else x  # images in [-1, 1]; points as they are
        from ..latents import LatentSpace

        return LatentSpace(self.vae).decode(x)

    def generate(self, noise, num_inference_steps=None, class_labels=None, prompts=None, generator=None,
                 callback=None, **extra):
        return self.decode_latents(self.generate_latents(noise, num_inference_steps, class_labels, prompts,
                                                         generator, callback, **extra))

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' folder (safetensors) + onestep_card.json with the NFE the teacher is sampled at."""
        import json
        from pathlib import Path

        from .standalone_pipeline import CARD_FILE

        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        card = {**self.card, "nfe": self.default_inference_steps, "sampler": "Euler (DDIM) on the native timestep grid"}
        (Path(save_directory) / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, dtype=None, **kwargs):
        """Any diffusers folder `accepts` takes (its `_class_name` may be DDPMPipeline, DDIMPipeline, ...)."""
        from ..denoisers import read_model_index

        path = str(pretrained_model_name_or_path)
        index = read_model_index(path)
        if not cls.accepts(index):
            raise ValueError(f"{path}: not a diffusion teacher folder this pipeline samples (it needs a scheduler and "
                             "a unet or transformer, and no text encoder)")
        return super().from_pretrained(path, torch_dtype=torch_dtype, dtype=dtype, **kwargs)
