# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""A deterministic world of captioned clips: coloured shapes moving as the caption says.

"a red circle moving left on a gray background", "a blue square moving up and a white triangle moving
right": 1-2 objects, each a shape, a colour, a direction and a speed (speed is not captioned: it is
variation the model has to cover), on a black or captioned background. Frames are small (32x32 by
default) and clips are short, so a tiny model trains on them on a CPU. Every clip is a pure function of
(seed, split, index).

Splits: some (colour, shape) pairs never appear in `train` and are the only pairs of `test`, so the test
split measures generalisation to unseen attribute combinations (every colour and every shape alone is
seen in training).

Write a dataset folder (`<out>/train`, `<out>/test`, each with lossless mp4 files and a `metadata.jsonl`):

    python -m starflow_diffusers.training.synthetic OUTPUT_DIR --num_train 256 --num_test 64

or get clips in memory with `generate_clips` (or, for the trainers, `SyntheticClipDataset`).
"""

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch


SHAPES = ("circle", "square", "triangle")
# RGB, chosen to be far apart in hue so an analyzer can segment them
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 230, 40),
    "green": (40, 200, 60),
    "cyan": (40, 220, 230),
    "blue": (40, 70, 245),
    "magenta": (225, 40, 220),
    "white": (245, 245, 245),
}
DIRECTIONS: Dict[str, Tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# fraction of the free track an object covers over the clip
SPEEDS: Dict[str, float] = {"slow": 0.45, "fast": 0.9}
# None: black and not captioned
BACKGROUNDS: Dict[Optional[str], Tuple[int, int, int]] = {None: (0, 0, 0), "black": (0, 0, 0), "gray": (100, 100, 100)}
SPLITS = ("train", "test")
# the words of every caption, for building a tokenizer for this world
VOCABULARY = ("a", "an", "and", "moving", "on", "background") + SHAPES + tuple(COLOURS) + tuple(DIRECTIONS) + ("gray", "black")


def held_out_pairs() -> Tuple[Tuple[str, str], ...]:
    """(colour, shape) pairs reserved for the test split: a quarter of all pairs, every shape held out
    for two colours and no colour held out for more than one shape."""
    colours = list(COLOURS)
    return tuple(
        (colour, shape)
        for ci, colour in enumerate(colours)
        for si, shape in enumerate(SHAPES)
        if (ci + si) % 4 == 0
    )


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    direction: str
    speed: str

    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} moving {self.direction}"


@dataclass(frozen=True)
class ClipSpec:
    objects: Tuple[ObjectSpec, ...]
    background: Optional[str] = None

    @property
    def caption(self) -> str:
        text = " and ".join(obj.caption() for obj in self.objects)
        return f"{text} on a {self.background} background" if self.background else text

    def to_dict(self) -> dict:
        return {"objects": [asdict(obj) for obj in self.objects], "background": self.background}


@dataclass
class SyntheticClip:
    """frames: (T, H, W, 3) uint8 RGB."""

    frames: np.ndarray
    caption: str
    spec: ClipSpec


def check_two_object_fraction(fraction, max_objects: int, name: str = "two_object_fraction") -> None:
    """A probability of a two-object clip, which needs `max_objects` 2; errors name the argument `name`."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"`{name}` must be in [0, 1] (or None), got {fraction!r}.")
    if max_objects != 2:
        raise ValueError(f"`{name}` needs `max_objects` 2, got {max_objects}.")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}.")


def sample_clip_spec(
    rng: np.random.Generator, split: str = "train", max_objects: int = 2, two_object_fraction: Optional[float] = None
) -> ClipSpec:
    """Draw 1..max_objects objects with distinct colours from the split's (colour, shape) pairs: each count
    equally likely, or two objects with probability `two_object_fraction` (which needs `max_objects` 2)."""
    _check_choice("split", split, SPLITS)
    if max_objects not in (1, 2):
        raise ValueError(f"`max_objects` must be 1 or 2, got {max_objects}.")
    if two_object_fraction is not None:
        check_two_object_fraction(two_object_fraction, max_objects)
    held_out = set(held_out_pairs())
    pairs = [
        (colour, shape)
        for colour in COLOURS
        for shape in SHAPES
        if ((colour, shape) in held_out) == (split == "test")
    ]
    objects: List[ObjectSpec] = []
    count = int(rng.integers(1, max_objects + 1)) if two_object_fraction is None else 1 + int(rng.random() < two_object_fraction)
    for _ in range(count):
        free = [p for p in pairs if p[0] not in {obj.colour for obj in objects}]
        colour, shape = free[int(rng.integers(len(free)))]
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        speed = list(SPEEDS)[int(rng.integers(len(SPEEDS)))]
        objects.append(ObjectSpec(shape, colour, direction, speed))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return ClipSpec(tuple(objects), background)


def _object_track(
    obj: ObjectSpec, rng: np.random.Generator, size: int, radius: float, num_frames: int
) -> np.ndarray:
    """(T, 2) float centre positions (x, y): a straight constant-speed track inside the frame."""
    low, high = radius + 1, size - radius - 1
    travel = SPEEDS[obj.speed] * (high - low)
    dx, dy = DIRECTIONS[obj.direction]
    start_along = rng.uniform(low, high - travel)
    across = rng.uniform(low, high)
    progress = np.linspace(0.0, travel, num_frames)
    # moving left/up starts at the far end of the track
    along = start_along + progress if (dx + dy) > 0 else high - (start_along - low) - progress
    return np.stack([along, np.full(num_frames, across)] if dx else [np.full(num_frames, across), along], axis=1)


_SUBPIXEL_BITS = 4


def _draw(frame: np.ndarray, shape: str, centre: np.ndarray, radius: float, colour: Tuple[int, int, int]) -> None:
    scale = 1 << _SUBPIXEL_BITS
    cx, cy = centre
    if shape == "circle":
        cv2.circle(frame, (round(cx * scale), round(cy * scale)), round(radius * scale), colour, -1, cv2.LINE_AA, _SUBPIXEL_BITS)
        return
    if shape == "square":
        half = radius * 0.85
        points = [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    else:  # an upward triangle with the circle's circumradius
        points = [(cx + radius * 1.1 * np.sin(a), cy - radius * 1.1 * np.cos(a)) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
    polygon = np.round(np.array(points) * scale).astype(np.int32)
    cv2.fillPoly(frame, [polygon], colour, cv2.LINE_AA, _SUBPIXEL_BITS)


# start positions are redrawn until objects never overlap (deterministically; rarely needs more than a few)
_PLACEMENT_TRIES = 50


def _min_distance(tracks: List[np.ndarray]) -> float:
    if len(tracks) < 2:
        return float("inf")
    return float(np.linalg.norm(tracks[0] - tracks[1], axis=1).min())


def render_clip(spec: ClipSpec, size: int = 32, num_frames: int = 17, seed: int = 0) -> np.ndarray:
    """(T, size, size, 3) uint8 RGB frames of `spec`; `seed` fixes the start positions. Two objects are
    placed so that they do not overlap (when some of 50 random placements allows it)."""
    if size < 16:
        raise ValueError(f"`size` must be at least 16 pixels, got {size}.")
    if num_frames < 1:
        raise ValueError(f"`num_frames` must be >= 1, got {num_frames}.")
    for obj in spec.objects:
        _check_choice("shape", obj.shape, SHAPES)
        _check_choice("colour", obj.colour, tuple(COLOURS))
        _check_choice("direction", obj.direction, tuple(DIRECTIONS))
        _check_choice("speed", obj.speed, tuple(SPEEDS))
    _check_choice("background", spec.background, tuple(BACKGROUNDS))
    rng = np.random.default_rng(seed)
    radius = size / 8
    for _ in range(_PLACEMENT_TRIES):
        tracks = [_object_track(obj, rng, size, radius, num_frames) for obj in spec.objects]
        if _min_distance(tracks) > 2.4 * radius:
            break
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUNDS[spec.background]
    for t in range(num_frames):
        for obj, track in zip(spec.objects, tracks):
            _draw(frames[t], obj.shape, track[t], radius, COLOURS[obj.colour])
    return frames


def generate_clips(
    num_clips: int,
    split: str = "train",
    size: int = 32,
    num_frames: int = 17,
    seed: int = 0,
    max_objects: int = 2,
    start_index: int = 0,
    two_object_fraction: Optional[float] = None,
) -> List[SyntheticClip]:
    """Clips `start_index ... start_index + num_clips - 1` of a split, in memory. Clip i depends only on
    (seed, split, i): asking for more clips never changes the earlier ones."""
    _check_choice("split", split, SPLITS)
    clips = []
    for index in range(start_index, start_index + num_clips):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        spec = sample_clip_spec(rng, split, max_objects, two_object_fraction)
        frames = render_clip(spec, size, num_frames, seed=int(rng.integers(2**31)))
        clips.append(SyntheticClip(frames, spec.caption, spec))
    return clips


class SyntheticClipDataset(torch.utils.data.Dataset):
    """Clips 0 ... num_clips - 1 of a split, rendered on demand (about 2 ms each), as the trainers' items
    {"pixels": (3, T, size, size) float32 in [-1, 1], "caption": str}."""

    def __init__(
        self, num_clips: int, split: str = "train", size: int = 32, num_frames: int = 17, seed: int = 0,
        max_objects: int = 2, two_object_fraction: Optional[float] = None,
    ):
        if num_clips < 1:
            raise ValueError(f"`num_clips` must be >= 1, got {num_clips}.")
        _check_choice("split", split, SPLITS)
        if two_object_fraction is not None:
            check_two_object_fraction(two_object_fraction, max_objects)
        self.num_clips, self.split, self.size, self.num_frames = num_clips, split, size, num_frames
        self.seed, self.max_objects, self.two_object_fraction = seed, max_objects, two_object_fraction

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} of a dataset of {self.num_clips}")
        (clip,) = generate_clips(
            1, self.split, self.size, self.num_frames, self.seed, self.max_objects, start_index=index,
            two_object_fraction=self.two_object_fraction,
        )
        pixels = torch.from_numpy(clip.frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)
        return {"pixels": pixels, "caption": clip.caption}


def write_video(path: str, frames: np.ndarray, fps: float) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as a lossless H.264 (4:4:4) mp4 that opencv decodes exactly."""
    import imageio_ffmpeg

    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    writer = imageio_ffmpeg.write_frames(
        path, (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264", pix_fmt_in="rgb24",
        pix_fmt_out="yuv444p", output_params=["-crf", "0"], macro_block_size=1, quality=None,
    )
    writer.send(None)
    for frame in frames:
        writer.send(frame)
    writer.close()


def write_dataset(
    output_dir: str,
    num_train: int = 256,
    num_test: int = 64,
    size: int = 32,
    num_frames: int = 17,
    fps: int = 16,
    seed: int = 0,
    max_objects: int = 2,
    overwrite: bool = False,
) -> Dict[str, int]:
    """Write `<output_dir>/{train,test}/NNNNN.mp4` + `metadata.jsonl` (file_name, text, objects, background).

    The folder is built next to `output_dir` and renamed into place, so it is either complete or absent.
    Returns the number of clips per split."""
    if num_train < 0 or num_test < 0 or num_train + num_test == 0:
        raise ValueError(f"`num_train` and `num_test` must be >= 0 and not both 0, got {num_train}, {num_test}.")
    if fps <= 0:
        raise ValueError(f"`fps` must be > 0, got {fps}.")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"`output_dir` {output_dir} exists and is not empty; pass overwrite=True (--overwrite).")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.")
    try:
        for split, count in (("train", num_train), ("test", num_test)):
            split_dir = os.path.join(staging, split)
            os.makedirs(split_dir)
            lines = []
            for index, clip in enumerate(generate_clips(count, split, size, num_frames, seed, max_objects)):
                name = f"{index:05d}.mp4"
                write_video(os.path.join(split_dir, name), clip.frames, fps)
                lines.append(json.dumps({"file_name": name, "text": clip.caption, "fps": fps, **clip.spec.to_dict()}))
            with open(os.path.join(split_dir, "metadata.jsonl"), "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"train": num_train, "test": num_test}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m starflow_diffusers.training.synthetic",
        description="Write the synthetic moving-shapes video dataset (train and held-out test splits).",
    )
    parser.add_argument("output_dir")
    parser.add_argument("--num_train", type=int, default=256)
    parser.add_argument("--num_test", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="frame side in pixels")
    parser.add_argument("--num_frames", type=int, default=17)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_objects", type=int, default=2, choices=(1, 2))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        counts = write_dataset(
            args.output_dir, args.num_train, args.num_test, args.size, args.num_frames, args.fps, args.seed,
            args.max_objects, args.overwrite,
        )
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {counts['train']} train and {counts['test']} test clips to {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    main()
