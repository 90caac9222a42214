"""Samplers and sample filters. The hallucination filter lives in `onestep.sampling.hallucination`; its toy
reproduction kit in `onestep.sampling.toy`."""
