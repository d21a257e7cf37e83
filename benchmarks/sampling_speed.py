# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Sampling speed of STARFlow-V: likelihood, sequential and Jacobi sampling, memory and long-video scaling.

Times the "bench_small" model (`../shared/parity/bench_small.{pth,yaml}`, converted with our converter) on
`bench_small.inputs.safetensors` and compares with the original implementation's reference figures (issue 7,
measured on this machine type with 2 threads). Prints a table and one JSON line.

    python benchmarks/sampling_speed.py                          # bench_small, fused QKV, fp32
    python benchmarks/sampling_speed.py --model converted/       # a converted pipeline or transformer folder
    python benchmarks/sampling_speed.py --model ckpt.pth --config ckpt.yaml   # an original checkpoint
    PYTHONPATH=/path/to/other/checkout python benchmarks/sampling_speed.py   # time another version

Definitions:
* likelihood: one `transformer(x, text)` forward (data -> noise and log-determinant), batch 1.
* sampling: the flow inversion `pipe(..., denoise="none", output_type="latent")` with guidance 4.5
  (w = 3.5, [cond; uncond] text): the deep block with its KV cache, then the shallow blocks. This is what
  the original's `model.reverse` does; the learned denoiser is timed on its own ("denoise").
* NFE: network evaluations during the solve, one per `StarFlowVTransformer.evaluate_block` call with tokens: one chunk,
  one iteration, one block (deep or shallow), both guidance halves in the same call. The text prefix is
  not counted; a sliding-window context re-encoding (long videos only) counts as one. Likelihood is 1.
* time: the median of `--repeats` runs after one warm-up run, on `--threads` threads.
* peak memory: the largest increase of the process's resident set during a call (Linux VmHWM).
* KV cache: bytes of the deep block's cache of the same solve with the model in fp32 and in bf16.
* streaming: `pipe.stream(...)` with `convergence="sample"` at the largest frame count: seconds to the first
  final frame and to the last one, for `denoise="none"` and `"learned"`.
The machine probe (fp32 matmul GFLOP/s, load average) tells how busy the machine was: the reference
figures were taken on an idle machine, and 2 threads on a shared 2-core machine slow down a lot.
"""

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))  # a PYTHONPATH checkout comes first, so other versions can be timed

from diffusers.utils import logging as diffusers_logging  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import starflow_diffusers  # noqa: E402
from starflow_diffusers import JacobiFlowScheduler, StarFlowVPipeline, StarFlowVTransformer  # noqa: E402
from starflow_diffusers.models.transformer_starflow_v import StarFlowFlowBlock  # noqa: E402


PARITY_DIR = REPO_ROOT.parent / "shared" / "parity"
GUIDANCE_SCALE = 4.5
SOLVER = dict(block_size=32, threshold=1e-3, max_iterations=32)
# The original implementation on bench_small, this machine type, random weights, 2 threads (issue 7).
REFERENCE = {
    "likelihood_s": {5: 0.041, 10: 0.063, 20: 0.115},
    "jacobi_s": {5: 0.26, 10: 0.53, 20: 1.21},
    "jacobi_nfe": {5: 70, 10: 89, 20: 122},
    "sequential_s": {5: 0.77, 10: 1.49, 20: 4.89},
    "sequential_nfe": {5: 640, 10: 960, 20: 1600},
}
# Done-when of issue 7: our time over the reference figure at most this.
TARGETS = {"jacobi_s": 0.7, "sequential_s": 0.8, "likelihood_s": 0.8}


# ---- model and inputs ----------------------------------------------------------------------------------


def load_transformer(model: str, config: str, dtype: torch.dtype) -> StarFlowVTransformer:
    """An original checkpoint (.pth + YAML) through our converter, or a converted pipeline/transformer folder."""
    from starflow_diffusers.conversion import convert_original_checkpoint

    path = Path(model)
    if path.is_dir():
        if (path / "model_index.json").exists():
            transformer = StarFlowVTransformer.from_pretrained(path, subfolder="transformer")
        else:
            transformer = StarFlowVTransformer.from_pretrained(path)
    else:
        config = config or str(path.with_suffix(".yaml"))
        transformer = convert_original_checkpoint(str(path), config)
    return transformer.to(dtype).eval()


def load_inputs(path: Path, transformer: StarFlowVTransformer, frames: int):
    """(noise (1, C, T, H, W), text (2, L, D) = [cond; uncond]): the file's `x_T*`/`y_T*` where they fit the
    model, else seeded Gaussian ones of the model's shape (the text of the file's longest clip if it fits)."""
    config = transformer.config
    tensors = load_file(str(path)) if path.exists() else {}
    text_shape = (2, config.max_text_length, config.text_embed_dim)
    noise_shape = (1, frames, config.in_channels, config.sample_size, config.sample_size)
    noise = tensors.get(f"x_T{frames}")
    if noise is None or noise.shape != noise_shape:
        noise = torch.randn(noise_shape, generator=torch.Generator().manual_seed(frames))
    texts = [t for k, t in sorted(tensors.items()) if k.startswith("y_T") and t.shape == text_shape]
    text = tensors.get(f"y_T{frames}", texts[-1] if texts else None)
    if text is None or text.shape != text_shape:
        text = torch.randn(text_shape, generator=torch.Generator().manual_seed(0))
    # the original's video layout (B, T, C, H, W) -> diffusers' (B, C, T, H, W)
    return noise.permute(0, 2, 1, 3, 4).contiguous(), text.to(transformer.dtype)


# ---- measurement helpers -------------------------------------------------------------------------------


class CountingBlocks:
    """Counts chunk evaluations (NFE: `evaluate_block` calls with token inputs) and records the KV caches the
    flow blocks create, as (block, cache) pairs (`cache.nbytes` once the solve has written them)."""

    def __init__(self):
        self.nfe, self.caches = 0, []

    @contextmanager
    def active(self):
        evaluate, init_cache = StarFlowVTransformer.evaluate_block, StarFlowFlowBlock.init_cache

        def counted_evaluate(model, block_index, inputs, *args, **kwargs):
            self.nfe += inputs is not None  # a text prefill alone is not counted
            return evaluate(model, block_index, inputs, *args, **kwargs)

        def recorded_init_cache(block, *args, **kwargs):
            cache = init_cache(block, *args, **kwargs)
            self.caches.append((block, cache))
            return cache

        StarFlowVTransformer.evaluate_block, StarFlowFlowBlock.init_cache = counted_evaluate, recorded_init_cache
        try:
            yield self
        finally:
            StarFlowVTransformer.evaluate_block, StarFlowFlowBlock.init_cache = evaluate, init_cache


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def peak_rss_increase(fn):
    """(result, bytes the resident set grew by at its peak during fn) or None where Linux cannot tell."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _status_bytes("VmRSS")
    except OSError:
        return fn(), None
    result = fn()
    return result, _status_bytes("VmHWM") - before


def timed(fn, repeats: int):
    """(median seconds, all seconds) of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def interleaved(functions: dict) -> dict:
    """Median seconds of each {name: (fn, repeats)}, calling them in turn (a, b, a, b, ...) so that a drift of
    the machine's speed affects all alike; a function stops once it has run `repeats` times. No warm-up."""
    times = {name: [] for name in functions}
    for round_index in range(max(repeats for _, repeats in functions.values())):
        for name, (fn, repeats) in functions.items():
            if round_index < repeats:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items() if t}


def machine_probe() -> dict:
    """fp32 matmul throughput on the benchmark's threads, and the load average: how busy the machine is."""
    a = torch.randn(256, 256)
    for _ in range(10):
        a @ a
    start = time.perf_counter()
    count = 0
    while time.perf_counter() - start < 0.5:
        a @ a
        count += 1
    gflops = 2 * 256**3 * count / (time.perf_counter() - start) / 1e9
    return {"matmul_gflops": round(gflops, 1), "loadavg_1min": os.getloadavg()[0]}


def make_pipeline(transformer, mode: str, convergence: str = "batch", **scheduler_kwargs) -> StarFlowVPipeline:
    """A pipeline solving with `mode`; `convergence` defaults to the original's batch-wide rule, which the
    comparison with the original needs (older versions of this package without the option used it always)."""
    if "convergence" in inspect.signature(JacobiFlowScheduler.__init__).parameters:
        scheduler_kwargs["convergence"] = convergence
    scheduler = JacobiFlowScheduler(mode=mode, **{**SOLVER, **scheduler_kwargs})
    pipe = StarFlowVPipeline(transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, noise, text, denoise="none"):
    return pipe(
        prompt_embeds=text[:1], negative_prompt_embeds=text[1:], latents=noise, guidance_scale=GUIDANCE_SCALE,
        denoise=denoise, output_type="latent",
    ).frames


# ---- the benchmark ---------------------------------------------------------------------------------------


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    transformer = load_transformer(args.model, args.config, dtype)
    if args.fuse:
        transformer.fuse_qkv_projections()
    inputs_path = Path(args.inputs)
    result = {
        "benchmark": "sampling_speed",
        "model": args.model,
        "package": str(Path(starflow_diffusers.__file__).parent),
        "dtype": args.dtype,
        "fused_qkv": args.fuse,
        "convergence": args.convergence,
        "compile": args.compile,
        "threads": args.threads,
        "repeats": args.repeats,
        "probe_before": machine_probe(),
    }
    if args.compile:
        # regional compilation of every transformer layer; the first (warm-up) calls compile
        start = time.perf_counter()
        # one graph per layer variant: causal or not, with or without a cache/mask, batch sizes, widths
        torch._dynamo.config.recompile_limit = 64
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
        with torch.no_grad():
            for frames in args.frames:
                noise, text = load_inputs(inputs_path, transformer, frames)
                transformer(noise.to(dtype), text[:1])
                sample(make_pipeline(transformer, "jacobi", args.convergence), noise, text)
        result["compile_s"] = round(time.perf_counter() - start, 1)
    rows = {}

    with torch.no_grad():
        for frames in args.frames:
            noise, text = load_inputs(inputs_path, transformer, frames)
            row = rows.setdefault(frames, {})
            x = noise.to(dtype)
            row["likelihood_s"], _ = timed(lambda: transformer(x, text[:1]), args.repeats)
            row["likelihood_nfe"] = 1
            timings = {}
            for mode, repeats in (("jacobi", args.repeats), ("sequential", args.sequential_repeats)):
                if repeats == 0:
                    continue
                pipe = make_pipeline(transformer, mode, args.convergence)
                counter = CountingBlocks()
                with counter.active():  # also the warm-up
                    _, peak = peak_rss_increase(lambda: sample(pipe, noise, text))
                row[f"{mode}_nfe"] = counter.nfe
                row[f"{mode}_peak_mib"] = None if peak is None else round(peak / 2**20, 1)
                timings[mode] = (lambda pipe=pipe: sample(pipe, noise, text), repeats)
                if mode == "jacobi":
                    row["kv_cache_bytes"] = max(c.nbytes for block, c in counter.caches if block is transformer.deep_block)
                    if transformer.has_denoiser:
                        latents = sample(pipe, noise, text)
                        row["denoise_s"], _ = timed(lambda: pipe.denoise_latents(latents, text[:1], "learned"), args.repeats)
            # Jacobi and sequential alternate, so their ratio is measured side by side
            for mode, seconds in interleaved(timings).items():
                row[f"{mode}_s"] = seconds

    # the KV caches of the same solve with the model in bf16 and in fp32
    frames = min(args.frames)
    cache_bytes = {}
    for name, cache_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = transformer if dtype == cache_dtype else load_transformer(args.model, args.config, cache_dtype)
        noise, text = load_inputs(inputs_path, model, frames)
        counter = CountingBlocks()
        with counter.active(), torch.no_grad():
            sample(make_pipeline(model, "jacobi"), noise, text)
        cache_bytes[name] = max(c.nbytes for block, c in counter.caches if block is model.deep_block)
    result["kv_cache"] = {
        "frames": frames,
        "deep_fp32_bytes": cache_bytes["fp32"],
        "deep_bf16_bytes": cache_bytes["bf16"],
        "bf16_over_fp32": cache_bytes["bf16"] / cache_bytes["fp32"],
    }

    # long videos: a local window, cost linear in the number of frames
    if args.scaling_frames:
        scaling, runs = {}, {}
        with torch.no_grad():
            for frames in args.scaling_frames:
                noise, text = load_inputs(inputs_path, transformer, frames)
                pipe = make_pipeline(
                    transformer, "jacobi", args.convergence, local_window=args.window, context_frames=args.context
                )
                counter = CountingBlocks()
                with counter.active():  # also the warm-up
                    sample(pipe, noise, text)
                scaling[frames] = {"nfe": counter.nfe}
                runs[frames] = (lambda pipe=pipe, noise=noise, text=text: sample(pipe, noise, text), args.scaling_repeats)
            # the lengths alternate, so their time ratio is measured side by side
            for frames, seconds in interleaved(runs).items():
                scaling[frames]["s"] = seconds
        small, large = min(args.scaling_frames), max(args.scaling_frames)
        result["scaling"] = {
            "window": args.window,
            "context": args.context,
            **{f"s_{f}": round(v["s"], 3) for f, v in scaling.items()},
            **{f"nfe_{f}": v["nfe"] for f, v in scaling.items()},
            "time_ratio": round(scaling[large]["s"] / scaling[small]["s"], 3),
            "frame_ratio": large / small,
        }

    if args.stream:
        frames = max(args.frames)
        noise, text = load_inputs(inputs_path, transformer, frames)
        pipe = make_pipeline(transformer, "jacobi", "sample")
        streaming = {"frames": frames}
        with torch.no_grad():
            for denoise in ("none", "learned") if transformer.has_denoiser else ("none",):
                kwargs = dict(
                    prompt_embeds=text[:1], negative_prompt_embeds=text[1:], latents=noise,
                    guidance_scale=GUIDANCE_SCALE, denoise=denoise, output_type="latent",
                )
                firsts, totals = [], []
                for _ in range(args.scaling_repeats + 1):  # the first run warms up
                    start = time.perf_counter()
                    for index, _ in enumerate(pipe.stream(**kwargs)):
                        if index == 0:
                            firsts.append(time.perf_counter() - start)
                    totals.append(time.perf_counter() - start)
                full, _ = timed(lambda: pipe(**kwargs), args.scaling_repeats)
                streaming[denoise] = {
                    "first_frame_s": round(statistics.median(firsts[1:]), 3),
                    "last_frame_s": round(statistics.median(totals[1:]), 3),
                    "non_streamed_s": round(full, 3),
                }
        result["streaming"] = streaming

    result["probe_after"] = machine_probe()
    result["frames"] = {
        str(f): {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for f, row in rows.items()
    }
    ratios = {}
    for f, row in rows.items():
        for key, reference in REFERENCE.items():
            if f in reference and key in row:
                ratios[f"{key}_{f}"] = round(row[key] / reference[f], 3)
    result["vs_reference"] = ratios
    if 20 in rows and "sequential_s" in rows[20] and "jacobi_s" in rows[20]:
        result["jacobi_speedup_over_sequential_20"] = round(rows[20]["sequential_s"] / rows[20]["jacobi_s"], 2)
    return result


def print_table(result: dict) -> None:
    header = ("frames", "what", "ours (s)", "NFE", "reference (s)", "ref NFE", "ours/ref", "target")
    lines = []
    for frames, row in result["frames"].items():
        f = int(frames)
        for what in ("likelihood", "jacobi", "sequential"):
            if f"{what}_s" not in row:
                continue
            reference = REFERENCE[f"{what}_s"].get(f)
            ratio = result["vs_reference"].get(f"{what}_s_{f}")
            lines.append((
                frames, what, f"{row[f'{what}_s']:.3f}", str(row[f"{what}_nfe"]),
                "-" if reference is None else f"{reference:.3f}",
                str(REFERENCE.get(f"{what}_nfe", {}).get(f, "-" if what != "likelihood" else 1)),
                "-" if ratio is None else f"{ratio:.2f}x", f"<= {TARGETS[f'{what}_s']}x",
            ))
        if "denoise_s" in row:
            lines.append((frames, "learned denoiser", f"{row['denoise_s']:.3f}", "", "", "", "", ""))
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    for line in (header, *lines):
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
    print()
    for frames, row in result["frames"].items():
        if "jacobi_peak_mib" in row:
            print(f"peak RSS increase, {frames} frames: jacobi {row['jacobi_peak_mib']} MiB, "
                  f"sequential {row.get('sequential_peak_mib')} MiB; deep KV cache {row['kv_cache_bytes'] / 2**20:.2f} MiB")
    kv = result["kv_cache"]
    print(f"deep-block KV cache of a {kv['frames']}-frame solve: fp32 model {kv['deep_fp32_bytes']} B, bf16 model "
          f"{kv['deep_bf16_bytes']} B (bf16/fp32 = {kv['bf16_over_fp32']})")
    if "jacobi_speedup_over_sequential_20" in result:
        print(f"Jacobi speed-up over our sequential at 20 frames: {result['jacobi_speedup_over_sequential_20']}x (target >= 4x)")
    if "scaling" in result:
        s = result["scaling"]
        print(f"long videos (window {s['window']}, context {s['context']}): " + ", ".join(
            f"{k[2:]} frames {v} s" for k, v in s.items() if k.startswith("s_")) + f"; time ratio {s['time_ratio']} "
              f"for {s['frame_ratio']}x frames (target <= 2.2)")
    if "streaming" in result:
        s = result["streaming"]
        for denoise, v in s.items():
            if denoise != "frames":
                print(f"stream ({s['frames']} frames, denoise={denoise}, convergence=sample): first frame after "
                      f"{v['first_frame_s']} s, last after {v['last_frame_s']} s; non-streamed call {v['non_streamed_s']} s")
    print(f"machine probe: before {result['probe_before']}, after {result['probe_after']}")


def positive_int(text: str) -> int:
    """argparse type of counts (frames, repeats, threads, ...): an integer >= 1; argparse names the argument."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of counts where 0 means none: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(PARITY_DIR / "bench_small.pth"),
                        help="original checkpoint (.pth, with --config) or converted folder (default: bench_small)")
    parser.add_argument("--config", help="original YAML for a .pth model (default: next to it)")
    parser.add_argument("--inputs", default=str(PARITY_DIR / "bench_small.inputs.safetensors"),
                        help="x_T*/y_T* inputs (random ones of the model's shape where they do not fit)")
    parser.add_argument("--frames", type=positive_int, nargs="+", default=[5, 10, 20], help="latent frames")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs per likelihood/Jacobi measurement")
    parser.add_argument("--sequential-repeats", type=non_negative_int, default=3, help="timed sequential runs (0 skips)")
    parser.add_argument("--scaling-frames", type=positive_int, nargs="*", default=[40, 80], help="long-video lengths")
    parser.add_argument("--scaling-repeats", type=positive_int, default=3)
    parser.add_argument("--window", type=positive_int, default=10, help="local window (latent frames) for long videos")
    parser.add_argument("--context", type=non_negative_int, default=8, help="context frames kept when the window slides")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep q/k/v projections separate")
    parser.add_argument("--convergence", choices=["batch", "sample"], default="batch",
                        help="Jacobi stopping rule; 'batch' is the original's (the reference figures)")
    parser.add_argument("--compile", action="store_true", help="compile_repeated_blocks(fullgraph=True) first")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="skip the streaming measurement")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # no dtype-cast notices in the table
    result = run(args)
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
