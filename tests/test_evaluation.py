"""The moving-shapes analyzer: the synthetic ground truth scores 100%, and each metric catches its failure."""

import dataclasses

import numpy as np
import pytest

from starflow_diffusers.evaluation import (
    background_flicker,
    both_persist_rate,
    mean_interval,
    opposite_direction_spec,
    BACKGROUND,
    COLOUR_NAMES,
    analyze_clip,
    segment_colours,
    summarize,
    to_uint8_frames,
    track_direction,
    wilson_interval,
)
from starflow_diffusers.training.synthetic import COLOURS, ClipSpec, ObjectSpec, generate_clips, render_clip


PERFECT = {"colour_accuracy": 1.0, "direction_accuracy": 1.0, "persistence": 1.0, "extra_object_rate": 0.0}


@pytest.mark.parametrize("split", ["train", "test"])
def test_ground_truth_clips_score_100_percent(split):
    clips = generate_clips(32, split, seed=3)
    scores = summarize([analyze_clip(clip.frames, clip.spec) for clip in clips])
    assert {k: scores[k] for k in PERFECT} == PERFECT
    assert scores["num_clips"] == 32 and scores["num_objects"] > 32  # some clips hold two objects


def test_noise_and_float_frames_do_not_change_the_scores():
    clips = generate_clips(16, "test", seed=5)
    rng = np.random.default_rng(0)
    noisy = [np.clip(clip.frames / 255.0 + rng.normal(0, 0.1, clip.frames.shape), 0, 1) for clip in clips]
    scores = summarize([analyze_clip(frames, clip.spec) for frames, clip in zip(noisy, clips)])
    assert {k: scores[k] for k in PERFECT} == PERFECT


def test_every_palette_colour_is_segmented_as_itself_on_both_backgrounds():
    for background in (None, "gray"):
        for colour in COLOURS:
            spec = ClipSpec((ObjectSpec("circle", colour, "right", "fast"),), background)
            labels = segment_colours(render_clip(spec, num_frames=1)[0])
            assert set(np.unique(labels)) == {BACKGROUND, COLOUR_NAMES.index(colour)}, (colour, background)


def test_each_metric_catches_its_failure():
    clip = generate_clips(1, "test", seed=7, max_objects=1)[0]
    (obj,) = clip.spec.objects
    # played backwards: the object moves the opposite way
    assert analyze_clip(clip.frames[::-1], clip.spec).objects[0].measured_direction != obj.direction
    # a still clip has no direction
    still = np.repeat(clip.frames[:1], len(clip.frames), axis=0)
    assert analyze_clip(still, clip.spec).objects[0].measured_direction is None
    # another colour than the caption's: not found, not persistent, an extra colour
    other = next(c for c in COLOURS if c != obj.colour)
    result = analyze_clip(clip.frames, ClipSpec((dataclasses.replace(obj, colour=other),), clip.spec.background))
    assert not result.objects[0].colour_correct and not result.objects[0].persistent
    assert result.extra_colours == [obj.colour]
    # the object vanishes after the first frames: colour still found in most frames, but not persistent
    vanishing = clip.frames.copy()
    vanishing[-3:] = vanishing[-3:, :1, :1]
    result = analyze_clip(vanishing, clip.spec).objects[0]
    assert result.colour_correct and not result.persistent and result.frames_found == len(clip.frames) - 3


def test_track_direction_and_input_checks():
    assert track_direction([(5.0, 10.0), None, (9.0, 10.5), (12.0, 10.0)], min_travel=2) == "right"
    assert track_direction([(5.0, 10.0), (5.0, 7.0), (5.5, 2.0)], min_travel=2) == "up"
    assert track_direction([(5.0, 10.0), None, None], min_travel=2) is None
    assert to_uint8_frames(np.ones((2, 4, 4, 3))).max() == 255
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        to_uint8_frames(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="no captioned object"):
        summarize([])


def test_wilson_interval_brackets_the_rate_and_narrows_with_more_objects():
    for successes, trials in ((0, 10), (7, 10), (10, 10), (87, 98), (98, 98)):
        low, high = wilson_interval(successes, trials)
        assert 0.0 <= low <= successes / trials <= high <= 1.0
        assert high - low > 0  # never empty, even at 0% or 100%
        # the bounds are the rates p at which the measured rate is 1.96 standard errors of p away
        for bound in (low, high):
            assert (successes / trials - bound) ** 2 == pytest.approx(1.96**2 * bound * (1 - bound) / trials, abs=1e-12)
        # the interval of the failures is the mirror image
        mirror_low, mirror_high = wilson_interval(trials - successes, trials)
        assert mirror_low == pytest.approx(1 - high) and mirror_high == pytest.approx(1 - low)
    small, large = wilson_interval(7, 10), wilson_interval(700, 1000)
    assert large[1] - large[0] < (small[1] - small[0]) / 5
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="`z`"):
        wilson_interval(5, 10, z=-1.96)


def test_summarize_reports_the_interval_of_each_rate():
    clip = generate_clips(1, "test", seed=7, max_objects=1)[0]
    still = np.repeat(clip.frames[:1], len(clip.frames), axis=0)
    scores = summarize([analyze_clip(clip.frames, clip.spec), analyze_clip(still, clip.spec)])
    assert scores["direction_accuracy"] == 0.5 and scores["persistence"] == 1.0
    assert scores["direction_accuracy_ci95"] == wilson_interval(1, 2)
    assert scores["persistence_ci95"] == wilson_interval(2, 2)


# ---- issue 20's measures ----------------------------------------------------------------------------------------


def test_ground_truth_backgrounds_do_not_flicker_and_noise_does():
    clips = generate_clips(12, "test", size=32, num_frames=9, seed=0)
    assert all(background_flicker(clip.frames) == 0.0 for clip in clips)
    gray = next(clip for clip in clips if clip.spec.background == "gray")
    # independent N(0, s) noise per pixel and channel: E|x_t+1 - x_t| = 2 s / sqrt(pi), away from the clipping
    s = 10.0
    noisy = gray.frames.astype(np.float64) + np.random.default_rng(0).normal(0.0, s, gray.frames.shape)
    flicker = background_flicker(np.clip(noisy, 0, 255).round().astype(np.uint8))
    assert flicker == pytest.approx(2 * s / np.sqrt(np.pi), rel=0.03)
    # the objects are left out: a clip whose only change is its moving objects stays at 0
    assert background_flicker(render_clip(gray.spec, 32, 9, seed=1)) == 0.0


def test_both_objects_must_persist_in_two_object_clips():
    clips = [clip for clip in generate_clips(40, "test", size=32, num_frames=9, seed=0) if len(clip.spec.objects) == 2][:6]
    results = [analyze_clip(clip.frames, clip.spec) for clip in clips]
    assert both_persist_rate(results)[0] == 1.0
    # remove the second object from the last four frames of half the clips
    for result in results[:3]:
        result.objects[1] = dataclasses.replace(result.objects[1], frames_found=5)
    rate, (lo, hi), count = both_persist_rate(results)
    assert (rate, count) == (0.5, 6) and lo < 0.5 < hi
    with pytest.raises(ValueError, match="two captioned objects"):
        both_persist_rate([analyze_clip(c.frames, c.spec) for c in generate_clips(3, "test", 32, 9, 0, max_objects=1)])


def test_mean_interval_and_the_opposite_caption():
    lo, hi = mean_interval([1.0, 2.0, 3.0, float("nan")])
    assert lo < 2.0 < hi and hi - lo == pytest.approx(2 * 1.96 / np.sqrt(3))
    with pytest.raises(ValueError, match="at least two"):
        mean_interval([1.0, float("nan")])
    spec = ClipSpec((ObjectSpec("circle", "red", "left", "slow"), ObjectSpec("square", "blue", "up", "fast")), "gray")
    assert opposite_direction_spec(spec).caption == "a red circle moving right and a blue square moving down on a gray background"
    assert opposite_direction_spec(opposite_direction_spec(spec)) == spec
