# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""`starflow-convert`: original STARFlow / STARFlow-V checkpoint + YAML -> diffusers pipeline folder.

    starflow-convert --checkpoint starflow-v_7B_t2v_caus_480p.pth --config starflow-v_7B_t2v_caus_480p.yaml \
        --vae Wan2.2-TI2V-5B-Diffusers --text-encoder flan-t5-xl --tokenizer flan-t5-xl \
        --output starflow-v-7b-diffusers --dtype bf16

With `--transformer-only`, only the transformer folder (config.json + safetensors) is written.

Also runnable as `python -m starflow_diffusers.conversion`.
"""

import argparse
import sys
from typing import Optional, Sequence

from . import DEFAULT_MAX_SHARD_SIZE, TORCH_DTYPE_NAMES


PROG = "starflow-convert"
# Exit codes: argparse already uses 2 for bad arguments; a checkpoint that cannot be converted is the same
# kind of user error.
EXIT_USER_ERROR = 2
EXIT_OS_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an original STARFlow / STARFlow-V checkpoint and its training YAML into a folder "
        "loadable with StarFlowVPipeline.from_pretrained (video) or StarFlowPipeline.from_pretrained (image), "
        "or, with --transformer-only, StarFlowVTransformer.from_pretrained.",
    )
    parser.add_argument("--checkpoint", required=True, help="original state dict (.pth, or .safetensors)")
    parser.add_argument("--config", required=True, help="original YAML with its `arguments:` list")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--vae", help="diffusers VAE folder (or a pipeline folder with vae/): Wan2.2 for video, SD-VAE for image")
    parser.add_argument("--text-encoder", help="T5 encoder folder (or a pipeline folder with text_encoder/), e.g. flan-t5-xl")
    parser.add_argument("--tokenizer", help="tokenizer folder (or a pipeline folder with tokenizer/)")
    parser.add_argument(
        "--transformer-only", action="store_true", help="write only the transformer folder (config.json + safetensors)"
    )
    parser.add_argument(
        "--dtype", choices=list(TORCH_DTYPE_NAMES), default="fp32", help="dtype of the written weights (default: fp32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest safetensors file, e.g. 5GB, 500MB (decimal units; default: {DEFAULT_MAX_SHARD_SIZE})",
    )
    return parser


def _human_size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    components = dict(vae_path=args.vae, text_encoder_path=args.text_encoder, tokenizer_path=args.tokenizer)
    if args.transformer_only and any(components.values()):
        parser.error("--transformer-only writes no --vae/--text-encoder/--tokenizer; drop one or the other")

    from .convert_starflow import ConversionError
    from .writer import DTYPES, convert_checkpoint_to_folder, convert_checkpoint_to_pipeline_folder, parse_size

    try:
        parse_size(args.max_shard_size)
    except ConversionError as e:
        parser.error(f"argument --max-shard-size: {e}")
    common = dict(torch_dtype=DTYPES[args.dtype], overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    try:
        if args.transformer_only:
            summary = convert_checkpoint_to_folder(args.checkpoint, args.config, args.output, **common)
        else:
            summary = convert_checkpoint_to_pipeline_folder(args.checkpoint, args.config, args.output, **components, **common)
    except ConversionError as e:
        return _fail(str(e), EXIT_USER_ERROR)
    except OSError as e:
        return _fail(f"could not read or write files: {e}", EXIT_OS_ERROR)
    except KeyboardInterrupt:
        return _fail(f"interrupted; {args.output} was left as it was", EXIT_INTERRUPTED)
    print(
        f"wrote {summary['num_tensors']} tensors ({_human_size(summary['total_size'])}, {args.dtype}) in "
        f"{len(summary['files'])} file(s) to {args.output}"
    )
    if "pipeline" in summary:
        parts = ", ".join(["transformer", "scheduler", *summary["components"]])
        print(f"{summary['pipeline']} folder with {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
