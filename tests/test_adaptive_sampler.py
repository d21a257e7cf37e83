"""`JacobiFlowScheduler(mode="adaptive")`: a sliding window per sequence that commits converged tokens."""

import pytest
import torch

from parity_utils import FORWARD_TOL, JACOBI_TOL, converted_model, fixture, max_err, to_diffusers_layout
from starflow_diffusers import (
    JacobiFlowScheduler,
    StarFlowPipeline,
    StarFlowVImageToVideoPipeline,
    StarFlowVPipeline,
    StarFlowVVideoToVideoPipeline,
)
from starflow_diffusers.schedulers.scheduling_jacobi_flow import FlowChunk
from starflow_diffusers.testing_utils import tiny_image_pipeline_components, tiny_pipeline, tiny_pipeline_components


def _with_scheduler(pipe, **settings):
    pipe.scheduler = JacobiFlowScheduler.from_config(pipe.scheduler.config, **settings)
    return pipe


# ---- the plan and the step ---------------------------------------------------------------------------------


def test_the_adaptive_plan_has_frame_chunks_and_sliding_windows():
    scheduler = JacobiFlowScheduler(mode="adaptive", block_size=4, later_block_multiplier=2)
    chunks = scheduler.plan(tokens_per_frame=8, num_frames=4, prefix_tokens=2)
    # the first frame, then chunks of `later_block_multiplier` frames
    assert [(c.start, c.end) for c in chunks] == [(2, 8), (8, 24), (24, 32)]
    assert [c.sliding_window for c in chunks] == [8, 16, 16]
    assert [c.warm_start_offset for c in chunks] == [0, 8, 8]
    assert all(c.warm_start_offset == 0 for c in JacobiFlowScheduler(mode="adaptive", warm_start=False).plan(8, 3))
    with pytest.raises(ValueError, match="'adaptive'"):
        JacobiFlowScheduler(mode="fast")
    with pytest.raises(ValueError, match="shallow_threshold"):
        JacobiFlowScheduler(shallow_threshold=-1.0)


def _adaptive_step(scheduler, old, new_values, frontier, evaluations=None, noise=None):
    """A step whose network output is exactly `new_values` (shift = new, scale = 0)."""
    batch, length, dim = old.shape
    chunk = FlowChunk(0, length, 0, sliding_window=4)
    sample = old.clone()
    evaluations = torch.zeros(batch, length, dtype=torch.int32) if evaluations is None else evaluations
    noise = torch.zeros_like(old) if noise is None else noise
    start, end = scheduler.evaluation_range(chunk, frontier)
    shift, scale = new_values[:, start:end], torch.zeros_like(new_values[:, start:end])
    out = scheduler.step_adaptive((shift, scale), chunk, sample, noise, frontier, evaluations)
    return out, sample, evaluations


def test_the_step_commits_the_first_token_and_each_token_after_settled_ones():
    scheduler = JacobiFlowScheduler(mode="adaptive", threshold=1e-2, max_iterations=8)
    old = torch.ones(2, 8, 3)
    new = old.clone()
    new[0, 2] += 1.0  # row 0: tokens 0, 1 settle, token 2 moves: tokens 0..2 are final, 3 is not
    new[1, 4:] += 1.0  # row 1 (frontier 4): its first token moves: only it is final
    out, sample, evaluations = _adaptive_step(scheduler, old, new, [0, 4])
    assert out.frontier == [3, 5] and not out.diverged
    # each row changed only its own window [frontier, frontier + 4)
    torch.testing.assert_close(sample[0, :4], new[0, :4]) and torch.testing.assert_close(sample[0, 4:], old[0, 4:])
    assert torch.equal(sample[1, :4], old[1, :4]) and torch.equal(sample[1, 4:], new[1, 4:])
    assert evaluations.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]


def test_the_step_commits_a_whole_settled_window_and_forces_old_tokens():
    scheduler = JacobiFlowScheduler(mode="adaptive", threshold=1e-2, max_iterations=3)
    old = torch.ones(1, 8, 3)
    out, _, _ = _adaptive_step(scheduler, old, old.clone(), [0])
    assert out.frontier == [4]  # nothing moved: the window (4 tokens) is final
    moving = old + torch.arange(8.0)[None, :, None]
    evaluations = torch.tensor([[2, 2, 1, 0, 0, 0, 0, 0]], dtype=torch.int32)
    out, _, evaluations = _adaptive_step(scheduler, old, moving, [0], evaluations)
    # tokens 0 and 1 reach max_iterations evaluations and are committed although they moved
    assert out.frontier == [2] and evaluations[0, :4].tolist() == [3, 3, 2, 1]


def test_a_non_finite_update_is_reported():
    scheduler = JacobiFlowScheduler(mode="adaptive")
    old = torch.ones(1, 8, 3)
    new = old.clone()
    new[0, 1] = float("nan")
    assert _adaptive_step(scheduler, old, new, [0])[0].diverged


# ---- exactness and fidelity ------------------------------------------------------------------------------------


def test_threshold_zero_reproduces_the_original_sequential_sample():
    """With a zero threshold each window evaluation commits its exact first token: the exact inverse."""
    tensors, settings = fixture("video_tiny")
    pipe = StarFlowVPipeline(transformer=converted_model("video_tiny"), scheduler=JacobiFlowScheduler(
        mode="adaptive", threshold=0.0, block_size=settings["jacobi_kwargs"]["jacobi_block_size"]))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=tensors["y"], negative_prompt_embeds=tensors["y_null"],
               latents=to_diffusers_layout(tensors["sample_noise"]), guidance_scale=1.0 + settings["cfg_scale"],
               denoise="none", output_type="latent").frames
    assert max_err(to_diffusers_layout(out), tensors["rev_seq_cfg"]) <= FORWARD_TOL


def test_a_tighter_threshold_comes_closer_to_the_exact_sample():
    tensors, settings = fixture("video_tiny")
    kwargs = dict(prompt_embeds=tensors["y"], negative_prompt_embeds=tensors["y_null"],
                  latents=to_diffusers_layout(tensors["sample_noise"]), guidance_scale=1.0 + settings["cfg_scale"],
                  denoise="none", output_type="latent")
    errors = []
    for threshold in (1e-2, 1e-4, 1e-9):
        scheduler = JacobiFlowScheduler(mode="adaptive", threshold=threshold)
        pipe = StarFlowVPipeline(transformer=converted_model("video_tiny"), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        errors.append(max_err(to_diffusers_layout(pipe(**kwargs).frames), tensors["rev_seq_cfg"]))
    assert errors[0] > errors[1] > errors[2] and errors[2] <= JACOBI_TOL


def _sequential_and_adaptive(pipe, **kwargs):
    """The exact (sequential) and the zero-threshold adaptive output of the same call and seed."""
    exact = _with_scheduler(pipe, mode="sequential")(generator=torch.Generator().manual_seed(0), **kwargs).frames
    adaptive = _with_scheduler(pipe, mode="adaptive", threshold=0.0)(generator=torch.Generator().manual_seed(0), **kwargs)
    return exact, adaptive.frames


def test_long_videos_slide_the_local_window():
    pipe = tiny_pipeline(with_vae=False, scheduler_kwargs=dict(local_window=3, context_frames=1))
    kwargs = dict(prompt="a red circle", height=2, width=2, num_frames=7, guidance_scale=2.0, output_type="latent",
                  denoise="none")
    pipe = _with_scheduler(pipe, mode="adaptive")
    assert any(c.context is not None for c in (pipe.scheduler.plan(4, 7, window_frames=3)))
    exact, adaptive = _sequential_and_adaptive(pipe, **kwargs)
    torch.testing.assert_close(adaptive, exact, rtol=0, atol=1e-5)


def test_image_to_video_and_video_to_video():
    components = tiny_pipeline_components(with_vae=False)
    context = torch.randn(1, 3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    i2v = StarFlowVImageToVideoPipeline(**components)
    i2v.set_progress_bar_config(disable=True)
    common = dict(prompt="a red circle", height=2, width=2, guidance_scale=2.0, output_type="latent", denoise="none")
    exact, adaptive = _sequential_and_adaptive(
        i2v, image_latents=context, num_frames=3, **common
    )
    torch.testing.assert_close(adaptive, exact, rtol=0, atol=1e-5)
    v2v = StarFlowVVideoToVideoPipeline(**components)
    v2v.set_progress_bar_config(disable=True)
    source = torch.randn(1, 3, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    exact, adaptive = _sequential_and_adaptive(
        v2v, video_latents=source, strength=0.5, **common
    )
    torch.testing.assert_close(adaptive, exact, rtol=0, atol=1e-5)


def test_the_image_pipeline():
    pipe = StarFlowPipeline(**tiny_image_pipeline_components(with_vae=False))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", height=4, width=4, guidance_scale=2.0, output_type="latent", denoise="none")
    exact = _with_scheduler(pipe, mode="sequential")(generator=torch.Generator().manual_seed(0), **kwargs).images
    adaptive = _with_scheduler(pipe, mode="adaptive", threshold=0.0)(generator=torch.Generator().manual_seed(0), **kwargs)
    adaptive = adaptive.images
    torch.testing.assert_close(adaptive, exact, rtol=0, atol=1e-5)


# ---- batches and streaming -------------------------------------------------------------------------------------


def test_a_batch_gives_the_clips_of_single_calls():
    # a loose threshold: the sequences' frontiers then move at different speeds
    pipe = tiny_pipeline(with_vae=False, scheduler_kwargs=dict(mode="adaptive", threshold=0.1, block_size=4))
    prompts = ["a red circle moving left", "a blue square on the beach"]
    kwargs = dict(height=2, width=2, num_frames=3, guidance_scale=2.0, output_type="latent")
    batched = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kwargs).frames
    singles = [pipe(p, generator=torch.Generator().manual_seed(s), **kwargs).frames for p, s in zip(prompts, (1, 2))]
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=1e-5)


@pytest.mark.parametrize("denoise", ["learned", "none"])
def test_streaming_equals_the_output(denoise):
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode="adaptive"))
    kwargs = dict(prompt="a red circle moving left", height=32, width=32, num_frames=21, denoise=denoise,
                  output_type="latent")
    full = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    items = list(pipe.stream(generator=torch.Generator().manual_seed(0), **kwargs))
    assert len(items) > 1  # frames come before the end of the solve
    torch.testing.assert_close(torch.cat(items, dim=2), full, rtol=0, atol=1e-6)


def test_the_shallow_threshold_applies_to_the_shallow_blocks_only():
    scheduler = JacobiFlowScheduler(threshold=1e-3, shallow_threshold=1e-6)
    assert scheduler.threshold_for(deep_block=True) == 1e-3 and scheduler.threshold_for(deep_block=False) == 1e-6
    assert JacobiFlowScheduler(threshold=1e-3).threshold_for(deep_block=False) == 1e-3
    # a tighter shallow threshold brings the sample closer to the exact one
    pipe = tiny_pipeline(with_vae=False)
    kwargs = dict(prompt="a red circle", height=2, width=2, num_frames=3, guidance_scale=2.0, output_type="latent",
                  denoise="none", latents=torch.randn(1, 3, 3, 2, 2, generator=torch.Generator().manual_seed(0)))
    exact = _with_scheduler(pipe, mode="sequential")(**kwargs).frames
    errors = {}
    for shallow in (None, 0.0):
        out = _with_scheduler(pipe, mode="jacobi", threshold=0.1, shallow_threshold=shallow)(**kwargs).frames
        errors[shallow] = (out - exact).abs().max()
    assert errors[0.0] < errors[None]
