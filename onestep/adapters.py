"""Control adapters for a frozen generator network: ControlNet (Zhang, Rao & Agrawala, ICCV 2023) residuals added to
the network's skip connections and mid block, for the new controls of NCT (`onestep.methods.nct`).

One interface for every base network class:

    adapter(sample, timestep, controlnet_cond=c, conditioning_scale=s, **cond) -> (down_residuals, mid_residual)

is the call signature of diffusers' `ControlNetModel`, which is the adapter of `UNet2DConditionModel` bases
(`ControlNetModel.from_unet`). `UNet2DModel` has no residual inputs, so `ResidualAdapter` is the same construction for
it: a trainable copy of the base encoder (time and class embeddings, conv_in, down blocks, mid block) plus diffusers'
`ControlNetConditioningEmbedding` for the control image and one zero-initialised 1x1 convolution per skip connection
and for the mid block. `attached(model, [(adapter, control, scale), ...])` runs the base with the residuals of any
number of adapters added (each times its scale): through the UNet2DConditionModel's own
`down_block_additional_residuals` / `mid_block_additional_residual` inputs, or through forward hooks on a UNet2DModel's
up blocks (their skip inputs) and mid block. Zero-initialised output convolutions make every residual exactly zero
before training, so the adapted generator equals the base bit for bit.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from diffusers import ControlNetModel, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding, zero_module
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ResidualAdapter(ModelMixin, ConfigMixin):
    """ControlNet for a diffusers `UNet2DModel`: the base's encoder copied (`from_unet`) with its weights, a control
    embedding added to conv_in's output, and zero 1x1 convolutions on every skip connection and on the mid block.

    unet_config: the base UNet2DModel's config; conditioning_channels: channels of the control map;
    conditioning_embedding_out_channels: the control embedding's widths (each after the first halves the resolution:
    (16,) for controls at the network's resolution, (16, 32, 96, 256) for 8x latent bases, as ControlNet).
    """

    @register_to_config
    def __init__(self, unet_config: dict | None = None, conditioning_channels: int = 1,
                 conditioning_embedding_out_channels: tuple[int, ...] = (16,)):
        super().__init__()
        config = {k: v for k, v in (unet_config or {}).items() if not k.startswith("_")}
        base = UNet2DModel.from_config(config)
        if any(hasattr(block, "skip_conv") for block in base.down_blocks):
            raise ValueError("ResidualAdapter: skip-connection UNets (SkipDownBlock2D) are not supported")
        self.time_proj, self.time_embedding = base.time_proj, base.time_embedding
        self.class_embedding = base.class_embedding
        self.conv_in, self.down_blocks, self.mid_block = base.conv_in, base.down_blocks, base.mid_block
        widths = list(base.config.block_out_channels)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            widths[0], conditioning_channels, tuple(conditioning_embedding_out_channels))
        channels = [widths[0]]  # conv_in's output is the first skip connection
        for i, block in enumerate(base.down_blocks):
            channels += [widths[i]] * len(block.resnets)
            channels += [widths[i]] * len(block.downsamplers or [])
        self.controlnet_down_blocks = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in channels)
        self.controlnet_mid_block = zero_module(nn.Conv2d(widths[-1], widths[-1], 1)) \
            if base.mid_block is not None else None

    @classmethod
    def from_unet(cls, unet: UNet2DModel, conditioning_channels: int = 1,
                  conditioning_embedding_out_channels: tuple[int, ...] = (16,)) -> "ResidualAdapter":
        """The adapter of `unet`, its encoder initialised from the unet's weights (ControlNet's trainable copy)."""
        adapter = cls(dict(unet.config), conditioning_channels, tuple(conditioning_embedding_out_channels))
        for name in ("time_proj", "time_embedding", "class_embedding", "conv_in", "down_blocks", "mid_block"):
            source = getattr(unet, name)
            if source is not None:
                getattr(adapter, name).load_state_dict(source.state_dict())
        return adapter

    def forward(self, sample, timestep, encoder_hidden_states=None, controlnet_cond=None, conditioning_scale=1.0,
                class_labels=None, return_dict: bool = False, **unused):
        """(down residuals, one per skip connection of the base; mid residual), as `ControlNetModel` returns."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        t = t.reshape(-1).to(sample.device) * torch.ones(sample.shape[0], dtype=t.dtype, device=sample.device)
        emb = self.time_embedding(self.time_proj(t).to(dtype=self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided: the base generator is class-conditional")
            labels = self.time_proj(class_labels) if self.config.unet_config.get("class_embed_type") == "timestep" \
                else class_labels
            emb = emb + self.class_embedding(labels).to(dtype=self.dtype)
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.to(self.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += list(res)
        down = [conv(s) * conditioning_scale for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = None
        if self.mid_block is not None:
            mid = self.controlnet_mid_block(self.mid_block(h, emb)) * conditioning_scale
        return down, mid


def make_adapter(unet: nn.Module, conditioning_channels: int, downscale: int = 1,
                 embedding_channels: tuple[int, ...] | None = None) -> nn.Module:
    """The adapter of a base network: `ControlNetModel.from_unet` for UNet2DConditionModel, `ResidualAdapter.from_unet`
    for UNet2DModel. `downscale` is how much smaller the network's input is than the control (8 for SD's VAE): the
    control embedding halves the resolution log2(downscale) times."""
    steps = int(downscale).bit_length() - 1
    if downscale < 1 or 1 << steps != downscale:
        raise ValueError(f"adapter: the control must be a power-of-two multiple of the network resolution, got "
                         f"{downscale}")
    widths = tuple(embedding_channels or (16, 32, 96, 256, 256, 256)[: steps + 1])
    if len(widths) != steps + 1:
        raise ValueError(f"adapter: {len(widths)} embedding widths for {steps} halvings; give {steps + 1}")
    if isinstance(unet, UNet2DConditionModel):
        adapter = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths,
                                            conditioning_channels=conditioning_channels)
        return adapter.to(dtype=torch.float32)
    if isinstance(unet, UNet2DModel):
        return ResidualAdapter.from_unet(unet, conditioning_channels, widths)
    raise ValueError(f"adapter: no control adapter for a {type(unet).__name__} base; supported: UNet2DModel, "
                     "UNet2DConditionModel")


@contextlib.contextmanager
def attached(model: nn.Module, entries):
    """Within the block, every call of `model` (a UNet2DModel or UNet2DConditionModel) adds the residuals of each
    (adapter, control, scale) in `entries`, computed from the same (sample, timestep, conditioning) the model gets.
    An entry whose control is None is skipped; with no entries the model runs unchanged."""
    entries = [(a, c, s) for a, c, s in entries if c is not None]
    if not entries:
        yield
        return
    signature = inspect.signature(model.forward)
    stash: dict = {}
    handles = []

    def residuals(args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        sample, timestep = bound["sample"], bound["timestep"]
        cond = {k: bound[k] for k in ("encoder_hidden_states", "class_labels", "added_cond_kwargs") if
                bound.get(k) is not None}
        down, mid = None, None
        for adapter, control, scale in entries:
            d, m = adapter(sample, timestep, controlnet_cond=control.to(sample.device), conditioning_scale=scale,
                           return_dict=False, **cond)
            down = list(d) if down is None else [x + y for x, y in zip(down, d)]
            mid = m if mid is None else (mid if m is None else mid + m)
        dtype = sample.dtype
        return [d.to(dtype) for d in down], (None if mid is None else mid.to(dtype))

    if isinstance(model, UNet2DConditionModel):
        def pre_hook(module, args, kwargs):
            down, mid = residuals(args, kwargs)
            return args, {**kwargs, "down_block_additional_residuals": tuple(down),
                          "mid_block_additional_residual": mid}

        handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    elif isinstance(model, UNet2DModel):
        counts = [len(block.resnets) for block in model.up_blocks]

        def pre_hook(module, args, kwargs):
            down, stash["mid"] = residuals(args, kwargs)
            if len(down) != sum(counts):
                raise ValueError(f"adapter gives {len(down)} residuals, the UNet has {sum(counts)} skip connections")
            stash["down"] = down
            return None

        def up_hook(index):
            def hook(module, args):
                end = sum(counts) - sum(counts[:index])
                add = stash["down"][end - counts[index]: end]
                skips = tuple(s + r for s, r in zip(args[1], add))
                return (args[0], skips, *args[2:])
            return hook

        def mid_hook(module, args, output):
            return output if stash["mid"] is None else output + stash["mid"]

        handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles += [block.register_forward_pre_hook(up_hook(i)) for i, block in enumerate(model.up_blocks)]
        if model.mid_block is not None:
            handles.append(model.mid_block.register_forward_hook(mid_hook))
    else:
        raise ValueError(f"adapter: cannot attach adapters to a {type(model).__name__}; supported: UNet2DModel, "
                         "UNet2DConditionModel")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        stash.clear()

