"""An image auto-regressive model seen as a conditional score in codebook-embedding space, and the AR-diffusion
network DD2 trains on it.

**The AR model as a denoiser** (Distilled Decoding, Liu et al., ICLR 2025, arXiv 2412.17153, sec. 3; DD2, Liu et al.,
NeurIPS 2025, arXiv 2510.21003, sec. 3). Given the prefix q_<i, the teacher puts probability p_j on code vector c_j,
so the token's embedding x0 has law sum_j p_j delta(c_j). Noised on the flow-matching path x_t = (1 - t) x0 + t eps
(t = 1 pure noise) it is the Gaussian mixture p_t(x) = sum_j p_j N(x; (1 - t) c_j, t^2 I), whose posterior mean is in
closed form:

    w_j(x, t) = softmax_j( log p_j + (1 - t)/t^2 x.c_j - (1 - t)^2/(2 t^2) ||c_j||^2 )     (a [N, d] x [d, K] matmul)
    D_T(x, t) = sum_j w_j c_j = E[x0 | x_t = x],      score  s_T(x, t) = -(x - (1 - t) D_T) / t^2

(`teacher_denoiser`, `teacher_score`; the ||x||^2 term is constant in j and dropped, so the softmax is stable in
float32 for every t >= t_min; top-k-masked codes have log p = -inf and weight 0).

**The AR-diffusion network** `ARDiffusionModel` (DD2 sec. 3.2: the teacher's backbone under a small diffusion head;
one class for the stage-1 model, DD2's guidance network and its one-step generator) lives in
`onestep/pipelines/standalone_ar_diffusion.py`, the self-contained file every DD2 export carries for plain diffusers;
it is re-exported here with `nearest_codes` (the VQ quantiser's rule, from the standalone pipeline file), and
`ar_diffusion_from_teacher` builds it on a teacher's backbone (training only).
"""
from __future__ import annotations

import torch

from .pipelines.standalone_ar_diffusion import ARDiffusionModel
from .pipelines.standalone_pipeline import nearest_codes

__all__ = ["ARDiffusionModel", "T_MIN", "ar_diffusion_from_teacher", "nearest_codes", "posterior_logits",
           "teacher_denoiser", "teacher_score"]

T_MIN = 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# the teacher's closed-form denoiser
# ---------------------------------------------------------------------------------------------------------------------
def posterior_logits(x: torch.Tensor, t: torch.Tensor, log_p: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[..., K] unnormalised log posterior weights of code j given x_t = x: log p_j - ||x - (1-t) c_j||^2 / (2 t^2)
    up to a constant in j. x [..., d], t broadcastable to x[..., 0], log_p [..., K], codebook [K, d]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).clamp_min(T_MIN)
    t = t.expand(x.shape[:-1])[..., None]
    a = 1 - t
    c = codebook.to(x.dtype)
    return log_p.to(x.dtype) + (a / t**2) * (x @ c.T) - (a**2 / (2 * t**2)) * c.pow(2).sum(-1)


def teacher_denoiser(x: torch.Tensor, t, log_p: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """D_T(x, t) = E[x0 | x_t = x] under the mixture sum_j p_j N((1-t) c_j, t^2 I): [..., d], differentiable in x."""
    return posterior_logits(x, t, log_p, codebook).softmax(-1) @ codebook.to(x.dtype)


def teacher_score(x: torch.Tensor, t, log_p: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """grad_x log p_t(x) = -(x - (1-t) D_T) / t^2."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).clamp_min(T_MIN).expand(x.shape[:-1])[..., None]
    return -(x - (1 - t) * teacher_denoiser(x, t[..., 0], log_p, codebook)) / t**2


# ---------------------------------------------------------------------------------------------------------------------
# the AR-diffusion network (standalone_ar_diffusion.py: the file every DD2 export carries for plain diffusers)
# ---------------------------------------------------------------------------------------------------------------------
def ar_diffusion_from_teacher(teacher, **head) -> ARDiffusionModel:
    """An `ARDiffusionModel` with the teacher's backbone (weights copied) under a fresh head; `teacher` is an
    AutoregressiveTeacher. sigma_data defaults to the codebook's standard deviation."""
    head.setdefault("sigma_data", float(teacher.codebook.detach().float().std()))
    model = ARDiffusionModel(teacher.lm.config.to_dict(), teacher.num_codes, teacher.num_classes,
                             int(teacher.codebook.shape[1]), **head)
    model.backbone.load_state_dict(teacher.lm.base_model.state_dict())
    return model.to(teacher.codebook.device)
