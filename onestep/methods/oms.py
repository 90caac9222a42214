"""One More Step (Hu et al., CVPR 2024, arXiv 2311.15744): a time-free network psi that turns pure noise into the
first state x_T of a frozen base model's schedule whose terminal alpha-bar is > 0 (Stable Diffusion's 0.0047).

Only inference code was released (mhh0318/OneMoreStep); the objective here is reconstructed from the paper's setup.
At alpha-bar = 0 the v-target (Salimans & Ho 2022) is v = sqrt(ab) eps - sqrt(1 - ab) x0 = -x0, so

    eps ~ N(0, I),  c = caption (dropped to "" with probability cfg_dropout, for classifier-free guidance)
    loss = || psi(eps, c) + x0 ||^2          x0 in the base model's space (latents through its VAE)

whose minimiser is psi* = -E[x0 | c]: the prompt's mean image (its low frequencies), which the base model expects to
find leaked into x_T. The base model is opened as a "latents" teacher: its space is used, its weights never train.
Export: an `OMSPipeline` (onestep/pipelines/oms.py) = this module + its prompt encoder + the frozen base.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..networks import build_network
from ..oms import OMS_MODES, PromptEncoderForOMS, WordEncoder, oms_step
from ..sampling.samplers import sample_euler, teacher_sigmas
from .base import Batch, Method, MethodConfig, OptimizerConfig

DEFAULT_OMS_UNET = {  # the released OMS-B layout (DownBlock2D + 2 cross-attention levels), narrow for 16x16 data
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": [2, 4, 4],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


class OMSConfig(MethodConfig):
    name: Literal["oms"] = "oms"
    model: dict = Field(default_factory=lambda: dict(DEFAULT_OMS_UNET),
                        description="TimeFreeUNet2DConditionModel config (diffusers UNet2DConditionModel keys)")
    encoder: Literal["words", "clip"] = Field("words", description="words: a learned embedding per caption word "
                                              "(embedded datasets); clip: a frozen CLIPTextModel from text_encoder")
    text_encoder: str | None = Field(None, description="clip: a local folder with text_encoder/ and tokenizer/ "
                                     "(e.g. a Stable Diffusion folder)")
    word_dim: int = Field(32, gt=0, le=4096, description="words: embedding width (= cross_attention_dim)")
    max_words: int = Field(4, gt=0, le=77, description="words: tokens per caption")
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="probability of training on the empty caption")
    mode: Literal[OMS_MODES] = Field("reference", description="the OMS step of samples and the export")
    guidance_scale: float = Field(1.0, ge=0, le=50, description="OMS classifier-free guidance of samples/export")
    sample_steps: int = Field(20, gt=0, le=1000, description="base sampler steps (DDIM) after the OMS step")
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)


class OMSNetwork(nn.Module):
    """psi and its prompt encoder as one trainable module: forward(x_dag, token ids) -> v_hat at zero SNR."""

    def __init__(self, module: nn.Module, encoder: nn.Module, tokenizer=None):
        super().__init__()
        self.module, self.encoder, self.tokenizer = module, encoder, tokenizer

    def forward(self, x_dag: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        context = PromptEncoderForOMS(self.encoder, self.tokenizer).embed(tokens)
        return self.module(x_dag, context.to(x_dag.dtype)).sample


class OneMoreStep(Method):
    name = "oms"
    Config = OMSConfig
    teacher_kind = "latents"
    ema_network = "oms"

    def __init__(self, config: OMSConfig, teacher, data):
        super().__init__(config, teacher, data)
        if data.prompts is None:
            raise ValueError(f"method oms learns the mean image of each caption, but dataset {data.name!r} has no "
                             "captions; use digits_brightness, shapes_brightness or captions:DIR")
        if teacher.prompts is not None:
            raise ValueError("method oms: this export samples bases without text; for a text-to-image base train "
                             "with its VAE and put the module in front of it with OMSPipeline.wrap(pipeline)")
        tokenizer = None
        if config.encoder == "words":
            words = sorted({w for p in data.prompts for w in WordEncoder.words(p)})
            encoder = WordEncoder(vocabulary=words, hidden_size=config.word_dim, max_length=config.max_words)
        else:
            if config.text_encoder is None:
                raise ValueError("method.text_encoder: encoder clip needs a local folder with text_encoder/ and "
                                 "tokenizer/ (e.g. a Stable Diffusion folder)")
            from transformers import CLIPTextModel, CLIPTokenizer

            encoder = CLIPTextModel.from_pretrained(config.text_encoder, subfolder="text_encoder",
                                                    use_safetensors=True).requires_grad_(False).eval()
            tokenizer = CLIPTokenizer.from_pretrained(config.text_encoder, subfolder="tokenizer")
        prompt_encoder = PromptEncoderForOMS(encoder, tokenizer)
        device = data.x.device
        data.cond = {**(data.cond or {}), "oms_tokens": prompt_encoder.tokenize(data.prompts).to(device)}
        self.empty_tokens = prompt_encoder.tokenize([""]).to(device)
        channels, *size = self.sample_shape
        hidden = encoder.config.hidden_size
        module = build_network("onestep.oms.TimeFreeUNet2DConditionModel", config.model, sample_size=size[-1],
                               in_channels=channels, out_channels=channels, cross_attention_dim=hidden)
        self.network = OMSNetwork(module, encoder, tokenizer)

    def trainable(self):
        return {"oms": (self.network, self.config.optimizer)}

    def step(self, batch: Batch, ctx) -> dict[str, float]:
        return ctx.update("oms", lambda b: self.loss(b, ctx), batch)

    def loss(self, batch: Batch, ctx) -> tuple[torch.Tensor, dict[str, float]]:
        x0, tokens = batch.x, batch.cond["oms_tokens"]
        drop = torch.rand(len(batch), generator=ctx.rng, device=x0.device) < self.config.cfg_dropout
        tokens = torch.where(drop[:, None], self.empty_tokens.to(tokens.device), tokens)
        eps = torch.randn(x0.shape, generator=ctx.rng, device=x0.device)  # x_T at alpha-bar 0
        v_hat = ctx.net("oms")(eps, tokens)
        loss = (v_hat.float() + x0).pow(2).mean()  # v = -x0 at zero SNR
        return loss, {"loss/oms": loss.item()}

    @torch.no_grad()
    def x0_hat(self, network, x_dag, tokens, guidance_scale: float) -> torch.Tensor:
        v = network(x_dag, tokens)
        if guidance_scale != 1.0:
            v_u = network(x_dag, self.empty_tokens.to(tokens.device).expand_as(tokens))
            v = v_u + guidance_scale * (v - v_u)
        return -v.float()

    @torch.no_grad()
    def sample(self, network, noise, oms_tokens=None, **cond):
        """The OMS step from `noise`, then the frozen base's DDIM (`sample_steps`) from there."""
        tokens = self.empty_tokens.expand(len(noise), -1) if oms_tokens is None else oms_tokens
        sigmas = teacher_sigmas(self.denoiser.schedule, self.config.sample_steps).to(noise.device)
        alpha_bar = 1.0 / (1.0 + float(sigmas[0]) ** 2)
        x0 = self.x0_hat(network, noise, tokens, self.config.guidance_scale)
        x_t = oms_step(x0, noise.float(), alpha_bar, self.config.mode, noise.float())
        return sample_euler(self.denoiser, x_t / math.sqrt(1.0 - alpha_bar), sigmas, **cond)

    def export(self, network, out_dir, card):
        from ..pipelines.oms import OMSPipeline

        model = self.denoiser.model
        slot = "transformer" if hasattr(model, "transformer_blocks") else "unet"
        vae = self.teacher.edges.get("vae")
        space = {"channels": self.sample_shape[0],
                 "scaling_factor": None if vae is None else vae.config.get("scaling_factor")}
        pipe = OMSPipeline(oms_module=network.module, oms_text_encoder=network.encoder,
                           oms_tokenizer=network.tokenizer, scheduler=self.denoiser.scheduler, vae=vae,
                           oms_mode=self.config.mode, oms_guidance_scale=self.config.guidance_scale,
                           default_inference_steps=self.config.sample_steps, oms_latent_space=space, **{slot: model})
        pipe.card = card
        pipe.save_pretrained(out_dir)

    @classmethod
    def smoke_recipe(cls, teacher):
        return {"teacher": teacher, "data": {"name": "digits_brightness", "resolution": 8},
                "method": {"name": cls.name, "word_dim": 8, "sample_steps": 3,
                           "model": {"block_out_channels": [8, 16], "norm_num_groups": 4, "attention_head_dim": [1, 2],
                                     "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                                     "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}}}
