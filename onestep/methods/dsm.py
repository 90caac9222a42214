"""Denoising score matching: how onestep trains its own small teachers (`onestep pretrain`).

The loss is ||D(x0 + sigma eps, sigma) - x0||^2 weighted into the network's native objective by its schedule
(eps-MSE for DDPM teachers, Ho et al. 2020 eq. 14; flow-MSE; EDM's lambda, Karras et al. 2022 eq. 2), so a teacher
trained here is an ordinary diffusers model + scheduler that any diffusers pipeline can also sample.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..denoisers import denoiser_from_pretrained
from ..networks import build_network
from ..sampling.samplers import sample_euler, teacher_sigmas
from .base import Batch, Method, MethodConfig, OptimizerConfig

DEFAULT_UNET = {  # ~1 M parameters, attention-free: ~10 train steps/s at 16x16 on 2 CPU cores (measured)
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                     "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon", "clip_sample": False}


class DenoisingScoreMatchingConfig(MethodConfig):
    name: Literal["dsm"] = "dsm"
    model_class: str = Field("UNet2DModel", description="a diffusers or onestep model class: UNet2DModel, "
                             "UNet2DConditionModel, MLPModel, ...")
    model: dict = Field(default_factory=lambda: dict(DEFAULT_UNET), description="the model class's config")
    scheduler: dict = Field(default_factory=lambda: dict(DEFAULT_SCHEDULER),
                            description="a diffusers scheduler config (with _class_name)")
    class_conditional: bool = True
    sample_steps: int = Field(50, gt=0, description="Euler (DDIM) steps for sample grids and evaluation")
    optimizer: OptimizerConfig = OptimizerConfig(lr=2e-4, betas=(0.9, 0.999))


class DenoisingScoreMatching(Method):
    name = "dsm"
    Config = DenoisingScoreMatchingConfig
    ema_network = "model"
    teacher_kind = "none"

    def __init__(self, config: DenoisingScoreMatchingConfig, teacher, data):
        super().__init__(config, teacher, data)
        import diffusers

        scheduler_cls = getattr(diffusers, config.scheduler.get("_class_name", "DDPMScheduler"))
        self.scheduler = scheduler_cls.from_config(config.scheduler)
        if data.x is None:
            raise ValueError(f"method dsm trains on samples, but dataset {data.name!r} has none")
        num_classes = data.num_classes if config.class_conditional else None
        data.cond = {"class_labels": data.labels} if num_classes else {}
        if data.x.dim() == 2:  # points
            defaults = {"dim": data.x.shape[1], "num_classes": num_classes}
        else:
            channels, size = data.x.shape[1], data.x.shape[-1]
            defaults = {"sample_size": size, "in_channels": channels, "out_channels": channels,
                        "num_class_embeds": num_classes}
        model = build_network(config.model_class, config.model, **defaults)
        self.model_denoiser = denoiser_from_pretrained(model, self.scheduler)

    @property
    def denoiser(self):
        return self.model_denoiser

    def trainable(self):
        return {"model": (self.model_denoiser, self.config.optimizer)}

    def step(self, batch: Batch, ctx) -> dict[str, float]:
        return ctx.update("model", lambda b: self.loss(b, ctx), batch)

    def loss(self, batch: Batch, ctx) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = batch.x
        sigma = self.denoiser.schedule.training_sigmas(len(batch), ctx.rng, device=x0.device).float()
        eps = torch.randn(x0.shape, generator=ctx.rng, device=x0.device)
        x = x0 + sigma.reshape(-1, *[1] * (x0.dim() - 1)) * eps
        x0_hat = ctx.net("model")(x, sigma, **batch.cond)
        per_sample = (x0_hat - x0).flatten(1).pow(2).mean(1)
        loss = (self.denoiser.schedule.loss_weight(sigma) * per_sample).mean()
        return loss, {"loss/dsm": loss.item()}

    @torch.no_grad()
    def sample(self, network, noise, **cond):
        return sample_euler(network, noise, teacher_sigmas(network.schedule, self.config.sample_steps), **cond)

    def export(self, network, out_dir, card):
        save_teacher_folder(network.model, self.scheduler, Path(out_dir), card)

    @classmethod
    def smoke_recipe(cls, teacher):
        return {"data": {"name": "digits", "resolution": 8},
                "method": {"name": cls.name, "model": {"block_out_channels": [8, 16], "norm_num_groups": 4,
                                                       "down_block_types": ["DownBlock2D", "DownBlock2D"],
                                                       "up_block_types": ["UpBlock2D", "UpBlock2D"],
                                                       "layers_per_block": 1},
                           "sample_steps": 4}}


def save_teacher_folder(model, scheduler, out_dir: Path, card: dict | None = None) -> None:
    """A diffusers pipeline folder (model_index.json + unet/ + scheduler/) that `load_teacher` reads back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / "unet", safe_serialization=True)
    scheduler.save_pretrained(out_dir / "scheduler")
    library = "diffusers" if type(model).__module__.startswith("diffusers") else type(model).__module__
    index = {"_class_name": "DDPMPipeline" if library == "diffusers" else "OneStepTeacher",
             "unet": [library, type(model).__name__], "scheduler": ["diffusers", type(scheduler).__name__]}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if card:
        (out_dir / "onestep_card.json").write_text(json.dumps(card, indent=2) + "\n")
