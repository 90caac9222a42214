from .onestep import OneStepPipeline

__all__ = ["OneStepPipeline"]
