# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""What the STARFlow-V pipelines return. The image pipeline returns diffusers' `ImagePipelineOutput`."""

from dataclasses import dataclass
from typing import Any, List, Union

import numpy as np
import torch

from diffusers.utils import BaseOutput


@dataclass
class StarFlowVPipelineOutput(BaseOutput):
    """
    Args:
        frames: (B, T, H, W, 3) np array or list of PIL frame lists in [0, 1], a (B, T, 3, H, W) tensor
            for `output_type="pt"`, or the (B, C, T, H, W) latents for `output_type="latent"`.
    """

    frames: Union[torch.Tensor, np.ndarray, List[List[Any]]]


@dataclass
class StarFlowVInversionOutput(BaseOutput):
    """
    Args:
        noise (`torch.Tensor`): z = f(x), (B, C, T, H, W), the exact preimage of the input under the flow.
        log_likelihood (`torch.Tensor`): (B,) log p(x) in nats of the (noise-augmented) model-space latents.
        bits_per_dim (`torch.Tensor`): (B,) -log2 p(x) per dimension.
        latents (`torch.Tensor`): the model-space latents x that were mapped.
    """

    noise: torch.Tensor
    log_likelihood: torch.Tensor
    bits_per_dim: torch.Tensor
    latents: torch.Tensor
