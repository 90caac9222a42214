"""onestep's pipelines: one inference protocol (`GeneratorPipeline`), one registry (`load_pipeline`).

    base.py                 GeneratorPipeline: the protocol every artifact implements, safe loading
    registry.py             register_pipeline / available_pipelines / load_pipeline (dispatch on model_index.json)
    standalone_pipeline.py  the dependency-free OneStepPipeline (written as pipeline.py beside exports) and the
                            protocol's diffusers __call__ (GeneratorCallMixin)
    onestep.py              the registered OneStepPipeline: standalone generation + export, model card, filter
    teacher.py              TeacherPipeline: a multi-step diffusion teacher folder behind the same protocol
"""
from .base import GeneratorPipeline
from .onestep import FilteredImagePipelineOutput, OneStepPipeline
from .registry import available_pipelines, load_pipeline, register_pipeline, unregister_pipeline
from .teacher import TeacherPipeline
from .nitrofusion import NitroFusionPipeline  # noqa: E402,F401  (registers NitroFusion's few-step export)
from .controlled import ControlledOneStepPipeline  # noqa: E402,F401  (registers it; NCT's controlled generator)
from .oms import OMSPipeline  # noqa: E402,F401  (registers One More Step)
from .dd2 import DD2Pipeline  # noqa: E402,F401  (registers DD2Pipeline)

__all__ = ["FilteredImagePipelineOutput", "GeneratorPipeline", "OneStepPipeline", "TeacherPipeline", "available_pipelines",
           "load_pipeline", "register_pipeline", "unregister_pipeline"]
