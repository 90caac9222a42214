"""`OMSPipeline`: One More Step (Hu et al., CVPR 2024, arXiv 2311.15744) in front of a frozen multi-step VP sampler.

Two ways to use one OMS module (`oms_module` + its prompt encoder, see onestep/oms.py):

* as a registered onestep pipeline: the folder also holds a diffusion base (scheduler + unet/transformer [+ vae]),
  sampled by onestep's `TeacherPipeline` (deterministic DDIM on the native grid). The protocol noise is x_dag, and
  it is also the noise of the ddpm / reference step (psi's optimum ignores its input, so this has the law of fresh
  noise), so `generate` stays a pure function of its inputs; `oms_prompt` / `oms_guidance_scale` are extra inputs.
* `pipe.wrap(base)` in front of any diffusers VP pipeline that takes `latents=` (StableDiffusionPipeline with DDIM,
  DDPM, PNDM, Euler, LCM, DPM-Solver schedulers, with LoRAs/ControlNets): the target alpha-bar is read from the
  base scheduler's first timestep after `set_timesteps`, the OMS step runs at unit scale and the base pipeline gets
  VP-scaled `latents=` (it multiplies them by `init_noise_sigma` itself, which is the VP->VE conversion of sigma
  schedulers). Mirrors the public inference pipeline (mhh0318/OneMoreStep, diffusers_patch/pipelines/oms/
  pipeline_oms.py) without its private diffusers imports.
"""
from __future__ import annotations

import inspect
import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..oms import OMS_MODES, PromptEncoderForOMS, TimeFreeUNet2DConditionModel, WordEncoder, oms_step, \
    target_alpha_bar
from .base import GeneratorPipeline
from .registry import register_pipeline
from .standalone_pipeline import _finite, _whole


def _prompt_list(prompt, n: int, what: str = "oms_prompt") -> list[str]:
    if prompt is None:
        return [""] * n
    if isinstance(prompt, str):
        return [prompt] * n
    prompts = list(prompt)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a list of strings")
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} {what}s for {n} samples: pass one, or one per sample")
    return prompts


@register_pipeline
class OMSPipeline(GeneratorPipeline):
    """One More Step + a frozen diffusion base.

    oms_module: `TimeFreeUNet2DConditionModel` (v at zero SNR); oms_text_encoder: a `WordEncoder` or a transformers
    CLIPTextModel (with oms_tokenizer); scheduler + unet/transformer (+ vae): the frozen base, sampled by onestep's
    TeacherPipeline. oms_mode: reference | ddpm | ddim (see `onestep.oms.oms_step`); oms_guidance_scale: CFG on the OMS
    branch with "" as the unconditional prompt (1: none); oms_latent_space: {"channels", "scaling_factor"} of the
    space the module was trained in (a base in another latent space is refused).
    """

    _optional_components = ["oms_tokenizer", "unet", "transformer", "vae"]
    _network_slots = ("oms_module", "oms_text_encoder", "unet", "transformer", "vae")
    model_cpu_offload_seq = "oms_text_encoder->oms_module->unet->transformer->vae"

    def __init__(self, oms_module, oms_text_encoder, scheduler, oms_tokenizer=None, unet=None, transformer=None,
                 vae=None, oms_mode: str = "reference", oms_guidance_scale: float = 1.0,
                 default_inference_steps: int = 20, max_inference_steps: int = 1000, oms_latent_space=None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("OMSPipeline needs exactly one base network: unet or transformer")
        if oms_mode not in OMS_MODES:
            raise ValueError(f"oms_mode must be one of {', '.join(OMS_MODES)}, got {oms_mode!r}")
        oms_guidance_scale = _finite("oms_guidance_scale", oms_guidance_scale, 0.0, 50.0, low_open=False)
        max_inference_steps = _whole("max_inference_steps", max_inference_steps, 1, 100_000)
        default_inference_steps = _whole("default_inference_steps", default_inference_steps, 1, max_inference_steps)
        PromptEncoderForOMS(oms_text_encoder, oms_tokenizer)  # checks the pair
        self.register_modules(oms_module=oms_module, oms_text_encoder=oms_text_encoder, oms_tokenizer=oms_tokenizer,
                              scheduler=scheduler, unet=unet, transformer=transformer, vae=vae)
        self.register_to_config(oms_mode=oms_mode, oms_guidance_scale=oms_guidance_scale,
                                default_inference_steps=default_inference_steps,
                                max_inference_steps=max_inference_steps, oms_latent_space=oms_latent_space)
        check_latent_space(oms_module, oms_latent_space, self.base.noise_shape[0], vae, type(self.base).__name__)
        target_alpha_bar(scheduler)  # a flow-matching base is refused here, in one line

    # --- the base sampler ---------------------------------------------------------------------------------------
    @property
    def base(self):
        """The frozen base as onestep's TeacherPipeline (shares this pipeline's modules)."""
        from .teacher import TeacherPipeline

        key = (id(self.scheduler), id(self.unet), id(self.transformer), id(self.vae))
        if getattr(self, "_base_key", None) != key:
            self._base = TeacherPipeline(scheduler=self.scheduler, unet=self.unet, transformer=self.transformer,
                                         vae=self.vae, max_inference_steps=self.config.max_inference_steps)
            self._base_key = key
        return self._base

    @property
    def noise_shape(self) -> tuple:
        return tuple(self.base.noise_shape)

    @property
    def num_classes(self):
        return self.base.num_classes

    @property
    def extra_inputs(self) -> dict:
        return {"oms_prompt": "text", "oms_guidance_scale": "float"}

    @classmethod
    def dummy_components(cls) -> dict:
        """A tiny OMS module + word encoder in front of the class-conditional 1x8x8 dummy base."""
        from .onestep import OneStepPipeline

        base = {k: v for k, v in OneStepPipeline.dummy_components().items() if k in ("unet", "scheduler")}
        torch.manual_seed(0)
        return {**base, **tiny_oms_components(channels=1, sample_size=8), "default_inference_steps": 2}

    # --- the OMS step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_x0(self, x_dag: torch.Tensor, prompts: list[str], guidance_scale: float | None = None):
        """x0_hat = -psi(x_dag, c), with classifier-free guidance on psi ("" is the unconditional prompt)."""
        w = self.config.oms_guidance_scale if guidance_scale is None else \
            _finite("oms_guidance_scale", guidance_scale, 0.0, 50.0, low_open=False)
        encoder = PromptEncoderForOMS(self.oms_text_encoder, self.oms_tokenizer)
        module = self.oms_module
        x = x_dag.to(device=module.device, dtype=module.dtype)
        cond = encoder(prompts).to(module.dtype)
        if w == 1.0:
            v = module(x, cond).sample
        else:
            uncond = encoder([""] * len(prompts)).to(module.dtype)
            v_u, v_c = module(torch.cat([x, x]), torch.cat([uncond, cond])).sample.chunk(2)
            v = v_u + w * (v_c - v_u)
        return -v.float()

    def oms_latents(self, x_dag, alpha_bar, prompts, guidance_scale=None, mode=None, z=None):
        """x_T at `alpha_bar` (VP scale) from unit noise x_dag (and z for the ddpm / reference step)."""
        mode = mode or self.config.oms_mode
        x0 = self.predict_x0(x_dag, prompts, guidance_scale)
        return oms_step(x0, x_dag.float().to(x0.device), alpha_bar, mode, None if z is None else z.float().to(x0.device))

    @torch.no_grad()
    def generate_latents(self, noise, num_inference_steps=None, class_labels=None, prompts=None, generator=None,
                         callback=None, oms_prompt=None, oms_guidance_scale=None, **extra):
        from ..sampling.samplers import teacher_sigmas

        steps = self._checked_steps(num_inference_steps, extra)
        if prompts:
            raise ValueError("OMSPipeline's base takes no text; pass the low-frequency prompt as oms_prompt")
        x_dag = noise.to(self._execution_device, torch.float32)
        sigma0 = float(teacher_sigmas(self.base.denoiser.schedule, steps)[0])
        alpha_bar = 1.0 / (1.0 + sigma0 ** 2)
        # The step's noise z is the input noise itself: psi's optimum does not depend on its input (-E[x0 | c]), so
        # this has the law of the fresh-noise step and keeps generate() a pure function of `noise`.
        x_t = self.oms_latents(x_dag, alpha_bar, _prompt_list(oms_prompt, len(noise)), oms_guidance_scale, z=x_dag)
        # TeacherPipeline starts at x = noise * sigma0 (VE); x_VE = x_VP / sqrt(alpha_bar)
        base_noise = (x_t / math.sqrt(1.0 - alpha_bar)).to(noise.device)
        return self.base.generate_latents(base_noise, steps, class_labels, None, generator, callback)

    def decode_latents(self, x):
        return self.base.decode_latents(x)

    def generate(self, noise, num_inference_steps=None, class_labels=None, prompts=None, generator=None,
                 callback=None, **extra):
        return self.decode_latents(self.generate_latents(noise, num_inference_steps, class_labels, prompts, generator,
                                                         callback, **extra))

    def save_pretrained(self, save_directory, **kwargs):
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        import json
        from pathlib import Path

        from .standalone_pipeline import CARD_FILE

        card = {**self.card, "nfe": self.default_inference_steps, "oms_extra_evaluations": 1,
                "sampler": f"One More Step ({self.config.oms_mode}) + Euler (DDIM) on the base's native grid"}
        (Path(save_directory) / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")

    # --- other bases ----------------------------------------------------------------------------------------------
    def oms_components(self) -> dict:
        return {"oms_module": self.oms_module, "oms_text_encoder": self.oms_text_encoder,
                "oms_tokenizer": self.oms_tokenizer}

    def wrap(self, base):
        """This OMS module in front of another base: a onestep TeacherPipeline (or OMSPipeline: its base) gives an
        OMSPipeline; a diffusers pipeline that takes `latents=` gives an `OMSWrapper` (diffusers' __call__)."""
        from .teacher import TeacherPipeline

        settings = {k: self.config[k] for k in ("oms_mode", "oms_guidance_scale", "oms_latent_space")}
        if isinstance(base, (TeacherPipeline, OMSPipeline)):
            inner = base.base if isinstance(base, OMSPipeline) else base
            pipe = OMSPipeline(**self.oms_components(), scheduler=inner.scheduler, unet=inner.unet,
                               transformer=inner.transformer, vae=inner.vae,
                               default_inference_steps=inner.default_inference_steps,
                               max_inference_steps=inner.max_inference_steps, **settings)
            pipe.card = {**self.card, "base": str(inner.config.get("_name_or_path", type(inner).__name__))}
            return pipe
        if isinstance(base, GeneratorPipeline):
            raise ValueError(f"OMS goes in front of a multi-step diffusion sampler; {type(base).__name__} is not one "
                             "(pass a diffusion teacher folder, or a diffusers pipeline that takes latents=)")
        return OMSWrapper(self, base)


def check_latent_space(oms_module, latent_space, base_channels: int, vae, base_name: str) -> None:
    """The OMS module must live in the base's latent space: same channels, same VAE scaling (or both pixel)."""
    channels = oms_module.config.in_channels
    if channels != base_channels:
        raise ValueError(f"latent mismatch: the OMS module takes {channels}-channel latents, the base {base_name} "
                         f"{base_channels}; use an OMS module trained in this base's latent space")
    if latent_space:
        want = latent_space.get("scaling_factor")
        have = None if vae is None else vae.config.get("scaling_factor")
        if (want is None) != (have is None) or (want is not None and abs(want - have) > 1e-6):
            raise ValueError(f"VAE mismatch: the OMS module was trained with "
                             f"{'pixels' if want is None else f'a VAE of scaling_factor {want}'}, the base "
                             f"{base_name} has {'no VAE' if have is None else f'scaling_factor {have}'}; use an OMS "
                             "module trained in this base's latent space")


class OMSWrapper:
    """An OMS module in front of a diffusers pipeline that takes `latents=` (StableDiffusionPipeline and kin):

        OMSWrapper(oms, sd)(prompt, oms_prompt=None, oms_guidance_scale=None, oms_flag=True, oms_mode=None,
                            num_inference_steps=50, height=None, width=None, num_images_per_prompt=1,
                            generator=None, **base_kwargs)
    """

    def __init__(self, oms: OMSPipeline, base):
        parameters = inspect.signature(base.__call__).parameters
        name = type(base).__name__
        if "strength" in parameters:
            raise ValueError(f"{name} starts from an image (strength < 1), not from pure noise: OMS does not apply "
                             "to img2img / inpainting")
        if "latents" not in parameters:
            raise ValueError(f"{name} takes no latents=, so OMS cannot hand it x_T; open a diffusers folder without "
                             "text with onestep.pipelines.load_pipeline (TeacherPipeline) and wrap that")
        target_alpha_bar(base.scheduler)  # flow matching refused, in one line
        network = getattr(base, "unet", None) or getattr(base, "transformer", None)
        check_latent_space(oms.oms_module, oms.config.oms_latent_space, network.config.in_channels,
                           getattr(base, "vae", None), name)
        self.oms, self.base = oms, base

    def __call__(self, prompt=None, oms_prompt=None, oms_guidance_scale=None, oms_flag: bool = True,
                 oms_mode=None, num_inference_steps: int = 50, height=None, width=None, num_images_per_prompt=1,
                 generator=None, **base_kwargs):
        base = self.base
        call = {"num_inference_steps": num_inference_steps, "num_images_per_prompt": num_images_per_prompt,
                "generator": generator, "height": height, "width": width, **base_kwargs}
        if prompt is not None:
            call["prompt"] = prompt
        if not oms_flag:
            return base(**call)
        if "strength" in base_kwargs:
            raise ValueError("strength: OMS replaces the start from pure noise; img2img (strength < 1) does not "
                             "start there. Drop strength or pass oms_flag=False")
        if base_kwargs.get("latents") is not None:
            raise ValueError("latents: OMS makes the base's starting latents; drop latents= or pass oms_flag=False")
        device = base._execution_device
        schedule = {k: base_kwargs[k] for k in ("timesteps", "sigmas") if base_kwargs.get(k) is not None}
        alpha_bar = target_alpha_bar(base.scheduler, None if schedule else num_inference_steps, device, **schedule)
        network = getattr(base, "unet", None) or getattr(base, "transformer", None)
        factor = getattr(base, "vae_scale_factor", 1)
        size = network.config.sample_size
        height, width = height or size * factor, width or size * factor
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else None
        n = (len(prompts) if prompts else base_kwargs.get("batch_size", 1)) * num_images_per_prompt
        oms_prompts = _prompt_list(oms_prompt if oms_prompt is not None else
                                   (None if prompts is None else [p for p in prompts
                                                                  for _ in range(num_images_per_prompt)]), n)
        shape = (n, network.config.in_channels, height // factor, width // factor)
        x_dag = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)  # unit scale
        mode = oms_mode or self.oms.config.oms_mode
        z = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) if mode != "ddim" else None
        x_t = self.oms.oms_latents(x_dag, alpha_bar, oms_prompts, oms_guidance_scale, mode, z)
        call["latents"] = x_t.to(device=device, dtype=network.dtype)
        return base(**call)


def tiny_oms_components(channels: int = 4, sample_size: int = 8, hidden: int = 8, text: bool = False) -> dict:
    """Tiny random OMS components (tests, dummy components): a 2-level time-free UNet + a word (or CLIP) encoder."""
    module = TimeFreeUNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=hidden, attention_head_dim=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if not text:
        words = ("dark", "bright", "a", "red", "blue", "green", "circle", "square", "dot")
        return {"oms_module": module, "oms_text_encoder": WordEncoder(vocabulary=words, hidden_size=hidden)}
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    import string

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=160, hidden_size=hidden, intermediate_size=16,
                                           num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=16,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return {"oms_module": module, "oms_text_encoder": encoder, "oms_tokenizer": tokenizer}
