"""Fast unit tests of `StarFlowVTransformer` on tiny random models built in-process (no downloads).

Two configurations: a video model (per-frame shallow blocks, text-conditioned deep block, learned denoiser)
and an image model (4-D input, patch size 2, no denoiser). Weights come from a fixed seed; `proj_out` and
`sos_embed` (and the norms) get non-trivial random values so that no block is the identity.
"""

import math

import pytest
import torch

from starflow_diffusers import StarFlowVTransformer, StarFlowVTransformerOutput
from starflow_diffusers.models.transformer_starflow_v import (
    INV_SOFTPLUS_ONE,
    ROPE_THETA,
    StarFlowAttention,
    StarFlowFlowBlock,
    StarFlowKVCache,
    StarFlowRMSNorm,
    apply_rotary,
    denoiser_attention_mask,
    rope_angles,
    rope_positions,
)


VIDEO_CONFIG = dict(
    in_channels=4,
    patch_size=1,
    num_layers_per_block=(1, 1, 2),
    shallow_width=32,
    deep_width=64,
    attention_head_dim=32,
    mlp_ratio=2.0,
    text_embed_dim=8,
    max_text_length=5,
    rope_base_size=4,
    output_soft_clip=4.0,
    is_video=True,
    shallow_blocks_per_frame=True,
    denoiser_num_layers=1,  # one layer: the denoiser's receptive field is exactly its attention mask
    denoiser_text_conditioned=True,
    denoiser_window=2,
    denoiser_lookahead=1,
    noise_std=0.5,
    trained_latent_frames=3,
    sample_size=4,
)

IMAGE_CONFIG = dict(
    VIDEO_CONFIG,
    patch_size=2,
    is_video=False,
    shallow_blocks_per_frame=False,
    denoiser_num_layers=0,
    noise_std=0.3,
    trained_latent_frames=None,
    sample_size=8,
)

BATCH, FRAMES, SIDE, TEXT_LEN, TEXT_DIM = 2, 3, 4, 5, 8
IMAGE_SIDE = 8  # 4x4 tokens of 2x2 patches


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero/one-initialised parameters (proj_out, sos_embed, norms) non-trivial random values."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "proj_out" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
            elif "sos_embed" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "norm" in name:  # LayerNorm weight 1 / bias 0, RMSNorm offset 0
                base = 1.0 if (leaf == "weight" and "norm_out" not in name) else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def make_model(kind: str = "video", seed: int = 0, **overrides) -> StarFlowVTransformer:
    config = dict(VIDEO_CONFIG if kind == "video" else IMAGE_CONFIG, **overrides)
    torch.manual_seed(seed)
    return _randomize(StarFlowVTransformer(**config), seed)


def make_inputs(kind: str = "video", batch: int = BATCH, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    if kind == "video":
        x = torch.randn(batch, 4, FRAMES, SIDE, SIDE, generator=gen)
    else:
        x = torch.randn(batch, 4, IMAGE_SIDE, IMAGE_SIDE, generator=gen)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen)
    text[:, -1] = 0.0  # a padded text position, as the text encoder output is masked
    return x, text


def max_err(a, b) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _block_calls(model: StarFlowVTransformer, x: torch.Tensor, text: torch.Tensor):
    """Every flow block as the model calls it in `forward`: (block, its input tokens, rotary tables, text).

    Tokens are (B', T', F, D) in natural order; per-frame shallow blocks see (B*T, 1, F, D).
    """
    tokens = model.patchify(x)
    b, t, hp, wp, d = tokens.shape
    tokens = tokens.reshape(b, t, hp * wp, d)
    calls = []
    with torch.no_grad():
        for block in model.shallow_blocks:
            if model.config.shallow_blocks_per_frame:
                inp, rotary = tokens.reshape(b * t, 1, hp * wp, d), model.rotary_embedding(1, hp, wp, 0)
            else:
                inp, rotary = tokens, model.rotary_embedding(t, hp, wp, 0)
            calls.append((block, inp, rotary, None))
            tokens = block(inp, rotary)[0].view(b, t, hp * wp, d)
        calls.append((model.deep_block, tokens, model.rotary_embedding(t, hp, wp, text.shape[1]), text))
    return calls


def invert_block_sequential(block: StarFlowFlowBlock, z: torch.Tensor, rotary, text=None):
    """Noise -> data for one block, one token per network call through the KV cache.

    z is (B, T, F, D) in natural order; returns (u in natural order, float32 (B,) logdet of the forward map).
    """
    batch, frames, per_frame, channels = z.shape
    n = frames * per_frame
    z_block = block.permute(z).reshape(batch, n, channels).float()
    text_length = 0 if text is None else text.shape[1]
    cache = block.init_cache(batch, text_length + n)
    if text is not None:
        block.prefill_text(text, cache, rotary)
    u = torch.zeros(batch, n, channels)
    logdet = torch.zeros(batch)
    step_input = block.sos_embed.expand(batch, 1, channels)
    for j in range(n):
        shift, scale = block.evaluate_chunk(step_input, cache, rotary)
        u[:, j] = shift[:, 0] + scale[:, 0] * z_block[:, j]
        logdet -= scale[:, 0].log().sum(-1)
        step_input = u[:, j : j + 1]
    assert cache.length == text_length + n
    return block.permute(u.view(batch, frames, per_frame, channels)), logdet


# ----------------------------------------------------------------------------------------------------------
# Output contract
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["video", "image"])
def test_forward_output_contract(kind):
    model = make_model(kind)
    x, text = make_inputs(kind)
    with torch.no_grad():
        out = model(x, text)
        as_tuple = model(x, text, return_dict=False)
    assert isinstance(out, StarFlowVTransformerOutput)
    assert out.sample.shape == x.shape and out.sample.dtype == x.dtype
    assert out.logdet.shape == (BATCH,) and out.logdet.dtype == torch.float32
    assert len(out.block_logdets) == len(model.blocks) == 3
    for logdet in out.block_logdets:
        assert logdet.shape == (BATCH,)
    torch.testing.assert_close(torch.stack(out.block_logdets).sum(0), out.logdet)
    # the flow is not trivial: it moves the input and has a non-zero logdet in every block
    assert max_err(out.sample, x) > 1e-2
    assert all(logdet.abs().min() > 1e-3 for logdet in out.block_logdets)

    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    assert torch.equal(as_tuple[0], out.sample)
    assert torch.equal(as_tuple[1], out.logdet)
    assert len(as_tuple[2]) == len(out.block_logdets)
    for a, b in zip(as_tuple[2], out.block_logdets):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_logdet_is_the_log_determinant_of_the_jacobian(kind):
    model = make_model(kind)
    x, text = make_inputs(kind, batch=1)
    # a small input keeps the dense Jacobian cheap: 2 frames of 2x2 (video), 4x4 pixels in 2x2 patches (image)
    x = x[:, :, :2, :2, :2] if kind == "video" else x[:, :, :4, :4]
    jac = torch.autograd.functional.jacobian(lambda v: model(v, text).sample, x, vectorize=True)
    jac = jac.reshape(x.numel(), x.numel()).double()
    sign, logabsdet = torch.linalg.slogdet(jac)
    with torch.no_grad():
        logdet = model(x, text).logdet
    assert sign.item() == 1.0  # every block is triangular with a positive diagonal
    assert abs(logabsdet.item() - logdet.item()) < 1e-3 * max(1.0, abs(logdet.item()))


@pytest.mark.parametrize("kind", ["video", "image"])
def test_batch_elements_are_independent(kind):
    model = make_model(kind)
    x, text = make_inputs(kind)
    with torch.no_grad():
        out = model(x, text)
        single = model(x[1:], text[1:])
    torch.testing.assert_close(single.sample[0], out.sample[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single.logdet[0], out.logdet[1], atol=1e-4, rtol=1e-5)


def test_block_permutations_follow_spec():
    # spec: shallow block i uses perms[(i + 1) % 2], the deep block perms[K % 2], perms = [identity, flip]
    for layers in [(1, 1, 2), (1, 1, 1, 1, 1, 2)]:
        model = StarFlowVTransformer(**dict(VIDEO_CONFIG, num_layers_per_block=layers, denoiser_num_layers=0))
        k = len(layers)
        expected = [(i + 1) % 2 == 1 for i in range(k - 1)] + [k % 2 == 1]
        assert [block.flip for block in model.blocks] == expected
    # video "flip" reverses the tokens inside each frame and keeps the frame order
    tokens = torch.arange(2 * 3).view(1, 2, 3, 1)
    assert make_model("video").blocks[0].permute(tokens).flatten().tolist() == [2, 1, 0, 5, 4, 3]
    assert make_model("video").blocks[1].permute(tokens).flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_patchify_channel_order_and_round_trip():
    model = make_model("image")
    x, _ = make_inputs("image")
    tokens = model.patchify(x)
    p, c = 2, 4
    assert tokens.shape == (BATCH, 1, IMAGE_SIDE // p, IMAGE_SIDE // p, p * p * c)
    # spec section 1: c (h p1) (w p2) -> h w (p1 p2 c)
    for i, j, p1, p2, ch in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 3), (3, 3, 1, 1, 2), (2, 1, 0, 1, 1)]:
        assert tokens[1, 0, i, j, (p1 * p + p2) * c + ch] == x[1, ch, i * p + p1, j * p + p2]
    assert torch.equal(model.unpatchify(tokens), x)
    video = make_model("video")
    xv, _ = make_inputs("video")
    assert torch.equal(video.unpatchify(video.patchify(xv)), xv)


def test_text_only_reaches_the_deep_block():
    model = make_model("video")
    x, text = make_inputs("video")
    with torch.no_grad():
        out = model(x, text)
        other = model(x, text + 0.5)
    for a, b in zip(out.block_logdets[:-1], other.block_logdets[:-1]):
        assert torch.equal(a, b)
    assert max_err(out.block_logdets[-1], other.block_logdets[-1]) > 1e-4
    assert max_err(out.sample, other.sample) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Exact invertibility and the sampling building blocks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,index", [("video", 0), ("video", 1), ("video", 2), ("image", 0), ("image", 2)])
def test_flow_block_is_inverted_by_sequential_kv_cache_solve(kind, index):
    model = make_model(kind)
    x, text = make_inputs(kind)
    block, inputs, rotary, block_text = _block_calls(model, x, text)[index]
    with torch.no_grad():
        z, logdet = block(inputs, rotary, block_text)
        recovered, inverse_logdet = invert_block_sequential(block, z, rotary, block_text)
    assert max_err(z, inputs) > 1e-2  # not the identity
    assert max_err(recovered, inputs) < 1e-5
    torch.testing.assert_close(inverse_logdet, logdet, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_whole_model_inverse_recovers_the_input(kind):
    model = make_model(kind)
    x, text = make_inputs(kind)
    with torch.no_grad():
        out = model(x, text)
        tokens = model.patchify(out.sample)
        b, t, hp, wp, d = tokens.shape
        tokens = tokens.reshape(b, t, hp * wp, d)
        tokens, _ = invert_block_sequential(
            model.deep_block, tokens, model.rotary_embedding(t, hp, wp, TEXT_LEN), text
        )
        for block in reversed(model.shallow_blocks):
            if model.config.shallow_blocks_per_frame:
                frames = tokens.reshape(b * t, 1, hp * wp, d)
                tokens = invert_block_sequential(block, frames, model.rotary_embedding(1, hp, wp, 0))[0]
            else:
                tokens = invert_block_sequential(block, tokens, model.rotary_embedding(t, hp, wp, 0))[0]
        recovered = model.unpatchify(tokens.reshape(b, t, hp, wp, d))
    assert recovered.shape == x.shape
    assert max_err(recovered, x) < 1e-4


@pytest.mark.parametrize("kind,index", [("video", 0), ("video", 2), ("image", 0), ("image", 2)])
def test_evaluate_chunk_on_whole_sequence_matches_forward(kind, index):
    model = make_model(kind)
    x, text = make_inputs(kind)
    block, inputs, rotary, block_text = _block_calls(model, x, text)[index]
    batch, frames, per_frame, channels = inputs.shape
    with torch.no_grad():
        z, _ = block(inputs, rotary, block_text)
        u = block.permute(inputs).reshape(batch, frames * per_frame, channels)
        text_length = 0 if block_text is None else block_text.shape[1]
        cache = block.init_cache(batch, text_length + frames * per_frame)
        if block_text is not None:
            block.prefill_text(block_text, cache, rotary)
            assert cache.length == text_length
        shift, scale = block.evaluate_chunk(block.shifted_inputs(u), cache, rotary)
    assert shift.dtype == scale.dtype == torch.float32
    assert shift.shape == scale.shape == u.shape
    assert (scale > 0).all()
    z_chunk = block.permute(((u - shift) / scale).view(batch, frames, per_frame, channels))
    assert max_err(z_chunk, z) < 1e-5


def _deep_block_setup(model, x, text):
    block, inputs, rotary, block_text = _block_calls(model, x, text)[-1]
    batch, frames, per_frame, channels = inputs.shape
    u = block.permute(inputs).reshape(batch, frames * per_frame, channels)
    return block, block.shifted_inputs(u), rotary, block_text


def test_kv_cache_chunks_truncate_and_overflow():
    model = make_model("video")
    x, text = make_inputs("video")
    block, shifted, rotary, block_text = _deep_block_setup(model, x, text)
    n = shifted.shape[1]
    with torch.no_grad():
        cache = block.init_cache(BATCH, TEXT_LEN + n)
        block.prefill_text(block_text, cache, rotary)
        full = block.evaluate_chunk(shifted, cache, rotary)
        assert cache.length == TEXT_LEN + n

        # the same sequence in two chunks, through the cache
        cache.truncate(TEXT_LEN)
        assert cache.length == TEXT_LEN
        head = block.evaluate_chunk(shifted[:, :20], cache, rotary)
        mark = cache.length
        assert mark == TEXT_LEN + 20
        tail = block.evaluate_chunk(shifted[:, 20:], cache, rotary)
        for whole, a, b in zip(full, head, tail):
            assert max_err(torch.cat([a, b], dim=1), whole) < 1e-5

        # roll back and evaluate something else, then roll back and re-evaluate the tail: identical
        cache.truncate(mark)
        garbage = block.evaluate_chunk(shifted[:, 20:] + 1.0, cache, rotary)
        assert max_err(garbage[0], tail[0]) > 1e-3
        cache.truncate(mark)
        again = block.evaluate_chunk(shifted[:, 20:], cache, rotary)
        for a, b in zip(again, tail):
            assert torch.equal(a, b)

        # a single token after the prefix
        cache.truncate(mark)
        one = block.evaluate_chunk(shifted[:, 20:21], cache, rotary)
        for a, b in zip(one, tail):
            assert max_err(a, b[:, :1]) < 1e-5

        # overflow
        small = block.init_cache(BATCH, 4)
        with pytest.raises(ValueError, match="overflow"):
            block.evaluate_chunk(shifted[:, :5], small, rotary)
        block.evaluate_chunk(shifted[:, :4], small, rotary)
        with pytest.raises(ValueError, match="overflow"):
            block.evaluate_chunk(shifted[:, 4:5], small, rotary)
    # truncate clamps to [0, length]
    cache.truncate(10**6)
    assert cache.length == TEXT_LEN + 21
    cache.truncate(-3)
    assert cache.length == 0


def test_kv_cache_keep_batch():
    model = make_model("video")
    x, text = make_inputs("video")
    block, shifted, rotary, block_text = _deep_block_setup(model, x, text)
    with torch.no_grad():
        cache = block.init_cache(BATCH, TEXT_LEN + 10)
        block.prefill_text(block_text, cache, rotary)
        cache.keep_batch(slice(1, 2))
        assert cache.batch_size == 1
        kept = block.evaluate_chunk(shifted[1:, :10], cache, rotary)
        fresh_cache = block.init_cache(1, TEXT_LEN + 10)
        block.prefill_text(block_text[1:], fresh_cache, rotary)
        fresh = block.evaluate_chunk(shifted[1:, :10], fresh_cache, rotary)
    for a, b in zip(kept, fresh):
        assert max_err(a, b) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_dtype_follows_model_and_nbytes(dtype):
    model = make_model("video")
    x, text = make_inputs("video")
    block, shifted, rotary, block_text = _deep_block_setup(model, x, text)
    model.to(dtype)
    assert block.proj_in.weight.dtype == dtype
    cache = block.init_cache(BATCH, 30)
    assert isinstance(cache, StarFlowKVCache)
    assert cache.max_length == 30 and cache.batch_size == BATCH and cache.length == 0 and cache.nbytes == 0
    layers, heads, head_dim = 2, 64 // 32, 32
    with torch.no_grad():
        block.prefill_text(block_text.to(dtype), cache, rotary)
        shift, scale = block.evaluate_chunk(shifted[:, :8].to(dtype), cache, rotary)
    buffers = cache.layer_keys + cache.layer_values
    assert len(buffers) == 2 * layers and all(t.dtype == dtype for t in buffers)
    assert all(t.shape == (BATCH, heads, 30, head_dim) for t in buffers)
    element = torch.tensor([], dtype=dtype).element_size()
    assert cache.nbytes == 2 * layers * BATCH * heads * 30 * head_dim * element
    assert cache.length == TEXT_LEN + 8
    assert all(t[:, :, : TEXT_LEN + 8].abs().sum() > 0 for t in buffers)
    assert shift.dtype == scale.dtype == torch.float32
    assert torch.isfinite(shift).all() and torch.isfinite(scale).all()


# ----------------------------------------------------------------------------------------------------------
# Causality
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [1, 2])
def test_video_model_is_causal_in_time(frame):
    model = make_model("video")
    x, text = make_inputs("video")
    changed = x.clone()
    changed[:, :, frame] += torch.randn_like(changed[:, :, frame])
    with torch.no_grad():
        out = model(x, text).sample
        out_changed = model(changed, text).sample
    assert max_err(out_changed[:, :, :frame], out[:, :, :frame]) < 1e-6
    assert max_err(out_changed[:, :, frame:], out[:, :, frame:]) > 1e-3


def test_shallow_blocks_are_local_to_their_frame():
    model = make_model("video")
    x, text = make_inputs("video")
    changed = x.clone()
    changed[:, :, 1] += 1.0
    with torch.no_grad():
        calls, calls_changed = _block_calls(model, x, text), _block_calls(model, changed, text)
    deep_in, deep_in_changed = calls[-1][1], calls_changed[-1][1]  # (B, T, F, D)
    assert max_err(deep_in[:, 0], deep_in_changed[:, 0]) == 0.0
    assert max_err(deep_in[:, 2], deep_in_changed[:, 2]) == 0.0
    assert max_err(deep_in[:, 1], deep_in_changed[:, 1]) > 1e-3


@pytest.mark.parametrize("kind,index", [("video", 0), ("video", 1), ("video", 2), ("image", 0), ("image", 1)])
@pytest.mark.parametrize("position", ["last", "middle"])
def test_flow_block_is_autoregressive_in_its_own_order(kind, index, position):
    model = make_model(kind)
    x, text = make_inputs(kind)
    block, inputs, rotary, block_text = _block_calls(model, x, text)[index]
    batch, frames, per_frame, channels = inputs.shape
    n = frames * per_frame
    j = n - 1 if position == "last" else n // 2
    u = block.permute(inputs).reshape(batch, n, channels)
    u_changed = u.clone()
    u_changed[:, j] += 1.0
    with torch.no_grad():
        z = block(inputs, rotary, block_text)[0]
        back = block.permute(u_changed.view(batch, frames, per_frame, channels))
        z_changed = block(back, rotary, block_text)[0]
    z, z_changed = (block.permute(t).reshape(batch, n, channels) for t in (z, z_changed))
    assert max_err(z_changed[:, :j], z[:, :j]) < 1e-6
    assert max_err(z_changed[:, j], z[:, j]) > 1e-3
    if j < n - 1:
        assert max_err(z_changed[:, j + 1 :], z[:, j + 1 :]) > 1e-4


def test_image_model_raster_last_token_only_moves_its_own_z():
    # image model with 3 blocks: blocks 0 and 2 are flipped (the raster-last token comes first there);
    # in block 1 (identity order) the raster-last token is the last position and changes nothing before it.
    model = make_model("image")
    x, text = make_inputs("image")
    block, inputs, rotary, _ = _block_calls(model, x, text)[1]
    assert not block.flip
    changed = inputs.clone()
    changed[:, :, -1] -= 2.0
    with torch.no_grad():
        z, z_changed = block(inputs, rotary)[0], block(changed, rotary)[0]
    assert max_err(z_changed[:, :, :-1], z[:, :, :-1]) < 1e-6
    assert max_err(z_changed[:, :, -1], z[:, :, -1]) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Learned denoiser
# ----------------------------------------------------------------------------------------------------------


def test_denoise_shape_and_band():
    model = make_model("video")
    x, text = make_inputs("video")
    with torch.no_grad():
        out = model.denoise(x, text)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.abs().max() > 1e-3
        # window 2, lookahead 1, one layer: frame f sees frames f-1 .. f+1 only
        far = x.clone()
        far[:, :, 2] += 1.0
        out_far = model.denoise(far, text)
        assert max_err(out_far[:, :, 0], out[:, :, 0]) < 1e-6
        assert max_err(out_far[:, :, 1], out[:, :, 1]) > 1e-4
        past = x.clone()
        past[:, :, 0] += 1.0
        out_past = model.denoise(past, text)
        assert max_err(out_past[:, :, 2], out[:, :, 2]) < 1e-6
        assert max_err(out_past[:, :, 1], out[:, :, 1]) > 1e-4
        # text-conditioned
        assert max_err(model.denoise(x, text + 1.0), out) > 1e-4
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model.denoise(x)


def test_denoise_without_text_conditioning():
    model = make_model("video", denoiser_text_conditioned=False)
    assert model.denoiser.text_proj is None
    x, text = make_inputs("video")
    with torch.no_grad():
        out = model.denoise(x)
        assert out.shape == x.shape
        assert torch.equal(model.denoise(x, text), out)


def test_denoise_on_image_model_raises():
    model = make_model("image")
    assert not model.has_denoiser
    x, text = make_inputs("image")
    with pytest.raises(ValueError, match="denoiser"):
        model.denoise(x, text)


def _spec_denoiser_mask(text_length, frames, per_frame, window, lookahead):
    """Spec section 4, literally: A = temporal_causal = lookahead + 1, G = window."""
    a, g = lookahead + 1, window
    total = text_length + frames * per_frame
    mask = torch.zeros(total, total, dtype=torch.bool)
    for q in range(total):
        for k in range(total):
            f_q = (q - text_length) // per_frame  # Python floor division, also for text rows
            f_k = (k - text_length) // per_frame
            mask[q, k] = k < text_length or (
                f_k >= f_q + a - 1 - g and f_k <= max(q - text_length, 0) // per_frame + a - 1
            )
    return mask


@pytest.mark.parametrize(
    "text_length,frames,per_frame,window,lookahead",
    [(3, 4, 2, 2, 1), (0, 5, 3, 1, 0), (2, 6, 1, 10, 1), (4, 5, 3, 3, 2), (5, 3, 16, 2, 1)],
)
def test_denoiser_attention_mask_matches_spec(text_length, frames, per_frame, window, lookahead):
    mask = denoiser_attention_mask(text_length, frames, per_frame, window, lookahead)
    expected = _spec_denoiser_mask(text_length, frames, per_frame, window, lookahead)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_denoiser_attention_mask_released_band():
    # A = 2, G = 10: a query in frame f sees frames f-9 .. f+1
    mask = denoiser_attention_mask(0, 14, 1, 10, 1)
    assert mask[12].nonzero().flatten().tolist() == list(range(3, 14))
    assert mask[0].nonzero().flatten().tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["video", "image"])
def test_nll_loss_and_bits_per_dim(kind):
    model = make_model(kind)
    x, text = make_inputs(kind)
    with torch.no_grad():
        out = model(x, text)
    numel = x[0].numel()
    per_sample = 0.5 * out.sample.pow(2).flatten(1).mean(1) - out.logdet / numel
    # spec section 3: sum over blocks of mean(logdet_block)
    per_sample_spec = 0.5 * out.sample.pow(2).flatten(1).mean(1) - sum(l / numel for l in out.block_logdets)
    torch.testing.assert_close(per_sample, per_sample_spec)
    torch.testing.assert_close(model.nll_per_sample(out), per_sample)
    torch.testing.assert_close(model.nll_loss(out), per_sample.mean())
    weights = torch.tensor([0.5, 3.0])
    torch.testing.assert_close(model.nll_loss(out, weights=weights), (per_sample * weights).mean())
    assert abs(model.nll_loss(out, weights=weights).item() - model.nll_loss(out).item()) > 1e-4
    bpd = model.bits_per_dim(out)
    assert bpd.shape == (BATCH,)
    torch.testing.assert_close(bpd, (per_sample + 0.5 * math.log(2 * math.pi)) / math.log(2))


# ----------------------------------------------------------------------------------------------------------
# Fused projections, gradient checkpointing
# ----------------------------------------------------------------------------------------------------------


def test_fuse_and_unfuse_projections():
    model = make_model("video")
    x, text = make_inputs("video")
    with torch.no_grad():
        reference = model(x, text)
        reference_denoise = model.denoise(x, text)
    attentions = [m for m in model.modules() if isinstance(m, StarFlowAttention)]
    assert len(attentions) == 1 + 1 + 2 + 1  # shallow, shallow, deep (2 layers), denoiser
    model.fuse_qkv_projections()
    for attn in attentions:
        assert attn.fused_projections and isinstance(attn.to_qkv, torch.nn.Linear)
        assert attn.to_qkv.weight.shape == (3 * attn.to_q.weight.shape[0], attn.to_q.weight.shape[1])
    with torch.no_grad():
        # the fused path is really used: perturbing the separate projections changes nothing
        saved = [attn.to_q.weight.clone() for attn in attentions]
        for attn in attentions:
            attn.to_q.weight.add_(1.0)
        fused = model(x, text)
        fused_denoise = model.denoise(x, text)
        for attn, weight in zip(attentions, saved):
            attn.to_q.weight.copy_(weight)
    assert max_err(fused.sample, reference.sample) < 1e-5
    assert max_err(fused.logdet, reference.logdet) < 1e-4
    assert max_err(fused_denoise, reference_denoise) < 1e-5
    model.unfuse_qkv_projections()
    for attn in attentions:
        assert not attn.fused_projections and not hasattr(attn, "to_qkv")
    with torch.no_grad():
        unfused = model(x, text)
    assert torch.equal(unfused.sample, reference.sample)


def _loss_and_grads(model, x, text):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, text)
    loss = model.nll_loss(out, weights=torch.tensor([1.0, 2.0])) + model.denoise(x, text).pow(2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), x.grad.clone(), grads


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = make_model("video")
    model.train()
    x, text = make_inputs("video")
    loss, x_grad, grads = _loss_and_grads(model, x, text)
    assert len(grads) == len(list(model.parameters()))

    calls = []

    def counting_checkpoint(module, *args):
        calls.append(module)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=counting_checkpoint)
    assert model.gradient_checkpointing or model.is_gradient_checkpointing
    stacks = list(model.blocks) + [model.denoiser]
    assert all(stack.gradient_checkpointing for stack in stacks)
    loss_ckpt, x_grad_ckpt, grads_ckpt = _loss_and_grads(model, x, text)
    # every transformer layer of every stack went through the checkpoint function (3 frames per shallow layer
    # are one batched call)
    assert len(calls) == sum(len(stack.layers) for stack in stacks)
    torch.testing.assert_close(loss_ckpt, loss)
    torch.testing.assert_close(x_grad_ckpt, x_grad, atol=1e-6, rtol=1e-5)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)

    # no checkpointing without grad or through a KV cache
    calls.clear()
    with torch.no_grad():
        model(x, text)
    block, shifted, rotary, block_text = _deep_block_setup(model, x, text)
    cache = block.init_cache(BATCH, TEXT_LEN + 4)
    block.prefill_text(block_text, cache, rotary)
    block.evaluate_chunk(shifted[:, :4], cache, rotary)
    assert calls == []

    model.disable_gradient_checkpointing()
    assert not any(stack.gradient_checkpointing for stack in stacks)


# ----------------------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["video", "image"])
def test_save_and_load_round_trip(kind, tmp_path):
    model = make_model(kind)
    x, text = make_inputs(kind)
    model.save_pretrained(tmp_path)
    loaded = StarFlowVTransformer.from_pretrained(tmp_path).eval()
    for key in model.config:
        value, loaded_value = model.config[key], loaded.config[key]
        if isinstance(value, tuple):
            value, loaded_value = list(value), list(loaded_value)
        assert loaded_value == value, key
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    with torch.no_grad():
        out, out_loaded = model(x, text), loaded(x, text)
    assert torch.equal(out.sample, out_loaded.sample)
    assert torch.equal(out.logdet, out_loaded.logdet)

    bf16 = StarFlowVTransformer.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    assert bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():
        out_bf16 = bf16(x.bfloat16(), text.bfloat16())
    assert out_bf16.sample.dtype == torch.bfloat16 and out_bf16.sample.shape == x.shape
    assert out_bf16.logdet.dtype == torch.float32
    assert torch.isfinite(out_bf16.sample.float()).all() and torch.isfinite(out_bf16.logdet).all()
    assert max_err(out_bf16.sample, out.sample) < 0.25
    assert max_err(out_bf16.logdet, out.logdet) < 0.05 * out.logdet.abs().max().item() + 0.5


# ----------------------------------------------------------------------------------------------------------
# PEFT / LoRA
# ----------------------------------------------------------------------------------------------------------


def test_lora_adapter_scale_and_disable():
    from peft import LoraConfig

    model = make_model("video")
    x, text = make_inputs("video")
    with torch.no_grad():
        base = model(x, text).sample
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    with torch.no_grad():
        adapted = model(x, text).sample
        zero_scale = model(x, text, attention_kwargs={"scale": 0.0}).sample
        adapted_again = model(x, text).sample  # the scale is restored after the call
        half_scale = model(x, text, attention_kwargs={"scale": 0.5}).sample
        model.disable_adapters()
        disabled = model(x, text).sample
        model.enable_adapters()
        enabled = model(x, text).sample
    assert max_err(adapted, base) > 1e-3
    assert max_err(zero_scale, base) < 1e-6
    assert max_err(adapted_again, adapted) < 1e-6
    assert max_err(half_scale, base) > 1e-4 and max_err(half_scale, adapted) > 1e-4
    assert max_err(disabled, base) < 1e-6
    assert max_err(enabled, adapted) < 1e-6


# ----------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------


def _bad_inputs(kind):
    x, text = make_inputs(kind)
    cases = [
        ("wrong ndim", x[:, :, 0] if kind == "video" else x[:, :, None], text, "hidden_states"),
        ("wrong channels", torch.cat([x, x[:, :1]], dim=1), text, "hidden_states"),
        ("missing text", x, None, "encoder_hidden_states"),
        ("text dim", x, text[..., :-1], "encoder_hidden_states"),
        ("text ndim", x, text[:, 0], "encoder_hidden_states"),
        ("text batch", x, text[:1], "encoder_hidden_states"),
    ]
    if kind == "image":
        cases.append(("patch size", x[..., :7], text, "hidden_states.*patch_size"))
        cases.append(("patch size rows", x[..., :7, :], text, "hidden_states.*patch_size"))
    return cases


INPUT_CASES = [("video", label) for label, *_ in _bad_inputs("video")] + [
    ("image", label) for label, *_ in _bad_inputs("image")
]


@pytest.mark.parametrize("kind,label", INPUT_CASES)
def test_input_validation(kind, label):
    model = make_model(kind)
    (x, text, pattern), = [case[1:] for case in _bad_inputs(kind) if case[0] == label]
    with pytest.raises(ValueError, match=pattern):
        model(x, text)
    if kind == "video" and label != "missing text":
        with pytest.raises(ValueError, match=pattern):
            model.denoise(x, text)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(num_layers_per_block=(2,)), "num_layers_per_block"),
        (dict(num_layers_per_block=(1, 0, 2)), "num_layers_per_block"),
        (dict(shallow_width=48), "shallow_width"),
        (dict(deep_width=80), "deep_width"),
        (dict(attention_head_dim=16, shallow_width=32, deep_width=64), "attention_head_dim"),
        (dict(attention_head_dim=22, shallow_width=44, deep_width=88), "attention_head_dim"),
        (dict(text_embed_dim=0), "text_embed_dim"),
    ],
)
def test_invalid_configs_raise(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        StarFlowVTransformer(**dict(VIDEO_CONFIG, **overrides))


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------------------


def test_rope_positions_match_spec():
    frames, height, width, text_length, base = 2, 2, 3, 4, 4
    positions = rope_positions(frames, height, width, text_length, base)
    assert positions.shape == (text_length + frames * height * width, 3)
    expected = []
    for k in range(text_length):
        expected.append([0.0, 0.0, k * base / text_length])
    for t in range(frames):
        for i in range(height):
            for j in range(width):
                expected.append([i * base / math.sqrt(height * width), j * base / math.sqrt(height * width), t])
    torch.testing.assert_close(positions, torch.tensor(expected), atol=1e-6, rtol=0)
    assert torch.equal(rope_positions(frames, height, width, 0, base), positions[text_length:])


def test_rope_angles_and_rotation_match_spec():
    head_dim = 32
    positions = rope_positions(2, 2, 3, 4, 4)
    cos, sin = rope_angles(positions, head_dim)
    assert cos.shape == sin.shape == (positions.shape[0], head_dim)
    half = head_dim // 2
    spatial = half - 8
    f = [ROPE_THETA ** (-2 * m / spatial) for m in range(spatial // 2)]
    g = [ROPE_THETA ** (-m / 8) for m in range(8)]
    for n, (a, b, c) in enumerate(positions.tolist()):
        angles = [a * fm for fm in f] + [b * fm for fm in f] + [c * gm for gm in g]
        assert len(angles) == half
        interleaved = torch.tensor([angle for angle in angles for _ in range(2)])
        torch.testing.assert_close(cos[n], interleaved.cos(), atol=1e-5, rtol=0)
        torch.testing.assert_close(sin[n], interleaved.sin(), atol=1e-5, rtol=0)

    x = torch.randn(1, 1, positions.shape[0], head_dim)
    rotated = apply_rotary(x, cos, sin)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, 0::2], sin[:, 0::2]
    torch.testing.assert_close(rotated[..., 0::2], x0 * c - x1 * s)
    torch.testing.assert_close(rotated[..., 1::2], x1 * c + x0 * s)


def test_model_rotary_embedding_uses_the_config():
    model = make_model("video")
    cos, sin = model.rotary_embedding(2, 2, 3, 4)
    ref_cos, ref_sin = rope_angles(rope_positions(2, 2, 3, 4, VIDEO_CONFIG["rope_base_size"]), 32)
    assert cos.dtype == torch.float32
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    # the position-dependence is real: tokens in the same frame at different positions differ
    assert max_err(cos[4], cos[5]) > 1e-3


def test_affine_parameters_follow_spec():
    # spec section 2, steps 6-8: out = s*tanh(proj_out(.)/s); first half a, second half b;
    # sigma = softplus(a + 0.5413...), z = (u - b) / sigma, logdet = -sum log sigma
    block = StarFlowFlowBlock(4, 32, 1, 32, 2.0, 0, 4.0, flip=False)
    a = torch.tensor([0.0, 1.0, -2.0, 10.0])  # 10 is soft-clipped to 4 tanh(2.5)
    b = torch.tensor([0.5, -1.0, 2.0, -20.0])
    with torch.no_grad():
        block.proj_out.weight.zero_()
        block.proj_out.bias.copy_(torch.cat([a, b]))
    clip = lambda v: 4.0 * torch.tanh(v / 4.0)
    sigma = torch.nn.functional.softplus(clip(a) + 0.541324854612918)
    tokens = torch.randn(2, 1, 6, 4)
    with torch.no_grad():
        z, logdet = block(tokens, rope_angles(rope_positions(1, 2, 3, 0, 4), 32))
    torch.testing.assert_close(z, (tokens - clip(b)) / sigma)
    torch.testing.assert_close(logdet, -6 * sigma.log().sum().expand(2))
    # soft clip disabled
    block.soft_clip = 0.0
    with torch.no_grad():
        z, _ = block(tokens, rope_angles(rope_positions(1, 2, 3, 0, 4), 32))
    torch.testing.assert_close(z, (tokens - b) / torch.nn.functional.softplus(a + 0.541324854612918))


def test_rms_norm_is_float32_with_offset_weight():
    norm = StarFlowRMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, 16))
    x = 3.0 * torch.randn(2, 5, 16)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + norm.weight)
    torch.testing.assert_close(norm(x), expected)
    out_bf16 = norm.to(torch.bfloat16)(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), expected, atol=5e-2, rtol=2e-2)


def _reference_layer(layer, x, cos, sin, causal=True):
    """Spec section 2, step 4 and Attention/RoPE, written out: x += attn(LN(x)); x += mlp(LN(x))."""
    batch, length, dim = x.shape
    attn = layer.attn
    heads, head_dim = attn.heads, attn.head_dim
    h = torch.nn.functional.layer_norm(x, (dim,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)

    def heads_of(linear):
        return linear(h).view(batch, length, heads, head_dim).transpose(1, 2)

    def rotate(t):
        x0, x1 = t[..., 0::2], t[..., 1::2]
        c, s = cos[:, 0::2], sin[:, 0::2]
        return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)

    q, k, v = rotate(heads_of(attn.to_q)), rotate(heads_of(attn.to_k)), heads_of(attn.to_v)
    scores = q @ k.transpose(-1, -2) * head_dim**-0.5
    if causal:
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim)
    x = x + attn.to_out[0](out)
    h = torch.nn.functional.layer_norm(x, (dim,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
    fc1, fc2 = [m for m in layer.ff.modules() if isinstance(m, torch.nn.Linear)]
    assert fc1.out_features == 2 * dim and fc1.bias is not None and fc2.bias is not None  # mlp_ratio 2
    return x + fc2(torch.nn.functional.gelu(fc1(h)))  # exact (erf) GELU


def test_transformer_layers_match_a_written_out_reference():
    model = make_model("video")
    x = torch.randn(2, 7, 64)
    cos, sin = rope_angles(rope_positions(1, 1, 7, 0, 4) + torch.tensor([0.0, 0.0, 1.5]), 32)
    with torch.no_grad():
        for layer in model.deep_block.layers:
            torch.testing.assert_close(layer(x, (cos, sin)), _reference_layer(layer, x, cos, sin), atol=1e-5, rtol=1e-5)
        layer = model.denoiser.layers[0]
        assert not layer.attn.is_causal
        x32 = x[..., :32]
        torch.testing.assert_close(
            layer(x32, (cos, sin)), _reference_layer(layer, x32, cos, sin, causal=False), atol=1e-5, rtol=1e-5
        )


def test_softplus_offset_is_identity_at_zero():
    assert abs(torch.nn.functional.softplus(torch.tensor(INV_SOFTPLUS_ONE, dtype=torch.float64)).item() - 1) < 1e-12
    # an untouched (zero proj_out, zero sos) block is the identity
    block = StarFlowFlowBlock(4, 32, 1, 32, 2.0, 0, 4.0, flip=True)
    torch.nn.init.zeros_(block.proj_out.weight)
    torch.nn.init.zeros_(block.proj_out.bias)
    tokens = torch.randn(2, 1, 6, 4)
    with torch.no_grad():
        z, logdet = block(tokens, rope_angles(rope_positions(1, 2, 3, 0, 4), 32))
    torch.testing.assert_close(z, tokens)
    assert logdet.abs().max() < 1e-6


def test_fresh_flow_blocks_start_as_elementwise_maps():
    torch.manual_seed(0)
    model = StarFlowVTransformer(**VIDEO_CONFIG).eval()
    for block in [*model.blocks, model.denoiser]:
        assert torch.count_nonzero(block.proj_out.weight) == 0
    # then z_j depends on x_j only: changing one element of the input changes only that element of z
    x, text = make_inputs("video")
    changed = x.clone()
    changed[:, 0, 0, 0, 0] += 1.0
    with torch.no_grad():
        delta = (model(changed, text).sample - model(x, text).sample).abs() > 0
    assert delta.sum() == BATCH
