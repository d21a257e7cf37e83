# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Measure clips of the moving-shapes world (`training.synthetic`) against their captions, with opencv.

Every pixel is segmented by colour: achromatic dark or gray pixels are background, bright achromatic ones
white, and saturated ones take the palette colour of nearest hue (hue survives the darkening of
anti-aliased edges and the blending with a gray background). In every frame an object of a captioned
colour is the largest connected region of that colour, if it covers at least a third of the smallest
shape's area; its centroid gives the object's track. Per captioned object:

* colour: the colour is found in at least half of the frames;
* persistence: it is found in every frame;
* direction: the least-squares slope of its track, over the frames where it is found, points the
  captioned way (the larger axis and its sign) and covers at least a quarter of the slow speed's travel.

`analyze_clip` scores one clip, `summarize` a list of them; the synthetic ground-truth clips score 100%.
`both_persist_rate` counts the two-object clips where both objects persist, `background_flicker` measures
grain as the frame-to-frame change of the background (0 for ground truth), and `opposite_direction_spec`
gives the caption a time-reversed clip would have.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .training.synthetic import COLOURS, DIRECTIONS, SPEEDS, ClipSpec


# HSV thresholds (S and V in [0, 1])
MIN_SATURATION = 0.4
MIN_VALUE = 0.35
WHITE_MAX_SATURATION = 0.3
WHITE_MIN_VALUE = 0.75
# the smallest shape (the triangle, circumradius 1.1 r) covers 3 sqrt(3) / 4 (1.1 r)^2 pixels
MIN_AREA_FRACTION = 1 / 3
# a track must cover this fraction of the slow speed's travel to count as moving
MIN_TRAVEL_FRACTION = 0.25

BACKGROUND = -1
COLOUR_NAMES = tuple(COLOURS)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """float HSV of uint8 RGB pixels: H in [0, 360), S and V in [0, 1]."""
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)


_PALETTE_HSV = {name: _hsv(np.array([[rgb]], dtype=np.uint8))[0, 0] for name, rgb in COLOURS.items()}
_CHROMATIC = tuple(name for name, hsv in _PALETTE_HSV.items() if hsv[1] >= MIN_SATURATION)


def to_uint8_frames(frames) -> np.ndarray:
    """(T, H, W, 3) RGB frames as uint8: uint8 as is, floats are read as [0, 1]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"`frames` must be (T, H, W, 3) RGB, got shape {frames.shape}.")
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def segment_colours(frame: np.ndarray) -> np.ndarray:
    """(H, W) palette indices (into `COLOUR_NAMES`) of a uint8 RGB frame, `BACKGROUND` (-1) elsewhere.
    A 3x3 median filter first removes isolated noisy pixels."""
    hsv = _hsv(cv2.medianBlur(np.ascontiguousarray(frame), 3))
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    labels = np.full(frame.shape[:2], BACKGROUND, dtype=np.int64)
    chromatic = (saturation >= MIN_SATURATION) & (value >= MIN_VALUE)
    palette_hues = np.array([_PALETTE_HSV[name][0] for name in _CHROMATIC])
    distance = np.abs(hue[..., None] - palette_hues)
    distance = np.minimum(distance, 360.0 - distance)
    nearest = np.array([COLOUR_NAMES.index(name) for name in _CHROMATIC])[distance.argmin(-1)]
    labels[chromatic] = nearest[chromatic]
    labels[(saturation < WHITE_MAX_SATURATION) & (value >= WHITE_MIN_VALUE)] = COLOUR_NAMES.index("white")
    return labels


def min_object_area(size: int) -> int:
    radius = size / 8  # the synthetic world's object radius
    return max(2, int(MIN_AREA_FRACTION * 3 * math.sqrt(3) / 4 * (1.1 * radius) ** 2))


def find_object(labels: np.ndarray, colour: str, min_area: int) -> Optional[Tuple[float, float]]:
    """Centroid (x, y) of the largest region of `colour` in a label map, or None below `min_area`."""
    mask = (labels == COLOUR_NAMES.index(colour)).astype(np.uint8)
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
    if stats[largest, cv2.CC_STAT_AREA] < min_area:
        return None
    return float(centroids[largest, 0]), float(centroids[largest, 1])


def track_direction(track: Sequence[Optional[Tuple[float, float]]], min_travel: float) -> Optional[str]:
    """The direction ("left", "right", "up", "down") of a centroid track from the least-squares slope over
    the frames where the object was found, or None when it is found in fewer than two frames or moves
    less than `min_travel` pixels over the clip."""
    found = [(t, point) for t, point in enumerate(track) if point is not None]
    if len(found) < 2:
        return None
    times = np.array([t for t, _ in found], dtype=np.float64)
    points = np.array([point for _, point in found], dtype=np.float64)
    slopes = np.polyfit(times, points, 1)[0]  # pixels per frame along x and y
    travel = slopes * (len(track) - 1)
    axis = int(np.abs(travel).argmax())
    if abs(travel[axis]) < min_travel:
        return None
    step = [0, 0]
    step[axis] = int(np.sign(travel[axis]))
    return next(name for name, vector in DIRECTIONS.items() if list(vector) == step)


@dataclass
class ObjectResult:
    """The measurements of one captioned object."""

    colour: str
    direction: str
    frames_found: int
    num_frames: int
    measured_direction: Optional[str]

    @property
    def colour_correct(self) -> bool:
        return 2 * self.frames_found >= self.num_frames

    @property
    def persistent(self) -> bool:
        return self.frames_found == self.num_frames

    @property
    def direction_correct(self) -> bool:
        return self.measured_direction == self.direction


@dataclass
class ClipResult:
    """Per-object results of one clip, and the colours found in at least half of the frames that the caption
    does not name."""

    objects: List[ObjectResult]
    extra_colours: List[str] = field(default_factory=list)


def analyze_clip(frames, spec: ClipSpec) -> ClipResult:
    """Measure a (T, H, W, 3) RGB clip (uint8, or floats in [0, 1]) against the caption's `spec`."""
    frames = to_uint8_frames(frames)
    num_frames, size = frames.shape[0], min(frames.shape[1:3])
    min_area = min_object_area(size)
    radius = size / 8
    min_travel = MIN_TRAVEL_FRACTION * SPEEDS["slow"] * (size - 2 * radius - 2)
    label_maps = [segment_colours(frame) for frame in frames]
    objects = []
    for obj in spec.objects:
        track = [find_object(labels, obj.colour, min_area) for labels in label_maps]
        found = sum(point is not None for point in track)
        objects.append(ObjectResult(obj.colour, obj.direction, found, num_frames, track_direction(track, min_travel)))
    captioned = {obj.colour for obj in spec.objects}
    extra = [
        colour for colour in COLOUR_NAMES if colour not in captioned
        and 2 * sum(find_object(labels, colour, min_area) is not None for labels in label_maps) >= num_frames
    ]
    return ClipResult(objects, extra)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval of a rate of `successes` in `trials` (95% for z = 1.96): how far a rate
    measured on this many objects can be from the model's true rate. It stays inside [0, 1] and is not
    empty at 0% or 100%, unlike the normal approximation."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"Need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}.")
    if not z > 0:
        raise ValueError(f"`z` must be > 0 (1.96 for a 95% interval), got {z}.")
    rate = successes / trials
    denominator = 1 + z**2 / trials
    centre = (rate + z**2 / (2 * trials)) / denominator
    half_width = z * math.sqrt(rate * (1 - rate) / trials + z**2 / (4 * trials**2)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def summarize(results: Sequence[ClipResult]) -> Dict[str, Any]:
    """Rates over every captioned object of `results`: colour accuracy, direction accuracy, persistence (each
    with its 95% Wilson interval as `<name>_ci95`); and the fraction of clips with a colour the caption does
    not name."""
    objects = [obj for result in results for obj in result.objects]
    if not objects:
        raise ValueError("`results` holds no captioned object.")
    scores = {}
    for name, attribute in (
        ("colour_accuracy", "colour_correct"), ("direction_accuracy", "direction_correct"), ("persistence", "persistent"),
    ):
        successes = sum(getattr(obj, attribute) for obj in objects)
        scores[name] = successes / len(objects)
        scores[f"{name}_ci95"] = wilson_interval(successes, len(objects))
    scores["extra_object_rate"] = float(np.mean([bool(result.extra_colours) for result in results]))
    scores["num_clips"] = len(results)
    scores["num_objects"] = len(objects)
    return scores


def both_persist_rate(results: Sequence[ClipResult]) -> Tuple[float, Tuple[float, float], int]:
    """Among the clips of `results` with two or more captioned objects: the fraction where every one of them
    is found in every frame, its 95% Wilson interval, and the number of such clips."""
    clips = [result for result in results if len(result.objects) >= 2]
    if not clips:
        raise ValueError("`results` holds no clip with two captioned objects.")
    successes = sum(all(obj.persistent for obj in result.objects) for result in clips)
    return successes / len(clips), wilson_interval(successes, len(clips)), len(clips)


# object edges blur over a pixel or two: they are not background
BACKGROUND_MARGIN = 2


def background_flicker(frames) -> float:
    """Grain: the mean absolute change (in 0-255 units, over RGB) from each frame to the next at pixels that
    are background in both, at least `BACKGROUND_MARGIN` pixels from anything of a palette colour. A static
    background, as in every ground-truth clip, gives 0. NaN when no pixel qualifies."""
    frames = to_uint8_frames(frames)
    kernel = np.ones((2 * BACKGROUND_MARGIN + 1,) * 2, dtype=np.uint8)
    background = [cv2.erode((segment_colours(frame) == BACKGROUND).astype(np.uint8), kernel) > 0 for frame in frames]
    changes, count = 0.0, 0
    for t in range(len(frames) - 1):
        mask = background[t] & background[t + 1]
        if mask.any():
            difference = np.abs(frames[t + 1].astype(np.int16) - frames[t].astype(np.int16)).mean(-1)
            changes += float(difference[mask].sum())
            count += int(mask.sum())
    return changes / count if count else float("nan")


def mean_interval(values: Sequence[float], z: float = 1.96) -> Tuple[float, float]:
    """The normal-approximation 95% interval (z = 1.96) of the mean of `values` (NaNs left out)."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"Need at least two values for an interval, got {len(values)}.")
    half_width = z * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half_width), float(values.mean() + half_width)


OPPOSITE_DIRECTIONS = {"left": "right", "right": "left", "up": "down", "down": "up"}


def opposite_direction_spec(spec: ClipSpec) -> ClipSpec:
    """The same objects and background, each moving the other way: the caption of the clip reversed in time."""
    return replace(spec, objects=tuple(replace(obj, direction=OPPOSITE_DIRECTIONS[obj.direction]) for obj in spec.objects))
