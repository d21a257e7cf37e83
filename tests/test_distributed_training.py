"""Sharded training: FSDP2 through accelerate, for `starflow-train-lora` and `starflow-train`.

The two-process runs use gloo on this CPU through `launch_on_cpu.py` (accelerate enables its FSDP code
only for accelerator devices; the launcher keeps the plugin, nothing else). A run split over two processes
draws the same noise, captions drops and data as one process with the same global batch, so their losses
agree to float rounding; a run resumed from a sharded checkpoint ends bit-identical to an uninterrupted one.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from starflow_diffusers import StarFlowVPipeline
from starflow_diffusers.testing_utils import tiny_transformer
from starflow_diffusers.training import synthetic
from starflow_diffusers.training.distributed import FSDP1_UNSUPPORTED, check_fsdp_version
from starflow_diffusers.training.loop import METRICS_FILE, batch_generator, sample_generators
from starflow_diffusers.training.objective import StarFlowTrainingModule, add_training_noise, drop_captions


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "tests", "launch_on_cpu.py")
# the two runs' losses: float rounding of batch-of-4 versus two batches of 2 and a sharded reduction
LOSS_RTOL = 1e-5
# small enough that every update is clipped, so that clipping the wrong (pre-shard) parameters shows
MAX_GRAD_NORM = 0.05


def test_fsdp1_is_refused_naming_fsdp2():
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_fsdp_version(1)
    assert "FSDP1" in FSDP1_UNSUPPORTED
    for version in (None, 2):
        check_fsdp_version(version)


def test_every_transformer_layer_is_its_own_fsdp_unit():
    """accelerate's FSDP auto-wrap reads `_no_split_modules` from the prepared module (the training wrapper)
    and resolves each name to a class of the model."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    transformer = tiny_transformer()
    module = StarFlowTrainingModule(transformer)
    assert module._no_split_modules
    classes = {get_module_class_from_name(module, name) for name in module._no_split_modules}
    assert None not in classes
    layers = [m for m in transformer.modules() if type(m) in classes]
    # every layer of every flow block and of the denoiser
    expected = sum(transformer.config.num_layers_per_block) + transformer.config.denoiser_num_layers
    assert len(layers) == expected


def test_per_sample_draws_do_not_depend_on_how_the_batch_is_split():
    latents = torch.zeros(4, 3, 2, 4, 4)
    captions = [f"caption {i}" for i in range(4)]
    whole = sample_generators(7, 3, 0, 4, "cpu")
    halves = sample_generators(7, 3, 0, 2, "cpu"), sample_generators(7, 3, 2, 2, "cpu")
    dropped = drop_captions(captions, 0.5, whole)
    assert dropped == drop_captions(captions[:2], 0.5, halves[0]) + drop_captions(captions[2:], 0.5, halves[1])
    noise = add_training_noise(latents, 1.0, whole)
    split = torch.cat([add_training_noise(latents[:2], 1.0, halves[0]), add_training_noise(latents[2:], 1.0, halves[1])])
    assert torch.equal(noise, split)
    # samples and micro steps draw differently; the batch-wide generator is one per micro step
    assert not torch.equal(noise[0], noise[1])
    assert not torch.equal(noise, add_training_noise(latents, 1.0, sample_generators(7, 4, 0, 4, "cpu")))
    draws = [torch.rand(3, generator=batch_generator(7, 3, "cpu")) for _ in range(2)]
    assert torch.equal(*draws) and not torch.equal(draws[0], torch.rand(3, generator=batch_generator(7, 4, "cpu")))
    with pytest.raises(ValueError, match="3 generators for 4 captions"):
        drop_captions(captions, 0.5, whole[:3])


# ---- two-process runs ------------------------------------------------------------------------------------------


def _launch_fsdp2(module, arguments, mixed_precision="no"):
    env = {
        **os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": mixed_precision,
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", LAUNCHER,
        "-m", module, *arguments,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]


def _losses(output_dir, logging_dir="logs"):
    with open(os.path.join(output_dir, logging_dir, METRICS_FILE), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    by_step = {r["step"]: r for r in records}  # a resumed run appends: the last line of a step counts
    return [by_step[s] for s in sorted(by_step)]


def _assert_same_curves(single, sharded, names):
    assert [r["step"] for r in single] == [r["step"] for r in sharded]
    for a, b in zip(single, sharded):
        for name in names:
            assert b[name] == pytest.approx(a[name], rel=LOSS_RTOL), (a["step"], name, a[name], b[name])
    # training moved: the curves are not flat
    assert single[-1]["loss"] != single[0]["loss"]


def _assert_equal_tensors(expected, actual, atol):
    assert expected.keys() == actual.keys()
    worst = max((expected[k].float() - actual[k].float()).abs().max().item() for k in expected)
    assert worst <= atol, worst


def _lora_args(model_dir, data_dir, output_dir, batch_size, *extra):
    return [
        "--pretrained_model_name_or_path", model_dir, "--data_dir", data_dir, "--output_dir", str(output_dir),
        "--height", "32", "--width", "32", "--num_frames", "9", "--rank", "4", "--report_to", "none",
        "--max_train_steps", "4", "--learning_rate", "1e-3", "--caption_dropout", "0.3", "--train_denoiser",
        "--train_batch_size", str(batch_size), "--max_grad_norm", str(MAX_GRAD_NORM), *extra,
    ]


@pytest.mark.slow
def test_fsdp2_lora_matches_one_process_validates_and_resumes_exactly(lora_setup, tmp_path):
    from starflow_diffusers.training.train_lora import parse_args, train

    model_dir, data_dir = lora_setup
    module = "starflow_diffusers.training.train_lora"
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    train(parse_args(_lora_args(model_dir, data_dir, single, 4, "--checkpointing_steps", "100")))
    _launch_fsdp2(module, _lora_args(
        model_dir, data_dir, sharded, 2, "--checkpointing_steps", "100",
        "--validation_prompt", "a red circle moving left", "--validation_steps", "4",
    ))
    _assert_same_curves(_losses(single), _losses(sharded), ("loss", "bits_per_dim", "denoiser_loss"))
    lora = StarFlowVPipeline.lora_state_dict(str(sharded))
    assert any(k.startswith("transformer.denoiser.") for k in lora)
    _assert_equal_tensors(StarFlowVPipeline.lora_state_dict(str(single)), lora, atol=1e-6)
    # validation sampled on the main process with gathered weights
    assert os.listdir(sharded / "validation") == ["step-000004.mp4"]

    # frozen bf16 weights next to fp32 LoRA parameters in one FSDP unit; killed after checkpoint 2, resumed
    full, resumed = tmp_path / "bf16", tmp_path / "bf16-resumed"
    bf16 = ("--mixed_precision", "bf16", "--checkpointing_steps", "2")
    _launch_fsdp2(module, _lora_args(model_dir, data_dir, full, 2, *bf16), mixed_precision="bf16")
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / ".checkpoint-3.tmp").mkdir()
    _launch_fsdp2(
        module, _lora_args(model_dir, data_dir, resumed, 2, *bf16, "--resume_from_checkpoint", "latest"),
        mixed_precision="bf16",
    )
    assert not (resumed / ".checkpoint-3.tmp").exists()
    expected, actual = StarFlowVPipeline.lora_state_dict(str(full)), StarFlowVPipeline.lora_state_dict(str(resumed))
    _assert_equal_tensors(expected, actual, atol=0)
    halfway = StarFlowVPipeline.lora_state_dict(str(full / "checkpoint-2"))
    assert max((expected[k] - halfway[k]).abs().max().item() for k in expected) > 1e-4

    # the saved LoRA loads into a fresh pipeline and changes its samples
    pipe = StarFlowVPipeline.from_pretrained(model_dir)
    kwargs = dict(prompt="a red circle moving left", num_frames=9, height=32, width=32, output_type="pt")
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(str(resumed))
    tuned = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert tuned.shape == base.shape == (1, 9, 3, 32, 32) and torch.isfinite(tuned).all()
    assert (tuned - base).abs().max() > 1e-3


def _full_config(tmp_path, batch_size, **training):
    from test_train import TINY_CONFIG

    config = json.loads(json.dumps(TINY_CONFIG))
    config["training"].update(train_batch_size=batch_size, max_grad_norm=MAX_GRAD_NORM, **training)
    path = tmp_path / f"config-{batch_size}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_fsdp2_full_training_matches_one_process_and_resumes_exactly(tmp_path):
    from starflow_diffusers.training.train import main

    module = "starflow_diffusers.training.train"
    single, sharded, resumed = tmp_path / "single", tmp_path / "sharded", tmp_path / "resumed"
    main(["--config", _full_config(tmp_path, 4), "--output_dir", str(single)])
    config = _full_config(tmp_path, 2, validation_prompts=["a red circle moving left"], validation_steps=4)
    _launch_fsdp2(module, ["--config", config, "--output_dir", str(sharded)])
    _assert_same_curves(_losses(single), _losses(sharded), ("loss", "bits_per_dim", "denoiser_loss"))

    def weights(folder):
        return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))

    _assert_equal_tensors(weights(single), weights(sharded), atol=1e-5)
    assert os.listdir(sharded / "validation") == ["step-000004-0.mp4"]
    # the checkpoint's transformer folder holds gathered, whole weights
    assert weights(sharded / "checkpoint-2").keys() == weights(single).keys()

    resumed.mkdir()
    shutil.copytree(sharded / "checkpoint-2", resumed / "checkpoint-2")
    _launch_fsdp2(module, ["--config", config, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    _assert_equal_tensors(weights(sharded), weights(resumed), atol=0)

    pipe = StarFlowVPipeline.from_pretrained(str(resumed))
    video = pipe("a red circle moving left", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 3, 16, 16, 3) and 0 <= video.min() and video.max() <= 1


@pytest.mark.slow
def test_fsdp2_finetuning_of_a_saved_pipeline_matches_one_process(tmp_path):
    """Full fine-tuning of a latent pipeline with cached VAE latents, gradient checkpointing and the denoiser's
    own parameter group, sharded over two processes."""
    from starflow_diffusers.testing_utils import tiny_pipeline
    from starflow_diffusers.training.train import main

    model_dir, data_dir = tmp_path / "converted", tmp_path / "clips"
    tiny_pipeline().save_pretrained(model_dir)
    synthetic.write_dataset(str(data_dir), num_train=8, num_test=2, size=32, num_frames=9)

    def arguments(output_dir, batch_size):
        config = {
            "data": {"num_frames": 9},
            "training": {"max_train_steps": 3, "train_batch_size": batch_size, "checkpointing_steps": 100,
                         "report_to": "none", "mixed_precision": "no", "lr_warmup_steps": 0, "learning_rate": 1e-3,
                         "max_grad_norm": MAX_GRAD_NORM, "save_dtype": "float32"},
        }
        path = tmp_path / f"finetune-{batch_size}.yaml"
        path.write_text(yaml.safe_dump(config))
        return ["--pretrained_model_name_or_path", str(model_dir), "--data_dir", str(data_dir / "train"),
                "--config", str(path), "--output_dir", str(output_dir)]

    main(arguments(tmp_path / "single", 4))
    _launch_fsdp2("starflow_diffusers.training.train", arguments(tmp_path / "sharded", 2))
    _assert_same_curves(_losses(tmp_path / "single"), _losses(tmp_path / "sharded"), ("loss", "denoiser_loss", "grad_norm"))

    def weights(folder):
        return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))

    _assert_equal_tensors(weights(tmp_path / "single"), weights(tmp_path / "sharded"), atol=1e-5)
    assert StarFlowVPipeline.from_pretrained(str(tmp_path / "sharded")).vae is not None
