"""An image auto-regressive teacher: a transformers causal LM over the codes of a diffusers `VQModel` tokenizer.

The LlamaGen / VQGAN-transformer layout (Esser et al. 2021, "Taming Transformers", sec. 3.2; Sun et al. 2024,
"LlamaGen", sec. 2.2 and github.com/FoundationVision/LlamaGen `autoregressive/models/generate.py`):

    vocabulary  = K image codes (ids 0..K-1) + num_classes class tokens (K + c) + 1 null-class token (K + C)
    sequence    = [class token] + n = h * w image tokens in raster order
    p(q_i | c, q_<i) = softmax(transform(lm([c, q_0, ..., q_{i-1}])[i][:K]))

Classifier-free guidance through the null class (Ho & Salimans 2022; LlamaGen's `cfg_scale`), on logits:
l = l_u + s (l_c - l_u); then temperature and top-k (transformers' `TemperatureLogitsWarper`/`TopKLogitsWarper`).
`logits` (teacher forcing, one forward) and `sample` (step by step with a KV cache, the teacher's own sampler)
compute the same guided logits, and `probs` applies the same temperature / top-k, so a distillation method (DD2,
arXiv 2510.21003) targets exactly the law the teacher samples from. The defaults of guidance, temperature and top-k
are part of the folder's config: the teacher's FD is quoted with them.

Folder (`save_pretrained` / `from_pretrained`, safetensors only):
    model_index.json  {"_class_name": "AutoregressiveTeacher", "lm": ["transformers", "<Class>ForCausalLM"],
                       "vq": ["diffusers", "VQModel"], "num_classes": C, "token_grid": [h, w],
                       "guidance_scale": s, "temperature": T, "top_k": k}
    lm/               the causal LM (config.json + model.safetensors)
    vq/               the VQModel (config.json + diffusion_pytorch_model.safetensors)
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
from torch import nn

from .denoisers import import_trusted_class, load_component, read_model_index
from .pipelines.standalone_pipeline import decode_vq_embeddings  # one VQ decode, also in DD2's pipeline.py

CLASS_NAME = "AutoregressiveTeacher"
_FOLDER = "an AutoregressiveTeacher folder (model_index.json, lm/, vq/) written by its save_pretrained"


class AutoregressiveTeacher(nn.Module):
    """A class-conditional (or unconditional: num_classes None) AR image model over VQ codes; frozen and in eval mode
    when loaded. Methods never look at the LM's architecture: GPT-2, Llama or any transformers causal LM."""

    def __init__(self, lm: nn.Module, vq: nn.Module, num_classes: int | None, token_grid,
                 guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None):
        super().__init__()
        self.lm, self.vq = lm, vq
        if num_classes is not None and not (isinstance(num_classes, int) and not isinstance(num_classes, bool)
                                            and num_classes > 0):
            raise ValueError(f"num_classes must be a positive int or null (unconditional), got {num_classes!r}")
        if not (isinstance(token_grid, (list, tuple)) and len(token_grid) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in token_grid)):
            raise ValueError(f"token_grid must be [h, w] (positive ints: the VQ latent grid), got {token_grid!r}")
        self.num_classes = num_classes
        self.token_grid = (int(token_grid[0]), int(token_grid[1]))
        self.guidance_scale, self.temperature, self.top_k = _check_transform(guidance_scale, temperature, top_k)
        vocab = _config_value(lm.config, "vocab_size")
        needed = self.num_codes + (num_classes or 0) + 1
        if vocab is None or vocab < needed:
            raise ValueError(f"lm: vocab_size {vocab} is too small: the layout needs K + num_classes + 1 = "
                             f"{self.num_codes} + {num_classes or 0} + 1 = {needed} tokens; set the LM config's "
                             f"vocab_size to at least {needed}")
        # the KV-cache argument and output field: `cache` in recent transformers, `past_key_values` before
        self._cache_name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        positions = _config_value(lm.config, "n_positions", "max_position_embeddings")
        if positions is not None and positions < self.seq_len + 1:
            raise ValueError(f"lm: {positions} positions cannot hold the class token + {self.seq_len} image tokens "
                             f"(token_grid {list(self.token_grid)}); set n_positions/max_position_embeddings to at "
                             f"least {self.seq_len + 1}")

    # --- layout ---------------------------------------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        """[K, d] code vectors (the VQ embedding weight)."""
        return self.vq.quantize.embedding.weight

    @property
    def num_codes(self) -> int:
        return self.vq.quantize.embedding.num_embeddings

    @property
    def seq_len(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    @property
    def null_token(self) -> int:
        return self.num_codes + (self.num_classes or 0)

    def class_tokens(self, class_labels: torch.Tensor | None, batch_size: int | None = None) -> torch.Tensor:
        """[B] prefix token ids: K + label, or the null class where `class_labels` is None (unconditional)."""
        device = self.codebook.device
        if class_labels is None:
            if batch_size is None:
                raise ValueError("pass class_labels or batch_size")
            return torch.full((batch_size,), self.null_token, dtype=torch.long, device=device)
        if self.num_classes is None:
            raise ValueError("class_labels given to an unconditional AR teacher (num_classes null); pass None")
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"class_labels must be in 0..{self.num_classes - 1}, got "
                             f"{int(labels.min())}..{int(labels.max())}")
        return labels + self.num_codes

    # --- the token law ----------------------------------------------------------------------------------------------
    def logits(self, tokens: torch.Tensor, class_labels: torch.Tensor | None = None,
               guidance_scale: float | None = None) -> torch.Tensor:
        """[B, n, K] float32 (guided) logits of every image position by teacher forcing, in one forward: position i
        is conditioned on the class token and tokens[:, :i]. Runs with autograd as the caller has it set."""
        tokens = self._check_tokens(tokens)
        s = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        prefix = self.class_tokens(class_labels, len(tokens))
        guided = self._guided(s, class_labels)
        if guided:
            prefix = torch.cat([prefix, self.class_tokens(None, len(tokens))])
            tokens = torch.cat([tokens, tokens])
        ids = torch.cat([prefix[:, None], tokens[:, :-1]], dim=1)
        out = self.lm(input_ids=ids, use_cache=False).logits[..., : self.num_codes].float()
        return self._combine(out, s) if guided else out

    def probs(self, logits: torch.Tensor, temperature: float | None = None, top_k: int | None = None) -> torch.Tensor:
        """softmax(logits / temperature) over the top_k largest (others 0), the law `sample` draws from."""
        _, temperature, top_k = _check_transform(1.0, self.temperature if temperature is None else temperature,
                                                 self.top_k if top_k is None else top_k)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits.softmax(dim=-1)

    @torch.no_grad()
    def sample(self, class_labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               guidance_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
               batch_size: int | None = None, return_logits: bool = False):
        """[B, n] image tokens drawn step by step with a KV cache (transformers' `cache`, `past_key_values` in older
        releases): n forwards of one token each, each step drawing from `probs` of the guided logits (LlamaGen's
        order: CFG, then temperature, then top-k). Defaults: the folder's guidance_scale, temperature, top_k; a
        `generator` makes it reproducible; batch_size is needed only when class_labels is None.
        `return_logits` also returns the [B, n, K] guided logits each step drew from (equal to `logits` of the
        result by teacher forcing)."""
        s = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        prefix = self.class_tokens(class_labels, batch_size)
        n_rows = len(prefix)
        guided = self._guided(s, class_labels)
        ids = torch.cat([prefix, self.class_tokens(None, n_rows)]) if guided else prefix
        ids, past, tokens, step_logits = ids[:, None], None, [], []
        for _ in range(self.seq_len):
            out = self.lm(input_ids=ids, use_cache=True, **{self._cache_name: past})
            past = out[self._cache_name]
            logits = out.logits[:, -1, : self.num_codes].float()
            logits = self._combine(logits, s) if guided else logits
            p = self.probs(logits, temperature, top_k)
            # drawn where the generator lives (a CPU generator seeds GPU sampling, as in diffusers pipelines)
            where = p.device if generator is None else generator.device
            token = torch.multinomial(p.to(where), 1, generator=generator).to(p.device)
            tokens.append(token)
            step_logits.append(logits)
            ids = torch.cat([token, token]) if guided else token
        tokens = torch.cat(tokens, dim=1)
        return (tokens, torch.stack(step_logits, dim=1)) if return_logits else tokens

    def _guided(self, s: float, class_labels) -> bool:
        return class_labels is not None and s != 1.0

    @staticmethod
    def _combine(both: torch.Tensor, s: float) -> torch.Tensor:
        cond, uncond = both.chunk(2)
        return uncond + s * (cond - uncond)

    # --- the tokenizer ----------------------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, n] code ids -> images [B, C, H, W] in [-1, 1]."""
        return self.decode_embeddings(self.codebook[self._check_tokens(tokens)])

    def decode_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """[B, n, d] vectors in codebook space (codes or anything between them) -> images in [-1, 1]; not quantised,
        so gradients flow to `emb`."""
        h, w = self.token_grid
        if emb.dim() != 3 or emb.shape[1] != self.seq_len or emb.shape[2] != self.codebook.shape[1]:
            raise ValueError(f"embeddings must be [B, {self.seq_len}, {self.codebook.shape[1]}], got "
                             f"{list(emb.shape)}")
        return decode_vq_embeddings(self.vq, emb, self.token_grid)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> [B, n] ids of the nearest codes (the VQModel's own quantiser)."""
        z = self.vq.encode(images.to(self.codebook.dtype)).latents
        if tuple(z.shape[2:]) != self.token_grid:
            raise ValueError(f"images of size {list(images.shape[2:])} encode to a {list(z.shape[2:])} grid, not "
                             f"token_grid {list(self.token_grid)}; resize them to the tokenizer's image size")
        ids = self.vq.quantize(z)[2][2]
        return ids.reshape(len(images), -1).long()

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must be [B, {self.seq_len}] (token_grid {list(self.token_grid)}), got "
                             f"{list(tokens.shape)}")
        tokens = tokens.long()
        if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < self.num_codes):
            raise ValueError(f"tokens must be image codes 0..{self.num_codes - 1}, got "
                             f"{int(tokens.min())}..{int(tokens.max())}")
        return tokens

    # --- folder -----------------------------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"num_classes": self.num_classes, "token_grid": list(self.token_grid),
                "guidance_scale": self.guidance_scale, "temperature": self.temperature, "top_k": self.top_k}

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(path / "lm")  # safetensors: transformers' only format since 5.0, default since 4.35
        self.vq.save_pretrained(path / "vq", safe_serialization=True)
        index = {"_class_name": CLASS_NAME, "lm": ["transformers", type(self.lm).__name__],
                 "vq": ["diffusers", type(self.vq).__name__], **self.config_dict()}
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, device=None, torch_dtype: torch.dtype | None = None) -> "AutoregressiveTeacher":
        """Load a folder written by `save_pretrained` (or a hub id with that layout); weights from safetensors only,
        pickles refused by name. Returns the teacher frozen, in eval mode."""
        from diffusers import VQModel
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        index = read_model_index(str(path))
        if index.get("_class_name") != CLASS_NAME:
            raise ValueError(f"{path}: model_index.json's _class_name is {index.get('_class_name')!r}, not "
                             f"{CLASS_NAME!r}; pass {_FOLDER}")
        missing = [k for k in ("lm", "vq", "token_grid") if k not in index]
        if missing:
            raise ValueError(f"{path}: model_index.json lacks {missing}; pass {_FOLDER}")
        lm_cls = import_trusted_class(index["lm"], str(path))
        if lm_cls.__name__ not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
            raise ValueError(f"{path}: lm is {lm_cls.__name__}, not a transformers causal LM (e.g. GPT2LMHeadModel, "
                             "LlamaForCausalLM); fix model_index.json's 'lm' entry")
        vq_cls = import_trusted_class(index["vq"], str(path))
        if not issubclass(vq_cls, VQModel):
            raise ValueError(f"{path}: vq is {vq_cls.__name__}, not a diffusers VQModel; fix model_index.json's "
                             "'vq' entry")
        lm = load_component(lm_cls, str(path), "lm")
        vq = load_component(vq_cls, str(path), "vq")
        try:
            teacher = cls(lm, vq, index.get("num_classes"), index["token_grid"],
                          index.get("guidance_scale", 1.0), index.get("temperature", 1.0), index.get("top_k"))
        except ValueError as err:
            raise ValueError(f"{path}: model_index.json: {err}") from None
        teacher.requires_grad_(False).eval()
        if device is not None or torch_dtype is not None:
            teacher.to(device=device, dtype=torch_dtype)
        return teacher


def _check_transform(guidance_scale, temperature, top_k):
    """Validate the sampling transform; one-line errors naming the field."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (1: no guidance), got {guidance_scale!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0 (1: the model's law; top_k 1 for greedy), got "
                         f"{temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or null (all codes), got {top_k!r}")
    return float(guidance_scale), float(temperature), top_k


def _config_value(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None
