"""A test-only method that trains a random subset of a pool of heads each step (as NitroFusion's discriminator pool
does): what the trainer's sparse updates, shared random stream and optimizer-state reset must get right.

Importing this module registers it as method "sparse_pool".
"""
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from onestep.methods.base import Method, MethodConfig, OptimizerConfig


class SparsePoolConfig(MethodConfig):
    name: Literal["sparse_pool"] = "sparse_pool"
    pool_size: int = Field(8, ge=1)
    heads_per_step: int = Field(2, ge=1)
    refresh_every: int = Field(0, ge=0, description="re-initialise one drawn head every N steps (0: never)")
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)


class Pool(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, 1) for _ in range(size))


class SparsePool(Method):
    name = "sparse_pool"
    Config = SparsePoolConfig
    teacher_kind = "none"
    ema_network = "pool"
    sparse_networks = ("pool",)

    def __init__(self, config, teacher, data):
        super().__init__(config, teacher, data)
        self.dim = int(data.x[0].numel())
        self.pool = Pool(config.pool_size, self.dim)
        self.drawn: list[list[int]] = []
        self.refreshed: list[int] = []
        self.steps_taken = torch.zeros((), dtype=torch.int64)  # method state, checkpointed

    @property
    def sample_shape(self):
        return tuple(self.data.x.shape[1:])

    @property
    def num_classes(self):
        return None

    def trainable(self):
        return {"pool": (self.pool, self.config.optimizer)}

    def step(self, batch, ctx):
        cfg = self.config
        heads = torch.randperm(cfg.pool_size, generator=ctx.shared_rng, device=ctx.shared_rng.device)
        heads = heads[: cfg.heads_per_step].tolist()
        self.drawn.append(heads)
        if cfg.refresh_every and ctx.step % cfg.refresh_every == 0:
            head = self.pool.heads[heads[0]]
            with torch.no_grad():
                for p in head.parameters():
                    p.normal_(0, 0.1, generator=ctx.shared_rng)
            ctx.reset_optimizer_state("pool", head.parameters())
            self.refreshed.append(heads[0])
        self.steps_taken += 1
        return ctx.update("pool", lambda b: self.loss(b, heads, ctx), batch)

    def loss(self, batch, heads, ctx):
        pool = ctx.net("pool")
        x = batch.x.flatten(1)
        loss = sum((pool.heads[h](x).squeeze(1) - 1).pow(2).mean() for h in heads)
        return loss, {"loss/pool": loss.item()}

    @torch.no_grad()
    def sample(self, network, noise, **cond):
        return noise.clamp(-1, 1)

    def export(self, network, out_dir, card):
        from pathlib import Path

        from safetensors.torch import save_file

        Path(out_dir).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, Path(out_dir) / "pool.safetensors")

    def state_dict(self):
        return {"steps_taken": self.steps_taken.clone()}

    def load_state_dict(self, state):
        self.steps_taken = state["steps_taken"].clone()

    @classmethod
    def smoke_recipe(cls, teacher):
        return {"data": {"name": "digits", "resolution": 8}, "method": {"name": cls.name}}
