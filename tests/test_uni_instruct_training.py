"""Uni-Instruct's training behaviour against the official SiD / DMD2 code (issue 10): noise-level window, GAN
term signs, divergence warm-up, frozen networks in eval mode."""
from types import SimpleNamespace

import pytest
import torch

from onestep.denoisers import DiffusersDenoiser, EDMDenoiser
from onestep.methods.uni_instruct import UniInstruct, UniInstructConfig
from onestep.schedules import DiscreteVPSchedule, EDMSchedule, karras_sigmas


def _sd_schedule():
    from diffusers import DDPMScheduler

    return DiscreteVPSchedule(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012).alphas_cumprod)


def _draw(schedule, n=200_000, denoiser=DiffusersDenoiser, **cfg):
    method = SimpleNamespace(config=UniInstructConfig(**cfg), teacher=denoiser(torch.nn.Identity(), schedule))
    ctx = SimpleNamespace(rng=torch.Generator().manual_seed(0))
    return UniInstruct.generator_sigmas(method, n, ctx, "cpu")


def test_generator_timesteps_on_a_discrete_teacher_are_truncated_to_the_window_not_clamped():
    schedule = _sd_schedule()
    t = schedule.timestep(_draw(schedule).double()).round()
    assert t.min() >= 20 and t.max() <= 979
    counts = torch.bincount(t.long(), minlength=1000).double() / len(t)
    # no pile-up on the ends: an end bin holds no more than its neighbours (clamping put 17.7 % on t = 0)
    assert counts[20] <= 1.5 * counts[21:26].mean() and counts[979] <= 1.5 * counts[974:979].mean()
    assert counts.max() < 0.01
    # inside the window the draw is the Karras one conditioned on the window (rejection sampling as reference)
    ref = schedule.timestep(karras_sigmas(400_000, torch.Generator().manual_seed(1), u_max=0.8)).round()
    ref = ref[(ref >= 20) & (ref <= 979)]
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(t.quantile(q) - ref.quantile(q)) <= 3, q


def test_generator_timesteps_window_is_configurable_and_checked():
    schedule = _sd_schedule()
    t = schedule.timestep(_draw(schedule, 20_000, generator_timesteps=(100, 500)).double()).round()
    assert t.min() >= 100 and t.max() <= 500 and (t == 100).float().mean() < 0.01
    with pytest.raises(ValueError, match="generator_timesteps"):
        UniInstructConfig(generator_timesteps=(500, 100))


def test_continuous_teacher_draw_is_unchanged_by_the_window():
    """EDM: the default window is the schedule's range, which holds the whole Karras draw: same numbers as before."""
    sigma = _draw(EDMSchedule(), 10_000, denoiser=EDMDenoiser)
    expected = karras_sigmas(10_000, torch.Generator().manual_seed(0), u_max=0.8).float()
    torch.testing.assert_close(sigma, expected, rtol=1e-6, atol=0)
