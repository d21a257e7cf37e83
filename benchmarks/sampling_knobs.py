# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Speed/quality trade-offs of the sampling knobs on the bench_small model (docs/performance.md).

Every setting samples the same noise and text (`bench_small.inputs.safetensors`, guidance 4.5, no denoising)
and is compared with the exact solution, the sequential inverse of the same flow:
* time: median of `--repeats` runs after a warm-up, every setting in turn (round-robin); NFE as in `sampling_speed.py` (chunk evaluations);
* deviation: max and mean absolute difference of the sample from the sequential one, and the mean one
  relative to the sample's mean magnitude. (A `local_window` smaller than the video also changes what the
  deep block attends to, so its deviation includes that approximation.)
Prints a table and one JSON line.

    python benchmarks/sampling_knobs.py                  # 10 latent frames, 2 threads
    python benchmarks/sampling_knobs.py --frames 20 --repeats 5
"""

import argparse
import json
import sys
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))

from diffusers.utils import logging as diffusers_logging  # noqa: E402

from sampling_speed import (  # noqa: E402
    GUIDANCE_SCALE,
    PARITY_DIR,
    CountingBlocks,
    interleaved,
    load_inputs,
    load_transformer,
    make_pipeline,
)


# (knob, value, scheduler settings over sampling_speed.SOLVER: block 32, threshold 1e-3, 32 iterations)
SWEEP = [
    ("default", "-", {}),
    ("block_size", 8, {"block_size": 8}),
    ("block_size", 16, {"block_size": 16}),
    ("block_size", 64, {"block_size": 64}),
    ("threshold", 1e-2, {"threshold": 1e-2}),
    ("threshold", 1e-4, {"threshold": 1e-4}),
    ("threshold", 1e-6, {"threshold": 1e-6}),
    ("max_iterations", 2, {"max_iterations": 2}),
    ("max_iterations", 4, {"max_iterations": 4}),
    ("max_iterations", 8, {"max_iterations": 8}),
    ("later_block_multiplier", 1, {"later_block_multiplier": 1}),
    ("warm_start", False, {"warm_start": False}),
    ("convergence", "sample", {"convergence": "sample"}),
    ("local_window", 5, {"local_window": 5, "context_frames": 4}),
]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    transformer = load_transformer(args.model, args.config, torch.float32)
    transformer.fuse_qkv_projections()
    noise, text = load_inputs(Path(args.inputs), transformer, args.frames)
    kwargs = dict(
        prompt_embeds=text[:1], negative_prompt_embeds=text[1:], latents=noise, guidance_scale=GUIDANCE_SCALE,
        denoise="none", output_type="latent",
    )
    rows = []
    with torch.no_grad():
        exact = make_pipeline(transformer, "sequential")(**kwargs).frames

        def set_fused(fuse: bool) -> None:
            if fuse:
                transformer.fuse_qkv_projections()
            else:
                transformer.unfuse_qkv_projections()

        settings_runs = {}

        def measure(knob, value, pipe, fuse=True):
            set_fused(fuse)
            counter = CountingBlocks()
            with counter.active():  # also the warm-up
                latents = pipe(**kwargs).frames
            settings_runs[len(rows)] = (lambda: (set_fused(fuse), pipe(**kwargs)), args.repeats)
            rows.append({
                "knob": knob,
                "value": value,
                "nfe": counter.nfe,
                "max_dev": float((latents - exact).abs().max()),
                "mean_dev": float((latents - exact).abs().mean()),
                "relative_mean_dev": float((latents - exact).abs().mean() / exact.abs().mean()),
            })

        measure("sequential", "exact", make_pipeline(transformer, "sequential"))
        for knob, value, settings in SWEEP:
            settings = dict(settings)
            convergence = settings.pop("convergence", "batch")
            measure(knob, value, make_pipeline(transformer, "jacobi", convergence, **settings))
        measure("fuse_projections", False, make_pipeline(transformer, "jacobi"), fuse=False)
        # all settings in turn, round after round: a drift of the machine's speed affects them alike
        for index, seconds in interleaved(settings_runs).items():
            rows[index]["s"] = round(seconds, 3)
    return {"benchmark": "sampling_knobs", "frames": args.frames, "threads": args.threads, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(PARITY_DIR / "bench_small.pth"))
    parser.add_argument("--config")
    parser.add_argument("--inputs", default=str(PARITY_DIR / "bench_small.inputs.safetensors"))
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    result = run(args)
    header = ("knob", "value", "time (s)", "NFE", "max |x - x_seq|", "mean |x - x_seq|", "relative")
    lines = [
        (r["knob"], str(r["value"]), f"{r['s']:.3f}", str(r["nfe"]), f"{r['max_dev']:.2e}", f"{r['mean_dev']:.2e}",
         f"{r['relative_mean_dev']:.2e}")
        for r in result["rows"]
    ]
    widths = [max(len(c) for c in column) for column in zip(header, *lines)]
    for line in (header, *lines):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
