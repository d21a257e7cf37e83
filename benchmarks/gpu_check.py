# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""One command for a machine with a GPU: numerics, memory and speed of STARFlow-V at 480p scale.

    python benchmarks/gpu_check.py                    # CUDA (about 5 minutes on one large GPU)
    python benchmarks/gpu_check.py --device mps       # Apple silicon
    python benchmarks/gpu_check.py --compile          # also time compile_repeated_blocks
    python benchmarks/gpu_check.py --dry-run          # the same code paths at tiny size on the CPU (a test runs it)

Prints a table per part and one JSON line. Parts:

* numerics: a small random model (`testing_utils.tiny_transformer`, widened) in bf16 on the device against
  the same model in fp32 on the CPU: likelihood (bits/dim), sequential and Jacobi text-to-video,
  image-to-video and streaming (latents). Tolerances: bits/dim within 2e-2, latents within 0.1 absolute
  (bf16 keeps 8 bits of mantissa; a sample goes through tens of layers and a fixed-point solve).
* deep block at real scale: the 7B's deep block (width 4096, 24 layers, random bf16 weights) with the real
  token counts (30 x 53 = 1590 tokens per frame, 256 text tokens, guidance batch 2): KV-cache bytes, ms per
  Jacobi iteration (a 128-token chunk after a 10-frame prefix) and per sequential step, the extrapolated
  deep-block time of a 21-frame solve, and the peak memory against docs/memory.md's estimate.
* speed: Jacobi over sequential sampling on a 480p-shaped small model, host syncs per Jacobi iteration, and
  which SDPA kernel each attention call gets (profiler kernel names).
* memory tools: model offload, group offload (leaf level, with streams on CUDA) and fp8 storage on the small
  model: peak memory and the largest difference from the plain call.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))

from starflow_diffusers import (  # noqa: E402
    JacobiFlowScheduler,
    StarFlowVImageToVideoPipeline,
    StarFlowVPipeline,
    StarFlowVTransformer,
)
from starflow_diffusers.models.transformer_starflow_v import StarFlowFlowBlock, rotary_phases  # noqa: E402
from starflow_diffusers.testing_utils import tiny_pipeline_components  # noqa: E402


BITS_TOLERANCE, LATENT_TOLERANCE = 2e-2, 0.1
# docs/memory.md: 26.5 GB of bf16 KV cache for the 7B at 480p, 21 latent frames, guidance
KV_ESTIMATE_BYTES = 26.5e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_ms(fn, device, repeats: int) -> float:
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats * 1e3


def peak_bytes(device: torch.device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def print_rows(title: str, rows: dict) -> dict:
    print(f"\n{title}")
    for key, value in rows.items():
        print(f"  {key:32} {value}")
    return rows


def small_pipeline(scale: dict, mode: str = "jacobi"):
    """The tiny pipeline's components with a wider, deeper transformer (pixel space, no VAE)."""
    from starflow_diffusers.testing_utils import tiny_transformer

    components = tiny_pipeline_components(with_vae=False)
    components["transformer"] = tiny_transformer(in_channels=3, **scale)
    components["scheduler"] = JacobiFlowScheduler(mode=mode, block_size=8, threshold=1e-4, max_iterations=32, context_frames=1)
    return components


def part_numerics(device, dry_run: bool) -> dict:
    scale = {} if dry_run else dict(shallow_width=128, deep_width=256, num_layers_per_block=(2, 2, 4))
    size = dict(height=4, width=4, num_frames=3)
    rows = {}
    for mode in ("sequential", "jacobi"):
        reference = StarFlowVPipeline(**small_pipeline(scale, mode))
        test = StarFlowVPipeline(**small_pipeline(scale, mode)).to(device, torch.bfloat16 if not dry_run else torch.float32)
        for pipe in (reference, test):
            pipe.set_progress_bar_config(disable=True)

        def run(pipe):
            return pipe("a red circle moving left", guidance_scale=3.0, output_type="latent", denoise="none",
                        latents=torch.randn(1, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1)), **size).frames

        rows[f"t2v_{mode}_max_abs"] = (run(test).float().cpu() - run(reference)).abs().max().item()
        if mode == "jacobi":
            video = torch.rand(1, 3, 3, 4, 4, generator=torch.Generator().manual_seed(2))
            bits = [p.log_likelihood(latents=video, prompt="a red circle") for p in (test, reference)]
            rows["bits_per_dim_abs"] = (bits[0].float().cpu() - bits[1]).abs().max().item()
            i2v = [StarFlowVImageToVideoPipeline(**p.components) for p in (test, reference)]
            for p in i2v:
                p.set_progress_bar_config(disable=True)
            image = torch.rand(1, 3, 1, 4, 4, generator=torch.Generator().manual_seed(3))
            outs = [p(image_latents=image, prompt="a red circle", guidance_scale=3.0, output_type="latent",
                      denoise="none", latents=torch.randn(1, 3, 3, 4, 4, generator=torch.Generator().manual_seed(4)),
                      **size).frames.float().cpu() for p in i2v]
            rows["i2v_max_abs"] = (outs[0] - outs[1]).abs().max().item()
            streamed = torch.cat([f.float().cpu() for f in test.stream(
                "a red circle moving left", guidance_scale=3.0, output_type="latent", denoise="none",
                latents=torch.randn(1, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1)), **size)], dim=2)
            rows["stream_vs_call_max_abs"] = (streamed - run(test).float().cpu()).abs().max().item()
    rows["ok"] = bool(
        rows["bits_per_dim_abs"] <= BITS_TOLERANCE
        and all(v <= LATENT_TOLERANCE for k, v in rows.items() if k.endswith("max_abs"))
    )
    return print_rows(f"numerics ({'fp32' if dry_run else 'bf16'} on {device} vs fp32 on cpu; tolerances: "
                      f"bits/dim {BITS_TOLERANCE}, latents {LATENT_TOLERANCE})", rows)


def part_deep_block(device, dry_run: bool) -> dict:
    if dry_run:
        width, layers, per_frame, text_length, frames = 64, 2, 16, 8, 3
    else:
        width, layers, per_frame, text_length, frames = 4096, 24, 1590, 256, 21
    dtype = torch.float32 if dry_run else torch.bfloat16
    head_dim, batch, chunk = 64 if not dry_run else 32, 2, 128 if not dry_run else 8
    block = StarFlowFlowBlock(48 if not dry_run else 4, width, layers, head_dim, 4.0, text_dim=2048 if not dry_run else 16,
                              soft_clip=4.0, flip=False).to(device, dtype).eval()
    positions = text_length + frames * per_frame
    rows = {}
    reset_peak(device)
    with torch.no_grad():
        from starflow_diffusers.models.transformer_starflow_v import rope_angles, rope_positions

        side = int(math.sqrt(per_frame))
        cos_sin = rope_angles(rope_positions(frames, side, per_frame // side, text_length, 32, device), head_dim)
        table = rotary_phases(cos_sin)
        cache = block.init_cache(batch, positions)
        text = torch.randn(batch, text_length, block.text_proj.in_features, device=device, dtype=dtype)
        block.prefill_text(text, cache, table)
        prefix = min(10, frames - 1) * per_frame
        tokens = torch.randn(batch, prefix, block.proj_in.in_features, device=device, dtype=dtype)
        block.evaluate_chunk(tokens, cache, table)  # the prefix: 10 frames solved
        length = cache.length
        inputs = torch.randn(batch, chunk, block.proj_in.in_features, device=device, dtype=dtype)
        single = inputs[:, :1]

        def jacobi_iteration():
            block.evaluate_chunk(inputs, cache, table)
            cache.truncate(length)

        def sequential_step():
            block.evaluate_chunk(single, cache, table)
            cache.truncate(length)

        repeats = 3 if dry_run else 10
        rows["kv_cache_bytes"] = cache.nbytes
        rows["kv_cache_bytes_estimate"] = KV_ESTIMATE_BYTES if not dry_run else None
        rows["jacobi_iteration_ms"] = timed_ms(jacobi_iteration, device, repeats)
        rows["sequential_step_ms"] = timed_ms(sequential_step, device, repeats)
    # a 21-frame solve: one 32-token chunk plan over the first frame, 128-token chunks after it; iterations per
    # chunk as bench_small measured them (70 NFE for 5 frames of 64 tokens: about 5.5 per chunk)
    chunks = math.ceil(per_frame / 32) + math.ceil((frames - 1) * per_frame / 128)
    rows["extrapolated_jacobi_solve_s"] = chunks * 5.5 * rows["jacobi_iteration_ms"] / 1e3
    rows["extrapolated_sequential_solve_s"] = frames * per_frame * rows["sequential_step_ms"] / 1e3
    rows["peak_bytes"] = peak_bytes(device)
    return print_rows(f"deep block at {'tiny' if dry_run else 'real'} scale on {device} (width {width}, {layers} "
                      f"layers, {per_frame} tokens per frame, {frames} frames, batch {batch})", rows)


def part_speed(device, dry_run: bool) -> dict:
    """Jacobi over sequential on a 480p-shaped small model (many tokens per frame, few channels), host syncs
    per Jacobi iteration, and the SDPA kernels."""
    from torch.profiler import ProfilerActivity, profile

    scale = dict(shallow_width=64, deep_width=128, num_layers_per_block=(1, 1, 2), trained_latent_frames=5)
    height, width, frames = (4, 4, 2) if dry_run else (30, 53, 5)
    dtype = torch.float32 if dry_run else torch.bfloat16
    times = {}
    for mode in ("sequential", "jacobi"):
        components = small_pipeline(scale, mode)
        components["scheduler"] = JacobiFlowScheduler(mode=mode, block_size=32, threshold=1e-3, max_iterations=32)
        pipe = StarFlowVPipeline(**components).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        noise = torch.randn(1, 3, frames, height, width, generator=torch.Generator().manual_seed(0))

        def call():
            return pipe("a red circle", latents=noise, guidance_scale=3.0, denoise="none", output_type="latent",
                        height=height, width=width, num_frames=frames)

        times[mode] = timed_ms(call, device, 1) / 1e3
        if mode == "jacobi":
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            counts = {"syncs": 0, "evaluations": 0}
            tolist, evaluate = torch.Tensor.tolist, StarFlowVTransformer.evaluate_block

            def counted_tolist(t):  # the scheduler's one host sync per iteration
                counts["syncs"] += 1
                return tolist(t)

            def counted_evaluate(model, block_index, inputs, *a, **k):
                counts["evaluations"] += inputs is not None
                return evaluate(model, block_index, inputs, *a, **k)

            torch.Tensor.tolist, StarFlowVTransformer.evaluate_block = counted_tolist, counted_evaluate
            try:
                with profile(activities=activities) as prof:
                    call()
            finally:
                torch.Tensor.tolist, StarFlowVTransformer.evaluate_block = tolist, evaluate
            kernels = {}
            for event in prof.key_averages():
                name = event.key.lower()
                if "attention" in name or "softmax" in name or "bmm" in name:
                    kernels[event.key] = event.count
    rows = {
        "sequential_s": times["sequential"], "jacobi_s": times["jacobi"],
        "jacobi_speedup": times["sequential"] / times["jacobi"],
        "host_syncs_per_iteration": counts["syncs"] / max(counts["evaluations"], 1),
        "attention_kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8]),
    }
    return print_rows(f"speed on {device}: {height}x{width} tokens per frame, {frames} frames", rows)


def part_memory_tools(device, dry_run: bool) -> dict:
    from starflow_diffusers.testing_utils import tiny_pipeline

    def sample(pipe):
        return pipe("a red circle moving left", height=4, width=4, num_frames=3, guidance_scale=3.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0) if device.type == "cpu" else None,
                    latents=torch.randn(1, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1))).frames.float().cpu()

    reference = sample(tiny_pipeline(with_vae=False).to(device))
    # (on a CPU, offloading moves nothing: the dry run checks that the calls go through)
    rows = {}
    settings = {
        "model_offload": lambda p: p.enable_model_cpu_offload(device=device),
        "group_offload_leaf": lambda p: p.transformer.enable_group_offload(
            onload_device=device, offload_type="leaf_level", use_stream=device.type == "cuda"),
        "fp8_storage": lambda p: (p.to(device), p.transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)),
    }
    for name, setup in settings.items():
        pipe = tiny_pipeline(with_vae=False)
        pipe.set_progress_bar_config(disable=True)
        try:
            setup(pipe)
            if name == "group_offload_leaf":
                pipe.text_encoder.to(device)
            reset_peak(device)
            out = sample(pipe)
            rows[name] = {"max_abs": (out - reference).abs().max().item(), "peak_bytes": peak_bytes(device)}
        except Exception as e:  # a failing tool is a result to report, not the end of the check
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return print_rows(f"memory tools on {device} (tiny pipeline; fp8 differs by its weight rounding)", rows)


def part_compile(device, dry_run: bool) -> dict:
    from starflow_diffusers.testing_utils import tiny_pipeline

    pipe = tiny_pipeline(with_vae=False).to(device)
    eager = pipe("a red circle", height=4, width=4, num_frames=3, output_type="latent", latents=torch.randn(1, 3, 3, 4, 4)).frames
    torch._dynamo.config.recompile_limit = 64
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    start = time.perf_counter()
    compiled = pipe("a red circle", height=4, width=4, num_frames=3, output_type="latent", latents=torch.randn(1, 3, 3, 4, 4)).frames
    rows = {"first_call_s": time.perf_counter() - start, "finite": bool(torch.isfinite(compiled).all()),
            "shape_matches": tuple(compiled.shape) == tuple(eager.shape)}
    print(f"\ncompile_repeated_blocks on {device}: {rows}")
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or mps (cpu with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    parser.add_argument("--compile", action="store_true", help="also time compile_repeated_blocks")
    parser.add_argument("--parts", nargs="+", default=["numerics", "deep_block", "speed", "memory_tools"],
                        choices=["numerics", "deep_block", "speed", "memory_tools"], help="run only these parts")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --dry-run to check the script on a CPU)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error("--device mps: MPS is not available here")
    parts = {"numerics": part_numerics, "deep_block": part_deep_block, "speed": part_speed,
             "memory_tools": part_memory_tools}
    report = {"benchmark": "gpu_check", "device": str(device), "dry_run": args.dry_run,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    for name in args.parts:
        start = time.perf_counter()
        try:
            report[name] = parts[name](device, args.dry_run)
        except Exception as e:  # keep going: one GPU slot should report every part
            report[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print(f"\n{name}: FAILED {report[name]['error']}")
        report[name + "_s"] = round(time.perf_counter() - start, 2)
    if args.compile:
        report["compile"] = part_compile(device, args.dry_run)
    print(json.dumps(report, default=str))
    return report


if __name__ == "__main__":
    main()
