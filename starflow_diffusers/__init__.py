"""STARFlow-V and STARFlow normalizing flows for Hugging Face diffusers."""

__version__ = "0.1.0"

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
