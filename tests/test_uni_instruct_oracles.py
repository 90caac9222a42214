"""Gradient oracles for the Uni-Instruct family (docs/uni_instruct.md sec. 2).

1-D Gaussian toy with everything analytic: teacher p0 = N(0.3, 1), generator x0 = th1 + th2 z with th = (-0.2, 0.8),
VE noise sigma = 0.7. The "frozen" teacher and fake denoisers are analytic functions of x_t with parameters fixed at
th*, so autograd through our loss classes gives exactly the pathwise surrogate gradient. We compare it with the
finite-difference gradient of the exact objective, computed by Gauss-Hermite quadrature in float64.
"""
import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss

from onestep.losses import DIVERGENCES, DistributionMatchingLoss, GANLoss, UniInstructLoss, density_ratio
from onestep.losses import h_terms as _h_terms

MU_P, S_P, SIG = 0.3, 1.0, 0.7
TH0 = np.array([-0.2, 0.8])
GZ, GW = hermegauss(80)
GW = GW / GW.sum()

F = {  # f(r) with r = p/q, matching onestep.losses.h_terms (h = r^2 f'')
    "rkl": lambda r: -np.log(r),
    "fkl": lambda r: r * np.log(r),
    "jeffreys": lambda r: (r - 1) * np.log(r),
    "js": lambda r: r * np.log(r) - (1 + r) * np.log((1 + r) / 2),
    "pearson": lambda r: (r - 1) ** 2,
    "neyman": lambda r: (1 - r) ** 2 / r,
    "hellinger": lambda r: (np.sqrt(r) - 1) ** 2,
    "srkl": lambda r: (r + 1) * np.log((r + 1) / (2 * r)),
}


def _log_normal(x, m, v):
    return -0.5 * np.log(2 * np.pi * v) - 0.5 * (x - m) ** 2 / v


def _h_numpy(name, r):
    return _h_terms(name, torch.as_tensor(r, dtype=torch.float64))[0].numpy()


def _expanded(th, name):
    """E_{q_t}[h(r) |s_p - s_q|^2] by quadrature (the expanded divergence's integrand at one sigma)."""
    m, s = th
    vq, vp = s * s + SIG * SIG, S_P**2 + SIG * SIG
    x = m + np.sqrt(vq) * GZ
    r = np.exp(_log_normal(x, MU_P, vp) - _log_normal(x, m, vq))
    delta = -(x - MU_P) / vp + (x - m) / vq
    return np.sum(GW * _h_numpy(name, r) * delta**2)


def _per_t_divergence(th, name):
    """D_f(p_t || q_t) = E_q f(p/q) by quadrature."""
    m, s = th
    vq, vp = s * s + SIG * SIG, S_P**2 + SIG * SIG
    x = m + np.sqrt(vq) * GZ
    return np.sum(GW * F[name](np.exp(_log_normal(x, MU_P, vp) - _log_normal(x, m, vq))))


def _finite_difference(fun, eps=1e-5):
    grads = []
    for k in range(2):
        a, b = TH0.copy(), TH0.copy()
        a[k] += eps
        b[k] -= eps
        grads.append((fun(a) - fun(b)) / (2 * eps))
    return np.array(grads)


def _surrogate_gradient(loss_fn, wf_of_sigma):
    """Autograd gradient of sum_w loss(x0(th), D_p(x_t), D_q(x_t), r, wf, sigma) over the quadrature grid."""
    th = torch.tensor(TH0, dtype=torch.float64, requires_grad=True)
    z, e = (torch.tensor(g, dtype=torch.float64) for g in np.meshgrid(GZ, GZ, indexing="ij"))
    w = torch.tensor(np.outer(GW, GW), dtype=torch.float64).flatten()
    m, s = TH0  # frozen parameters of the fake score
    vq, vp = s * s + SIG**2, S_P**2 + SIG**2
    x0 = (th[0] + th[1] * z).flatten()[:, None]
    x_t = x0 + SIG * e.flatten()[:, None]
    d_teacher = x_t + SIG**2 * (-(x_t - MU_P) / vp)      # D = x + sigma^2 score
    d_fake = x_t + SIG**2 * (-(x_t - m) / vq)
    r = torch.exp(torch.tensor(_log_normal(x_t.detach().numpy(), MU_P, vp) - _log_normal(x_t.detach().numpy(), m, vq)))
    sigma = torch.full((len(w),), SIG, dtype=torch.float64)
    per_sample = loss_fn(x0, d_teacher, d_fake, r.flatten(), wf_of_sigma(sigma), sigma)
    (w * per_sample).sum().backward()
    return th.grad.numpy()


SCORE_UNITS = lambda sigma: sigma**4   # noqa: E731  wf = sigma^4 turns the x0-unit SiD weight into score units


@pytest.mark.parametrize("name", DIVERGENCES)
def test_uni_instruct_surrogate_is_the_expanded_divergence_gradient(name):
    true = _finite_difference(lambda th: _expanded(th, name))
    surrogate = _surrogate_gradient(UniInstructLoss(name), SCORE_UNITS)
    np.testing.assert_allclose(surrogate, true, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name, expected", [
    ("rkl", [-0.450430, -0.532346]), ("fkl", [-0.783147, -1.352834]), ("js", [-0.249556, -0.340564]),
    ("pearson", [-6.901323, -17.513810]), ("hellinger", [2 * -0.136830, 2 * -0.195908]),  # pinned with h = sqrt(r)/4
])
def test_uni_instruct_matches_pinned_reference_numbers(name, expected):
    np.testing.assert_allclose(_surrogate_gradient(UniInstructLoss(name), SCORE_UNITS), expected, atol=2e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_frozen_direction_is_the_per_time_f_divergence_gradient(name):
    """DI / DMD / f-distill: grad D_f(p_t||q_t) = E[-h(r) delta . dx_t/dth]; wf = sigma^2 removes DMD2's scaling."""
    true = _finite_difference(lambda th: _per_t_divergence(th, name))
    surrogate = _surrogate_gradient(DistributionMatchingLoss(name), lambda s: s**2)
    np.testing.assert_allclose(surrogate, true, rtol=1e-6, atol=1e-8)


def test_per_time_reference_numbers():
    for name, expected in [("rkl", [-0.335570, -0.171052]), ("fkl", [-0.442478, -0.382176]),
                           ("js", [-0.178270, -0.111570]), ("pearson", [-1.895632, -2.935756])]:
        got = _surrogate_gradient(DistributionMatchingLoss(name), lambda s: s**2)
        np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize("alpha, expected", [(0.0, [-0.30693, -0.45920]), (0.5, [-0.45043, -0.53235]),
                                             (1.0, [-0.59393, -0.60549]), (1.2, [-0.65133, -0.63475])])
def test_sid_alpha_sweep(alpha, expected):
    """SiD(alpha) = Uni-Instruct reverse KL with term weights (1/2, 1 - alpha, 0); alpha = 0.5 is exact Fisher."""
    got = 2 * _surrogate_gradient(UniInstructLoss("rkl", 0.5, 1 - alpha, 0.0), SCORE_UNITS)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sid_loss_equals_official_form():
    """Per sample: (y_real - y_fake).((y_real - y) - alpha (y_real - y_fake)) / wf  (SiD sid_loss.py)."""
    g = torch.Generator().manual_seed(0)
    y, y_real, y_fake = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    wf = torch.rand(4, generator=g) + 0.5
    alpha = 1.2
    official = ((y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake))).flatten(1).sum(1) / wf
    ours = UniInstructLoss("rkl", 0.5, 1 - alpha, 0.0)(y, y_real, y_fake, torch.ones(4), wf, torch.ones(4))
    torch.testing.assert_close(ours, official)


def test_scale_equivariance_catches_misplaced_wf():
    """Scale data and sigma by c (so D scales by c): the DMD direction is invariant, the SiD loss scales by c."""
    g = torch.Generator().manual_seed(1)
    x0, dp, dq = (torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sigma, r, c = torch.full((8,), 0.9, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 3.0

    def direction(x0, dp, dq, sigma):
        x0 = x0.clone().requires_grad_(True)
        wf = (x0 - dp).abs().flatten(1).mean(1)
        DistributionMatchingLoss("rkl")(x0, dp, dq, r, wf, sigma).sum().backward()
        return x0.grad

    torch.testing.assert_close(direction(c * x0, c * dp, c * dq, c * sigma), direction(x0, dp, dq, sigma))
    sid = UniInstructLoss("rkl", 0.5, -0.2, 0.0)
    wf = lambda x0, dp: (x0 - dp).abs().flatten(1).mean(1)  # noqa: E731
    torch.testing.assert_close(sid(c * x0, c * dp, c * dq, r, wf(c * x0, c * dp), c * sigma),
                               c * sid(x0, dp, dq, r, wf(x0, dp), sigma))


def test_at_the_optimum_every_surrogate_vanishes():
    """teacher == generator distribution (th = (0.3, 1)) and r = 1: all gradients are 0 (the optimum of every divergence)."""
    global TH0
    saved, TH0 = TH0, np.array([MU_P, S_P])
    try:
        for loss in [UniInstructLoss(n) for n in DIVERGENCES] + [DistributionMatchingLoss(n) for n in DIVERGENCES]:
            assert np.abs(_surrogate_gradient(loss, SCORE_UNITS)).max() < 1e-8
    finally:
        TH0 = saved


def test_bce_discriminator_recovers_log_density_ratio():
    """Logistic regression with our BCE on N(0,1) vs N(1, 1.5^2): the optimal logit is log p/q (quadratic in x)."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(100_000, generator=g, dtype=torch.float64)
    fake = 1 + 1.5 * torch.randn(100_000, generator=g, dtype=torch.float64)
    coef = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    features = lambda x: torch.stack([torch.ones_like(x), x, x * x], 1)  # noqa: E731
    opt = torch.optim.LBFGS([coef], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = GANLoss().discriminator(features(real) @ coef, features(fake) @ coef)
        loss.backward()
        return loss

    opt.step(closure)
    # log N(x;0,1) - log N(x;1,v) = (log v)/2 + 1/(2v) - x/v + x^2 (1/(2v) - 1/2),  v = 1.5^2
    v = 2.25
    exact = torch.tensor([np.log(1.5) + 0.5 / v, -1 / v, 0.5 / v - 0.5], dtype=torch.float64)
    torch.testing.assert_close(coef.detach(), exact, atol=0.03, rtol=0.05)


def test_density_ratio_clamps_and_detaches():
    logit = torch.tensor([-50.0, -1.0, 0.0, 2.0, 50.0], requires_grad=True)
    r = density_ratio(logit)
    assert not r.requires_grad
    torch.testing.assert_close(r, torch.tensor([0.1, np.exp(-1.0), 1.0, np.exp(2.0), 20.0], dtype=torch.float32))
