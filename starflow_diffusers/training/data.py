# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Captioned video (and image) folders for the STARFlow trainers.

A data folder holds videos (.mp4, .mov, .avi, .mkv, .webm) and/or images (.png, .jpg, .jpeg, .webp, .bmp;
1-frame clips), in subfolders too. Captions come from a `metadata.jsonl` in the folder (one JSON object per
line with `file_name`, relative to the folder, and `text`, `caption` or `prompt`) or from a sidecar
`<name>.txt` next to each file; the sidecar wins. Every file needs a caption.

Videos are decoded with opencv, sampled at the requested fps from their first frame, resized to cover
(height, width) and centre-cropped. Files that cannot be read or are too short are skipped with a warning
and counted (`VideoCaptionDataset.skipped`): once when the folder is scanned, and again if a file fails
later while training, so an epoch never stops on a bad file.
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from diffusers.utils import logging

from ..pipelines.inputs import IMAGE_EXTENSIONS


logger = logging.get_logger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm")
METADATA_FILE = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption", "prompt")


class VideoDecodeError(Exception):
    """A file that cannot be used as a clip (unreadable, corrupt or too short)."""


@dataclass
class MediaFile:
    path: str
    caption: str
    is_image: bool


def _read_metadata_captions(data_dir: str) -> Dict[str, str]:
    path = os.path.join(data_dir, METADATA_FILE)
    captions: Dict[str, str] = {}
    if not os.path.isfile(path):
        return captions
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON: {e}") from e
            if not isinstance(entry, dict) or "file_name" not in entry:
                raise ValueError(f"{path}:{number} needs a `file_name` entry.")
            caption = next((entry[key] for key in CAPTION_KEYS if isinstance(entry.get(key), str)), None)
            if caption is None:
                raise ValueError(f"{path}:{number} needs a caption under one of {', '.join(CAPTION_KEYS)}.")
            captions[os.path.normpath(entry["file_name"])] = caption
    return captions


def scan_data_dir(data_dir: str) -> List[MediaFile]:
    """Every video/image under `data_dir` with its caption, sorted by path. Raises `ValueError` for a
    missing or empty folder and lists the files that have no caption."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"`data_dir` {data_dir!r} is not a directory.")
    captions = _read_metadata_captions(data_dir)
    media, missing = [], []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            ext = os.path.splitext(name)[1].lower()
            if ext not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS or name.startswith("."):
                continue
            path = os.path.join(root, name)
            relative = os.path.normpath(os.path.relpath(path, data_dir))
            sidecar = os.path.splitext(path)[0] + ".txt"
            if os.path.isfile(sidecar):
                with open(sidecar, encoding="utf-8") as f:
                    caption = f.read().strip()
            else:
                caption = captions.get(relative)
            if caption is None:
                missing.append(relative)
            else:
                media.append(MediaFile(path, caption, ext in IMAGE_EXTENSIONS))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} file(s) in {data_dir!r} have no caption ({shown}): add them to {METADATA_FILE} "
            f"(`file_name` + `text`) or write a sidecar <name>.txt."
        )
    if not media:
        raise ValueError(
            f"`data_dir` {data_dir!r} holds no videos ({', '.join(VIDEO_EXTENSIONS)}) or images "
            f"({', '.join(IMAGE_EXTENSIONS)})."
        )
    return media


def frame_indices(num_frames: int, source_fps: float, fps: Optional[float]) -> List[int]:
    """Source frame numbers of `num_frames` frames sampled at `fps` from the start (consecutive if None)."""
    if fps is None or not source_fps or math.isnan(source_fps):
        return list(range(num_frames))
    step = source_fps / fps
    return [int(round(i * step)) for i in range(num_frames)]


def resize_center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (H, W, 3) so it covers (height, width), then crop the centre."""
    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        frame = cv2.resize(frame, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frame[top : top + height, left : left + width]


def probe_video(path: str) -> tuple:
    """(frame count, fps) from the container, without decoding."""
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise VideoDecodeError("opencv cannot open it")
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), float(capture.get(cv2.CAP_PROP_FPS))
    finally:
        capture.release()


def read_video(path: str, num_frames: int, fps: Optional[float]) -> np.ndarray:
    """(num_frames, H, W, 3) uint8 RGB frames sampled at `fps` from the start of the video."""
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise VideoDecodeError("opencv cannot open it")
        wanted = frame_indices(num_frames, float(capture.get(cv2.CAP_PROP_FPS)), fps)
        frames, index, position = [], 0, 0
        while index < len(wanted):
            if not capture.grab():
                raise VideoDecodeError(f"it has {position} readable frames, {wanted[-1] + 1} are needed")
            while index < len(wanted) and wanted[index] == position:
                ok, frame = capture.retrieve()
                if not ok or frame is None:
                    raise VideoDecodeError(f"frame {position} cannot be decoded")
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                index += 1
            position += 1
        return np.stack(frames)
    finally:
        capture.release()


def read_image(path: str) -> np.ndarray:
    """(1, H, W, 3) uint8 RGB."""
    frame = cv2.imread(path, cv2.IMREAD_COLOR)
    if frame is None:
        raise VideoDecodeError("opencv cannot read the image")
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)[None]


def frames_to_tensor(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, height, width) float32 in [-1, 1]."""
    frames = np.stack([resize_center_crop(frame, height, width) for frame in frames])
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


class VideoCaptionDataset(Dataset):
    """Clips of a captioned folder as {"pixels": (3, T, height, width) in [-1, 1], "caption": str}.

    Args:
        data_dir (`str`): the folder (see the module docstring for its layout).
        height, width (`int`): output frame size (resize to cover, then centre crop).
        num_frames (`int`): frames per video clip; images are 1-frame clips.
        fps (`float`, *optional*): sampling rate; None takes consecutive frames.
        check_files (`bool`): open every video once while scanning and skip the unreadable or too-short
            ones now rather than during training.
    """

    def __init__(
        self,
        data_dir: str,
        height: int,
        width: int,
        num_frames: int,
        fps: Optional[float] = None,
        check_files: bool = True,
    ):
        for name, value in (("height", height), ("width", width), ("num_frames", num_frames)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if fps is not None and fps <= 0:
            raise ValueError(f"`fps` must be > 0, got {fps}.")
        self.data_dir, self.height, self.width, self.num_frames, self.fps = data_dir, height, width, num_frames, fps
        self.skipped: Dict[str, str] = {}
        media = scan_data_dir(data_dir)
        if check_files:
            media = [item for item in media if item.is_image or self._video_is_long_enough(item.path)]
        if not media:
            raise ValueError(
                f"No usable clip in {data_dir!r}: all {len(self.skipped)} file(s) were skipped "
                f"(first: {next(iter(self.skipped.items()))})."
            )
        self.media = media

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _skip(self, path: str, reason: str) -> None:
        if path not in self.skipped:
            logger.warning(f"Skipping {path}: {reason}.")
        self.skipped[path] = reason

    def _video_is_long_enough(self, path: str) -> bool:
        try:
            count, source_fps = probe_video(path)
        except VideoDecodeError as e:
            self._skip(path, str(e))
            return False
        needed = frame_indices(self.num_frames, source_fps, self.fps)[-1] + 1
        if count < needed:
            self._skip(path, f"too short: {count} frames, {needed} needed for {self.num_frames} at fps={self.fps}")
            return False
        return True

    def __len__(self) -> int:
        return len(self.media)

    def load(self, index: int) -> Dict[str, object]:
        """Decode one item; raises `VideoDecodeError` for a bad file."""
        item = self.media[index]
        frames = read_image(item.path) if item.is_image else read_video(item.path, self.num_frames, self.fps)
        return {"pixels": frames_to_tensor(frames, self.height, self.width), "caption": item.caption}

    def __getitem__(self, index: int) -> Dict[str, object]:
        # a file that fails now is skipped for the next one, so an epoch never stops on it
        for offset in range(len(self.media)):
            candidate = (index + offset) % len(self.media)
            try:
                return self.load(candidate)
            except VideoDecodeError as e:
                self._skip(self.media[candidate].path, str(e))
        raise RuntimeError(f"No clip of {self.data_dir!r} could be decoded ({self.num_skipped} skipped).")


def collate_clips(examples: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Stack clips of equal shape; every key but "caption" holds tensors."""
    shapes = {tuple((key, tuple(value.shape)) for key, value in example.items() if key != "caption") for example in examples}
    if len(shapes) > 1:
        raise ValueError(
            f"A batch mixes clips of different shapes {sorted(shapes)} (images are 1-frame clips): use "
            "--train_batch_size 1 or keep images and videos in separate data folders."
        )
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0] if key != "caption"}
    batch["caption"] = [example["caption"] for example in examples]
    return batch


class CachedClipDataset(Dataset):
    """Items precomputed once (e.g. VAE posterior parameters) with their captions."""

    def __init__(self, items: List[Dict[str, object]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict[str, object]:
        return self.items[index]


def cache_dataset(
    dataset: Dataset,
    encode: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
    process_index: int = 0,
    num_processes: int = 1,
    gather: Optional[Callable[[list], list]] = None,
    progress: bool = True,
) -> CachedClipDataset:
    """Run `encode` (pixels (1, 3, T, H, W) -> dict of tensors without batch dim) once over the dataset.

    With several processes each encodes every `num_processes`-th clip and `gather` (e.g. accelerate's
    `gather_object`) shares the results, so all processes hold the full cache."""
    from tqdm.auto import tqdm

    indices = range(process_index, len(dataset), num_processes)
    local = []
    for index in tqdm(indices, desc="Caching latents", disable=not progress):
        example = dataset[index]
        with torch.no_grad():
            encoded = encode(example["pixels"].unsqueeze(0))
        local.append((index, {key: value.cpu() for key, value in encoded.items()}, example["caption"]))
    entries = gather(local) if gather is not None and num_processes > 1 else local
    entries = sorted(entries, key=lambda entry: entry[0])
    return CachedClipDataset([{**encoded, "caption": caption} for _, encoded, caption in entries])


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A fresh permutation every epoch, a pure function of (seed, epoch): a resumed run sees the same order
    as an uninterrupted one. Call `set_epoch` (accelerate's prepared dataloaders forward it) per epoch."""

    def __init__(self, num_items: int, seed: int = 0):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        order = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_items, generator=order).tolist())
