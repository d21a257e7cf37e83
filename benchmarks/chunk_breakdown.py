# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Where the time of one Jacobi chunk evaluation goes: each part of a layer inside the evaluation, and alone.

bench_small with guidance: by default the deep block (batch 2: conditional and unconditional) evaluating
a chunk of `--chunk` tokens after the 16 text tokens and `--prefix` solved tokens, as in the first frame of
a solve; `--block shallow` times the first shallow block on the 5 frames of a 5-frame solve (batch 5,
prefix inside the frame). Forward hooks time every layer's parts where they run:

* layer norms; the q/k/v and output projections; the feed-forward matrix products;
* the attention core: rotary embedding, KV-cache write and attention (the attention module minus its two
  projections);
* GELU (the feed-forward's first module minus its matrix product);
* the rest of the layer: residual additions and module calls.

Then every part runs alone on the inputs it had, many times in a row, so that its weights and inputs
stay in cache. Rounds alternate the two. The hooks cost a few microseconds each; the evaluation is also
timed without them. Prints a table (microseconds per layer, medians over rounds) and one JSON line.

    python benchmarks/chunk_breakdown.py [--block shallow] [--chunk 128 --prefix 64]
"""

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_speed import PARITY_DIR, load_inputs, load_transformer, non_negative_int, positive_int  # noqa: E402

from starflow_diffusers.models.transformer_starflow_v import rotary_phases  # noqa: E402


FRAMES = 5
PARTS = ("layer norms", "q/k/v projection", "attention core", "output projection", "feed-forward matmuls",
         "GELU", "rest of the layer")


def build_chunk(transformer, block_name: str, chunk: int, prefix: int):
    """The block, its cache filled up to the chunk, the rotary table and the chunk's inputs."""
    config = transformer.config
    side = config.sample_size // config.patch_size
    per_frame = side * side
    tokens = config.in_channels * config.patch_size**2
    generator = torch.Generator().manual_seed(0)
    if block_name == "deep":
        block = transformer.deep_block
        _, text = load_inputs(PARITY_DIR / "bench_small.inputs.safetensors", transformer, FRAMES)
        rotary = rotary_phases(transformer.rotary_embedding(FRAMES, side, side, text.shape[1]))
        batch, capacity = 2, text.shape[1] + FRAMES * per_frame
        cache = block.init_cache(batch, capacity)
        block.prefill_text(text, cache, rotary)
    else:
        block = transformer.shallow_blocks[0]
        rotary = rotary_phases(transformer.rotary_embedding(1, side, side, 0))
        batch, capacity = FRAMES, per_frame
        cache = block.init_cache(batch, capacity)
    if cache.length + prefix + chunk > capacity:
        raise SystemExit(
            f"--prefix {prefix} + --chunk {chunk} exceeds the {block_name} block's {capacity - cache.length} "
            "token positions"
        )
    if prefix:
        block.evaluate_chunk(torch.randn(batch, prefix, tokens, generator=generator), cache, rotary)
    return block, cache, rotary, torch.randn(batch, chunk, tokens, generator=generator)


class PartTimer:
    """Forward hooks on every layer and its parts: seconds per part, and each part's last inputs."""

    def __init__(self, layers):
        self.seconds = defaultdict(float)
        self.inputs = {}
        self._started = {}
        self._handles = []
        for index, layer in enumerate(layers):
            ff_in = layer.ff.net[0]
            modules = {"layer": layer, "norm1": layer.norm1, "norm2": layer.norm2, "attn": layer.attn,
                       "qkv": layer.attn.to_qkv, "out": layer.attn.to_out[0], "ff_in": ff_in,
                       "ff_in_matmul": ff_in.proj, "ff_out": layer.ff.net[2]}
            for name, module in modules.items():
                self._handles.append(module.register_forward_pre_hook(self._pre((index, name))))
                self._handles.append(module.register_forward_hook(self._post((index, name))))

    def _pre(self, key):
        def hook(module, args):
            self.inputs[key] = args
            self._started[key] = time.perf_counter()
        return hook

    def _post(self, key):
        def hook(module, args, output):
            self.seconds[key] += time.perf_counter() - self._started[key]
        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()


def split_parts(seconds, index) -> dict:
    """Seconds per `PARTS` entry of layer `index` from the hooked modules' times."""
    s = {name: seconds[(index, name)] for name in
         ("layer", "norm1", "norm2", "attn", "qkv", "out", "ff_in", "ff_in_matmul", "ff_out")}
    parts = {
        "layer norms": s["norm1"] + s["norm2"],
        "q/k/v projection": s["qkv"],
        "attention core": s["attn"] - s["qkv"] - s["out"],
        "output projection": s["out"],
        "feed-forward matmuls": s["ff_in_matmul"] + s["ff_out"],
        "GELU": s["ff_in"] - s["ff_in_matmul"],
    }
    # the layer's own time includes its norms, attention and feed-forward
    parts["rest of the layer"] = s["layer"] - s["norm1"] - s["norm2"] - s["attn"] - s["ff_in"] - s["ff_out"]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(PARITY_DIR / "bench_small.pth"))
    parser.add_argument("--config", default=None, help="original YAML (default: next to --model)")
    parser.add_argument("--block", choices=("deep", "shallow"), default="deep")
    parser.add_argument("--chunk", type=positive_int, default=32, help="tokens evaluated together")
    parser.add_argument("--prefix", type=non_negative_int, default=32, help="solved tokens before the chunk")
    parser.add_argument("--calls", type=positive_int, default=40, help="calls per timed round")
    parser.add_argument("--rounds", type=positive_int, default=9)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    transformer = load_transformer(args.model, args.config, torch.float32)
    transformer.fuse_qkv_projections()
    with torch.no_grad():
        block, cache, rotary, inputs = build_chunk(transformer, args.block, args.chunk, args.prefix)
        start_length = cache.length
        layers = list(block.layers)

        def evaluate():
            block.evaluate_chunk(inputs, cache, rotary)
            cache.truncate(start_length)

        def per_call(fn) -> float:
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            return (time.perf_counter() - start) / args.calls

        timer = PartTimer(layers)
        evaluate()  # warm-up; records every part's inputs
        captured = dict(timer.inputs)
        timer.remove()

        def alone_parts(index) -> dict:
            """Each part of layer `index` called alone, back to back, on its recorded inputs."""
            layer, inputs_of = layers[index], lambda name: captured[(index, name)]
            gelu_input = layer.ff.net[0].proj(*inputs_of("ff_in_matmul"))

            def attention():  # writes the chunk's positions of the cache again, as the evaluation does
                layer.attn(*inputs_of("attn"))

            times = {name: per_call(fn) for name, fn in {
                "norms": lambda: (layer.norm1(*inputs_of("norm1")), layer.norm2(*inputs_of("norm2"))),
                "qkv": lambda: layer.attn.to_qkv(*inputs_of("qkv")),
                "attn": attention,
                "out": lambda: layer.attn.to_out[0](*inputs_of("out")),
                "ff": lambda: (layer.ff.net[0].proj(*inputs_of("ff_in_matmul")), layer.ff.net[2](*inputs_of("ff_out"))),
                "gelu": lambda: F.gelu(gelu_input),
            }.items()}
            return {"layer norms": times["norms"], "q/k/v projection": times["qkv"],
                    "attention core": times["attn"] - times["qkv"] - times["out"],
                    "output projection": times["out"], "feed-forward matmuls": times["ff"], "GELU": times["gelu"]}

        plain, hooked, in_solve, alone = [], [], defaultdict(list), defaultdict(list)
        for _ in range(args.rounds):
            plain.append(per_call(evaluate))
            timer = PartTimer(layers)
            hooked.append(per_call(evaluate))
            timer.remove()
            # one split and one set of alone timings per layer, averaged over the layers
            in_layers = [split_parts(timer.seconds, i) for i in range(len(layers))]
            alone_layers = [alone_parts(i) for i in range(len(layers))]
            for part in PARTS:
                in_solve[part].append(sum(parts[part] for parts in in_layers) / (args.calls * len(layers)))
                if part in alone_layers[0]:
                    alone[part].append(sum(parts[part] for parts in alone_layers) / len(layers))

    us = lambda values: round(statistics.median(values) * 1e6, 1)  # noqa: E731
    result = {
        "benchmark": "chunk_breakdown", "block": args.block, "batch": inputs.shape[0], "chunk": args.chunk,
        "prefix": args.prefix, "cached_positions": start_length, "layers": len(layers), "threads": args.threads,
        "evaluation_ms": round(statistics.median(plain) * 1e3, 3),
        "evaluation_with_hooks_ms": round(statistics.median(hooked) * 1e3, 3),
        "per_layer_us": {part: {"in_evaluation": us(in_solve[part]), "alone": us(alone[part]) if part in alone else None}
                         for part in PARTS},
    }
    print(f"{args.block} block, batch {result['batch']}, chunk of {args.chunk} after {start_length} cached positions, "
          f"{len(layers)} layers, {args.threads} threads")
    print(f"{'part (per layer)':>22} {'in evaluation (us)':>19} {'alone (us)':>11} {'ratio':>6}")
    for part, row in result["per_layer_us"].items():
        alone_text = f"{row['alone']:>11.1f}" if row["alone"] is not None else f"{'-':>11}"
        ratio = f"{row['in_evaluation'] / row['alone']:>5.1f}x" if row["alone"] else f"{'-':>6}"
        print(f"{part:>22} {row['in_evaluation']:>19.1f} {alone_text} {ratio}")
    print(f"evaluation: {result['evaluation_ms']:.3f} ms ({result['evaluation_with_hooks_ms']:.3f} ms with the hooks)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
