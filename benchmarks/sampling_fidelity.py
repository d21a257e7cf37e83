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
With `--oracle`, untimed rows of `OraclePipeline` (a lower bound on the tokens of sliding-window solvers, see
its docstring) are added, and for each model a summary gives the fewest tokens with which `adaptive` and the
oracle reach the original's fidelity (max and RMS error at most those of Jacobi at 1e-3 with the batch rule).
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
from typing import Optional

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_speed import GUIDANCE_SCALE, PARITY_DIR, load_inputs, load_transformer, machine_probe, positive_int  # noqa: E402

from starflow_diffusers import BUNDLED_MODEL, JacobiFlowScheduler, StarFlowVPipeline, StarFlowVTransformer  # noqa: E402


# the oracle's exact solves must not be counted: it calls the method as defined, not as `SolveCounter` patches it
EVALUATE_BLOCK = StarFlowVTransformer.evaluate_block
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
ORACLE_TOLERANCES = (1e-3, 5e-4, 3e-4, 2e-4, 1e-4)
# the row whose fidelity the summary matches: the original's algorithm and rule at its default threshold
ORIGINAL_FIDELITY_ROW = "jacobi threshold=0.001"
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


def committed_prefix(error: torch.Tensor, tolerance: float) -> int:
    """How many tokens of a window the oracle commits: the longest prefix within `tolerance`, at least one
    (the window's first token has committed inputs only)."""
    return max(int((error <= tolerance).long().cumprod(0).sum()), 1)


class OraclePipeline(StarFlowVPipeline):
    """`mode="adaptive"`'s plan and sliding windows with a commit rule that knows the answer.

    Before each chunk, the exact inverse of the chunk given the tokens committed so far is computed token by
    token (not counted). Each evaluation then commits the longest prefix of the window whose new values are
    within `oracle_tolerance` of it (squared error relative to the chunk's mean square; at least one token,
    the first, which is exact). A solver that commits prefixes of a sliding window and wants every token
    within that tolerance of this target cannot commit earlier, so its tokens and calls bound those of any
    such rule that reads only the iterates (`adaptive`'s included), at that tolerance, window and start.
    Sweeping the tolerance gives the bound's fidelity curve.
    """

    oracle_tolerance: float = 1e-3

    def _solve_chunk_adaptive(self, block_index, chunk, state, noise, cache, rotary, guidance, threshold):
        scheduler, dtype = self.scheduler, self.compute_dtype

        def evaluate(tokens, prepend_sos, counted):
            evaluate_block = type(self.transformer).evaluate_block if counted else EVALUATE_BLOCK
            params = evaluate_block(self.transformer, block_index, guidance.batch(tokens).to(dtype), cache, rotary,
                                    prepend_sos=prepend_sos)
            return guidance.combine(params)

        scheduler.warm_start(state, chunk)  # the same start as `adaptive`
        base = cache.length
        exact = state.clone()
        for token in range(chunk.start, chunk.end):
            shift, scale = evaluate(*scheduler.shifted_inputs(exact, token, token + 1), counted=False)
            exact[:, token : token + 1] = shift + scale * noise[:, token : token + 1]
        mean_square = exact[:, chunk.start : chunk.end].square().mean()
        frontier = chunk.start
        while frontier < chunk.end:
            end = scheduler.window_end(chunk, frontier)
            cache.truncate(base + frontier - chunk.start)
            shift, scale = evaluate(*scheduler.shifted_inputs(state, frontier, end), counted=True)
            state[:, frontier:end] = shift + scale * noise[:, frontier:end]
            error = (state[:, frontier:end] - exact[:, frontier:end]).square().mean((0, 2)) / mean_square
            frontier += committed_prefix(error, self.oracle_tolerance)


def _label(name: str, settings: dict) -> str:
    shown = {k: v for k, v in settings.items() if k not in ("mode", "convergence")}
    return name + (" " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) if shown else "")


def measure(cases: dict, reference: torch.Tensor, repeats: int, untimed: Optional[dict] = None) -> list:
    """cases: {label: (run, counted)} where run() returns the output latents; `untimed` cases (the oracle)
    are counted but not timed. One row per case."""
    rows = []
    for label, (run, counted) in {**cases, **(untimed or {})}.items():
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
        row["time_s"] = median(times[row["solver"]]) if row["solver"] in times else None
    timed = [row for row in rows if row["time_s"] is not None]
    for row in rows:
        row["pareto"] = row["time_s"] is not None and not any(
            other["time_s"] < row["time_s"] and other["max_error"] <= row["max_error"]
            and other["rms_error"] <= row["rms_error"] for other in timed
        )
    return rows


def matched_fidelity(rows: list) -> dict:
    """Per solver family, the fewest tokens (and their calls) among its rows at most as far off as the
    original's algorithm at 1e-3 (max and RMS), as a ratio of that row's tokens; None where no row is."""
    target = next(row for row in rows if row["solver"] == ORIGINAL_FIDELITY_ROW)
    summary = {}
    for family in ("adaptive", "oracle"):
        matching = [
            row for row in rows if row["solver"].startswith(family) and row["tokens"] is not None
            and row["max_error"] <= target["max_error"] and row["rms_error"] <= target["rms_error"]
        ]
        best = min(matching, key=lambda row: row["tokens"], default=None)
        summary[family] = None if best is None else dict(
            solver=best["solver"], tokens=best["tokens"], token_ratio=round(best["tokens"] / target["tokens"], 3),
            serial_calls=best["serial_calls"], original_calls=target["serial_calls"])
    return summary


def _pipeline(transformer, pipeline_class=StarFlowVPipeline, **settings) -> StarFlowVPipeline:
    pipe = pipeline_class(transformer=transformer, scheduler=JacobiFlowScheduler(**settings))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _oracle(pipeline_class, tolerance: float):
    return type("Oracle", (pipeline_class,), {"oracle_tolerance": tolerance})


def oracle_settings():
    """(label, tolerance, scheduler settings): the tolerances, with and without the warm start."""
    for tolerance in ORACLE_TOLERANCES:
        for warm_start in (True, False):
            yield f"oracle tolerance={tolerance:g} warm_start={warm_start}", tolerance, {"mode": "adaptive", "warm_start": warm_start}


def bench_small_cases(transformer, frames: int, original, inputs: Path, with_oracle: bool = False):
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
    oracles = {}
    if with_oracle:
        for label, tolerance, settings in oracle_settings():
            oracles[label] = (ours(_pipeline(transformer, _oracle(OraclePipeline, tolerance), **settings)), True)
    return cases, reference, oracles


def bundled_cases(with_oracle: bool = False):
    base = StarFlowVPipeline.from_pretrained(BUNDLED_MODEL)
    base.set_progress_bar_config(disable=True)

    def ours(settings, pipeline_class=StarFlowVPipeline):
        scheduler = JacobiFlowScheduler.from_config(base.scheduler.config, **settings)
        pipe = pipeline_class(**{**base.components, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)
        generators = lambda: [torch.Generator().manual_seed(i) for i in range(len(BUNDLED_PROMPTS))]  # noqa: E731
        return lambda: pipe(BUNDLED_PROMPTS, generator=generators(), guidance_scale=3.0, denoise="none",
                            output_type="latent").frames

    reference = ours(dict(mode="sequential"))()
    solvers = [("bundled default", {})] + SOLVERS
    oracles = {}
    if with_oracle:
        for label, tolerance, settings in oracle_settings():
            oracles[label] = (ours(settings, _oracle(OraclePipeline, tolerance)), True)
    return {_label(name, s): (ours(s), True) for name, s in solvers}, reference, oracles


def print_table(title: str, rows: list) -> None:
    print(f"\n{title}")
    print(f"{'solver':<70} {'time (s)':>8} {'calls':>6} {'tokens':>7} {'max err':>8} {'RMS err':>8} pareto")
    for row in sorted(rows, key=lambda r: (r["time_s"] is None, r["time_s"] or 0.0)):
        calls = "-" if row["serial_calls"] is None else row["serial_calls"]
        tokens = "-" if row["tokens"] is None else row["tokens"]
        time_s = "-" if row["time_s"] is None else f"{row['time_s']:.3f}"
        print(f"{row['solver']:<70} {time_s:>8} {calls:>6} {tokens:>7} {row['max_error']:>8.3f} "
              f"{row['rms_error']:>8.4f} {'*' if row['pareto'] else ''}")


def print_matched(summary: dict) -> None:
    for family, best in summary.items():
        if best is None:
            print(f"  {family}: no row reaches the original's fidelity")
        else:
            print(f"  {family}: {best['tokens']} tokens ({best['token_ratio']:.2f}x the original's), "
                  f"{best['serial_calls']} calls (original {best['original_calls']}), {best['solver']}")


def report(result: dict, key: str, title: str, rows: list) -> None:
    result["models"][key] = rows
    print_table(title, rows)
    result.setdefault("matched_fidelity", {})[key] = summary = matched_fidelity(rows)
    print("fewest tokens at the original's fidelity (max and RMS error at most jacobi 1e-3's):")
    print_matched(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original-src", default=None, help="extracted apple/ml-starflow repository (optional)")
    parser.add_argument("--model", default=str(PARITY_DIR / "bench_small.pth"))
    parser.add_argument("--inputs", default=str(PARITY_DIR / "bench_small.inputs.safetensors"))
    parser.add_argument("--frames", type=positive_int, nargs="*", default=[5, 10, 20], help="bench_small lengths (none: skip it)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--no-bundled", action="store_true", help="skip the bundled model")
    parser.add_argument("--oracle", action="store_true", help="add the oracle's lower bound (untimed, slow)")
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
            cases, reference, oracles = bench_small_cases(transformer, frames, original, Path(args.inputs), args.oracle)
            report(result, f"bench_small/{frames}", f"bench_small, {frames} latent frames (reference: sequential)",
                   measure(cases, reference, args.repeats, oracles))
        if not args.no_bundled:
            cases, reference, oracles = bundled_cases(args.oracle)
            report(result, "bundled", "bundled shapes model, 4 prompts, 17 frames (reference: sequential)",
                   measure(cases, reference, args.repeats, oracles))
    result["probe_after"] = machine_probe()
    print(f"\nmachine probe: before {result['probe_before']}, after {result['probe_after']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
