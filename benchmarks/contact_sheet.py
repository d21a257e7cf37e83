# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""A contact sheet of the bundled model (or another moving-shapes pipeline): the README prompt and two-object
prompts, one clip per row (every second frame), each prompt with seed 0.

    python benchmarks/contact_sheet.py --output docs/bundled_model_contact_sheet.png
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes_quality import contact_sheet  # noqa: E402


PROMPTS = (
    "a red circle moving right",  # the README's
    "a white circle moving right and a cyan circle moving left",
    "a green square moving up and a red triangle moving down",
    "a yellow triangle moving left and a blue circle moving right on a gray background",
    "a magenta square moving down and an orange circle moving up",
    "a blue square moving right and a white triangle moving left on a gray background",
)


def main(argv=None) -> None:
    from starflow_diffusers import BUNDLED_MODEL, StarFlowVPipeline
    from starflow_diffusers.cli import DEFAULT_GUIDANCE_SCALE, DENOISE_CHOICES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_MODEL)
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--denoise", default="auto", choices=DENOISE_CHOICES)
    args = parser.parse_args(argv)
    pipe = StarFlowVPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    videos = [
        pipe(prompt, guidance_scale=args.guidance_scale, denoise=args.denoise, generator=torch.Generator().manual_seed(0)).frames[0]
        for prompt in PROMPTS
    ]
    contact_sheet(videos, list(PROMPTS), args.output, rows=len(PROMPTS))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
