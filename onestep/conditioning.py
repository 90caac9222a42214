"""What a network is given besides (x, sigma): class labels or text embeddings, one row per dataset row.

Text is encoded once, up front, with the teacher pipeline's own `encode_prompt` (diffusers' code, so tokenisation,
clip-skip and multi-encoder concatenation are exactly the teacher's). Recipes and methods only ever see keyword
tensors (`class_labels`, `encoder_hidden_states`, `pooled_projections`): they never branch on the teacher family.
"""
from __future__ import annotations

import inspect

import torch

from .denoisers import check_component_files, import_trusted_class, read_model_index

# Components a text-only copy of a text-to-image pipeline does not need.
NON_TEXT_COMPONENTS = ("unet", "transformer", "vae", "safety_checker", "feature_extractor", "image_encoder")
UNSUPPORTED_PIPELINES = {"StableDiffusionXLPipeline": "SDXL's UNet also needs added_cond_kwargs (time ids)"}
PROMPT_CHUNK = 64


class PromptEncoder:
    """Encodes prompts with a diffusers text-to-image pipeline's `encode_prompt` (text components only)."""

    def __init__(self, pipeline):
        name = type(pipeline).__name__
        if name in UNSUPPORTED_PIPELINES:
            raise ValueError(f"{name} teachers are not supported yet: {UNSUPPORTED_PIPELINES[name]}")
        self.pipeline = pipeline

    @classmethod
    def from_pretrained(cls, path: str, network=None) -> "PromptEncoder | None":
        """The teacher folder's text encoder(s), or None when the teacher takes no text. `network` (the already
        loaded teacher UNet/transformer) is lent to the pipeline, not loaded twice: some pipelines read its config
        while encoding (SD3 without T5 sizes its zero T5 embeddings by the transformer's joint_attention_dim)."""
        index = read_model_index(path)
        if not isinstance(index.get("text_encoder"), list) or index["text_encoder"][0] is None:
            return None  # no text encoder (an export of a class-conditional or unconditional model lists it as null)
        if not isinstance(index.get("_class_name"), str):  # a onestep export: the teacher pipeline class is stored
            index = {**index, "_class_name": index.get("prompt_pipeline")}
        pipeline_cls = import_trusted_class(["diffusers", index["_class_name"]], path)
        skip = {name: None for name in NON_TEXT_COMPONENTS if name in index}
        skip.update({name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None})
        skip.update({name: network for name in ("unet", "transformer") if name in index and network is not None})
        for name, entry in index.items():  # safetensors only: a pickled component is refused by name, unread
            if name not in skip and not name.startswith("_") and isinstance(entry, list):
                check_component_files(import_trusted_class(entry, path), path, name)
        return cls(pipeline_cls.from_pretrained(path, use_safetensors=True, **skip))

    @classmethod
    def from_components(cls, pipeline_name: str, components: dict) -> "PromptEncoder":
        """Rebuild the text side of pipeline class `pipeline_name` from already loaded components (how an exported
        OneStepPipeline encodes prompts with the teacher's encoders); absent components are passed as None."""
        pipeline_cls = import_trusted_class(["diffusers", pipeline_name], "onestep pipeline config")
        kwargs = {}
        for name, parameter in inspect.signature(pipeline_cls.__init__).parameters.items():
            if name in components:
                kwargs[name] = components[name]
            elif name == "requires_safety_checker":
                kwargs[name] = False
            elif name != "self" and parameter.default is inspect.Parameter.empty:
                kwargs[name] = None
        return cls(pipeline_cls(**kwargs))

    @property
    def components(self) -> dict:
        """The text encoders and tokenizers (what an exported pipeline must carry to take prompts)."""
        return {k: v for k, v in self.pipeline.components.items()
                if v is not None and k.startswith(("text_encoder", "tokenizer"))}

    @torch.no_grad()
    def __call__(self, prompts: list[str], device=None) -> tuple[dict, dict]:
        """(conditional, unconditional) keyword tensors for the denoising network, one row per prompt."""
        kwargs = {"prompt": prompts, "device": device or "cpu", "num_images_per_prompt": 1,
                  "do_classifier_free_guidance": True, "negative_prompt": None}
        parameters = inspect.signature(self.pipeline.encode_prompt).parameters
        kwargs.update({k: None for k in ("prompt_2", "prompt_3") if k in parameters})
        out = self.pipeline.encode_prompt(**kwargs)
        cond, uncond = {"encoder_hidden_states": out[0]}, {"encoder_hidden_states": out[1]}
        if len(out) == 4:  # SD3-style: pooled text embeddings feed the transformer's time embedding
            cond["pooled_projections"], uncond["pooled_projections"] = out[2], out[3]
        return cond, uncond

    def encode_all(self, prompts: list[str], device=None) -> tuple[dict, dict]:
        """Encode many prompts in chunks; returns row-aligned conditional tensors and one unconditional row."""
        unique = sorted(set(prompts))
        chunks = [self(unique[i:i + PROMPT_CHUNK], device) for i in range(0, len(unique), PROMPT_CHUNK)]
        table = {k: torch.cat([c[0][k] for c in chunks]) for k in chunks[0][0]}
        position = {p: i for i, p in enumerate(unique)}
        rows = torch.tensor([position[p] for p in prompts])
        uncond = {k: v[:1] for k, v in chunks[0][1].items()}
        return {k: v[rows] for k, v in table.items()}, uncond


def row_conditioning(data, num_classes: int | None, prompt_encoder: PromptEncoder | None, device=None):
    """Per-row conditioning for `data` under a teacher, and the unconditional row (for guidance) or None."""
    if prompt_encoder is not None:
        if data.prompts is None:
            raise ValueError(f"the teacher is text-conditional but dataset {data.name!r} has no prompts: use "
                             "data.name: prompts:<file.txt> (one prompt per line)")
        return prompt_encoder.encode_all(data.prompts, device)
    if data.prompts is not None:
        raise ValueError(f"dataset {data.name!r} holds prompts but the teacher has no text encoder")
    if num_classes:
        if data.labels is None:
            raise ValueError(f"the teacher is class-conditional ({num_classes} classes) but dataset {data.name!r} "
                             "has no labels")
        return {"class_labels": data.labels}, None
    return {}, None
