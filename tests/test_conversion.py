# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint conversion: release configs and key mapping, the `starflow-convert` CLI, and bad input."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from starflow_diffusers import StarFlowVTransformer
from starflow_diffusers.conversion import writer
from starflow_diffusers.conversion.__main__ import main
from starflow_diffusers.conversion.convert_starflow import (
    build_empty_model,
    convert_original_checkpoint,
    convert_state_dict,
    load_original_config,
    text_width_from_state_dict,
    transformer_config_from_original,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY = REPO_ROOT.parent / "shared" / "parity"
VIDEO_PTH, VIDEO_YAML = PARITY / "video_tiny.pth", PARITY / "video_tiny.yaml"
DEPRECATED = {"var", "feat_rope.freqs_cos", "feat_rope.freqs_sin"} | {f"blocks.{i}.attn_mask" for i in range(6)}


# ---- release configs and key mapping --------------------------------------------------------------


RELEASES = {
    "starflow-v_7B_t2v_caus_480p": dict(
        is_video=True, in_channels=48, shallow_width=3072, deep_width=4096, num_layers_per_block=[2, 2, 2, 2, 2, 24],
        text_embed_dim=2048, max_text_length=256, rope_base_size=32, sample_size=40, trained_latent_frames=21,
        noise_std=0.5, output_soft_clip=4.0, shallow_blocks_per_frame=True, denoiser_num_layers=8,
        denoiser_text_conditioned=True, denoiser_window=10, denoiser_lookahead=1,
    ),
    "starflow_3B_t2i_256x256": dict(
        is_video=False, in_channels=4, shallow_width=3072, deep_width=3072, num_layers_per_block=[2, 2, 2, 2, 2, 24],
        text_embed_dim=2048, max_text_length=128, rope_base_size=32, sample_size=32, trained_latent_frames=None,
        noise_std=0.3, output_soft_clip=4.0, shallow_blocks_per_frame=False, denoiser_num_layers=0,
    ),
}


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_config_gives_checkpoint_shapes(name):
    release = json.loads((PARITY / f"{name}.keys.json").read_text())
    original = {key: torch.empty(shape, device="meta") for key, shape in release["keys"].items()}
    args = load_original_config(PARITY / "original_configs" / f"{name}.yaml")
    config = transformer_config_from_original(args)
    assert {key: config[key] for key in RELEASES[name]} == RELEASES[name]
    # the text width read from the checkpoint agrees with the one known for the YAML's text encoder
    assert text_width_from_state_dict(original, int(args["blocks"])) == config["text_embed_dim"]

    model = build_empty_model(config)
    converted = convert_state_dict(original)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dropped = {key for key, tensor in original.items() if not convert_state_dict({key: tensor})}
    assert dropped == DEPRECATED
    deprecated_numel = sum(original[key].numel() for key in DEPRECATED)
    assert sum(p.numel() for p in model.parameters()) == release["num_elements"] - deprecated_numel


# ---- the CLI on the tiny video model --------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return convert_original_checkpoint(str(VIDEO_PTH), str(VIDEO_YAML))


@pytest.fixture(scope="module")
def original_state():
    return torch.load(VIDEO_PTH, map_location="cpu", weights_only=True)


def convert(output, checkpoint=VIDEO_PTH, config=VIDEO_YAML, *extra) -> int:
    """The CLI writing a transformer folder (`--transformer-only`)."""
    args = ["--checkpoint", str(checkpoint), "--config", str(config), "--output", str(output), "--transformer-only"]
    return main([*args, *map(str, extra)])


def assert_same_weights(model, reference, dtype=torch.float32):
    actual, expected = model.state_dict(), reference.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == dtype, key
        assert torch.equal(actual[key], value.to(dtype)), key


def _public(config):
    """Config values without diffusers' bookkeeping (`_class_name`, `_name_or_path`, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def assert_no_staging_left(parent: Path):
    leftovers = [p.name for p in parent.iterdir() if ".partial-" in p.name]
    assert not leftovers, leftovers


@pytest.mark.parametrize("name, latent_shape", [("video_tiny", (2, 4, 3, 4, 4)), ("image_tiny", (2, 4, 4, 4))])
def test_cli_folder_matches_direct_conversion(tmp_path, name, latent_shape):
    checkpoint, config = PARITY / f"{name}.pth", PARITY / f"{name}.yaml"
    reference = convert_original_checkpoint(str(checkpoint), str(config))
    output = tmp_path / "transformer"
    assert convert(output, checkpoint, config) == 0
    assert sorted(os.listdir(output)) == [writer.MARKER_NAME, "config.json", "diffusion_pytorch_model.safetensors"]
    model = StarFlowVTransformer.from_pretrained(output)
    assert _public(model.config) == _public(reference.config)
    assert_same_weights(model, reference)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(*latent_shape, generator=generator)
    text = torch.randn(2, 6, 16, generator=generator)
    with torch.no_grad():
        actual, expected = model(latents, text), reference(latents, text)
    assert torch.equal(actual.sample, expected.sample)
    assert torch.equal(actual.logdet, expected.logdet)
    assert_no_staging_left(tmp_path)


def test_cli_bf16(tmp_path, reference):
    output = tmp_path / "bf16"
    assert convert(output, VIDEO_PTH, VIDEO_YAML, "--dtype", "bf16") == 0
    with safe_open(output / "diffusion_pytorch_model.safetensors", framework="pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"BF16"}
    model = StarFlowVTransformer.from_pretrained(output, torch_dtype=torch.bfloat16)
    assert_same_weights(model, reference, torch.bfloat16)


def test_cli_small_shards(tmp_path, reference):
    output = tmp_path / "sharded"
    assert convert(output, VIDEO_PTH, VIDEO_YAML, "--max-shard-size", "300KB") == 0
    index = json.loads((output / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in output.glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["weight_map"].keys() == reference.state_dict().keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in reference.state_dict().values())
    for shard in shards:
        assert (output / shard).stat().st_size <= 300_000 + 10_000  # plus the safetensors header
    assert_same_weights(StarFlowVTransformer.from_pretrained(output), reference)


def test_overwrite_replaces_an_earlier_conversion(tmp_path, reference):
    output = tmp_path / "out"
    assert convert(output, VIDEO_PTH, VIDEO_YAML, "--max-shard-size", "300KB") == 0
    assert len(list(output.glob("*.safetensors"))) > 1
    assert convert(output, VIDEO_PTH, VIDEO_YAML, "--overwrite") == 0
    # the old shards are gone, the new single file is in place
    assert sorted(p.name for p in output.glob("*.safetensors")) == ["diffusion_pytorch_model.safetensors"]
    assert (output / writer.MARKER_NAME).is_file()
    assert_same_weights(StarFlowVTransformer.from_pretrained(output), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _snapshot(root: Path) -> dict:
    """Every file under `root` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["checkpoint folder", "its parent", "dot inside the checkpoint folder"])
@pytest.mark.parametrize("transformer_only", [False, True])
def test_overwrite_never_touches_the_inputs_or_their_folders(tmp_path, monkeypatch, capsys, target, transformer_only):
    """The worst case of issue 17: `--output . --overwrite` run inside the checkpoint's folder used to leave
    only the new folder. Every pre-existing file survives byte for byte."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    checkpoint, config = folder / "video_tiny.pth", folder / "video_tiny.yaml"
    checkpoint.write_bytes(VIDEO_PTH.read_bytes())
    config.write_bytes(VIDEO_YAML.read_bytes())
    (folder / "notes.txt").write_text("my notes")
    (tmp_path / "other.txt").write_text("unrelated")
    before = _snapshot(tmp_path)
    output = {"checkpoint folder": folder, "its parent": tmp_path, "dot inside the checkpoint folder": Path(".")}[target]
    monkeypatch.chdir(folder)
    extra = ["--transformer-only"] if transformer_only else []
    code = main(["--checkpoint", str(checkpoint), "--config", str(config), "--output", str(output), "--overwrite", *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"starflow-convert: error: output directory .* contains the input .*\n", err)
    assert _snapshot(tmp_path) == before


def test_overwrite_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text("{}")  # looks like a model folder, but no conversion wrote it
    assert convert(output, VIDEO_PTH, VIDEO_YAML, "--overwrite") == 2
    assert "was not written by starflow-convert" in capsys.readouterr().err
    assert sorted(os.listdir(output)) == ["config.json"]


def test_overwrite_refuses_foreign_files_in_an_earlier_conversion(tmp_path, capsys):
    output = tmp_path / "out"
    assert convert(output) == 0
    (output / "my_results.csv").write_text("1,2,3")
    before = _snapshot(output)
    assert convert(output, VIDEO_PTH, VIDEO_YAML, "--overwrite") == 2
    assert "holds files a conversion does not write (my_results.csv)" in capsys.readouterr().err
    assert _snapshot(output) == before


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_staging_of_killed_runs_is_cleaned_up_safely(tmp_path, reference):
    output = tmp_path / "out"
    dead = _dead_pid()

    def staging(pid, suffix="", marker=True):
        path = tmp_path / f".out.partial-{pid}-0123abcd{suffix}"
        path.mkdir()
        if marker:
            (path / writer.MARKER_NAME).write_text("{}")
        (path / "config.json").write_text("{}")
        return path

    killed = staging(dead)
    alive = staging(os.getpid())  # a conversion still running
    unmarked = staging(dead + 1 if dead + 1 != os.getpid() else dead + 2, marker=False)  # not ours
    other = tmp_path / ".outer.partial-1-0123abcd"  # staging of another output name
    other.mkdir()
    (other / writer.MARKER_NAME).write_text("{}")
    assert convert(output) == 0
    assert not killed.exists() and alive.exists() and unmarked.exists() and other.exists()
    assert_same_weights(StarFlowVTransformer.from_pretrained(output), reference)


def test_a_run_killed_between_its_renames_gets_the_old_output_back(tmp_path):
    """Killed after moving the previous output aside and before moving the new one in: the next run puts
    the previous output back before it checks the folder."""
    output = tmp_path / "out"
    assert convert(output) == 0
    before = _snapshot(output)
    moved_aside = tmp_path / f".out.partial-{_dead_pid()}-0123abcd.old"
    output.rename(moved_aside)
    assert writer.clean_stale_staging(str(output)) == [str(moved_aside)]
    assert _snapshot(output) == before and not moved_aside.exists()


def test_existing_output_is_refused(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert convert(output) == 2
    assert re.search(r"already exists and is not empty; pass --overwrite", capsys.readouterr().err)
    assert sorted(os.listdir(output)) == ["keep.txt"]

    (tmp_path / "file").write_text("x")
    assert convert(tmp_path / "file", VIDEO_PTH, VIDEO_YAML, "--overwrite") == 2
    assert re.search(r"exists and is not a directory", capsys.readouterr().err)


@pytest.mark.parametrize("interrupt", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_write_leaves_output_untouched(tmp_path, monkeypatch, interrupt):
    output = tmp_path / "out"
    assert convert(output) == 0
    before = _snapshot(output)
    real_save_shard, calls = writer.save_shard, []

    def failing_save_shard(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise interrupt
        real_save_shard(tensors, path)

    monkeypatch.setattr(writer, "save_shard", failing_save_shard)
    args = (output, VIDEO_PTH, VIDEO_YAML, "--overwrite", "--max-shard-size", "300KB")
    if isinstance(interrupt, KeyboardInterrupt):
        assert convert(*args) == 130
    else:
        with pytest.raises(RuntimeError, match="disk on fire"):
            convert(*args)
    assert len(calls) == 3
    assert _snapshot(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow  # a fresh interpreter importing torch, diffusers and transformers
def test_python_dash_m_reports_errors_in_one_line(tmp_path):
    bad = tmp_path / "random.pth"
    bad.write_bytes(random.Random(0).randbytes(4096))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "starflow_diffusers.conversion", "--checkpoint", str(bad), "--config", str(VIDEO_YAML),
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert re.fullmatch(r"starflow-convert: error: .*random\.pth is not a readable PyTorch checkpoint.*\n", result.stderr)
    assert not (tmp_path / "out").exists()


# ---- bad input ----------------------------------------------------------------------------------


def _truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class NotATensor:
    pass


def _checkpoint_cases(tmp_path: Path, state: dict):
    safetensors_ok = tmp_path / "ok.safetensors"
    # the fixture's two rope buffers overlap in memory, which safetensors refuses to write: clone
    save_file({k: v.clone() for k, v in state.items()}, safetensors_ok)

    def saved(name, obj):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    def edited(name, remove=(), replace=None):
        return saved(name, {**{k: v for k, v in state.items() if k not in remove}, **(replace or {})})

    (tmp_path / "random.pth").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    layer = "blocks.1.attn_blocks.0"
    return [
        (_truncated(tmp_path / "truncated.pth", VIDEO_PTH), r"truncated\.pth is not a readable PyTorch checkpoint"),
        (tmp_path / "random.pth", r"random\.pth is not a readable PyTorch checkpoint"),
        (tmp_path / "empty.pth", r"checkpoint file is empty"),
        (_truncated(tmp_path / "truncated.safetensors", safetensors_ok), r"is not a readable safetensors file"),
        (tmp_path / "random.safetensors", r"is not a readable safetensors file"),
        (saved("object.pth", NotATensor()), r"holds objects other than tensors \(.*NotATensor\)"),
        (saved("dict_object.pth", {**state, "extra": NotATensor()}), r"holds objects other than tensors \(.*NotATensor\)"),
        (saved("dict_str.pth", {**state, "step": "10k"}), r"not contain a state dict of tensors: step \(str\)"),
        (tmp_path / "missing.pth", r"checkpoint file not found: .*missing\.pth"),
        (edited("unknown.pth", replace={"blocks.0.lora.weight": torch.zeros(2)}), r"unknown key\(s\).*blocks\.0\.lora\.weight"),
        (
            edited("shape.pth", replace={f"{layer}.mlp.main.0.weight": torch.zeros(7, 64)}),
            r"shape mismatch\(es\): blocks\.1\.layers\.0\.ff\.net\.0\.proj\.weight: checkpoint \(7, 64\) vs model \(256, 64\)",
        ),
        (
            edited("qkv.pth", replace={f"{layer}.attention.qkv.bias": torch.zeros(100)}),
            r"attention\.qkv\.bias: fused qkv has 100 rows, not divisible by 3",
        ),
        (
            edited("missing_key.pth", remove={f"{layer}.mlp.norm.weight"}),
            r"missing key\(s\): blocks\.1\.layers\.0\.norm2\.weight",
        ),
    ]


def test_bad_checkpoints(tmp_path, original_state, capsys):
    output = tmp_path / "out"
    for checkpoint, message in _checkpoint_cases(tmp_path, original_state):
        assert convert(output, checkpoint) == 2, checkpoint
        err = capsys.readouterr().err
        assert err.startswith("starflow-convert: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
        assert not output.exists()
    assert_no_staging_left(tmp_path)


def test_bad_checkpoint_keeps_existing_output(tmp_path, original_state, capsys):
    output = tmp_path / "out"
    assert convert(output) == 0
    before = _snapshot(output)
    checkpoint = tmp_path / "bad.pth"
    torch.save({k: v for k, v in original_state.items() if k != "blocks.0.proj_in.bias"}, checkpoint)
    assert convert(output, checkpoint, VIDEO_YAML, "--overwrite") == 2
    assert "missing key(s): blocks.0.proj_in.bias" in capsys.readouterr().err
    assert _snapshot(output) == before
    assert_no_staging_left(tmp_path)


def _yaml_with(tmp_path: Path, name: str, drop=(), **changes) -> Path:
    arguments = yaml.safe_load(VIDEO_YAML.read_text())["arguments"]
    arguments = [item for item in arguments if next(iter(item)) not in drop]
    arguments = [{k: changes.get(k, v)} for item in arguments for k, v in item.items()]
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"arguments": arguments}))
    return path


def test_bad_configs(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("arguments: [\n")
    (tmp_path / "flat.yaml").write_text("channels: 64\n")
    cases = [
        (_yaml_with(tmp_path, "no_noise.yaml", drop={"noise_std"}), r"missing required field\(s\): noise_std"),
        (_yaml_with(tmp_path, "no_rope.yaml", rope=0), r"unsupported architecture settings: rope=0 \(supported: 1\)"),
        (_yaml_with(tmp_path, "r2l.yaml", seq_order="R2L"), r"seq_order='R2L' \(supported: 'L2R'\)"),
        (_yaml_with(tmp_path, "no_sos.yaml", drop={"sos"}), r"sos missing \(supported: 1\)"),
        (_yaml_with(tmp_path, "wide.yaml", channels=128), r"shape mismatch"),
        (tmp_path / "broken.yaml", r"broken\.yaml is not valid YAML"),
        (tmp_path / "flat.yaml", r"must have a top-level `arguments:` list"),
        (tmp_path / "absent.yaml", r"config file not found"),
    ]
    for config, message in cases:
        assert convert(tmp_path / "out", VIDEO_PTH, config) == 2, config
        err = capsys.readouterr().err
        assert err.startswith("starflow-convert: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argument, value, message",
    [
        ("--dtype", "fp64", r"argument --dtype: invalid choice: 'fp64' \(choose from 'fp32', 'bf16', 'fp16'\)"),
        ("--max-shard-size", "lots", r"argument --max-shard-size: .*unit \(B, KB, MB, GB, TB\).*'lots'"),
        ("--max-shard-size", "0GB", r"argument --max-shard-size: max_shard_size must be positive"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argument, value, message):
    with pytest.raises(SystemExit) as exit_info:
        convert(tmp_path / "out", VIDEO_PTH, VIDEO_YAML, argument, value)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_parse_size():
    assert writer.parse_size("5GB") == 5 * 10**9
    assert writer.parse_size("1.5 mb") == 1_500_000
    assert writer.parse_size("4096") == writer.parse_size(4096) == 4096
