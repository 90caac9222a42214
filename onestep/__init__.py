"""onestep: one-step diffusion distillation and generation on diffusers teachers."""
__version__ = "0.1.0"
