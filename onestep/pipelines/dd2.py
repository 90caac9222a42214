"""`DD2Pipeline`: one-step (or few-step) sampling of a DD2 generator distilled from an image auto-regressive teacher.

noise eps [B, n, d] -> all n token embeddings in one forward of the generator (`ARDiffusionModel.generate`, q_i
depends on eps_<=i) -> nearest codes (optional, `quantize`) -> the teacher's VQ decoder. Few-step refinement (DD1's
multi-step sampler, Liu et al. 2024 sec. 3.4: keep the first k tokens, regenerate the rest from the same noise): step
s of S keeps the first round(n s / S) tokens as codes, read by the backbone as token embeddings, and regenerates the
remaining positions. The refinement schedule is a reconstruction (DD2 reports 2-3 step numbers without the rule).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..ar_diffusion import ARDiffusionModel, nearest_codes
from ..teachers_ar import decode_vq_embeddings
from .base import GeneratorPipeline
from .registry import register_pipeline
from .standalone_pipeline import CARD_FILE, _whole


@register_pipeline
class DD2Pipeline(GeneratorPipeline):
    """generator: the DD2 one-step generator (`onestep.ar_diffusion.ARDiffusionModel`); vq: the teacher's diffusers
    `VQModel` (its codebook and decoder); token_grid: [h, w] tokens of one image (raster order); quantize: snap the
    generated embeddings to the nearest codes before decoding (the teacher's own output space); default /
    max_inference_steps: 1 and at most 3 (refinement)."""

    _network_slots = ("generator", "vq")

    def __init__(self, generator, vq, token_grid=None, quantize: bool = True, default_inference_steps: int = 1,
                 max_inference_steps: int = 3):
        super().__init__()
        if token_grid is None:  # VQModel: one 2x downsampling per block after the first
            side = vq.config.sample_size // 2 ** (len(vq.config.block_out_channels) - 1)
            token_grid = [side, side]
        if not (isinstance(token_grid, (list, tuple)) and len(token_grid) == 2
                and all(isinstance(v, int) and v > 0 for v in token_grid)):
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

    @classmethod
    def dummy_components(cls) -> dict:
        """A tiny class-conditional GPT-2 backbone + a 1x8x8 VQModel with a 4x4 token grid (random weights)."""
        from diffusers import VQModel
        from transformers import GPT2Config

        torch.manual_seed(0)
        vq = VQModel(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                     latent_channels=4, num_vq_embeddings=16, norm_num_groups=4, sample_size=8)
        backbone = GPT2Config(vocab_size=16 + 10 + 1, n_positions=17, n_embd=16, n_layer=1, n_head=2,
                              bos_token_id=26, eos_token_id=26).to_dict()
        generator = ARDiffusionModel(backbone, num_codes=16, num_classes=10, code_dim=4, head_width=16, res_blocks=1)
        with torch.no_grad():  # a non-trivial generator: its zero-initialised layers are given weights
            for p in generator.parameters():
                if not p.any():
                    p.normal_(0, 0.1)
        return {"generator": generator.eval(), "vq": vq.eval(), "token_grid": [4, 4]}  # as from_pretrained gives

    # --- protocol facts -----------------------------------------------------------------------------------------
    @property
    def noise_shape(self) -> tuple:
        h, w = self.config.token_grid
        return (h * w, int(self.generator.config.code_dim))

    @property
    def num_classes(self):
        return self.generator.config.num_classes or None

    @property
    def max_inference_steps(self) -> int:
        return self.config.max_inference_steps

    @property
    def default_inference_steps(self) -> int:
        return self.config.default_inference_steps

    @property
    def network(self):
        """The generator (what bench/ counts as the artifact's network)."""
        return self.generator

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.quantize.embedding.weight

    # --- generation -----------------------------------------------------------------------------------------------
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

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' folder (safetensors) + onestep_card.json (teacher, method, NFE)."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        card = {**self.card, "nfe": self.default_inference_steps,
                "sampler": "DD2 one-step generator" + (", snapped to the codebook" if self.config.quantize else "")}
        (Path(save_directory) / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
