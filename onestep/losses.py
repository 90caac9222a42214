"""Losses shared by the methods: score-distillation generator losses and GAN losses, each a small callable naming its
paper (in the style of NVlabs/edm's `loss.py`).

Conventions: VE form x_t = x0 + sigma eps; `d_teacher` = D_p(x_t), `d_fake` = D_q(x_t) are x0 estimates of the frozen
teacher and the fake score; every loss is computed per sample over all non-batch dimensions and reduced by
`reduction` ("mean", "sum" or "none": one value per sample). A per-position loss (one per token) is the same call on
x reshaped to [B * n, d].
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

DIVERGENCES = ("rkl", "fkl", "jeffreys", "js", "pearson", "neyman", "hellinger", "srkl")
GAN_LOSSES = ("non_saturating", "hinge", "relativistic")


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ---------------------------------------------------------------------------------------------------------------------
# f-divergences: h(r) = r^2 f''(r) and its first two derivatives (Uni-Instruct, Wang et al. 2025, Table 1 / eq. 3.9)
# ---------------------------------------------------------------------------------------------------------------------
def h_terms(name: str, r: torch.Tensor):
    """(h, h', h'') at the density ratio r = p/q for the f-divergence `name`."""
    one, zero = torch.ones_like(r), torch.zeros_like(r)
    if name == "rkl":            # KL(q||p), f = -log r
        return one, zero, zero
    if name == "fkl":            # KL(p||q), f = r log r
        return r, one, zero
    if name == "jeffreys":       # f = (r - 1) log r
        return 1 + r, one, zero
    if name == "js":             # Jensen-Shannon
        return r / (1 + r), (1 + r) ** -2, -2 * (1 + r) ** -3
    if name == "pearson":        # chi^2(p||q), f = (r - 1)^2
        return 2 * r**2, 4 * r, 4 * one
    if name == "neyman":         # chi^2(q||p), f = (1 - r)^2 / r
        return 2 / r, -2 / r**2, 4 / r**3
    if name == "hellinger":      # squared Hellinger, f = (sqrt r - 1)^2
        return r.sqrt() / 2, r.rsqrt() / 4, -(r**-1.5) / 8
    if name == "srkl":           # softened reverse KL, f = (r + 1) log((r + 1) / (2 r))
        return 1 / (1 + r), -((1 + r) ** -2), 2 * (1 + r) ** -3
    raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(DIVERGENCES)}")


class UniInstructLoss:
    """Uni-Instruct's expanded f-divergence surrogate (Wang et al., NeurIPS 2025, arXiv 2505.20755, Theorem 3.3),
    per sample, in x0 units (already multiplied by the SiD weight w = sigma^4 / wf). With delta = (D_p - D_q)/sigma^2
    and B = (D_q - x0)/sigma^2 its gradient is that of int w E_q[h(r) ||delta||^2]:

        L = 2 sg[h] delta.B + sg[h - r h'] ||delta||^2 + sg[-r^2 h'' ||delta||^2 delta + 2 r h' (delta.B) delta] . x_t

    ("sim", "fgm" and "di" terms, weighted by c_sim, c_fgm, c_di; (1, 1, 1) is the exact gradient). SiD(alpha)
    (Zhou et al., ICML 2024, eq. 8) is reverse KL with weights (1/2, 1 - alpha, 0).
    """

    def __init__(self, divergence: str, c_sim: float = 1.0, c_fgm: float = 1.0, c_di: float = 1.0,
                 reduction: str = "none"):
        self.divergence, self.c_sim, self.c_fgm, self.c_di = divergence, c_sim, c_fgm, c_di
        self.reduction = reduction

    @classmethod
    def sid(cls, alpha: float, reduction: str = "none") -> "UniInstructLoss":
        """SiD(alpha): the reverse-KL (Fisher divergence) case."""
        return cls("rkl", 0.5, 1 - alpha, 0.0, reduction)

    def __call__(self, x0, d_teacher, d_fake, r, wf, sigma):
        d = (d_teacher - d_fake).flatten(1)        # sigma^2 delta
        b = (d_fake - x0).flatten(1)               # sigma^2 B
        h, h1, h2 = h_terms(self.divergence, r)
        dot_db, dot_dd = (d * b).sum(1), (d * d).sum(1)
        sim = 2 * h * dot_db
        fgm = (h - r * h1) * dot_dd
        coef = (-(r**2) * h2 * dot_dd + 2 * r * h1 * dot_db) / sigma**2   # w * score-unit coefficient, / wf below
        di = (coef.detach()[:, None] * d.detach() * x0.flatten(1)).sum(1)
        return reduce((self.c_sim * sim + self.c_fgm * fgm + self.c_di * di) / wf, self.reduction)


class DistributionMatchingLoss:
    """Diff-Instruct / DMD / DMD2 / f-distill generator loss: the frozen direction h(r) (D_q - D_p) / wf on x0.

    Its gradient is that of int w(t) D_f(p_t || q_t) dt (Luo et al. 2023, eq. 3.4; Yin et al. 2024, eq. 7;
    Xu et al. 2025, eq. 8); h = 1 is reverse KL (Diff-Instruct, DMD, DMD2).
    """

    def __init__(self, divergence: str = "rkl", reduction: str = "none"):
        self.divergence, self.reduction = divergence, reduction

    def __call__(self, x0, d_teacher, d_fake, r, wf, sigma):
        h = h_terms(self.divergence, r)[0]
        direction = (h[:, None] * (d_fake - d_teacher).flatten(1) / wf[:, None]).detach()
        return reduce((direction * x0.flatten(1)).sum(1), self.reduction)


# ---------------------------------------------------------------------------------------------------------------------
# GAN losses on discriminator logits (one per sample)
# ---------------------------------------------------------------------------------------------------------------------
class GANLoss:
    """Discriminator and generator losses of one GAN objective:

    * "non_saturating": D: softplus(-l_real) + softplus(l_fake) (BCE; at the optimum l = log p/q); G: softplus(-l_fake)
      (Goodfellow et al. 2014, sec. 3; SiDA, DMD2);
    * "hinge": D: relu(1 - l_real) + relu(1 + l_fake); G: -l_fake (Lim & Ye 2017; Miyato et al. 2018);
    * "relativistic": pairs (real i, fake i): D: softplus(l_fake - l_real); G: softplus(l_real - l_fake)
      (Jolicoeur-Martineau 2019, RpGAN; R3GAN, Huang et al. 2024).
    """

    def __init__(self, kind: str = "non_saturating", reduction: str = "mean"):
        if kind not in GAN_LOSSES:
            raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")
        self.kind, self.reduction = kind, reduction

    def discriminator(self, logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
        if self.kind == "non_saturating":
            per_sample = F.softplus(-logit_real) + F.softplus(logit_fake)
        elif self.kind == "hinge":
            per_sample = F.relu(1 - logit_real) + F.relu(1 + logit_fake)
        else:
            per_sample = F.softplus(logit_fake - logit_real)
        return reduce(per_sample, self.reduction)

    def generator(self, logit_fake: torch.Tensor, logit_real: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "non_saturating":
            per_sample = F.softplus(-logit_fake)
        elif self.kind == "hinge":
            per_sample = -logit_fake
        else:
            if logit_real is None:
                raise ValueError("the relativistic GAN loss needs the real logits in the generator step too")
            per_sample = F.softplus(logit_real - logit_fake)
        return reduce(per_sample, self.reduction)


def density_ratio(logit: torch.Tensor, logit_clamp: float = 10.0, r_min: float = 0.1, r_max: float = 20.0):
    """r = p/q from a BCE discriminator's logit (its optimum is log p/q), clamped and detached as in NVlabs/FastGen's
    f-distill."""
    return logit.detach().clamp(-logit_clamp, logit_clamp).exp().clamp(r_min, r_max)
