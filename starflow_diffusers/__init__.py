"""STARFlow-V and STARFlow normalizing flows for Hugging Face diffusers."""

__version__ = "0.1.0"

from .models import StarFlowKVCache, StarFlowVTransformer, StarFlowVTransformerOutput
