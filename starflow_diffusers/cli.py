# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""`starflow-v`: generate, edit and score videos with a STARFlow-V pipeline from the command line.

    starflow-v generate "a red circle moving right" -o out.mp4
    starflow-v image-to-video first_frame.png "a blue square moving down" -o out.mp4
    starflow-v video-to-video in.mp4 "a green triangle moving left" -o out.mp4 --strength 0.6
    starflow-v likelihood in.mp4 --prompt "a red circle moving right"
    starflow-v convert ...       # = starflow-convert
    starflow-v train-lora ...    # = starflow-train-lora

The model is the bundled tiny one (`starflow_diffusers.BUNDLED_MODEL`, 17 frames of 32x32 moving shapes)
unless `--model PATH` names another pipeline folder. Videos are written as H.264 mp4, with each pixel
enlarged `--upscale` times (nearest neighbour) so that small frames are watchable.
"""

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence

import numpy as np


PROG = "starflow-v"
DELEGATED = {
    "convert": ("starflow_diffusers.conversion.__main__", "convert an original checkpoint (starflow-convert)"),
    "train-lora": ("starflow_diffusers.training.train_lora", "LoRA fine-tuning (starflow-train-lora)"),
}
DENOISE_CHOICES = ("auto", "learned", "score", "none")
# the bundled model's best prompt adherence on benchmarks/shapes_quality.py
DEFAULT_GUIDANCE_SCALE = 3.0
MAX_UPSCALE = 32


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _guidance(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value!r}")
    if not (number >= 1 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 1 (1 disables guidance), got {value!r}")
    return number


def _upscale(value: str) -> int:
    number = _positive_int(value)
    if number > MAX_UPSCALE:
        # every frame is held enlarged in memory before encoding: 32x of a 480p clip is already ~200 GB
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_UPSCALE}], got {value!r}")
    return number


def _strength(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    from . import BUNDLED_MODEL

    parser = argparse.ArgumentParser(prog=PROG, description="Generate, edit and score videos with STARFlow-V.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default=BUNDLED_MODEL, help="StarFlowVPipeline folder (default: the bundled tiny model)")
    model.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    model.add_argument("--seed", type=int, default=0)

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("-o", "--output", required=True, help="mp4 file to write")
    sampling.add_argument("--guidance-scale", type=_guidance, default=DEFAULT_GUIDANCE_SCALE, help="1 disables guidance")
    sampling.add_argument("--denoise", choices=DENOISE_CHOICES, default="auto")
    sampling.add_argument("--fps", type=_positive_int, default=16, help="frame rate of the mp4 (and of the prompt template)")
    sampling.add_argument(
        "--upscale", type=_upscale, default=8, help=f"enlarge each pixel this many times in the mp4 (at most {MAX_UPSCALE})"
    )

    frames = argparse.ArgumentParser(add_help=False)
    frames.add_argument("--num-frames", type=_positive_int, default=None, help="default: the model's trained length")
    frames.add_argument("--height", type=_positive_int, default=None, help="pixels; default: the trained size")
    frames.add_argument("--width", type=_positive_int, default=None, help="pixels; default: the trained size")

    generate = commands.add_parser("generate", parents=[model, sampling, frames], help="text-to-video")
    generate.add_argument("prompt")

    i2v = commands.add_parser("image-to-video", parents=[model, sampling, frames], help="continue a first frame")
    i2v.add_argument("image", help="the first frame (an image file)")
    i2v.add_argument("prompt")

    v2v = commands.add_parser("video-to-video", parents=[model, sampling], help="edit a video through its exact noise")
    v2v.add_argument("video", help="the source video file")
    v2v.add_argument("prompt")
    v2v.add_argument("--strength", type=_strength, default=0.5, help="fresh noise mixed into the source's noise, in [0, 1]")
    v2v.add_argument("--source-prompt", default=None, help="caption of the source (default: the prompt)")

    likelihood = commands.add_parser("likelihood", parents=[model], help="bits per dimension of a video (lower is more likely)")
    likelihood.add_argument("video", help="a video file")
    likelihood.add_argument("--prompt", default="", help="caption to condition on (default: none)")

    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _check_file(parser: argparse.ArgumentParser, name: str, path: str) -> None:
    if not os.path.isfile(path):
        parser.error(f"{name} {path!r} is not a file")


def _check_output(parser: argparse.ArgumentParser, path: str) -> None:
    if not path.lower().endswith(".mp4"):
        parser.error(f"--output {path!r} must end in .mp4")
    if os.path.isdir(path):
        parser.error(f"--output {path!r} is a folder; name the mp4 file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"--output {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        parser.error(f"--output {path!r}: the folder {folder!r} is not writable")


def _check_device(parser: argparse.ArgumentParser, device: Optional[str]) -> None:
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        parser.error(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind, False):
        parser.error(f"--device {device!r} is not available on this machine")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no model, so that bad input fails at once with the argument's name."""
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        parser.error(f"--model {args.model!r} is not a pipeline folder (no model_index.json)")
    _check_device(parser, args.device)
    if getattr(args, "output", None) is not None:
        _check_output(parser, args.output)
    if getattr(args, "image", None) is not None:
        _check_file(parser, "image", args.image)
    if getattr(args, "video", None) is not None:
        _check_file(parser, "video", args.video)
    if args.command != "likelihood" and not args.prompt.strip():
        parser.error("the prompt is empty")


def load_pipeline(args: argparse.Namespace, pipeline_class):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = pipeline_class.from_pretrained(args.model)
    return pipe.to(device), device


def warn_unknown_words(pipe, prompts: Sequence[str]) -> None:
    """Words the model's tokenizer does not know are read as <unk>: say so (a word-level vocabulary is small)."""
    tokenizer = pipe.tokenizer
    if tokenizer is None or tokenizer.unk_token_id is None:
        return
    unknown = []
    for prompt in prompts:
        for word in prompt.split():
            if tokenizer.unk_token_id in tokenizer(word, add_special_tokens=False).input_ids and word not in unknown:
                unknown.append(word)
    if unknown:
        print(f"warning: the model does not know {', '.join(map(repr, unknown))}; they are read as <unk>", file=sys.stderr)


def write_video(frames: np.ndarray, path: str, fps: int, upscale: int) -> None:
    """(T, H, W, 3) frames in [0, 1] -> an H.264 mp4, written next to `path` and renamed into place."""
    from diffusers.utils import export_to_video

    frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    folder, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(folder, f".{name}.partial.mp4")
    try:
        export_to_video(list(frames), partial, fps=fps)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _generator(device: str, seed: int):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def run(args: argparse.Namespace) -> None:
    from .pipelines import StarFlowVImageToVideoPipeline, StarFlowVPipeline, StarFlowVVideoToVideoPipeline

    if args.command == "likelihood":
        pipe, device = load_pipeline(args, StarFlowVPipeline)
        warn_unknown_words(pipe, [args.prompt])
        bits = pipe.log_likelihood(args.video, prompt=args.prompt, generator=_generator(device, args.seed))
        print(f"{args.video}: {bits.item():.4f} bits/dim")
        return

    sampling = dict(guidance_scale=args.guidance_scale, denoise=args.denoise, fps=args.fps)
    if args.command == "generate":
        pipe, device = load_pipeline(args, StarFlowVPipeline)
        warn_unknown_words(pipe, [args.prompt])
        video = pipe(
            args.prompt, num_frames=args.num_frames, height=args.height, width=args.width,
            generator=_generator(device, args.seed), **sampling,
        ).frames[0]
    elif args.command == "image-to-video":
        pipe, device = load_pipeline(args, StarFlowVImageToVideoPipeline)
        warn_unknown_words(pipe, [args.prompt])
        video = pipe(
            image=args.image, prompt=args.prompt, num_frames=args.num_frames, height=args.height, width=args.width,
            generator=_generator(device, args.seed), **sampling,
        ).frames[0]
    else:
        pipe, device = load_pipeline(args, StarFlowVVideoToVideoPipeline)
        warn_unknown_words(pipe, [args.prompt] + ([args.source_prompt] if args.source_prompt else []))
        video = pipe(
            video=args.video, prompt=args.prompt, source_prompt=args.source_prompt, strength=args.strength,
            generator=_generator(device, args.seed), **sampling,
        ).frames[0]
    write_video(video, args.output, args.fps, args.upscale)
    print(f"wrote {args.output}: {video.shape[0]} frames of {video.shape[1]}x{video.shape[2]} (shown {args.upscale}x)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv: List[str] = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module, _ = DELEGATED[argv[0]]
        delegate = importlib.import_module(module).main
        return delegate(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        run(args)
    except ValueError as e:
        # the pipelines' argument errors name the argument
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        # a solve that diverged (FlowSolveDivergedError): nothing was written
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
