# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Side-by-side timing of this package and the original apple/ml-starflow code on the same weights and inputs.

The fixed reference figures of issue 7 were taken on an idle machine; a shared 2-core VM varies by 2x
from one minute to the next (steal time), so a fair comparison runs both implementations in one process, in
back-to-back pairs of alternating order (ours, original / original, ours / ...) after one warm-up call each.
The reported ratio is the median of the per-pair ratios; the ratio of the medians and the ratio of the
fastest runs are in the JSON too. It also checks that both produce the same sample. The original code is
not part of this package: pass an extracted copy of its repository.

    git clone https://github.com/apple/ml-starflow /tmp/ml-starflow   # or any extracted copy
    pip install einops pyyaml
    python benchmarks/compare_original.py --original-src /tmp/ml-starflow

Settings are `sampling_speed.py`'s: bench_small, batch 1, fp32, guidance 4.5 (original cfg w 3.5) with
[cond; uncond] text, Jacobi block 32, threshold 1e-3, 32 iterations, no denoising, 2 threads.
The original model is built the way its `sample.py` does (its `train.py` argument parser and
`utils/model_setup.setup_transformer`, executed from the given source so that their unrelated imports are
not needed); its Jacobi solver calls `torch.distributed.all_reduce` each iteration, which is made a no-op
(one process). Prints a table and one JSON line.

`--compile` times our transformer compiled (every layer, dynamic shapes, inductor freezing); each shape's
first call compiles (minutes on a 2-core CPU) and is reported as `<mode>_warmup_s`, outside the timed pairs.
"""

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_speed import (  # noqa: E402
    GUIDANCE_SCALE,
    PARITY_DIR,
    SOLVER,
    TARGETS,
    CountingBlocks,
    load_inputs,
    load_transformer,
    machine_probe,
    non_negative_int,
    positive_int,
    make_pipeline,
    sample,
)


def _run_function_from_source(path: Path, name: str, namespace: dict):
    """Define one top-level function of a source file in `namespace`, without importing its module."""
    source = path.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            exec(compile(ast.get_source_segment(source, node), f"{path}:{name}", "exec"), namespace)
            return namespace[name]
    raise SystemExit(f"{name} not found in {path}: is --original-src an apple/ml-starflow checkout?")


def paired_times(ours_fn, original_fn, repeats: int):
    """Seconds of `repeats` (ours, original) pairs, run back to back in alternating order (AB BA AB ...), so
    that each pair sees about the same machine speed; the VM's steal time comes and goes within seconds."""
    ours_times, original_times = [], []
    pair = ((ours_fn, ours_times), (original_fn, original_times))
    for index in range(repeats):
        for fn, times in pair if index % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return ours_times, original_times


def build_original(src: Path, checkpoint: str, config: str):
    import yaml

    sys.path.insert(0, str(src))
    import transformer_flow

    parser = _run_function_from_source(src / "train.py", "get_tarflow_parser", {"argparse": argparse, "pathlib": __import__("pathlib")})()
    with open(config, encoding="utf-8") as f:
        arguments = [f"--{key} {value}" for entry in yaml.safe_load(f)["arguments"] for key, value in entry.items()]
    args = parser.parse_args(" ".join(arguments).split())
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    text_keys = sorted(k for k in state_dict if k.startswith("blocks.") and k.endswith("proj_txt.weight"))
    setup_transformer = _run_function_from_source(src / "utils" / "model_setup.py", "setup_transformer", {
        "Model": transformer_flow.Model, "pre_model_configs": transformer_flow.pre_model_configs,
        "pathlib": __import__("pathlib"), "torch": torch, "print": print,
    })
    model = setup_transformer(args, None, txt_dim=state_dict[text_keys[-1]].shape[1] if text_keys else 0, use_checkpoint=1)
    model.load_state_dict(state_dict, strict=True)
    torch.distributed.all_reduce = lambda *a, **k: None  # one process: the solver's all_reduce is the identity
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original-src", required=True, help="extracted apple/ml-starflow repository")
    parser.add_argument("--model", default=str(PARITY_DIR / "bench_small.pth"))
    parser.add_argument("--config", default=None, help="original YAML (default: next to --model)")
    parser.add_argument("--inputs", default=str(PARITY_DIR / "bench_small.inputs.safetensors"))
    parser.add_argument("--frames", type=positive_int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--sequential-repeats", type=non_negative_int, default=2, help="0 skips sequential sampling")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="time our transformer compiled: compile_repeated_blocks(fullgraph=True, dynamic=True) with "
                             "inductor freezing (weights become constants of the compiled graph)")
    args = parser.parse_args()
    src = Path(args.original_src)
    if not (src / "transformer_flow.py").is_file():
        raise SystemExit(f"--original-src {src} has no transformer_flow.py")
    config = args.config or str(Path(args.model).with_suffix(".yaml"))
    torch.set_num_threads(args.threads)

    original = build_original(src, args.model, config)
    ours = load_transformer(args.model, config, torch.float32)
    ours.fuse_qkv_projections()
    result = {"benchmark": "compare_original", "model": args.model, "threads": args.threads, "repeats": args.repeats,
              "compile": args.compile, "probe_before": machine_probe(), "frames": {}}
    if args.compile:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
        torch._dynamo.config.recompile_limit = 64  # chunk lengths, cache lengths and masks vary
        ours.compile_repeated_blocks(fullgraph=True, dynamic=True)
    w = GUIDANCE_SCALE - 1.0
    original_solver = dict(jacobi_block_size=SOLVER["block_size"], jacobi_th=SOLVER["threshold"],
                           jacobi_max_iter=SOLVER["max_iterations"])
    common = dict(guidance=w, guide_top=None, verbose=False, return_sequence=0, context_length=16)
    with torch.no_grad():
        for frames in args.frames:
            noise, text = load_inputs(Path(args.inputs), ours, frames)
            x = noise.permute(0, 2, 1, 3, 4).contiguous()  # the original's (B, T, C, H, W)
            row = {}
            modes = [("likelihood", args.repeats, lambda: ours(noise, text[:1]), lambda: original(x, text[:1]))]
            pipes = {}
            for mode, repeats in (("jacobi", args.repeats), ("sequential", args.sequential_repeats)):
                if repeats == 0:
                    continue
                pipes[mode] = make_pipeline(ours, mode)
                kwargs = dict(jacobi=True, **original_solver) if mode == "jacobi" else dict(jacobi=False, attn_temp=1.0, annealed_guidance=False)
                modes.append((mode, repeats, lambda p=pipes[mode]: sample(p, noise, text),
                              lambda kw=kwargs: original(x, text, reverse=True, **common, **kw)))
            for mode, repeats, ours_fn, original_fn in modes:
                start = time.perf_counter()
                ours_fn()  # warm-up (with --compile: compiles what this shape needs)
                row[f"{mode}_warmup_s"] = time.perf_counter() - start
                original_fn()
                ours_times, original_times = paired_times(ours_fn, original_fn, repeats)
                row[f"{mode}_s"], row[f"original_{mode}_s"] = median(ours_times), median(original_times)
                row[f"{mode}_ratio"] = median(a / b for a, b in zip(ours_times, original_times))
                row[f"{mode}_ratio_of_medians"] = row[f"{mode}_s"] / row[f"original_{mode}_s"]
                row[f"{mode}_ratio_of_minima"] = min(ours_times) / min(original_times)
                if mode != "likelihood":
                    counter = CountingBlocks()
                    with counter.active():
                        ours_sample = ours_fn()
                    row[f"{mode}_nfe"] = counter.nfe
                    # same sample: ours is (B, C, T, H, W), the original's (B, T, C, H, W)
                    difference = ours_sample.permute(0, 2, 1, 3, 4) - original_fn()
                    row[f"{mode}_max_abs_difference"] = difference.abs().max().item()
            result["frames"][str(frames)] = {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
    result["probe_after"] = machine_probe()

    print(f"{'frames':>6} {'what':>10} {'ours (s)':>9} {'original (s)':>12} {'ours/original':>13} "
          f"{'fastest runs':>12} {'target':>7} {'NFE':>5} {'max |diff|':>10}")
    for frames, row in result["frames"].items():
        for mode in ("likelihood", "jacobi", "sequential"):
            if f"{mode}_s" in row:
                # samples are compared; the likelihood's outputs are not (different output structures)
                difference = f"{row[f'{mode}_max_abs_difference']:.1e}" if f"{mode}_max_abs_difference" in row else "-"
                print(f"{frames:>6} {mode:>10} {row[f'{mode}_s']:>9.3f} {row[f'original_{mode}_s']:>12.3f} "
                      f"{row[f'{mode}_ratio']:>12.2f}x {row[f'{mode}_ratio_of_minima']:>11.2f}x "
                      f"{'<=' + str(TARGETS[f'{mode}_s']):>7} "
                      f"{row.get(f'{mode}_nfe', 1):>5} {difference:>10}")
    print(f"machine probe: before {result['probe_before']}, after {result['probe_after']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
