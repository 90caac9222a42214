"""Timesteps (and EDM's c_noise) reach the network in fp32 whatever the network's dtype: a bf16 teacher and the fp32
fake score must be evaluated at the same time (in bf16, 625 -> 624, 714.3 -> 716, 999 -> 1000)."""
import copy

import pytest
import torch

from onestep.denoisers import MLPModel, denoiser_from_pretrained
from tiny_teachers import tiny_unet


def _seen_timesteps(model, call):
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["timestep"]),
                                             with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen[0]


def _vp_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _edm_scheduler():
    from diffusers import EDMEulerScheduler

    return EDMEulerScheduler()


@pytest.mark.parametrize("family", ["vp", "edm"])
def test_bf16_teacher_and_fp32_copy_see_the_same_timestep(family):
    if family == "vp":
        model, scheduler, x = tiny_unet(num_classes=None), _vp_scheduler(), torch.randn(3, 1, 8, 8)
    else:
        model, scheduler, x = MLPModel(dim=2), _edm_scheduler(), torch.randn(3, 2)
    fp32 = denoiser_from_pretrained(model, scheduler)
    bf16 = denoiser_from_pretrained(copy.deepcopy(model).to(torch.bfloat16), scheduler)
    # noise levels at timesteps 625, 714.3 and 999 (fractional levels are what the generator loss draws)
    sigma = fp32.schedule.sigma_of_timestep(torch.tensor([625.0, 714.3, 999.0])).float()
    t32 = _seen_timesteps(fp32.model, lambda: fp32(x, sigma))
    t16 = _seen_timesteps(bf16.model, lambda: bf16(x, sigma))
    assert t16.dtype == torch.float32 and t32.dtype == torch.float32
    torch.testing.assert_close(t16, t32, rtol=0, atol=0)
    if family == "vp":
        torch.testing.assert_close(t16, torch.tensor([625.0, 714.3, 999.0]), rtol=0, atol=1e-3)


def test_standalone_pipeline_passes_fp32_timesteps():
    from onestep.pipelines.standalone_pipeline import schedule_for

    model = tiny_unet(num_classes=None).to(torch.bfloat16)
    schedule = schedule_for(_vp_scheduler())
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 3.0])
    seen = _seen_timesteps(model, lambda: schedule.denoise(model, x, sigma, {}))
    expected = schedule.timestep(sigma)
    assert seen.dtype == torch.float32
    torch.testing.assert_close(seen, expected.float(), rtol=0, atol=0)
    assert (seen - seen.round()).abs().max() > 0.01   # fractional timesteps survive (bf16 would keep 8 bits)
