# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Peak memory of `starflow-convert` on a full-size synthetic checkpoint.

Builds an original-format checkpoint with every key and shape of a released model (from
`../shared/parity/<model>.keys.json`, bf16), converts it with the CLI in a subprocess and reports the
converter's peak resident set size against the checkpoint size. Prints a table and one JSON line.

    python benchmarks/conversion_memory.py                     # 7B video model, ~13.8 GB checkpoint
    python benchmarks/conversion_memory.py --dtype fp32 --workdir /big/disk --keep

The checkpoint tensors are `torch.empty` and never written (except a short marker at the start of
each), so their pages are the kernel's shared zero page: writing 13.8 GB needs almost no memory here.
The converter still reads every byte from the file, exactly as for a real checkpoint.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = REPO_ROOT.parent / "shared" / "parity"
MODELS = ("starflow-v_7B_t2v_caus_480p", "starflow_3B_t2i_256x256")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CHECKPOINT_DTYPE = torch.bfloat16
# Elements at the start of every tensor set to known values, checked in the converted folder.
MARKER_LENGTH = 256


def marker(index: int, length: int) -> torch.Tensor:
    return (torch.arange(length, dtype=torch.float32) / MARKER_LENGTH + index).to(CHECKPOINT_DTYPE)


def write_synthetic_checkpoint(shapes: dict, path: Path) -> int:
    """torch.save a state dict with these shapes; returns its tensor bytes."""
    state = {}
    for index, (key, shape) in enumerate(shapes.items()):
        tensor = torch.empty(shape, dtype=CHECKPOINT_DTYPE)
        length = min(tensor.numel(), MARKER_LENGTH)
        tensor.view(-1)[:length] = marker(index, length)
        state[key] = tensor
    torch.save(state, path)
    return sum(t.numel() * t.element_size() for t in state.values())


def read_status(pid: int) -> dict:
    """VmRSS / RssAnon / RssFile of a process, in bytes (empty once it has exited)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile") if k in fields}


def run_measured(command: list, env: dict) -> dict:
    """Run a command; its peak RSS (kernel high-water mark), peak anonymous / file-backed RSS (sampled
    every 50 ms), wall time and exit status."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for key, value in read_status(process.pid).items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # wait4 gives the rusage of this child alone (RUSAGE_CHILDREN would mix in every earlier child)
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": process.returncode,
        "peak_rss": usage.ru_maxrss * 1024,  # kilobytes on Linux
        "peak_rss_anon": peaks["RssAnon"],
        "peak_rss_file": peaks["RssFile"],
        "wall_s": time.perf_counter() - start,
    }


def check_output(folder: Path, shapes: dict, dtype: str) -> int:
    """Spot-check the converted folder: every key with its shape and dtype, and the markers of two tensors.
    Returns the weight bytes written."""
    from safetensors import safe_open

    sys.path.insert(0, str(REPO_ROOT))
    from starflow_diffusers.conversion.convert_starflow import convert_state_dict

    expected = convert_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    safetensors_dtype = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}[dtype]
    found, location = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensor_slice = f.get_slice(key)
                assert tensor_slice.get_dtype() == safetensors_dtype, (key, tensor_slice.get_dtype())
                found[key], location[key] = torch.Size(tensor_slice.get_shape()), path
    assert found == {k: t.shape for k, t in expected.items()}, "converted keys or shapes differ from the model's"

    keys = list(shapes)
    for original, converted in (
        ("blocks.0.proj_in.weight", "blocks.0.proj_in.weight"),
        ("blocks.5.attn_blocks.0.attention.qkv.weight", "blocks.5.layers.0.attn.to_q.weight"),
    ):
        rows = -(-MARKER_LENGTH // found[converted][1:].numel())
        with safe_open(location[converted], framework="pt") as f:
            head = f.get_slice(converted)[:rows].flatten()[:MARKER_LENGTH].float()
        assert torch.equal(head, marker(keys.index(original), MARKER_LENGTH).float()), f"{converted} differs"
    return sum(shape.numel() for shape in found.values()) * DTYPE_BYTES[dtype]


def human(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default=MODELS[0], help="released model whose keys to use")
    parser.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16", help="converter --dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="converter --max-shard-size")
    parser.add_argument("--workdir", help="where to write the checkpoint and output (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    args = parser.parse_args()

    with open(PARITY_DIR / f"{args.model}.keys.json", encoding="utf-8") as f:
        shapes = json.load(f)["keys"]
    config = PARITY_DIR / "original_configs" / f"{args.model}.yaml"
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    needed = numel * (CHECKPOINT_DTYPE.itemsize + DTYPE_BYTES[args.dtype]) * 1.05

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="starflow-conversion-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < needed:
        sys.exit(f"error: --workdir {workdir} has {human(free)} free, the benchmark needs {human(needed)}.")
    checkpoint, output = workdir / f"{args.model}.pth", workdir / "converted"
    try:
        start = time.perf_counter()
        write_synthetic_checkpoint(shapes, checkpoint)
        write_s = time.perf_counter() - start
        checkpoint_bytes = checkpoint.stat().st_size

        python_path = [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path))
        # what the interpreter, torch and diffusers take before any weight is touched
        baseline = run_measured([sys.executable, "-c", "import starflow_diffusers.conversion.__main__"], env)
        command = [
            sys.executable, "-m", "starflow_diffusers.conversion", "--checkpoint", str(checkpoint),
            "--config", str(config), "--output", str(output), "--dtype", args.dtype,
            "--max-shard-size", args.max_shard_size, "--overwrite",
        ]
        run = run_measured(command, env)
        if run["returncode"] != 0:
            sys.exit(f"error: the converter failed with exit code {run['returncode']}")
        output_bytes = check_output(output, shapes, args.dtype)
    finally:
        if not args.keep:
            shutil.rmtree(output, ignore_errors=True)
            checkpoint.unlink(missing_ok=True)
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "model": args.model,
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "num_elements": numel,
        "checkpoint_bytes": checkpoint_bytes,
        "output_bytes": output_bytes,
        "peak_rss_bytes": run["peak_rss"],
        "peak_rss_anon_bytes": run["peak_rss_anon"],
        "peak_rss_file_bytes": run["peak_rss_file"],
        "baseline_rss_bytes": baseline["peak_rss"],
        "peak_rss_over_checkpoint": round(run["peak_rss"] / checkpoint_bytes, 3),
        "convert_s": round(run["wall_s"], 1),
        "checkpoint_write_s": round(write_s, 1),
    }
    rows = [
        ("model", args.model),
        ("elements", f"{numel:.3e}"),
        ("checkpoint (bf16)", human(checkpoint_bytes)),
        (f"output ({args.dtype})", human(output_bytes)),
        ("converter peak RSS", human(run["peak_rss"])),
        ("  of which anonymous (peak)", human(run["peak_rss_anon"])),
        ("  of which mapped file (peak)", human(run["peak_rss_file"])),
        ("  import-only baseline", human(baseline["peak_rss"])),
        ("peak RSS / checkpoint size", f"{result['peak_rss_over_checkpoint']:.3f}"),
        ("conversion time", f"{run['wall_s']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
