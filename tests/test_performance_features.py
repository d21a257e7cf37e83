"""Inference-speed features: fused q/k/v projections in the pipeline, chunk attention on CPU, the KV cache in
the model dtype, per-sequence Jacobi convergence, and torch.compile without graph breaks in the chunk
evaluation.

No timing assertions here: the speed targets live in benchmarks/sampling_speed.py."""

import pytest
import torch

from starflow_diffusers import JacobiFlowScheduler, StarFlowVTransformer
from starflow_diffusers.models.transformer_starflow_v import (
    StarFlowFlowBlock,
    StarFlowKVCache,
    additive_mask,
    apply_rotary,
    chunk_attention,
    prefix_causal_mask,
    rope_angles,
    rope_positions,
    rotary_phases,
    rotate_pairs,
    use_chunk_attention,
)
from starflow_diffusers.testing_utils import tiny_pipeline, tiny_transformer


def sample(pipe, prompt="a red circle moving left", batch_seed=0, frames=3, **kwargs):
    return pipe(
        prompt, height=2, width=2, num_frames=frames, generator=torch.Generator().manual_seed(batch_seed),
        output_type="latent", **kwargs,
    ).frames


class CountingEvaluations:
    def __init__(self, monkeypatch):
        self.calls = 0
        evaluate = StarFlowVTransformer.evaluate_block

        def counted(model, block_index, inputs, *args, **kwargs):
            self.calls += inputs is not None  # the text prefill is not a chunk evaluation
            return evaluate(model, block_index, inputs, *args, **kwargs)

        monkeypatch.setattr(StarFlowVTransformer, "evaluate_block", counted)


def test_fused_projections_give_the_same_samples(monkeypatch):
    pipe = tiny_pipeline(with_vae=False)
    counter = CountingEvaluations(monkeypatch)
    reference = sample(pipe)
    calls = counter.calls
    pipe.transformer.fuse_qkv_projections()
    fused = sample(pipe)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    assert counter.calls == 2 * calls  # same solve, same number of network evaluations


def test_fused_projections_step_aside_for_an_unmerged_lora():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.fuse_qkv_projections()
    fused = sample(pipe)
    adapter = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    pipe.transformer.add_adapter(adapter)
    # the adapter changes the samples although the projections were fused before it was loaded
    assert (sample(pipe) - fused).abs().max() > 1e-3


def test_rotation_as_a_complex_product_matches_the_rotary_formula():
    cos, sin = rope_angles(rope_positions(2, 2, 3, 4, 4), 32)
    x = torch.randn(2, 3, cos.shape[0], 32)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([x0 * cos[:, 0::2] - x1 * sin[:, 0::2], x1 * cos[:, 0::2] + x0 * sin[:, 0::2]], -1)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected.flatten(-2))
    # a table built once and sliced per chunk gives the same rotation; bf16 inputs are rotated in float32
    table = rotary_phases((cos, sin))
    assert table.shape == (cos.shape[0], 16, 2) and table.dtype == torch.float32
    torch.testing.assert_close(rotary_phases(table, 3, 5), rotary_phases((cos, sin), 3, 5))
    rotated = rotate_pairs(x[:, :, 3:8].bfloat16(), rotary_phases(table, 3, 5))
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated.float(), expected.flatten(-2)[:, :, 3:8], rtol=0, atol=0.05)


def test_prefix_causal_mask():
    mask = prefix_causal_mask(3, 2)
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@pytest.mark.parametrize("masked", [True, False])
def test_chunk_attention_matches_sdpa(masked):
    query, key, value = torch.randn(2, 3, 8, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16)
    mask = None
    if masked:
        mask = additive_mask(prefix_causal_mask(12, 8), torch.float32)
    workspace = torch.full((2 * 3 * 8 * 20 + 7,), float("nan"))  # stale contents must not leak in
    out = chunk_attention(query, key, value, mask, workspace[: 2 * 3 * 8 * 20])
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_chunk_attention_is_used_only_where_it_pays():
    chunk, prefix = torch.randn(2, 3, 128, 64), torch.randn(2, 3, 784, 64)
    mask = torch.zeros(128, 784)
    with torch.no_grad():
        assert use_chunk_attention(chunk, prefix, mask, is_causal=False)
        assert use_chunk_attention(chunk, prefix, None, is_causal=False)
        # a single query, a small score matrix, causal attention from position 0, bf16, a boolean mask
        assert not use_chunk_attention(chunk[:, :, :1], prefix, None, is_causal=False)
        assert not use_chunk_attention(chunk[:, :, :32], prefix[:, :, :48], mask[:32, :48], is_causal=False)
        assert not use_chunk_attention(chunk, prefix[:, :, :128], None, is_causal=True)
        assert not use_chunk_attention(chunk.bfloat16(), prefix.bfloat16(), None, is_causal=False)
        assert not use_chunk_attention(chunk, prefix, mask.bool(), is_causal=False)
    # training needs autograd through attention: the in-place workspace path is for inference only
    assert not use_chunk_attention(chunk, prefix, mask, is_causal=False)


def test_prefix_causal_bias_is_built_once_per_chunk():
    cache = StarFlowKVCache(1, 1, 1, 16, 2)
    cache.advance(3)
    cpu = torch.device("cpu")
    bias = cache.prefix_causal_bias(2, torch.float32, cpu)
    assert bias.tolist() == [[0.0, 0.0, 0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0, 0.0, 0.0]]
    assert cache.prefix_causal_bias(2, torch.float32, cpu) is bias  # the chunk's next iteration
    cache.advance(2)
    assert cache.prefix_causal_bias(2, torch.float32, cpu).shape == (2, 7)


def test_scores_workspace_is_reused():
    cache = StarFlowKVCache(1, 1, 1, 4, 2)
    like = torch.zeros(1)
    large = cache.scores_workspace(100, like)
    small = cache.scores_workspace(30, like)
    assert large.numel() == 100 and small.numel() == 30
    assert small.data_ptr() == large.data_ptr()


def test_unwritten_cache_positions_are_never_read(monkeypatch):
    """The cache is allocated uninitialised; NaN in every unwritten position must not reach the samples, with
    Jacobi rollbacks and a sliding window."""
    pipe = tiny_pipeline(with_vae=False)
    pipe.scheduler = JacobiFlowScheduler(local_window=2, context_frames=1)
    reference = sample(pipe, frames=4, guidance_scale=3.0)
    layer = StarFlowKVCache.layer

    def poisoned(cache, index, hidden_states, device=None):
        if cache.layer_keys[index] is None:  # allocate the layer's buffers full of NaN
            cache.layer_keys[index] = hidden_states.new_full(cache.shape, float("nan"))
            cache.layer_values[index] = hidden_states.new_full(cache.shape, float("nan"))
        return layer(cache, index, hidden_states, device)

    monkeypatch.setattr(StarFlowKVCache, "layer", poisoned)
    torch.testing.assert_close(sample(pipe, frames=4, guidance_scale=3.0), reference, rtol=0, atol=0)


def test_kv_cache_bytes_follow_the_compute_dtype():
    model = tiny_transformer()
    text = torch.randn(2, 16, 16)
    rotary = rotary_phases(model.rotary_embedding(2, 2, 2, 16))
    caches = {}
    for dtype in (torch.float32, torch.bfloat16):
        caches[dtype] = model.to(dtype).deep_block.init_cache(2, 40)
        assert caches[dtype].nbytes == 0  # nothing is allocated before the first write
        with torch.no_grad():
            model.deep_block.prefill_text(text.to(dtype), caches[dtype], rotary)
    bf16, fp32 = caches[torch.bfloat16], caches[torch.float32]
    assert all(t.dtype == torch.bfloat16 for t in bf16.layer_keys + bf16.layer_values)
    assert bf16.nbytes * 2 == fp32.nbytes == 2 * 2 * 2 * 2 * 40 * 32 * 4


def test_per_sample_convergence_makes_a_batch_match_single_calls():
    prompts = ["a red circle moving left", "a blue square on the beach"]
    for convergence, atol in (("sample", 1e-5), ("batch", None)):
        pipe = tiny_pipeline(with_vae=False, scheduler_kwargs=dict(convergence=convergence, threshold=1e-2))
        latents = torch.randn(2, 3, 3, 2, 2, generator=torch.Generator().manual_seed(3))
        batched = pipe(prompts, height=2, width=2, num_frames=3, latents=latents, output_type="latent").frames
        singles = torch.cat(
            [
                pipe(p, height=2, width=2, num_frames=3, latents=latents[i : i + 1], output_type="latent").frames
                for i, p in enumerate(prompts)
            ]
        )
        if atol is not None:
            torch.testing.assert_close(batched, singles, rtol=0, atol=atol)
        else:
            # the original's batch-wide rule: a sample's stopping point depends on its batch
            assert (batched - singles).abs().max() > 1e-4


def test_per_sample_step_residual_and_convergence():
    scheduler = JacobiFlowScheduler(convergence="sample", threshold=1e-3, max_iterations=8)
    chunk = scheduler.plan(4, 1)[0]
    sample = torch.randn(2, 4, 3)
    noise = torch.randn(2, 4, 3)
    shift, scale = torch.randn(2, 4, 3), torch.rand(2, 4, 3) + 0.5
    solution = shift + scale * noise
    sample[0] = solution[0]  # sequence 0 has converged, sequence 1 has not
    out = scheduler.step((shift, scale), chunk, sample, noise, iteration=0)
    assert out.residual.shape == (2,) and out.residual[0] < 1e-10 < 1e-3 < out.residual[1]
    assert out.converged is False
    out = scheduler.step((shift, scale), chunk, sample, noise, iteration=1)
    assert out.converged is True


def test_invalid_convergence_raises():
    with pytest.raises(ValueError, match="convergence"):
        JacobiFlowScheduler(convergence="frame")


def _chunk_arguments(block, model, text=None):
    rotary = rotary_phases(model.rotary_embedding(2, 2, 2, 0 if text is None else text.shape[1]))
    cache = block.init_cache(2, (0 if text is None else text.shape[1]) + 8)
    if text is not None:
        block.prefill_text(text, cache, rotary)
    return cache, rotary


def test_chunk_evaluation_has_no_graph_break():
    model = tiny_transformer(in_channels=3)
    model.fuse_qkv_projections()
    text = torch.randn(2, 16, 16)
    with torch.no_grad():
        for block, block_text in ((model.deep_block, text), (model.shallow_blocks[0], None)):
            cache, rotary = _chunk_arguments(block, model, block_text)
            inputs = torch.randn(2, 8, 3)
            # a chunk after the cached text (prefix mask), then one token after it (no mask)
            for chunk in (inputs[:, :3], inputs[:, 3:4]):
                explanation = torch._dynamo.explain(block.evaluate_chunk)(chunk, cache, rotary)
                assert explanation.graph_break_count == 0 and explanation.graph_count == 1
                block.evaluate_chunk(chunk, cache, rotary)


@pytest.mark.slow
def test_compiled_transformer_samples_like_eager():
    """Regional compilation (every transformer layer, `fullgraph=True`) through a whole sampling call."""
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.fuse_qkv_projections()
    eager = sample(pipe, frames=3)
    torch._dynamo.reset()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    compiled = sample(pipe, frames=3)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
