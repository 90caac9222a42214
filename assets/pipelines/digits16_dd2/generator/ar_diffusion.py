"""The AR-diffusion network of DD2 (`ARDiffusionModel`), self-contained: it needs only torch, diffusers, transformers.

This module is the one implementation of the network: `onestep.ar_diffusion` (the teacher's closed-form denoiser and
the training-side helpers) imports it from here, and every DD2 export carries this file, verbatim, as
`generator/ar_diffusion.py` (model_index.json: "generator": ["ar_diffusion", "ARDiffusionModel"]), so plain diffusers
(`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`) rebuilds the generator from its config and
safetensors weights without onestep; the folder's `pipeline.py` (`standalone_pipeline.DD2Pipeline`) samples with it.

**The network** (DD2, Liu et al., NeurIPS 2025, arXiv 2510.21003, sec. 3.2: the teacher's backbone with its K-way
classification head replaced by a small diffusion head, as MAR, Li et al. 2024, sec. 3.3). The backbone is the
teacher's transformer (any transformers base model: GPT-2, Llama, ...) over [class token, q_1, ..., q_{n-1}], so its
hidden state z_i sees exactly the prefix the teacher's logits of token i see; the head maps (z_i, x_t, t) to an x0
estimate D(x_t, t | q_<i, c) on the flow-matching path x_t = (1 - t) x0 + t eps. Reconstruction choices (DD2 publishes
no architecture for it), all in the config:

* head: MAR's adaLN residual MLP (`res_blocks` blocks of width `head_width`; condition = embed(t) + Linear(z_i));
  output layer zero-initialised;
* preconditioning: EDM's c_skip / c_out / c_in (Karras et al. 2022, Table 1) rewritten for x_t = (1 - t) x0 + t eps
  with the codebook's standard deviation `sigma_data`, so the untrained head is already the Gaussian-prior denoiser;
* one-step generator wiring (DD1's dependency pattern, q_i depends on eps_<=i): the backbone reads
  [class token, W_in eps_1, ..., W_in eps_{n-1}] (`noise_in`, a new zero-initialised Linear(d, H)) and the head reads
  (z_i, x = t_gen eps_i, t_gen): the SiD generator G(z) = D(sigma_init z, sigma_init) (Zhou et al. 2024) in
  flow-matching units, t_gen = sigma_init / (1 + sigma_init).

The same class is the stage-1 model, DD2's guidance network and its generator, so `init_from` chains the stages.
"""
from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


# ---------------------------------------------------------------------------------------------------------------------
# the AR-diffusion network
# ---------------------------------------------------------------------------------------------------------------------
def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float()[..., None] * 1000.0) * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class _AdaLNBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) from the condition (MAR's ResBlock)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x, cond):
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class ARDiffusionModel(ModelMixin, ConfigMixin):
    """D(x_t, t | q_<i, class) for every position i in one pass; or, as a generator, q = G(eps, class).

    backbone_config: the teacher LM's config (`to_dict()`), rebuilt as its transformers base model; num_codes K and
    num_classes C give the token layout of `onestep.teachers_ar` (class token K + c, null class K + C); code_dim d.
    """

    @register_to_config
    def __init__(self, backbone_config: dict, num_codes: int, num_classes: int | None, code_dim: int,
                 head_width: int = 128, res_blocks: int = 3, time_embed_dim: int = 64, sigma_data: float = 1.0,
                 generator_t: float = 0.714):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = dict(backbone_config)
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        for key, value in list(config.to_dict().items()):  # a deterministic backbone: DD2's networks train w/o dropout
            if isinstance(value, float) and (key.endswith("pdrop") or key.endswith("dropout")):
                setattr(config, key, 0.0)
        self.backbone = AutoModel.from_config(config)
        hidden = self.backbone.get_input_embeddings().weight.shape[1]
        self.noise_in = nn.Linear(code_dim, hidden)
        nn.init.zeros_(self.noise_in.weight)
        nn.init.zeros_(self.noise_in.bias)
        self.x_in = nn.Linear(code_dim, head_width)
        self.z_in = nn.Linear(hidden, head_width)
        self.t_in = nn.Sequential(nn.Linear(time_embed_dim, head_width), nn.SiLU(), nn.Linear(head_width, head_width))
        self.blocks = nn.ModuleList([_AdaLNBlock(head_width) for _ in range(res_blocks)])
        self.out_norm = nn.LayerNorm(head_width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(head_width, 2 * head_width))
        self.out = nn.Linear(head_width, code_dim)
        for layer in (self.out_modulation[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --- token layout ---------------------------------------------------------------------------------------------
    def class_tokens(self, class_labels: torch.Tensor | None, batch_size: int, device) -> torch.Tensor:
        cfg = self.config
        if class_labels is None or not cfg.num_classes:
            return torch.full((batch_size,), cfg.num_codes + (cfg.num_classes or 0), dtype=torch.long, device=device)
        return torch.as_tensor(class_labels, device=device).long().reshape(-1) + cfg.num_codes

    # --- the pieces -------------------------------------------------------------------------------------------------
    def hidden(self, class_labels, tokens: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """z [B, n, H]: backbone states over [class, prefix_1, ..., prefix_{n-1}]; the prefix is code ids `tokens`
        [B, n] (the teacher's input) or noise [B, n, d] through `noise_in` (the generator's input). A boolean
        `known` mask is not needed here: `mixed_hidden` takes both."""
        ref = tokens if tokens is not None else noise
        batch = ref.shape[0]
        embed = self.backbone.get_input_embeddings()
        first = embed(self.class_tokens(class_labels, batch, ref.device))[:, None]
        rest = embed(tokens[:, :-1]) if tokens is not None else self.noise_in(noise[:, :-1].to(first.dtype))
        return self.backbone(inputs_embeds=torch.cat([first, rest], dim=1), use_cache=False).last_hidden_state

    def mixed_hidden(self, class_labels, tokens: torch.Tensor, noise: torch.Tensor, known: torch.Tensor):
        """Backbone states with code ids at `known` [B, n] prefix positions and noise elsewhere (refinement)."""
        embed = self.backbone.get_input_embeddings()
        first = embed(self.class_tokens(class_labels, len(tokens), tokens.device))[:, None]
        rest = torch.where(known[:, :-1, None], embed(tokens[:, :-1]), self.noise_in(noise[:, :-1].to(first.dtype)))
        return self.backbone(inputs_embeds=torch.cat([first, rest], dim=1), use_cache=False).last_hidden_state

    def head(self, z: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """x0 estimate at every position: EDM preconditioning around the adaLN MLP. x_t [B, n, d], t [B, n] or
        broadcastable."""
        sd = self.config.sigma_data
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[:-1])[..., None]
        a = 1 - t
        norm = (a**2 * sd**2 + t**2).sqrt()
        c_skip, c_out, c_in = a * sd**2 / norm**2, t * sd / norm, 1 / norm
        dtype = self.x_in.weight.dtype
        cond = self.t_in(_timestep_embedding(t[..., 0], self.config.time_embed_dim).to(dtype)) + self.z_in(z.to(dtype))
        h = self.x_in((c_in * x_t.float()).to(dtype))
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.out_modulation(cond).chunk(2, dim=-1)
        f = self.out(self.out_norm(h) * (1 + scale) + shift)
        return (c_skip * x_t.float() + c_out * f.float()).to(x_t.dtype)

    # --- the two uses -----------------------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor | None = None, t=None, tokens: torch.Tensor | None = None, class_labels=None,
                *, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Denoiser D(x_t, t | tokens_<i, class) [B, n, d] (stage 1 and the guidance network); with `noise=` the
        one-step generator G(noise, class) (`generate`), so a trainer's DDP wrapper, which syncs through forward,
        serves both uses."""
        if noise is not None:
            return self.generate(noise, class_labels)
        return self.head(self.hidden(class_labels, tokens=tokens), x_t, t)

    def generate(self, noise: torch.Tensor, class_labels=None, tokens: torch.Tensor | None = None,
                 known: torch.Tensor | None = None) -> torch.Tensor:
        """One-step generator q = G(eps, class) [B, n, d]: q_i depends on eps_<=i. With `tokens` and `known`
        ([B, n] bool), known prefix positions are read as codes (few-step refinement)."""
        t = self.config.generator_t
        z = self.hidden(class_labels, noise=noise) if known is None else \
            self.mixed_hidden(class_labels, tokens, noise, known)
        return self.head(z, t * noise, t)
