"""The bundled tiny moving-shapes model: it loads offline, generates deterministic clips in seconds, follows
one-object captions in text-to-video and continues a given first frame in image-to-video. (Held-out
two-object captions and the likelihood gap are measured by benchmarks/shapes_quality.py.)"""

import os

import numpy as np
import pytest
import torch

from starflow_diffusers import BUNDLED_MODEL, StarFlowVImageToVideoPipeline, StarFlowVPipeline
from starflow_diffusers.evaluation import analyze_clip, summarize
from starflow_diffusers.training.synthetic import COLOURS, DIRECTIONS, SHAPES, ClipSpec, ObjectSpec, render_clip


# one caption per colour, shapes and directions taken in turn (three of them are held-out pairs)
ONE_OBJECT_SPECS = [
    ClipSpec((ObjectSpec(SHAPES[i % len(SHAPES)], colour, list(DIRECTIONS)[i % len(DIRECTIONS)], "fast"),))
    for i, colour in enumerate(COLOURS)
]


@pytest.fixture(scope="module")
def pipe():
    pipe = StarFlowVPipeline.from_pretrained(BUNDLED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt, seed, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), guidance_scale=3.0, **kwargs).frames[0]


def test_the_bundled_folder_is_a_small_complete_pixel_space_pipeline(pipe):
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(BUNDLED_MODEL) for f in files)
    assert total <= 20 * 2**20
    assert pipe.vae is None and pipe.transformer.config.in_channels == 3 and pipe.transformer.has_denoiser
    # stored in float16, loaded as float32 for CPUs
    assert pipe.transformer.dtype == torch.float32
    assert pipe.default_base_frame_size == 32 and pipe.transformer.config.trained_latent_frames == 17


def test_a_short_generation_has_the_right_shape_and_range_and_is_deterministic(pipe):
    video = _generate(pipe, "a red circle moving right", seed=0, num_frames=5)
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.float32
    assert video.min() >= 0.0 and video.max() <= 1.0 and video.std() > 0.05
    np.testing.assert_array_equal(video, _generate(pipe, "a red circle moving right", seed=0, num_frames=5))
    assert not np.array_equal(video, _generate(pipe, "a red circle moving right", seed=1, num_frames=5))


def test_image_to_video_starts_from_the_given_first_frame(pipe):
    spec = ClipSpec((ObjectSpec("triangle", "green", "left", "fast"),))
    first_frame = render_clip(spec, num_frames=1, seed=3)[0]
    i2v = StarFlowVImageToVideoPipeline.from_pipe(pipe)
    i2v.set_progress_bar_config(disable=True)
    video = i2v(
        image=first_frame, prompt=spec.caption, num_frames=9, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)
    ).frames[0]
    assert video.shape == (9, 32, 32, 3)
    # the first frame is the given one, up to the noise augmentation and the denoiser: the analyzer finds its object
    assert np.abs(video[0] - first_frame / 255.0).mean() < 0.1
    assert analyze_clip(video[:1], spec).objects[0].persistent


def _assert_followed(results):
    scores = summarize(results)
    failures = [(r.objects[0].colour, r.objects[0].frames_found, r.objects[0].measured_direction) for r in results]
    assert scores["persistence"] >= 0.85 and scores["direction_accuracy"] >= 0.85, failures


def test_text_to_video_follows_one_object_captions(pipe):
    captions = [spec.caption for spec in ONE_OBJECT_SPECS]
    generators = [torch.Generator().manual_seed(0) for _ in captions]
    videos = pipe(captions, num_frames=9, guidance_scale=3.0, generator=generators).frames
    _assert_followed([analyze_clip(video, spec) for video, spec in zip(videos, ONE_OBJECT_SPECS)])


def test_image_to_video_keeps_the_object_of_the_first_frame(pipe):
    i2v = StarFlowVImageToVideoPipeline.from_pipe(pipe)
    i2v.set_progress_bar_config(disable=True)
    results = []
    for spec in ONE_OBJECT_SPECS:
        video = i2v(
            image=render_clip(spec, num_frames=1, seed=0)[0], prompt=spec.caption, num_frames=9, guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
        ).frames[0]
        results.append(analyze_clip(video, spec))
    # the analyzer finds the first frame's object colour in every frame, moving the captioned way
    _assert_followed(results)
