"""`OneStepPipeline`: a diffusers pipeline around a distilled one-step (or few-step) generator.

The folder it saves is an ordinary diffusers pipeline folder (model_index.json, safetensors weights, the teacher's
scheduler config) plus a model card (README.md) and `onestep_card.json` (teacher, method, NFE, FID + protocol).
It loads with `OneStepPipeline.from_pretrained(dir)`, and with plain
`diffusers.DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` through the `pipeline.py` written next
to model_index.json: a verbatim copy of `standalone_pipeline.py`, which needs only torch + diffusers (users without
onestep) and gives the same images (tests/test_standalone_pipeline.py keeps the two implementations equal).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..checks import class_labels_in_range, positive_batch_size
from ..denoisers import denoiser_from_pretrained, import_trusted_class, load_component, read_model_index
from ..generators import OneStepGenerator
from ..sampling.hallucination import HalFilter, probe_filter
from ..sampling.samplers import sample_few_step

CARD_FILE = "onestep_card.json"
REMOTE_CODE = Path(__file__).with_name("standalone_pipeline.py").read_text()  # written as pipeline.py on export
MAX_STEPS = 4
log = logging.getLogger(__name__)


@dataclass
class FilteredImagePipelineOutput(ImagePipelineOutput):
    """Output of a call with `hallucination_filter`: `images` holds the kept samples only, in generation order;
    `hallucination_scores` (float64) scores every generated sample, `kept` gives the indices of `images` among them,
    `hallucination_probe` the probe levels (`sigmas`) and which `denoiser` scored them."""

    hallucination_scores: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    hallucination_probe: dict | None = None


class OneStepPipeline(DiffusionPipeline):
    """Generate with a one-step generator G(z) = D(sigma_init z, sigma_init); 2-4 steps re-noise and denoise again.

    Args:
        scheduler: the teacher's scheduler; only its config is used (to convert the network's output to x0).
        unet / transformer: the generator network (a distilled copy of the teacher's).
        vae: latent teachers: decodes the generated latents (the teacher's VAE).
        text_encoder(_2, _3) / tokenizer(_2, _3): text teachers: the teacher's encoders, used through the
            teacher pipeline class `prompt_pipeline`'s own `encode_prompt`.
        sigma_init: the VE noise level the generator was trained at (stored in model_index.json).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->unet->vae"
    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                            "tokenizer_2", "text_encoder_3", "tokenizer_3"]

    def __init__(self, scheduler, unet=None, transformer=None, vae=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                 sigma_init: float = 2.5, prompt_pipeline: str | None = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("OneStepPipeline needs exactly one generator network: unet or transformer")
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.register_to_config(sigma_init=float(sigma_init), prompt_pipeline=prompt_pipeline)
        self._card = None

    @property
    def network(self):
        return self.unet if self.unet is not None else self.transformer

    @property
    def one_step_generator(self) -> OneStepGenerator:
        """Built once per (network, scheduler): each new Denoiser adds a forward hook to the network, so building one
        per call would pile up hooks in a long-running server (the demo)."""
        key = (id(self.network), id(self.scheduler), self.config.sigma_init)
        if getattr(self, "_generator_key", None) != key:
            self._generator = OneStepGenerator(denoiser_from_pretrained(self.network, self.scheduler),
                                               self.config.sigma_init)
            self._generator_key = key
        return self._generator

    @property
    def prompt_encoder(self):
        """Encodes prompts with the teacher pipeline class's own `encode_prompt` (built once)."""
        from ..conditioning import PromptEncoder

        if self.config.get("prompt_pipeline") is None:
            return None
        if getattr(self, "_prompt_encoder", None) is None:
            self._prompt_encoder = PromptEncoder.from_components(self.config.prompt_pipeline, self.components)
        return self._prompt_encoder

    @classmethod
    def from_generator(cls, generator: OneStepGenerator, scheduler, card: dict | None = None,
                       edges: dict | None = None):
        """Wrap a trained generator; `scheduler` is the teacher's diffusers scheduler (its config travels);
        `edges` are the teacher's VAE / text components and `prompt_pipeline` name, for latent or text teachers."""
        model = generator.denoiser.model
        slot = "transformer" if hasattr(model, "transformer_blocks") else "unet"
        pipe = cls(scheduler=scheduler, sigma_init=generator.sigma_init, **{slot: model}, **(edges or {}))
        pipe.card = dict(card or {})
        return pipe

    @torch.no_grad()
    def __call__(self, batch_size: int | None = None, num_inference_steps: int = 1, generator=None,
                 class_labels: torch.Tensor | list[int] | None = None, prompt: str | list[str] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 hallucination_filter: HalFilter | None = None, hallucination_denoiser=None, **cond):
        """Generate `batch_size` samples (default: one per prompt, else 1).

        num_inference_steps: 1 (the distilled one-step map) up to 4 (re-noise and denoise with the same weights).
        class_labels: one label per sample for class-conditional generators (default: 0, 1, 2, ... cycling).
        prompt: text teachers: one prompt, or one per sample.
        output_type: "pil" | "np" | "pt" (images in [0, 1]); "raw" returns the generator's output as is (latents
            for latent teachers).
        hallucination_filter: a `HalFilter` (keep_n / quantile / threshold): score every sample with the one-step
            probe (`onestep.sampling.hallucination.probe_filter`, before VAE decoding) and return only the kept ones
            in a `FilteredImagePipelineOutput` (with `hallucination_scores` of all samples and `kept` indices).
        hallucination_denoiser: what the probe denoises with: a Denoiser (`onestep.denoisers.load_teacher(path)`)
            or a teacher folder path; default: the teacher named in the model card if it is a local folder that
            loads, else the generator's own denoiser (separates worse; a warning says so).
        """
        if not 1 <= num_inference_steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be 1..{MAX_STEPS}, got {num_inference_steps}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        batch_size = positive_batch_size(batch_size) if batch_size is not None else len(prompts) if prompts else 1
        if self.prompt_encoder is not None:
            if not prompts:
                raise ValueError("this generator is text-conditional: pass prompt='...' (or a list, one per sample)")
            prompts = prompts * batch_size if len(prompts) == 1 else prompts
            if len(prompts) != batch_size:
                raise ValueError(f"got {len(prompts)} prompts for batch_size {batch_size}: pass one, or one per sample")
            cond.update(self.prompt_encoder(prompts, self.device)[0])
        elif prompts:
            raise ValueError("this generator takes no text (it was distilled from a teacher without a text encoder)")
        gen = self.one_step_generator
        shape = (batch_size, *gen.sample_shape)
        z = latents if latents is not None else randn_tensor(shape, generator=generator, device=self.device,
                                                             dtype=torch.float32)
        num_classes = gen.denoiser.num_classes
        if num_classes:
            if class_labels is None:
                class_labels = torch.arange(batch_size) % num_classes
            cond["class_labels"] = class_labels_in_range(class_labels, num_classes, batch_size).to(self.device)
        noise_generator = generator[0] if isinstance(generator, list) else generator
        x = sample_few_step(gen, z, num_inference_steps, noise_generator=noise_generator, **cond)
        extra = {}
        if hallucination_filter is not None:
            denoiser, name = self.hallucination_probe_denoiser(hallucination_denoiser)
            hal = probe_filter(x, denoiser, hallucination_filter, noise_generator, **cond)
            x = x[hal.kept.to(x.device)]
            extra = {"hallucination_scores": hal.scores, "kept": hal.kept,
                     "hallucination_probe": {"denoiser": name, "sigmas": hal.sigmas}}
        output_class = FilteredImagePipelineOutput if extra else ImagePipelineOutput
        if self.vae is not None and output_type != "raw":
            from ..latents import LatentSpace

            x = LatentSpace(self.vae).decode(x)
        if output_type == "raw" or x.dim() != 4:
            out = output_class(images=x, **extra)
            return out if return_dict else out.to_tuple()
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        out = output_class(images=out, **extra)
        return out if return_dict else out.to_tuple()

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

    def card_teacher(self):
        """(teacher Denoiser, folder) named by the model card when it is a local diffusers folder (as written, under
        the repository, or relative to this pipeline folder) that loads and makes samples of the generator's shape;
        else (None, None). Loaded once; the demo's side-by-side view and the hallucination probe use it."""
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
                if teacher.sample_shape != self.one_step_generator.sample_shape:
                    log.warning("teacher %s makes %s samples, the generator %s", folder, teacher.sample_shape,
                                self.one_step_generator.sample_shape)
                    return None, None
                return teacher, str(folder)
        log.info("teacher %r is not a local diffusers folder", name)
        return None, None

    # --- saving: weights + model card + the standalone remote code ------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        out = Path(save_directory)
        index_file = out / "model_index.json"
        index = json.loads(index_file.read_text())
        index["_class_name"] = ["pipeline", "OneStepPipeline"]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (out / "pipeline.py").write_text(REMOTE_CODE)
        card = {"sigma_init": self.config.sigma_init, "nfe": 1, **self.card}
        (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        (out / "README.md").write_text(model_card(card))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load a saved folder (or hub id) without running any code from it.

        Components are imported only from diffusers/transformers/onestep (the folder's `pipeline.py` is ignored
        here; only plain `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` runs it).
        """
        path = str(pretrained_model_name_or_path)
        index = read_model_index(path)
        saved_as = index.get("_class_name")
        saved_as = saved_as[-1] if isinstance(saved_as, list) and saved_as else saved_as
        if saved_as not in (None, cls.__name__):
            raise ValueError(f"{path}: a {saved_as} folder, not a {cls.__name__} (model_index.json _class_name); "
                             "pass the pipeline/ folder a onestep run exported (a teacher is distilled with "
                             "`onestep train`, not sampled here)")
        components = {}
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
                continue
            klass = import_trusted_class(entry, path)
            dtype = {} if name == "scheduler" or torch_dtype is None else {"torch_dtype": torch_dtype}
            components[name] = load_component(klass, path, name, **dtype, **kwargs)
        try:
            pipe = cls(**components, sigma_init=index.get("sigma_init", 2.5),
                       prompt_pipeline=index.get("prompt_pipeline"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a loadable {cls.__name__} ({err}); re-export it with onestep") from err
        pipe.register_to_config(_name_or_path=path)
        return pipe

    @property
    def card(self) -> dict:
        """Facts about the generator (teacher, method, NFE, FID + protocol), read from the saved folder."""
        if self._card is None:
            card_file = Path(str(self.config.get("_name_or_path", ""))) / CARD_FILE
            self._card = json.loads(card_file.read_text()) if card_file.is_file() else {}
        return self._card

    @card.setter
    def card(self, value: dict):
        self._card = value


def model_card(card: dict) -> str:
    """A Hugging Face model card (YAML front matter, then the facts users look for: what it is, how to run it, the NFE and the
    measured numbers with their protocol; Hugging Face's model-card guide, huggingface.co/docs/hub/model-cards)."""
    facts = "\n".join(f"| {k} | {v} |" for k, v in card.items())
    return f"""---
library_name: diffusers
tags: [onestep, one-step-diffusion, distillation]
---
# One-step generator distilled with onestep

| fact | value |
| --- | --- |
{facts}

```python
from onestep.pipelines import OneStepPipeline
pipe = OneStepPipeline.from_pretrained("path/to/this/folder")
images = pipe(batch_size=16, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
# or without onestep (torch + diffusers only; runs this folder's pipeline.py):
# diffusers.DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
```
"""
