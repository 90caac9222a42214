"""Schedules and the denoiser layer: conversions, table values, and an analytic diffusers-style teacher
(docs/schedules.md)."""
import math

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from onestep.denoisers import DiffusersDenoiser, EDMDenoiser, denoiser_from_pretrained
from onestep.schedules import (DiscreteVPSchedule, FlowMatchSchedule, karras_sigmas, lognormal_sigmas,
                               prediction_from_x0, schedule_from_scheduler, score_from_x0, x0_from_prediction)

VP_CONFIGS = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


def vp(name, prediction_type="epsilon"):
    return schedule_from_scheduler(DDPMScheduler(**VP_CONFIGS[name], prediction_type=prediction_type))


SCHEDULES = [(vp(n, p), p) for n in VP_CONFIGS for p in ("epsilon", "v_prediction", "sample")] + [
    (FlowMatchSchedule(shift=1.0), "flow"), (FlowMatchSchedule(shift=3.0), "flow")]


@pytest.mark.parametrize("schedule, prediction_type", SCHEDULES)
def test_prediction_round_trips_and_score(schedule, prediction_type):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.02, 0.3, 1.0, 2.5, 9.0, 30.0], dtype=torch.float64).clamp(max=schedule.sigma_max)
    a, s = (c.reshape(-1, 1, 1, 1) for c in schedule.coefficients(sigma))
    x_t = a * x0 + s * eps
    torch.testing.assert_close(x_t / a, x0 + sigma.reshape(-1, 1, 1, 1) * eps, rtol=1e-10, atol=1e-10)
    out = prediction_from_x0(x0, x_t, a, s, prediction_type)
    torch.testing.assert_close(x0_from_prediction(out, x_t, a, s, prediction_type), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(score_from_x0(x0, x_t, a, s), -eps / s, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, t_init", [("scaled_linear", 625), ("linear", 440), ("cosine", 755)])
def test_t_init_for_sigma_2_5(name, t_init):
    schedule = vp(name)
    assert round(float(schedule.timestep(torch.tensor(2.5, dtype=torch.float64)))) == t_init


def test_table_values():
    assert float(vp("scaled_linear").sigma_of_timestep(999)) == pytest.approx(14.61, abs=0.01)
    assert float(vp("linear").sigma_of_timestep(999)) == pytest.approx(157.4, abs=0.1)
    assert FlowMatchSchedule.t_of_sigma(2.5) == pytest.approx(0.7142857, abs=1e-7)


def test_timestep_and_sigma_are_inverse():
    schedule = vp("linear")
    t = torch.tensor([0.0, 1.0, 17.5, 440.0, 998.25], dtype=torch.float64)
    torch.testing.assert_close(schedule.timestep(schedule.sigma_of_timestep(t)), t, rtol=0, atol=1e-9)
    rounded = schedule.round_sigma(torch.tensor([2.5], dtype=torch.float64))
    assert float(schedule.timestep(rounded)) == 440.0


def test_sigma_samplers_quantiles():
    g = torch.Generator().manual_seed(0)
    k = karras_sigmas(1_000_000, g, u_max=0.8)
    assert k.min() >= 0.002 - 1e-12 and k.max() <= 24.41 + 0.01
    assert float(k.median()) == pytest.approx(0.97, rel=0.02)
    assert float(lognormal_sigmas(1_000_000, g).median()) == pytest.approx(0.301, rel=0.02)


class AnalyticGaussianModel(torch.nn.Module):
    """A diffusers-style 'model' for data N(m, v I) that emits the exact eps / v / flow / x0 prediction."""

    def __init__(self, schedule, prediction_type, m=0.3, v=0.5):
        super().__init__()
        self.schedule, self.prediction_type, self.m, self.v = schedule, prediction_type, m, v
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x_t, timestep, return_dict=False):
        sigma = self.schedule.sigma_of_timestep(timestep.double()).float()
        a, s = (c.reshape(-1, 1, 1, 1) for c in self.schedule.coefficients(sigma))
        x0 = self.m + a * self.v * (x_t - a * self.m) / (a**2 * self.v + s**2)
        return (prediction_from_x0(x0, x_t, a, s, self.prediction_type),)


@pytest.mark.parametrize("schedule, prediction_type", SCHEDULES)
def test_denoiser_gives_the_exact_gaussian_score(schedule, prediction_type):
    m, v = 0.3, 0.5
    denoiser = DiffusersDenoiser(AnalyticGaussianModel(schedule, prediction_type, m, v), schedule)
    x = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.05, 0.4, 1.0, 2.5, 7.0])
    x0 = denoiser(x, sigma)
    score = (x0 - x) / sigma.reshape(-1, 1, 1, 1) ** 2       # VE score
    exact = -(x - m) / (v + sigma.reshape(-1, 1, 1, 1) ** 2)   # N(m, v + sigma^2)
    torch.testing.assert_close(score, exact, rtol=2e-4, atol=2e-4)


def test_schedule_from_scheduler_dispatch():
    assert isinstance(schedule_from_scheduler(DDPMScheduler()), DiscreteVPSchedule)
    flow = schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert isinstance(flow, FlowMatchSchedule) and flow.shift == 3.0 and flow.prediction_type == "flow"
    model = torch.nn.Linear(1, 1)
    assert isinstance(denoiser_from_pretrained(model, EDMEulerScheduler()), EDMDenoiser)
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteVPSchedule(DDPMScheduler().alphas_cumprod, "flow")


def test_flow_training_sigmas_respect_the_shift_and_cap():
    g = torch.Generator().manual_seed(0)
    plain = FlowMatchSchedule(shift=1.0).training_sigmas(100_000, g)
    shifted = FlowMatchSchedule(shift=3.0).training_sigmas(100_000, g)
    assert shifted.median() > plain.median()  # SD3's shift moves mass to higher noise
    t = FlowMatchSchedule.t_of_sigma(shifted)
    assert float(t.max()) <= 0.99 + 1e-9 and math.isfinite(float(shifted.max()))


@pytest.mark.parametrize("scheduler", [EDMEulerScheduler(sigma_data=0.5), DDPMScheduler(beta_schedule="linear")])
def test_per_token_noise_levels(scheduler):
    """sigma [B, n] on x [B, n, d] (issue 9: noise levels shaped like the leading dims of x): every token is
    denoised at its own level, exactly as if it were a sample of its own; [B] and scalar levels broadcast."""
    from onestep.denoisers import MLPModel

    torch.manual_seed(0)
    denoiser = denoiser_from_pretrained(MLPModel(dim=3, hidden=16, depth=2, num_classes=4), scheduler).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=g)
    sigma = torch.tensor([[0.05, 0.3, 1.0, 2.0, 8.0], [0.1, 0.5, 0.7, 3.0, 20.0]])
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        out = denoiser(x, sigma, class_labels=labels)
        one_by_one = torch.stack([torch.stack([denoiser(x[b, i][None], sigma[b, i], class_labels=labels[b][None])[0]
                                               for i in range(5)]) for b in range(2)])
        per_row = denoiser(x, sigma[:, 2], class_labels=labels)
        shared = denoiser(x, 0.7, class_labels=labels)
    assert out.shape == x.shape
    torch.testing.assert_close(out, one_by_one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, denoiser(x, sigma.flip(1), class_labels=labels))  # the level reaches each token
    torch.testing.assert_close(per_row, denoiser(x, sigma[:, 2:3].expand(2, 5), class_labels=labels))
    torch.testing.assert_close(shared, denoiser(x, torch.full((2, 5), 0.7), class_labels=labels))
