"""`ControlledOneStepPipeline`: a one-step generator with control adapters attached (NCT, `onestep.methods.nct`).

    pipe = load_pipeline("runs/nct_edges/pipeline")
    images = pipe(batch_size=4, class_labels=[3], control_image=edge_map).images          # one adapter
    pipe.add_adapter(other.adapter, other.config.controls[0], scale=0.5)                  # attach a second one
    images = pipe(batch_size=4, control_image=[edges, lowres], adapter_scale=[1.0, 0.5]).images

Generation is the `OneStepPipeline`'s (the frozen base network, its scheduler, VAE and prompt encoder), run with the
residuals of every adapter whose control is given (`onestep.adapters.attached`), each times its scale. Adapters are
ordinary components (`adapter`, `adapter_2`, ..., up to MAX_ADAPTERS), saved as safetensors and loaded like the
network; `controls` (the control model of each, as {name, options}) and `adapter_scales` (default scales) live in
model_index.json. A control image is a tensor [n or 1, k, H, W] in [-1, 1] at the image resolution, a PIL image, or
a list of PIL images (one per sample); `extract_control(images)` computes one from ordinary images with the stored
control model. Without a control image an adapter is skipped, so the pipeline then generates as its base does.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..adapters import attached
from ..controls import control_model
from .onestep import OneStepPipeline
from .registry import register_pipeline

MAX_ADAPTERS = 4
SLOTS = ["adapter"] + [f"adapter_{i}" for i in range(2, MAX_ADAPTERS + 1)]


@register_pipeline
class ControlledOneStepPipeline(OneStepPipeline):
    """A `OneStepPipeline` plus control adapters (ControlNet residuals; see the module docstring).

    Args (beyond OneStepPipeline's): adapter, adapter_2, ...: the adapters (`ControlNetModel` or
    `onestep.adapters.ResidualAdapter`); controls: each adapter's control model as {"name": ..., **options};
    adapter_scales: each adapter's default scale.
    """

    _optional_components = OneStepPipeline._optional_components + SLOTS
    _network_slots = OneStepPipeline._network_slots + tuple(SLOTS)

    def __init__(self, scheduler, unet=None, transformer=None, vae=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, adapter=None,
                 adapter_2=None, adapter_3=None, adapter_4=None, sigma_init: float = 2.5,
                 prompt_pipeline: Optional[str] = None, default_inference_steps: int = 1,
                 max_inference_steps: int = 4, renoise_sigma_end: float = 0.08, renoise_sigmas: Optional[list] = None,
                 timestep_shift: float = 1.0, controls: Optional[list] = None, adapter_scales: Optional[list] = None):
        super().__init__(scheduler, unet, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, sigma_init, prompt_pipeline, default_inference_steps,
                         max_inference_steps, renoise_sigma_end, renoise_sigmas, timestep_shift)
        adapters = [adapter, adapter_2, adapter_3, adapter_4]
        count = sum(a is not None for a in adapters)
        if any(a is None for a in adapters[:count]):
            raise ValueError("adapters fill the slots in order: adapter, adapter_2, ... (a gap was found)")
        controls = list(controls or [])
        scales = list(adapter_scales or [1.0] * count)
        if len(controls) != count or len(scales) != count:
            raise ValueError(f"controls and adapter_scales need one entry per adapter ({count}), got {len(controls)} "
                             f"and {len(scales)}")
        for i, spec in enumerate(controls):
            control_model(spec)  # a known control with valid options, or a one-line error
            scales[i] = _scale(f"adapter_scales[{i}]", scales[i])
        self.register_modules(**dict(zip(SLOTS, adapters)))
        self.register_to_config(controls=controls, adapter_scales=scales)

    @classmethod
    def dummy_components(cls) -> dict:
        """OneStepPipeline's tiny UNet2DModel plus one edge adapter with non-zero output convolutions (so the
        control changes the images)."""
        from ..adapters import make_adapter

        components = {k: v for k, v in OneStepPipeline.dummy_components().items()}
        adapter = make_adapter(components["unet"], 1)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in adapter.controlnet_down_blocks.parameters():
                p.normal_(0, 0.05)
        return {**components, "adapter": adapter, "controls": [{"name": "sobel"}], "adapter_scales": [1.0]}

    # --- adapters ------------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list:
        return [a for a in (getattr(self, slot, None) for slot in SLOTS) if a is not None]

    def add_adapter(self, adapter, control, scale: float = 1.0) -> None:
        """Attach one more adapter with its control model ({name, ...options}) and default scale."""
        n = len(self.adapters)
        if n == MAX_ADAPTERS:
            raise ValueError(f"at most {MAX_ADAPTERS} adapters can be attached")
        spec = control_model(control).spec
        self.register_modules(**{SLOTS[n]: adapter})
        self.register_to_config(controls=[*self.config.controls, spec],
                                adapter_scales=[*self.config.adapter_scales, _scale("scale", scale)])

    @property
    def extra_inputs(self) -> dict:
        return {"control_image": "image"} if self.adapters else {}

    @property
    def control_models(self) -> list:
        return [control_model(spec) for spec in self.config.controls]

    @property
    def control_size(self) -> tuple[int, int]:
        """(H, W) of control images: the image resolution (the latent size times the VAE's factor)."""
        h, w = self.noise_shape[-2:]
        if self.vae is not None:
            f = 2 ** (len(self.vae.config.block_out_channels) - 1)
            h, w = h * f, w * f
        return h, w

    def extract_control(self, images, index: int = 0) -> torch.Tensor:
        """The control map of adapter `index` computed from ordinary images (PIL, list of PIL, or [-1, 1] tensors
        [n, C, H, W]) by its stored control model."""
        channels = 3 if self.vae is not None else self.noise_shape[0]
        pixels = self._as_tensor(images, channels, "images")
        return self.control_models[index](pixels)

    def prepare_controls(self, control_image, n: int, device) -> list:
        """One [n, k, H, W] tensor (or None) per adapter from `control_image` (see the module docstring)."""
        adapters = self.adapters
        if control_image is None:
            return [None] * len(adapters)
        if not adapters:
            raise ValueError(f"{type(self).__name__} has no adapter: drop control_image")
        per_adapter = control_image if len(adapters) > 1 else [control_image]
        if len(adapters) > 1 and (not isinstance(control_image, (list, tuple)) or len(control_image) != len(adapters)):
            raise ValueError(f"control_image: this pipeline has {len(adapters)} adapters; pass a list with one control "
                             "per adapter (None skips one)")
        out = []
        for i, (adapter, control) in enumerate(zip(adapters, per_adapter)):
            if control is None:
                out.append(None)
                continue
            c = self._as_tensor(control, int(adapter.config.conditioning_channels), "control_image")
            if len(c) == 1:
                c = c.expand(n, *c.shape[1:])
            if len(c) != n:
                raise ValueError(f"control_image: got {len(c)} controls for {n} samples; pass one, or one per sample")
            out.append(c.to(device))
        return out

    def _as_tensor(self, value, channels: int, name: str) -> torch.Tensor:
        from PIL import Image

        size = self.control_size
        if isinstance(value, Image.Image):
            value = [value]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, Image.Image) for v in value):
            mode = "L" if channels == 1 else "RGB"
            arrays = [np.asarray(v.convert(mode).resize(size[::-1], Image.BILINEAR), dtype=np.float32) / 127.5 - 1
                      for v in value]
            value = torch.from_numpy(np.stack(arrays)).reshape(len(arrays), size[0], size[1], -1).permute(0, 3, 1, 2)
        if not torch.is_tensor(value) or value.dim() not in (3, 4):
            raise ValueError(f"{name} must be a PIL image, a list of them, or a tensor [n, {channels}, {size[0]}, "
                             f"{size[1]}] in [-1, 1], got {type(value).__name__}")
        value = value.float()[None] if value.dim() == 3 else value.float()
        if tuple(value.shape[1:]) != (channels, *size):
            raise ValueError(f"{name} must have shape [n, {channels}, {size[0]}, {size[1]}] (channels and image "
                             f"resolution of this generator), got {list(value.shape)}")
        if not torch.isfinite(value).all() or value.abs().max() > 1 + 1e-6:
            raise ValueError(f"{name} values must be finite and in [-1, 1]")
        return value

    # --- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_latents(self, noise, num_inference_steps=1, class_labels=None, prompts=None, generator=None,
                         callback=None, control_image=None, adapter_scale=None, **extra):
        """The base's generation with the adapters' residuals: `control_image` as in the module docstring,
        `adapter_scale` a number (one adapter) or one number per adapter (default: `adapter_scales`)."""
        adapters = self.adapters
        controls = self.prepare_controls(control_image, len(noise), self._execution_device)
        scales = list(self.config.adapter_scales)
        if adapter_scale is not None:
            given = list(adapter_scale) if isinstance(adapter_scale, (list, tuple)) else [adapter_scale]
            if len(given) != len(adapters):
                raise ValueError(f"adapter_scale: one number per adapter ({len(adapters)}), got {len(given)}")
            scales = [_scale(f"adapter_scale[{i}]", s) for i, s in enumerate(given)]
        with attached(self.network, list(zip(adapters, controls, scales))):
            return super().generate_latents(noise, num_inference_steps, class_labels, prompts, generator, callback,
                                            **extra)

    def generate(self, noise, num_inference_steps=1, class_labels=None, prompts=None, generator=None, callback=None,
                 **extra):
        return self.decode_latents(self.generate_latents(noise, num_inference_steps, class_labels, prompts,
                                                         generator, callback, **extra))

    def card_facts(self) -> dict:
        return {**super().card_facts(), "controls": list(self.config.controls),
                "adapter_scales": list(self.config.adapter_scales)}


def _scale(name: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not -10 <= value <= 10:
        raise ValueError(f"{name} must be a finite number in [-10, 10], got {value!r}")
    return float(value)
