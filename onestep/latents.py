"""Latent teachers: the recipe works in the VAE's latent space; pixels appear only at the edges (real images for
the discriminator are encoded once, samples are decoded for grids, FID and the pipeline's output)."""
from __future__ import annotations

import torch

from .denoisers import import_trusted_class, load_component, read_model_index

CHUNK = 64


class LatentSpace:
    """latents = (vae.encode(x).mean - shift_factor) * scaling_factor, and back (the diffusers convention)."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling = float(vae.config.get("scaling_factor", 1.0) or 1.0)
        self.shift = float(vae.config.get("shift_factor", 0.0) or 0.0)

    @classmethod
    def from_pretrained(cls, path: str) -> "LatentSpace | None":
        index = read_model_index(path)
        if "vae" not in index or index["vae"][0] is None:
            return None
        return cls(load_component(import_trusted_class(index["vae"], path), path, "vae"))  # safetensors only

    def to(self, *args, **kwargs) -> "LatentSpace":
        self.vae.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (the posterior mean: deterministic, so resume and ranks agree)."""
        dtype = self.vae.dtype
        out = [self.vae.encode(x.to(dtype)).latent_dist.mean.float() for x in images.split(CHUNK)]
        return (torch.cat(out) - self.shift) * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        dtype = self.vae.dtype
        out = [self.vae.decode((z / self.scaling + self.shift).to(dtype)).sample.float() for z in latents.split(CHUNK)]
        return torch.cat(out).clamp(-1, 1)
