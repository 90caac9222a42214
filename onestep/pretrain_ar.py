"""`onestep pretrain-ar`: a small image auto-regressive teacher (a VQ tokenizer + a GPT-2-style class-conditional
transformer over its codes) trained from scratch on an embedded dataset in CPU minutes, the teacher DD2 distils.

Stage 1, the tokenizer: a diffusers `VQModel` (VQ-VAE, van den Oord et al. 2017; the VQGAN layout of Esser et al.
2021 without the adversarial and perceptual terms) trained on reconstruction MSE + the quantiser's codebook and
commitment loss (`VectorQuantizer`, straight-through gradient). Dead codes (unused over the last `restart_every`
steps) are restarted at random encoder outputs, the k-means-style restart of Dhariwal et al. 2020 (Jukebox, sec. 3.2)
that keeps a small codebook from collapsing.

Stage 2, the prior: a transformers `GPT2LMHeadModel` over [class token, q_1 .. q_n] (LlamaGen's c2i layout, Sun et al.
2024, sec. 2.2), next-token cross-entropy on the image codes, the class token replaced by the null class with
probability `class_dropout` so classifier-free guidance works (Ho & Salimans 2022).

The pair is saved as an `AutoregressiveTeacher` folder (safetensors) with the sampling transform in its config.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from .teachers_ar import AutoregressiveTeacher


@dataclass
class PretrainARConfig:
    data: str = "digits"
    resolution: int = 16
    seed: int = 0
    # tokenizer: (len(vq_channels) - 1) 2x downsamplings: 16x16 -> 4x4 tokens with three levels
    vq_channels: tuple[int, ...] = (16, 32, 32)
    codes: int = 64
    code_dim: int = 4
    vq_steps: int = 800
    vq_batch: int = 32
    vq_lr: float = 2e-3
    restart_every: int = 100
    # prior
    n_embd: int = 64
    n_layer: int = 3
    n_head: int = 4
    lm_steps: int = 2000
    lm_batch: int = 32
    lm_lr: float = 1e-3
    class_dropout: float = 0.1
    dropout: float = 0.1
    # the sampling transform the teacher's FD is quoted with
    guidance_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None


def build_vq(cfg: PretrainARConfig, channels: int = 1):
    from diffusers import VQModel

    levels = len(cfg.vq_channels)
    return VQModel(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * levels,
                   up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(cfg.vq_channels),
                   layers_per_block=1, latent_channels=cfg.code_dim, num_vq_embeddings=cfg.codes,
                   norm_num_groups=8, sample_size=cfg.resolution, vq_embed_dim=cfg.code_dim,
                   mid_block_add_attention=False)


def build_lm(cfg: PretrainARConfig, num_classes: int, seq_len: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = cfg.codes + num_classes + 1
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=seq_len + 1, n_embd=cfg.n_embd,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                                      embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=vocab - 1,
                                      eos_token_id=vocab - 1))


def train_vq(vq, images: torch.Tensor, cfg: PretrainARConfig, gen: torch.Generator, log=print) -> dict:
    opt = torch.optim.Adam(vq.parameters(), lr=cfg.vq_lr)
    codebook = vq.quantize.embedding.weight
    used = torch.zeros(cfg.codes, dtype=torch.bool)
    vq.train()
    for step in range(cfg.vq_steps):
        x = images[torch.randint(len(images), (cfg.vq_batch,), generator=gen)]
        z = vq.encode(x).latents
        z_q, commit, (_, _, ids) = vq.quantize(z)
        recon = vq.decode(z_q, force_not_quantize=True).sample
        loss = F.mse_loss(recon, x) + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used[ids.flatten()] = True
        if (step + 1) % cfg.restart_every == 0 and step + 1 < cfg.vq_steps * 0.8:
            dead = (~used).nonzero().flatten()
            if len(dead):  # restart dead codes at random encoder outputs of this batch (Jukebox sec. 3.2)
                flat = z.detach().permute(0, 2, 3, 1).reshape(-1, cfg.code_dim)
                with torch.no_grad():
                    codebook[dead] = flat[torch.randint(len(flat), (len(dead),), generator=gen)]
                for state in opt.state.get(codebook, {}).values():
                    if torch.is_tensor(state) and state.shape == codebook.shape:
                        state[dead] = 0
            used.zero_()
        if step % 250 == 0 or step == cfg.vq_steps - 1:
            log(f"vq step {step}: mse {F.mse_loss(recon, x).item():.4f} commit {commit.item():.4f}")
    vq.eval()
    with torch.no_grad():
        z = vq.encode(images).latents
        z_q, _, (_, _, ids) = vq.quantize(z)
        mse = F.mse_loss(vq.decode(z_q, force_not_quantize=True).sample, images).item()
    return {"vq_recon_mse": mse, "codes_used": int(ids.unique().numel())}


def train_lm(lm, tokens: torch.Tensor, labels: torch.Tensor, cfg: PretrainARConfig, num_classes: int,
             gen: torch.Generator, log=print) -> dict:
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lm_lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + torch.cos(torch.tensor(s / cfg.lm_steps * 3.14159)).item()))
    null = cfg.codes + num_classes
    lm.train()
    for step in range(cfg.lm_steps):
        rows = torch.randint(len(tokens), (cfg.lm_batch,), generator=gen)
        q, c = tokens[rows], labels[rows] + cfg.codes
        drop = torch.rand(len(c), generator=gen) < cfg.class_dropout
        c = torch.where(drop, torch.full_like(c, null), c)
        ids = torch.cat([c[:, None], q[:, :-1]], dim=1)
        logits = lm(input_ids=ids, use_cache=False).logits[..., : cfg.codes]
        loss = F.cross_entropy(logits.reshape(-1, cfg.codes), q.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.lm_steps - 1:
            log(f"lm step {step}: cross-entropy {loss.item():.4f} (uniform {torch.log(torch.tensor(cfg.codes)):.2f})")
    lm.eval()
    return {"lm_final_ce": loss.item()}


def pretrain_ar(out: str | Path, cfg: PretrainARConfig = PretrainARConfig(), log=print) -> AutoregressiveTeacher:
    """Train tokenizer and prior on `cfg.data`, save the teacher folder at `out`, and return it."""
    from .data import load_dataset

    if cfg.data not in ("digits", "shapes"):
        raise ValueError(f"data must be digits or shapes (the embedded image datasets), got {cfg.data!r}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.resolution)
    images, labels = data.x, data.labels
    vq = build_vq(cfg, images.shape[1])
    facts = train_vq(vq, images, cfg, gen, log)
    with torch.no_grad():
        z = vq.encode(images).latents
        grid = tuple(z.shape[2:])
        tokens = vq.quantize(z)[2][2].reshape(len(images), -1)
    num_classes = data.num_classes if labels is not None else None
    lm = build_lm(cfg, num_classes or 0, grid[0] * grid[1])
    facts.update(train_lm(lm, tokens, labels if labels is not None else torch.zeros(len(tokens), dtype=torch.long),
                          cfg, num_classes or 0, gen, log))
    teacher = AutoregressiveTeacher(lm, vq, num_classes, list(grid), cfg.guidance_scale, cfg.temperature, cfg.top_k)
    teacher.requires_grad_(False).eval()
    teacher.save_pretrained(out)
    facts["train_seconds"] = round(time.perf_counter() - t0, 1)
    card = {"trained_by": "onestep pretrain-ar", "config": asdict(cfg), **facts}
    (Path(out) / "onestep_card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {out}: {json.dumps(facts)}")
    return teacher
