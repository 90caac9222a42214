"""`DD2Pipeline`: one-step (or few-step) sampling of a DD2 generator distilled from an image auto-regressive teacher,
registered.

Its generation is `standalone_pipeline.DD2Pipeline` and its network `standalone_ar_diffusion.ARDiffusionModel`: the
two self-contained files every DD2 export carries (`pipeline.py`, `generator/ar_diffusion.py`) so that plain diffusers
(`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`) loads it without onestep; onestep and plain
diffusers run one implementation. This subclass adds what needs onestep: loading without running code from the
folder (`GeneratorPipeline.from_pretrained`, which reads the generator entry ["ar_diffusion", ...] as onestep's own
copy of that file) and the tiny components of the common tests.
"""
from __future__ import annotations

import torch

from . import standalone_pipeline
from .base import GeneratorPipeline
from .registry import register_pipeline
from .standalone_ar_diffusion import ARDiffusionModel


@register_pipeline
class DD2Pipeline(GeneratorPipeline, standalone_pipeline.DD2Pipeline):
    __doc__ = standalone_pipeline.DD2Pipeline.__doc__
    # model_index.json's generator ["ar_diffusion", ...] names the file beside the weights; onestep imports its copy
    standalone_modules = {"ar_diffusion": "onestep.pipelines.standalone_ar_diffusion"}

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
