"""`starflow-convert` writing whole pipeline folders (model_index.json, transformer, scheduler, components)."""

import json

import numpy as np
import pytest
import torch

from parity_utils import PARITY_DIR, converted_model
from starflow_diffusers import StarFlowPipeline, StarFlowVPipeline
from starflow_diffusers.conversion.__main__ import main
from starflow_diffusers.testing_utils import tiny_image_vae, tiny_text_encoder, tiny_tokenizer

VIDEO = [str(PARITY_DIR / "video_tiny.pth"), str(PARITY_DIR / "video_tiny.yaml")]
IMAGE = [str(PARITY_DIR / "image_tiny.pth"), str(PARITY_DIR / "image_tiny.yaml")]


def _cli(checkpoint, config, output, *extra):
    return main(["--checkpoint", checkpoint, "--config", config, "--output", str(output), *map(str, extra)])


@pytest.fixture(scope="module")
def component_dirs(tmp_path_factory):
    """A tiny 4-channel Wan VAE and a T5 encoder whose width (16) fits the tiny parity checkpoints."""
    from diffusers import AutoencoderKLWan

    root = tmp_path_factory.mktemp("components")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    tiny_text_encoder(len(tokenizer), d_model=16).save_pretrained(root / "text_encoder")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                     scale_factor_spatial=2, scale_factor_temporal=2,
                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(root / "vae")
    tiny_image_vae().save_pretrained(root / "sd_vae")
    # a 48-channel VAE, which does not fit the 4-channel checkpoint
    AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                     latents_mean=[0.0] * 48, latents_std=[1.0] * 48).save_pretrained(root / "wide_vae")
    return root


def test_video_pipeline_folder_loads_and_generates(tmp_path, component_dirs):
    out = tmp_path / "pipe"
    code = _cli(*VIDEO, out, "--vae", component_dirs / "vae", "--text-encoder", component_dirs,
                "--tokenizer", component_dirs)
    assert code == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StarFlowVPipeline"
    # the original YAML's conditioning settings
    assert index["fps_conditioning"] is True and index["noise_level_conditioning"] is True
    assert index["aspect_ratio_conditioning"] is False and index["max_text_length"] == 6
    pipe = StarFlowVPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    reference = converted_model("video_tiny")
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert pipe.transformer.config.noise_std == 0.5
    frames = pipe("a red circle", height=4 * pipe.vae_scale_factor_spatial, width=4 * pipe.vae_scale_factor_spatial,
                  num_frames=5, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape[0] == 1 and frames.shape[-1] == 3 and np.isfinite(frames).all()


def test_image_pipeline_folder_with_sd_vae_generates(tmp_path, component_dirs):
    out = tmp_path / "image_pipe"
    code = _cli(*IMAGE, out, "--vae", component_dirs / "sd_vae", "--text-encoder", component_dirs / "text_encoder",
                "--tokenizer", component_dirs / "tokenizer")
    assert code == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StarFlowPipeline"
    pipe = StarFlowPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", height=8, width=8, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()


def test_image_pipeline_folder_without_components(tmp_path):
    out = tmp_path / "image"
    assert _cli(*IMAGE, out) == 0
    pipe = StarFlowPipeline.from_pretrained(out)
    assert pipe.vae is None and pipe.text_encoder is None
    assert pipe.config.max_text_length == 6 and not pipe.transformer.config.is_video
    assert (out / "scheduler" / "scheduler_config.json").is_file()


def test_component_mismatch_is_refused_before_writing(tmp_path, component_dirs, capsys):
    out = tmp_path / "pipe"
    assert _cli(*VIDEO, out, "--vae", component_dirs / "wide_vae") == 2
    assert "latent channels" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert _cli(*VIDEO, out, "--text-encoder", component_dirs) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert _cli(*VIDEO, out, "--vae", tmp_path / "missing") == 2
    assert "--vae" in capsys.readouterr().err


def test_transformer_only_excludes_components(tmp_path, component_dirs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli(*VIDEO, tmp_path / "t", "--transformer-only", "--vae", component_dirs / "vae")
    assert exit_info.value.code == 2
    assert "--transformer-only" in capsys.readouterr().err
