# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Image-to-video and video extension with STARFlow-V.

The conditioning image (or the clip to extend) is VAE-encoded, normalised, noise-augmented with the
model's training noise level sigma and run FORWARD through the flow: its deep-space tokens fill the deep
block's KV cache, and the solve continues after them (spec section 8). The first output frames reproduce
the conditioning frames up to solver tolerance.
"""

import os
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import load_image, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from .pipeline_output import StarFlowVPipelineOutput
from .pipeline_starflow_v import StarFlowVPipeline
from .prompt_template import EXTEND_CAPTION_PREFIX
from .inputs import check_finite, integer_pixels_to_unit_range


logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import PIL.Image
        >>> from diffusers.utils import export_to_video
        >>> from starflow_diffusers import BUNDLED_MODEL, StarFlowVImageToVideoPipeline

        >>> pipe = StarFlowVImageToVideoPipeline.from_pretrained(BUNDLED_MODEL)
        >>> first_frame = PIL.Image.new("RGB", (32, 32), "gray")  # or diffusers.utils.load_image(path)
        >>> video = pipe(first_frame, "a blue square moving down", guidance_scale=3.0).frames[0]
        >>> export_to_video(video, "square.mp4", fps=16)
        ```
"""

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike]


class StarFlowVImageToVideoPipeline(StarFlowVPipeline):
    r"""
    Image-to-video generation (and video extension) with STARFlow-V. Same components and configuration as
    [`StarFlowVPipeline`]; a VAE is needed unless `image_latents`/`video_latents` are passed.
    """

    def _load_frames(self, image: Optional[ImageInput], video) -> Optional[Union[List, torch.Tensor, np.ndarray]]:
        if image is not None and video is not None:
            raise ValueError("Pass either `image` or `video` (a clip to extend), not both.")
        if image is not None:
            if isinstance(image, (str, os.PathLike)):
                image = load_image(str(image))
            if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
                raise ValueError(f"`image` must be a PIL image, np array, tensor or path, got {type(image).__name__}.")
            return [image]
        if video is not None:
            return self.load_video_frames(video)
        return None

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: Optional[ImageInput] = None,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: Optional[int] = None,
        fps: int = 16,
        aspect_ratio: Optional[str] = None,
        guidance_scale: float = 4.5,
        num_videos_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        image_latents: Optional[torch.Tensor] = None,
        video=None,
        video_latents: Optional[torch.Tensor] = None,
        extend_caption_prefix: bool = False,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        denoise: str = "auto",
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: Optional[int] = None,
    ):
        r"""
        Generate a video starting from `image` (or continuing `video`). Arguments as in
        [`StarFlowVPipeline.__call__`], plus:

        Args:
            image (PIL image, np array, tensor or path): the first frame. It is resized and centre-cropped
                to (height, width); without them, the size follows the image's aspect ratio. It is encoded
                as one latent frame, normalised and noise-augmented with sigma using `generator`.
            image_latents (`torch.Tensor`, *optional*): (B, C, 1, h, w) model-space latents used verbatim as the
                already noise-augmented first frame.
            video (list of PIL images, np array, tensor or path, *optional*): a clip to extend instead of an
                image; its (4k+1) frames become the context.
            video_latents (`torch.Tensor`, *optional*): (B, C, Tc, h, w) model-space context used verbatim.
            extend_caption_prefix (`bool`): prepend "(extend) " to the prompts, for checkpoints trained with
                it for extension.
            num_frames (`int`, *optional*): total pixel frames of the output, conditioning frames included.

        Examples:

        Returns:
            [`StarFlowVPipelineOutput`] with `frames` (the conditioning frames included), or a tuple
            `(frames,)` when `return_dict` is False.
        """
        given = [n for n, v in (("image", image), ("image_latents", image_latents), ("video", video), ("video_latents", video_latents)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"Pass exactly one of `image`, `image_latents`, `video`, `video_latents`; got {given or 'none'}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, negative_prompt, height, width, num_frames, guidance_scale, num_videos_per_prompt, latents,
            prompt_embeds, negative_prompt_embeds, denoise, output_type, callback_on_step_end_tensor_inputs,
            max_sequence_length,
        )
        context = image_latents if image_latents is not None else video_latents
        channels = self.transformer.config.in_channels
        if context is not None and (context.ndim != 5 or context.shape[1] != channels):
            name = "image_latents" if image_latents is not None else "video_latents"
            raise ValueError(f"`{name}` must be (batch, {channels}, frames, height, width), got {tuple(context.shape)}.")
        if image_latents is not None and image_latents.shape[2] != 1:
            raise ValueError(f"`image_latents` must hold one latent frame, got {image_latents.shape[2]}.")
        check_finite(image_latents=image_latents, video_latents=video_latents)
        frames = self._load_frames(image, video)
        if frames is not None:  # layout, channels and range, before any encoding
            frames = integer_pixels_to_unit_range(frames, "image" if image is not None else "video")
        if frames is not None and self.vae is None and not self.models_pixels:
            raise ValueError("Encoding `image`/`video` needs a VAE; pass `image_latents`/`video_latents` instead.")
        denoise = self._start_call(guidance_scale, attention_kwargs, denoise)
        device = self._execution_device

        if context is not None and latents is None and (height is None or width is None):
            height = height or context.shape[3] * self.vae_scale_factor_spatial
            width = width or context.shape[4] * self.vae_scale_factor_spatial
        height, width, aspect_ratio = self._default_size_for_frames(frames, height, width, aspect_ratio)
        height, width, num_frames, aspect_ratio = self.resolve_video_size(height, width, num_frames, aspect_ratio, latents)

        if extend_caption_prefix and prompt is not None:
            prompt = [EXTEND_CAPTION_PREFIX + p for p in ([prompt] if isinstance(prompt, str) else prompt)]
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, num_videos_per_prompt, prompt_embeds,
            negative_prompt_embeds, fps, aspect_ratio, max_sequence_length, device,
        )
        batch = prompt_embeds.shape[0]
        if context is None:
            context = self.encode_video(frames, height, width, generator, "image" if image is not None else "video")
            noise = randn_tensor(context.shape, generator=generator, device=device, dtype=torch.float32)
            context = context + self.noise_std * noise
        context = context.to(device, torch.float32)
        if context.shape[0] == 1 and batch > 1:
            context = context.expand(batch, -1, -1, -1, -1)
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        latent_size = (height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        if context.shape[0] != batch or tuple(context.shape[3:]) != latent_size:
            raise ValueError(
                f"The context latents {tuple(context.shape)} do not match batch {batch} and latent size {latent_size}."
            )
        if context.shape[2] >= latent_frames:
            raise ValueError(
                f"`num_frames`={num_frames} ({latent_frames} latent frames) leaves nothing to generate after "
                f"{context.shape[2]} conditioning latent frame(s)."
            )
        latents = self.prepare_latents(batch, latent_frames, *latent_size, device, generator, latents)
        latents = self.sample_latents(
            latents, prompt_embeds, negative_prompt_embeds, denoise, callback_on_step_end,
            callback_on_step_end_tensor_inputs, context_latents=context,
        )
        frames = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return StarFlowVPipelineOutput(frames=frames)
