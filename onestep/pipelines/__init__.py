from .onestep import FilteredImagePipelineOutput, OneStepPipeline

__all__ = ["FilteredImagePipelineOutput", "OneStepPipeline"]
