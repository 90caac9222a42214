"""`NitroFusionPipeline`: a few-step generator whose n-step noise levels are not the first n of one list.

OneStepPipeline samples n steps at [sigma_init] + renoise_sigmas[:n-1], which carries any grid where the k-step path
extends the (k-1)-step one (NitroFusion's `grid: prefix` exports as a plain OneStepPipeline). LCMScheduler's rows
(NitroFusion's released sampler, `TimestepShiftLCMScheduler` with original_inference_steps 4: 2 steps at [999, 499],
3 at [999, 749, 499]) are not prefixes of one another, so this class stores one row of levels per step count
(`step_sigmas`, VE sigma of the shifted timesteps; `step_timesteps` and the shift travel in the model card) and
otherwise generates exactly as OneStepPipeline does: x = D(sigma_1 z, sigma_1), then x = D(x + sigma_k eps_k, sigma_k).
"""
from __future__ import annotations

import math
from typing import Optional

from .onestep import OneStepPipeline
from .registry import register_pipeline


def _rows(step_sigmas) -> list[list[float]]:
    """step_sigmas: row n-1 holds n finite positive noise levels (n = 1..N) that all start at the same level."""
    if not isinstance(step_sigmas, (list, tuple)) or not step_sigmas:
        raise ValueError(f"step_sigmas must be a non-empty list of rows (row n-1: the n levels of the n-step path), "
                         f"got {step_sigmas!r}")
    rows = []
    for n, row in enumerate(step_sigmas, start=1):
        ok = isinstance(row, (list, tuple)) and len(row) == n and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in row)
        if not ok:
            raise ValueError(f"step_sigmas[{n - 1}] must hold {n} finite positive noise levels, got {row!r}")
        rows.append([float(s) for s in row])
    if len({row[0] for row in rows}) != 1:
        raise ValueError(f"step_sigmas: every row must start at the same level (the generator's), got "
                         f"{[row[0] for row in rows]}")
    return rows


@register_pipeline
class NitroFusionPipeline(OneStepPipeline):
    """OneStepPipeline with one row of noise levels per step count (`step_sigmas`; see the module docstring)."""

    def __init__(self, scheduler, unet=None, transformer=None, vae=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                 sigma_init: float = 2.5, prompt_pipeline: Optional[str] = None, default_inference_steps: int = 1,
                 step_sigmas: Optional[list] = None, max_inference_steps: Optional[int] = None,
                 renoise_sigma_end: float = 0.08, renoise_sigmas: Optional[list] = None, timestep_shift: float = 1.0):
        # max_inference_steps / renoise_* / timestep_shift are OneStepPipeline's settings, saved with the config;
        # here the rows decide them (a renoise list or a time shift would contradict the rows, so they are refused)
        rows = _rows(step_sigmas if step_sigmas is not None else [[sigma_init]])
        if renoise_sigmas is not None or timestep_shift != 1.0:
            raise ValueError("NitroFusionPipeline takes its levels from step_sigmas; drop renoise_sigmas and "
                             "timestep_shift")
        if max_inference_steps is not None and max_inference_steps != len(rows):
            raise ValueError(f"max_inference_steps {max_inference_steps!r} contradicts step_sigmas ({len(rows)} rows)")
        super().__init__(scheduler, unet, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, sigma_init=rows[0][0], prompt_pipeline=prompt_pipeline,
                         default_inference_steps=default_inference_steps, max_inference_steps=len(rows),
                         renoise_sigma_end=renoise_sigma_end)
        self.register_to_config(step_sigmas=rows)

    @classmethod
    def dummy_components(cls) -> dict:
        """OneStepPipeline's tiny UNet with a 3-row grid (levels at DDPM timesteps 440, 330/220, ...)."""
        return {**OneStepPipeline.dummy_components(),
                "step_sigmas": [[2.5], [2.5, 0.9], [2.5, 1.4, 0.9]]}

    def sigmas(self, num_steps: int) -> list:
        return list(self.config.step_sigmas[num_steps - 1])

    def card_facts(self) -> dict:
        return {**super().card_facts(), "step_sigmas": self.config.step_sigmas}
