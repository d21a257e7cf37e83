"""Smoke demo: build a tiny random-weight STARFlow-V pipeline in memory and write an H.264 mp4.

It exercises the whole stack (prompt template, T5, block-Jacobi inversion, learned denoiser, Wan VAE,
video export) in seconds on a CPU. The weights are random, so the clip is noise, not a meaningful video.
Run `python -m starflow_diffusers.demo --output demo.mp4`.
"""

import argparse
import time

import torch
from diffusers.utils import export_to_video

from . import StarFlowVPipeline
from .testing_utils import tiny_pipeline_components


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="a red circle moving left")
    parser.add_argument("--output", default="demo.mp4", help="mp4 path to write")
    parser.add_argument("--num-frames", type=int, default=17, help="pixel frames, 4k+1")
    parser.add_argument("--size", type=int, default=64, help="frame height and width, a multiple of 16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = StarFlowVPipeline(**tiny_pipeline_components(seed=args.seed))
    start = time.perf_counter()
    video = pipe(
        args.prompt, height=args.size, width=args.size, num_frames=args.num_frames,
        generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    elapsed = time.perf_counter() - start
    export_to_video(list(video), args.output, fps=8)
    print(f"wrote {args.output}: {video.shape[0]} frames of {video.shape[1]}x{video.shape[2]} in {elapsed:.1f}s "
          "(random tiny weights: a plumbing check, not a trained model)")


if __name__ == "__main__":
    main()
