"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate, for `starflow-train` and `starflow-train-lora`.

The config checks run everywhere. The two-process runs need DeepSpeed (`pip install deepspeed`, not part of
the test extras: it builds from source against torch) and are skipped without it; they use DeepSpeed's CPU
accelerator on gloo through `launch_on_cpu.py`, with ZeRO-3 partitioning every parameter
(`stage3_param_persistence_threshold: 0`; by default ZeRO-3 keeps parameters under 1e5 elements whole, which
is every parameter of a tiny model). As with FSDP2, two processes with batch 2 must reproduce one plain
process with batch 4, and a resumed run must end bit-identical to an uninterrupted one.
"""

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from starflow_diffusers import StarFlowVPipeline
from starflow_diffusers.training.distributed import configure_deepspeed
from test_distributed_training import _assert_equal_tensors, _assert_same_curves, _lora_args, _losses


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "tests", "launch_on_cpu.py")
# large enough never to clip: DeepSpeed clips one norm over all parameters, the plain trainers one per group
NO_CLIPPING = 100.0


def _deepspeed_accelerator(zero_stage, **config):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config=config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_deepspeed_clips_at_the_trainers_max_grad_norm_or_refuses_another_value():
    for config in ({}, {"gradient_clipping": "auto"}):
        accelerator = _deepspeed_accelerator(2, **config)
        configure_deepspeed(accelerator, 0.5)
        assert accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.5
    configure_deepspeed(_deepspeed_accelerator(2, gradient_clipping=0.5), 0.5)
    with pytest.raises(ValueError, match=r"`gradient_clipping` \(1.0\) differs from `max_grad_norm` \(0.5\)"):
        configure_deepspeed(_deepspeed_accelerator(2, gradient_clipping=1.0), 0.5)


def test_zero3_gathers_whole_weights_for_saving():
    accelerator = _deepspeed_accelerator(3, zero_optimization={"stage": 3})
    configure_deepspeed(accelerator, 1.0)
    assert accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"] is True
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save: true"):
        configure_deepspeed(_deepspeed_accelerator(
            3, zero_optimization={"stage3_gather_16bit_weights_on_model_save": False}), 1.0)


def test_the_one_step_training_module_needs_an_input_that_requires_grad():
    from starflow_diffusers.testing_utils import tiny_transformer
    from starflow_diffusers.training.objective import StarFlowTrainingModule

    module = StarFlowTrainingModule(tiny_transformer(in_channels=3))
    latents, text = torch.randn(1, 3, 2, 4, 4), torch.randn(1, 8, module.transformer.config.text_embed_dim)
    with pytest.raises(ValueError, match="require grad"):
        module(latents, text, score_matching_noise_std=0.3)


# ---- two-process runs ------------------------------------------------------------------------------------------


def _launch_deepspeed(module, arguments, tmp_path, zero_stage):
    pytest.importorskip("deepspeed")
    config = {
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    }
    path = tmp_path / f"zero{zero_stage}.json"
    path.write_text(json.dumps(config))
    env = {
        **os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
        "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path),
        "ACCELERATE_MIXED_PRECISION": "no",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", LAUNCHER,
        "-m", module, *arguments,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]


def _full_config(tmp_path, batch_size, **training):
    import yaml
    from test_train import TINY_CONFIG

    config = json.loads(json.dumps(TINY_CONFIG))
    config["training"].update(train_batch_size=batch_size, **training)
    path = tmp_path / f"config-{batch_size}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _weights(folder):
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_full_training_matches_one_process_and_resumes_exactly(tmp_path, zero_stage):
    """With the denoiser trained (one forward and one backward per micro-batch; under ZeRO-3 its score from a
    flow pass of its own), validation and checkpoints on gathered weights."""
    pytest.importorskip("deepspeed")
    from starflow_diffusers.training.train import main

    module = "starflow_diffusers.training.train"
    settings = dict(max_grad_norm=NO_CLIPPING, learning_rate=1e-3, lr_warmup_steps=0, train_denoiser=True)
    single, sharded, resumed = tmp_path / "single", tmp_path / "sharded", tmp_path / "resumed"
    main(["--config", _full_config(tmp_path, 4, **settings), "--output_dir", str(single)])
    config = _full_config(tmp_path, 2, validation_prompts=["a red circle moving left"], validation_steps=4, **settings)
    _launch_deepspeed(module, ["--config", config, "--output_dir", str(sharded)], tmp_path, zero_stage)
    _assert_same_curves(_losses(single), _losses(sharded), ("loss", "bits_per_dim", "denoiser_loss"))
    _assert_equal_tensors(_weights(single), _weights(sharded), atol=1e-5)
    assert os.listdir(sharded / "validation") == ["step-000004-0.mp4"]
    # the checkpoint's transformer folder holds whole weights, not ZeRO-3's empty partitions
    assert {k: v.shape for k, v in _weights(sharded / "checkpoint-2").items()} == {
        k: v.shape for k, v in _weights(single).items()}

    resumed.mkdir()
    shutil.copytree(sharded / "checkpoint-2", resumed / "checkpoint-2")
    _launch_deepspeed(
        module, ["--config", config, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], tmp_path,
        zero_stage,
    )
    _assert_equal_tensors(_weights(sharded), _weights(resumed), atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_lora_matches_one_process(lora_setup, tmp_path, zero_stage):
    """The denoiser's LoRA trained too, validating on gathered weights."""
    pytest.importorskip("deepspeed")
    from starflow_diffusers.training.train_lora import parse_args, train

    model_dir, data_dir = lora_setup

    def arguments(output_dir, batch_size, *extra):
        args = _lora_args(model_dir, data_dir, output_dir, batch_size, "--checkpointing_steps", "100", *extra)
        return [str(NO_CLIPPING) if previous == "--max_grad_norm" else a for previous, a in zip([None] + args, args)]

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    train(parse_args(arguments(single, 4)))
    _launch_deepspeed("starflow_diffusers.training.train_lora", arguments(
        sharded, 2, "--validation_prompt", "a red circle moving left", "--validation_steps", "4"), tmp_path, zero_stage)
    _assert_same_curves(_losses(single), _losses(sharded), ("loss", "bits_per_dim", "denoiser_loss"))
    lora = StarFlowVPipeline.lora_state_dict(str(sharded))
    assert any(k.startswith("transformer.denoiser.") for k in lora)
    _assert_equal_tensors(StarFlowVPipeline.lora_state_dict(str(single)), lora, atol=1e-6)
    assert os.listdir(sharded / "validation") == ["step-000004.mp4"]
