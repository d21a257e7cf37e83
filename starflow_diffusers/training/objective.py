# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The STARFlow / STARFlow-V training objective (spec section 3), shared by LoRA and full training.

One training step on model-space latents x (VAE-normalised, or pixels in [-1, 1]):

1. optional conditioning augmentations: `drop_first_frame` (train continuation, caption prefix
   "(extend) ") and `drop_captions` (replace a caption by "", classifier-free guidance);
2. `add_training_noise`: x~ = x + sigma * eps with the model's `noise_std` sigma;
3. `flow_nll_loss`: the per-dimension negative log-likelihood of x~ under the flow, weighted by sigma / 0.3
   for models trained with noise-level conditioning; backpropagate it with x~ requiring grad;
4. with a learned denoiser: `flow_score_target` turns x~'s cached input gradient into the flow-score-matching
   target grad * numel(x~) * sigma, and `denoiser_loss` is the MSE of the denoiser's prediction against it.
   The target is detached and the denoiser has its own weights, so no gradient reaches the flow.

`StarFlowTrainingModule` wraps the transformer so that both the flow and the denoiser run through
`forward`: data-parallel wrappers (DDP, FSDP) only synchronise what goes through `forward`.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..models.transformer_starflow_v import StarFlowVTransformer, StarFlowVTransformerOutput
from ..pipelines.prompt_template import EXTEND_CAPTION_PREFIX


# One generator, or one per sample (a sample's draws are then independent of the batch it is in).
Generators = Union[torch.Generator, Sequence[torch.Generator], None]

# Noise level the sigma / 0.3 loss weight is relative to (the original `cond_noise_level` training).
REFERENCE_NOISE_STD = 0.3


def nll_loss_weight(noise_std: float, noise_level_conditioning: bool) -> Optional[float]:
    """The per-sample NLL weight: sigma / 0.3 for noise-level-conditioned models, else none (1)."""
    return noise_std / REFERENCE_NOISE_STD if noise_level_conditioning else None


def add_training_noise(
    latents: torch.Tensor,
    noise_std: float,
    generator: Generators = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x + sigma * eps, eps ~ N(0, I) drawn from `generator` (one, or a list of one per sample) or the given
    standard-normal `noise`."""
    if noise is None:
        generator = list(generator) if isinstance(generator, (list, tuple)) else generator
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    elif noise.shape != latents.shape:
        raise ValueError(f"`noise` shape {tuple(noise.shape)} != latents shape {tuple(latents.shape)}.")
    return latents + noise_std * noise


def drop_captions(captions: Sequence[str], probability: float, generator: Generators = None) -> List[str]:
    """Replace each caption by "" with `probability` (drawn from `generator`, or from each caption's own
    generator of a list). The prompt template is applied afterwards, so a dropped caption still carries
    the fps / noise-level / aspect-ratio lines, as the unconditional prompt does."""
    _check_probability("caption dropout", probability)
    if probability == 0:
        return list(captions)
    if isinstance(generator, (list, tuple)):
        if len(generator) != len(captions):
            raise ValueError(f"{len(generator)} generators for {len(captions)} captions.")
        draws = torch.stack([torch.rand((), generator=g, device=g.device).cpu() for g in generator])
    else:
        draws = torch.rand(len(captions), generator=generator, device=_device_of(generator))
    return ["" if draw < probability else caption for caption, draw in zip(captions, draws.tolist())]


def drop_first_frame(
    latents: torch.Tensor,
    captions: Sequence[str],
    probability: float,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, List[str]]:
    """With `probability`, drop the first latent frame of the whole batch and prefix the captions with
    "(extend) ": the model learns clips that continue a video rather than start one (image-to-video and
    extension prompts use the same prefix). Latents are (B, C, T, H, W); clips of one frame are kept."""
    _check_probability("first-frame drop", probability)
    if probability == 0 or latents.shape[2] < 2:
        return latents, list(captions)
    if torch.rand((), generator=generator, device=_device_of(generator)).item() >= probability:
        return latents, list(captions)
    return latents[:, :, 1:], [EXTEND_CAPTION_PREFIX + caption for caption in captions]


@dataclass
class FlowLossOutput:
    """
    Args:
        loss (`torch.Tensor`): scalar to backpropagate: the (weighted) batch-mean NLL per dimension.
        nll (`torch.Tensor`): (B,) unweighted NLL per dimension without the 0.5 log(2 pi) constant, detached.
        bits_per_dim (`torch.Tensor`): (B,) full Gaussian NLL per dimension in bits, detached.
        output (`StarFlowVTransformerOutput`): the flow's forward output (noise z and logdets).
    """

    loss: torch.Tensor
    nll: torch.Tensor
    bits_per_dim: torch.Tensor
    output: StarFlowVTransformerOutput
    # `flow_nll_loss(..., with_denoiser=True)`: the denoiser's prediction and its score target
    denoiser_prediction: Optional[torch.Tensor] = None
    denoiser_target: Optional[torch.Tensor] = None


def weighted_flow_loss(nll: torch.Tensor, weight: Optional[float]) -> torch.Tensor:
    """The scalar flow loss: the batch mean of the per-sample NLL (`nll_per_sample`), times `nll_loss_weight`."""
    return (nll * weight if weight is not None else nll).mean()


def flow_nll_loss(
    model: nn.Module,
    noisy_latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise_std: float,
    noise_level_conditioning: bool = True,
    with_denoiser: bool = False,
    separate_score_pass: bool = False,
) -> FlowLossOutput:
    """Run the flow data -> noise on noise-augmented latents and return its training loss.

    Args:
        model: a `StarFlowVTransformer` or a `StarFlowTrainingModule` (possibly wrapped by DDP/FSDP/DeepSpeed).
        noisy_latents: (B, C, T, H, W) from `add_training_noise`; make it require grad first when the
            denoiser is trained, so that its `.grad` after backward gives the score target.
        encoder_hidden_states: (B, L, D) text embeddings of the templated captions.
        noise_level_conditioning: the model was trained with the noise level in its prompt (the released
            STARFlow-V models): the loss is weighted by sigma / 0.3 as in the original training.
        with_denoiser: a `StarFlowTrainingModule` also returns the denoiser's prediction and its score target,
            taken inside the same forward (see its docstring); `noisy_latents` must require grad.
        separate_score_pass: with `with_denoiser`, take the score from a flow pass of its own (DeepSpeed ZeRO-3).
    """
    weight = nll_loss_weight(noise_std, noise_level_conditioning)
    extra = dict(
        score_matching_noise_std=noise_std, flow_loss_weight=weight, separate_score_pass=separate_score_pass
    ) if with_denoiser else {}
    output = model(noisy_latents, encoder_hidden_states, **extra)
    prediction = target = None
    if with_denoiser:
        *output, prediction, target = output
    if isinstance(output, (tuple, list)):
        output = StarFlowVTransformerOutput(*output)
    nll = StarFlowVTransformer.nll_per_sample(output)
    loss = weighted_flow_loss(nll, weight)
    nll = nll.detach()
    bits = StarFlowVTransformer.bits_per_dim(output).detach()
    return FlowLossOutput(loss, nll, bits, output, prediction, target)


def flow_score_target(input_grad: torch.Tensor, noise_std: float, grad_scale: float = 1.0) -> torch.Tensor:
    """The flow-score-matching target of the learned denoiser: grad * numel * sigma (spec section 3).

    Args:
        input_grad: gradient of the flow loss w.r.t. the noisy latents (`noisy_latents.grad`).
        grad_scale: the factor the backpropagated loss carried relative to `FlowLossOutput.loss`, e.g.
            1 / gradient_accumulation_steps times the fp16 loss scale; it is divided out.
    """
    if input_grad is None:
        raise ValueError("The noisy latents have no gradient: make them require grad before the flow's backward.")
    return input_grad.detach().float() * (input_grad.numel() * noise_std / grad_scale)


def denoiser_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the denoiser's prediction against the (detached) score target, in float32."""
    return F.mse_loss(prediction.float(), target.detach().float())


class StarFlowTrainingModule(nn.Module):
    """Routes the flow (`denoise=False`: the (sample, logdet, block_logdets) tuple) and the learned denoiser
    (`denoise=True`: its prediction) through one `forward`.

    With `score_matching_noise_std`, one call does both: the flow tuple, then the denoiser's prediction at the
    detached input and its flow-score target. The target needs the gradient of the flow loss (weighted by
    `flow_loss_weight`) at the input, which is taken here, inside `forward`. Engines that hook the outputs of
    a forward for their own backward bookkeeping (DeepSpeed's: loss scaling, gradient reduction) then see
    only the real backward, and the step has one forward and one backward.

    The gradient is taken through the step's own graph, kept for its backward. With `separate_score_pass` it
    comes from a flow pass of its own instead (one more flow forward per step): DeepSpeed ZeRO-3 releases
    each layer's gathered weights after a first backward pass through it, so its graph cannot be run twice.
    """

    # FSDP wraps each transformer layer as its own unit (accelerate reads this from the prepared module)
    _no_split_modules = StarFlowVTransformer._no_split_modules

    def __init__(self, transformer: StarFlowVTransformer):
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        denoise: bool = False,
        score_matching_noise_std: Optional[float] = None,
        flow_loss_weight: Optional[float] = None,
        separate_score_pass: bool = False,
    ):
        if denoise:
            return self.transformer.denoise(hidden_states, encoder_hidden_states)
        # a tuple: wrappers that post-process outputs (accelerate's fp32 conversion) rebuild it positionally
        output = self.transformer(hidden_states, encoder_hidden_states, return_dict=False)
        if score_matching_noise_std is None:
            return output
        if not hidden_states.requires_grad:
            raise ValueError("`hidden_states` must require grad for the denoiser's score target.")
        if separate_score_pass:
            probe = hidden_states.detach().requires_grad_(True)
            probe_output = self.transformer(probe, encoder_hidden_states, return_dict=False)
            nll = StarFlowVTransformer.nll_per_sample(StarFlowVTransformerOutput(*probe_output))
            loss = weighted_flow_loss(nll, flow_loss_weight)
            (input_grad,) = torch.autograd.grad(loss, probe)
        else:
            nll = StarFlowVTransformer.nll_per_sample(StarFlowVTransformerOutput(*output))
            loss = weighted_flow_loss(nll, flow_loss_weight)
            (input_grad,) = torch.autograd.grad(loss, hidden_states, retain_graph=True)
        target = flow_score_target(input_grad, score_matching_noise_std)
        prediction = self.transformer.denoise(hidden_states.detach(), encoder_hidden_states)
        return (*output, prediction, target)


def _device_of(generator: Optional[torch.Generator]) -> Optional[torch.device]:
    return generator.device if generator is not None else None


def _check_probability(name: str, probability: float) -> None:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"The {name} probability must be in [0, 1], got {probability}.")
