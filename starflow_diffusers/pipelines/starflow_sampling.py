# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The noise -> data solve shared by every STARFlow pipeline (video and image).

The deep block is solved first, with classifier-free guidance and a KV cache holding the text prefix; the
shallow blocks are then inverted without guidance (per frame for released video models); the result is
denoised with the learned denoiser or one score step. Images are handled as one-frame videos.
"""

from typing import Any, Dict, List, Optional

import torch

from diffusers.utils import logging

from ..models.transformer_starflow_v import DENOISER_STEP, StarFlowFlowBlock
from ..schedulers.scheduling_jacobi_flow import FlowChunk


logger = logging.get_logger(__name__)


class StarFlowSamplingMixin:
    """Flow inversion for pipelines with `transformer` (StarFlowVTransformer) and `scheduler`
    (JacobiFlowScheduler) components. Pipelines set `_guidance_scale`, `_attention_kwargs` and `_interrupt`
    at the start of a call."""

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
        return float(self.transformer.config.noise_std)

    @property
    def spatial_multiple(self) -> int:
        """Pixel sizes must be multiples of this (VAE factor x patch size)."""
        return self.vae_scale_factor_spatial * self.transformer.config.patch_size

    @property
    def default_base_frame_size(self) -> int:
        return self.config.base_frame_size or self.transformer.config.sample_size * self.spatial_multiple

    @property
    def text_length(self) -> int:
        return self.config.max_text_length or self.transformer.config.max_text_length

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

    # ---- the flow inversion ---------------------------------------------------------------------------------

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
        block: StarFlowFlowBlock,
        chunk: FlowChunk,
        state: torch.Tensor,
        noise: torch.Tensor,
        cache,
        rotary,
        guidance_weight: float = 0.0,
        cfg_batch: bool = False,
    ) -> None:
        """Fixed-point iterations of one chunk; `state` is updated in place."""
        for iteration in range(self.scheduler.iterations_per_chunk):
            inputs = self.scheduler.chunk_inputs(state, block.sos_embed, chunk, iteration)
            if cfg_batch:
                inputs = torch.cat([inputs, inputs])
            length = cache.length
            params = block.evaluate_chunk(inputs, cache, rotary)
            if self.scheduler.step(params, chunk, state, noise, iteration, guidance_weight).converged:
                return
            cache.truncate(length)

    def invert_shallow_blocks(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """Invert shallow blocks K-2 ... 0 (no text, no guidance); tokens are (B, T, F, D) float32."""
        b, t, hp, wp = grid
        per_frame = self.transformer.config.shallow_blocks_per_frame
        frames = 1 if per_frame else t
        chunks = self.scheduler.plan(hp * wp, frames)
        rotary = self.transformer.rotary_embedding(frames, hp, wp, 0, tokens.device)
        for block in reversed(self.transformer.shallow_blocks):
            seqs = block.permute(tokens).reshape(b * t // frames, frames * hp * wp, -1)
            noise, state = seqs, seqs.clone()
            cache = block.init_cache(state.shape[0], frames * hp * wp, device=tokens.device)
            for chunk in chunks:
                self.solve_chunk(block, chunk, state, noise, cache, rotary)
            tokens = block.permute(state.reshape(b, t, hp * wp, -1))
        return tokens

    def denoise_latents(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, mode: str) -> torch.Tensor:
        """Remove the training noise from sampled latents, in windows along time (spec section 4)."""
        if mode == "none":
            return latents
        window = self.scheduler.window_frames or latents.shape[2]
        overlap = min(self.transformer.config.denoiser_window or (window - 1), window - 1)
        out, start, written = latents.clone(), 0, 0
        while written < latents.shape[2]:
            chunk = out[:, :, start : start + window]
            chunk = self._denoise_chunk(chunk, prompt_embeds, mode)
            out[:, :, written : start + window] = chunk[:, :, written - start :]
            written = min(start + window, latents.shape[2])
            start += window - overlap
        return out

    def _denoise_chunk(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, mode: str) -> torch.Tensor:
        dtype = self.transformer.dtype
        if mode == "learned":
            prediction = self.transformer.denoise(latents.to(dtype), prompt_embeds)
            return latents - DENOISER_STEP * prediction.float()
        # one step along the model's score: x - sigma^2 * numel * grad(loss)
        with torch.enable_grad():
            x = latents.to(dtype).detach().requires_grad_(True)
            model_input = x if self.transformer.config.is_video else x[:, :, 0]
            loss = self.transformer.nll_loss(self.transformer(model_input, prompt_embeds))
            (grad,) = torch.autograd.grad(loss, x)
        return latents - self.noise_std**2 * latents.numel() * grad.float()

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
        transformer, deep = self.transformer, self.transformer.deep_block
        b, _, t, h, w = noise.shape
        p = transformer.config.patch_size
        grid = (b, t, h // p, w // p)
        per_frame = grid[2] * grid[3]
        text_length = prompt_embeds.shape[1]
        cfg_batch = negative_prompt_embeds is not None

        prefix_tokens = 0 if context_latents is None else context_latents.shape[2] * per_frame
        scheduler = self.scheduler
        scheduler.set_timesteps(
            per_frame, t, prefix_tokens, trained_frames=transformer.config.trained_latent_frames, device=noise.device
        )
        self._num_timesteps = scheduler.num_timesteps
        text = torch.cat([prompt_embeds, negative_prompt_embeds]) if cfg_batch else prompt_embeds
        rotary = transformer.rotary_embedding(t, grid[2], grid[3], text_length, noise.device)
        cache = deep.init_cache(text.shape[0], scheduler.cache_length(per_frame, t, text_length), device=noise.device)

        with _lora_scale(transformer, (self._attention_kwargs or {}).get("scale")):
            z = self._to_block_tokens(noise, deep)
            state = z.clone()
            deep.prefill_text(text, cache, rotary)
            if context_latents is not None:
                # the known frames in the deep block's input space, then into its cache
                tokens = transformer.patchify(context_latents.to(transformer.dtype))
                tokens = tokens.reshape(b, context_latents.shape[2], per_frame, -1)
                tokens, _ = transformer.forward_shallow(tokens, grid[2:])
                state[:, :prefix_tokens] = deep.permute(tokens).reshape(b, prefix_tokens, -1).float()
                context = scheduler.context_inputs(state, deep.sos_embed, (0, prefix_tokens))
                deep.evaluate_chunk(torch.cat([context, context]) if cfg_batch else context, cache, rotary)
            with self.progress_bar(total=scheduler.num_timesteps) as progress_bar:
                for index, chunk in enumerate(scheduler.chunks):
                    if self.interrupt:
                        break
                    if chunk.context is not None:
                        cache.truncate(0)
                        deep.prefill_text(text, cache, rotary)
                        context = scheduler.context_inputs(state, deep.sos_embed, chunk.context)
                        deep.evaluate_chunk(torch.cat([context, context]) if cfg_batch else context, cache, rotary)
                    weight = max(self._guidance_scale - 1.0, 0.0) if cfg_batch else 0.0
                    self.solve_chunk(deep, chunk, state, z, cache, rotary, weight, cfg_batch)
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
                        text = torch.cat([prompt_embeds, negative_prompt_embeds]) if cfg_batch else prompt_embeds
                        if self._guidance_scale > 1 and not cfg_batch:
                            logger.warning("Guidance cannot be switched on mid-solve without negative embeddings.")
                    progress_bar.update()
            del cache
            tokens = self.invert_shallow_blocks(deep.permute(state.reshape(b, t, per_frame, -1)), grid)
            latents = transformer.unpatchify(tokens.reshape(b, t, grid[2], grid[3], -1), video=True)
            latents = self.denoise_latents(latents, prompt_embeds, denoise)
        return latents



class _lora_scale:
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
