# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Streaming causal generation for the STARFlow-V pipelines: frames as soon as they are final.

The deep block solves the video chunk by chunk in time order; the shallow blocks of a frame, its denoising
and its decoding only need the frames up to it (plus the denoiser's look-ahead), so each frame can be
handed out once those are done. `StarFlowVPipeline.stream` (and `__call__(..., stream=True)`) yields them;
together the items equal the non-streamed output.
"""

from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify as wan_unpatchify

from .starflow_sampling import DeepSolveProgress


class StarFlowVStreamingMixin:
    """Streaming for pipelines with the `StarFlowSamplingMixin` solve and a Wan VAE (or pixel space)."""

    def stream(self, *args, **kwargs) -> Iterator[Union[np.ndarray, torch.Tensor, List[List[Any]]]]:
        r"""
        Generate a video as a stream: takes the arguments of `__call__` (except `return_dict`) and returns a
        generator of output frames, yielded as soon as they are final. Arguments are checked and the prompt is
        encoded before it returns.

        Each item holds the next frames of `__call__(...).frames` for the same arguments, in its format: a
        (B, n, H, W, 3) array for `output_type="np"`, (B, n, 3, H, W) for "pt", B lists of n images for "pil",
        (B, C, n, h, w) latents for "latent"; concatenated along the frame axis, the items equal the
        non-streamed output. Items are whole latent frames: with the Wan VAE the first latent frame gives one
        video frame and every later one gives four.

        When a frame is final: the deep block has solved the frame and, with denoising, what the denoiser looks
        at (see `final_frames`): R = denoiser layers x `denoiser_lookahead` frames ahead for `denoise="learned"`,
        its whole window for "score". The shallow blocks of a frame run as soon as the deep block has solved it
        when frames are independent there: per-frame shallow blocks (released models) solved sequentially, with
        `mode="adaptive"`, or with the default `JacobiFlowScheduler(convergence="sample")`. With `mode="jacobi"`
        and `convergence="batch"` (the original's rule, which couples the frames) nothing is final before the
        deep block has solved the whole video.

        Frames are decoded causally, one latent frame at a time, with the Wan VAE's feature cache (VAE tiling
        must be off). A `callback_on_step_end` that returns new `latents` or embeddings only changes frames not
        yielded yet.

        Examples:
            ```py
            >>> for frames in pipe.stream("a corgi running on the beach at sunset", guidance_scale=4.5):
            ...     show(frames[0])  # (n, H, W, 3) in [0, 1]
            ```
        """
        if "return_dict" in kwargs:
            raise ValueError("`stream` yields frames; it takes no `return_dict`.")
        return self(*args, stream=True, **kwargs)

    @torch.no_grad()
    def _stream_frames(
        self, latents, prompt_embeds, negative_prompt_embeds, denoise, output_type, callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ):
        decode = self._causal_decoder(latents.shape[3:], output_type)
        for frames in self.stream_latents(
            latents, prompt_embeds, negative_prompt_embeds, denoise, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        ):
            yield decode(frames)
        self.maybe_free_model_hooks()

    def _causal_decoder(self, latent_size: Tuple[int, int], output_type: str) -> Callable[[torch.Tensor], Any]:
        """A function decoding consecutive model-space latent frames (B, C, n, h, w), first frame first, exactly
        as `decode_latents` decodes them together."""
        if output_type == "latent":
            return lambda latents: latents
        if self.models_pixels:
            return lambda latents: self.decode_latents(latents, output_type)
        self._require_vae(f"`output_type={output_type!r}`")
        vae = self.vae
        if not isinstance(vae, AutoencoderKLWan):
            raise ValueError(f"Streaming decodes with the Wan VAE's causal feature cache; got a {type(vae).__name__}.")
        ratio = vae.spatial_compression_ratio
        if vae.use_tiling and (
            latent_size[0] > vae.tile_sample_min_height // ratio or latent_size[1] > vae.tile_sample_min_width // ratio
        ):
            raise ValueError("Streaming decodes one latent frame at a time: call `pipe.vae.disable_tiling()`.")
        if hasattr(vae, "_hf_hook") and hasattr(vae._hf_hook, "pre_forward"):
            vae._hf_hook.pre_forward(vae)  # model offloading: what `vae.decode` does first
        vae.clear_cache()
        # our own reference: a later `clear_cache` (another decode) rebinds `vae._feat_map`, not this list
        feature_cache, seen = vae._feat_map, []

        def decode(latents: torch.Tensor):
            # denormalisation scales every frame but the video's first one
            seen.append(latents)
            vae_latents = self.denormalize_latents(torch.cat(seen, dim=2))[:, :, -latents.shape[2] :]
            x = vae.post_quant_conv(vae_latents.to(vae.dtype))
            first = len(seen) == 1
            video = []
            for i in range(x.shape[2]):
                # `AutoencoderKLWan._decode`, one latent frame at a time
                start = first and i == 0
                video.append(vae.decoder(x[:, :, i : i + 1], feat_cache=feature_cache, feat_idx=[0], first_chunk=start))
            video = torch.cat(video, dim=2)
            if vae.config.patch_size is not None:
                video = wan_unpatchify(video, patch_size=vae.config.patch_size)
            return self.video_processor.postprocess_video(video.clamp(-1, 1).float(), output_type=output_type)

        return decode

    def final_frames(self, solved: int, num_frames: int, denoise: str, window: Optional[int] = None) -> int:
        """How many leading frames of the output are final once the first `solved` frames have been inverted
        through every block (`stream_latents` yields them; later frames cannot change them):

        * `denoise="none"`: the solved frames.
        * "learned": the frames of complete denoising windows, and frames at least R = denoiser layers x
          `denoiser_lookahead` frames before the last solved one (each layer sees that many frames ahead).
        * "score": the frames of complete denoising windows (the score step differentiates through it all).
        """
        if solved >= num_frames or denoise == "none":
            return min(solved, num_frames)
        window = window or self.scheduler.window_frames or num_frames
        ends = [min(start + window, num_frames) for start in self._denoise_window_starts(num_frames, window)]
        complete = max([end for end in ends if end <= solved], default=0)
        if denoise == "score":
            return complete
        config = self.transformer.config
        return max(complete, solved - config.denoiser_num_layers * config.denoiser_lookahead)

    def stream_latents(
        self,
        noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor],
        denoise: str,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        context_latents: Optional[torch.Tensor] = None,
    ) -> Iterator[torch.Tensor]:
        """`sample_latents` as a generator of its output frames (B, C, n, H, W), in order, each as soon as it is
        final (`final_frames`); together they equal `sample_latents`'s output.

        Deep/shallow pipelining: the shallow blocks of a frame are inverted right after the deep block's chunk
        that completes it. That needs frames whose shallow inversion does not depend on other frames:
        per-frame shallow blocks solved with a rule that keeps sequences apart (`sequences_independent`: any mode
        but `jacobi` with `convergence="batch"`). Otherwise (the original's batch-wide Jacobi rule couples the
        frames) the frames are inverted once the deep block is
        done, then denoised and yielded one denoising window at a time."""
        b, _, t, h, w = noise.shape
        p = self.transformer.config.patch_size
        grid = (b, t, h // p, w // p)
        scheduler = self.scheduler
        independent = self.transformer.config.shallow_blocks_per_frame and scheduler.sequences_independent
        # the denoising windows of `sample_latents`: the solve's local window (set by the solve), else all frames
        window = scheduler.resolve_window(t, self.transformer.config.trained_latent_frames) or t
        starts = self._denoise_window_starts(t, window)
        # `out` holds the denoised frames of complete windows [0, written) and the inverted, not yet denoised
        # frames [written, inverted)
        out = noise.new_zeros(noise.shape)
        inverted = emitted = written = complete_windows = 0

        def advance(progress: DeepSolveProgress, solved: int) -> Iterator[torch.Tensor]:
            nonlocal inverted, emitted, written, complete_windows
            if solved > inverted:
                out[:, :, inverted:solved] = self._invert_frames(progress.state, grid, inverted, solved)
                inverted = solved
            frames = out
            if denoise == "none":
                written = inverted
            else:
                # a complete window is final, and the next one starts from its frames
                while complete_windows < len(starts) and min(starts[complete_windows] + window, t) <= inverted:
                    first = starts[complete_windows : complete_windows + 1]
                    written = self._denoise_windows(out, progress.prompt_embeds, denoise, window, first, written)
                    complete_windows += 1
                    if written > emitted:
                        yield out[:, :, emitted:written].clone()
                        emitted = written
                if self.final_frames(inverted, t, denoise, window) > written:
                    # the next, incomplete window: its frames out of reach of the missing ones are final
                    frames = out[:, :, :inverted].clone()
                    rest = starts[complete_windows:]
                    self._denoise_windows(frames, progress.prompt_embeds, denoise, window, rest, written)
            final = self.final_frames(inverted, t, denoise, window)
            if final > emitted:
                yield frames[:, :, emitted:final].clone()
                emitted = final

        with self._solving():
            progress = None
            for progress in self._solve_deep_block(
                noise, prompt_embeds, negative_prompt_embeds, callback_on_step_end,
                callback_on_step_end_tensor_inputs, context_latents,
            ):
                if independent:
                    yield from advance(progress, progress.frames_solved)
            # the solve is over (or interrupted): every frame counts as solved, as in `sample_latents`
            yield from advance(progress, t)
