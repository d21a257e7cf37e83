# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Prompt adherence and temporal consistency of a moving-shapes model (the bundled one by default).

Held-out captions: the first `--num-clips` clips of the synthetic world's `test` split, whose (colour, shape)
pairs never occur in training. For each caption one clip is generated with a fixed seed (clip i uses seed
`--seed` + i) and measured with the opencv analyzer of `starflow_diffusers.evaluation`:

* colour accuracy: captioned objects whose colour is found in at least half of the frames;
* direction accuracy: captioned objects whose centroid track moves the captioned way;
* persistence: captioned objects found in every frame;
* likelihood gap: bits/dim of the held-out real clips with their frames shuffled in time minus bits/dim of
  the same clips in order (same captions, same noise augmentation); > 0 means time order is learned;
* image-to-video persistence (reported, no target): each held-out clip's real first frame continued with
  its caption; captioned objects whose colour is found in every generated frame.

Prints a table and one JSON line.

    python benchmarks/shapes_quality.py
    python benchmarks/shapes_quality.py --model runs/shapes-32px --guidance-scale 2 --contact-sheet sheet.png
"""

import argparse
import json
import os
import sys
import time

import cv2
import numpy as np
import torch


TARGETS = {"colour_accuracy": 0.90, "direction_accuracy": 0.80, "persistence": 0.95, "likelihood_gap_bits_per_dim": 0.05}


def scheduler_overrides(items) -> dict:
    """KEY=VALUE strings -> settings; values are read as Python literals where they are one (3e-3, True)."""
    import ast

    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--scheduler {item!r}: expected KEY=VALUE")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    return settings


def build_parser() -> argparse.ArgumentParser:
    from starflow_diffusers import BUNDLED_MODEL
    from starflow_diffusers.cli import DEFAULT_GUIDANCE_SCALE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_MODEL, help="StarFlowVPipeline folder (default: the bundled model)")
    parser.add_argument("--num-clips", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="clip i is generated with seed + i")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic test split")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--denoise", default="auto", choices=("auto", "learned", "score", "none"))
    parser.add_argument("--batch-size", type=int, default=8, help="clips generated together")
    parser.add_argument("--contact-sheet", default=None, help="write a PNG grid of the first 8 generated clips here")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--scheduler", nargs="*", default=[], metavar="KEY=VALUE",
        help="JacobiFlowScheduler settings over the model's, e.g. mode=adaptive threshold=0.003",
    )
    return parser


def contact_sheet(videos, captions, path: str, rows: int = 8, frame_step: int = 2, scale: int = 4) -> None:
    """A PNG grid: one generated clip per row (every `frame_step`-th frame), its caption above it."""
    label_height = 14
    tiles = []
    for video, caption in zip(videos[:rows], captions[:rows]):
        frames = [np.kron(frame, np.ones((scale, scale, 1))) for frame in video[::frame_step]]
        strip = np.concatenate([np.pad(f, ((2, 2), (2, 2), (0, 0)), constant_values=1.0) for f in frames], axis=1)
        strip = (strip * 255).round().astype(np.uint8)
        label = np.full((label_height, strip.shape[1], 3), 255, dtype=np.uint8)
        cv2.putText(label, caption, (4, label_height - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.concatenate([label, strip], axis=0))
    sheet = np.concatenate(tiles, axis=0)
    partial = f"{path}.partial.png"
    cv2.imwrite(partial, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    os.replace(partial, path)


def percent_interval(interval) -> str:
    return f"{100 * interval[0]:.1f}-{100 * interval[1]:.1f}%" if interval else ""


def main(argv=None) -> dict:
    from starflow_diffusers import JacobiFlowScheduler, StarFlowVImageToVideoPipeline, StarFlowVPipeline
    from starflow_diffusers.evaluation import analyze_clip, summarize
    from starflow_diffusers.training.synthetic import generate_clips

    args = build_parser().parse_args(argv)
    if args.num_clips < 1 or args.batch_size < 1:
        raise SystemExit("--num-clips and --batch-size must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = StarFlowVPipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipe.scheduler = JacobiFlowScheduler.from_config(pipe.scheduler.config, **scheduler_overrides(args.scheduler))
    size, num_frames = pipe.default_base_frame_size, pipe.transformer.config.trained_latent_frames
    clips = generate_clips(args.num_clips, "test", size=size, num_frames=num_frames, seed=args.data_seed)
    captions = [clip.caption for clip in clips]

    start = time.perf_counter()
    videos = []
    for first in range(0, len(clips), args.batch_size):
        batch = captions[first : first + args.batch_size]
        generators = [torch.Generator(device).manual_seed(args.seed + first + i) for i in range(len(batch))]
        videos.extend(pipe(batch, guidance_scale=args.guidance_scale, denoise=args.denoise, generator=generators).frames)
    generation_s = time.perf_counter() - start
    scores = summarize([analyze_clip(video, clip.spec) for video, clip in zip(videos, clips)])

    i2v = StarFlowVImageToVideoPipeline.from_pipe(pipe)
    i2v.set_progress_bar_config(disable=True)
    i2v_results = []
    for index, clip in enumerate(clips):  # one image per call
        continued = i2v(
            image=clip.frames[0], prompt=clip.caption, guidance_scale=args.guidance_scale, denoise=args.denoise,
            generator=torch.Generator(device).manual_seed(args.seed + index),
        ).frames[0]
        i2v_results.append(analyze_clip(continued, clip.spec))
    i2v_scores = summarize(i2v_results)
    scores["i2v_persistence"], scores["i2v_persistence_ci95"] = i2v_scores["persistence"], i2v_scores["persistence_ci95"]

    # the same clips, in order and with frames shuffled; the noise augmentation is drawn identically
    real = torch.stack([torch.from_numpy(c.frames).permute(3, 0, 1, 2).float() / 127.5 - 1 for c in clips])
    shuffled = real[:, :, torch.from_numpy(np.random.default_rng(args.data_seed).permutation(num_frames))]
    bits = {}
    for name, latents in (("real", real), ("shuffled", shuffled)):
        values = []
        for first in range(0, len(clips), args.batch_size):
            generator = torch.Generator(device).manual_seed(args.seed + first)
            values.append(pipe.log_likelihood(
                latents=latents[first : first + args.batch_size].to(device), prompt=captions[first : first + args.batch_size],
                noise_augment=True, generator=generator,
            ).cpu())
        bits[name] = float(torch.cat(values).mean())
    scores.update(
        bits_per_dim_real=bits["real"], bits_per_dim_shuffled=bits["shuffled"],
        likelihood_gap_bits_per_dim=bits["shuffled"] - bits["real"],
    )

    result = {
        "benchmark": "shapes_quality", "model": os.path.abspath(args.model), "num_clips": len(clips),
        "num_frames": num_frames, "size": size, "seed": args.seed, "guidance_scale": args.guidance_scale,
        "denoise": args.denoise, "device": device, "generation_seconds_per_clip": generation_s / len(clips), **scores,
    }
    print(f"{len(clips)} held-out captions, {scores['num_objects']} objects, {num_frames} frames of {size}x{size}, "
          f"guidance {args.guidance_scale}, {generation_s / len(clips):.2f} s per clip on {device}")
    # the 95% interval: where the model's true rate may lie, given this many objects
    print(f"{'metric':<30} {'value':>8} {'target':>8}  pass  {'95% interval':>13}")
    for name, target in TARGETS.items():
        value = scores[name]
        shown = f"{value:.4f}" if name.startswith("likelihood") else f"{100 * value:.1f}%"
        wanted = f">={target}" if name.startswith("likelihood") else f">={100 * target:.0f}%"
        passed = "yes" if value >= target else "NO"
        print(f"{name:<30} {shown:>8} {wanted:>8}  {passed:<4}  {percent_interval(scores.get(name + '_ci95')):>13}")
    print(f"{'extra_object_rate (info)':<30} {100 * scores['extra_object_rate']:>7.1f}%")
    i2v = f"{100 * scores['i2v_persistence']:.1f}%"
    print(f"{'i2v_persistence (info)':<30} {i2v:>8} {'':>8}  {'':<4}  {percent_interval(scores['i2v_persistence_ci95']):>13}")
    print(f"{'bits/dim real / shuffled':<30} {bits['real']:.4f} / {bits['shuffled']:.4f}")
    result["passed"] = all(scores[name] >= target for name, target in TARGETS.items())
    print(json.dumps(result))
    if args.contact_sheet:
        contact_sheet(videos, captions, args.contact_sheet)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
