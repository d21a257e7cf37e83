"""starflow-train: config checks, a tiny run that writes a loadable pipeline folder, exact resume, and the
synthetic dataset it trains on."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

from starflow_diffusers import StarFlowVPipeline
from starflow_diffusers.training.synthetic import VOCABULARY, SyntheticClipDataset, generate_clips
from starflow_diffusers.training.train import load_config, main, parse_args, resolve_config


TINY_CONFIG = {
    "model": {
        "patch_size": 8, "num_layers_per_block": [1, 1], "shallow_width": 32, "deep_width": 32,
        "attention_head_dim": 32, "max_text_length": 16, "rope_base_size": 2, "denoiser_num_layers": 1,
        "denoiser_window": 5, "noise_std": 0.3,
    },
    "text_encoder": {"d_model": 16, "d_kv": 8, "d_ff": 32},
    "pipeline": {"fps_conditioning": False, "noise_level_conditioning": False, "aspect_ratio_conditioning": False},
    "scheduler": {"block_size": 4, "later_block_multiplier": 1, "max_iterations": 4},
    "data": {"synthetic": {"num_clips": 16}, "height": 16, "width": 16, "num_frames": 3},
    "training": {"max_train_steps": 4, "train_batch_size": 2, "checkpointing_steps": 2, "report_to": "none"},
}


def _write(tmp_path, config, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config) if name.endswith(".yaml") else json.dumps(config))
    return str(path)


def _with(**sections):
    config = json.loads(json.dumps(TINY_CONFIG))
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_tiny_run_writes_a_loadable_pipeline_and_resumes_exactly(tmp_path):
    config = _write(tmp_path, TINY_CONFIG)
    main(["--config", config, "--output_dir", str(tmp_path / "straight")])
    pipe = StarFlowVPipeline.from_pretrained(str(tmp_path / "straight"))
    assert pipe.vae is None and pipe.transformer.config.in_channels == 3
    assert pipe.transformer.config.trained_latent_frames == 3 and pipe.default_base_frame_size == 16
    # the tokenizer knows every word of the world
    ids = pipe.tokenizer(" ".join(VOCABULARY), add_special_tokens=False).input_ids
    assert pipe.tokenizer.unk_token_id not in ids
    video = pipe("a red circle moving left", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 3, 16, 16, 3) and 0 <= video.min() and video.max() <= 1
    assert json.loads((tmp_path / "straight" / "train_config.json").read_text())["training"]["max_train_steps"] == 4

    # 2 steps, then resume to 4: the same weights as 4 steps straight
    main(["--config", config, "--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "2"])
    main(["--config", config, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4"
    ]


def test_the_denoiser_trains_and_weights_are_saved_in_the_requested_dtype(tmp_path):
    config = _write(tmp_path, _with(training={"max_train_steps": 2, "save_dtype": "float16"}), "config.json")
    main(["--config", config, "--output_dir", str(tmp_path / "out")])
    weights = _weights(tmp_path / "out")
    assert {w.dtype for w in weights.values()} == {torch.float16}
    # zero-initialised output projection of the denoiser: it moved, so the denoiser was trained
    assert weights["denoiser.proj_out.weight"].abs().max() > 0
    # from_pretrained loads it as float32
    assert StarFlowVPipeline.from_pretrained(str(tmp_path / "out")).transformer.dtype == torch.float32


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"model": {"in_channels": 48}}, "`model.in_channels` must be 3"),
        ({"model": {"text_embed_dim": 64}}, "`model.text_embed_dim` (64) must equal `text_encoder.d_model` (16)"),
        ({"model": {"patch_size": 3}}, "`data.height` (16) must be a multiple of `model.patch_size` (3)"),
        ({"model": {"colour": 1}}, "`model.colour`"),
        ({"training": {"learning_rate": 0}}, "`training.learning_rate` must be > 0"),
        ({"training": {"mixed_precision": "fp8"}}, "`training.mixed_precision` must be one of no, fp16, bf16"),
        ({"training": {"caption_dropout": 2}}, "`training.caption_dropout` must be in [0, 1]"),
        ({"training": {"lr_scheduler": "exotic"}}, "`training.lr_scheduler` 'exotic' is unknown"),
        ({"training": {"max_train_steps": 0}}, "`training.max_train_steps` must be a positive integer"),
        ({"training": {"batch": 2}}, "`training.batch`"),
        ({"data": {"data_dir": "somewhere"}}, "exactly one of `synthetic`"),
        ({"data": {"synthetic": {"clips": 3}}}, "`data.synthetic.clips`"),
        ({"data": {"width": 24}}, "square frames"),
        ({"data": {"synthetic": {"max_objects": 3}}}, "`data.synthetic.max_objects` must be 1 or 2"),
        ({"model": {"denoiser_num_layers": 0}}, "`training.train_denoiser` needs a learned denoiser"),
        ({"model": {"deep_width": "wide"}}, "`model.deep_width` must be an integer, got 'wide'"),
        ({"model": {"num_layers_per_block": "2,2"}}, "`model.num_layers_per_block` must be a list of integers"),
        ({"model": {"noise_std": "high"}}, "`model.noise_std` must be a finite number"),
        ({"model": {"is_video": "yes"}}, "`model.is_video` must be true or false"),
        ({"model": {"deep_width": 100}}, "`deep_width` (100) must be divisible by `attention_head_dim`"),
        ({"scheduler": {"block_size": "big"}}, "`scheduler.block_size` must be an integer"),
        ({"scheduler": {"mode": "fast"}}, "`mode` must be one of 'jacobi', 'adaptive', 'sequential'"),
    ],
)
def test_bad_configs_fail_before_training_and_name_the_key(tmp_path, capsys, sections, message):
    config = json.loads(json.dumps(TINY_CONFIG))
    for section, values in sections.items():
        config[section].update(values)
    with pytest.raises(SystemExit):
        parse_args(["--config", _write(tmp_path, config), "--output_dir", str(tmp_path / "out")])
    assert message in capsys.readouterr().err


def test_bad_command_lines_fail_with_clear_errors(tmp_path, capsys):
    config = _write(tmp_path, TINY_CONFIG)
    for argv, message in [
        (["--config", str(tmp_path / "missing.yaml"), "--output_dir", "out"], "is not a file"),
        (["--config", config, "--output_dir", "out", "--resume_from_checkpoint", str(tmp_path)], "checkpoint-<step>"),
        (["--config", config, "--output_dir", "out", "--mixed_precision", "fp8"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping of sections"):
        load_config(str(tmp_path / "list.yaml"))
    with pytest.raises(ValueError, match="Unknown config section"):
        resolve_config({**TINY_CONFIG, "optimizer": {}})


def test_a_config_without_a_model_section_is_refused_before_building_anything(monkeypatch):
    """Every model argument defaults to the released 7B: without `model:` the trainer used to build it and
    be killed for lack of memory minutes later."""
    from starflow_diffusers import StarFlowVTransformer

    monkeypatch.setattr(StarFlowVTransformer, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    config = {k: v for k, v in json.loads(json.dumps(TINY_CONFIG)).items() if k != "model"}
    with pytest.raises(ValueError, match="Config section `model` is required"):
        resolve_config(config)


def test_the_bundled_config_resolves():
    config = resolve_config(load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_32px.yaml")))
    assert config["model"]["in_channels"] == 3 and config["model"]["trained_latent_frames"] == 17
    assert config["pipeline"]["base_frame_size"] == 32 and config["pipeline"]["default_aspect_ratio"] == "1:1"


def test_synthetic_dataset_items_match_the_generated_clips():
    dataset = SyntheticClipDataset(5, "test", size=16, num_frames=3, seed=4)
    clips = generate_clips(5, "test", size=16, num_frames=3, seed=4)
    assert len(dataset) == 5
    for index in (0, 4):
        item = dataset[index]
        assert item["caption"] == clips[index].caption and item["pixels"].shape == (3, 3, 16, 16)
        expected = torch.from_numpy(clips[index].frames).permute(3, 0, 1, 2).float() / 127.5 - 1
        torch.testing.assert_close(item["pixels"], expected)
    with pytest.raises(IndexError):
        dataset[5]
    with pytest.raises(ValueError, match="num_clips"):
        SyntheticClipDataset(0)


# ---- fine-tuning a saved (converted) pipeline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune_setup(tmp_path_factory):
    """A tiny latent-space pipeline with a Wan-style VAE, saved like a converted checkpoint, and 9-frame clips."""
    from starflow_diffusers.testing_utils import tiny_pipeline
    from starflow_diffusers.training import synthetic

    model_dir = tmp_path_factory.mktemp("converted")
    pipe = tiny_pipeline()
    pipe.transformer.to(torch.bfloat16)  # as `starflow-convert --dtype bf16` writes it
    pipe.save_pretrained(model_dir)
    data_dir = tmp_path_factory.mktemp("clips") / "data"
    synthetic.write_dataset(str(data_dir), num_train=8, num_test=2, size=32, num_frames=9)
    return str(model_dir), str(data_dir / "train")


def _finetune(tmp_path, setup, output, training=None, data=None, extra=()):
    model_dir, data_dir = setup
    config = {
        "data": {"num_frames": 9, **(data or {})},
        "training": {"max_train_steps": 4, "train_batch_size": 2, "checkpointing_steps": 2, "report_to": "none",
                     "mixed_precision": "no", "lr_warmup_steps": 1, **(training or {})},
    }
    path = _write(tmp_path, config, f"{output}.yaml")
    main(["--pretrained_model_name_or_path", model_dir, "--data_dir", data_dir, "--config", path,
          "--output_dir", str(tmp_path / output), *extra])
    return tmp_path / output


def _changed(before, after, prefix):
    return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]


def test_finetuning_a_saved_pipeline_trains_every_weight_and_resumes_exactly(finetune_setup, tmp_path):
    model_dir, _ = finetune_setup
    straight = _finetune(tmp_path, finetune_setup, "straight")
    pipe = StarFlowVPipeline.from_pretrained(str(straight))
    assert pipe.vae is not None and pipe.transformer.config.in_channels == 48
    config = json.loads((straight / "train_config.json").read_text())
    # the original recipe's defaults: cosine to 1e-6, the denoiser at 1e-4 with AdamW's betas, clipping
    # and skipping, the caption and first-frame drops, gradient checkpointing
    assert config["pretrained_model_name_or_path"] == model_dir
    assert {k: config["training"][k] for k in ("learning_rate", "min_learning_rate", "denoiser_learning_rate")} == {
        "learning_rate": 5e-5, "min_learning_rate": 1e-6, "denoiser_learning_rate": 1e-4
    }
    assert config["training"]["drop_first_frame"] == 0.25 and config["training"]["caption_dropout"] == 0.1
    assert config["training"]["skip_large_gradients_after"] == 100 and config["training"]["gradient_checkpointing"]
    assert config["data"]["cache_latents"] and config["training"]["train_denoiser"]

    from safetensors.torch import load_file

    before = load_file(os.path.join(model_dir, "transformer", "diffusion_pytorch_model.safetensors"))
    after = _weights(straight)
    assert after["blocks.0.proj_in.weight"].dtype == torch.bfloat16  # save_dtype's fine-tuning default
    # trained on float32 master weights, not on the folder's bf16 ones
    assert _weights(straight / "checkpoint-4")["blocks.0.proj_in.weight"].dtype == torch.float32
    after32 = {k: v.float() for k, v in after.items()}
    assert _changed(before, after32, "blocks.0.") and _changed(before, after32, "blocks.2.")
    assert _changed(before, after32, "denoiser.")
    video = pipe(
        "a red circle moving left", num_frames=9, height=32, width=32, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames
    assert video.shape == (1, 9, 32, 32, 3) and np.isfinite(video).all()

    # a run killed after its step-2 checkpoint, resumed
    (tmp_path / "resumed").mkdir()
    shutil.copytree(straight / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = _finetune(tmp_path, finetune_setup, "resumed", extra=("--resume_from_checkpoint", "latest"))
    for key, value in after.items():
        torch.testing.assert_close(_weights(resumed)[key], value, rtol=0, atol=0)


def test_updates_with_large_gradients_are_skipped(finetune_setup, tmp_path):
    model_dir, _ = finetune_setup
    tiny_norm = {"max_grad_norm": 1e-3, "save_dtype": "float32", "checkpointing_steps": 100, "lr_warmup_steps": 0}
    skipping = _finetune(tmp_path, finetune_setup, "skipping", training={**tiny_norm, "skip_large_gradients_after": 1})
    from safetensors.torch import load_file

    before = load_file(os.path.join(model_dir, "transformer", "diffusion_pytorch_model.safetensors"))
    logs = [json.loads(line) for line in (skipping / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in logs] == [0.0, 1.0, 1.0, 1.0]
    assert all(r["grad_norm"] > 1e-3 and r["denoiser_grad_norm"] > 1e-3 for r in logs)
    # the first update moved the weights; the three skipped ones left them as they were after it
    first = _finetune(tmp_path, finetune_setup, "first", training={**tiny_norm, "max_train_steps": 1})
    assert _changed(before, _weights(first), "blocks.")
    for key, value in _weights(first).items():
        torch.testing.assert_close(_weights(skipping)[key], value, rtol=0, atol=0)


def test_learning_rates_warm_up_then_decay_per_group_to_the_floor():
    from starflow_diffusers.training.train import FINETUNE_TRAINING_DEFAULTS, learning_rate_schedule

    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 5e-5}, {"params": params[1:], "lr": 1e-4}])
    training = {**FINETUNE_TRAINING_DEFAULTS, "lr_warmup_steps": 10, "max_train_steps": 110}
    schedule = learning_rate_schedule(optimizer, training, num_processes=1)
    rates = []
    for _ in range(111):
        rates.append(schedule.get_last_lr())
        optimizer.step()
        schedule.step()
    assert rates[0] == [0.0, 0.0]
    assert rates[10] == pytest.approx([5e-5, 1e-4]) and rates[5] == pytest.approx([2.5e-5, 5e-5])
    assert rates[60] == pytest.approx([(5e-5 + 1e-6) / 2, (1e-4 + 1e-6) / 2])
    assert rates[110] == pytest.approx([1e-6, 1e-6])


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model": {"patch_size": 2}}, "come from --pretrained_model_name_or_path"),
        ({"data": {"height": 40}}, "`data.height` must be a multiple of 16"),
        ({"data": {"num_frames": 8}}, "`data.num_frames` must be 4k\\+1"),
        ({"training": {"min_learning_rate": 1e-6, "lr_scheduler": "linear"}}, "floor of the cosine schedule"),
        ({"training": {"skip_large_gradients_after": 10, "max_grad_norm": 0}}, "set it > 0"),
        ({"training": {"denoiser_adam_betas": [0.9]}}, "`training.denoiser_adam_betas` must be two numbers"),
        ({"data": {"synthetic": {"num_clips": 4, "colours": 3}}}, "Unknown config key"),
        ({"data": {"synthetic": {"two_object_fraction": 2}}}, "`data.synthetic.two_object_fraction` must be in"),
        ({"data": {"synthetic": {}, "height": 32, "width": 48}}, "square frames"),
    ],
)
def test_bad_finetuning_configs_name_the_key(finetune_setup, tmp_path, capsys, config, message):
    model_dir, data_dir = finetune_setup
    path = _write(tmp_path, config)
    data = [] if "synthetic" in config.get("data", {}) else ["--data_dir", data_dir]
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", model_dir, *data, "--config", path, "--output_dir", str(tmp_path / "out")])
    assert re.search(message, capsys.readouterr().err)


def test_finetuning_needs_a_pipeline_folder_and_videos(finetune_setup, tmp_path, capsys):
    model_dir, data_dir = finetune_setup
    for argv, message in (
        (["--output_dir", "out"], "--config is required"),
        (["--pretrained_model_name_or_path", str(tmp_path), "--data_dir", data_dir, "--output_dir", "o"], "model_index.json is missing"),
        (["--pretrained_model_name_or_path", model_dir, "--output_dir", "o"], "needs `data.data_dir`"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_finetuning_on_the_synthetic_world(finetune_setup, tmp_path):
    """A pipeline can be fine-tuned on the moving-shapes world rendered on the fly, weighted toward two objects."""
    from starflow_diffusers.training.train import resolve_finetune_config

    model_dir, _ = finetune_setup
    config = resolve_finetune_config({"data": {"synthetic": {"two_object_fraction": 0.8}, "num_frames": 9}}, model_dir)
    assert config["data"]["synthetic"] == {"num_clips": 10000, "seed": 0, "max_objects": 2, "two_object_fraction": 0.8}
    assert config["data"]["cache_latents"] is False and config["data"]["height"] == 32
    with pytest.raises(ValueError, match="not both"):
        resolve_finetune_config({"data": {"synthetic": {}, "data_dir": str(tmp_path)}}, model_dir)
