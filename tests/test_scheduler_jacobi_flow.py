"""JacobiFlowScheduler: configuration, the solve plan, the update rule, guidance, and Jacobi == sequential."""

import json
import signal
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from starflow_diffusers import JacobiFlowScheduler
from starflow_diffusers.pipelines.starflow_sampling import NO_GUIDANCE, FlowGuidance
from starflow_diffusers.schedulers.scheduling_jacobi_flow import FlowChunk, JacobiFlowSchedulerOutput, flow_guidance
from starflow_diffusers.testing_utils import tiny_pipeline


NON_DEFAULT_CONFIG = dict(
    mode="sequential",
    block_size=7,
    later_block_multiplier=3,
    max_iterations=5,
    threshold=2.5e-5,
    warm_start=False,
    local_window=9,
    context_frames=4,
)


# ---- configuration -------------------------------------------------------------------------------------------


def test_config_round_trip(tmp_path):
    scheduler = JacobiFlowScheduler(**NON_DEFAULT_CONFIG)
    scheduler.save_config(tmp_path)
    path = tmp_path / "scheduler_config.json"
    assert path.is_file()
    saved = json.loads(path.read_text())
    assert saved["_class_name"] == "JacobiFlowScheduler"
    for key, value in NON_DEFAULT_CONFIG.items():
        assert saved[key] == value, key

    restored = JacobiFlowScheduler.from_pretrained(tmp_path)
    assert isinstance(restored, JacobiFlowScheduler)
    for key, value in NON_DEFAULT_CONFIG.items():
        assert restored.config[key] == value, key
    assert restored.iterations_per_chunk == 1  # sequential


def test_from_config_override_keeps_other_fields():
    scheduler = JacobiFlowScheduler(**{**NON_DEFAULT_CONFIG, "mode": "jacobi"})
    other = JacobiFlowScheduler.from_config(scheduler.config, block_size=8)
    assert other.config.block_size == 8
    for key, value in NON_DEFAULT_CONFIG.items():
        if key not in ("block_size", "mode"):
            assert other.config[key] == value, key
    assert other.config.mode == "jacobi"
    assert other.iterations_per_chunk == NON_DEFAULT_CONFIG["max_iterations"]
    # the original is untouched
    assert scheduler.config.block_size == NON_DEFAULT_CONFIG["block_size"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mode": "gauss-seidel"}, "mode"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": -4}, "block_size"),
        ({"later_block_multiplier": 0}, "later_block_multiplier"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"threshold": -1e-3}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"local_window": 0}, "local_window"),
        ({"context_frames": 0}, "context_frames"),
    ],
)
def test_invalid_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        JacobiFlowScheduler(**kwargs)


def test_defaults_are_valid_and_match_release():
    scheduler = JacobiFlowScheduler()
    # spec section 5: released defaults (video) block 32, threshold 1e-3, 32 iterations, context 16
    assert scheduler.config.mode == "jacobi"
    assert scheduler.config.block_size == 32
    assert scheduler.config.threshold == 1e-3
    assert scheduler.config.max_iterations == 32
    assert scheduler.config.context_frames == 16
    assert scheduler.config.later_block_multiplier == 4


# ---- the plan ------------------------------------------------------------------------------------------------


def _expected_size(scheduler, start, tokens_per_frame):
    if scheduler.config.mode == "sequential":
        return 1
    if start <= tokens_per_frame:
        return scheduler.config.block_size
    return scheduler.config.block_size * scheduler.config.later_block_multiplier


def _check_tiling(scheduler, chunks, tokens_per_frame, num_frames, prefix):
    total = tokens_per_frame * num_frames
    assert chunks, "empty plan"
    assert chunks[0].start == prefix
    assert chunks[-1].end == total
    for a, b in zip(chunks, chunks[1:]):
        assert a.end == b.start, (a, b)
        assert b.window >= a.window
    for index, chunk in enumerate(chunks):
        assert chunk.length >= 1
        expected = _expected_size(scheduler, chunk.start, tokens_per_frame)
        last_of_window = index == len(chunks) - 1 or chunks[index + 1].window != chunk.window
        if last_of_window:
            assert chunk.length <= expected, chunk
        else:
            assert chunk.length == expected, chunk
        warm = (
            scheduler.config.mode == "jacobi"
            and scheduler.config.warm_start
            and chunk.start > tokens_per_frame
        )
        assert chunk.warm_start_offset == (tokens_per_frame if warm else 0), chunk


@pytest.mark.parametrize("mode", ["jacobi", "sequential"])
@pytest.mark.parametrize("warm_start", [True, False])
@pytest.mark.parametrize(
    "tokens_per_frame, num_frames, prefix, block_size, multiplier",
    [
        (16, 3, 0, 4, 4),
        (16, 3, 5, 4, 4),
        (10, 4, 0, 3, 2),
        (7, 5, 3, 32, 4),  # block larger than a frame
        (12, 1, 0, 5, 3),  # an image / single frame
    ],
)
def test_plan_tiles_sequence(mode, warm_start, tokens_per_frame, num_frames, prefix, block_size, multiplier):
    scheduler = JacobiFlowScheduler(
        mode=mode, block_size=block_size, later_block_multiplier=multiplier, warm_start=warm_start, max_iterations=9
    )
    chunks = scheduler.plan(tokens_per_frame, num_frames, prefix_tokens=prefix)
    _check_tiling(scheduler, chunks, tokens_per_frame, num_frames, prefix)
    assert all(c.context is None and c.window == 0 for c in chunks)
    if mode == "sequential":
        assert all(c.length == 1 for c in chunks)
        assert len(chunks) == tokens_per_frame * num_frames - prefix
        assert scheduler.iterations_per_chunk == 1
    else:
        assert scheduler.iterations_per_chunk == 9


def test_plan_chunk_sizes_explicit():
    # 8 tokens per frame, block 2, x3 after the first frame: starts 0,2,4,6,8 use 2; then 10.. use 6
    scheduler = JacobiFlowScheduler(block_size=2, later_block_multiplier=3)
    chunks = scheduler.plan(8, 3)
    bounds = [(c.start, c.end) for c in chunks]
    assert bounds == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 16), (16, 22), (22, 24)]
    assert [c.warm_start_offset for c in chunks] == [0, 0, 0, 0, 0, 8, 8, 8]
    no_warm = JacobiFlowScheduler(block_size=2, later_block_multiplier=3, warm_start=False).plan(8, 3)
    assert [(c.start, c.end) for c in no_warm] == bounds
    assert all(c.warm_start_offset == 0 for c in no_warm)


def test_plan_rejects_bad_prefix():
    scheduler = JacobiFlowScheduler()
    with pytest.raises(ValueError, match="prefix_tokens"):
        scheduler.plan(4, 2, prefix_tokens=8)
    with pytest.raises(ValueError, match="prefix_tokens"):
        scheduler.plan(4, 2, prefix_tokens=-1)


@pytest.mark.parametrize("mode", ["jacobi", "sequential"])
def test_set_timesteps_matches_chunks(mode):
    scheduler = JacobiFlowScheduler(mode=mode, block_size=3)
    scheduler.set_timesteps(tokens_per_frame=6, num_frames=2, prefix_tokens=1)
    assert scheduler.num_timesteps == len(scheduler.chunks) > 0
    assert scheduler.timesteps.dtype == torch.long
    assert scheduler.timesteps.tolist() == [c.start for c in scheduler.chunks]
    assert scheduler.chunks == scheduler.plan(6, 2, prefix_tokens=1)
    # fits in the trained length: no window, the cache holds text + every frame
    scheduler.set_timesteps(tokens_per_frame=6, num_frames=2, trained_frames=2)
    assert scheduler.window_frames is None
    assert scheduler.cache_length(6, 2, text_length=5) == 5 + 12


@pytest.mark.parametrize("mode", ["jacobi", "sequential"])
@pytest.mark.parametrize(
    "num_frames, window, context_frames, from_local_window",
    [(7, 3, 1, False), (6, 3, 2, False), (10, 4, 2, True), (5, 4, 3, True)],
)
def test_long_video_plan(mode, num_frames, window, context_frames, from_local_window):
    tpf = 4
    scheduler = JacobiFlowScheduler(
        mode=mode, block_size=2, later_block_multiplier=2, context_frames=context_frames,
        local_window=window if from_local_window else None,
    )
    # with local_window set, the model's trained length (here long enough for the whole video) is ignored
    trained = num_frames + 100 if from_local_window else window
    scheduler.set_timesteps(tpf, num_frames, trained_frames=trained)
    chunks = scheduler.chunks
    assert scheduler.window_frames == window
    _check_tiling(scheduler, chunks, tpf, num_frames, 0)
    assert scheduler.cache_length(tpf, num_frames, text_length=3) == 3 + window * tpf

    windows = sorted({c.window for c in chunks})
    assert windows == list(range(len(windows))) and len(windows) > 1
    # solved frames per window: the first window fills W frames, the next ones W - c new frames each
    expected_windows = 1 + -(-(num_frames - window) // (window - context_frames))
    assert len(windows) == expected_windows
    for w in windows:
        members = [c for c in chunks if c.window == w]
        first, last_end = members[0], members[-1].end
        assert all(c.context is None for c in members[1:])
        if w == 0:
            assert first.context is None
            assert last_end == window * tpf
            continue
        # re-encode exactly `context_frames` frames, ending where this window's solve starts
        assert first.context == (first.start - context_frames * tpf, first.start)
        assert first.start % tpf == 0
        # context + new frames fit the local window (and therefore the cache)
        assert last_end - first.context[0] <= window * tpf
        if w != windows[-1]:
            assert last_end - first.context[0] == window * tpf


def test_context_not_smaller_than_window_raises():
    scheduler = JacobiFlowScheduler(context_frames=3)
    with pytest.raises(ValueError, match="context_frames"):
        scheduler.set_timesteps(4, 6, trained_frames=3)
    scheduler = JacobiFlowScheduler(context_frames=4, local_window=3)
    with pytest.raises(ValueError, match="context_frames"):
        scheduler.set_timesteps(4, 6, trained_frames=100)
    # a video that fits in the window never needs context
    scheduler = JacobiFlowScheduler(context_frames=16)
    scheduler.set_timesteps(4, 3, trained_frames=3)
    assert scheduler.window_frames is None and all(c.context is None for c in scheduler.chunks)


@contextmanager
def _time_limit(seconds):
    def handler(signum, frame):
        raise TimeoutError(f"did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("window_frames", [1, 2])
def test_plan_with_window_not_larger_than_context_raises(window_frames):
    # regression: plan() used to loop forever here (the target never grew); the alarm turns a hang into a failure
    scheduler = JacobiFlowScheduler(context_frames=2)
    with _time_limit(5):
        with pytest.raises(ValueError, match="context_frames"):
            scheduler.plan(4, 6, window_frames=window_frames)


# ---- inputs helpers ------------------------------------------------------------------------------------------


def test_chunk_inputs_shift_and_warm_start():
    sample = torch.arange(2 * 12 * 3, dtype=torch.float32).view(2, 12, 3)
    first = FlowChunk(0, 3, 0)
    inputs, prepend_sos = JacobiFlowScheduler.chunk_inputs(sample, first, 0)
    assert prepend_sos and torch.equal(inputs, sample[:, :2])
    later = FlowChunk(8, 12, 0, warm_start_offset=4)
    inputs, prepend_sos = JacobiFlowScheduler.chunk_inputs(sample, later, 0)
    assert not prepend_sos and torch.equal(inputs, sample[:, 3:7])
    inputs, prepend_sos = JacobiFlowScheduler.chunk_inputs(sample, later, 1)
    assert not prepend_sos and torch.equal(inputs, sample[:, 7:11])
    # a context is re-encoded as a fresh sequence: the block puts SOS in front of tokens [start, end - 1)
    assert torch.equal(JacobiFlowScheduler.context_inputs(sample, (4, 8)), sample[:, 4:7])


# ---- step ------------------------------------------------------------------------------------------------------


def _step_inputs(seed=0, batch=2, tokens=10, dim=3):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, tokens, dim, generator=g)
    noise = torch.randn(batch, tokens, dim, generator=g)
    chunk = FlowChunk(3, 7, 0)
    shift = torch.randn(batch, chunk.length, dim, generator=g)
    scale = torch.rand(batch, chunk.length, dim, generator=g) + 0.5
    return sample, noise, chunk, shift, scale


def test_step_writes_chunk_in_place():
    # the batch-wide residual of the original's rule (per-sequence residuals: test_performance_features.py)
    scheduler = JacobiFlowScheduler(max_iterations=10, threshold=1e-3, convergence="batch")
    sample, noise, chunk, shift, scale = _step_inputs()
    before = sample.clone()
    out = scheduler.step((shift, scale), chunk, sample, noise, iteration=0)
    assert isinstance(out, JacobiFlowSchedulerOutput)
    assert out.prev_sample is sample  # in place
    new = shift + scale * noise[:, 3:7]
    torch.testing.assert_close(sample[:, 3:7], new, rtol=0, atol=1e-6)
    assert torch.equal(sample[:, :3], before[:, :3]) and torch.equal(sample[:, 7:], before[:, 7:])
    old = before[:, 3:7].double()
    residual = ((new.double() - old) ** 2).mean() / (new.double() ** 2).mean()
    assert abs(float(out.residual) - float(residual)) <= 1e-6 * float(residual)
    assert float(residual) > 1e-3 and out.converged is False


def test_step_converged_below_threshold_and_on_last_iteration():
    sample, noise, chunk, shift, scale = _step_inputs(seed=1)
    new = shift + scale * noise[:, 3:7]
    # the state already holds almost the solution: the relative residual is ~1e-8
    sample[:, 3:7] = new * (1 + 1e-4)
    scheduler = JacobiFlowScheduler(max_iterations=10, threshold=1e-6, convergence="batch")
    out = scheduler.step((shift, scale), chunk, sample.clone(), noise, iteration=0)
    assert float(out.residual) < 1e-6 and out.converged is True
    strict = JacobiFlowScheduler(max_iterations=10, threshold=1e-10, convergence="batch")
    assert strict.step((shift, scale), chunk, sample.clone(), noise, iteration=0).converged is False
    # the last iteration always stops, whatever the residual
    sample, noise, chunk, shift, scale = _step_inputs(seed=2)
    assert strict.step((shift, scale), chunk, sample.clone(), noise, iteration=8).converged is False
    assert strict.step((shift, scale), chunk, sample.clone(), noise, iteration=9).converged is True
    # sequential: one iteration per chunk
    sequential = JacobiFlowScheduler(mode="sequential", threshold=0.0)
    assert sequential.step((shift, scale), chunk, sample.clone(), noise, iteration=0).converged is True


def test_step_return_tuple_equals_dict():
    scheduler = JacobiFlowScheduler(max_iterations=4)
    sample, noise, chunk, shift, scale = _step_inputs(seed=3)
    a = scheduler.step((shift, scale), chunk, sample.clone(), noise, iteration=1)
    b = scheduler.step((shift, scale), chunk, sample.clone(), noise, iteration=1, return_dict=False)
    assert isinstance(b, tuple) and len(b) == 3
    assert torch.equal(a.prev_sample, b[0]) and a.converged == b[1] and torch.equal(a.residual, b[2])


def test_guidance_at_zero_weight_keeps_conditional_half():
    # a [cond; uncond] batch with weight 0 (guidance switched off mid-solve) solves with the conditional half
    sample, noise, chunk, shift, scale = _step_inputs(seed=6)
    g = torch.Generator().manual_seed(7)
    shift_u, scale_u = torch.randn(shift.shape, generator=g), torch.rand(scale.shape, generator=g) + 0.5
    scheduler = JacobiFlowScheduler(max_iterations=4)
    doubled = (torch.cat([shift, shift_u]), torch.cat([scale, scale_u]))
    guided = scheduler.step(FlowGuidance(0.0).combine(doubled), chunk, sample.clone(), noise, 0)
    plain = scheduler.step((shift, scale), chunk, sample.clone(), noise, 0)
    assert torch.equal(guided.prev_sample, plain.prev_sample)
    # the scheduler takes one output per sequence: an uncombined guidance batch is refused
    for wrong in (doubled, (shift[:1], scale[:1])):
        with pytest.raises(ValueError, match="model_output"):
            scheduler.step(wrong, chunk, sample.clone(), noise, 0)


def test_guided_step_uses_flow_guidance():
    scheduler = JacobiFlowScheduler(max_iterations=4)
    sample, noise, chunk, shift, scale = _step_inputs(seed=4)
    g = torch.Generator().manual_seed(5)
    shift_u = torch.randn(shift.shape, generator=g)
    scale_u = torch.rand(scale.shape, generator=g) + 0.5
    w = 2.5
    guidance = FlowGuidance(w)
    assert torch.equal(guidance.batch(shift), torch.cat([shift, shift])) and NO_GUIDANCE.batch(shift) is shift
    combined = guidance.combine((torch.cat([shift, shift_u]), torch.cat([scale, scale_u])))
    out = scheduler.step(combined, chunk, sample, noise, iteration=0)
    g_shift, g_scale = _reference_guidance(shift, scale, shift_u, scale_u, w)
    expected = g_shift + g_scale * noise[:, 3:7].double()
    np.testing.assert_allclose(out.prev_sample[:, 3:7].double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


# ---- flow guidance -------------------------------------------------------------------------------------------


def _reference_guidance(shift_c, scale_c, shift_u, scale_u, w):
    """Spec section 5, elementwise in float64."""
    shift_c, scale_c, shift_u, scale_u = (t.double() for t in (shift_c, scale_c, shift_u, scale_u))
    s = torch.where(scale_c / scale_u < 1, scale_c / scale_u, torch.ones_like(scale_c)) ** 2
    d = 1.0 + w - w * s
    return ((1.0 + w) * shift_c - w * s * shift_u) / d, scale_c / torch.sqrt(d)


def _guidance_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(4, 5, 6, generator=g)
    scale = torch.rand(4, 5, 6, generator=g) * 2 + 0.1
    return shift, scale


def test_flow_guidance_zero_weight_is_conditional():
    shift, scale = _guidance_inputs()
    g_shift, g_scale = flow_guidance(shift, scale, 0.0)
    assert g_shift.shape == (2, 5, 6)
    assert torch.equal(g_shift, shift[:2]) and torch.equal(g_scale, scale[:2])


@pytest.mark.parametrize("w", [0.5, 3.0, 3.5])
def test_flow_guidance_matches_spec(w):
    shift, scale = _guidance_inputs(seed=1)
    # both regimes present: some scale_c < scale_u and some >=
    ratio = scale[:2] / scale[2:]
    assert (ratio < 1).any() and (ratio >= 1).any()
    g_shift, g_scale = flow_guidance(shift, scale, w)
    r_shift, r_scale = _reference_guidance(shift[:2], scale[:2], shift[2:], scale[2:], w)
    np.testing.assert_allclose(g_shift.double().numpy(), r_shift.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_scale.double().numpy(), r_scale.numpy(), rtol=1e-5, atol=1e-6)
    # guidance shrinks the scale where the conditional is the narrower one, else keeps it
    narrower = ratio < 1
    assert (g_scale[narrower] < scale[:2][narrower]).all()


def test_flow_guidance_ratio_clipped():
    shift, scale = _guidance_inputs(seed=2)
    scale = torch.cat([scale[:2] + 1.0, scale[:2] * 0.5])  # scale_c > scale_u everywhere
    w = 2.0
    g_shift, g_scale = flow_guidance(shift, scale, w)
    torch.testing.assert_close(g_scale, scale[:2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_shift, (1 + w) * shift[:2] - w * shift[2:], rtol=1e-5, atol=1e-5)


# ---- Jacobi converges to the sequential solution ------------------------------------------------------------


def _inputs(latent_frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 48, latent_frames, 2, 2, generator=g)
    prompt_embeds = torch.randn(1, 16, 16, generator=g)
    return latents, prompt_embeds


def _sample(pipe, latents, prompt_embeds, **kwargs):
    return pipe(
        prompt_embeds=prompt_embeds, latents=latents, output_type="latent", denoise="none", **kwargs
    ).frames


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_jacobi_converges_to_sequential(guidance_scale):
    latents, prompt_embeds = _inputs()
    kwargs = dict(guidance_scale=guidance_scale)
    if guidance_scale > 1:
        kwargs["negative_prompt_embeds"] = torch.zeros_like(prompt_embeds)
    # block 2 on 4-token frames: several chunks per frame and warm-started chunks after the first frame
    sequential = tiny_pipeline(scheduler_kwargs=dict(mode="sequential"))
    jacobi = tiny_pipeline(scheduler_kwargs=dict(mode="jacobi", block_size=2, threshold=1e-8, max_iterations=100))
    out_seq = _sample(sequential, latents, prompt_embeds, **kwargs)
    out_jac = _sample(jacobi, latents, prompt_embeds, **kwargs)
    assert sequential.num_timesteps == 8 and jacobi.num_timesteps < 8
    assert any(c.warm_start_offset for c in jacobi.scheduler.chunks)
    assert out_seq.shape == latents.shape
    torch.testing.assert_close(out_jac, out_seq, rtol=0, atol=1e-4)
    # a single-iteration Jacobi solve is not the inverse: the comparison above can fail
    rough = tiny_pipeline(scheduler_kwargs=dict(mode="jacobi", block_size=4, max_iterations=1))
    assert (_sample(rough, latents, prompt_embeds, **kwargs) - out_seq).abs().max() > 1e-3


def test_jacobi_long_video_matches_sequential():
    latents, prompt_embeds = _inputs(latent_frames=4, seed=1)
    sequential = tiny_pipeline(scheduler_kwargs=dict(mode="sequential"))
    jacobi = tiny_pipeline(scheduler_kwargs=dict(mode="jacobi", block_size=2, threshold=1e-8, max_iterations=100))
    out_seq = _sample(sequential, latents, prompt_embeds, guidance_scale=1.0)
    out_jac = _sample(jacobi, latents, prompt_embeds, guidance_scale=1.0)
    assert any(c.context is not None for c in jacobi.scheduler.chunks)
    torch.testing.assert_close(out_jac, out_seq, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["sequential", "jacobi"])
def test_sample_inverts_forward_pass(mode):
    latents, prompt_embeds = _inputs(seed=2)
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode=mode, block_size=2, threshold=1e-8, max_iterations=100))
    out = _sample(pipe, latents, prompt_embeds, guidance_scale=1.0)
    with torch.no_grad():
        z = pipe.transformer(out, prompt_embeds).sample
    torch.testing.assert_close(z, latents, rtol=0, atol=1e-4)
    # and the sample is not trivially the noise
    assert (out - latents).abs().max() > 1e-2


def test_only_batch_convergence_jacobi_couples_the_sequences_of_a_batch():
    coupled = {
        (mode, convergence): not JacobiFlowScheduler(mode=mode, convergence=convergence).sequences_independent
        for mode in ("jacobi", "adaptive", "sequential") for convergence in ("sample", "batch")
    }
    assert [key for key, value in coupled.items() if value] == [("jacobi", "batch")]
