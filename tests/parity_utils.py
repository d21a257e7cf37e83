"""Access to the original implementation's parity fixtures in ../shared/parity (never copied here)."""

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PARITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "parity"
FORWARD_TOL = 1e-4
JACOBI_TOL = 1e-3


def require_parity():
    if not PARITY_DIR.is_dir():
        pytest.fail(f"parity fixtures not found at {PARITY_DIR}")


@lru_cache(maxsize=None)
def fixture(name: str):
    """(tensors, run settings) of a fixture such as "video_tiny"."""
    require_parity()
    tensors = load_file(str(PARITY_DIR / f"{name}.tensors.safetensors"))
    settings = json.loads((PARITY_DIR / f"{name}.json").read_text())
    return tensors, settings


@lru_cache(maxsize=None)
def converted_model(name: str):
    from starflow_diffusers.conversion import convert_original_checkpoint

    require_parity()
    return convert_original_checkpoint(str(PARITY_DIR / f"{name}.pth"), str(PARITY_DIR / f"{name}.yaml"))


def to_diffusers_layout(t: torch.Tensor) -> torch.Tensor:
    """Original video layout (B, T, C, H, W) -> diffusers (B, C, T, H, W); images are unchanged."""
    return t.permute(0, 2, 1, 3, 4) if t.ndim == 5 else t


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.float()).abs().max().item()
