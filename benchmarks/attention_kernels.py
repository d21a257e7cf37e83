# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Attention of one Jacobi chunk after its cached prefix: SDPA against `chunk_attention`, on this machine.

The shapes are bench_small's deep block with guidance (batch 2, 3 heads of 64): a chunk of L queries (32 in
the first frame, 128 after it) over S keys (16 text tokens, the solved frames and the chunk), with the
additive prefix-causal mask. Three variants, timed in turn (a, b, c, a, b, c, ...) and reported as medians:

* `sdpa`: `F.scaled_dot_product_attention` with the mask (PyTorch's CPU flash kernel);
* `chunk`: `chunk_attention` with a score buffer kept between calls, as the pipelines run it;
* `chunk_fresh`: the same three steps with fresh score and probability tensors in every call, to show
  what the buffer saves.

It also prints which variant the pipelines pick for each shape (`use_chunk_attention`). Prints a table and
one JSON line.

    python benchmarks/attention_kernels.py
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_speed import positive_int  # noqa: E402

from starflow_diffusers.models.transformer_starflow_v import (  # noqa: E402
    additive_mask,
    chunk_attention,
    prefix_causal_mask,
    use_chunk_attention,
)


def fresh_chunk_attention(query, key, value, mask):
    """`chunk_attention` without its buffer: every call allocates the scores and the probabilities."""
    batch, heads, length, dim = query.shape
    scores = torch.baddbmm(
        mask, query.reshape(batch * heads, length, dim), key.reshape(batch * heads, -1, dim).transpose(1, 2),
        alpha=1.0 / math.sqrt(dim),
    )
    return torch.bmm(scores.softmax(-1), value.reshape(batch * heads, -1, dim)).view(batch, heads, length, dim)


def queries_by_keys(text: str):
    """`--shapes` entry "LxS" -> (L, S), with 1 <= L <= S."""
    try:
        length, size = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes entries look like 128x784 (queries x keys), got {text!r}")
    if not 1 <= length <= size:
        raise argparse.ArgumentTypeError(f"--shapes needs 1 <= queries <= keys, got {text!r}")
    return length, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=queries_by_keys,
                        default=[(32, 112), (128, 208), (128, 784), (128, 1296)],
                        help="LxS: queries x keys")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--heads", type=positive_int, default=3)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--calls", type=positive_int, default=50, help="calls per timed round")
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    rows = []
    with torch.no_grad():
        for length, size in args.shapes:
            query = torch.randn(args.batch, args.heads, length, args.head_dim, generator=generator)
            key = torch.randn(args.batch, args.heads, size, args.head_dim, generator=generator)
            value = torch.randn(args.batch, args.heads, size, args.head_dim, generator=generator)
            mask = additive_mask(prefix_causal_mask(size - length, length), torch.float32)
            workspace = torch.empty(args.batch * args.heads * length * size)
            variants = {
                "sdpa": lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask),
                "chunk": lambda: chunk_attention(query, key, value, mask, workspace),
                "chunk_fresh": lambda: fresh_chunk_attention(query, key, value, mask),
            }
            reference = variants["sdpa"]()
            times = {name: [] for name in variants}
            for fn in variants.values():
                fn()  # warm-up
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    times[name].append((time.perf_counter() - start) / args.calls * 1e3)
            row = {"queries": length, "keys": size, "pipelines_use": "chunk" if use_chunk_attention(query, key, mask, False) else "sdpa"}
            for name, fn in variants.items():
                row[f"{name}_ms"] = round(statistics.median(times[name]), 4)
                row[f"{name}_max_abs_difference"] = (fn() - reference).abs().max().item()
            row["sdpa_over_chunk"] = round(row["sdpa_ms"] / row["chunk_ms"], 3)
            rows.append(row)

    print(f"{'L x S':>10} {'sdpa (ms)':>10} {'chunk (ms)':>11} {'fresh (ms)':>11} {'sdpa/chunk':>11} {'pipelines use':>14}")
    for row in rows:
        print(f"{row['queries']:>4} x {row['keys']:<4} {row['sdpa_ms']:>10.3f} {row['chunk_ms']:>11.3f} "
              f"{row['chunk_fresh_ms']:>11.3f} {row['sdpa_over_chunk']:>10.2f}x {row['pipelines_use']:>14}")
    print(json.dumps({"benchmark": "attention_kernels", "batch": args.batch, "heads": args.heads,
                      "head_dim": args.head_dim, "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
