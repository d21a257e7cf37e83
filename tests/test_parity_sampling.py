"""Sampling through StarFlowVPipeline reproduces the original implementation's samples (../shared/parity)."""

import pytest

from parity_utils import FORWARD_TOL, JACOBI_TOL, converted_model, fixture, max_err, to_diffusers_layout
from starflow_diffusers import JacobiFlowScheduler, StarFlowVPipeline
from starflow_diffusers.models import transformer_starflow_v

# (fixture key, scheduler mode, guided, denoise, noise key, extra scheduler settings, tolerance)
CASES = [
    ("rev_seq_nocfg", "sequential", False, "none", "sample_noise", {}, FORWARD_TOL),
    ("rev_seq_cfg", "sequential", True, "none", "sample_noise", {}, FORWARD_TOL),
    ("rev_jacobi_nocfg", "jacobi", False, "none", "sample_noise", {}, JACOBI_TOL),
    ("rev_jacobi_cfg", "jacobi", True, "none", "sample_noise", {}, JACOBI_TOL),
    ("denoised_rev_jacobi_cfg", "jacobi", True, "learned", "sample_noise", {}, JACOBI_TOL),
    ("long_jacobi_cfg", "jacobi", True, "none", "long_sample_noise", "long", JACOBI_TOL),
    ("self_denoised_rev_seq_cfg", "sequential", True, "score", "sample_noise", {}, FORWARD_TOL),
]


def _pipeline(tensors, settings, mode, extra):
    jacobi = settings["jacobi_kwargs"]
    if extra == "long":
        extra = {"local_window": settings["long"]["local_attn_window"], "context_frames": settings["long"]["context_length"]}
    scheduler = JacobiFlowScheduler(
        mode=mode,
        block_size=jacobi["jacobi_block_size"],
        threshold=jacobi["jacobi_th"],
        max_iterations=jacobi["jacobi_max_iter"],
        convergence="batch",  # the original's batch-wide rule, with which the fixtures were made
        **extra,
    )
    pipe = StarFlowVPipeline(transformer=converted_model("video_tiny"), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample_case(key, mode, guided, denoise, noise_key, extra):
    """(our sample, the original's sample) of one CASES entry, both in the original's layout."""
    tensors, settings = fixture("video_tiny")
    pipe = _pipeline(tensors, settings, mode, extra)
    noise = to_diffusers_layout(tensors[noise_key])
    if extra == "long":
        assert noise.shape[2] == settings["long"]["T"] > settings["long"]["local_attn_window"]
    out = pipe(
        prompt_embeds=tensors["y"],
        negative_prompt_embeds=tensors["y_null"] if guided else None,
        latents=noise,
        guidance_scale=1.0 + settings["cfg_scale"] if guided else 1.0,
        denoise=denoise,
        output_type="latent",
    ).frames
    assert out.shape == noise.shape
    return to_diffusers_layout(out), tensors[key]


@pytest.mark.parametrize("key, mode, guided, denoise, noise_key, extra, tol", CASES, ids=[c[0] for c in CASES])
def test_video_sampling_parity(key, mode, guided, denoise, noise_key, extra, tol):
    out, expected = _sample_case(key, mode, guided, denoise, noise_key, extra)
    assert max_err(out, expected) <= tol


@pytest.mark.parametrize("key", ["rev_jacobi_cfg", "long_jacobi_cfg"])
def test_jacobi_parity_with_chunk_attention_forced(monkeypatch, key):
    """The tiny fixtures' chunks are below the size where `chunk_attention` replaces SDPA; force it."""
    monkeypatch.setattr(transformer_starflow_v, "CHUNK_ATTENTION_MIN_QUERIES", 2)
    monkeypatch.setattr(transformer_starflow_v, "CHUNK_ATTENTION_MIN_SCORES", 0)
    used = []
    attention = transformer_starflow_v.chunk_attention
    monkeypatch.setattr(transformer_starflow_v, "chunk_attention", lambda *a: used.append(1) or attention(*a))
    case = next(c for c in CASES if c[0] == key)
    out, expected = _sample_case(*case[:-1])
    assert used
    assert max_err(out, expected) <= case[-1]


def test_long_video_uses_sliding_window_plan():
    tensors, settings = fixture("video_tiny")
    pipe = _pipeline(tensors, settings, "jacobi", "long")
    frames = settings["long"]["T"]
    pipe.scheduler.set_timesteps(tokens_per_frame=16, num_frames=frames, trained_frames=3)
    contexts = [c.context for c in pipe.scheduler.chunks if c.context is not None]
    # windows of 3 frames sliding by 3 - 2 = 1 frame: 3 re-encodings of the last 2 frames
    assert contexts == [(16, 48), (32, 64), (48, 80)]
    assert pipe.scheduler.chunks[-1].end == frames * 16
