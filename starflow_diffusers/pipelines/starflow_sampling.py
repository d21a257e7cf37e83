# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The noise -> data solve shared by every STARFlow pipeline (video and image).

The deep block is solved first, with classifier-free guidance and a KV cache holding the text prefix; the
shallow blocks are then inverted without guidance (per frame for released video models); the result is
denoised with the learned denoiser or one score step. Images are handled as one-frame videos.

The mixin also holds what the text-to-video and text-to-image pipelines share around the solve: the prompt
template and text encoding, input validation, frame-size resolution and the initial noise. The input
checks themselves live in `inputs.py`, the template in `prompt_template.py`, and streaming (frames as they
become final) in `streaming.py`.
"""

import contextlib
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..models.transformer_starflow_v import DENOISER_STEP, StarFlowFlowBlock, rotary_phases
from ..schedulers.scheduling_jacobi_flow import FlowChunk, flow_guidance
from .inputs import (
    DENOISE_MODES,
    OUTPUT_TYPES,
    PIXEL_CHANNELS,
    _is_finite_number,
    check_finite,
    check_sizes,
    closest_trained_aspect_ratio,
    frame_size_for_aspect_ratio,
    parse_aspect_ratio,
)
from .prompt_template import format_prompt


logger = logging.get_logger(__name__)

class FlowSolveDivergedError(FloatingPointError):
    """A flow block's solve produced non-finite values (raised at the chunk where they first appear)."""

    def __init__(self, block_index: int, num_blocks: int, chunk, iteration: int):
        kind = "deep block" if block_index == num_blocks - 1 else f"shallow block {block_index}"
        super().__init__(
            f"The noise -> data solve of the {kind} produced non-finite values at tokens [{chunk.start}, "
            f"{chunk.end}) (iteration {iteration}). Try a lower `guidance_scale`, the exact "
            f"`JacobiFlowScheduler(mode='sequential')`, or running the transformer in float32."
        )
        self.block_index, self.chunk, self.iteration = block_index, chunk, iteration


class FlowGuidance(NamedTuple):
    """Classifier-free guidance of a solve, in one place: the [conditional; unconditional] batch the network
    runs and the flow-guidance combination of its outputs (spec section 5). `weight` None: no guidance batch;
    a weight of 0 (guidance switched off mid-solve) keeps the conditional half."""

    weight: Optional[float] = None

    @property
    def enabled(self) -> bool:
        return self.weight is not None

    def batch(self, inputs: torch.Tensor) -> torch.Tensor:
        """The same inputs for both halves."""
        return torch.cat([inputs, inputs]) if self.enabled else inputs

    def text(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: Optional[torch.Tensor], dtype) -> torch.Tensor:
        text = torch.cat([prompt_embeds, negative_prompt_embeds]) if self.enabled else prompt_embeds
        return text.to(dtype)

    def combine(self, params: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The guided (shift, scale) of the network's output for the batch."""
        return flow_guidance(*params, self.weight) if self.enabled else params


NO_GUIDANCE = FlowGuidance()


class StarFlowSamplingMixin:
    """Flow inversion for pipelines with `transformer` (StarFlowVTransformer) and `scheduler`
    (JacobiFlowScheduler) components. Pipelines set `_guidance_scale`, `_attention_kwargs` and `_interrupt`
    at the start of a call (`_start_call`).

    The text helpers expect optional `tokenizer`/`text_encoder`/`vae` components, a `vae_scale_factor_spatial`
    attribute and the config entries `noise_level_conditioning`, `noise_level`, `aspect_ratio_conditioning`,
    `default_aspect_ratio`, `base_frame_size` and `max_text_length`. Pipelines register the last ones at
    `__init__` (`standalone_text_settings`), so the text helpers need no transformer."""

    @classmethod
    def from_single_file(
        cls, checkpoint_path: str, config: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None, **components
    ):
        r"""
        A pipeline around an original checkpoint file (see [`StarFlowVTransformer.from_single_file`] for
        `checkpoint_path`, `config` and `torch_dtype`). With the original YAML as `config`, its conditioning
        settings become the pipeline config, as `starflow-convert` writes them. `components` are the other
        parts: `vae`, `text_encoder`, `tokenizer` (e.g. loaded with their own `from_pretrained`) and
        `scheduler` (default: one consistent with the model).

        Examples:
            ```py
            >>> from diffusers import AutoencoderKLWan
            >>> from transformers import AutoTokenizer, T5EncoderModel

            >>> pipe = StarFlowVPipeline.from_single_file(
            ...     "starflow-v_7B_t2v_caus_480p.pth", config="starflow-v_7B_t2v_caus_480p.yaml",
            ...     torch_dtype=torch.bfloat16,
            ...     vae=AutoencoderKLWan.from_pretrained("Wan-AI/Wan2.2-TI2V-5B-Diffusers", subfolder="vae"),
            ...     text_encoder=T5EncoderModel.from_pretrained("google/flan-t5-xl", torch_dtype=torch.bfloat16),
            ...     tokenizer=AutoTokenizer.from_pretrained("google/flan-t5-xl"),
            ... )
            ```
        """
        from ..conversion.convert_starflow import pipeline_from_single_file

        return pipeline_from_single_file(cls, checkpoint_path, config, torch_dtype, components)

    # ---- properties diffusers users rely on ----------------------------------------------------------

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def attention_kwargs(self) -> Optional[Dict[str, Any]]:
        return self._attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def noise_std(self) -> float:
        """The transformer's training noise sigma, which sampling, denoising and the likelihood use."""
        return float(self.transformer.config.noise_std)

    @property
    def models_pixels(self) -> bool:
        """Whether the transformer models RGB pixels rather than VAE latents: a property of its config, not of
        whether a VAE is loaded (a latent model loaded with `vae=None` still works in latent space)."""
        return self.transformer.config.in_channels == PIXEL_CHANNELS

    @staticmethod
    def standalone_text_settings(
        transformer, noise_level: Optional[float], max_text_length: Optional[int]
    ) -> Dict[str, Any]:
        """The prompt template's noise level and the padding length, from the arguments or else from the
        transformer, for the pipeline's config: `encode_prompt` then needs only the tokenizer and text encoder."""
        if noise_level is not None and not (_is_finite_number(noise_level) and noise_level >= 0):
            raise ValueError(f"`noise_level` must be None or a finite number >= 0, got {noise_level!r}.")
        check_sizes(max_text_length=max_text_length)
        if transformer is not None:
            noise_level = float(transformer.config.noise_std) if noise_level is None else noise_level
            max_text_length = max_text_length or transformer.config.max_text_length
        return dict(noise_level=noise_level, max_text_length=max_text_length)

    def _require_vae(self, what: str) -> None:
        if self.vae is None:
            raise ValueError(
                f"{what} needs the VAE: this pipeline was loaded without one and its transformer models "
                f"{self.transformer.config.in_channels}-channel latents, not pixels."
            )

    @property
    def spatial_multiple(self) -> int:
        """Pixel sizes must be multiples of this (VAE factor x patch size)."""
        return self.vae_scale_factor_spatial * self.transformer.config.patch_size

    @property
    def default_base_frame_size(self) -> int:
        return self.config.base_frame_size or self.transformer.config.sample_size * self.spatial_multiple

    @property
    def text_length(self) -> int:
        if self.config.max_text_length:
            return self.config.max_text_length
        if self.transformer is None:
            raise ValueError(
                "The text length comes from `max_text_length` in the pipeline config or from the transformer; "
                "this pipeline has neither: pass `max_sequence_length`."
            )
        return self.transformer.config.max_text_length

    def default_prompt_aspect_ratio(self) -> str:
        """The aspect ratio `__call__` states in the prompt when no size is given: the trained ratio of the
        default frame size. Without a transformer that size cannot be rounded to the latent grid (its patch
        size is unknown): then the trained ratio closest to `default_aspect_ratio`."""
        if self.transformer is not None:
            return self._resolve_frame_size(None, None, None)[2]
        return closest_trained_aspect_ratio(parse_aspect_ratio(self.config.default_aspect_ratio), 1.0)

    def _encode_text(self, texts: List[str], max_sequence_length: int, device) -> torch.Tensor:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("This pipeline has no `tokenizer`/`text_encoder`; pass `prompt_embeds` instead of `prompt`.")
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        # padding positions are zeroed, as the model was trained
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    def _apply_template(self, prompts: List[str], aspect_ratio: Optional[str], fps: Optional[int] = None) -> List[str]:
        """The conditioning template of the released models (spec section 6), in its order: the fps line
        (only when `fps` is not None), then the noise level and the aspect ratio as the config enables them."""
        noise_level = None
        if self.config.noise_level_conditioning:
            noise_level = self.config.noise_level
            if noise_level is None:
                raise ValueError(
                    "The prompt template states the noise level: set `noise_level` in the pipeline config, "
                    "or load the pipeline with its transformer."
                )
        aspect_ratio = aspect_ratio if self.config.aspect_ratio_conditioning else None
        return [format_prompt(text, fps, noise_level, aspect_ratio) for text in prompts]

    def _encode_prompt_pair(
        self,
        prompt: Union[str, List[str], None],
        negative_prompt: Union[str, List[str], None],
        do_classifier_free_guidance: bool,
        num_per_prompt: int,
        prompt_embeds: Optional[torch.Tensor],
        negative_prompt_embeds: Optional[torch.Tensor],
        template: Callable[[List[str]], List[str]],
        max_sequence_length: Optional[int],
        device: Optional[torch.device],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Templated (`template`), encoded and masked embeddings of the prompts and, with guidance, of the
        negative prompts ("" by default), each repeated `num_per_prompt` times. Given embeddings are used as
        they are (no template)."""
        device = device or self._execution_device
        length = max_sequence_length or self.text_length
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._encode_text(template(prompt), length, device)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt if negative_prompt is not None else ""
            negative_prompt = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negative_prompt) != batch:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but there are {batch} prompts."
                )
            negative_prompt_embeds = self._encode_text(template(negative_prompt), prompt_embeds.shape[1], device)
        # in the text encoder's dtype: the transformer's calls cast them to its compute dtype
        prompt_embeds = prompt_embeds.to(device).repeat_interleave(num_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device).repeat_interleave(num_per_prompt, 0)
        else:
            negative_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds

    # ---- checks and sizes -------------------------------------------------------------------------------

    def _check_call_inputs(
        self,
        prompt,
        negative_prompt,
        sizes: Dict[str, Optional[int]],
        guidance_scale,
        num_per_prompt: Tuple[str, Any],
        latents,
        latent_axes: Sequence[str],
        prompt_embeds,
        negative_prompt_embeds,
        denoise,
        output_type,
        callback_on_step_end_tensor_inputs,
        max_sequence_length=None,
    ) -> None:
        """Argument checks shared by the pipelines. `sizes` maps argument names to positive sizes (or None),
        `num_per_prompt` is (argument name, value) and `latent_axes` names the latents' axes after
        (batch, channels)."""
        if max_sequence_length is not None and (not isinstance(max_sequence_length, int) or max_sequence_length < 1):
            raise ValueError(f"`max_sequence_length` must be a positive integer, got {max_sequence_length!r}.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        if prompt is not None:
            if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
            if isinstance(prompt, list) and len(prompt) == 0:
                raise ValueError("`prompt` is an empty list; pass at least one prompt.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {type(negative_prompt).__name__}.")
        self._check_text_embeds(prompt_embeds, negative_prompt_embeds, max_sequence_length)
        if not _is_finite_number(guidance_scale) or guidance_scale < 1:
            raise ValueError(f"`guidance_scale` must be a finite number >= 1 (1 disables guidance), got {guidance_scale!r}.")
        name, value = num_per_prompt
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        check_sizes(**sizes)
        if denoise not in DENOISE_MODES:
            raise ValueError(f"`denoise` must be one of {DENOISE_MODES}, got {denoise!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if output_type != "latent" and self.vae is None and not self.models_pixels:
            raise ValueError(
                f"`output_type={output_type!r}` decodes with the VAE, and this pipeline has none (its transformer "
                f"models latents, not pixels); use `output_type='latent'` or load the VAE."
            )
        channels = self.transformer.config.in_channels
        if latents is not None and (latents.ndim != 2 + len(latent_axes) or latents.shape[1] != channels):
            raise ValueError(f"`latents` must be (batch, {channels}, {', '.join(latent_axes)}), got {tuple(latents.shape)}.")
        check_finite(latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` entries {unknown} are not in {self._callback_tensor_inputs}.")

    def _check_text_embeds(self, prompt_embeds, negative_prompt_embeds, max_sequence_length=None) -> None:
        text_dim = self.transformer.config.text_embed_dim
        # text positions are scaled by the text length, so embeddings must have the trained length
        text_length = max_sequence_length or self.text_length
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (embeds.ndim != 3 or embeds.shape[1:] != (text_length, text_dim)):
                raise ValueError(
                    f"`{name}` must be (batch, {text_length}, {text_dim}) (pad or truncate to the text length), "
                    f"got {tuple(embeds.shape)}."
                )
        if prompt_embeds is not None and negative_prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
            )

    def _resolve_frame_size(
        self,
        height: Optional[int],
        width: Optional[int],
        aspect_ratio: Optional[str],
        latent_size: Optional[Tuple[int, int]] = None,
    ) -> Tuple[int, int, str]:
        """Pixel (height, width), rounded down to `spatial_multiple` with a warning, and the aspect-ratio string.

        Missing sizes come from the latents' (height, width) `latent_size`, else from `aspect_ratio` (or the
        configured default) at the trained frame area; a missing aspect ratio is the trained one closest to
        width/height."""
        spatial = self.spatial_multiple
        if latent_size is not None:
            h, w = latent_size
            p = self.transformer.config.patch_size
            if h % p or w % p:
                raise ValueError(f"`latents` height and width must be divisible by patch_size={p}, got {h}x{w}.")
            height = height or h * self.vae_scale_factor_spatial
            width = width or w * self.vae_scale_factor_spatial
        if height is None or width is None:
            ratio = aspect_ratio or self.config.default_aspect_ratio
            default_h, default_w = frame_size_for_aspect_ratio(ratio, self.default_base_frame_size, spatial)
            height, width = height or default_h, width or default_w
        for name, value in (("height", height), ("width", width)):
            if value < spatial:
                raise ValueError(f"`{name}`={value} is smaller than one latent cell ({spatial} pixels).")
        if height % spatial or width % spatial:
            new_h, new_w = height // spatial * spatial, width // spatial * spatial
            logger.warning(f"`height` and `width` must be multiples of {spatial}; using {new_h}x{new_w} instead of {height}x{width}.")
            height, width = new_h, new_w
        if aspect_ratio is None:
            aspect_ratio = closest_trained_aspect_ratio(width, height)
        else:
            parse_aspect_ratio(aspect_ratio)
        return height, width, aspect_ratio

    # ---- call set-up ------------------------------------------------------------------------------------

    def _start_call(self, guidance_scale: float, attention_kwargs: Optional[Dict[str, Any]], denoise: str) -> str:
        """Reset the per-call state; returns the denoising mode with "auto" resolved: the pipeline config's
        `default_denoise`, whose own "auto" is the learned denoiser if the model has one, else "score"."""
        if denoise == "auto":
            denoise = self.config.default_denoise
        if denoise == "auto":
            denoise = "learned" if self.transformer.has_denoiser else "score"
        if denoise == "learned" and not self.transformer.has_denoiser:
            raise ValueError("`denoise='learned'` needs a model with a learned denoiser; use 'score' or 'none'.")
        scale = (attention_kwargs or {}).get("scale")
        if scale is not None and not _is_finite_number(scale):
            raise ValueError(f"`attention_kwargs['scale']` (the LoRA scale) must be a finite number, got {scale!r}.")
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        return denoise

    def prepare_noise(
        self,
        shape: Tuple[int, ...],
        device,
        generator: Union[torch.Generator, List[torch.Generator], None],
        latents: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The float32 Gaussian noise z to invert: `latents` checked against `shape`, or drawn."""
        if latents is not None:
            if latents.shape != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"`generator` is a list of {len(generator)} but the batch is {shape[0]}.")
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    # ---- the flow inversion ---------------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (`transformer.dtype`, which diffusers' layerwise casting
        reports as its compute dtype). The lookup walks every module, so a solve holds it for its duration
        (`_holding_compute_dtype`)."""
        return getattr(self, "_compute_dtype", None) or self.transformer.dtype

    @contextlib.contextmanager
    def _solving(self):
        """What a whole solve holds: the compute dtype, and the LoRA scale of the call's `attention_kwargs`."""
        with self._holding_compute_dtype(), lora_scale(self.transformer, (self._attention_kwargs or {}).get("scale")):
            yield

    @contextlib.contextmanager
    def _holding_compute_dtype(self):
        previous = getattr(self, "_compute_dtype", None)
        self._compute_dtype = previous or self.transformer.dtype
        try:
            yield
        finally:
            self._compute_dtype = previous

    def _to_block_tokens(self, latents: torch.Tensor, block: StarFlowFlowBlock) -> torch.Tensor:
        """(B, C, T, H, W) -> float32 (B, T*F, D) tokens in `block`'s order."""
        tokens = self.transformer.patchify(latents).float()
        b, t, hp, wp, d = tokens.shape
        return block.permute(tokens.reshape(b, t, hp * wp, d)).reshape(b, t * hp * wp, d)

    def _from_block_tokens(self, tokens: torch.Tensor, block: StarFlowFlowBlock, grid) -> torch.Tensor:
        b, t, hp, wp = grid
        tokens = block.permute(tokens.reshape(b, t, hp * wp, -1))
        return self.transformer.unpatchify(tokens.reshape(b, t, hp, wp, -1), video=True)

    def solve_chunk(
        self,
        block_index: int,
        chunk: FlowChunk,
        state: torch.Tensor,
        noise: torch.Tensor,
        cache,
        rotary,
        guidance: FlowGuidance = NO_GUIDANCE,
    ) -> None:
        """Fixed-point iterations of one chunk of block `block_index`; `state` is updated in place. The network
        runs in the transformer's compute dtype.

        With per-sequence convergence (`convergence="sample"`), a converged sequence is fed the inputs it
        converged with while the others go on, so its values and cache entries stay those of its converging
        iteration: exactly what it would get alone."""
        scheduler = self.scheduler
        threshold = scheduler.threshold_for(block_index in (-1, len(self.transformer.blocks) - 1))
        if scheduler.config.mode == "adaptive":
            return self._solve_chunk_adaptive(block_index, chunk, state, noise, cache, rotary, guidance, threshold)
        dtype = self.compute_dtype
        replay = scheduler.sequences_independent and state.shape[0] > 1
        converged, converged_inputs = None, None
        for iteration in range(scheduler.iterations_per_chunk):
            inputs, prepend_sos = scheduler.chunk_inputs(state, chunk, iteration)
            if converged is not None:
                inputs = torch.where(converged[:, None, None], converged_inputs, inputs)
            elif replay:
                # a view of `state`, which the step overwrites: a sequence converging now must replay the
                # values it was fed
                inputs = inputs.clone()
            length = cache.length
            params = self.transformer.evaluate_block(
                block_index, guidance.batch(inputs).to(dtype), cache, rotary, prepend_sos=prepend_sos
            )
            output = scheduler.step(guidance.combine(params), chunk, state, noise, iteration, threshold=threshold)
            if output.diverged:
                raise FlowSolveDivergedError(block_index, len(self.transformer.blocks), chunk, iteration)
            if output.converged:
                return
            if replay:
                below = output.residual < threshold
                converged = below if converged is None else converged | below
                converged_inputs = inputs
            cache.truncate(length)

    def _solve_chunk_adaptive(
        self, block_index: int, chunk: FlowChunk, state, noise, cache, rotary, guidance: FlowGuidance, threshold: float
    ) -> None:
        """`mode="adaptive"`: a sliding window per sequence over the chunk; see `JacobiFlowScheduler`.

        One network call evaluates the union of the sequences' windows. A sequence whose frontier is ahead of
        the others is fed, at its committed positions, the inputs it committed them with, so its values and
        cache entries are what it would get alone."""
        scheduler = self.scheduler
        dtype = self.compute_dtype
        scheduler.warm_start(state, chunk)
        batch = state.shape[0]
        frontiers = [chunk.start] * batch  # on the host: the step returns them with its one sync
        evaluations = torch.zeros(state.shape[:2], dtype=torch.int32, device=state.device)
        # fed[:, p]: the input position p was last evaluated with (only a batch can need it again)
        fed = torch.empty_like(state) if batch > 1 else None
        base = cache.length
        while min(frontiers) < chunk.end:
            lowest, highest = scheduler.evaluation_range(chunk, frontiers)
            inputs, prepend_sos = scheduler.shifted_inputs(state, lowest, highest)
            if fed is not None:
                first = max(lowest, 1)  # position 0's input is the SOS vector
                positions = torch.arange(first, highest, device=state.device)
                frontier = torch.tensor(frontiers, device=state.device)
                committed = (positions[None] < frontier[:, None])[..., None]
                inputs = torch.where(committed, fed[:, first:highest], inputs)
                fed[:, first:highest] = inputs
            cache.truncate(base + lowest - chunk.start)
            params = self.transformer.evaluate_block(
                block_index, guidance.batch(inputs).to(dtype), cache, rotary, prepend_sos=prepend_sos
            )
            output = scheduler.step_adaptive(
                guidance.combine(params), chunk, state, noise, frontiers, evaluations, threshold=threshold
            )
            if output.diverged:
                raise FlowSolveDivergedError(block_index, len(self.transformer.blocks), chunk, int(evaluations.max()))
            frontiers = output.frontier

    def invert_shallow_blocks(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """Invert shallow blocks K-2 ... 0 (no text, no guidance); tokens are (B, T, F, D) float32."""
        b, t, hp, wp = grid
        per_frame = self.transformer.config.shallow_blocks_per_frame
        frames = 1 if per_frame else t
        chunks = self.scheduler.plan(hp * wp, frames)
        rotary = rotary_phases(self.transformer.rotary_embedding(frames, hp, wp, 0, tokens.device))
        shallow = self.transformer.shallow_blocks
        with self._holding_compute_dtype():
            for index in reversed(range(len(shallow))):
                block = shallow[index]
                seqs = block.permute(tokens).reshape(b * t // frames, frames * hp * wp, -1)
                noise, state = seqs, seqs.clone()
                cache = block.init_cache(state.shape[0], frames * hp * wp)
                for chunk in chunks:
                    self.solve_chunk(index, chunk, state, noise, cache, rotary)
                tokens = block.permute(state.reshape(b, t, hp * wp, -1))
        return tokens

    def _denoise_window_starts(self, num_frames: int, window: int) -> List[int]:
        """First frames of the windows `denoise_latents` denoises: `window` frames each (the last one may be
        cut), overlapping by the denoiser's look-back, until every frame is covered."""
        overlap = min(self.transformer.config.denoiser_window or (window - 1), window - 1)
        return list(range(0, max(num_frames - overlap, 1), window - overlap))

    def _denoise_windows(self, out, prompt_embeds, mode, window, starts, written) -> int:
        """Denoise `out` (B, C, T, H, W) in place, window after window from `starts`; each window starts from
        the already denoised frames [.., written) and writes the frames after them. Returns the new `written`."""
        for start in starts:
            if written >= out.shape[2]:
                break
            chunk = self._denoise_chunk(out[:, :, start : start + window], prompt_embeds, mode)
            out[:, :, written : start + window] = chunk[:, :, written - start :]
            written = min(start + window, out.shape[2])
        return written

    def denoise_latents(
        self, latents: torch.Tensor, prompt_embeds: torch.Tensor, mode: str, window: Optional[int] = None
    ) -> torch.Tensor:
        """Remove the training noise from sampled latents, in windows along time (spec section 4).

        `window`: frames per window; default the solve's local window, else all frames."""
        if mode == "none":
            return latents
        window = window or self.scheduler.window_frames or latents.shape[2]
        out = latents.clone()
        self._denoise_windows(out, prompt_embeds, mode, window, self._denoise_window_starts(out.shape[2], window), 0)
        return out

    def _denoise_chunk(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, mode: str) -> torch.Tensor:
        dtype = self.compute_dtype
        if mode == "learned":
            prediction = self.transformer.denoise(latents.to(dtype), prompt_embeds.to(dtype))
            return latents - DENOISER_STEP * prediction.float()
        # one step along the model's score: x - sigma^2 * numel * grad(loss)
        with torch.enable_grad():
            x = latents.to(dtype).detach().requires_grad_(True)
            model_input = x if self.transformer.config.is_video else x[:, :, 0]
            loss = self.transformer.nll_loss(self.transformer(model_input, prompt_embeds.to(dtype)))
            (grad,) = torch.autograd.grad(loss, x)
        return latents - self.noise_std**2 * latents.numel() * grad.float()

    def _solve_deep_block(
        self,
        noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        context_latents: Optional[torch.Tensor] = None,
    ) -> Iterator["DeepSolveProgress"]:
        """The deep block's solve with guidance, chunk by chunk. Yields its progress once the known frames
        are in place and after every chunk; the state is the float32 (B, T*F, D) token state in the deep
        block's order, updated in place."""
        transformer, deep = self.transformer, self.transformer.deep_block
        b, _, t, h, w = noise.shape
        p = transformer.config.patch_size
        grid = (b, t, h // p, w // p)
        per_frame = grid[2] * grid[3]
        text_length = prompt_embeds.shape[1]
        cfg_batch = negative_prompt_embeds is not None

        def guidance() -> FlowGuidance:
            # the guidance scale may change between chunks (a step-end callback); the batch may not
            return FlowGuidance(max(self._guidance_scale - 1.0, 0.0) if cfg_batch else None)

        prefix_tokens = 0 if context_latents is None else context_latents.shape[2] * per_frame
        scheduler = self.scheduler
        scheduler.set_timesteps(
            per_frame, t, prefix_tokens, trained_frames=transformer.config.trained_latent_frames, device=noise.device
        )
        self._num_timesteps = scheduler.num_timesteps
        dtype = self.compute_dtype
        text = guidance().text(prompt_embeds, negative_prompt_embeds, dtype)
        # the rotary table once per solve: each chunk then only slices it
        rotary = rotary_phases(transformer.rotary_embedding(t, grid[2], grid[3], text_length, noise.device))
        cache = deep.init_cache(text.shape[0], scheduler.cache_length(per_frame, t, text_length))
        deep_index = len(transformer.blocks) - 1

        z = self._to_block_tokens(noise, deep)
        state = z.clone()
        transformer.evaluate_block(deep_index, None, cache, rotary, text=text)
        if context_latents is not None:
            # the known frames in the deep block's input space, then into its cache
            tokens, _ = transformer.forward_shallow(context_latents.to(dtype))
            state[:, :prefix_tokens] = deep.permute(tokens).reshape(b, prefix_tokens, -1).float()
            context = scheduler.context_inputs(state, (0, prefix_tokens))
            transformer.evaluate_block(
                deep_index, guidance().batch(context).to(dtype), cache, rotary, prepend_sos=True
            )
        yield DeepSolveProgress(state, prefix_tokens // per_frame, prompt_embeds)
        with self.progress_bar(total=scheduler.num_timesteps) as progress_bar:
            for index, chunk in enumerate(scheduler.chunks):
                if self.interrupt:
                    break
                if chunk.context is not None:
                    # a new window: a fresh cache holding the text and the kept frames, one evaluation
                    cache.truncate(0)
                    context = scheduler.context_inputs(state, chunk.context)
                    transformer.evaluate_block(
                        deep_index, guidance().batch(context).to(dtype), cache, rotary, text=text,
                        prepend_sos=True,
                    )
                self.solve_chunk(deep_index, chunk, state, z, cache, rotary, guidance())
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = (
                            self._from_block_tokens(state, deep, grid) if name == "latents" else locals()[name]
                        )
                    outputs = callback_on_step_end(self, index, chunk.start, callback_kwargs) or {}
                    if "latents" in outputs:
                        state = self._to_block_tokens(outputs["latents"], deep)
                    prompt_embeds = outputs.get("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.get("negative_prompt_embeds", negative_prompt_embeds)
                    # new embeddings apply from the next window's text prefix and to denoising
                    text = guidance().text(prompt_embeds, negative_prompt_embeds, dtype)
                    if self._guidance_scale > 1 and not cfg_batch:
                        logger.warning("Guidance cannot be switched on mid-solve without negative embeddings.")
                progress_bar.update()
                yield DeepSolveProgress(state, chunk.end // per_frame, prompt_embeds)

    def _invert_frames(self, state: torch.Tensor, grid, start: int, end: int) -> torch.Tensor:
        """Model-space latents (B, C, end - start, H, W) of frames [start, end) of a deep-block token state."""
        b, t, hp, wp = grid
        deep = self.transformer.deep_block
        tokens = deep.permute(state.reshape(b, t, hp * wp, -1)[:, start:end])
        tokens = self.invert_shallow_blocks(tokens, (b, end - start, hp, wp))
        return self.transformer.unpatchify(tokens.reshape(b, end - start, hp, wp, -1), video=True)

    def sample_latents(
        self,
        noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        denoise: str,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        context_latents: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Invert the flow from noise (B, C, T, H, W) to model-space latents (B, C, T, H, W), then denoise.

        Image models take T = 1. `context_latents` (B, C, Tc, H, W), already noise-augmented, are known
        first frames (image-to-video, extension): they run forward through the shallow blocks into the deep
        block's cache, and the solve continues after them; the output keeps all T frames."""
        b, _, t, h, w = noise.shape
        p = self.transformer.config.patch_size
        with self._solving():
            for progress in self._solve_deep_block(
                noise, prompt_embeds, negative_prompt_embeds, callback_on_step_end,
                callback_on_step_end_tensor_inputs, context_latents,
            ):
                pass
            latents = self._invert_frames(progress.state, (b, t, h // p, w // p), 0, t)
            return self.denoise_latents(latents, progress.prompt_embeds, denoise)


class DeepSolveProgress(NamedTuple):
    """Where the deep block's solve stands: its token state, how many leading frames are solved, and the
    prompt embeddings in use (a step-end callback may replace them)."""

    state: torch.Tensor
    frames_solved: int
    prompt_embeds: torch.Tensor


class lora_scale:
    """Scale PEFT LoRA layers for the duration of a call (diffusers' `attention_kwargs={"scale": s}`)."""

    def __init__(self, model: torch.nn.Module, scale: Optional[float]):
        self.model = model
        self.scale = scale if scale is not None and getattr(model, "_hf_peft_config_loaded", False) else None

    def __enter__(self):
        if self.scale is not None:
            from diffusers.utils import scale_lora_layers

            scale_lora_layers(self.model, self.scale)

    def __exit__(self, *exc):
        if self.scale is not None:
            from diffusers.utils import unscale_lora_layers

            unscale_lora_layers(self.model, self.scale)
