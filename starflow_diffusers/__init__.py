"""STARFlow-V and STARFlow normalizing flows for Hugging Face diffusers."""

import os as _os

from ._imports import lazy_exports as _lazy_exports


__version__ = "0.1.0"

# The tiny moving-shapes STARFlow-V shipped as package data (docs/bundled_model.md):
# `StarFlowVPipeline.from_pretrained(starflow_diffusers.BUNDLED_MODEL)` works offline.
BUNDLED_MODEL = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "bundled", "shapes-32px")

# Every component module, by the names it exports. The first access to any of them imports all, so that
# `from_pretrained` resolves each of our classes by name. Nothing heavy is imported before that (as in
# diffusers' own `__init__`), which keeps the command-line `--help` instant.
_EXPORTS = {
    "loaders": ["StarFlowVLoraLoaderMixin"],
    "models": ["StarFlowKVCache", "StarFlowVTransformer", "StarFlowVTransformerOutput"],
    "pipelines": [
        "StarFlowPipeline",
        "StarFlowVImageToVideoPipeline",
        "StarFlowVInversionOutput",
        "StarFlowVPipeline",
        "StarFlowVPipelineOutput",
        "StarFlowVVideoToVideoPipeline",
    ],
    "schedulers": ["JacobiFlowScheduler", "JacobiFlowSchedulerOutput"],
}

__getattr__, __dir__, __all__ = _lazy_exports(__name__, _EXPORTS)
__all__ = ["BUNDLED_MODEL", *__all__]
