"""StarFlowVPipeline.stream: frames as they become final (deep/shallow pipelining, causal VAE decoding), equal
to the non-streamed output.

Tiny in-memory components: 2x2 latent frames, a local window of 2 latent frames (the tiny model's trained
length), so 6 latent frames are solved in 6 chunks over 5 windows."""

import numpy as np
import pytest
import torch

from starflow_diffusers.testing_utils import tiny_pipeline


def call_kwargs(latent_frames=6, seed=0, vae=True, **kwargs):
    """2x2 latent frames: 32x32 pixels through the 16x VAE, 4k+1 frames; or 2x2 pixel frames without it."""
    size = dict(height=32, width=32, num_frames=4 * (latent_frames - 1) + 1) if vae else dict(
        height=2, width=2, num_frames=latent_frames
    )
    return dict(prompt="a red circle moving left", generator=torch.Generator().manual_seed(seed), **size, **kwargs)


class ChunkRecorder:
    """A `callback_on_step_end` recording the deep block's solved chunks."""

    def __init__(self):
        self.indices = []

    def __call__(self, pipe, index, chunk_start, callback_kwargs):
        self.indices.append(index)
        return {}


def stream_items(pipe, **kwargs):
    """The streamed items, each with the number of deep-block chunks solved when it was yielded."""
    recorder = ChunkRecorder()
    items = [(item, len(recorder.indices)) for item in pipe.stream(**kwargs, callback_on_step_end=recorder)]
    return items, recorder


@pytest.mark.parametrize("denoise", ["learned", "none"])
def test_streamed_frames_equal_the_output_and_come_early(denoise):
    pipe = tiny_pipeline(scheduler_kwargs=dict(convergence="sample"))
    full = pipe(**call_kwargs(denoise=denoise)).frames
    items, recorder = stream_items(pipe, **call_kwargs(denoise=denoise))
    num_chunks = pipe.num_timesteps
    assert len(recorder.indices) == num_chunks == 6
    # the first frames are out while the deep block still has chunks to solve
    first_frames, chunks_at_first = items[0]
    assert chunks_at_first < num_chunks
    if denoise == "none":
        assert chunks_at_first == 1 and first_frames.shape[1] == 1  # latent frame 0 -> one video frame
    # every item is whole latent frames of the (B, n, H, W, 3) output, in order, and together they are it
    assert all(item.ndim == 5 and item.shape[0] == 1 and (item.shape[1] - 1) % 4 in (0, 3) for item, _ in items)
    streamed = np.concatenate([item for item, _ in items], axis=1)
    assert streamed.shape == full.shape
    np.testing.assert_allclose(streamed, full, rtol=0, atol=1e-5)


def test_first_frame_timing_follows_the_denoiser_reach():
    pipe = tiny_pipeline(with_vae=False, scheduler_kwargs=dict(convergence="sample"))
    items, _ = stream_items(pipe, **call_kwargs(vae=False, denoise="learned", output_type="latent"))
    # window 2 with overlap 1: the first window (frames 0, 1) is complete once 2 frames are solved
    assert [item.shape[2] for item, _ in items] == [2, 1, 1, 1, 1]
    assert [chunks for _, chunks in items] == [2, 3, 4, 5, 6]
    assert pipe.final_frames(solved=2, num_frames=6, denoise="learned") == 2
    assert pipe.final_frames(solved=2, num_frames=6, denoise="none") == 2
    assert pipe.final_frames(solved=6, num_frames=6, denoise="score") == 6


def test_final_frames_in_one_long_window():
    pipe = tiny_pipeline(with_vae=False)
    # one 20-frame window: "score" waits for the whole window, "learned" for R = 2 layers x 1 frame ahead
    reach = pipe.transformer.config.denoiser_num_layers * pipe.transformer.config.denoiser_lookahead
    assert reach == 2
    assert [pipe.final_frames(s, 20, "learned", window=20) for s in (0, 2, 3, 10, 19, 20)] == [0, 0, 1, 8, 17, 20]
    assert [pipe.final_frames(s, 20, "score", window=20) for s in (3, 19, 20)] == [0, 0, 20]
    assert [pipe.final_frames(s, 20, "none", window=20) for s in (3, 19, 20)] == [3, 19, 20]


@pytest.mark.parametrize("denoise", ["score", "learned"])
def test_streamed_latents_equal_sampled_latents(denoise):
    pipe = tiny_pipeline(with_vae=False, scheduler_kwargs=dict(convergence="sample"))
    full = pipe(**call_kwargs(vae=False, denoise=denoise, output_type="latent")).frames
    items, _ = stream_items(pipe, **call_kwargs(vae=False, denoise=denoise, output_type="latent"))
    torch.testing.assert_close(torch.cat([item for item, _ in items], dim=2), full, rtol=0, atol=1e-5)


def test_sequential_solve_streams_early():
    pipe = tiny_pipeline(with_vae=False, scheduler_kwargs=dict(mode="sequential"))
    full = pipe(**call_kwargs(latent_frames=3, vae=False, denoise="none", output_type="pt")).frames
    items, recorder = stream_items(pipe, **call_kwargs(latent_frames=3, vae=False, denoise="none", output_type="pt"))
    # 4 tokens per frame, one token per chunk: frame 0 is out after 4 of 12 chunks
    assert len(recorder.indices) == 12 and items[0][1] == 4
    torch.testing.assert_close(torch.cat([item for item, _ in items], dim=1), full, rtol=0, atol=1e-5)


def test_batch_convergence_streams_once_the_deep_block_is_done():
    # the original's batch-wide Jacobi rule couples the frames of the shallow blocks: nothing is final earlier
    pipe = tiny_pipeline(with_vae=False, scheduler_kwargs=dict(convergence="batch"))
    kwargs = call_kwargs(vae=False, denoise="learned", output_type="latent")
    full = pipe(**kwargs).frames
    items, recorder = stream_items(pipe, **call_kwargs(vae=False, denoise="learned", output_type="latent"))
    assert all(chunks == len(recorder.indices) for _, chunks in items)
    # then the denoising windows come one at a time
    assert [item.shape[2] for item, _ in items] == [2, 1, 1, 1, 1]
    torch.testing.assert_close(torch.cat([item for item, _ in items], dim=2), full, rtol=0, atol=1e-6)


def test_the_adaptive_solve_streams_early_whatever_the_convergence_setting():
    # `adaptive` commits per sequence by construction, so `convergence="batch"` does not couple its frames
    pipe = tiny_pipeline(with_vae=False, scheduler_kwargs=dict(mode="adaptive", convergence="batch"))
    assert pipe.scheduler.sequences_independent
    kwargs = call_kwargs(vae=False, denoise="none", output_type="latent")
    full = pipe(**kwargs).frames
    items, recorder = stream_items(pipe, **call_kwargs(vae=False, denoise="none", output_type="latent"))
    assert items[0][1] == 1 < len(recorder.indices)
    torch.testing.assert_close(torch.cat([item for item, _ in items], dim=2), full, rtol=0, atol=1e-6)


def test_stream_with_a_batch_and_pil_output():
    pipe = tiny_pipeline(scheduler_kwargs=dict(convergence="sample"))
    kwargs = dict(num_videos_per_prompt=2, denoise="learned", output_type="pil")
    full = pipe(**call_kwargs(latent_frames=3, **kwargs)).frames
    items = list(pipe.stream(**call_kwargs(latent_frames=3, **kwargs)))
    assert all(len(item) == 2 for item in items)
    for video in range(2):
        frames = [frame for item in items for frame in item[video]]
        assert len(frames) == len(full[video]) == 9
        for a, b in zip(frames, full[video]):
            assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1


def test_stream_checks_arguments_before_returning():
    pipe = tiny_pipeline(scheduler_kwargs=dict(convergence="sample"))
    with pytest.raises(ValueError, match="return_dict"):
        pipe.stream(**call_kwargs(), return_dict=False)
    with pytest.raises(ValueError, match="output_type"):
        pipe.stream(**call_kwargs(output_type="video"))
    # `stream=True` on the call is the same generator: one item per latent frame here
    stream = pipe(**call_kwargs(latent_frames=2, denoise="none", output_type="latent"), stream=True)
    assert [item.shape[2] for item in stream] == [1, 1]


def test_stream_refuses_a_tiled_vae():
    pipe = tiny_pipeline()
    pipe.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
    with pytest.raises(ValueError, match="disable_tiling"):
        next(pipe.stream(**call_kwargs(latent_frames=2)))
