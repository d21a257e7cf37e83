# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Solve plan and update rule for inverting an autoregressive affine flow block (noise -> data).

Inverting a block means solving u_j = shift_j(u_<j) + scale_j(u_<j) * z_j for every token j. The scheduler
splits the token sequence into chunks. The pipeline evaluates the network on a chunk's inputs through the
block's KV cache, and `step` writes the new estimate of the chunk's tokens and says whether the fixed point
has converged; if not, the pipeline rolls its cache back and evaluates the chunk again.

* `mode="sequential"`: one token per chunk and one evaluation: the exact autoregressive inverse.
* `mode="jacobi"`: block-Jacobi fixed-point iteration on chunks of `block_size` tokens within the first
  frame and `later_block_multiplier * block_size` after it; iteration 0 of a later chunk may read the same
  positions one frame earlier (`warm_start`). This is the original code's algorithm.
* `mode="adaptive"`: the first frame is one chunk, then chunks of `later_block_multiplier` frames, each
  solved by a sliding window of `2 * block_size` tokens in the first frame and `2 * later_block_multiplier *
  block_size` after it. Each iteration evaluates the window once
  and commits its converged prefix: the window's first token is exact (its inputs are committed), and each
  following token whose predecessors changed by less than `threshold` (relative squared change) is final
  too. The window then moves past the committed tokens and takes in new ones, so a token is evaluated only
  until it has converged, instead of until the whole chunk has. A later frame starts from the previous
  frame's values (`warm_start`); a token evaluated `max_iterations` times is committed as it is.
* `convergence="sample"` (the default) stops every sequence of a batch on its own residual: the pipeline
  replays a converged sequence's inputs, which leaves its values and its cache entries unchanged, so a result
  does not depend on what else is in the batch. Batched calls match single ones (as with every diffusers
  pipeline), and `StarFlowVPipeline.stream` can invert the shallow blocks of early frames (one sequence per
  frame) before the later frames exist. `convergence="batch"` is the original code's rule: a chunk stops once
  the relative residual over the whole batch is below `threshold`, so a sample's result depends on the rest
  of its batch (and with guidance on its unconditional half); choose it to reproduce the original's samples.
* Videos longer than `local_window` latent frames are solved window by window: after the first window,
  each new window keeps the last `context_frames` solved frames, which the pipeline re-encodes into a fresh
  cache so that positions restart at 0.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class FlowChunk:
    """Tokens [start, end) of the block-order sequence, solved together.

    `context` is the token range [start, end) to re-encode into a fresh cache before this chunk (the first
    chunk of every window after the first), else None. `warm_start_offset` > 0 means iteration 0 reads its
    inputs that many tokens earlier (`mode="jacobi"`), or that the chunk starts from the values that many
    tokens earlier (`mode="adaptive"`).
    """

    start: int
    end: int
    window: int
    context: Optional[Tuple[int, int]] = None
    warm_start_offset: int = 0
    # `mode="adaptive"`: tokens the sliding window evaluates at once
    sliding_window: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class AdaptiveFlowStepOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor`): the float32 token state (B, N, D), each sequence's window updated.
        frontier (`List[int]`): per sequence, the first token not committed yet (the chunk's end once done).
        diverged (`bool`): the update holds a non-finite value (the solve cannot recover from it).
    """

    prev_sample: torch.Tensor
    frontier: List[int]
    diverged: bool = False


@dataclass
class JacobiFlowSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor`): the float32 token state (B, N, D) with the chunk updated.
        converged (`bool`): stop iterating this chunk (residual below threshold, or last iteration).
        residual (`torch.Tensor`): mean squared change relative to the mean squared new value: a scalar
            over the batch, or (B,) per sequence with `convergence="sample"`.
        diverged (`bool`): the update holds a non-finite value (the solve cannot recover from it).
    """

    prev_sample: torch.Tensor
    converged: bool
    residual: torch.Tensor
    diverged: bool = False


def flow_guidance(
    shift: torch.Tensor, scale: torch.Tensor, guidance_weight: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance for a Gaussian flow step (spec section 5).

    `shift`/`scale` hold [conditional; unconditional] along the batch; returns the guided (shift, scale) of
    the conditional half. With w = guidance_weight, s = min(scale_c/scale_u, 1)^2:
    scale = scale_c / sqrt(1 + w - w s), shift = ((1 + w) shift_c - w s shift_u) / (1 + w - w s).
    """
    shift_c, shift_u = shift.chunk(2)
    scale_c, scale_u = scale.chunk(2)
    w = guidance_weight
    ratio = (scale_c / scale_u).clamp(max=1.0).square()
    denom = 1 + w - w * ratio
    return ((1 + w) * shift_c - (w * ratio) * shift_u) / denom, scale_c / denom.sqrt()


MODES = ("jacobi", "adaptive", "sequential")


class JacobiFlowScheduler(SchedulerMixin, ConfigMixin):
    """Plans and applies the fixed-point solve of STARFlow's autoregressive flow blocks.

    Args:
        mode (`str`): "jacobi" (parallel block-Jacobi, default), "adaptive" (a sliding window committing
            converged tokens) or "sequential" (one token per network call).
        block_size (`int`): tokens per Jacobi chunk (adaptive: per window) inside the first frame.
        later_block_multiplier (`int`): chunk (window) size multiplier once a chunk starts after the first frame.
        max_iterations (`int`): Jacobi iterations per chunk at most (adaptive: evaluations per token).
        threshold (`float`): relative residual below which a chunk has converged (adaptive: per token).
        shallow_threshold (`float`, *optional*): the threshold of the shallow blocks; None means `threshold`.
            They are cheap (few layers, one frame each) and their solve errors reach the output as much as the
            deep block's, so a tighter one buys fidelity for little time (docs/performance.md).
        warm_start (`bool`): start a later chunk from the same positions one frame earlier.
        local_window (`int`, *optional*): latent frames the deep block attends to; None means the model's
            trained length (`trained_latent_frames`).
        context_frames (`int`): frames kept as context when the window slides.
        convergence (`str`): "sample" (one residual per sequence: results independent of the batch, needed for
            early frames in `stream`) or "batch" (one residual over the batch, the original code's rule).
            `mode="jacobi"` only: `adaptive` always commits per sequence.
    """

    config_name = "scheduler_config.json"
    order = 1
    _compatibles = []

    @register_to_config
    def __init__(
        self,
        mode: str = "jacobi",
        block_size: int = 32,
        later_block_multiplier: int = 4,
        max_iterations: int = 32,
        threshold: float = 1e-3,
        warm_start: bool = True,
        local_window: Optional[int] = None,
        context_frames: int = 16,
        convergence: str = "sample",
        shallow_threshold: Optional[float] = None,
    ):
        self._validate(mode, block_size, later_block_multiplier, max_iterations, threshold, local_window, context_frames)
        if shallow_threshold is not None and not shallow_threshold >= 0:
            raise ValueError(f"`shallow_threshold` must be None or >= 0, got {shallow_threshold!r}.")
        if convergence not in ("batch", "sample"):
            raise ValueError(f"`convergence` must be 'batch' or 'sample', got {convergence!r}.")
        self.chunks: List[FlowChunk] = []
        self.window_frames: Optional[int] = None
        self.timesteps = torch.zeros(0, dtype=torch.long)

    @staticmethod
    def _validate(mode, block_size, later_block_multiplier, max_iterations, threshold, local_window, context_frames):
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {', '.join(map(repr, MODES))}, got {mode!r}.")
        for name, value in (
            ("block_size", block_size),
            ("later_block_multiplier", later_block_multiplier),
            ("max_iterations", max_iterations),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not threshold >= 0:
            raise ValueError(f"`threshold` must be >= 0, got {threshold!r}.")
        if local_window is not None and (not isinstance(local_window, int) or local_window < 1):
            raise ValueError(f"`local_window` must be None or a positive number of latent frames, got {local_window!r}.")
        if not isinstance(context_frames, int) or context_frames < 1:
            raise ValueError(f"`context_frames` must be a positive integer, got {context_frames!r}.")

    @property
    def num_timesteps(self) -> int:
        return len(self.chunks)

    def threshold_for(self, deep_block: bool) -> float:
        """The convergence threshold of the deep block or of a shallow block."""
        if deep_block or self.config.shallow_threshold is None:
            return self.config.threshold
        return self.config.shallow_threshold

    @property
    def sequences_independent(self) -> bool:
        """Whether each sequence of a batch is solved as if it were alone: every mode but `jacobi` with
        `convergence="batch"` (sequential steps and `adaptive`'s windows are per sequence by construction)."""
        return self.config.mode != "jacobi" or self.config.convergence == "sample"

    @property
    def iterations_per_chunk(self) -> int:
        return 1 if self.config.mode == "sequential" else self.config.max_iterations

    def resolve_window(self, num_frames: int, trained_frames: Optional[int]) -> Optional[int]:
        """Frames per window, or None when the whole video fits in one."""
        window = self.config.local_window or trained_frames
        if window is None or num_frames <= window:
            return None
        if self.config.context_frames >= window:
            raise ValueError(
                f"`context_frames` ({self.config.context_frames}) must be smaller than the local window ({window})."
            )
        return window

    def plan(
        self,
        tokens_per_frame: int,
        num_frames: int,
        prefix_tokens: int = 0,
        window_frames: Optional[int] = None,
    ) -> List[FlowChunk]:
        """Chunks solving tokens [prefix_tokens, num_frames * tokens_per_frame) of one block."""
        total = num_frames * tokens_per_frame
        if prefix_tokens < 0 or prefix_tokens >= total:
            raise ValueError(f"`prefix_tokens` must be in [0, {total}), got {prefix_tokens}.")
        if window_frames is not None and self.config.context_frames >= window_frames:
            raise ValueError(
                f"`context_frames` ({self.config.context_frames}) must be smaller than the window ({window_frames})."
            )
        sequential, adaptive = self.config.mode == "sequential", self.config.mode == "adaptive"
        window = None if window_frames is None else window_frames * tokens_per_frame
        context = None if window is None else self.config.context_frames * tokens_per_frame
        target = total if window is None else min(total, window)
        chunks, start, index, pending_context = [], prefix_tokens, 0, None
        while True:
            while start < target:
                later = self.config.block_size * self.config.later_block_multiplier
                if sequential:
                    size = 1
                elif adaptive and start < tokens_per_frame:
                    size = tokens_per_frame - start  # the first frame
                elif adaptive:
                    # whole frames: the window slides across frame boundaries inside a chunk
                    size = self.config.later_block_multiplier * tokens_per_frame - start % tokens_per_frame
                elif start <= tokens_per_frame:
                    size = self.config.block_size
                else:
                    size = later
                end = min(start + size, target)
                if adaptive:
                    warm = tokens_per_frame if self.config.warm_start and start >= tokens_per_frame else 0
                    # twice Jacobi's chunk: a token leaves the window once settled, so a longer window costs no
                    # more evaluations per token and needs fewer calls (measured: docs/performance.md)
                    sliding = 2 * (self.config.block_size if start < tokens_per_frame else later)
                else:
                    warm = tokens_per_frame if (self.config.warm_start and not sequential and start > tokens_per_frame) else 0
                    sliding = 0
                chunks.append(FlowChunk(start, end, index, pending_context, warm, sliding))
                pending_context = None
                start = end
            if target >= total:
                return chunks
            target = min(target + window - context, total)
            index += 1
            pending_context = (start - context, start)

    def set_timesteps(
        self,
        tokens_per_frame: int,
        num_frames: int,
        prefix_tokens: int = 0,
        trained_frames: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        """Plan the deep block's solve. `timesteps` holds each chunk's first token."""
        window = self.resolve_window(num_frames, trained_frames)
        self.window_frames = window
        self.chunks = self.plan(tokens_per_frame, num_frames, prefix_tokens, window)
        self.timesteps = torch.tensor([c.start for c in self.chunks], dtype=torch.long, device=device)

    def cache_length(self, tokens_per_frame: int, num_frames: int, text_length: int = 0) -> int:
        """Positions the deep block's KV cache needs for the planned solve."""
        frames = num_frames if self.window_frames is None else self.window_frames
        return text_length + frames * tokens_per_frame

    @staticmethod
    def warm_start(sample: torch.Tensor, chunk: FlowChunk) -> None:
        """`mode="adaptive"`: start the chunk's tokens from the values `warm_start_offset` tokens earlier (the
        previous frame, frame by frame), in place; nothing without a warm start."""
        offset = chunk.warm_start_offset
        if not offset:
            return
        for first in range(chunk.start, chunk.end, offset):
            last = min(first + offset, chunk.end)
            sample[:, first:last] = sample[:, first - offset : last - offset]

    @staticmethod
    def chunk_inputs(sample: torch.Tensor, chunk: FlowChunk, iteration: int) -> Tuple[torch.Tensor, bool]:
        """Network inputs of a chunk: token j is predicted from token j - 1. Returns the tokens and whether
        the block must put its SOS vector in front of them (the chunk starts the sequence)."""
        offset = chunk.warm_start_offset if iteration == 0 else 0
        return JacobiFlowScheduler.shifted_inputs(sample, chunk.start - offset, chunk.end - offset)

    @staticmethod
    def shifted_inputs(sample: torch.Tensor, start: int, end: int) -> Tuple[torch.Tensor, bool]:
        """The inputs predicting tokens [start, end): tokens [start - 1, end - 1), and whether the block must
        put its SOS vector in front (start is 0: the first token is predicted from SOS alone)."""
        if start > 0:
            return sample[:, start - 1 : end - 1], False
        return sample[:, : end - 1], True

    @staticmethod
    def context_inputs(sample: torch.Tensor, context: Tuple[int, int]) -> torch.Tensor:
        """Inputs re-encoding tokens [start, end) as a fresh sequence, to run with the SOS vector in front:
        tokens[start:end-1]."""
        start, end = context
        return sample[:, start : end - 1]

    def step(
        self,
        model_output: Tuple[torch.Tensor, torch.Tensor],
        chunk: FlowChunk,
        sample: torch.Tensor,
        noise: torch.Tensor,
        iteration: int,
        return_dict: bool = True,
        threshold: Optional[float] = None,
    ) -> Union[JacobiFlowSchedulerOutput, Tuple]:
        """One fixed-point update of `chunk`: u = shift + scale * z, written into `sample` (in place).

        Args:
            model_output: float32 (shift, scale) of the chunk, one per sequence of `sample`: with guidance, the
                pipeline has combined the [conditional; unconditional] halves (`flow_guidance`).
            sample: the (B, N, D) float32 token state; unsolved tokens hold any initial guess.
            noise: the (B, N, D) noise z being inverted.
            threshold: the convergence threshold (`threshold_for` the block); None means `threshold`.
        """
        shift, scale = self._check_model_output(model_output, sample)
        new = shift + scale * noise[:, chunk.start : chunk.end]
        old = sample[:, chunk.start : chunk.end]
        dims = (1, 2) if self.config.convergence == "sample" else None
        residual = (new - old).square().mean(dims) / new.square().mean(dims)
        sample[:, chunk.start : chunk.end] = new
        # one host sync for both answers
        threshold = self.config.threshold if threshold is None else threshold
        finite, below = torch.stack([torch.isfinite(new).all(), (residual < threshold).all()]).tolist()
        converged = iteration >= self.iterations_per_chunk - 1 or below
        if not return_dict:
            return sample, converged, residual
        return JacobiFlowSchedulerOutput(prev_sample=sample, converged=converged, residual=residual, diverged=not finite)

    @staticmethod
    def _check_model_output(model_output, sample: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shift, scale = model_output
        if shift.shape[0] != sample.shape[0]:
            raise ValueError(
                f"`model_output` batch {shift.shape[0]} must be the sample batch {sample.shape[0]}; combine a "
                "guidance batch with `flow_guidance` first."
            )
        return shift, scale

    @staticmethod
    def window_end(chunk: FlowChunk, frontier: int) -> int:
        """`mode="adaptive"`: the end of a sequence's sliding window, given its first uncommitted token."""
        return min(frontier + chunk.sliding_window, chunk.end)

    def evaluation_range(self, chunk: FlowChunk, frontiers: List[int]) -> Tuple[int, int]:
        """`mode="adaptive"`: the tokens [start, end) one network call evaluates: every sequence's window."""
        return min(frontiers), max(self.window_end(chunk, f) for f in frontiers)

    def step_adaptive(
        self,
        model_output: Tuple[torch.Tensor, torch.Tensor],
        chunk: FlowChunk,
        sample: torch.Tensor,
        noise: torch.Tensor,
        frontiers: List[int],
        evaluations: torch.Tensor,
        return_dict: bool = True,
        threshold: Optional[float] = None,
    ) -> Union[AdaptiveFlowStepOutput, Tuple]:
        """One sliding-window update (`mode="adaptive"`): the network ran the tokens of `evaluation_range` of
        every sequence; each sequence updates its own window [frontier, window end) and commits its converged
        prefix.

        Args:
            model_output: float32 (shift, scale) of the tokens of `evaluation_range(chunk, frontiers)`, one per
                sequence as in `step`.
            frontiers: per sequence, the first uncommitted token.
            evaluations: (B, N) int32 count of evaluations of each token, updated in place.
            threshold: the convergence threshold (`threshold_for` the block); None means `threshold`.
        """
        threshold = self.config.threshold if threshold is None else threshold
        shift, scale = self._check_model_output(model_output, sample)
        start, end = self.evaluation_range(chunk, frontiers)
        if shift.shape[1] != end - start:
            raise ValueError(f"`model_output` holds {shift.shape[1]} tokens; the evaluation range has {end - start}.")
        frontier = torch.tensor(frontiers, device=sample.device)
        window_end = torch.tensor([self.window_end(chunk, f) for f in frontiers], device=sample.device)
        positions = torch.arange(start, end, device=sample.device)
        active = (positions >= frontier[:, None]) & (positions < window_end[:, None])
        new = shift + scale * noise[:, start:end]
        old = sample[:, start:end]
        change = (new - old).square().mean(-1)
        scale_of_values = (new.square().mean(-1) * active).sum(1, keepdim=True) / active.sum(1, keepdim=True).clamp(min=1)
        sample[:, start:end] = torch.where(active[..., None], new, old)
        counts = evaluations[:, start:end]
        counts += active.to(counts.dtype)
        # token j is final once every token before it in the window changed by less than the threshold (its
        # inputs are then settled), and the window's first token always is; tokens evaluated `max_iterations`
        # times are committed as they are
        settled = (change < threshold * scale_of_values) & active
        offset = frontier - start
        index = (offset[:, None] + torch.arange(end - start, device=sample.device)).clamp(max=end - start - 1)
        run = torch.gather(settled, 1, index).cumprod(1).sum(1)
        forced = torch.gather(counts >= self.config.max_iterations, 1, index).cumprod(1).sum(1)
        advanced = torch.minimum(frontier + torch.maximum(run + 1, forced), window_end)
        finite = torch.isfinite(torch.where(active[..., None], new, 0.0)).all()
        *frontier_list, finite = torch.cat([advanced, finite.long()[None]]).tolist()
        if not return_dict:
            return sample, frontier_list, not finite
        return AdaptiveFlowStepOutput(prev_sample=sample, frontier=frontier_list, diverged=not finite)
