# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Text-to-image with STARFlow: invert the flow from Gaussian noise, then decode with the SD VAE.

An image is a one-frame video for the shared solve in `StarFlowSamplingMixin`: the deep block is solved
with classifier-free guidance, the shallow blocks without, and one step along the model's own score removes
the training noise (the image models have no learned denoiser). The pipeline also scores images: the flow's
forward pass gives their exact log-likelihood (`log_likelihood`).
"""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from transformers import PreTrainedTokenizerBase, T5EncoderModel

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKL
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..loaders import StarFlowVLoraLoaderMixin
from ..models.transformer_starflow_v import StarFlowVTransformer
from ..schedulers.scheduling_jacobi_flow import JacobiFlowScheduler
from .inputs import (
    check_default_denoise,
    PIXEL_CHANNELS,
    check_finite,
    check_sizes,
    closest_trained_aspect_ratio,
    integer_pixels_to_unit_range,
    parse_aspect_ratio,
)
from .starflow_sampling import StarFlowSamplingMixin


logger = logging.get_logger(__name__)

# pixels per latent cell of the SD VAE (sd-vae-ft-ema) the released 3B model uses: the scale factor of a
# latent model loaded without a VAE and without a configured factor
SD_VAE_SCALE_FACTOR = 8

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from starflow_diffusers import StarFlowPipeline

        >>> pipe = StarFlowPipeline.from_pretrained("path/to/starflow-3b-diffusers", torch_dtype=torch.bfloat16)
        >>> pipe = pipe.to("cuda")
        >>> image = pipe("a watercolor painting of a lighthouse at dawn", guidance_scale=3.5).images[0]
        >>> image.save("lighthouse.png")
        ```
"""


class StarFlowPipeline(DiffusionPipeline, StarFlowSamplingMixin, StarFlowVLoraLoaderMixin):
    r"""
    Text-to-image generation (and image likelihoods) with STARFlow.

    Args:
        transformer ([`StarFlowVTransformer`]): the flow, in an image configuration (`is_video=False`).
        scheduler ([`JacobiFlowScheduler`]): the inversion solver.
        tokenizer (`T5TokenizerFast`, *optional*), text_encoder (`T5EncoderModel`, *optional*): the text
            encoder (FLAN-T5-XL for the released 3B model); optional when `prompt_embeds` are passed.
        vae ([`AutoencoderKL`], *optional*): the image autoencoder (sd-vae-ft-ema for the 3B model); its
            latents are multiplied by `vae.config.scaling_factor` to reach model space. None for a model
            trained on pixels in [-1, 1].
        aspect_ratio_conditioning (`bool`): the prompt template states the aspect ratio (models trained with
            mixed aspect ratios; not the 3B model).
        noise_level_conditioning (`bool`): the prompt template states the training noise level (not the 3B
            model).
        default_aspect_ratio (`str`): aspect ratio when neither it nor height/width are given.
        base_frame_size (`int`, *optional*): side, in pixels, of the square with the trained image area;
            None means `transformer.config.sample_size` latent cells (resolved and registered at `__init__`).
        max_text_length (`int`, *optional*): tokenizer padding length; None uses the transformer's.
        noise_level (`float`, *optional*): the training noise sigma the prompt template states; None uses the
            transformer's `noise_std`.
        vae_scale_factor (`int`, *optional*): pixels per latent cell. It follows the VAE when one is loaded;
            without one it keeps the configured value, else 1 for a pixel-space transformer and the SD VAE's 8
            for a latent one. These settings are registered at `__init__`, so the saved pipeline config is
            complete and `encode_prompt` needs no transformer.
        default_denoise (`str`, *optional*, defaults to "auto"): what `denoise="auto"` means for this model:
            "score", "none", or "auto" ("score": image models have no learned denoiser).
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
        vae: Optional[AutoencoderKL] = None,
        aspect_ratio_conditioning: bool = False,
        noise_level_conditioning: bool = False,
        default_aspect_ratio: str = "1:1",
        base_frame_size: Optional[int] = None,
        max_text_length: Optional[int] = None,
        noise_level: Optional[float] = None,
        vae_scale_factor: Optional[int] = None,
        default_denoise: str = "auto",
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae
        )
        parse_aspect_ratio(default_aspect_ratio)
        check_default_denoise(default_denoise, transformer)
        check_sizes(vae_scale_factor=vae_scale_factor, base_frame_size=base_frame_size)
        if vae is not None:
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        elif vae_scale_factor is None:
            pixels = transformer is not None and transformer.config.in_channels == PIXEL_CHANNELS
            vae_scale_factor = 1 if pixels else SD_VAE_SCALE_FACTOR
        self.vae_scale_factor = vae_scale_factor
        # the name the shared size helpers read
        self.vae_scale_factor_spatial = self.vae_scale_factor
        if base_frame_size is None and transformer is not None:
            base_frame_size = transformer.config.sample_size * self.spatial_multiple
        self.register_to_config(
            aspect_ratio_conditioning=aspect_ratio_conditioning,
            noise_level_conditioning=noise_level_conditioning,
            default_aspect_ratio=default_aspect_ratio,
            base_frame_size=base_frame_size,
            vae_scale_factor=vae_scale_factor,
            default_denoise=default_denoise,
            **self.standalone_text_settings(transformer, noise_level, max_text_length),
        )
        latent_channels = vae.config.latent_channels if vae is not None else 4
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, vae_latent_channels=latent_channels
        )

    # ---- text ------------------------------------------------------------------------------------------

    def apply_prompt_template(self, prompts: List[str], aspect_ratio: Optional[str] = None) -> List[str]:
        """The image template (spec section 6): no fps line; the noise-level and aspect-ratio lines only when
        the pipeline config enables them. Both are off for the released 3B model, which sees the bare prompt."""
        return self._apply_template(prompts, aspect_ratio)

    def encode_prompt(
        self,
        prompt: Union[str, List[str], None],
        negative_prompt: Union[str, List[str], None] = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        aspect_ratio: Optional[str] = None,
        max_sequence_length: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Templated, encoded and masked prompt embeddings (B * num_images_per_prompt, L, D), and the negative
        ones when guidance is on, in the text encoder's dtype; needs only the tokenizer and text encoder. The
        default aspect ratio is the one `__call__` states at the default size. Given
        `prompt_embeds`/`negative_prompt_embeds` are used without a template."""

        if aspect_ratio is None and self.config.aspect_ratio_conditioning:
            aspect_ratio = self.default_prompt_aspect_ratio()

        def template(texts: List[str]) -> List[str]:
            return self.apply_prompt_template(texts, aspect_ratio)

        prompt_embeds, negative_prompt_embeds = self._encode_prompt_pair(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            num_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            template=template,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        return prompt_embeds, negative_prompt_embeds

    # ---- checks -----------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        guidance_scale,
        num_images_per_prompt,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        denoise,
        output_type,
        callback_on_step_end_tensor_inputs,
        max_sequence_length=None,
    ):
        self._check_call_inputs(
            prompt,
            negative_prompt,
            sizes={"height": height, "width": width},
            guidance_scale=guidance_scale,
            num_per_prompt=("num_images_per_prompt", num_images_per_prompt),
            latents=latents,
            latent_axes=("height", "width"),
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            denoise=denoise,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        if self.transformer.config.is_video:
            raise ValueError("`transformer` is a video model; use `StarFlowVPipeline` for text-to-video.")
        if denoise == "learned":
            raise ValueError(
                "`denoise='learned'` is not available: STARFlow image models have no learned denoiser; use "
                "'auto' (the score step), 'score' or 'none'."
            )

    # ---- latents ------------------------------------------------------------------------------------------

    def prepare_latents(self, batch_size, latent_height, latent_width, device, generator, latents):
        """The Gaussian noise z to invert, float32 (B, C, H, W)."""
        shape = (batch_size, self.transformer.config.in_channels, latent_height, latent_width)
        return self.prepare_noise(shape, device, generator, latents)

    def _vae_shift(self) -> float:
        return getattr(self.vae.config, "shift_factor", None) or 0.0

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> model space: times `scaling_factor` (after subtracting a `shift_factor`, if any)."""
        if self.models_pixels:
            return latents
        self._require_vae("Scaling VAE latents")
        return (latents - self._vae_shift()) * self.vae.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.models_pixels:
            return latents
        self._require_vae("Unscaling model-space latents")
        return latents / self.vae.config.scaling_factor + self._vae_shift()

    @staticmethod
    def _image_layout_callback(callback):
        """The shared solve works on (B, C, 1, H, W); users' callbacks see and return (B, C, H, W) latents."""
        if callback is None:
            return None

        def image_callback(pipe, index, timestep, callback_kwargs):
            if "latents" in callback_kwargs:
                callback_kwargs = {**callback_kwargs, "latents": callback_kwargs["latents"][:, :, 0]}
            outputs = callback(pipe, index, timestep, callback_kwargs) or {}
            if "latents" in outputs:
                outputs = {**outputs, "latents": outputs["latents"].unsqueeze(2)}
            return outputs

        return image_callback

    # ---- call -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        aspect_ratio: Optional[str] = None,
        guidance_scale: float = 4.5,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        denoise: str = "auto",
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        max_sequence_length: Optional[int] = None,
    ):
        r"""
        Generate images.

        Args:
            prompt (`str` or `List[str]`): what to generate.
            negative_prompt (`str` or `List[str]`, *optional*): the unconditional prompt of guidance ("").
            height, width (`int`, *optional*): pixel size, multiples of `pipe.spatial_multiple` (VAE factor x
                patch size; rounded down with a warning). Default: `aspect_ratio` at the trained image area
                (256x256 for the 3B model), or the size of `latents`.
            aspect_ratio (`str`, *optional*): e.g. "3:2"; sets the default size, and is named in the prompt
                template when the pipeline has `aspect_ratio_conditioning`. Default: the configured
                `default_aspect_ratio`, or the trained ratio closest to width/height.
            guidance_scale (`float`): diffusers convention: guidance is on when > 1, with flow-guidance
                weight w = guidance_scale - 1 (the original code's `--cfg`; 4.5 here is `--cfg 3.5`).
            num_images_per_prompt (`int`): images per prompt.
            generator (`torch.Generator` or a list of them, *optional*): for the initial noise.
            latents (`torch.Tensor`, *optional*): the Gaussian noise z (B, C, H, W) to invert.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): (B, L, text_dim) embeddings
                used verbatim (no template), e.g. weighted prompts from compel.
            denoise (`str`): "auto" or "score" (one step along the flow's own score, removing the training
                noise), or "none" (the raw, slightly noisy sample). Image models have no learned denoiser.
            output_type (`str`): "pil", "np", "pt" or "latent" (the (B, C, H, W) model-space latents, i.e. VAE
                latents times `scaling_factor`).
            return_dict (`bool`): return an [`~pipelines.ImagePipelineOutput`] rather than a tuple.
            attention_kwargs (`dict`, *optional*): `{"scale": s}` scales loaded LoRA adapters.
            callback_on_step_end (`Callable`, *optional*): called after every solved chunk of the deep block
                as `callback(pipe, index, chunk_start, {"latents": ...})`; may return new `latents` (the deep
                block's current (B, C, H, W) state) or embeddings.
            callback_on_step_end_tensor_inputs (`List[str]`): what the callback receives.
            max_sequence_length (`int`, *optional*): text tokens; default the model's trained length.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] with `images`, or a tuple `(images,)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, negative_prompt, height, width, guidance_scale, num_images_per_prompt, latents, prompt_embeds,
            negative_prompt_embeds, denoise, output_type, callback_on_step_end_tensor_inputs, max_sequence_length,
        )
        denoise = self._start_call(guidance_scale, attention_kwargs, "score" if denoise == "auto" else denoise)
        device = self._execution_device

        latent_size = None if latents is None else tuple(latents.shape[2:])
        height, width, aspect_ratio = self._resolve_frame_size(height, width, aspect_ratio, latent_size)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            aspect_ratio=aspect_ratio,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        latents = self.prepare_latents(
            prompt_embeds.shape[0], height // self.vae_scale_factor, width // self.vae_scale_factor, device,
            generator, latents,
        )
        # an image is a one-frame video for the shared solve
        latents = self.sample_latents(
            latents.unsqueeze(2), prompt_embeds, negative_prompt_embeds, denoise,
            self._image_layout_callback(callback_on_step_end), callback_on_step_end_tensor_inputs,
        )[:, :, 0]
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        if self.models_pixels:
            pixels = latents
        else:
            self._require_vae(f"`output_type={output_type!r}`")
            pixels = self.vae.decode(self.unscale_latents(latents).to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(pixels.float(), output_type=output_type)

    # ---- likelihood -------------------------------------------------------------------------------------------

    def encode_image(
        self,
        image: PipelineImageInput,
        height: Optional[int] = None,
        width: Optional[int] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        sample_posterior: bool = False,
    ) -> torch.Tensor:
        """Images -> float32 model-space latents (B, C, h, w), without noise augmentation.

        `image` follows `VaeImageProcessor.preprocess`: PIL images, np arrays or tensors in [0, 1] (tensors
        with negative values are taken as [-1, 1]) or integer (uint8) arrays and tensors in [0, 255]; it is resized to (height, width) when given, and to
        multiples of `spatial_multiple` otherwise. The VAE posterior's mean is used, or a sample drawn with
        `generator` when `sample_posterior` is True (as the original training code does)."""
        pixels = self.image_processor.preprocess(integer_pixels_to_unit_range(image), height=height, width=width)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"`image` must be RGB, got a tensor of shape {tuple(pixels.shape)} after preprocessing; pass "
                "model-space latents as `latents=` instead."
            )
        multiple = self.spatial_multiple
        h, w = pixels.shape[2] // multiple * multiple, pixels.shape[3] // multiple * multiple
        if h == 0 or w == 0:
            raise ValueError(f"`image` of size {tuple(pixels.shape[2:])} is smaller than one latent cell ({multiple} pixels).")
        if (h, w) != tuple(pixels.shape[2:]):
            logger.warning(f"Image size must be a multiple of {multiple}; resizing {tuple(pixels.shape[2:])} to {(h, w)}.")
            pixels = self.image_processor.resize(pixels, h, w)
        device = self._execution_device
        if self.models_pixels:
            return pixels.to(device, torch.float32)
        self._require_vae("Encoding `image` (pass model-space `latents` instead)")
        posterior = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.scale_latents(latents.float())

    @torch.no_grad()
    def log_likelihood(
        self,
        image: Optional[PipelineImageInput] = None,
        prompt: Union[str, List[str], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        latents: Optional[torch.Tensor] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        aspect_ratio: Optional[str] = None,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        sample_posterior: bool = False,
        max_sequence_length: Optional[int] = None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
    ) -> torch.Tensor:
        r"""
        Negative log-likelihood of images under the flow, in bits per dimension (lower is more likely).

        The model is a density over *noisy* model-space latents: it was trained on x + sigma * eps with
        sigma = `transformer.config.noise_std` (0.3 for the 3B model). An `image` is therefore preprocessed,
        VAE-encoded (see `encode_image`), scaled, and noise-augmented with Gaussian noise of that sigma drawn
        from `generator`; pass the same generator seed to compare images under the same noise. Values are
        per latent dimension (not per pixel) and, being continuous densities, can be negative.

        Args:
            image (`PipelineImageInput`, *optional*): PIL image(s), np array or tensor (see `encode_image`).
            prompt (`str` or `List[str]`, *optional*): the caption(s) to condition on, templated like
                generation prompts; one prompt is shared by the whole batch. Default: "" (unconditional).
            prompt_embeds (`torch.Tensor`, *optional*): (1 or B, L, text_dim) embeddings instead of `prompt`.
            latents (`torch.Tensor`, *optional*): (B, C, h, w) model-space latents instead of `image`, scored
                as given (no VAE, no noise added).
            height, width (`int`, *optional*): resize `image` to this size first.
            aspect_ratio (`str`, *optional*): for the template (`aspect_ratio_conditioning`); default the
                trained ratio closest to the image's.
            generator (`torch.Generator`, *optional*): for the augmentation noise (and a posterior sample).
            sample_posterior (`bool`): encode with a sample of the VAE posterior instead of its mean.

        Returns:
            `torch.Tensor`: (B,) float32 bits per dimension.
        """
        if (image is None) == (latents is None):
            raise ValueError("Pass exactly one of `image` (pixels) or `latents` (model space).")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        self._check_text_embeds(prompt_embeds, None, max_sequence_length)
        channels = self.transformer.config.in_channels
        if latents is not None and (latents.ndim != 4 or latents.shape[1] != channels):
            raise ValueError(f"`latents` must be (batch, {channels}, height, width), got {tuple(latents.shape)}.")
        check_finite(latents=latents, prompt_embeds=prompt_embeds)
        check_sizes(height=height, width=width)
        if isinstance(image, (list, tuple)) and len(image) == 0:
            raise ValueError("`image` is an empty list; pass at least one image.")
        device = self._execution_device
        if latents is None:
            if height is not None and width is not None:
                height, width, _ = self._resolve_frame_size(height, width, aspect_ratio)
            latents = self.encode_image(image, height, width, generator, sample_posterior)
            latents = latents + self.noise_std * randn_tensor(
                latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
            )
        latents = latents.to(device, torch.float32)
        batch = latents.shape[0]

        if aspect_ratio is None:
            aspect_ratio = closest_trained_aspect_ratio(latents.shape[3], latents.shape[2])
        text, _ = self.encode_prompt(
            "" if prompt is None and prompt_embeds is None else prompt,
            do_classifier_free_guidance=False,
            prompt_embeds=prompt_embeds,
            aspect_ratio=aspect_ratio,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        if text.shape[0] not in (1, batch):
            raise ValueError(f"Got {text.shape[0]} prompts for {batch} images; pass one prompt or one per image.")
        text = text.expand(batch, -1, -1)
        dtype = self.transformer.dtype
        output = self.transformer(latents.to(dtype), text.to(dtype), attention_kwargs=attention_kwargs)
        self.maybe_free_model_hooks()
        return self.transformer.bits_per_dim(output).float()
