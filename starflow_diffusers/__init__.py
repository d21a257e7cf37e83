"""STARFlow-V and STARFlow normalizing flows for Hugging Face diffusers."""

import os as _os


__version__ = "0.1.0"

# The tiny moving-shapes STARFlow-V shipped as package data (docs/bundled_model.md):
# `StarFlowVPipeline.from_pretrained(starflow_diffusers.BUNDLED_MODEL)` works offline.
BUNDLED_MODEL = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "bundled", "shapes-32px")

# Every component module is imported here so `from_pretrained` can resolve our classes by name.
from .loaders import StarFlowVLoraLoaderMixin
from .models import StarFlowKVCache, StarFlowVTransformer, StarFlowVTransformerOutput
from .pipelines import (
    StarFlowPipeline,
    StarFlowVImageToVideoPipeline,
    StarFlowVInversionOutput,
    StarFlowVPipeline,
    StarFlowVPipelineOutput,
    StarFlowVVideoToVideoPipeline,
)
from .schedulers import JacobiFlowScheduler, JacobiFlowSchedulerOutput
