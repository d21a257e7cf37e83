# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Text-to-video with STARFlow-V: invert the flow from Gaussian noise, block by block.

The deep block is solved first, with classifier-free guidance and a KV cache that holds the text prefix;
the shallow blocks are then inverted without guidance (per frame for released models). The result is
optionally denoised (learned denoiser or one score step) and decoded by the Wan VAE.
"""

import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from transformers import PreTrainedTokenizerBase, T5EncoderModel

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKLWan
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import load_video, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from ..loaders import StarFlowVLoraLoaderMixin
from ..models.transformer_starflow_v import StarFlowVTransformer
from ..schedulers.scheduling_jacobi_flow import JacobiFlowScheduler
from .pipeline_output import StarFlowVInversionOutput, StarFlowVPipelineOutput
from .inputs import (
    IMAGE_EXTENSIONS,
    check_default_denoise,
    PIXEL_CHANNELS,
    check_finite,
    check_sizes,
    closest_trained_aspect_ratio,
    frame_size_for_aspect_ratio,
    integer_pixels_to_unit_range,
    parse_aspect_ratio,
)
from .starflow_sampling import StarFlowSamplingMixin
from .streaming import StarFlowVStreamingMixin


logger = logging.get_logger(__name__)

# (temporal, spatial) of the Wan2.2 VAE the released models use: the scale factors of a latent model loaded
# without a VAE and without configured factors (as Wan's pipelines fall back to their VAE's)
WAN_VAE_SCALE_FACTORS = (4, 16)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers.utils import export_to_video
        >>> from starflow_diffusers import BUNDLED_MODEL, StarFlowVPipeline

        >>> # the bundled tiny model (32x32 moving shapes); for the converted 7B use its folder with
        >>> # torch_dtype=torch.bfloat16, then .to("cuda") or pipe.enable_model_cpu_offload()
        >>> pipe = StarFlowVPipeline.from_pretrained(BUNDLED_MODEL)
        >>> video = pipe("a red circle moving right", guidance_scale=3.0).frames[0]
        >>> export_to_video(video, "circle.mp4", fps=16)
        ```
"""


class StarFlowVPipeline(
    DiffusionPipeline, StarFlowSamplingMixin, StarFlowVStreamingMixin, StarFlowVLoraLoaderMixin
):
    r"""
    Text-to-video generation with STARFlow-V.

    Args:
        transformer ([`StarFlowVTransformer`]): the flow (a video configuration).
        scheduler ([`JacobiFlowScheduler`]): the inversion solver.
        tokenizer (`T5TokenizerFast`, *optional*), text_encoder (`T5EncoderModel`, *optional*): the text
            encoder (FLAN-T5-XL for the released model); optional when `prompt_embeds` are passed.
        vae ([`AutoencoderKLWan`], *optional*): the Wan2.2 VAE; None for a model trained in pixel space (a
            transformer with 3 input channels), or to work with a latent model's latents only
            (`output_type="latent"`, `video_latents`).
        fps_conditioning (`bool`): the prompt template states the fps ("A video with 16 fps:").
        noise_level_conditioning (`bool`): the template states the training noise level.
        aspect_ratio_conditioning (`bool`): the template states the aspect ratio.
        default_aspect_ratio (`str`): aspect ratio when neither it nor height/width are given.
        base_frame_size (`int`, *optional*): side, in pixels, of the square with the trained frame area;
            None means `transformer.config.sample_size` latent cells (resolved and registered at `__init__`).
        latent_temporal_scale (`float`): latent frames after the first are multiplied by this after VAE
            normalisation (0.6 for the released model).
        max_text_length (`int`, *optional*): tokenizer padding length; None uses the transformer's.
        noise_level (`float`, *optional*): the training noise sigma the prompt template states; None uses the
            transformer's `noise_std`.
        vae_scale_factor_temporal, vae_scale_factor_spatial (`int`, *optional*): video frames per latent frame
            and pixels per latent cell. They follow the VAE when one is loaded; without one they keep the
            configured values, else 1 for a pixel-space transformer and the Wan2.2 VAE's (4, 16) for a latent
            one. `max_text_length`, `noise_level`, `base_frame_size` and the scale factors are registered at
            `__init__`, so the saved pipeline config is complete and `encode_prompt` needs no transformer.
        default_denoise (`str`, *optional*, defaults to "auto"): what `denoise="auto"` means for this model:
            "learned", "score", "none", or "auto" (the learned denoiser if the model has one, else "score").
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder", "vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        transformer: StarFlowVTransformer,
        scheduler: JacobiFlowScheduler,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        text_encoder: Optional[T5EncoderModel] = None,
        vae: Optional[AutoencoderKLWan] = None,
        fps_conditioning: bool = True,
        noise_level_conditioning: bool = True,
        aspect_ratio_conditioning: bool = True,
        default_aspect_ratio: str = "16:9",
        base_frame_size: Optional[int] = None,
        latent_temporal_scale: float = 0.6,
        max_text_length: Optional[int] = None,
        noise_level: Optional[float] = None,
        vae_scale_factor_temporal: Optional[int] = None,
        vae_scale_factor_spatial: Optional[int] = None,
        default_denoise: str = "auto",
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae
        )
        parse_aspect_ratio(default_aspect_ratio)
        check_default_denoise(default_denoise, transformer)
        check_sizes(
            vae_scale_factor_temporal=vae_scale_factor_temporal, vae_scale_factor_spatial=vae_scale_factor_spatial,
            base_frame_size=base_frame_size,
        )
        if vae is not None:
            vae_scale_factor_temporal = vae.config.scale_factor_temporal
            vae_scale_factor_spatial = vae.config.scale_factor_spatial
        else:
            pixels = transformer is not None and transformer.config.in_channels == PIXEL_CHANNELS
            vae_scale_factor_temporal = vae_scale_factor_temporal or (1 if pixels else WAN_VAE_SCALE_FACTORS[0])
            vae_scale_factor_spatial = vae_scale_factor_spatial or (1 if pixels else WAN_VAE_SCALE_FACTORS[1])
        self.vae_scale_factor_temporal = vae_scale_factor_temporal
        self.vae_scale_factor_spatial = vae_scale_factor_spatial
        if base_frame_size is None and transformer is not None:
            base_frame_size = transformer.config.sample_size * self.spatial_multiple
        self.register_to_config(
            fps_conditioning=fps_conditioning,
            noise_level_conditioning=noise_level_conditioning,
            aspect_ratio_conditioning=aspect_ratio_conditioning,
            default_aspect_ratio=default_aspect_ratio,
            base_frame_size=base_frame_size,
            latent_temporal_scale=latent_temporal_scale,
            vae_scale_factor_temporal=vae_scale_factor_temporal,
            vae_scale_factor_spatial=vae_scale_factor_spatial,
            default_denoise=default_denoise,
            **self.standalone_text_settings(transformer, noise_level, max_text_length),
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ---- text ------------------------------------------------------------------------------------------

    def apply_prompt_template(self, prompts: List[str], fps: int, aspect_ratio: Optional[str]) -> List[str]:
        """The conditioning template of the released models (spec section 6), in its order."""
        return self._apply_template(prompts, aspect_ratio, fps if self.config.fps_conditioning else None)

    def encode_prompt(
        self,
        prompt: Union[str, List[str], None],
        negative_prompt: Union[str, List[str], None] = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        fps: int = 16,
        aspect_ratio: Optional[str] = None,
        max_sequence_length: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Templated, encoded and masked prompt embeddings (B * num_videos_per_prompt, L, D), in the text
        encoder's dtype, and the negative ones when guidance is on. Needs only the tokenizer and text encoder.

        The defaults give the conditioning `__call__` uses for the same prompt at the default size (`fps` 16,
        the default frame size's aspect ratio), so embeddings cached this way reproduce a prompt call.
        `prompt_embeds`/`negative_prompt_embeds` are used as given (no template), e.g. from compel.
        """
        if aspect_ratio is None and self.config.aspect_ratio_conditioning:
            aspect_ratio = self.default_prompt_aspect_ratio()
        prompt_embeds, negative_prompt_embeds = self._encode_prompt_pair(
            prompt, negative_prompt, do_classifier_free_guidance, num_videos_per_prompt, prompt_embeds,
            negative_prompt_embeds, lambda texts: self.apply_prompt_template(texts, fps, aspect_ratio),
            max_sequence_length, device,
        )
        return prompt_embeds, negative_prompt_embeds

    # ---- checks -----------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        num_frames,
        guidance_scale,
        num_videos_per_prompt,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        denoise,
        output_type,
        callback_on_step_end_tensor_inputs,
        max_sequence_length=None,
    ):
        self._check_call_inputs(
            prompt, negative_prompt, {"height": height, "width": width, "num_frames": num_frames}, guidance_scale,
            ("num_videos_per_prompt", num_videos_per_prompt), latents, ("frames", "height", "width"), prompt_embeds,
            negative_prompt_embeds, denoise, output_type, callback_on_step_end_tensor_inputs, max_sequence_length,
        )

    def resolve_video_size(
        self, height: Optional[int], width: Optional[int], num_frames: Optional[int], aspect_ratio: Optional[str],
        latents: Optional[torch.Tensor],
    ) -> Tuple[int, int, int, str]:
        """Pixel (height, width, num_frames) and the aspect-ratio string, rounded to valid values."""
        temporal = self.vae_scale_factor_temporal
        if latents is not None:
            num_frames = num_frames or (latents.shape[2] - 1) * temporal + 1
        latent_size = None if latents is None else tuple(latents.shape[3:])
        height, width, aspect_ratio = self._resolve_frame_size(height, width, aspect_ratio, latent_size)
        if num_frames is None:
            trained = self.transformer.config.trained_latent_frames or 1
            num_frames = (trained - 1) * temporal + 1
        if (num_frames - 1) % temporal:
            rounded = (num_frames - 1) // temporal * temporal + 1
            logger.warning(f"`num_frames` must be {temporal}k+1; using {rounded} instead of {num_frames}.")
            num_frames = rounded
        if latents is not None:
            expected = ((num_frames - 1) // temporal + 1, height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
            if tuple(latents.shape[2:]) != expected:
                raise ValueError(
                    f"`latents` has (frames, height, width) {tuple(latents.shape[2:])} but num_frames={num_frames}, "
                    f"height={height}, width={width} need {expected}."
                )
        return height, width, num_frames, aspect_ratio

    # ---- latents ------------------------------------------------------------------------------------------

    def prepare_latents(self, batch_size, num_latent_frames, latent_height, latent_width, device, generator, latents):
        """The Gaussian noise z to invert, float32 (B, C, T, H, W)."""
        shape = (batch_size, self.transformer.config.in_channels, num_latent_frames, latent_height, latent_width)
        return self.prepare_noise(shape, device, generator, latents)

    def _vae_stats(self, latents: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return mean, std

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> model space: per-channel normalisation, then frames 1.. scaled (spec section 7)."""
        if self.models_pixels:
            return latents
        self._require_vae("Normalising VAE latents")
        mean, std = self._vae_stats(latents)
        latents = (latents - mean) / std
        return torch.cat([latents[:, :, :1], latents[:, :, 1:] * self.config.latent_temporal_scale], dim=2)

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.models_pixels:
            return latents
        self._require_vae("Denormalising model-space latents")
        latents = torch.cat([latents[:, :, :1], latents[:, :, 1:] / self.config.latent_temporal_scale], dim=2)
        mean, std = self._vae_stats(latents)
        return latents * std + mean

    # ---- call -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
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
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        denoise: str = "auto",
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: Optional[int] = None,
        stream: bool = False,
    ):
        r"""
        Generate videos.

        Args:
            prompt (`str` or `List[str]`): what to generate.
            negative_prompt (`str` or `List[str]`, *optional*): the unconditional prompt of guidance ("").
            height, width (`int`, *optional*): pixel size, multiples of `pipe.spatial_multiple` (rounded down
                with a warning); default from `aspect_ratio` and the trained frame area.
            num_frames (`int`, *optional*): pixel frames, 4k+1 with the Wan VAE (rounded with a warning);
                default: the trained clip length. More latent frames than the scheduler's local window are
                generated with a sliding window automatically.
            fps (`int`): frame rate named in the prompt template (the model is fps-conditioned).
            aspect_ratio (`str`, *optional*): e.g. "16:9"; named in the prompt template. Default: the trained
                ratio closest to width/height.
            guidance_scale (`float`): diffusers convention: guidance is on when > 1, with flow-guidance
                weight w = guidance_scale - 1 (the original code's `--cfg`; 4.5 here is `--cfg 3.5`).
            latents (`torch.Tensor`, *optional*): the Gaussian noise z (B, C, T, H, W) to invert.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): (B, L, text_dim) embeddings
                used verbatim (no template), e.g. weighted prompts from compel.
            denoise (`str`): "auto" (the pipeline config's `default_denoise`, by default the learned denoiser
                if the model has one, else "score"), "learned", "score" (one step along the flow's own score)
                or "none".
            output_type (`str`): "np", "pil", "pt" or "latent" (the model-space latents before the VAE).
            attention_kwargs (`dict`, *optional*): `{"scale": s}` scales loaded LoRA adapters.
            callback_on_step_end (`Callable`, *optional*): called after every solved chunk of the deep block
                as `callback(pipe, index, chunk_start, {"latents": ...})`; may return new `latents` (the
                deep block's current (B, C, T, H, W) state) or embeddings.
            max_sequence_length (`int`, *optional*): text tokens; default the model's trained length.
            stream (`bool`): return a generator of the frames as they become final instead of the output
                (see [`~StarFlowVPipeline.stream`]); `return_dict` is then ignored.

        Examples:

        Returns:
            [`StarFlowVPipelineOutput`] with `frames` (see `output_type`), or a tuple `(frames,)` when
            `return_dict` is False; with `stream=True`, an iterator of frame groups as they become final.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, negative_prompt, height, width, num_frames, guidance_scale, num_videos_per_prompt, latents,
            prompt_embeds, negative_prompt_embeds, denoise, output_type, callback_on_step_end_tensor_inputs,
            max_sequence_length,
        )
        if not self.transformer.config.is_video:
            raise ValueError("`transformer` is an image model; use `StarFlowPipeline` for text-to-image.")
        denoise = self._start_call(guidance_scale, attention_kwargs, denoise)
        device = self._execution_device

        height, width, num_frames, aspect_ratio = self.resolve_video_size(height, width, num_frames, aspect_ratio, latents)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, num_videos_per_prompt, prompt_embeds,
            negative_prompt_embeds, fps, aspect_ratio, max_sequence_length, device,
        )
        batch = prompt_embeds.shape[0]
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        latents = self.prepare_latents(
            batch, latent_frames, height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial,
            device, generator, latents,
        )
        if stream:
            return self._stream_frames(
                latents, prompt_embeds, negative_prompt_embeds, denoise, output_type, callback_on_step_end,
                callback_on_step_end_tensor_inputs,
            )
        latents = self.sample_latents(
            latents, prompt_embeds, negative_prompt_embeds, denoise, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        frames = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return StarFlowVPipelineOutput(frames=frames)

    # ---- pixel videos in, likelihood and inversion ----------------------------------------------------------

    @staticmethod
    def load_video_frames(video) -> Union[List, np.ndarray, torch.Tensor]:
        """A path (read with diffusers' `load_video`), a list of PIL frames, an np array or a tensor."""
        if isinstance(video, (str, os.PathLike)):
            if not os.path.exists(video):
                raise ValueError(f"`video` file not found: {video}")
            # diffusers' `load_video` would read an image as a one-frame video
            if os.path.splitext(str(video))[1].lower() in IMAGE_EXTENSIONS:
                raise ValueError(
                    f"`video` {str(video)!r} is an image file; pass a video file (an image starts a clip as `image=` "
                    f"of StarFlowVImageToVideoPipeline)."
                )
            try:
                video = load_video(str(video))
            except Exception as e:
                # the first line only: decoders append pages of their own log
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(f"`video` {str(video)!r} could not be read as a video: {reason}") from e
        if video is None or len(video) == 0:
            raise ValueError("`video` has no frames.")
        return video

    def _default_size_for_frames(self, frames, height, width, aspect_ratio):
        """Default height/width: the trained aspect ratio closest to the conditioning frames'."""
        if frames is None or (height is not None and width is not None) or aspect_ratio is not None:
            return height, width, aspect_ratio
        first = frames[0]
        if isinstance(first, PIL.Image.Image):
            w, h = first.size
        elif isinstance(first, np.ndarray):
            h, w = first.shape[-3:-1] if first.shape[-1] in (1, 3, 4) else first.shape[-2:]
        else:
            h, w = first.shape[-2:]
        aspect_ratio = closest_trained_aspect_ratio(w, h)
        default_h, default_w = frame_size_for_aspect_ratio(aspect_ratio, self.default_base_frame_size, self.spatial_multiple)
        return height or default_h, width or default_w, aspect_ratio

    def encode_video(self, frames, height: int, width: int, generator=None, name: str = "video") -> torch.Tensor:
        """Pixel frames -> normalised model-space latents (1, C, T, h, w), not noise-augmented.

        Frames are resized and centre-cropped to (height, width); with a VAE, a clip whose length is not
        4k+1 is trimmed to the longest 4k+1 prefix (with a warning)."""
        frames = integer_pixels_to_unit_range(frames, name)
        pixels = self.video_processor.preprocess_video(frames, height, width, resize_mode="crop")
        if self.models_pixels:
            return pixels.to(self._execution_device, torch.float32)
        self._require_vae("Encoding pixel frames (pass model-space latents instead)")
        if (pixels.shape[2] - 1) % self.vae_scale_factor_temporal:
            keep = (pixels.shape[2] - 1) // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1
            logger.warning(f"The video has {pixels.shape[2]} frames; using its first {keep} (4k+1).")
            pixels = pixels[:, :, :keep]
        pixels = pixels.to(self._execution_device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        return self.normalize_latents(latents.float())

    @torch.no_grad()
    def invert(
        self,
        video=None,
        prompt: Union[str, List[str], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        fps: int = 16,
        aspect_ratio: Optional[str] = None,
        noise_augment: Optional[bool] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        max_sequence_length: Optional[int] = None,
    ) -> StarFlowVInversionOutput:
        """Map a video exactly to its noise z and compute its log-likelihood under the flow.

        Args:
            video: pixel frames (path, list of PIL images, np array or tensor); or pass `latents`.
            latents (`torch.Tensor`, *optional*): (B, C, T, h, w) model-space latents instead of `video`.
            noise_augment (`bool`, *optional*): add sigma-scaled Gaussian noise first, as in training (the
                density is over noisy latents). Default: True for `video`, False for `latents`.
        """
        if (video is None) == (latents is None):
            raise ValueError("Pass exactly one of `video` (pixels) or `latents` (model space).")
        if latents is not None and (latents.ndim != 5 or latents.shape[1] != self.transformer.config.in_channels):
            raise ValueError(
                f"`latents` must be (batch, {self.transformer.config.in_channels}, frames, height, width), got {tuple(latents.shape)}."
            )
        check_finite(latents=latents, prompt_embeds=prompt_embeds)
        check_sizes(height=height, width=width)
        device = self._execution_device
        if video is not None:
            frames = self.load_video_frames(video)
            # the sizes `__call__` would use: defaults from the aspect ratio, rounded to the latent grid
            height, width, _ = self._resolve_frame_size(height, width, aspect_ratio)
            latents = self.encode_video(frames, height, width, generator)
        latents = latents.to(device, torch.float32)
        if noise_augment if noise_augment is not None else video is not None:
            latents = latents + self.noise_std * randn_tensor(latents.shape, generator=generator, device=device)
        if aspect_ratio is None:
            aspect_ratio = closest_trained_aspect_ratio(latents.shape[4], latents.shape[3])
        if prompt is None and prompt_embeds is None:
            prompt = ""
        prompt_embeds, _ = self.encode_prompt(
            prompt, None, False, 1, prompt_embeds, None, fps, aspect_ratio, max_sequence_length, device
        )
        if prompt_embeds.shape[0] == 1 and latents.shape[0] > 1:
            prompt_embeds = prompt_embeds.expand(latents.shape[0], -1, -1)
        if prompt_embeds.shape[0] != latents.shape[0]:
            raise ValueError(f"{prompt_embeds.shape[0]} prompts for a batch of {latents.shape[0]} videos.")
        dtype = self.transformer.dtype
        output = self.transformer(latents.to(dtype), prompt_embeds.to(dtype))
        noise = output.sample.float()
        dims = noise[0].numel()
        log_likelihood = -0.5 * noise.square().flatten(1).sum(1) - 0.5 * dims * math.log(2 * math.pi) + output.logdet
        bits = -log_likelihood / (dims * math.log(2))
        self.maybe_free_model_hooks()
        return StarFlowVInversionOutput(noise=noise, log_likelihood=log_likelihood, bits_per_dim=bits, latents=latents)

    def log_likelihood(self, video=None, prompt=None, **kwargs) -> torch.Tensor:
        """(B,) bits per dimension of a video (or `latents=`) under the flow; lower is more likely.

        Accepts the arguments of `invert`; useful for ranking candidates or flagging anomalies."""
        return self.invert(video, prompt, **kwargs).bits_per_dim

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        if self.models_pixels:
            video = latents.clamp(-1, 1)
        else:
            self._require_vae(f"`output_type={output_type!r}`")
            vae_latents = self.denormalize_latents(latents).to(self.vae.dtype)
            video = self.vae.decode(vae_latents, return_dict=False)[0]
        return self.video_processor.postprocess_video(video.float(), output_type=output_type)

