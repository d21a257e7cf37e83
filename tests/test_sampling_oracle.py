"""The oracle of benchmarks/sampling_fidelity.py: the lower bound it reports must be a bound that is counted
honestly (its exact solves are not counted, its commits are those of its rule)."""

import sys
from pathlib import Path

import pytest
import torch

from parity_utils import FORWARD_TOL, converted_model, fixture, max_err, to_diffusers_layout
from starflow_diffusers import JacobiFlowScheduler


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sampling_fidelity import OraclePipeline, SolveCounter, _oracle, committed_prefix  # noqa: E402


def _oracle_run(tolerance: float, **scheduler_settings):
    tensors, settings = fixture("video_tiny")
    scheduler = JacobiFlowScheduler(mode="adaptive", **scheduler_settings)
    pipe = _oracle(OraclePipeline, tolerance)(transformer=converted_model("video_tiny"), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with SolveCounter() as counter:
        out = pipe(prompt_embeds=tensors["y"], negative_prompt_embeds=tensors["y_null"],
                   latents=to_diffusers_layout(tensors["sample_noise"]), guidance_scale=1.0 + settings["cfg_scale"],
                   denoise="none", output_type="latent").frames
    return max_err(to_diffusers_layout(out), tensors["rev_seq_cfg"]), counter, pipe


def test_the_oracle_commits_the_prefix_within_the_tolerance_and_at_least_one_token():
    assert committed_prefix(torch.tensor([0.0, 1e-4, 1.0, 0.0]), 1e-3) == 2
    assert committed_prefix(torch.tensor([1.0, 0.0, 0.0]), 1e-3) == 1
    assert committed_prefix(torch.tensor([0.0, 0.0]), 0.0) == 2


def test_a_zero_tolerance_oracle_gives_the_original_sequential_sample():
    error, _, _ = _oracle_run(0.0)
    assert error <= FORWARD_TOL


def test_an_unbounded_tolerance_commits_each_window_at_once_and_counts_only_those_calls():
    """Every window is committed after its first evaluation, so the counted calls are the windows the plan
    holds (the token-by-token exact solves are not counted), and the sample is one Jacobi pass away."""
    error, counter, pipe = _oracle_run(float("inf"), block_size=2, later_block_multiplier=1)
    transformer = pipe.transformer
    _, _, frames, height, width = to_diffusers_layout(fixture("video_tiny")[0]["sample_noise"]).shape
    per_frame = (height // transformer.config.patch_size) * (width // transformer.config.patch_size)
    scheduler = pipe.scheduler
    deep_windows = sum(-(-chunk.length // chunk.sliding_window) for chunk in scheduler.plan(per_frame, frames))
    # per-frame shallow blocks solve every frame as one batch of one-frame sequences
    shallow_frames = 1 if transformer.config.shallow_blocks_per_frame else frames
    shallow_windows = sum(-(-chunk.length // chunk.sliding_window) for chunk in scheduler.plan(per_frame, shallow_frames))
    shallow_calls = len(transformer.shallow_blocks) * shallow_windows
    assert deep_windows > 1
    assert counter.calls == deep_windows + shallow_calls
    assert error > 100 * FORWARD_TOL


@pytest.mark.parametrize("tolerance", [1e-2, 1e-4])
def test_a_tighter_tolerance_costs_more_tokens_and_comes_closer(tolerance):
    loose_error, loose, _ = _oracle_run(tolerance * 100)
    tight_error, tight, _ = _oracle_run(tolerance)
    assert tight.tokens > loose.tokens and tight_error < loose_error
