# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Checks and conversions of the STARFlow pipelines' inputs, before any network runs: pixel layouts and
ranges, finite values, sizes, and the aspect ratios the released models were trained with."""

import math
from typing import Optional, Tuple

import numpy as np
import torch


# Aspect-ratio strings the released models were trained with (spec section 6).
TRAINED_ASPECT_RATIOS = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")
DENOISE_MODES = ("auto", "learned", "score", "none")
# Files read as a still image (a one-frame clip) rather than a video, by the pipelines and the data folders.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
OUTPUT_TYPES = ("np", "pil", "pt", "latent")
# A transformer with this many input channels models RGB pixels; any other count models VAE latents.
PIXEL_CHANNELS = 3


def integer_pixels_to_unit_range(images, name: str = "image"):
    """Pixel inputs as diffusers' image and video processors read them, checked: integer (e.g. uint8 from
    opencv or imageio) np arrays and tensors become float32 in [0, 1] (the processors read every np array as
    [0, 1] floats, so 0-255 values would saturate); PIL images pass unchanged. A wrong layout, a channel
    count other than 3, NaN or infinity, or float values outside the accepted range raise a ValueError
    naming `name` and what is accepted (diffusers' layouts): np arrays channels-last, (H, W, 3),
    (N, H, W, 3) or (B, T, H, W, 3), floats in [0, 1]; tensors channels-first, (3, H, W), (N, 3, H, W) or
    (B, T, 3, H, W), floats in [0, 1] or [-1, 1]."""
    if isinstance(images, (list, tuple)):
        return [integer_pixels_to_unit_range(image, name) for image in images]
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4, 5) or images.shape[-1] != 3:
            raise ValueError(
                f"`{name}` np arrays must be channels-last RGB, (H, W, 3), (N, H, W, 3) or (B, T, H, W, 3); got "
                f"shape {images.shape}."
            )
        if np.issubdtype(images.dtype, np.integer):
            return images.astype(np.float32) / np.float32(np.iinfo(images.dtype).max)
        low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
            raise ValueError(
                f"`{name}` float np arrays must hold finite values in [0, 1], got [{low}, {high}] (pass uint8 "
                f"arrays for 0-255 values)."
            )
        return images
    if isinstance(images, torch.Tensor):
        if images.ndim not in (3, 4, 5) or images.shape[-3] != 3:
            raise ValueError(
                f"`{name}` tensors must be channels-first RGB, (3, H, W), (N, 3, H, W) or (B, T, 3, H, W); got "
                f"shape {tuple(images.shape)}."
            )
        if not images.is_floating_point():
            return images.float() / torch.iinfo(images.dtype).max
        low, high = (images.min().item(), images.max().item()) if images.numel() else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high) and -1.0 <= low and high <= 1.0):
            raise ValueError(
                f"`{name}` float tensors must hold finite values in [0, 1] or [-1, 1], got [{low}, {high}]."
            )
    return images


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_finite(**tensors: Optional[torch.Tensor]) -> None:
    """Raise a ValueError naming the first argument holding NaN or infinity (before any network runs: a
    non-finite input would only come out as a NaN video minutes later)."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"`{name}` holds NaN or infinite values.")


def check_default_denoise(default_denoise: str, transformer) -> None:
    """The pipeline config's `default_denoise`: one of `DENOISE_MODES`, and "learned" only with a denoiser."""
    if default_denoise not in DENOISE_MODES:
        raise ValueError(f"`default_denoise` must be one of {DENOISE_MODES}, got {default_denoise!r}.")
    if default_denoise == "learned" and transformer is not None and not transformer.has_denoiser:
        raise ValueError("`default_denoise='learned'` needs a model with a learned denoiser; use 'score' or 'none'.")


def check_sizes(**sizes: Optional[int]) -> None:
    """Raise a ValueError naming the first size that is given but not a positive integer."""
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def parse_aspect_ratio(aspect_ratio: str) -> float:
    """"16:9" -> 16/9 (width over height)."""
    try:
        w, h = (float(v) for v in str(aspect_ratio).split(":"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"`aspect_ratio` must look like 'W:H' with positive numbers (e.g. '16:9'), got {aspect_ratio!r}.")
    return w / h


def closest_trained_aspect_ratio(width: int, height: int) -> str:
    ratio = math.log(width / height)
    return min(TRAINED_ASPECT_RATIOS, key=lambda r: abs(math.log(parse_aspect_ratio(r)) - ratio))


def frame_size_for_aspect_ratio(aspect_ratio: str, base_size: int, multiple: int) -> Tuple[int, int]:
    """(height, width) with area base_size^2 and width/height = aspect_ratio, rounded to `multiple`."""
    r = parse_aspect_ratio(aspect_ratio)
    height = int(round(math.sqrt(base_size**2 / r) / multiple)) * multiple
    width = int(round(math.sqrt(base_size**2 * r) / multiple)) * multiple
    return max(height, multiple), max(width, multiple)
