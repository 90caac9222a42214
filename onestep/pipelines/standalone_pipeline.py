"""A onestep generator as a diffusers pipeline that needs only torch and diffusers (no onestep install).

This module is the one implementation of how a onestep export turns noise into images: onestep's own
`onestep.pipelines.OneStepPipeline` subclasses `OneStepPipeline` below (adding safe loading, export and the
hallucination filter), and every export whose components are diffusers/transformers classes gets this file,
verbatim, as `pipeline.py` next to model_index.json (whose `_class_name` is then ["pipeline", "OneStepPipeline"]),
so that users without onestep run the same code:

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images          # pixel / latent export
    images = pipe("a red circle", num_images_per_prompt=2).images                            # text export

DD2 exports (`DD2Pipeline` below: tokens of an image auto-regressive teacher, decoded by its VQModel) get this file
as `pipeline.py` too, plus their network's self-contained file (standalone_ar_diffusion.py, which also needs
transformers) as `generator/ar_diffusion.py`, diffusers' place for a custom component class.

The maths, in the variance-exploding view x_sigma = x0 + sigma * eps of any teacher schedule:

    G(z) = D(sigma_init * z, sigma_init)               (one network evaluation; SiD, Zhou et al. 2024, sec. 4)
    steps 2..N: x <- D(x + sigma_k * eps_k, sigma_k)   (consistency-model multistep sampling, Song et al. 2023,
                                                        Alg. 1, with the generator's own weights)

where D converts the network's output to an x0 estimate under the teacher's scheduler: discrete VP (DDPM-style
betas; epsilon / v_prediction / sample), flow matching (FlowMatch*), or EDM preconditioning (EDM*, Karras et al.
2022, eq. 7). The re-noising levels sigma_k live in the pipeline config (model_index.json): `renoise_sigmas` (an
explicit list: N steps use its first N - 1 levels) or the rule geometric from sigma_init down to
`renoise_sigma_end` * sigma_init over N steps, optionally moved by SD3's time shift
t' = shift t / (1 + (shift - 1) t), t = sigma / (1 + sigma) (`timestep_shift`; Esser et al. 2024, eq. 23).
Latent exports decode with their VAE (diffusers' scaling/shift convention); text exports encode prompts with the
teacher pipeline class named by `prompt_pipeline` (its own `encode_prompt`, so tokenisation is the teacher's).
"""
import inspect
import json
import math
from pathlib import Path
from typing import Optional

import diffusers
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

CARD_FILE = "onestep_card.json"
STANDALONE_FILE = "pipeline.py"
PLAIN_LIBRARIES = ("diffusers", "transformers")   # component classes plain diffusers can import
LATENT_OUTPUTS = ("latent", "raw")                 # "raw": onestep's older name for "latent"
OUTPUT_TYPES = ("pil", "np", "pt", *LATENT_OUTPUTS)
VAE_CHUNK = 64
VP_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")


# --- schedules: network output -> x0 estimate, in the VE view ------------------------------------------------------
class VPSchedule:
    """Discrete variance-preserving (DDPM-style) schedule: sigma = sqrt((1 - abar) / abar), fractional timesteps
    by linear interpolation in log-sigma, x_model = x_sigma / sqrt(1 + sigma^2)."""

    def __init__(self, config: dict):
        abar = DDPMScheduler(**{k: config[k] for k in VP_KEYS if k in config}).alphas_cumprod.double().clamp(1e-12, 1)
        sigmas = ((1 - abar) / abar).sqrt()
        self.log_sigmas = sigmas.log()
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])
        self.prediction_type = config.get("prediction_type", "epsilon")

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.double().clamp(self.sigma_min, self.sigma_max).log()
        log_sigmas = self.log_sigmas.to(sigma.device)
        hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        lo = hi - 1
        frac = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + frac.clamp(0, 1)).to(sigma.dtype)

    def round_sigma(self, sigma: float) -> float:
        """Snap to the nearest integer timestep the network was trained on."""
        t = int(self.timestep(torch.tensor(sigma, dtype=torch.float64)).round())
        return float(self.log_sigmas[t].exp())

    def denoise(self, model, x, sigma, cond):
        a = _expand((1 + sigma.double() ** 2).rsqrt().to(sigma.dtype), x)
        s = a * _expand(sigma, x)
        x_t = a * x
        out = _run(model, x_t, self.timestep(sigma), cond)[:, : x.shape[1]]
        if self.prediction_type == "epsilon":
            return (x_t - s * out) / a
        if self.prediction_type == "v_prediction":
            return a * x_t - s * out
        if self.prediction_type == "sample":
            return out
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")


class FlowSchedule:
    """Flow matching: x_t = (1 - t) x0 + t eps, so sigma = t / (1 - t), a = 1 - t, timestep = t * N, t <= 0.99."""

    def __init__(self, config: dict):
        self.num_train_timesteps = config.get("num_train_timesteps", 1000)
        self.sigma_min, self.sigma_max = 1.0 / (self.num_train_timesteps - 1), 0.99 / (1 - 0.99)

    def round_sigma(self, sigma: float) -> float:
        return min(max(sigma, self.sigma_min), self.sigma_max)

    def denoise(self, model, x, sigma, cond):
        a = _expand(1 / (1 + sigma), x)
        s = a * _expand(sigma, x)
        clamped = sigma.clamp(self.sigma_min, self.sigma_max)
        x_t = a * x
        out = _run(model, x_t, clamped / (1 + clamped) * self.num_train_timesteps, cond)[:, : x.shape[1]]
        return x_t - s * out


class EDMSchedule:
    """EDM preconditioning (Karras et al. 2022): D = c_skip x + c_out F(c_in x, c_noise = log(sigma) / 4)."""

    def __init__(self, config: dict):
        self.sigma_data = config.get("sigma_data", 0.5)
        self.sigma_min, self.sigma_max = config.get("sigma_min", 0.002), config.get("sigma_max", 80.0)

    def round_sigma(self, sigma: float) -> float:
        return min(max(sigma, self.sigma_min), self.sigma_max)

    def denoise(self, model, x, sigma, cond):
        sd, sigma = self.sigma_data, _expand(sigma, x)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip * x + c_out * _run(model, c_in * x, 0.25 * sigma.flatten(1)[:, 0].clamp_min(1e-20).log(), cond)


def schedule_for(scheduler):
    """The teacher's scheduler family decides how network outputs become x0 estimates."""
    config = dict(scheduler.config)
    name = config.get("_class_name", type(scheduler).__name__)
    if "FlowMatch" in name:
        return FlowSchedule(config)
    if name.startswith("EDM"):
        return EDMSchedule(config)
    if "beta_schedule" not in config and "trained_betas" not in config:
        raise ValueError(f"scheduler {name}: expected DDPM-style betas, FlowMatch* or EDM*")
    return VPSchedule(config)


def _expand(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape(-1, *([1] * (x.dim() - 1))).to(x.device)


def _per_sample(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])


def _run(model, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
    """The network in its dtype (text embeddings too); the timestep (EDM's c_noise) stays fp32, as bf16 would round
    625 to 624."""
    dtype = model.dtype
    cond = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
    return model(x.to(dtype), timestep=timestep.float(), **cond, return_dict=False)[0].float()


def _sample_shape(model) -> tuple:
    config = model.config
    if "sample_size" in config and "in_channels" in config:
        size = config.sample_size
        return (config.in_channels, *((size, size) if isinstance(size, int) else size))
    return (config.dim,)


def _finite(name: str, value, low: float, high: float = math.inf, low_open: bool = True) -> float:
    """A config float: a finite number in (low, high] (or [low, high]); a one-line error naming the field."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def _noise_level(name: str, value, scheduler) -> float:
    """sigma_init: a finite VE noise level in (0, sigma_max] of the teacher's scheduler. A level above it would be
    clamped silently at generation, NaN or a negative one would make an all-NaN or wrong generator."""
    high = schedule_for(scheduler).sigma_max if scheduler is not None else math.inf
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and 0 < value <= high * (1 + 1e-6)):
        raise ValueError(f"{name} must be a finite noise level in (0, {high:.4g}] (the teacher's range), got "
                         f"{value!r}; set it to the level the generator was distilled at (e.g. 2.5, onestep's "
                         "default)")
    return float(value)


def _whole_labels(class_labels, num_classes: int) -> torch.Tensor:
    """class_labels as a flat int64 tensor: integers, or floats with whole values (3.0 is label 3); 0.5, NaN, bools
    and complex numbers are refused naming the first such value."""
    labels = torch.as_tensor(class_labels)
    flat = labels.reshape(-1)
    if labels.dtype == torch.bool or labels.is_complex():
        bad = flat
    else:
        bad = flat[~torch.isfinite(flat) | (flat != flat.round())] if labels.is_floating_point() else flat[:0]
    if len(bad):
        raise ValueError(f"class_labels must be whole numbers in 0..{num_classes - 1}, got {bad[0].item()!r}")
    return labels.long().reshape(-1).cpu()


def _whole(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number in {low}..{high}, got {value!r}")
    return value


class _AnyNetwork(tuple):
    """The type of a network slot as diffusers' from_pipe / from_pretrained checks see it: any torch module (a
    onestep export may hold any diffusers model class in `unet`, `transformer` or `vae`)."""

    def __contains__(self, klass) -> bool:
        return isinstance(klass, type) and issubclass(klass, torch.nn.Module)


# --- the inference protocol and diffusers' call conventions on top of it ----------------------------------------
class GeneratorCallMixin:
    """What every onestep pipeline class offers its users (the protocol of `onestep.pipelines.GeneratorPipeline`):

        noise_shape                 per-sample shape of the input noise
        num_classes                 class labels it takes (None: not class-conditional)
        takes_prompt                whether it takes text
        max_inference_steps         the most network evaluations per sample
        default_inference_steps     the NFE it is meant to be used at (what the model card states)
        extra_inputs                further generate() inputs: name -> "image" | "text" | "float"
        card                        facts about the artifact (onestep_card.json)
        generate(noise, num_inference_steps, class_labels, prompts, generator, callback=None, **extra)
                                    -> images (or points) in [-1, 1], decoded to pixels; a pure function of its
                                    inputs. `callback(step, sigma, latents) -> latents` runs after each evaluation.
        generate_latents(...)       the same before the VAE (identical to generate for pixel generators), and
        decode_latents(latents)     latents -> generate's images

    and `__call__`, diffusers' conventions built on generate: output_type pil / np / pt / latent, return_dict,
    num_images_per_prompt, a generator per sample (sample i then depends only on generator i, at any number of
    steps), latents, callback_on_step_end, and a clear refusal of negative_prompt / guidance_scale where the class
    does not take them.
    """

    _callback_tensor_inputs = ["latents"]

    # -- protocol (subclasses override) ------------------------------------------------------------------------
    @property
    def noise_shape(self) -> tuple:
        raise NotImplementedError

    @property
    def num_classes(self) -> Optional[int]:
        return None

    @property
    def takes_prompt(self) -> bool:
        return False

    @property
    def max_inference_steps(self) -> int:
        return self.config.get("max_inference_steps", 1)  # where the pipeline registers them in its config

    @property
    def default_inference_steps(self) -> int:
        return self.config.get("default_inference_steps", 1)

    @property
    def extra_inputs(self) -> dict:
        return {}

    def _checked_steps(self, num_inference_steps, extra: dict) -> int:
        """generate's `num_inference_steps` (None: the default) as a valid NFE; refuses inputs it does not take."""
        if extra:
            raise ValueError(f"{type(self).__name__} takes no input {', '.join(sorted(extra))} (it takes noise, "
                             "num_inference_steps, class_labels, prompts, generator)")
        steps = self.default_inference_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.max_inference_steps:
            raise ValueError(f"num_inference_steps must be 1..{self.max_inference_steps}, got {steps!r}")
        return steps

    def generate(self, noise, num_inference_steps=1, class_labels=None, prompts=None, generator=None, **extra):
        raise NotImplementedError

    def generate_latents(self, noise, num_inference_steps=1, class_labels=None, prompts=None, generator=None,
                         **extra):
        return self.generate(noise, num_inference_steps, class_labels, prompts, generator, **extra)

    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """generate_latents' output -> generate's (the VAE, where there is one)."""
        return x

    def conditioning(self, n: int, class_labels=None, prompts=None, device=None) -> dict:
        """The network's keyword inputs for n samples: class labels (default 0, 1, 2, ... cycling) and/or the
        prompts' text embeddings."""
        cond = {}
        if self.num_classes:
            labels = (torch.arange(n) % self.num_classes if class_labels is None
                      else _whole_labels(class_labels, self.num_classes))
            if labels.numel() != n:
                raise ValueError(f"got {labels.numel()} class_labels for {n} samples")
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            if len(bad):  # the first offending label, not the first few labels (which may all be fine)
                raise ValueError(f"class_labels must be in 0..{self.num_classes - 1} (this generator has "
                                 f"{self.num_classes} classes), got {int(bad[0])}")
            cond["class_labels"] = labels.to(device)
        elif class_labels is not None:
            raise ValueError(f"{type(self).__name__} is not class-conditional; drop class_labels")
        if self.takes_prompt:
            if prompts is None or len(prompts) != n:
                raise ValueError(f"this generator is text-conditional: pass one prompt per sample ({n})")
            cond.update(self.encode_prompt(list(prompts), device))
        elif prompts:
            raise ValueError(f"{type(self).__name__} takes no text; drop prompts")
        return cond

    @property
    def card(self) -> dict:
        """Facts about the generator (teacher, method, NFE, FID + protocol), read from the saved folder."""
        if getattr(self, "_card", None) is None:
            card_file = Path(str(self.config.get("_name_or_path", ""))) / CARD_FILE
            self._card = json.loads(card_file.read_text()) if card_file.is_file() else {}
        return self._card

    @card.setter
    def card(self, value: dict):
        self._card = dict(value)

    @classmethod
    def _get_signature_types(cls):
        types = super()._get_signature_types()
        for name in getattr(cls, "_network_slots", ()):
            types[name] = _AnyNetwork((torch.nn.Module,))
        return types

    # -- diffusers' __call__ ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, batch_size: Optional[int] = None, num_inference_steps: Optional[int] = None,
                 generator=None, class_labels=None, latents: Optional[torch.Tensor] = None,
                 num_images_per_prompt: int = 1, negative_prompt=None, guidance_scale: Optional[float] = None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), **extra):
        """Generate images.

        prompt: text generators: one prompt or a list (batch_size defaults to their number); batch_size: samples per
        prompt list / class-label list (default: inferred from prompt, class_labels, latents or generator list,
        else 1); num_images_per_prompt: each of those repeated; num_inference_steps: 1..max_inference_steps
        (default: default_inference_steps); class_labels: one per sample (default 0, 1, 2, ... cycling);
        generator: a torch.Generator, or one per sample; latents: the input noise, [n, *noise_shape];
        output_type: "pil" | "np" | "pt" (images in [0, 1]) | "latent" (the generator's output before any VAE);
        callback_on_step_end(pipe, step, sigma, {"latents": x}) -> dict after each network evaluation (its
        "latents" replace x). Further keyword inputs: see `extra_inputs`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        inputs = self.prepare_inputs(prompt, batch_size, num_inference_steps, generator, class_labels, latents,
                                     num_images_per_prompt, negative_prompt, guidance_scale, callback_on_step_end,
                                     callback_on_step_end_tensor_inputs, **extra)
        user_callback = inputs.pop("callback")
        with self.progress_bar(total=inputs["num_inference_steps"]) as bar:
            def callback(step, sigma, x):
                x = user_callback(step, sigma, x) if user_callback is not None else x
                bar.update()
                return x

            run = self.generate_latents if output_type in LATENT_OUTPUTS else self.generate
            x = run(**inputs, callback=callback)
        self.maybe_free_model_hooks()
        return self.format_output(x, output_type, return_dict)

    def prepare_inputs(self, prompt=None, batch_size=None, num_inference_steps=None, generator=None,
                       class_labels=None, latents=None, num_images_per_prompt=1, negative_prompt=None,
                       guidance_scale=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                       **extra) -> dict:
        """__call__'s arguments, checked, as generate()'s keyword arguments (plus `callback`)."""
        name = type(self).__name__
        for key, value, unset in (("negative_prompt", negative_prompt, _is_none),
                                  ("guidance_scale", guidance_scale, _no_guidance)):
            if key in self.extra_inputs:
                if value is not None:
                    extra[key] = value
            elif not unset(value):
                raise ValueError(f"{name} does not take {key}: its generator was distilled with any guidance built "
                                 "in (one network evaluation per step, no unconditional branch); drop it")
        steps = self.default_inference_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.max_inference_steps:
            raise ValueError(f"num_inference_steps must be 1..{self.max_inference_steps}, got {steps!r}")
        copies = _whole("num_images_per_prompt", num_images_per_prompt, 1, 1 << 20)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if prompts is not None:
            if not self.takes_prompt:
                raise ValueError(f"{name} takes no text (its generator was distilled from a teacher without a text "
                                 "encoder); drop prompt")
            prompts = list(prompts)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a non-empty list of strings")
        elif self.takes_prompt:
            raise ValueError(f"{name} is text-conditional: pass prompt='...' (or a list, one per sample)")
        labels = None
        if class_labels is not None:
            if not self.num_classes:
                raise ValueError(f"{name} is not class-conditional; drop class_labels")
            labels = _whole_labels(class_labels, self.num_classes)
        if batch_size is None:
            batch_size = (len(prompts) if prompts else labels.numel() if labels is not None and labels.numel() > 1
                          else len(latents) // copies if torch.is_tensor(latents) and latents.dim() > 0
                          else len(generator) // copies if isinstance(generator, list) else 1)
        batch_size = _whole("batch_size", batch_size, 1, 1 << 20)
        total = batch_size * copies
        if prompts is not None:
            if len(prompts) == 1:
                prompts = prompts * batch_size
            if len(prompts) != batch_size:
                raise ValueError(f"got {len(prompts)} prompts for batch_size {batch_size}: pass one, or one per sample")
            prompts = [p for p in prompts for _ in range(copies)]
        if labels is not None:
            if labels.numel() == 1:
                labels = labels.expand(total).clone()
            elif labels.numel() == batch_size:
                labels = labels.repeat_interleave(copies)
            elif labels.numel() != total:
                raise ValueError(f"got {labels.numel()} class_labels for {total} samples: pass one, or one per sample")
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"got a list of {len(generator)} generators for {total} samples: pass one generator, or "
                             "one per sample")
        shape = (total, *self.noise_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)
        elif not torch.is_tensor(latents) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape {shape} (samples, *noise_shape), got {got}")
        return {"noise": latents, "num_inference_steps": steps, "class_labels": labels, "prompts": prompts,
                "generator": generator, **extra,
                "callback": self._user_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)}

    def _user_callback(self, callback_on_step_end, tensor_inputs):
        """diffusers' callback_on_step_end(pipe, step, timestep, {"latents": ...}) as a generate() callback."""
        if callback_on_step_end is None:
            return None
        tensor_inputs = list(getattr(callback_on_step_end, "tensor_inputs", tensor_inputs))
        unknown = [t for t in tensor_inputs if t not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown}: {type(self).__name__} passes only "
                             f"{self._callback_tensor_inputs}")

        def callback(step, sigma, x):
            out = callback_on_step_end(self, step, torch.as_tensor(sigma), {k: x for k in tensor_inputs})
            return out.get("latents", x) if isinstance(out, dict) else x

        return callback

    def format_output(self, x: torch.Tensor, output_type: str, return_dict: bool,
                      output_class=ImagePipelineOutput, **fields):
        """[-1, 1] samples -> diffusers' output (images in [0, 1] as PIL / numpy / torch; latents as they are)."""
        if output_type in LATENT_OUTPUTS or x.dim() != 4:
            images = x
        else:
            images = (x / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        out = output_class(images=images, **fields)
        return out if return_dict else out.to_tuple()


def _is_none(value) -> bool:
    return value is None


def _no_guidance(value) -> bool:
    return value is None or value == 1  # diffusers' convention: guidance_scale 1 is no guidance


class NetworkFacts:
    """Protocol facts read off a pipeline's one network (`unet` or `transformer`) and its config; shared by the
    pipeline classes built around one denoising network."""

    @property
    def network(self):
        return self.unet if self.unet is not None else self.transformer

    @property
    def noise_shape(self) -> tuple:
        return tuple(_sample_shape(self.network))

    @property
    def num_classes(self) -> Optional[int]:
        config = self.network.config
        return config.get("num_class_embeds") or config.get("num_classes") or None


class OneStepPipeline(NetworkFacts, GeneratorCallMixin, DiffusionPipeline):
    """Generate with a distilled one-step generator; 2..max_inference_steps re-noise and denoise with the same weights.

    Args:
        scheduler: the teacher's scheduler; only its config is read (to convert the network's output to x0).
        unet / transformer: the generator network (a distilled copy of the teacher's).
        vae: latent teachers: decodes the generated latents (the teacher's VAE).
        text_encoder(_2, _3) / tokenizer(_2, _3): text teachers: the teacher's encoders, used through the teacher
            pipeline class `prompt_pipeline`'s own `encode_prompt`.
        sigma_init: the VE noise level the generator was distilled at.
        default_inference_steps: the NFE the generator is meant to be used at (the model card states it).
        max_inference_steps: the most steps the re-noising rule allows (with `renoise_sigmas`: 1 + its length).
        renoise_sigma_end: the rule's last re-noising level, as a fraction of sigma_init.
        renoise_sigmas: explicit re-noising levels (VE sigma) replacing the rule; N steps use the first N - 1.
        timestep_shift: SD3's time shift applied to the re-noising levels (1: none).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->unet->vae"
    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                            "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    _network_slots = ("unet", "transformer", "vae")

    def __init__(self, scheduler, unet=None, transformer=None, vae=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                 sigma_init: float = 2.5, prompt_pipeline: Optional[str] = None, default_inference_steps: int = 1,
                 max_inference_steps: int = 4, renoise_sigma_end: float = 0.08,
                 renoise_sigmas: Optional[list] = None, timestep_shift: float = 1.0):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("OneStepPipeline needs exactly one generator network: unet or transformer")
        sigma_init = _noise_level("sigma_init", sigma_init, scheduler)
        if prompt_pipeline is not None and not (isinstance(prompt_pipeline, str)
                                                and prompt_pipeline.endswith("Pipeline")):
            raise ValueError(f"prompt_pipeline must name a diffusers pipeline class, got {prompt_pipeline!r}")
        if renoise_sigmas is not None:
            if not isinstance(renoise_sigmas, (list, tuple)):
                raise ValueError(f"renoise_sigmas must be a list of noise levels, got {renoise_sigmas!r}")
            renoise_sigmas = [_finite(f"renoise_sigmas[{i}]", s, 0.0) for i, s in enumerate(renoise_sigmas)]
            max_inference_steps = 1 + len(renoise_sigmas)
        max_inference_steps = _whole("max_inference_steps", max_inference_steps, 1, 64)
        default_inference_steps = _whole("default_inference_steps", default_inference_steps, 1, max_inference_steps)
        renoise_sigma_end = _finite("renoise_sigma_end", renoise_sigma_end, 0.0, 1.0)
        timestep_shift = _finite("timestep_shift", timestep_shift, 0.0)
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.register_to_config(sigma_init=sigma_init, prompt_pipeline=prompt_pipeline,
                                default_inference_steps=default_inference_steps,
                                max_inference_steps=max_inference_steps, renoise_sigma_end=renoise_sigma_end,
                                renoise_sigmas=renoise_sigmas, timestep_shift=timestep_shift)

    # -- protocol -------------------------------------------------------------------------------------------------
    @property
    def takes_prompt(self) -> bool:
        return self.config.get("prompt_pipeline") is not None


    @property
    def schedule(self):
        key = (id(self.scheduler), id(self.scheduler.config))
        if getattr(self, "_schedule_key", None) != key:
            self._schedule, self._schedule_key = schedule_for(self.scheduler), key
        return self._schedule

    def sigmas(self, num_steps: int) -> list:
        """The noise levels of an num_steps path: sigma_init (snapped to the teacher's grid), then the re-noising
        levels (from `renoise_sigmas`, else geometric down to renoise_sigma_end * sigma_init), time-shifted."""
        config = self.config
        sigma_init = self.schedule.round_sigma(config.sigma_init)
        if config.renoise_sigmas is not None:
            levels = [float(s) for s in config.renoise_sigmas[: num_steps - 1]]
        elif num_steps > 1:
            ratio = math.log(sigma_init * config.renoise_sigma_end / sigma_init) / (num_steps - 1)
            levels = [sigma_init * math.exp(ratio * i) for i in range(1, num_steps)]
        else:
            levels = []
        shift = config.timestep_shift
        if shift != 1:
            t = [s / (1 + s) for s in levels]
            t = [shift * u / (1 + (shift - 1) * u) for u in t]
            levels = [u / (1 - u) for u in t]
        return [sigma_init] + levels

    def generate(self, noise, num_inference_steps=1, class_labels=None, prompts=None, generator=None,
                 callback=None, **extra):
        return self.decode_latents(self.generate_latents(noise, num_inference_steps, class_labels, prompts,
                                                         generator, callback, **extra))

    @torch.no_grad()
    def generate_latents(self, noise, num_inference_steps=1, class_labels=None, prompts=None, generator=None,
                         callback=None, **extra):
        """G(z), then re-noise to each next level and denoise again; re-noising draws from `generator` (one
        generator: the whole batch at once; a list: sample i from generator i)."""
        num_inference_steps = self._checked_steps(num_inference_steps, extra)
        device = self._execution_device
        z = noise.to(device=device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != len(z):
            raise ValueError(f"got a list of {len(generator)} generators for {len(z)} samples")
        cond = self.conditioning(len(z), class_labels, prompts, device)
        model, schedule = self.network, self.schedule
        sigmas = self.sigmas(num_inference_steps)
        x = schedule.denoise(model, sigmas[0] * z, _per_sample(sigmas[0], z), cond)
        x = callback(0, sigmas[0], x) if callback is not None else x
        for step, sigma in enumerate(sigmas[1:], start=1):
            eps = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = schedule.denoise(model, x + sigma * eps, _per_sample(sigma, x), cond)
            x = callback(step, sigma, x) if callback is not None else x
        return x


    @torch.no_grad()
    def encode_prompt(self, prompts: list, device=None) -> dict:
        """Text embeddings for the network, by the teacher pipeline class's own `encode_prompt` (as in training)."""
        encoder = self._text_pipeline()
        kwargs = {"prompt": prompts, "device": device or "cpu", "num_images_per_prompt": 1,
                  "do_classifier_free_guidance": True, "negative_prompt": None}
        parameters = inspect.signature(encoder.encode_prompt).parameters
        kwargs.update({k: None for k in ("prompt_2", "prompt_3") if k in parameters})
        out = encoder.encode_prompt(**kwargs)
        cond = {"encoder_hidden_states": out[0]}
        if len(out) == 4:  # SD3-style: pooled text embeddings feed the transformer's time embedding
            cond["pooled_projections"] = out[2]
        return cond

    def _text_pipeline(self):
        """The teacher pipeline class `prompt_pipeline`, built (once) around this pipeline's components."""
        components = self.components
        key = tuple(id(v) for v in components.values())
        if getattr(self, "_text_pipeline_key", None) != key:
            name = self.config.prompt_pipeline
            klass = getattr(diffusers, name, None) if isinstance(name, str) else None
            if not (isinstance(klass, type) and issubclass(klass, DiffusionPipeline)):
                raise ValueError(f"prompt_pipeline {name!r} is not a diffusers pipeline class in diffusers "
                                 f"{diffusers.__version__}")
            kwargs = {}
            for arg, parameter in inspect.signature(klass.__init__).parameters.items():
                if arg == "scheduler":  # a copy: some pipelines' __init__ rewrites their scheduler's config
                    kwargs[arg] = type(self.scheduler).from_config(self.scheduler.config)
                elif arg in components:
                    kwargs[arg] = components[arg]
                elif arg == "requires_safety_checker":
                    kwargs[arg] = False
                elif arg != "self" and parameter.default is inspect.Parameter.empty:
                    kwargs[arg] = None
            self._text_pipe, self._text_pipeline_key = klass(**kwargs), key
        return self._text_pipe

    @torch.no_grad()
    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE (latents / scaling_factor + shift_factor); pixel
        generators' images are clamped to [-1, 1], points pass unchanged."""
        if self.vae is None:
            return x.clamp(-1, 1) if x.dim() == 4 else x
        scaling = float(self.vae.config.get("scaling_factor", 1.0) or 1.0)
        shift = float(self.vae.config.get("shift_factor", 0.0) or 0.0)
        dtype = self.vae.dtype
        out = [self.vae.decode((z / scaling + shift).to(dtype)).sample.float() for z in x.split(VAE_CHUNK)]
        return torch.cat(out).clamp(-1, 1)

    # -- saving -----------------------------------------------------------------------------------------------------
    def card_facts(self) -> dict:
        """What the config says about sampling, stated in the model card (they override older card values)."""
        steps = self.default_inference_steps
        return {"sigma_init": self.config.sigma_init, "nfe": steps, "max_inference_steps": self.max_inference_steps,
                "sigmas": self.sigmas(steps), "timestep_shift": self.config.timestep_shift}

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' folder (safetensors) + onestep_card.json; where plain diffusers can load every component,
        also this file as pipeline.py, named in model_index.json's `_class_name`."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        out = Path(save_directory)
        index_file = out / "model_index.json"
        index = json.loads(index_file.read_text())
        if self.standalone_code() is not None:
            index["_class_name"] = ["pipeline", type(self).__name__]
            (out / STANDALONE_FILE).write_text(self.standalone_code())
            index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (out / CARD_FILE).write_text(json.dumps({**self.card, **self.card_facts()}, indent=2) + "\n")

    def standalone_code(self) -> Optional[str]:
        """The source written as pipeline.py, or None where plain diffusers could not load the folder (a subclass
        this file does not define, or a component class from outside diffusers/transformers)."""
        if type(self).__name__ != "OneStepPipeline":
            return None
        for component in self.components.values():
            if component is not None and type(component).__module__.partition(".")[0] not in PLAIN_LIBRARIES:
                return None
        return Path(__file__).read_text()


# --- DD2: one-step sampling of an image auto-regressive teacher's tokens ------------------------------------------
AR_NETWORK_FILE = "ar_diffusion.py"  # the generator's network class, beside its weights (standalone_ar_diffusion.py)


def nearest_codes(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[...] ids of the nearest code vector of each x [..., d] (the VQ quantiser's rule)."""
    c = codebook.to(x.dtype)
    d2 = x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(-1)
    return d2.argmin(-1)


def decode_vq_embeddings(vq, emb: torch.Tensor, token_grid) -> torch.Tensor:
    """[B, h*w, d] vectors in the codebook space of diffusers `VQModel` `vq` -> images in [-1, 1], not quantised."""
    h, w = token_grid
    z = emb.reshape(len(emb), h, w, -1).permute(0, 3, 1, 2).to(vq.quantize.embedding.weight.dtype)
    if vq.config.get("lookup_from_codebook"):
        # VQModel.decode would read z as code ids there; its own two steps after the lookup, on vectors:
        quant = vq.post_quant_conv(z)
        images = vq.decoder(quant, z if vq.config.norm_type == "spatial" else None)
    else:
        images = vq.decode(z, force_not_quantize=True).sample
    return images.float().clamp(-1, 1)


class DD2Pipeline(GeneratorCallMixin, DiffusionPipeline):
    """One-step (or few-step) sampling of a DD2 generator distilled from an image auto-regressive teacher (Liu et al.,
    NeurIPS 2025, arXiv 2510.21003).

    noise eps [B, n, d] -> all n token embeddings in one forward of the generator (`ARDiffusionModel.generate`, q_i
    depends on eps_<=i) -> nearest codes (optional, `quantize`) -> the teacher's VQ decoder. Few-step refinement
    (DD1's multi-step sampler, Liu et al. 2024 sec. 3.4: keep the first k tokens, regenerate the rest from the same
    noise): step s of S keeps the first round(n s / S) tokens as codes, read by the backbone as token embeddings, and
    regenerates the remaining positions (a reconstruction: DD2 reports 2-3 step numbers without the rule).

    Args:
        generator: the DD2 generator, `ARDiffusionModel` (the export's generator/ar_diffusion.py).
        vq: the teacher's diffusers `VQModel` (its codebook and decoder).
        token_grid: [h, w] tokens of one image (raster order); default: the VQModel's latent size.
        quantize: snap the generated embeddings to the nearest codes before decoding (the teacher's output space).
        default_inference_steps / max_inference_steps: 1 and at most 3 (refinement).
    """

    model_cpu_offload_seq = "generator->vq"
    _network_slots = ("generator", "vq")

    def __init__(self, generator, vq, token_grid=None, quantize: bool = True, default_inference_steps: int = 1,
                 max_inference_steps: int = 3):
        super().__init__()
        if token_grid is None:  # VQModel: one 2x downsampling per block after the first
            side = vq.config.sample_size // 2 ** (len(vq.config.block_out_channels) - 1)
            token_grid = [side, side]
        if not (isinstance(token_grid, (list, tuple)) and len(token_grid) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in token_grid)):
            raise ValueError(f"token_grid must be [h, w] (positive ints), got {token_grid!r}")
        if not isinstance(quantize, bool):
            raise ValueError(f"quantize must be true or false, got {quantize!r}")
        max_inference_steps = _whole("max_inference_steps", max_inference_steps, 1, 64)
        default_inference_steps = _whole("default_inference_steps", default_inference_steps, 1, max_inference_steps)
        if generator.config.code_dim != vq.quantize.embedding.weight.shape[1] or \
                generator.config.num_codes != vq.quantize.embedding.num_embeddings:
            raise ValueError("generator and vq disagree on the codebook (num_codes / code_dim); export them together")
        self.register_modules(generator=generator, vq=vq)
        self.register_to_config(token_grid=list(token_grid), quantize=quantize,
                                default_inference_steps=default_inference_steps,
                                max_inference_steps=max_inference_steps)

    # -- protocol -------------------------------------------------------------------------------------------------
    @property
    def noise_shape(self) -> tuple:
        h, w = self.config.token_grid
        return (h * w, int(self.generator.config.code_dim))

    @property
    def num_classes(self) -> Optional[int]:
        return self.generator.config.num_classes or None

    @property
    def network(self):
        """The generator (what onestep's benches count as the artifact's network)."""
        return self.generator

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.quantize.embedding.weight

    # -- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_latents(self, noise, num_inference_steps=None, class_labels=None, prompts=None, generator=None,
                         callback=None, **extra):
        """[B, n, d] generated token embeddings (before snapping to codes and decoding)."""
        steps = self._checked_steps(num_inference_steps, extra)
        net = self.generator
        device = self._execution_device
        noise = noise.to(device=device, dtype=net.dtype)
        labels = self.conditioning(len(noise), class_labels, prompts, device).get("class_labels")
        n, t_gen = noise.shape[1], float(net.config.generator_t)
        q = net.generate(noise, labels)
        if callback is not None:
            q = callback(0, t_gen, q)
        codebook = self.codebook.to(q.dtype)
        for step in range(1, steps):
            keep = round(n * step / steps)
            ids = nearest_codes(q, codebook)
            known = (torch.arange(n, device=device) < keep).expand(len(q), n)
            q = torch.where(known[..., None], codebook[ids], net.generate(noise, labels, tokens=ids, known=known))
            if callback is not None:
                q = callback(step, t_gen, q)
        return q

    @torch.no_grad()
    def decode_latents(self, q: torch.Tensor) -> torch.Tensor:
        codebook = self.codebook
        q = q.to(codebook.dtype)
        if self.config.quantize:
            q = codebook[nearest_codes(q, codebook)]
        return decode_vq_embeddings(self.vq, q, self.config.token_grid)

    @torch.no_grad()
    def generate(self, noise, num_inference_steps=None, class_labels=None, prompts=None, generator=None,
                 callback=None, **extra):
        return self.decode_latents(self.generate_latents(noise, num_inference_steps, class_labels, prompts,
                                                         generator, callback, **extra))

    # -- saving -----------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' folder (safetensors) + onestep_card.json; where plain diffusers can load every component, also
        this file as pipeline.py and the generator's network file as generator/ar_diffusion.py, both named in
        model_index.json (`_class_name` ["pipeline", "DD2Pipeline"], generator ["ar_diffusion", "ARDiffusionModel"])."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        out = Path(save_directory)
        files = self.standalone_files()
        if files is not None:
            index_file = out / "model_index.json"
            index = json.loads(index_file.read_text())
            index["_class_name"] = ["pipeline", type(self).__name__]
            index["generator"] = [Path(AR_NETWORK_FILE).stem, type(self.generator).__name__]
            for name, text in files.items():
                (out / name).write_text(text)
            index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        card = {**self.card, "nfe": self.default_inference_steps,
                "sampler": "DD2 one-step generator" + (", snapped to the codebook" if self.config.quantize else "")}
        (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")

    def standalone_files(self) -> Optional[dict]:
        """{path in the folder: source} of the plain-diffusers code (pipeline.py, generator/ar_diffusion.py), or None
        where plain diffusers could not load the folder (a subclass this file does not define, a generator class other
        than the self-contained ARDiffusionModel, a vq from outside diffusers)."""
        network = type(self.generator)
        if type(self).__name__ != "DD2Pipeline" or network.__name__ != "ARDiffusionModel" \
                or not network.__module__.endswith(Path(AR_NETWORK_FILE).stem) \
                or type(self.vq).__module__.partition(".")[0] not in PLAIN_LIBRARIES:
            return None
        return {STANDALONE_FILE: Path(__file__).read_text(),
                f"generator/{AR_NETWORK_FILE}": Path(inspect.getsourcefile(network)).read_text()}
