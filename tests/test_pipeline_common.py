"""diffusers' pipeline conventions, checked for every registered pipeline class (in the spirit of diffusers'
`PipelineTesterMixin`, tests/pipelines/test_pipelines_common.py): save/load, dict vs tuple, batch consistency,
generator lists (sample i depends only on generator i, also at 2-4 steps), torch_dtype / dtype, from_pipe, output
types, num_images_per_prompt, callback_on_step_end, negative_prompt / guidance_scale refusals, no config warnings.

Each class builds from its own `dummy_components()` (tiny random components); a registered class without one fails
here, so a new pipeline class is covered the moment it is registered. The test-only FlipPipeline is registered for
this module too (tests/flip_pipeline.py).
"""
import json
import logging

import pytest
import torch
from diffusers import DiffusionPipeline

from flip_pipeline import FlipPipeline
from onestep.pipelines import available_pipelines, load_pipeline, register_pipeline, unregister_pipeline
from onestep.pipelines.base import GeneratorPipeline

CLASSES = {**available_pipelines(), "FlipPipeline": FlipPipeline}


@pytest.fixture(scope="module", autouse=True)
def _flip_registered():
    register_pipeline(FlipPipeline)
    yield
    unregister_pipeline("FlipPipeline")


@pytest.fixture(params=sorted(CLASSES), scope="module")
def pipe(request):
    cls = CLASSES[request.param]
    components = cls.dummy_components()  # NotImplementedError: the class must provide tiny components
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(pipe, n: int = 2, seed: int = 0, **kwargs) -> dict:
    """Inputs for n samples: explicit class labels and prompts where the class takes them."""
    inputs = {"batch_size": n, "generator": torch.Generator().manual_seed(seed), "output_type": "pt"}
    if pipe.num_classes:
        inputs["class_labels"] = [i % pipe.num_classes for i in range(n)]
    if pipe.takes_prompt:
        inputs["prompt"] = ["a red circle", "a blue square", "a green dot"][:1] * n
    return {**inputs, **kwargs}


def _steps(pipe) -> list[int]:
    return sorted({1, min(3, pipe.max_inference_steps)})


def test_every_registered_class_provides_dummy_components():
    assert "OneStepPipeline" in CLASSES
    for name, cls in CLASSES.items():
        assert issubclass(cls, GeneratorPipeline), name
        assert isinstance(cls.dummy_components(), dict), name
    with pytest.raises(NotImplementedError, match="must provide dummy_components"):
        GeneratorPipeline.dummy_components()


def test_protocol_facts(pipe):
    assert isinstance(pipe.noise_shape, tuple) and all(isinstance(d, int) and d > 0 for d in pipe.noise_shape)
    assert pipe.num_classes is None or pipe.num_classes >= 1
    assert 1 <= pipe.default_inference_steps <= pipe.max_inference_steps
    assert all(kind in ("image", "text", "float") for kind in pipe.extra_inputs.values())
    x = pipe.generate(torch.randn(2, *pipe.noise_shape), 1, class_labels=_inputs(pipe).get("class_labels"),
                      prompts=_inputs(pipe).get("prompt"))
    assert x.shape[0] == 2 and torch.isfinite(x).all()


def test_save_load_and_no_config_warnings(pipe, tmp_path, caplog):
    before = pipe(**_inputs(pipe)).images
    pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    with caplog.at_level(logging.WARNING):
        loaded = load_pipeline(tmp_path)
    assert "not expected" not in caplog.text and "ignored" not in caplog.text, caplog.text
    assert type(loaded) is type(pipe)
    assert torch.equal(loaded(**_inputs(pipe)).images, before)
    assert json.loads((tmp_path / "onestep_card.json").read_text())["nfe"] == pipe.default_inference_steps


def test_dict_and_tuple_outputs_are_equal(pipe):
    as_dict = pipe(**_inputs(pipe)).images
    as_tuple = pipe(**_inputs(pipe), return_dict=False)[0]
    assert torch.equal(as_dict, as_tuple)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(pipe, output_type):
    images = pipe(**_inputs(pipe, output_type=output_type)).images
    assert len(images) == 2
    if output_type == "latent":
        assert tuple(images.shape[1:]) == pipe.noise_shape
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(**_inputs(pipe, output_type="jpeg"))


def test_generator_list_sample_i_depends_only_on_generator_i(pipe):
    """diffusers' test_inference_batch_consistent / the generator-list convention, at 1 and 2-4 steps: sample i of a
    batch equals the same sample generated alone from generator i, and does not change with the other seeds."""
    for steps in _steps(pipe):
        seeds = [11, 12, 13]
        batch = pipe(**_inputs(pipe, n=3, generator=[torch.Generator().manual_seed(s) for s in seeds]),
                     num_inference_steps=steps).images
        for i, seed in enumerate(seeds):
            single = _inputs(pipe, n=1, generator=[torch.Generator().manual_seed(seed)])
            if pipe.num_classes:
                single["class_labels"] = [i % pipe.num_classes]
            alone = pipe(**single, num_inference_steps=steps).images
            torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-5)
        other = pipe(**_inputs(pipe, n=3, generator=[torch.Generator().manual_seed(s) for s in (99, 12, 13)]),
                     num_inference_steps=steps).images
        torch.testing.assert_close(other[1:], batch[1:], rtol=0, atol=1e-5)
        assert not torch.equal(other[0], batch[0])
    with pytest.raises(ValueError, match="list of 2 generators for 3 samples"):
        pipe(**_inputs(pipe, n=3, generator=[torch.Generator(), torch.Generator()]))


def test_one_generator_is_reproducible_and_batch_size_is_checked(pipe):
    a = pipe(**_inputs(pipe, n=3), num_inference_steps=_steps(pipe)[-1]).images
    b = pipe(**_inputs(pipe, n=3), num_inference_steps=_steps(pipe)[-1]).images
    assert torch.equal(a, b)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="batch_size must be a whole number"):
            pipe(**_inputs(pipe, batch_size=bad))
    with pytest.raises(ValueError, match="num_inference_steps must be 1.."):
        pipe(**_inputs(pipe), num_inference_steps=pipe.max_inference_steps + 1)
    if pipe.num_classes:  # issue 11: out-of-range labels were a bare IndexError
        with pytest.raises(ValueError, match=f"class_labels must be in 0..{pipe.num_classes - 1}"):
            pipe(**_inputs(pipe, class_labels=[0, pipe.num_classes]))
    with pytest.raises(ValueError, match="latents must be a tensor of shape"):
        pipe(**_inputs(pipe), latents=torch.zeros(5, 1))


def test_num_images_per_prompt(pipe):
    images = pipe(**_inputs(pipe, n=2, generator=[torch.Generator().manual_seed(s) for s in range(6)]),
                  num_images_per_prompt=3).images
    assert len(images) == 6
    with pytest.raises(ValueError, match="num_images_per_prompt must be a whole number"):
        pipe(**_inputs(pipe), num_images_per_prompt=0)


def test_guidance_and_negative_prompt_are_refused_clearly(pipe):
    if "guidance_scale" not in pipe.extra_inputs:
        with pytest.raises(ValueError, match="does not take guidance_scale"):
            pipe(**_inputs(pipe), guidance_scale=7.5)
        pipe(**_inputs(pipe), guidance_scale=1.0)  # diffusers' "no guidance"
    if "negative_prompt" not in pipe.extra_inputs:
        with pytest.raises(ValueError, match="does not take negative_prompt"):
            pipe(**_inputs(pipe), negative_prompt="blurry")
    with pytest.raises(ValueError, match="takes no input eta"):
        pipe(**_inputs(pipe), eta=0.0)


def test_callback_on_step_end(pipe):
    steps = _steps(pipe)[-1]
    seen = []

    def record(p, step, sigma, kwargs):
        seen.append((step, float(sigma), tuple(kwargs)))
        return kwargs

    plain = pipe(**_inputs(pipe), num_inference_steps=steps).images
    assert torch.equal(pipe(**_inputs(pipe), num_inference_steps=steps, callback_on_step_end=record).images, plain)
    assert [s for s, _, _ in seen] == list(range(steps)) and all(k == ("latents",) for _, _, k in seen)
    zeroed = pipe(**_inputs(pipe, output_type="latent"), num_inference_steps=steps,
                  callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros_like(kw["latents"])}).images
    assert torch.count_nonzero(zeroed) == 0
    with pytest.raises(ValueError, match="passes only"):
        pipe(**_inputs(pipe), callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_dtype_and_torch_dtype(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": torch.bfloat16}):
        loaded = load_pipeline(tmp_path, **kwargs)
        networks = [m for m in loaded.components.values() if isinstance(m, torch.nn.Module)]
        assert networks and all(m.dtype == torch.bfloat16 for m in networks)
        loaded.set_progress_bar_config(disable=True)
        assert torch.isfinite(loaded(**_inputs(pipe)).images).all()
    with pytest.raises(ValueError, match="not both"):
        load_pipeline(tmp_path, dtype=torch.bfloat16, torch_dtype=torch.float16)


def test_from_pipe_shares_components_and_gives_the_same_images(pipe):
    twin = type(pipe).from_pipe(pipe)
    twin.set_progress_bar_config(disable=True)
    assert all(twin.components[k] is v for k, v in pipe.components.items())
    assert dict(twin.config) == {k: v for k, v in pipe.config.items() if k in twin.config}
    assert torch.equal(twin(**_inputs(pipe)).images, pipe(**_inputs(pipe)).images)
    generic = DiffusionPipeline.from_pipe.__func__(type(pipe), pipe)  # the diffusers implementation itself
    assert type(generic) is type(pipe)
