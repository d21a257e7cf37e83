"""starflow-train: config checks, a tiny run that writes a loadable pipeline folder, exact resume, and the
synthetic dataset it trains on."""

import json
import os

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
