# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""STARFlow / STARFlow-V transformer flow, in diffusers form.

The model is a stack of affine autoregressive flow blocks: several *shallow* blocks followed by one
*deep* block that also sees the text. Running it data -> noise (`forward`) is one parallel pass and gives
the exact log-likelihood. Running it noise -> data is an autoregressive solve done by
`JacobiFlowScheduler` and the pipelines, through three building blocks exposed by every flow block:

* `StarFlowKVCache`: preallocated keys/values of one block, in the model dtype. Keys are stored already
  rotated, because a key's rotary phase depends only on its cache index.
* `StarFlowFlowBlock.prefill_text(text, cache, rotary)`: writes the text prefix into the cache once. `rotary`
  is the (cos, sin) table pair of `StarFlowVTransformer.rotary_embedding`, or `rotary_phases(...)` of it
  (one table, built once per solve).
* `StarFlowFlowBlock.evaluate_chunk(inputs, cache, rotary)`: runs a chunk of (shifted) tokens through the
  block in parallel, attending to everything cached before it, and returns the float32 affine parameters
  (shift, scale) of the tokens the chunk predicts. Rolling the cache back is `cache.truncate(length)`.
  A context prefix (image-to-video, long videos) is prefilled by calling it on `[sos, context[:-1]]`.

Token layout: a latent (B, C, T, H, W) is patchified to (B, T, F, D) with F = (H/p)(W/p) tokens per frame
and D = C p^2 channels per token, channel order (p1, p2, c). Images are videos with T = 1.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, apply_lora_scale, logging


logger = logging.get_logger(__name__)

# softplus(a + INV_SOFTPLUS_ONE) == 1 at a == 0: an untrained block starts as the identity.
INV_SOFTPLUS_ONE = 0.541324854612918
# Fixed step size of the learned denoiser at sampling time (x <- x - 0.3 * denoiser(x)).
DENOISER_STEP = 0.3
ROPE_THETA = 10000.0
# Rotary channels (per half head) reserved for the time / text axis.
ROPE_TIME_CHANNELS = 8


@dataclass
class StarFlowVTransformerOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor`): the noise z, in the layout of the input.
        logdet (`torch.Tensor`): (B,) log|det dz/dx|, summed over every block and element (float32).
        block_logdets (`tuple` of `torch.Tensor`): one (B,) sum per block, shallow blocks first.
    """

    sample: torch.Tensor
    # defaults, as in every diffusers output: accelerate's hooks rebuild outputs from a dict of their fields
    logdet: torch.Tensor = None
    block_logdets: Tuple[torch.Tensor, ...] = None


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding (3-D: row, column, time/text)
# ----------------------------------------------------------------------------------------------------------


def rope_positions(
    num_frames: int, height: int, width: int, text_length: int, base_size: int, device=None
) -> torch.Tensor:
    """(text_length + num_frames*height*width, 3) positions, text first.

    Grid positions are scaled to `base_size` by the frame's geometric mean side, so other resolutions share
    the trained frequency range; the third axis is the frame index for tokens and k*base/L for text.
    """
    mean_side = math.sqrt(height * width)
    rows = torch.arange(height, device=device) / mean_side * base_size
    cols = torch.arange(width, device=device) / mean_side * base_size
    rows, cols = (p.reshape(-1) for p in torch.meshgrid(rows, cols, indexing="ij"))
    frame = torch.arange(num_frames, device=device).repeat_interleave(height * width).to(rows.dtype)
    grid = torch.stack([rows.repeat(num_frames), cols.repeat(num_frames), frame], dim=-1)
    if text_length == 0:
        return grid
    text = torch.zeros(text_length, 3, device=device, dtype=grid.dtype)
    text[:, 2] = torch.arange(text_length, device=device) / text_length * base_size
    return torch.cat([text, grid], dim=0)


def rope_angles(positions: torch.Tensor, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (S, head_dim) for interleaved-pair rotation."""
    half = head_dim // 2
    spatial = half - ROPE_TIME_CHANNELS
    device = positions.device
    spatial_freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, spatial, 2, device=device).float() / spatial))
    time_freqs = 1.0 / (
        ROPE_THETA ** (torch.arange(0, ROPE_TIME_CHANNELS, device=device).float() / ROPE_TIME_CHANNELS)
    )
    angles = torch.cat(
        [
            positions[:, 0:1] * spatial_freqs,
            positions[:, 1:2] * spatial_freqs,
            positions[:, 2:3] * time_freqs,
        ],
        dim=-1,
    ).repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); x is (B, heads, S, E)."""
    return rotate_pairs(x, rotary_phases((cos, sin)))


def rotary_phases(
    rotary_emb: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], start: int = 0, length: Optional[int] = None
) -> torch.Tensor:
    """The (cos, sin) of every rotated pair, (length, E/2, 2) float32, at positions [start, start + length)
    (default: all of them).

    `rotary_emb` is a (cos, sin) pair from `rope_angles` or a table this function returned: building the
    table once per solve leaves one slice per chunk."""
    end = None if length is None else start + length
    if isinstance(rotary_emb, torch.Tensor):
        return rotary_emb[start:end]
    cos, sin = rotary_emb
    return torch.stack([cos[start:end, 0::2], sin[start:end, 0::2]], dim=-1)


def rotate_pairs(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` as one complex product (one op instead of ten): x (..., E) times `rotary_phases`
    (..., E/2, 2) broadcast against it, computed in float32."""
    pairs = (x if x.dtype == torch.float32 else x.float()).unflatten(-1, (-1, 2))
    if x.is_mps or torch.compiler.is_compiling():
        # inductor generates no code for complex ops and MPS supports them only in part: the same product in
        # real arithmetic (in eager on CPU it is 3-8x slower than the complex product, hence not everywhere)
        cos, sin = phases.unbind(-1)
        real, imag = pairs.unbind(-1)
        rotated = torch.stack([real * cos - imag * sin, imag * cos + real * sin], dim=-1).flatten(-2)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(phases)).flatten(-2)
    return rotated if x.dtype == torch.float32 else rotated.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class StarFlowKVCache:
    """Keys and values of every layer of one flow block.

    `length` is the number of valid positions. Layers write at `length` and the block advances it once all
    its layers have run, so rolling back a chunk is `truncate(old_length)`.

    A layer's buffers are allocated at its first write, in the dtype and on the device of the keys it
    writes: the compute dtype (never a weight's storage dtype, e.g. under fp8 layerwise casting) and the
    device the layer runs on (offloading, or a model dispatched over several devices).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_length: int,
        head_dim: int,
    ):
        self.shape = (batch_size, num_heads, max_length, head_dim)
        # uninitialised when allocated: attention only reads the first `length` positions, which were written
        self.layer_keys: List[Optional[torch.Tensor]] = [None] * num_layers
        self.layer_values: List[Optional[torch.Tensor]] = [None] * num_layers
        self.length = 0
        # attention scores of `chunk_attention` and prefix-causal biases, per device (see there)
        self._scores: Dict[torch.device, torch.Tensor] = {}
        self._bias: Dict[Any, torch.Tensor] = {}

    @property
    def max_length(self) -> int:
        return self.shape[2]

    @property
    def batch_size(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers allocated so far."""
        return sum(t.numel() * t.element_size() for t in self.layer_keys + self.layer_values if t is not None)

    def layer(self, index: int, hidden_states: torch.Tensor, device: Optional[torch.device] = None) -> "LayerKVCache":
        """Layer `index`'s buffers and the current length, allocated at first use in the dtype of
        `hidden_states` (the compute dtype) on `device` (default: where `hidden_states` are)."""
        keys = self.layer_keys[index]
        if keys is None:
            empty = dict(dtype=hidden_states.dtype, device=device or hidden_states.device)
            keys = self.layer_keys[index] = torch.empty(self.shape, **empty)
            self.layer_values[index] = torch.empty(self.shape, **empty)
        return LayerKVCache(keys, self.layer_values[index], self.length, self)

    def advance(self, num_positions: int) -> None:
        self.length += num_positions

    def truncate(self, length: int) -> None:
        self.length = max(0, min(length, self.length))

    def prefix_causal_bias(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive (length, prefix + length) `prefix_causal_mask` of a `length`-token chunk after the cached
        positions, kept while the chunk's Jacobi iterations (and every layer) reuse it."""
        key = (self.length, length, dtype, device)
        if key not in self._bias:
            self._bias = {key: additive_mask(prefix_causal_mask(self.length, length, device), dtype)}
        return self._bias[key]

    def scores_workspace(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat scratch tensor of at least `numel` elements of `like`'s dtype and device, kept for the
        cache's lifetime."""
        scores = self._scores.get(like.device)
        if scores is None or scores.numel() < numel or scores.dtype != like.dtype:
            scores = self._scores[like.device] = like.new_empty(numel)
        return scores[:numel]

    def keep_batch(self, batch_slice: slice) -> None:
        """Keep a part of the batch, e.g. the conditional half after guidance."""
        self.layer_keys = [None if t is None else t[batch_slice] for t in self.layer_keys]
        self.layer_values = [None if t is None else t[batch_slice] for t in self.layer_values]
        self.shape = (len(range(*batch_slice.indices(self.batch_size))),) + self.shape[1:]


class LayerKVCache(NamedTuple):
    """One layer's view of a `StarFlowKVCache` for one call: its (B, heads, capacity, E) buffers and the
    number of valid positions. Tensors and an int, so a compiled layer sees graph inputs, not the cache's
    Python state."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int
    owner: StarFlowKVCache

    def write(self, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append (B, heads, L, E) keys/values after `length`; returns the valid prefix, new ones included."""
        end = self.length + key.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions requested, capacity {self.keys.shape[2]}.")
        # narrow + copy_: a sequential solve writes one position per call, where indexing costs more than the copy
        self.keys.narrow(2, self.length, key.shape[2]).copy_(key)
        self.values.narrow(2, self.length, value.shape[2]).copy_(value)
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)


# `chunk_attention` is used for chunks of at least this many queries whose score matrix has between
# CHUNK_ATTENTION_MIN_SCORES and CHUNK_ATTENTION_MAX_SCORES entries (measured on a 2-core CPU, bench_small:
# below, SDPA's per-call cost is lower; above, the workspace would be large).
CHUNK_ATTENTION_MIN_QUERIES = 16
CHUNK_ATTENTION_MIN_SCORES = 2**16
CHUNK_ATTENTION_MAX_SCORES = 2**24


def use_chunk_attention(
    query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor], is_causal: bool
) -> bool:
    """Whether `chunk_attention` should replace SDPA for (B, H, L, E) queries against (B, H, S, E) keys."""
    batch, heads, length, _ = query.shape
    scores = batch * heads * length * key.shape[2]
    return (
        length >= CHUNK_ATTENTION_MIN_QUERIES
        and CHUNK_ATTENTION_MIN_SCORES <= scores <= CHUNK_ATTENTION_MAX_SCORES
        and query.device.type == "cpu"
        and query.dtype == torch.float32
        and not is_causal
        and (attention_mask is None or (attention_mask.ndim == 2 and attention_mask.dtype == query.dtype))
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def chunk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    workspace: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention of (B, H, L, E) queries over (B, H, S, E) keys/values with an additive (L, S) mask,
    as three in-place steps on a preallocated (B H, L, S) score matrix.

    For a Jacobi chunk of 128 queries after a cached prefix (200-1300 keys) on a 2-core CPU, this is 1.3-1.7x
    as fast as SDPA's CPU flash kernel, whose small query blocks make its matrix products inefficient
    (benchmarks/attention_kernels.py; for small chunks SDPA stays faster, see `use_chunk_attention`). Fresh
    score and probability tensors would cost as much again in page faults (the allocator returns blocks of
    this size to the OS), hence the workspace. Same math; float rounding differs from SDPA by up to ~5e-7.
    """
    batch, heads, length, dim = query.shape
    size = key.shape[2]
    scores = workspace.view(batch * heads, length, size)
    keys_t = key.reshape(batch * heads, size, dim).transpose(1, 2)
    queries = query.reshape(batch * heads, length, dim)
    if attention_mask is None:
        torch.bmm(queries, keys_t, out=scores).mul_(1.0 / math.sqrt(dim))
    else:
        torch.baddbmm(attention_mask, queries, keys_t, alpha=1.0 / math.sqrt(dim), out=scores)
    torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return torch.bmm(scores, value.reshape(batch * heads, size, dim)).view(batch, heads, length, dim)


# Backends whose `is_causal` aligns the causal diagonal to the last key (flash-attn's convention), so a chunk
# after a cached prefix needs no mask there.
LOWER_RIGHT_CAUSAL_BACKENDS = frozenset(
    {
        AttentionBackendName.FLASH,
        AttentionBackendName.FLASH_HUB,
        AttentionBackendName._FLASH_3,
        AttentionBackendName._FLASH_3_HUB,
    }
)
# Backends that run torch SDPA, whose fused CUDA kernels take a `causal_lower_right` bias without a dense mask.
SDPA_BACKENDS = frozenset(
    {
        AttentionBackendName.NATIVE,
        AttentionBackendName._NATIVE_CUDNN,
        AttentionBackendName._NATIVE_EFFICIENT,
        AttentionBackendName._NATIVE_FLASH,
        AttentionBackendName._NATIVE_MATH,
    }
)


def resolve_attention_backend(backend: Optional[AttentionBackendName]) -> AttentionBackendName:
    """The backend a processor set by `set_attention_backend`, else the active one (the `attention_backend`
    context manager or the `DIFFUSERS_ATTN_BACKEND` default)."""
    if backend is not None:
        return AttentionBackendName(backend)
    return _AttentionBackendRegistry.get_active_backend()[0]


def dispatch_heads_first(query, key, value, attn_mask=None, is_causal=False, backend=None, parallel_config=None):
    """`dispatch_attention_fn` on (B, H, S, E) tensors (it takes (B, S, H, E): transposed views, no copies);
    returns (B, L, H, E). The native backend is called directly: it is SDPA, and a sequential solve makes
    thousands of small calls, where the dispatcher's ~20 us each would show."""
    if backend == AttentionBackendName.NATIVE and parallel_config is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal)
        return out.transpose(1, 2)
    return dispatch_attention_fn(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask,
        is_causal=is_causal, backend=backend, parallel_config=parallel_config,
    )


def flow_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    causal: bool,
    attention_mask: Union[torch.Tensor, "FrameBand", None] = None,
    kv_cache: Optional[LayerKVCache] = None,
    backend: Optional[AttentionBackendName] = None,
    parallel_config=None,
) -> torch.Tensor:
    """Attention of (B, H, L, E) queries over (B, H, S, E) keys/values, returned as (B, L, H, E).

    With `causal`, query i sits at position S - L + i: S - L keys come from a cache. Every kind of call is
    routed here, the one place that picks the kernel:
    * causal from position 0, or a single query after a prefix: the backend's plain causal / unmasked call;
    * a chunk after a cached prefix: `is_causal` on flash-attn backends (lower-right aligned), a
      `causal_lower_right` bias for SDPA backends on accelerators, `chunk_attention` on CPU where it is
      faster, and otherwise the dense prefix-causal mask;
    * the denoiser's frame band (`FrameBand`): `frame_band_attention`, unmasked calls on slices;
    * an explicit mask tensor: passed to the backend.
    """
    backend = resolve_attention_backend(backend)
    if attention_mask is not None:
        if isinstance(attention_mask, FrameBand):
            return frame_band_attention(
                query, key, value, attention_mask,
                lambda q, k, v: dispatch_heads_first(q, k, v, backend=backend, parallel_config=parallel_config),
            )
        return dispatch_heads_first(query, key, value, attention_mask, False, backend, parallel_config)
    length, size = query.shape[2], key.shape[2]
    if not causal or length == 1:
        return dispatch_heads_first(query, key, value, None, False, backend, parallel_config)
    if length == size or backend in LOWER_RIGHT_CAUSAL_BACKENDS:
        return dispatch_heads_first(query, key, value, None, True, backend, parallel_config)
    # a chunk after a cached prefix
    if not query.is_cpu and backend in SDPA_BACKENDS and length != query.shape[0]:
        # (a 2-D bias with as many rows as the batch would be read as a key-padding mask by the native backend)
        bias = causal_lower_right(length, size)
        return dispatch_heads_first(query, key, value, bias, False, backend, parallel_config)
    if kv_cache is not None and not torch.compiler.is_compiling():
        # eager: one bias per chunk, kept by the cache (a compiled graph builds its own, fused)
        bias = kv_cache.owner.prefix_causal_bias(length, query.dtype, query.device)
        if backend == AttentionBackendName.NATIVE and use_chunk_attention(query, key, bias, False):
            workspace = kv_cache.owner.scores_workspace(query.shape[0] * query.shape[1] * length * size, query)
            return chunk_attention(query, key, value, bias, workspace).transpose(1, 2)
    else:
        bias = additive_mask(prefix_causal_mask(size - length, length, query.device), query.dtype)
    # 2-D for SDPA itself (its CPU kernel is a little faster so), 4-D for the dispatcher's backends (which read
    # a 2-D mask with as many rows as the batch as a key-padding mask)
    bias = bias if backend == AttentionBackendName.NATIVE and parallel_config is None else bias[None, None]
    return dispatch_heads_first(query, key, value, bias, False, backend, parallel_config)


class StarFlowAttnProcessor:
    """Rotary q/k, an optional KV cache, and `flow_attention` through diffusers' attention dispatcher (so
    `set_attention_backend` and the `attention_backend` context manager apply).

    `rotary_emb` covers exactly the L positions of `hidden_states`: their `rotary_phases` as (L, 1, E/2, 2),
    broadcast over heads (the layer stack computes them once per chunk), or a (cos, sin) pair.
    `attention_mask` is None (causal, or full for a non-causal module), a `FrameBand`, or a mask tensor.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "StarFlowAttention",
        hidden_states: torch.Tensor,
        rotary_emb: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        attention_mask: Union[torch.Tensor, "FrameBand", None] = None,
        kv_cache: Optional[LayerKVCache] = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        phases = rotary_phases(rotary_emb, 0, length)[:, None] if isinstance(rotary_emb, tuple) else rotary_emb
        # (B, L, heads, E) views of the projections. A LoRA adapter loaded after fusing wraps to_q, unmerged:
        # then the separate, adapted projections are the right ones.
        if attn.fused_projections and getattr(attn.to_q, "merged", True):
            qkv = attn.to_qkv(hidden_states).view(batch, length, 3, attn.heads, attn.head_dim)
            query, key = rotate_pairs(qkv[:, :, :2], phases[:, None]).unbind(2)
            value = qkv[:, :, 2]
        else:
            query = rotate_pairs(attn.to_q(hidden_states).view(batch, length, attn.heads, -1), phases)
            key = rotate_pairs(attn.to_k(hidden_states).view(batch, length, attn.heads, -1), phases)
            value = attn.to_v(hidden_states).view(batch, length, attn.heads, -1)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if kv_cache is not None:
            key, value = kv_cache.write(key, value)
        out = flow_attention(
            query, key, value, attn.is_causal, attention_mask, kv_cache, self._attention_backend,
            self._parallel_config,
        )
        return attn.to_out[0](out.reshape(batch, length, -1))


class StarFlowAttention(nn.Module, AttentionModuleMixin):
    _default_processor_cls = StarFlowAttnProcessor
    _available_processors = [StarFlowAttnProcessor]

    def __init__(self, dim: int, head_dim: int, is_causal: bool = True, processor=None):
        super().__init__()
        self.heads = dim // head_dim
        self.head_dim = head_dim
        self.is_causal = is_causal
        self.use_bias = True
        self.to_q = nn.Linear(dim, dim, bias=True)
        self.to_k = nn.Linear(dim, dim, bias=True)
        self.to_v = nn.Linear(dim, dim, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=True)])
        self.set_processor(processor or self._default_processor_cls())

    def forward(self, hidden_states, rotary_emb, attention_mask=None, kv_cache=None):
        return self.processor(self, hidden_states, rotary_emb, attention_mask, kv_cache)


class StarFlowRMSNorm(nn.Module):
    """RMSNorm in float32 whose weight is stored as an offset from one (keeps precision in bf16)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1 + self.weight.float())).to(x.dtype)


class StarFlowTransformerLayer(nn.Module):
    """Pre-norm layer: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float, is_causal: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = StarFlowAttention(dim, head_dim, is_causal=is_causal)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu", bias=True)

    def forward(self, hidden_states, rotary_emb, attention_mask=None, kv_cache: Optional[LayerKVCache] = None):
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), rotary_emb, attention_mask, kv_cache)
        return hidden_states + self.ff(self.norm2(hidden_states))


class _LayerStack(nn.Module):
    """Input/text projections, transformer layers and output norm shared by flow blocks and the denoiser."""

    def __init__(self, in_features, out_features, width, num_layers, head_dim, mlp_ratio, text_dim, is_causal):
        super().__init__()
        self.proj_in = nn.Linear(in_features, width)
        self.text_proj = nn.Linear(text_dim, width) if text_dim > 0 else None
        self.layers = nn.ModuleList(
            [StarFlowTransformerLayer(width, head_dim, mlp_ratio, is_causal) for _ in range(num_layers)]
        )
        self.norm_out = StarFlowRMSNorm(width)
        self.proj_out = nn.Linear(width, out_features)
        # a fresh block (or denoiser) starts as an elementwise map: no token mixing until trained
        nn.init.zeros_(self.proj_out.weight)
        self.gradient_checkpointing = False

    @property
    def head_dim(self) -> int:
        return self.layers[0].attn.head_dim

    @property
    def num_heads(self) -> int:
        return self.layers[0].attn.heads

    def run_layers(self, hidden_states, rotary_emb, attention_mask=None, kv_cache=None):
        """The layers on (B, L, width) states at positions [cache length, cache length + L) of `rotary_emb`
        ((cos, sin) tables or a `rotary_phases` table); with a cache, their keys/values are appended to it.
        `attention_mask` is None (causal, after the cached prefix), a `FrameBand` or a mask tensor."""
        start = kv_cache.length if kv_cache is not None else 0
        length = hidden_states.shape[1]
        # the rotary phases once per chunk, shared by every layer
        phases = rotary_phases(rotary_emb, start, length)[:, None]
        for index, layer in enumerate(self.layers):
            if torch.is_grad_enabled() and self.gradient_checkpointing and kv_cache is None:
                hidden_states = self._gradient_checkpointing_func(layer, hidden_states, phases, attention_mask)
            elif kv_cache is None:
                hidden_states = layer(hidden_states, phases, attention_mask)
            else:
                layer_cache = kv_cache.layer(index, hidden_states, execution_device(layer))
                hidden_states = layer(hidden_states, phases, attention_mask, layer_cache)
        if kv_cache is not None:
            kv_cache.advance(length)
        return hidden_states


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device accelerate runs `module` on when a model is dispatched over devices (`device_map`), else
    None (it runs where its inputs are)."""
    # (`__dict__`: nn.Module's attribute lookup raises and catches for a missing name, slow per layer call)
    device = getattr(module.__dict__.get("_hf_hook"), "execution_device", None)
    return None if device is None else torch.device(device)


def prefix_causal_mask(prefix_length: int, length: int, device=None) -> torch.Tensor:
    """(length, prefix_length + length) boolean mask: a chunk after a cached prefix sees all of the prefix and
    is causal inside itself."""
    mask = torch.ones(length, prefix_length + length, dtype=torch.bool, device=device)
    return mask.tril(diagonal=prefix_length)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one SDPA would build from it: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class StarFlowFlowBlock(_LayerStack):
    """One affine autoregressive flow block over a token sequence.

    Position j predicts token j from [sos, u_0 ... u_{j-1}] (u = the block's input after its permutation);
    z_j = (u_j - shift_j) / scale_j.
    """

    def __init__(self, in_features, width, num_layers, head_dim, mlp_ratio, text_dim, soft_clip, flip):
        super().__init__(in_features, 2 * in_features, width, num_layers, head_dim, mlp_ratio, text_dim, True)
        self.sos_embed = nn.Parameter(torch.randn(1, 1, in_features))
        self.soft_clip = soft_clip
        self.flip = flip

    def permute(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, F, D): reverse the token order inside each frame (an involution), or keep it."""
        return tokens.flip(2) if self.flip else tokens

    def affine_params(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 (shift, scale) from the layers' token outputs."""
        out = self.proj_out(self.norm_out(hidden_states))
        if self.soft_clip > 0:
            out = self.soft_clip * torch.tanh(out / self.soft_clip)
        log_scale, shift = out.float().chunk(2, dim=-1)
        return shift, F.softplus(log_scale + INV_SOFTPLUS_ONE)

    def shifted_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """[sos, u_0 ... u_{N-2}] for a (B, N, D) sequence in block order."""
        return self.with_sos(tokens[:, :-1])

    def with_sos(self, tokens: torch.Tensor) -> torch.Tensor:
        """[sos, tokens] for (B, n, D) tokens, in their dtype."""
        sos = self.sos_embed.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        return torch.cat([sos, tokens], dim=1)

    def forward(
        self,
        tokens: Optional[torch.Tensor],
        rotary_emb,
        text: Optional[torch.Tensor] = None,
        kv_cache: Optional[StarFlowKVCache] = None,
        prepend_sos: bool = False,
    ):
        """Without `kv_cache`: data -> noise on (B, T, F, D) tokens in natural order; returns z (same layout)
        and the (B,) logdet.

        With `kv_cache` (one step of the noise -> data solve): `text` (B, L, text_dim), if given, is written
        into the cache first; then (B, n, D) shifted block-order `tokens`, if given, run after everything
        cached, with the SOS vector in front when `prepend_sos`. Returns their float32 (shift, scale), or
        None for text alone. Everything runs in the dtype of `text` / `tokens` (the compute dtype)."""
        if kv_cache is not None:
            if text is not None:
                self.run_layers(self.text_proj(text), rotary_emb, kv_cache=kv_cache)
            if tokens is None:
                return None
            inputs = self.with_sos(tokens) if prepend_sos else tokens
            return self.affine_params(self.run_layers(self.proj_in(inputs), rotary_emb, kv_cache=kv_cache))
        batch, frames, per_frame, channels = tokens.shape
        u = self.permute(tokens).reshape(batch, frames * per_frame, channels)
        hidden_states = self.proj_in(self.shifted_inputs(u))
        text_length = 0
        if text is not None:
            text_length = text.shape[1]
            hidden_states = torch.cat([self.text_proj(text.to(hidden_states.dtype)), hidden_states], dim=1)
        hidden_states = self.run_layers(hidden_states, rotary_emb)[:, text_length:]
        shift, scale = self.affine_params(hidden_states)
        z = (u.float() - shift) / scale
        logdet = -torch.log(scale).sum(dim=(1, 2))
        z = self.permute(z.view(batch, frames, per_frame, channels)).to(tokens.dtype)
        return z, logdet

    # ---- sampling building blocks ------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int) -> StarFlowKVCache:
        """An empty cache for this block; each layer's buffers take the compute dtype and the device of its
        first write."""
        return StarFlowKVCache(len(self.layers), batch_size, self.num_heads, max_length, self.head_dim)

    def prefill_text(self, text: torch.Tensor, cache: StarFlowKVCache, rotary_emb) -> None:
        """Write the text prefix into `cache` (`forward` with text and no tokens)."""
        self(None, rotary_emb, text, kv_cache=cache)

    def evaluate_chunk(
        self, inputs: torch.Tensor, cache: StarFlowKVCache, rotary_emb, prepend_sos: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run (B, n, D) shifted block-order inputs after the cached prefix; returns float32 (shift, scale)."""
        return self(inputs, rotary_emb, kv_cache=cache, prepend_sos=prepend_sos)


class StarFlowDenoiser(_LayerStack):
    """Non-causal transformer predicting the (scaled) noise of a noisy latent, used after sampling."""

    def __init__(self, in_features, width, num_layers, head_dim, mlp_ratio, text_dim):
        super().__init__(in_features, in_features, width, num_layers, head_dim, mlp_ratio, text_dim, False)

    def forward(self, tokens, rotary_emb, text=None, attention_mask=None):
        batch, frames, per_frame, channels = tokens.shape
        hidden_states = self.proj_in(tokens.reshape(batch, frames * per_frame, channels))
        text_length = 0
        if self.text_proj is not None and text is not None:
            text_length = text.shape[1]
            hidden_states = torch.cat([self.text_proj(text.to(hidden_states.dtype)), hidden_states], dim=1)
        hidden_states = self.run_layers(hidden_states, rotary_emb, attention_mask)[:, text_length:]
        return self.proj_out(self.norm_out(hidden_states)).view(batch, frames, per_frame, channels)


class FrameBand(NamedTuple):
    """The learned denoiser's banded attention pattern over [text, frames] (see `denoiser_attention_mask`)."""

    text_length: int
    tokens_per_frame: int
    window: int
    lookahead: int


def denoiser_attention_mask(
    text_length: int, num_frames: int, tokens_per_frame: int, window: int, lookahead: int, device=None
) -> torch.Tensor:
    """Dense boolean form of the denoiser's frame band (True = visible), the reference for
    `frame_band_attention`.

    A query in frame f sees all text and frames f + lookahead - window ... f + lookahead; text rows see
    frames up to `lookahead`.
    """
    total = text_length + num_frames * tokens_per_frame
    index = torch.arange(total, device=device)
    q, k = index[:, None], index[None, :]
    frame_q = torch.div(q - text_length, tokens_per_frame, rounding_mode="floor")
    frame_k = torch.div(k - text_length, tokens_per_frame, rounding_mode="floor")
    last_q = torch.div((q - text_length).clamp(min=0), tokens_per_frame, rounding_mode="floor")
    return (k < text_length) | ((frame_k >= frame_q + lookahead - window) & (frame_k <= last_q + lookahead))


def frame_band_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, band: FrameBand, attend: Callable
) -> torch.Tensor:
    """Attention restricted to `band` without an N x N mask: memory linear in the number of frames.

    The text queries and each frame's queries see the text plus one contiguous range of frames, so every
    group is one unmasked `attend(q, k, v)` call ((B, H, *, E) in, (B, L, H, E) out) on slices."""
    text, per_frame = band.text_length, band.tokens_per_frame
    frames = (query.shape[2] - text) // per_frame

    def visible(first: int, last: int) -> Tuple[torch.Tensor, torch.Tensor]:
        start, end = text + max(first, 0) * per_frame, text + (min(last, frames - 1) + 1) * per_frame
        if start == text:
            return key[:, :, :end], value[:, :, :end]
        return (
            torch.cat([key[:, :, :text], key[:, :, start:end]], dim=2),
            torch.cat([value[:, :, :text], value[:, :, start:end]], dim=2),
        )

    outputs = []
    if text > 0:
        outputs.append(attend(query[:, :, :text], *visible(0, band.lookahead)))
    for frame in range(frames):
        rows = query[:, :, text + frame * per_frame : text + (frame + 1) * per_frame]
        outputs.append(attend(rows, *visible(frame + band.lookahead - band.window, frame + band.lookahead)))
    return torch.cat(outputs, dim=1)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class StarFlowVTransformer(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin):
    r"""
    The STARFlow / STARFlow-V normalizing flow (data -> noise in `forward`).

    Args:
        in_channels (`int`): latent channels C.
        patch_size (`int`): spatial patch size p (tokens carry C p^2 channels).
        num_layers_per_block (`tuple` of `int`): layers of every flow block; all but the last are shallow
            blocks, the last one is the deep block.
        shallow_width (`int`), deep_width (`int`): hidden sizes of the shallow blocks (and the denoiser) and
            of the deep block.
        attention_head_dim (`int`): channels per attention head.
        mlp_ratio (`float`): MLP hidden size as a multiple of the width.
        text_embed_dim (`int`): width of the text-encoder output (only the deep block sees text).
        max_text_length (`int`): tokens of text conditioning (the tokenizer's padded length).
        rope_base_size (`int`): grid side the rotary positions are normalised to.
        output_soft_clip (`float`): s in s*tanh(out/s) on each block's output; 0 disables it.
        is_video (`bool`): video model (input (B, C, T, H, W), token order reversed inside each frame by
            alternate blocks, causal in time) or image model (input (B, C, H, W)).
        shallow_blocks_per_frame (`bool`): shallow blocks see every frame as an independent sequence.
        denoiser_num_layers (`int`): layers of the learned denoiser; 0 for none.
        denoiser_text_conditioned (`bool`): whether the denoiser sees the text.
        denoiser_window (`int`): frames the denoiser looks back (its banded attention).
        denoiser_lookahead (`int`): future frames the denoiser sees.
        noise_std (`float`): training noise level sigma; the pipelines noise-augment and denoise with it.
        trained_latent_frames (`int`, *optional*): length of the training clips in latent frames; longer
            videos are generated with a sliding window of this length.
        sample_size (`int`): latent frame side the model was trained at.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["StarFlowTransformerLayer"]
    # `compile_repeated_blocks` (regional torch.compile) compiles every layer of every block and the denoiser
    _repeated_blocks = ["StarFlowTransformerLayer"]
    # layerwise casting (fp8 storage) keeps each block's affine output projection (shift and log-scale, straight
    # into z and the likelihood; 0.01% of the parameters) in the compute dtype. diffusers' own `^proj_out$`
    # only matches a top-level module. Norms and SOS vectors are not layers diffusers casts.
    _skip_layerwise_casting_patterns = ["proj_out"]
    _keep_in_fp32_modules = None

    @register_to_config
    def __init__(
        self,
        in_channels: int = 48,
        patch_size: int = 1,
        num_layers_per_block: Tuple[int, ...] = (2, 2, 2, 2, 2, 24),
        shallow_width: int = 3072,
        deep_width: int = 4096,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        text_embed_dim: int = 2048,
        max_text_length: int = 256,
        rope_base_size: int = 32,
        output_soft_clip: float = 4.0,
        is_video: bool = True,
        shallow_blocks_per_frame: bool = True,
        denoiser_num_layers: int = 8,
        denoiser_text_conditioned: bool = True,
        denoiser_window: Optional[int] = 10,
        denoiser_lookahead: int = 1,
        noise_std: float = 0.5,
        trained_latent_frames: Optional[int] = 21,
        sample_size: int = 40,
    ):
        super().__init__()
        if len(num_layers_per_block) < 2 or min(num_layers_per_block) < 1:
            raise ValueError(
                f"`num_layers_per_block` needs at least two blocks of at least one layer, got {num_layers_per_block}."
            )
        for name, width in (("shallow_width", shallow_width), ("deep_width", deep_width)):
            if width % attention_head_dim:
                raise ValueError(f"`{name}` ({width}) must be divisible by `attention_head_dim` ({attention_head_dim}).")
        if attention_head_dim // 2 <= ROPE_TIME_CHANNELS or (attention_head_dim // 2 - ROPE_TIME_CHANNELS) % 2:
            raise ValueError(f"`attention_head_dim` must be a multiple of 4 above 16, got {attention_head_dim}.")
        if text_embed_dim <= 0 or max_text_length <= 0:
            raise ValueError("STARFlow models are text-conditioned: `text_embed_dim` and `max_text_length` must be > 0.")

        token_dim = in_channels * patch_size**2
        num_blocks = len(num_layers_per_block)
        common = dict(head_dim=attention_head_dim, mlp_ratio=mlp_ratio, soft_clip=output_soft_clip)
        blocks = [
            # shallow block i uses the flipped order for even i; the deep block is flipped iff K is odd
            StarFlowFlowBlock(token_dim, shallow_width, layers, text_dim=0, flip=(i % 2 == 0), **common)
            for i, layers in enumerate(num_layers_per_block[:-1])
        ]
        blocks.append(
            StarFlowFlowBlock(
                token_dim, deep_width, num_layers_per_block[-1], text_dim=text_embed_dim,
                flip=(num_blocks % 2 == 1), **common,
            )
        )
        self.blocks = nn.ModuleList(blocks)
        self.denoiser = None
        if denoiser_num_layers > 0:
            self.denoiser = StarFlowDenoiser(
                token_dim, shallow_width, denoiser_num_layers, attention_head_dim, mlp_ratio,
                text_dim=text_embed_dim if denoiser_text_conditioned else 0,
            )
        self._rotary_tables: Dict[Any, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.gradient_checkpointing = False

    # ---- layout helpers ----------------------------------------------------------------------------

    @property
    def shallow_blocks(self) -> List[StarFlowFlowBlock]:
        return list(self.blocks[:-1])

    @property
    def deep_block(self) -> StarFlowFlowBlock:
        return self.blocks[-1]

    @property
    def has_denoiser(self) -> bool:
        return self.denoiser is not None

    def _check_input(self, hidden_states: torch.Tensor) -> None:
        expected = 5 if self.config.is_video else 4
        layout = "(B, C, T, H, W)" if self.config.is_video else "(B, C, H, W)"
        if hidden_states.ndim != expected:
            raise ValueError(f"`hidden_states` must be {layout} for this model, got shape {tuple(hidden_states.shape)}.")
        if hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`hidden_states` has {hidden_states.shape[1]} channels, the model expects {self.config.in_channels}."
            )
        p = self.config.patch_size
        if hidden_states.shape[-1] % p or hidden_states.shape[-2] % p:
            raise ValueError(f"`hidden_states` height and width must be divisible by patch_size={p}.")

    def _check_text(self, encoder_hidden_states: Optional[torch.Tensor], batch_size: int, required: bool = True):
        if encoder_hidden_states is None:
            if required:
                raise ValueError("`encoder_hidden_states` (B, L, text_embed_dim) is required.")
            return
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.config.text_embed_dim:
            raise ValueError(
                f"`encoder_hidden_states` must be (B, L, {self.config.text_embed_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}."
            )
        if encoder_hidden_states.shape[0] != batch_size:
            raise ValueError(
                f"`encoder_hidden_states` batch {encoder_hidden_states.shape[0]} != latent batch {batch_size}."
            )

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) or (B, C, H, W) -> (B, T, H/p, W/p, C p^2), channel order (p1, p2, c)."""
        if latents.ndim == 4:
            latents = latents.unsqueeze(2)
        b, c, t, h, w = latents.shape
        p = self.config.patch_size
        x = latents.reshape(b, c, t, h // p, p, w // p, p)
        return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(b, t, h // p, w // p, p * p * c)

    def unpatchify(self, tokens: torch.Tensor, video: Optional[bool] = None) -> torch.Tensor:
        """Inverse of `patchify`; returns (B, C, T, H, W), or (B, C, H, W) for an image model."""
        b, t, hp, wp, d = tokens.shape
        p = self.config.patch_size
        c = d // (p * p)
        x = tokens.reshape(b, t, hp, wp, p, p, c).permute(0, 6, 1, 2, 4, 3, 5).reshape(b, c, t, hp * p, wp * p)
        video = self.config.is_video if video is None else video
        return x if video else x[:, :, 0]

    def rotary_embedding(
        self, num_frames: int, height: int, width: int, text_length: int, device=None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float32 cos/sin tables for a [text, frames] sequence of token grids height x width.

        Kept for reuse in eager mode (building them takes ~0.3 ms); under torch.compile they are built in the
        graph, since a dict keyed by sizes would make it recompile for every size."""
        device = torch.device(device) if device is not None else self.device
        key = (num_frames, height, width, text_length, device)
        if not torch.compiler.is_compiling() and key in self._rotary_tables:
            return self._rotary_tables[key]
        positions = rope_positions(num_frames, height, width, text_length, self.config.rope_base_size, device)
        tables = rope_angles(positions, self.config.attention_head_dim)
        if not torch.compiler.is_compiling():
            if len(self._rotary_tables) >= 16:
                self._rotary_tables.clear()
            self._rotary_tables[key] = tables
        return tables

    # ---- entry points: every network evaluation is a `forward` of this module --------------------------
    #
    # Offloading hooks (model, sequential, group) and other diffusers hooks wrap `forward`, so the solve never
    # calls a block or the denoiser directly: `denoise`, `forward_shallow` and `evaluate_block` call the
    # module, whose `forward` dispatches on `task`. Weights (SOS vectors included) are only read inside the
    # forward of the module that owns them.

    def _shallow_tokens(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Shallow blocks on (B, T, F, D) tokens of a `grid` = (rows, cols) frame; returns the deep block's
        input and each block's (B,) logdet."""
        batch, frames, per_frame, channels = tokens.shape
        per_frame_blocks = self.config.shallow_blocks_per_frame
        rotary = self.rotary_embedding(1 if per_frame_blocks else frames, *grid, 0, tokens.device)
        logdets = []
        for block in self.shallow_blocks:
            if per_frame_blocks:
                z, logdet = block(tokens.reshape(batch * frames, 1, per_frame, channels), rotary)
                tokens, logdet = z.view(batch, frames, per_frame, channels), logdet.view(batch, frames).sum(1)
            else:
                tokens, logdet = block(tokens, rotary)
            logdets.append(logdet)
        return tokens, logdets

    def _shallow_from_latents(self, hidden_states):
        """`_shallow_tokens` on (checked) latents; also returns the (B, T, H/p, W/p, D) token grid's shape."""
        tokens = self.patchify(hidden_states)
        batch, frames, hp, wp, channels = tokens.shape
        return (*self._shallow_tokens(tokens.reshape(batch, frames, hp * wp, channels), (hp, wp)), tokens.shape)

    def _flow(self, hidden_states, encoder_hidden_states, return_dict):
        self._check_input(hidden_states)
        self._check_text(encoder_hidden_states, hidden_states.shape[0])
        tokens, logdets, (batch, frames, hp, wp, channels) = self._shallow_from_latents(hidden_states)
        rotary = self.rotary_embedding(frames, hp, wp, encoder_hidden_states.shape[1], tokens.device)
        z, logdet = self.deep_block(tokens, rotary, encoder_hidden_states)
        logdets.append(logdet)
        sample = self.unpatchify(z.view(batch, frames, hp, wp, channels))
        total = torch.stack(logdets, dim=0).sum(0)
        if not return_dict:
            return sample, total, tuple(logdets)
        return StarFlowVTransformerOutput(sample=sample, logdet=total, block_logdets=tuple(logdets))

    def _denoise(self, hidden_states, encoder_hidden_states):
        if self.denoiser is None:
            raise ValueError(
                "This model has no learned denoiser (`denoiser_num_layers=0`); use the score-based denoising "
                "step (`denoise='score'` in the pipelines) instead."
            )
        self._check_input(hidden_states)
        text_required = self.config.denoiser_text_conditioned
        self._check_text(encoder_hidden_states, hidden_states.shape[0], required=text_required)
        if not text_required:
            encoder_hidden_states = None
        tokens = self.patchify(hidden_states)
        batch, frames, hp, wp, channels = tokens.shape
        text_length = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        band = None
        if self.config.is_video:
            window = self.config.denoiser_window if self.config.denoiser_window else 10**9
            band = FrameBand(text_length, hp * wp, window, self.config.denoiser_lookahead)
        rotary = self.rotary_embedding(frames, hp, wp, text_length, tokens.device)
        out = self.denoiser(tokens.reshape(batch, frames, hp * wp, channels), rotary, encoder_hidden_states, band)
        return self.unpatchify(out.view(batch, frames, hp, wp, channels))

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: Optional[torch.Tensor],
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
        task: str = "flow",
        block_index: Optional[int] = None,
        kv_cache: Optional[StarFlowKVCache] = None,
        rotary_emb: Optional[torch.Tensor] = None,
        prepend_sos: bool = False,
    ):
        """Map data to noise: z = f(x) and log|det df/dx| (`task="flow"`, the default).

        Args:
            hidden_states: latents, (B, C, T, H, W) for a video model or (B, C, H, W) for an image model.
            encoder_hidden_states: (B, L, text_embed_dim) text embeddings, padding already zeroed.
            attention_kwargs: a `scale` entry scales the PEFT LoRA layers for this call.
            task: "flow"; or the network evaluations of sampling, reached through the methods that document
                them: "denoise" (`denoise`), "shallow" (`forward_shallow`), "block" (`evaluate_block`, which
                takes `block_index`, `kv_cache`, `rotary_emb` and `prepend_sos`).
        """
        if task == "flow":
            return self._flow(hidden_states, encoder_hidden_states, return_dict)
        if task == "block":
            block = self.blocks[block_index]
            text = encoder_hidden_states if block.text_proj is not None else None
            return block(hidden_states, rotary_emb, text, kv_cache=kv_cache, prepend_sos=prepend_sos)
        if task == "denoise":
            return self._denoise(hidden_states, encoder_hidden_states)
        if task == "shallow":
            self._check_input(hidden_states)
            tokens, logdets, _ = self._shallow_from_latents(hidden_states)
            return tokens, logdets
        raise ValueError(f"`task` must be one of 'flow', 'block', 'denoise', 'shallow', got {task!r}.")

    def denoise(
        self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The learned denoiser's prediction for a noisy latent, in the input's layout.

        Sampling applies it as `x - 0.3 * denoise(x)` (see `DENOISER_STEP`). Its attention is banded in time
        (`frame_band_attention`): memory grows linearly with the number of frames.
        """
        return self(hidden_states, encoder_hidden_states, task="denoise")

    def forward_shallow(self, latents: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The shallow blocks on latents (B, C, T, H, W) (or (B, C, H, W)): the deep block's input as (B, T, F, D)
        tokens in natural order, and each shallow block's (B,) logdet."""
        return self(latents, task="shallow")

    def evaluate_block(
        self,
        block_index: int,
        inputs: Optional[torch.Tensor],
        kv_cache: StarFlowKVCache,
        rotary_emb,
        text: Optional[torch.Tensor] = None,
        prepend_sos: bool = False,
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """One incremental evaluation of block `block_index` (negative indices count from the deep block)
        during sampling: writes `text` (deep block only) into `kv_cache`, then runs the (B, n, D) shifted
        block-order `inputs` after everything cached and returns their float32 (shift, scale); see
        `StarFlowFlowBlock.forward`. `rotary_emb` is the solve's `rotary_phases` table. Inputs and text must be
        in the compute dtype (`self.dtype`, which diffusers' layerwise casting reports)."""
        return self(
            inputs, text, task="block", block_index=block_index, kv_cache=kv_cache, rotary_emb=rotary_emb,
            prepend_sos=prepend_sos,
        )

    # ---- objectives ---------------------------------------------------------------------------------

    @staticmethod
    def nll_per_sample(output: StarFlowVTransformerOutput) -> torch.Tensor:
        """(B,) negative log-likelihood per dimension, without the constant 0.5 log(2 pi):
        0.5 mean(z^2) - logdet / numel (the training loss of spec section 3 before weighting)."""
        z = output.sample.float()
        per_sample = z[0].numel()
        return 0.5 * z.pow(2).flatten(1).mean(1) - output.logdet / per_sample

    @classmethod
    def from_single_file(
        cls, checkpoint_path: str, config: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None
    ) -> "StarFlowVTransformer":
        r"""
        Load an original STARFlow / STARFlow-V checkpoint (Apple's `.pth`, or a `.safetensors` of the same
        state dict) without converting it to a folder first, as diffusers' `from_single_file` does for other
        original checkpoints.

        Args:
            checkpoint_path (`str`): the local checkpoint file.
            config (`str`, *optional*): the original training YAML, or a diffusers transformer folder (or its
                config.json); default: the `.yaml` beside the checkpoint with the same name.
            torch_dtype (`torch.dtype`, *optional*): dtype of the weights; default: as stored.

        The file is unpickled weights-only (a pickle holding anything but tensors is refused) and memory-mapped,
        and its tensors are assigned into a model built on the meta device, so peak memory stays near one copy
        of the weights. Keys and shapes are checked against the config; errors name every offending key.

        Examples:
            ```py
            >>> transformer = StarFlowVTransformer.from_single_file(
            ...     "starflow-v_7B_t2v_caus_480p.pth", config="starflow-v_7B_t2v_caus_480p.yaml", torch_dtype=torch.bfloat16
            ... )
            ```
        """
        from ..conversion.convert_starflow import transformer_from_single_file

        return transformer_from_single_file(checkpoint_path, config, torch_dtype)[0]

    @classmethod
    def nll_loss(cls, output: StarFlowVTransformerOutput, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training loss: per-sample NLL (see `nll_per_sample`), times optional (B,) weights, batch mean."""
        loss = cls.nll_per_sample(output)
        if weights is not None:
            loss = loss * weights
        return loss.mean()

    @classmethod
    def bits_per_dim(cls, output: StarFlowVTransformerOutput) -> torch.Tensor:
        """(B,) full Gaussian negative log-likelihood per dimension, in bits."""
        return (cls.nll_per_sample(output) + 0.5 * math.log(2 * math.pi)) / math.log(2)
