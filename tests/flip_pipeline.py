"""A test-only pipeline class: OneStepPipeline's images mirrored left-right and scaled by an extra input `contrast`.

It is what a recipe's own artifact class looks like to the platform (another `_class_name`, an extra generate()
input, no hallucination filter, no plain-diffusers pipeline.py), so tests can check that `onestep sample`,
`onestep fid`, the demo and the common pipeline tests work for a class other than OneStepPipeline. Registered by the
`flip_registered` fixture (tests/test_registry.py, tests/test_pipeline_common.py), not at import.
"""
import pytest

from onestep.pipelines import OneStepPipeline, register_pipeline, unregister_pipeline
from onestep.pipelines.base import GeneratorPipeline


class FlipPipeline(OneStepPipeline):
    supports_hallucination_filter = False
    probe_hallucinations = GeneratorPipeline.probe_hallucinations  # refuses, in one line

    @property
    def extra_inputs(self) -> dict:
        return {"contrast": "float"}

    def generate_latents(self, noise, num_inference_steps=1, class_labels=None, prompts=None, generator=None,
                         callback=None, contrast: float = 1.0, **extra):
        x = super().generate_latents(noise, num_inference_steps, class_labels, prompts, generator, callback, **extra)
        return x.flip(-1) * float(contrast)  # generate() decodes this (OneStepPipeline.generate)


@pytest.fixture
def flip_registered():
    register_pipeline(FlipPipeline)
    yield FlipPipeline
    unregister_pipeline("FlipPipeline")
