# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Video-to-video with STARFlow-V.

* `mode="edit"`: the source video is mapped FORWARD through the flow to its exact noise z (with
  `source_prompt`), blended with fresh noise, z' = sqrt(1 - strength^2) z + strength eps, and sampled again
  with `prompt`. Only an invertible model can do this: at strength 0 with the same prompt and no guidance
  the source comes back unchanged (up to solver tolerance), so edits keep what was not asked to change.
* `mode="prefix"`: the source latents are a causal context followed by newly generated frames, with the
  "(v2v) " caption prefix, for checkpoints trained for video-to-video.
"""

import math
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from .pipeline_output import StarFlowVPipelineOutput
from .pipeline_starflow_v import StarFlowVPipeline
from .prompt_template import V2V_CAPTION_PREFIX
from .inputs import check_finite


logger = logging.get_logger(__name__)

V2V_MODES = ("edit", "prefix")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers.utils import export_to_video
        >>> from starflow_diffusers import BUNDLED_MODEL, StarFlowVPipeline, StarFlowVVideoToVideoPipeline

        >>> pipe = StarFlowVVideoToVideoPipeline.from_pretrained(BUNDLED_MODEL)
        >>> # any clip: a file path, frames from diffusers.utils.load_video, or an array
        >>> source = StarFlowVPipeline.from_pipe(pipe)("a red circle moving right", output_type="pil").frames[0]
        >>> edited = pipe(
        ...     source, prompt="a green circle moving right", source_prompt="a red circle moving right", strength=0.5
        ... ).frames[0]
        >>> export_to_video(edited, "green.mp4", fps=16)
        ```
"""


class StarFlowVVideoToVideoPipeline(StarFlowVPipeline):
    r"""
    Video-to-video generation with STARFlow-V (same components and configuration as [`StarFlowVPipeline`]).
    """

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        video=None,
        prompt: Union[str, List[str], None] = None,
        source_prompt: Union[str, List[str], None] = None,
        mode: str = "edit",
        strength: float = 0.5,
        negative_prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        fps: int = 16,
        aspect_ratio: Optional[str] = None,
        guidance_scale: float = 4.5,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        video_latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        source_prompt_embeds: Optional[torch.Tensor] = None,
        denoise: str = "auto",
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: Optional[int] = None,
    ):
        r"""
        Args:
            video: the source, as a list of PIL images, an np array, a tensor or a file path. The frame count
                comes from it (trimmed to 4k+1 with a warning).
            video_latents (`torch.Tensor`, *optional*): (B, C, T, h, w) model-space source latents used
                verbatim (already noise-augmented) instead of `video`.
            mode (`str`): "edit" (re-sample from the source's own noise) or "prefix" (continue after the
                source, "(v2v) " caption prefix).
            strength (`float`): "edit" only, in [0, 1]: how much fresh noise replaces the source's noise.
            source_prompt (`str`, *optional*): "edit" only: the prompt describing the source (default:
                `prompt`); `source_prompt_embeds` is its embedding alternative.
            Other arguments as in [`StarFlowVPipeline.__call__`]; `num_frames` is not an argument here.

        Examples:

        Returns:
            [`StarFlowVPipelineOutput`] with `frames` (as many as the source has), or a tuple `(frames,)`
            when `return_dict` is False.
        """
        if mode not in V2V_MODES:
            raise ValueError(f"`mode` must be one of {V2V_MODES}, got {mode!r}.")
        if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"`strength` must be in [0, 1], got {strength!r}.")
        if (video is None) == (video_latents is None):
            raise ValueError("Pass exactly one of `video` or `video_latents`.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, negative_prompt, height, width, None, guidance_scale, 1, None, prompt_embeds,
            negative_prompt_embeds, denoise, output_type, callback_on_step_end_tensor_inputs, max_sequence_length,
        )
        channels = self.transformer.config.in_channels
        if video_latents is not None and (video_latents.ndim != 5 or video_latents.shape[1] != channels):
            raise ValueError(f"`video_latents` must be (batch, {channels}, frames, height, width), got {tuple(video_latents.shape)}.")
        check_finite(video_latents=video_latents)
        denoise = self._start_call(guidance_scale, attention_kwargs, denoise)
        device = self._execution_device

        if video_latents is None:
            frames = self.load_video_frames(video)
            if self.vae is None and not self.models_pixels:
                raise ValueError("Encoding `video` needs a VAE; pass `video_latents` instead.")
            if height is None or width is None:
                height, width, aspect_ratio = self._default_size_for_frames(frames, height, width, aspect_ratio)
            source = self.encode_video(frames, height, width, generator)
            source = source + self.noise_std * randn_tensor(source.shape, generator=generator, device=device)
        else:
            source = video_latents.to(device, torch.float32)
        source_frames = source.shape[2]
        height, width = source.shape[3] * self.vae_scale_factor_spatial, source.shape[4] * self.vae_scale_factor_spatial
        pixel_frames = (source_frames - 1) * self.vae_scale_factor_temporal + 1
        height, width, _, aspect_ratio = self.resolve_video_size(height, width, pixel_frames, aspect_ratio, None)

        if mode == "prefix" and prompt is not None:
            prompt = [V2V_CAPTION_PREFIX + p for p in ([prompt] if isinstance(prompt, str) else prompt)]
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, 1, prompt_embeds, negative_prompt_embeds,
            fps, aspect_ratio, max_sequence_length, device,
        )
        batch = prompt_embeds.shape[0]
        if source.shape[0] == 1 and batch > 1:
            source = source.expand(batch, -1, -1, -1, -1)
        if source.shape[0] != batch:
            raise ValueError(f"{batch} prompts for {source.shape[0]} source videos.")

        if mode == "edit":
            if source_prompt_embeds is None:
                source_prompt = source_prompt if source_prompt is not None else prompt
                if source_prompt is None:
                    source_prompt_embeds = prompt_embeds
            noise = self.invert(
                latents=source, prompt=source_prompt if source_prompt_embeds is None else None,
                prompt_embeds=source_prompt_embeds, fps=fps, aspect_ratio=aspect_ratio, noise_augment=False,
                max_sequence_length=max_sequence_length,
            ).noise
            fresh = randn_tensor(noise.shape, generator=generator, device=device, dtype=torch.float32)
            latents = math.sqrt(1 - strength**2) * noise + strength * fresh
            context = None
        else:
            latents = randn_tensor(
                (batch, channels, 2 * source_frames, *source.shape[3:]), generator=generator, device=device,
                dtype=torch.float32,
            )
            context = source

        latents = self.sample_latents(
            latents, prompt_embeds, negative_prompt_embeds, denoise, callback_on_step_end,
            callback_on_step_end_tensor_inputs, context_latents=context,
        )
        frames = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return StarFlowVPipelineOutput(frames=frames)
