"""One More Step (Hu et al., CVPR 2024, arXiv 2311.15744): the pieces shared by the trainer and the pipeline.

Stable Diffusion's training schedule ends at alpha-bar_T = 0.0047 > 0, so x_T still holds sqrt(0.0047) = 6.8 % of the
image, mostly its low frequencies (mean brightness, colour). Samplers start from N(0, I), whose low frequencies are ~0,
and the frozen base model then cannot make very dark or bright images. OMS keeps the base model untouched and puts
ONE step in front of its sampler:

    v_hat = psi(x_dag, c)                 a time-free UNet at zero SNR (alpha-bar = 0), where v = -x0
    x0_hat = -v_hat                       (classifier-free guidance on psi with the empty prompt as uncond)
    x_T = sqrt(ab_S) x0_hat + ...         a DDIM/DDPM step from alpha-bar 0 to ab_S, the alpha-bar of the first
                                          timestep the base sampler will use (`oms_step`, `target_alpha_bar`)

and hands x_T to the base pipeline as its `latents`. psi is trained by regressing v_hat onto -x0 in the base model's
(latent) space (`onestep.methods.oms`); the optimum is -E[x0 | c], the prompt's mean latent.

The network is the public inference code's `UNet2DConditionWoCTModel` (mhh0318/OneMoreStep,
diffusers_patch/models/unet_2d_condition_woct.py) rebuilt from public diffusers blocks: diffusers'
`UNet2DConditionModel` without time embedding, with identical parameter names, so released OMS weights load by key.
"""
from __future__ import annotations

import math
import re

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_mid_block, get_up_block
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

OMS_MODES = ("reference", "ddpm", "ddim")


class TimeFreeUNet2DConditionModel(ModelMixin, ConfigMixin):
    """diffusers' UNet2DConditionModel with the time input removed (no time_proj / time_embedding, resnets built with
    temb_channels=None): forward(sample, encoder_hidden_states) -> v at zero SNR. Keys equal the diffusers model's
    minus those containing time_proj, time_embedding and time_emb_proj."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, sample_size=None, in_channels: int = 4, out_channels: int = 4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 mid_block_type: str = "UNetMidBlock2DCrossAttn",
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(160, 320, 640), layers_per_block=2, transformer_layers_per_block=1,
                 downsample_padding: int = 1, mid_block_scale_factor: float = 1.0, act_fn: str = "silu",
                 norm_num_groups: int = 32, norm_eps: float = 1e-5, cross_attention_dim=1024,
                 attention_head_dim=8, num_attention_heads=None, use_linear_projection: bool = False,
                 only_cross_attention=False, upcast_attention: bool = False):
        super().__init__()
        if len(down_block_types) != len(up_block_types) or len(block_out_channels) != len(down_block_types):
            raise ValueError(f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) and "
                             f"block_out_channels ({len(block_out_channels)}) must have the same length")
        n = len(down_block_types)
        heads = num_attention_heads or attention_head_dim  # diffusers' legacy meaning: attention_head_dim = heads
        per = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n  # noqa: E731
        heads, head_dim, cross = per(heads), per(attention_head_dim), per(cross_attention_dim)
        layers, tlayers, only_cross = per(layers_per_block), per(transformer_layers_per_block), per(only_cross_attention)
        common = dict(temb_channels=None, resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                      use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                      resnet_time_scale_shift="default")
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, kind in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(get_down_block(
                kind, num_layers=layers[i], transformer_layers_per_block=tlayers[i], in_channels=in_ch,
                out_channels=out_ch, add_downsample=i < n - 1, cross_attention_dim=cross[i],
                num_attention_heads=heads[i], downsample_padding=downsample_padding,
                only_cross_attention=only_cross[i], attention_head_dim=head_dim[i] or out_ch, **common))
        self.mid_block = get_mid_block(
            mid_block_type, in_channels=block_out_channels[-1], output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=tlayers[-1], num_attention_heads=heads[-1], cross_attention_dim=cross[-1],
            attention_head_dim=head_dim[-1], **common)
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(block_out_channels))
        out_ch = rev[0]
        for i, kind in enumerate(up_block_types):
            prev, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, n - 1)]
            self.up_blocks.append(get_up_block(
                kind, num_layers=list(reversed(layers))[i] + 1,
                transformer_layers_per_block=list(reversed(tlayers))[i], in_channels=in_ch, out_channels=out_ch,
                prev_output_channel=prev, add_upsample=i < n - 1, resolution_idx=i,
                cross_attention_dim=list(reversed(cross))[i], num_attention_heads=list(reversed(heads))[i],
                only_cross_attention=list(reversed(only_cross))[i],
                attention_head_dim=list(reversed(head_dim))[i] or out_ch, **common))
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor, return_dict: bool = True):
        factor = 2 ** (len(self.up_blocks) - 1)
        forward_size = any(s % factor for s in sample.shape[-2:])
        sample = self.conv_in(sample)
        skips = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=None, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, res = block(hidden_states=sample, temb=None)
            skips += res
        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(sample, None, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = self.mid_block(sample, None)
        for i, block in enumerate(self.up_blocks):
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            size = skips[-1].shape[2:] if forward_size and i < len(self.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=None, res_hidden_states_tuple=res,
                               encoder_hidden_states=encoder_hidden_states, upsample_size=size)
            else:
                sample = block(hidden_states=sample, temb=None, res_hidden_states_tuple=res, upsample_size=size)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


class WordEncoder(ModelMixin, ConfigMixin):
    """The OMS prompt encoder for onestep's embedded datasets: a learned embedding per word of a fixed vocabulary
    plus a learned position embedding, `max_length` tokens per prompt (padding is the empty word, so "" is the
    unconditional prompt). tokenize(prompts) -> ids [B, L]; forward(ids) -> encoder_hidden_states [B, L, D]. Words
    outside the vocabulary are an error naming them."""

    @register_to_config
    def __init__(self, vocabulary=("dark", "bright"), hidden_size: int = 32, max_length: int = 4):
        super().__init__()
        self.index = {w: i + 1 for i, w in enumerate(vocabulary)}  # 0 = padding / the empty prompt
        self.embed = nn.Embedding(len(vocabulary) + 1, hidden_size)
        self.position = nn.Parameter(torch.zeros(max_length, hidden_size))
        nn.init.normal_(self.embed.weight, std=1.0)

    @staticmethod
    def words(prompt: str) -> list[str]:
        return re.findall(r"[\w'-]+", prompt.lower())

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.config.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = self.words(prompt)
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(f"oms_prompt {prompt!r}: word(s) {', '.join(unknown)} are not in this OMS module's "
                                 f"vocabulary ({', '.join(self.config.vocabulary)})")
            for col, word in enumerate(words[: self.config.max_length]):
                ids[row, col] = self.index[word]
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + self.position[: ids.shape[1]]


class PromptEncoderForOMS:
    """tokenize/encode over either encoder: a `WordEncoder`, or a transformers CLIPTextModel + CLIPTokenizer (the
    released OMS modules' kind; last hidden state, padded to the tokenizer's max length)."""

    def __init__(self, text_encoder, tokenizer=None):
        if text_encoder is None:
            raise ValueError("an OMS module needs its prompt encoder (oms_text_encoder)")
        if not isinstance(text_encoder, WordEncoder) and tokenizer is None:
            raise ValueError(f"oms_text_encoder {type(text_encoder).__name__} needs an oms_tokenizer")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(self.text_encoder, WordEncoder):
            return self.text_encoder.tokenize(prompts)
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.text_encoder.device)
        if isinstance(self.text_encoder, WordEncoder):
            return self.text_encoder(ids)
        return self.text_encoder(ids)[0]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.embed(self.tokenize(prompts))


def oms_step(x0_hat: torch.Tensor, x_dag: torch.Tensor, alpha_bar, mode: str = "reference",
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """The step from alpha-bar 0 (x_dag = pure noise, so eps_hat = x_dag) to `alpha_bar` given x0_hat:

    ddim       (eta = 0) sqrt(ab) x0_hat + sqrt(1 - ab) x_dag                  deterministic, keeps the input noise
    ddpm       (eta = 1) sqrt(ab) x0_hat + sqrt(1 - ab) z                      the DDPM posterior from alpha-bar 0
    reference  sqrt(ab) x0_hat + (1 - ab) z                                    what the public pipeline computes
               (mhh0318/OneMoreStep pipeline_oms.py `oms_step`: the DDPM posterior with the fresh noise scaled by
               the variance rather than the standard deviation, 0.9953 vs 0.9977 at ab = 0.0047)

    `noise` is z (required for ddpm and reference)."""
    if mode not in OMS_MODES:
        raise ValueError(f"oms_mode must be one of {', '.join(OMS_MODES)}, got {mode!r}")
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if not 0.0 < float(ab) < 1.0:
        raise ValueError(f"the target alpha-bar must be in (0, 1), got {float(ab)}")
    a, s = math.sqrt(float(ab)), math.sqrt(1.0 - float(ab))
    if mode == "ddim":
        return a * x0_hat + s * x_dag
    if noise is None:
        raise ValueError(f"oms_mode {mode!r} draws fresh noise: pass noise=")
    return a * x0_hat + (s if mode == "ddpm" else 1.0 - float(ab)) * noise


def target_alpha_bar(scheduler, num_inference_steps: int | None = None, device=None, **set_timesteps_kwargs) -> float:
    """alpha-bar at the first timestep a diffusers VP scheduler will use: `set_timesteps` first (its spacing, offset,
    custom timesteps), then alphas_cumprod[timesteps[0]]. Flow-matching schedulers are refused (they start at pure
    noise already, so there is nothing for OMS to fix)."""
    name = type(scheduler).__name__
    if "FlowMatch" in name or getattr(scheduler.config, "use_flow_sigmas", False) or \
            not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"OMS needs a VP (alpha-bar) scheduler; {name} is flow matching / has no alphas_cumprod, and "
                         "flow-matching models start at pure noise already (nothing for OMS to fix)")
    if num_inference_steps is not None or set_timesteps_kwargs:
        scheduler.set_timesteps(num_inference_steps, device=device, **set_timesteps_kwargs)
    t = scheduler.timesteps[0]
    if getattr(scheduler, "sigmas", None) is not None and not float(t).is_integer():  # fractional (Karras) timesteps
        sigma = float(scheduler.sigmas[0])
        return 1.0 / (1.0 + sigma ** 2)
    return float(scheduler.alphas_cumprod[int(t)])
