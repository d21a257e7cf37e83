# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Time against fidelity of the flow solvers: the original's Jacobi, our `jacobi`, our `adaptive`, with
threshold sweeps, each measured against the exact sequential sample of the same noise.

    python benchmarks/sampling_fidelity.py                                   # bench_small at 5, 10, 20 frames + bundled
    python benchmarks/sampling_fidelity.py --original-src /tmp/ml-starflow   # also the original code's Jacobi

For every solver setting it reports:
* time: median seconds of `--repeats` runs, all settings called in turn (a, b, c, a, b, c, ...) so that the
  VM's changing speed affects them alike, after one warm-up run each;
* serial calls: network evaluations one after the other (`evaluate_block` calls; the latency proxy on a GPU);
* tokens: tokens evaluated, both guidance halves and every sequence of the batch counted (the compute proxy);
* max / RMS error: of the output latents against our sequential solve (`mode="sequential"`, the exact
  inverse, which matches the original's sequential mode to 2.3e-5 on bench_small);
* Pareto: whether no other setting of the same model and length is both faster and at most as far off
  (max and RMS).
The original's serial calls and tokens are those of our `jacobi` with the batch rule: the same algorithm and
plan, checked by its sample (`original_vs_ours`). Prints a table per model and one JSON line.

bench_small: `../shared/parity/bench_small.{pth,yaml}` (random weights), batch 1, guidance 4.5, no denoising.
bundled: the shapes model, 4 prompts in one batch, guidance 3, no denoising, its 17 frames.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_speed import GUIDANCE_SCALE, PARITY_DIR, load_inputs, load_transformer, machine_probe, positive_int  # noqa: E402

from starflow_diffusers import BUNDLED_MODEL, JacobiFlowScheduler, StarFlowVPipeline, StarFlowVTransformer  # noqa: E402


# (name, scheduler settings); the thresholds of each solver sweep around its default
SOLVERS = [
    ("jacobi", {"mode": "jacobi", "convergence": "batch", "threshold": 1e-2}),
    ("jacobi", {"mode": "jacobi", "convergence": "batch", "threshold": 1e-3}),
    ("jacobi", {"mode": "jacobi", "convergence": "batch", "threshold": 1e-4}),
    ("jacobi", {"mode": "jacobi", "threshold": 1e-3, "shallow_threshold": 1e-5}),
    ("adaptive", {"mode": "adaptive", "threshold": 1e-2}),
    ("adaptive", {"mode": "adaptive", "threshold": 3e-3}),
    ("adaptive", {"mode": "adaptive", "threshold": 1e-3}),
    ("adaptive", {"mode": "adaptive", "threshold": 1e-4}),
    ("adaptive", {"mode": "adaptive", "threshold": 3e-3, "shallow_threshold": 1e-5}),
]
ORIGINAL_THRESHOLDS = (1e-2, 1e-3, 1e-4)
BUNDLED_PROMPTS = [
    "a red circle moving right",
    "a white square moving up and a cyan triangle moving left",
    "a green triangle moving down",
    "a blue circle moving left and a yellow square moving right",
]


class SolveCounter:
    """Serial network calls and tokens evaluated (`evaluate_block` calls with inputs)."""

    def __init__(self):
        self.calls = self.tokens = 0
        self._evaluate = StarFlowVTransformer.evaluate_block

    def __enter__(self):
        evaluate = self._evaluate

        def counted(model, block_index, inputs, *args, **kwargs):
            if inputs is not None:
                self.calls += 1
                self.tokens += inputs.shape[0] * (inputs.shape[1] + bool(kwargs.get("prepend_sos")))
            return evaluate(model, block_index, inputs, *args, **kwargs)

        StarFlowVTransformer.evaluate_block = counted
        return self

    def __exit__(self, *exc):
        StarFlowVTransformer.evaluate_block = self._evaluate


def _label(name: str, settings: dict) -> str:
    shown = {k: v for k, v in settings.items() if k not in ("mode", "convergence")}
    return name + (" " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) if shown else "")


def measure(cases: dict, reference: torch.Tensor, repeats: int) -> list:
    """cases: {label: (run, counted)} where run() returns the output latents. One row per case."""
    rows = []
    for label, (run, counted) in cases.items():
        if counted:
            with SolveCounter() as counter:
                out = run()
            calls, tokens = counter.calls, counter.tokens
        else:
            out, calls, tokens = run(), None, None
        error = (out.float() - reference).abs()
        rows.append(dict(solver=label, serial_calls=calls, tokens=tokens, max_error=error.max().item(),
                         rms_error=error.square().mean().sqrt().item()))
    times = {label: [] for label in cases}
    for _ in range(repeats):
        for label, (run, _) in cases.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    for row in rows:
        row["time_s"] = median(times[row["solver"]])
    for row in rows:
        row["pareto"] = not any(
            other["time_s"] < row["time_s"] and other["max_error"] <= row["max_error"]
            and other["rms_error"] <= row["rms_error"] for other in rows
        )
    return rows


def _pipeline(transformer, **settings) -> StarFlowVPipeline:
    pipe = StarFlowVPipeline(transformer=transformer, scheduler=JacobiFlowScheduler(**settings))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_small_cases(transformer, frames: int, original, inputs: Path):
    noise, text = load_inputs(inputs, transformer, frames)

    def ours(pipe):
        return lambda: pipe(prompt_embeds=text[:1], negative_prompt_embeds=text[1:], latents=noise,
                            guidance_scale=GUIDANCE_SCALE, denoise="none", output_type="latent").frames

    reference = ours(_pipeline(transformer, mode="sequential"))()
    cases = {_label(name, s): (ours(_pipeline(transformer, **s)), True) for name, s in SOLVERS}
    if original is not None:
        x = noise.permute(0, 2, 1, 3, 4).contiguous()  # the original's (B, T, C, H, W)
        for threshold in ORIGINAL_THRESHOLDS:
            kwargs = dict(guidance=GUIDANCE_SCALE - 1.0, guide_top=None, verbose=False, return_sequence=0,
                          context_length=16, jacobi=True, jacobi_block_size=32, jacobi_th=threshold, jacobi_max_iter=32)

            def run(kw=kwargs):
                with torch.no_grad():
                    return original(x, text, reverse=True, **kw).permute(0, 2, 1, 3, 4)

            cases[f"original threshold={threshold:g}"] = (run, False)
    return cases, reference


def bundled_cases():
    base = StarFlowVPipeline.from_pretrained(BUNDLED_MODEL)
    base.set_progress_bar_config(disable=True)

    def ours(settings):
        pipe = StarFlowVPipeline(**{**base.components, "scheduler": JacobiFlowScheduler.from_config(base.scheduler.config, **settings)})
        pipe.set_progress_bar_config(disable=True)
        generators = lambda: [torch.Generator().manual_seed(i) for i in range(len(BUNDLED_PROMPTS))]  # noqa: E731
        return lambda: pipe(BUNDLED_PROMPTS, generator=generators(), guidance_scale=3.0, denoise="none",
                            output_type="latent").frames

    reference = ours(dict(mode="sequential"))()
    solvers = [("bundled default", {})] + SOLVERS
    return {_label(name, s): (ours(s), True) for name, s in solvers}, reference


def print_table(title: str, rows: list) -> None:
    print(f"\n{title}")
    print(f"{'solver':<70} {'time (s)':>8} {'calls':>6} {'tokens':>7} {'max err':>8} {'RMS err':>8} pareto")
    for row in sorted(rows, key=lambda r: r["time_s"]):
        calls = "-" if row["serial_calls"] is None else row["serial_calls"]
        tokens = "-" if row["tokens"] is None else row["tokens"]
        print(f"{row['solver']:<70} {row['time_s']:>8.3f} {calls:>6} {tokens:>7} {row['max_error']:>8.3f} "
              f"{row['rms_error']:>8.4f} {'*' if row['pareto'] else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original-src", default=None, help="extracted apple/ml-starflow repository (optional)")
    parser.add_argument("--model", default=str(PARITY_DIR / "bench_small.pth"))
    parser.add_argument("--inputs", default=str(PARITY_DIR / "bench_small.inputs.safetensors"))
    parser.add_argument("--frames", type=positive_int, nargs="*", default=[5, 10, 20], help="bench_small lengths (none: skip it)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--no-bundled", action="store_true", help="skip the bundled model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    original = None
    if args.original_src:
        from compare_original import build_original

        original = build_original(Path(args.original_src), args.model, str(Path(args.model).with_suffix(".yaml")))
    transformer = load_transformer(args.model, None, torch.float32)
    result = {"benchmark": "sampling_fidelity", "threads": args.threads, "repeats": args.repeats,
              "probe_before": machine_probe(), "models": {}}
    with torch.no_grad():
        for frames in args.frames:
            cases, reference = bench_small_cases(transformer, frames, original, Path(args.inputs))
            rows = measure(cases, reference, args.repeats)
            result["models"][f"bench_small/{frames}"] = rows
            print_table(f"bench_small, {frames} latent frames (reference: sequential)", rows)
        if not args.no_bundled:
            cases, reference = bundled_cases()
            rows = measure(cases, reference, args.repeats)
            result["models"]["bundled"] = rows
            print_table("bundled shapes model, 4 prompts, 17 frames (reference: sequential)", rows)
    result["probe_after"] = machine_probe()
    print(f"\nmachine probe: before {result['probe_before']}, after {result['probe_after']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
