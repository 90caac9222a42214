"""One More Step's low-frequency control end to end (Hu et al., CVPR 2024, the brightness experiment scaled down): the
shipped flawed teacher (assets/teachers/digits16_flawed: Stable Diffusion's scaled-linear schedule, terminal
alpha-bar 0.0047, digits with a random global brightness) and the shipped OMS module in front of it
(assets/pipelines/digits16_oms). Sampling only, DDIM-20; bench/oms_brightness.py measures the same on 1000 samples."""
import torch

from onestep.pipelines import OMSPipeline, load_pipeline
from onestep.resources import ASSETS

N = 128
GUIDANCE = 3.0  # OMS classifier-free guidance of the oracle (w = 1, 2: see docs/oms.md for the measured fractions)


def test_oms_prompt_sets_the_brightness_the_base_alone_leaves_to_chance(one_thread):
    oms = load_pipeline(ASSETS / "pipelines" / "digits16_oms")
    base = load_pipeline(ASSETS / "teachers" / "digits16_flawed")
    assert isinstance(oms, OMSPipeline)
    assert all(torch.equal(a, b) for a, b in zip(oms.unet.state_dict().values(), base.unet.state_dict().values()))
    for p in (oms, base):
        p.set_progress_bar_config(disable=True)
    noise = torch.randn(N, *base.noise_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(N) % 10
    plain = base.generate(noise, 20, class_labels=labels).mean((1, 2, 3))
    assert 0.3 <= float((plain > 0).float().mean()) <= 0.7
    bright = oms.generate(noise, 20, class_labels=labels, oms_prompt="bright", oms_guidance_scale=GUIDANCE)
    dark = oms.generate(noise, 20, class_labels=labels, oms_prompt="dark", oms_guidance_scale=GUIDANCE)
    assert float((bright.mean((1, 2, 3)) > 0).float().mean()) >= 0.9
    assert float((dark.mean((1, 2, 3)) < 0).float().mean()) >= 0.9
