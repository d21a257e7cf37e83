"""`from_single_file`: original checkpoints loaded directly, as diffusers does for other original formats."""

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from parity_utils import FORWARD_TOL, PARITY_DIR, converted_model, fixture, max_err, to_diffusers_layout
from starflow_diffusers import StarFlowPipeline, StarFlowVPipeline, StarFlowVTransformer
from starflow_diffusers.conversion import ConversionError, load_original_config, pipeline_config_from_original


VIDEO_PTH, VIDEO_YAML = str(PARITY_DIR / "video_tiny.pth"), str(PARITY_DIR / "video_tiny.yaml")


def _assert_same_weights(model, reference):
    got, expected = model.state_dict(), reference.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].device.type == "cpu" and torch.equal(got[key], value), key


def test_from_single_file_with_the_original_yaml_equals_the_converter():
    model = StarFlowVTransformer.from_single_file(VIDEO_PTH, config=VIDEO_YAML)
    _assert_same_weights(model, converted_model("video_tiny"))
    assert dict(model.config) == dict(converted_model("video_tiny").config)
    assert not model.training


def test_the_forward_pass_matches_the_original():
    tensors, _ = fixture("video_tiny")
    model = StarFlowVTransformer.from_single_file(VIDEO_PTH, config=VIDEO_YAML)
    x = to_diffusers_layout(tensors["x_clean"] + model.config.noise_std * tensors["eps"])
    with torch.no_grad():
        out = model(x, tensors["y"]).sample
    assert max_err(to_diffusers_layout(out), tensors["fwd_z"]) <= FORWARD_TOL


def test_config_found_beside_the_checkpoint_or_named_as_missing(tmp_path):
    shutil.copy(VIDEO_PTH, tmp_path / "model.pth")
    with pytest.raises(ConversionError, match="`config` is needed"):
        StarFlowVTransformer.from_single_file(str(tmp_path / "model.pth"))
    shutil.copy(VIDEO_YAML, tmp_path / "model.yaml")
    _assert_same_weights(StarFlowVTransformer.from_single_file(str(tmp_path / "model.pth")), converted_model("video_tiny"))


def test_a_diffusers_config_folder_and_a_safetensors_file(tmp_path):
    converted_model("video_tiny").save_pretrained(tmp_path / "transformer")
    original = torch.load(VIDEO_PTH, map_location="cpu", weights_only=True)
    save_file({k: v.clone() for k, v in original.items()}, str(tmp_path / "original.safetensors"))
    for config in (str(tmp_path / "transformer"), str(tmp_path / "transformer" / "config.json")):
        model = StarFlowVTransformer.from_single_file(str(tmp_path / "original.safetensors"), config=config)
        _assert_same_weights(model, converted_model("video_tiny"))
    # the folder's own weights file, in this package's key names, loads too
    weights = str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    _assert_same_weights(
        StarFlowVTransformer.from_single_file(weights, config=str(tmp_path / "transformer")), converted_model("video_tiny")
    )


def test_torch_dtype_and_bad_arguments(tmp_path):
    model = StarFlowVTransformer.from_single_file(VIDEO_PTH, config=VIDEO_YAML, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ConversionError, match="`torch_dtype`"):
        StarFlowVTransformer.from_single_file(VIDEO_PTH, config=VIDEO_YAML, torch_dtype="bf16")
    with pytest.raises(ConversionError, match="`config`"):
        StarFlowVTransformer.from_single_file(VIDEO_PTH, config=str(tmp_path))
    # a checkpoint of another config: every offending key is named
    with pytest.raises(ConversionError, match="does not match its config"):
        StarFlowVTransformer.from_single_file(str(PARITY_DIR / "image_tiny.pth"), config=VIDEO_YAML)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_a_pickle_with_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"weight": _Payload(str(tmp_path / "pwned"))}, evil)
    with pytest.raises(ConversionError, match="weights-only"):
        StarFlowVTransformer.from_single_file(str(evil), config=VIDEO_YAML)
    assert not (tmp_path / "pwned").exists()


def test_pipelines_from_single_file_take_the_yaml_settings():
    pipe = StarFlowVPipeline.from_single_file(VIDEO_PTH, config=VIDEO_YAML)
    expected = pipeline_config_from_original(load_original_config(VIDEO_YAML))
    assert {k: pipe.config[k] for k in expected} == expected
    _assert_same_weights(pipe.transformer, converted_model("video_tiny"))
    # a scheduler consistent with the model's 3-frame window
    assert pipe.scheduler.config.context_frames < converted_model("video_tiny").config.trained_latent_frames
    with pytest.raises(ConversionError, match="StarFlowVPipeline.from_single_file"):
        StarFlowPipeline.from_single_file(VIDEO_PTH, config=VIDEO_YAML)
    with pytest.raises(ConversionError, match="unknown argument"):
        StarFlowVPipeline.from_single_file(VIDEO_PTH, config=VIDEO_YAML, unet=None)
    image = StarFlowPipeline.from_single_file(str(PARITY_DIR / "image_tiny.pth"), config=str(PARITY_DIR / "image_tiny.yaml"))
    _assert_same_weights(image.transformer, converted_model("image_tiny"))
