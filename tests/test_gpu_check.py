"""benchmarks/gpu_check.py keeps working: its --dry-run runs every part at tiny size on the CPU."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--dry-run"])


def test_every_part_runs(report):
    for part in ("numerics", "deep_block", "speed", "memory_tools"):
        assert "error" not in report[part], report[part]
    assert all("error" not in row for row in report["memory_tools"].values()), report["memory_tools"]


def test_the_dry_run_reports_the_quantities_the_gpu_run_needs(report):
    # fp32 on the CPU against fp32 on the CPU: the comparison code itself must find no difference
    assert report["numerics"]["ok"] and report["numerics"]["bits_per_dim_abs"] == 0.0
    deep = report["deep_block"]
    # 2 layers x (keys, values) x batch 2 x 2 heads x (8 text + 3 x 16 tokens) x 32 channels x 4 bytes
    assert deep["kv_cache_bytes"] == 2 * 2 * 2 * 2 * (8 + 3 * 16) * 32 * 4
    assert deep["jacobi_iteration_ms"] > 0 and deep["sequential_step_ms"] > 0
    speed = report["speed"]
    assert speed["jacobi_speedup"] > 1 and speed["host_syncs_per_iteration"] == 1.0
    assert any("attention" in name for name in speed["attention_kernels"])
    assert report["memory_tools"]["model_offload"]["max_abs"] == 0.0
