"""OneStepPipeline: generator == teacher at initialisation, save/load identical images, few-step sampling. (Plain
diffusers loading: tests/test_standalone_pipeline.py; diffusers conventions for every class:
tests/test_pipeline_common.py.)"""
import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from conftest import tiny_unet
from onestep.denoisers import MLPModel, denoiser_from_pretrained
from onestep.generators import OneStepGenerator
from onestep.pipelines import OneStepPipeline


def _pipeline(scheduler=None, model=None):
    denoiser = denoiser_from_pretrained(model or tiny_unet(), scheduler or DDPMScheduler(beta_schedule="linear"))
    return OneStepPipeline.from_generator(OneStepGenerator(denoiser, 2.5), denoiser.scheduler,
                                          {"teacher": "tiny", "method": "test"})


@pytest.mark.parametrize("scheduler, prediction_type", [
    (DDPMScheduler(beta_schedule="linear", prediction_type="epsilon"), "epsilon"),
    (DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   prediction_type="v_prediction"), "v_prediction"),
    (FlowMatchEulerDiscreteScheduler(shift=3.0), "flow")])
def test_generator_at_init_is_the_teachers_x0_prediction(scheduler, prediction_type):
    """G(z) = D_teacher(sigma_init z, sigma_init): the model sees x_t = a * sigma_init * z at t_init, exactly."""
    unet = tiny_unet()
    generator = OneStepGenerator(denoiser_from_pretrained(unet, scheduler), 2.5)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2, 3])
    schedule = generator.denoiser.schedule
    sigma = torch.tensor(generator.sigma_init)
    a, s = (float(c) for c in schedule.coefficients(sigma))
    x_t = a * generator.sigma_init * z
    t_init = schedule.timestep(sigma)
    if prediction_type != "flow":
        assert float(t_init) == 440.0 or prediction_type == "v_prediction"
    with torch.no_grad():
        out = unet(x_t, t_init.expand(3), class_labels=labels).sample
        expected = {"epsilon": (x_t - s * out) / a, "v_prediction": a * x_t - s * out,
                    "flow": x_t - s * out}[prediction_type]
        torch.testing.assert_close(generator(z, class_labels=labels), expected, rtol=1e-5, atol=1e-5)


def test_save_load_gives_identical_images(tmp_path):
    pipe = _pipeline()
    kwargs = dict(batch_size=4, output_type="pt", class_labels=[0, 1, 2, 3])
    before = pipe(generator=torch.Generator().manual_seed(7), **kwargs).images
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin"))
    loaded = OneStepPipeline.from_pretrained(tmp_path)
    assert torch.equal(loaded(generator=torch.Generator().manual_seed(7), **kwargs).images, before)
    assert loaded.card["teacher"] == "tiny" and loaded.config.sigma_init == pipe.config.sigma_init


def test_few_step_sampling_and_validation(tmp_path):
    pipe = _pipeline()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    one = pipe(batch_size=2, num_inference_steps=1, generator=g(), output_type="pt").images
    four = pipe(batch_size=2, num_inference_steps=4, generator=g(), output_type="pt").images
    assert one.shape == four.shape == (2, 1, 8, 8) and not torch.equal(one, four)
    assert len(pipe(batch_size=3, generator=g()).images) == 3  # PIL images by default
    with pytest.raises(ValueError, match="num_inference_steps must be 1..4"):
        pipe(num_inference_steps=5)


def test_mlp_pipeline_round_trip_for_points(tmp_path):
    pipe = _pipeline(EDMEulerScheduler(sigma_data=0.5), MLPModel(dim=2, hidden=16, depth=2))
    pipe.save_pretrained(tmp_path)
    loaded = OneStepPipeline.from_pretrained(tmp_path)
    a = pipe(batch_size=5, generator=torch.Generator().manual_seed(1), output_type="raw").images
    b = loaded(batch_size=5, generator=torch.Generator().manual_seed(1), output_type="raw").images
    assert a.shape == (5, 2) and torch.equal(a, b)


def test_loading_refuses_classes_from_untrusted_modules(tmp_path):
    import json

    _pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["unet"] = ["os", "system"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="refusing to import"):
        OneStepPipeline.from_pretrained(tmp_path)
