# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Memory of STARFlow-V with diffusers' memory tools: measured for bench_small on CPU, estimated for the 7B.

    python benchmarks/memory.py                # both parts
    python benchmarks/memory.py --part cpu     # bench_small, one subprocess per setting
    python benchmarks/memory.py --part 7b      # the 7B built on the meta device: bytes and estimates

* bench_small on CPU (`../shared/parity/bench_small.pth`, converted): one guided text-to-video sample of
  `--frames` latent frames (8x8 tokens, text embeddings given, learned denoiser), each setting in a fresh
  process. Reported: the bytes the transformer's parameters occupy in memory as stored (fp8, int8, or none
  for weights kept on disk or `meta`), the deep block's KV cache, and the largest growth of the process's
  resident set during the call (Linux VmHWM). On a CPU, offloading moves nothing between devices: what it
  can show is where the weights live between calls.
* The 7B (its config is the default `StarFlowVTransformer()`, built on the meta device, no memory used):
  parameter bytes per dtype, the KV-cache bytes of a 480p solve (30 x 53 latent tokens per frame, 21 latent
  frames, 256 text tokens, guidance batch 2) and an estimate of peak GPU memory under each setting, from
  those bytes plus the largest working buffers of one step. ESTIMATES until measured on a GPU
  (benchmarks/gpu_check.py, issue 22).
Prints tables and one JSON line.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_speed import (  # noqa: E402
    GUIDANCE_SCALE,
    PARITY_DIR,
    CountingBlocks,
    load_inputs,
    load_transformer,
    make_pipeline,
    peak_rss_increase,
    positive_int,
)

from starflow_diffusers import StarFlowVTransformer  # noqa: E402


GB = 1e9
# each setting and the dtype its model is loaded in
CPU_SETTINGS = {
    "fp32 (none)": torch.float32,
    "bf16": torch.bfloat16,
    "fp8 e4m3 storage, bf16 compute": torch.bfloat16,
    "torchao int8 weight-only": torch.bfloat16,
    "group offload, leaf level, to disk": torch.float32,
    "sequential offload (weights on meta)": torch.float32,
    "guidance off": torch.float32,
}


def stored_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters as they sit in memory now (0 for `meta`; torchao tensors by their int8 data)."""
    total = 0
    for param in model.parameters():
        if param.device.type == "meta":
            continue
        inner = getattr(param, "qdata", None)  # torchao's quantized tensors
        if inner is not None:
            total += inner.numel() * inner.element_size() + sum(
                t.numel() * t.element_size() for t in (getattr(param, "scale", None),) if t is not None
            )
        else:
            total += param.numel() * param.element_size()
    return total


def run_cpu_setting(name: str, frames: int) -> dict:
    """One setting in this process (called in a subprocess by `cpu_part`)."""
    dtype = CPU_SETTINGS[name]
    transformer = load_transformer(str(PARITY_DIR / "bench_small.pth"), None, dtype)
    with tempfile.TemporaryDirectory() as folder:
        if name.startswith("fp8"):
            transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        elif name.startswith("torchao"):
            from diffusers import TorchAoConfig
            from torchao.quantization import Int8WeightOnlyConfig

            transformer.save_pretrained(folder)
            del transformer
            transformer = StarFlowVTransformer.from_pretrained(
                folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=dtype
            ).eval()
        elif name.startswith("group offload"):
            transformer.enable_group_offload(
                onload_device=torch.device("cpu"), offload_type="leaf_level", offload_to_disk_path=folder
            )
        elif name.startswith("sequential"):
            from accelerate import cpu_offload

            cpu_offload(transformer, execution_device="cpu")
        noise, text = load_inputs(PARITY_DIR / "bench_small.inputs.safetensors", transformer, frames)
        guidance = 1.0 if name == "guidance off" else GUIDANCE_SCALE
        pipe = make_pipeline(transformer, "jacobi")
        counter = CountingBlocks()

        def call():
            with counter.active():
                return pipe(
                    prompt_embeds=text[:1].to(dtype), negative_prompt_embeds=text[1:].to(dtype),
                    latents=noise, guidance_scale=guidance, output_type="latent",
                ).frames

        out, peak = peak_rss_increase(call)
        cache = max((c.nbytes for block, c in counter.caches if block is transformer.deep_block), default=0)
        return {
            "setting": name,
            "parameter_bytes_in_memory": stored_parameter_bytes(transformer),
            "deep_kv_cache_bytes": cache,
            "peak_rss_increase_bytes": peak,
            "finite": bool(torch.isfinite(out).all()),
        }


def cpu_part(frames: int) -> list:
    rows = []
    for name in CPU_SETTINGS:
        result = subprocess.run(
            [sys.executable, __file__, "--cpu-setting", name, "--frames", str(frames)],
            capture_output=True, text=True, check=False,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            rows.append({"setting": name, "error": result.stderr.strip().splitlines()[-1:] or ["failed"]})
        else:
            rows.append(json.loads(lines[-1]))
    print(f"\nbench_small on CPU, {frames} latent frames of 8x8, guidance {GUIDANCE_SCALE}, learned denoiser")
    print(f"{'setting':40} {'params in memory':>17} {'deep KV cache':>14} {'peak RSS growth':>16}")
    for row in rows:
        if "error" in row:
            print(f"{row['setting']:40} error: {row['error'][0]}")
            continue
        peak = row["peak_rss_increase_bytes"]
        peak = "n/a" if peak is None else f"{peak / 2**20:.1f} MiB"
        print(
            f"{row['setting']:40} {row['parameter_bytes_in_memory'] / 2**20:>13.2f} MiB "
            f"{row['deep_kv_cache_bytes'] / 2**20:>10.2f} MiB {peak:>16}"
        )
    return rows


# ---- the 7B ------------------------------------------------------------------------------------------------

# 480p in the released model's latent space (Wan2.2 VAE: 16x spatial, 4x temporal): 480 x 848 pixels,
# 81 frames.
LATENT_ROWS, LATENT_COLS, LATENT_FRAMES, TEXT_TOKENS = 30, 53, 21, 256
# Components around the transformer, parameters in bf16 (their public model cards): the T5-XL encoder
# (1.2e9 parameters) and the Wan2.2 VAE (about 0.7e9).
TEXT_ENCODER_PARAMS, VAE_PARAMS = 1.2e9, 0.7e9


def seven_b_part() -> dict:
    with torch.device("meta"):
        model = StarFlowVTransformer()
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    deep = sum(p.numel() for p in model.deep_block.parameters())
    largest_layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.deep_block.layers)
    per_frame = LATENT_ROWS * LATENT_COLS
    deep_heads = config.deep_width // config.attention_head_dim
    shallow_heads = config.shallow_width // config.attention_head_dim

    def kv_bytes(layers, batch, heads, positions, element):
        return 2 * layers * batch * heads * positions * config.attention_head_dim * element

    positions = TEXT_TOKENS + LATENT_FRAMES * per_frame
    deep_layers = config.num_layers_per_block[-1]
    kv = {dtype: kv_bytes(deep_layers, 2, deep_heads, positions, size) for dtype, size in (("fp32", 4), ("bf16", 2))}
    kv_unguided = kv_bytes(deep_layers, 1, deep_heads, positions, 2)
    # the shallow blocks are solved per frame, one block at a time, without guidance: 21 sequences of one frame
    shallow_kv = kv_bytes(config.num_layers_per_block[0], LATENT_FRAMES, shallow_heads, per_frame, 2)
    # working buffers of one step (bf16): a 128-token Jacobi chunk's MLP (4x width) and logits, the learned
    # denoiser's MLP over one window of 11 frames, and a fused attention kernel's output; an unfused (math)
    # attention would add its score matrix, see the note
    chunk = 2 * 128 * config.deep_width * (2 + 4) * 2
    denoiser = (config.denoiser_window + 1) * per_frame * config.shallow_width * (2 + 4) * 2
    working = max(chunk, denoiser) + 0.5 * GB  # + CUDA context / allocator slack
    bf16_params = total * 2
    fp8_params = linear * 1 + (total - linear) * 2
    others = (TEXT_ENCODER_PARAMS + VAE_PARAMS) * 2
    settings = {
        "none (all on the GPU, bf16)": bf16_params + others + kv["bf16"] + shallow_kv + working,
        "enable_model_cpu_offload": bf16_params + kv["bf16"] + shallow_kv + working,
        "group offload, block level": largest_block_bytes(model) + kv["bf16"] + shallow_kv + working,
        "group offload, leaf level": largest_layer * 2 + kv["bf16"] + shallow_kv + working,
        "fp8 storage + model offload": fp8_params + kv["bf16"] + shallow_kv + working,
        "int8 weight-only + model offload": fp8_params + kv["bf16"] + shallow_kv + working,
        "guidance off + model offload": bf16_params + kv_unguided + shallow_kv + working,
        "guidance off + leaf-level group offload": largest_layer * 2 + kv_unguided + shallow_kv + working,
        "guidance off + fp8 storage + model offload": fp8_params + kv_unguided + shallow_kv + working,
    }
    print("\n7B STARFlow-V (built on meta; bytes exact, peak memory ESTIMATED until measured on a GPU)")
    print(f"parameters {total / 1e9:.2f}e9 (nn.Linear weights {linear / 1e9:.2f}e9, deep block {deep / 1e9:.2f}e9)")
    print(f"parameter bytes: fp32 {total * 4 / GB:.1f} GB, bf16 {bf16_params / GB:.1f} GB, "
          f"fp8/int8 Linear weights {fp8_params / GB:.1f} GB")
    print(f"deep KV cache at 480p, {LATENT_FRAMES} latent frames, {positions} positions, guidance batch 2: "
          f"fp32 {kv['fp32'] / GB:.1f} GB, bf16 {kv['bf16'] / GB:.1f} GB (guidance off: {kv_unguided / GB:.1f} GB); "
          f"shallow block cache {shallow_kv / GB:.2f} GB")
    print(f"{'setting':45} {'estimated peak GPU memory':>26}")
    for name, value in settings.items():
        print(f"{name:45} {value / GB:>22.1f} GB")
    unfused = 2 * deep_heads * 128 * positions * 2
    print(f"(an attention backend without a fused kernel adds a {unfused / GB:.1f} GB score matrix per chunk)")
    return {
        "parameters": total,
        "linear_weight_parameters": linear,
        "parameter_bytes": {"fp32": total * 4, "bf16": bf16_params, "fp8_linear": fp8_params},
        "deep_kv_cache_bytes": kv,
        "deep_kv_cache_bytes_unguided_bf16": kv_unguided,
        "shallow_kv_cache_bytes_bf16": shallow_kv,
        "estimated_peak_gpu_bytes": settings,
        "estimate": True,
    }


def largest_block_bytes(model: StarFlowVTransformer) -> float:
    """bf16 bytes of block-level group offloading's largest resident set: the largest flow block (a group)
    plus the top-level group holding the denoiser."""
    largest = max(sum(p.numel() for p in block.parameters()) for block in model.blocks)
    return (largest + sum(p.numel() for p in model.denoiser.parameters())) * 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "cpu", "7b"), default="all")
    parser.add_argument("--frames", type=positive_int, default=10)
    parser.add_argument("--cpu-setting", choices=list(CPU_SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.cpu_setting:
        print(json.dumps(run_cpu_setting(args.cpu_setting, args.frames)))
        return
    report = {"benchmark": "memory"}
    if args.part in ("all", "cpu"):
        report["bench_small_cpu"] = cpu_part(args.frames)
    if args.part in ("all", "7b"):
        report["starflow_v_7b"] = seven_b_part()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
