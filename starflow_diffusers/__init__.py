"""STARFlow-V and STARFlow normalizing flows for Hugging Face diffusers."""

import logging as _logging
import os as _os


__version__ = "0.1.0"

# The tiny moving-shapes STARFlow-V shipped as package data (docs/bundled_model.md):
# `StarFlowVPipeline.from_pretrained(starflow_diffusers.BUNDLED_MODEL)` works offline.
BUNDLED_MODEL = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "bundled", "shapes-32px")

# Importing diffusers imports torchao when it is installed (it is a test dependency). Without CUDA, torchao
# logs that its CUDA kernels cannot load, torch warns about its enums and diffusers about torchao tensor
# classes of old checkpoints: nothing to act on. Those loggers are quiet while this package imports
# diffusers, then restored.
_QUIET_AT_IMPORT = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")
_levels = {name: _logging.getLogger(name).level for name in _QUIET_AT_IMPORT}
for _name in _QUIET_AT_IMPORT:
    _logging.getLogger(_name).setLevel(_logging.ERROR)

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

for _name, _level in _levels.items():
    _logging.getLogger(_name).setLevel(_level)
