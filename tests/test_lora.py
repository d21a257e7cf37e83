"""LoRA: the pipeline loader mixin (diffusers format, adapters, fusing) and `starflow-train-lora` end to end
on a tiny pixel-space model and the synthetic moving-shapes dataset."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors
import torch
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from starflow_diffusers import StarFlowPipeline, StarFlowVImageToVideoPipeline, StarFlowVPipeline, StarFlowVVideoToVideoPipeline
from starflow_diffusers.loaders import StarFlowVLoraLoaderMixin
from starflow_diffusers.testing_utils import tiny_pipeline, tiny_pipeline_components, tiny_transformer
from starflow_diffusers.training import synthetic
from starflow_diffusers.training.data import VideoCaptionDataset, read_video
from starflow_diffusers.training.train_lora import parse_args, resolve_target_modules, train


DEEP = "blocks.2.layers"  # the tiny model's deep block
TARGETS = [f"{DEEP}.0.attn.to_q", f"{DEEP}.0.attn.to_v", f"{DEEP}.1.ff.net.2"]


def _pipe():
    return tiny_pipeline(with_vae=False)


def _add_random_lora(transformer, name, rank=4, alpha=8, seed=1):
    torch.manual_seed(seed)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False), adapter_name=name
    )


def _forward(transformer):
    x = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return transformer(x, text).sample


def _save(transformer, name, directory):
    StarFlowVPipeline.save_lora_weights(
        directory, get_peft_model_state_dict(transformer, adapter_name=name),
        transformer_lora_adapter_metadata=transformer.peft_config[name].to_dict(),
    )
    return os.path.join(directory, "pytorch_lora_weights.safetensors")


# ---- loader mixin ----------------------------------------------------------------------------------------------


def test_every_starflow_pipeline_has_the_lora_mixin():
    for cls in (StarFlowVPipeline, StarFlowVImageToVideoPipeline, StarFlowVVideoToVideoPipeline, StarFlowPipeline):
        assert issubclass(cls, StarFlowVLoraLoaderMixin)
    assert StarFlowVPipeline._lora_loadable_modules == ["transformer"]


def test_save_and_load_keeps_alpha_and_the_output(tmp_path):
    source = _pipe()
    _add_random_lora(source.transformer, "style", rank=4, alpha=12)
    path = _save(source.transformer, "style", tmp_path)
    with safetensors.safe_open(path, "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    assert json.loads(header["lora_adapter_metadata"])["transformer.lora_alpha"] == 12
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

    target = _pipe()
    base = _forward(target.transformer)
    target.load_lora_weights(tmp_path, adapter_name="style")
    assert target.transformer.peft_config["style"].lora_alpha == 12  # not the rank: the metadata was used
    assert (_forward(target.transformer) - _forward(source.transformer)).abs().max() <= 1e-6
    assert (_forward(target.transformer) - base).abs().max() > 1e-4

    state, metadata = StarFlowVPipeline.lora_state_dict(tmp_path, return_lora_metadata=True)
    assert set(state) == set(keys) and metadata["transformer.r"] == 4


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_lora_files_like_diffusers_without_metadata(tmp_path, safe_serialization):
    """`save_lora_weights` with diffusers' signature: metadata optional, `safe_serialization=False` writes
    `pytorch_lora_weights.bin`. Without metadata the rank is inferred from the weights and alpha = rank."""
    source = _pipe()
    _add_random_lora(source.transformer, "a", rank=4, alpha=4)
    layers = get_peft_model_state_dict(source.transformer, adapter_name="a")
    StarFlowVPipeline.save_lora_weights(tmp_path, layers, safe_serialization=safe_serialization)
    name = "pytorch_lora_weights.safetensors" if safe_serialization else "pytorch_lora_weights.bin"
    assert os.listdir(tmp_path) == [name]
    target = _pipe()
    target.load_lora_weights(tmp_path, adapter_name="a")
    assert target.transformer.peft_config["a"].r == 4 and target.transformer.peft_config["a"].lora_alpha == 4
    assert (_forward(target.transformer) - _forward(source.transformer)).abs().max() <= 1e-6
    state = StarFlowVPipeline.lora_state_dict(tmp_path, use_safetensors=safe_serialization)
    assert set(state) == {f"transformer.{k}" for k in layers}


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_bin_lora_is_read_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"transformer.blocks.2.layers.0.attn.to_q.lora_A.weight": _Payload(str(marker))},
               tmp_path / "pytorch_lora_weights.bin")
    with pytest.raises(Exception):
        _pipe().load_lora_weights(tmp_path)
    assert not marker.exists()  # nothing but tensors was unpickled


def test_a_lora_without_transformer_keys_logs_diffusers_message_and_loads_nothing(monkeypatch):
    import diffusers.loaders.peft as peft_loader

    warnings = []
    monkeypatch.setattr(peft_loader.logger, "warning", lambda message, *a, **k: warnings.append(message))
    pipe = _pipe()
    before = _forward(pipe.transformer)
    pipe.load_lora_weights({"text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(2, 16)})
    assert any("No LoRA keys associated to StarFlowVTransformer" in w for w in warnings)
    assert not getattr(pipe.transformer, "peft_config", None)
    assert torch.equal(_forward(pipe.transformer), before)


def test_hotswap_and_low_cpu_mem_usage(tmp_path):
    """diffusers' hotswapping: a second LoRA of the same shape replaces the first in place (no new adapter)."""
    sources = []
    for seed, folder in ((1, tmp_path / "a"), (2, tmp_path / "b")):
        source = _pipe()
        _add_random_lora(source.transformer, "x", rank=4, alpha=8, seed=seed)
        _save(source.transformer, "x", folder)
        sources.append(source)
    target = _pipe()
    target.enable_lora_hotswap(target_rank=4)
    target.load_lora_weights(tmp_path / "a", adapter_name="x", low_cpu_mem_usage=True)
    torch.testing.assert_close(_forward(target.transformer), _forward(sources[0].transformer), rtol=0, atol=1e-6)
    target.load_lora_weights(tmp_path / "b", adapter_name="x", hotswap=True)
    assert list(target.transformer.peft_config) == ["x"]
    torch.testing.assert_close(_forward(target.transformer), _forward(sources[1].transformer), rtol=0, atol=1e-6)


def test_bad_lora_files_and_names_are_refused(tmp_path):
    transformer = _pipe().transformer
    _add_random_lora(transformer, "a")
    layers = get_peft_model_state_dict(transformer, adapter_name="a")
    with pytest.raises(ValueError, match="must end with .bin"):
        StarFlowVPipeline.save_lora_weights(tmp_path, layers, weight_name="x.safetensors", safe_serialization=False)
    with pytest.raises(ValueError, match="is empty"):
        StarFlowVPipeline.save_lora_weights(tmp_path, {})
    with pytest.raises(ValueError, match="lora"):
        _pipe().load_lora_weights({"transformer.blocks.2.proj_in.weight": torch.zeros(2, 2)})


def test_load_lora_weights_changes_the_sample(tmp_path):
    source = _pipe()
    _add_random_lora(source.transformer, "style", seed=3)
    _save(source.transformer, "style", tmp_path)

    def sample(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe("a red circle moving left", height=4, width=4, num_frames=2, generator=generator, output_type="pt").frames

    pipe = _pipe()
    before = sample(pipe)
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    after = sample(pipe)
    assert after.shape == before.shape and (after - before).abs().max() > 1e-3
    pipe.unload_lora_weights()
    assert (sample(pipe) - before).abs().max() <= 1e-6


def _base_weights(transformer):
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" not in n}


def test_fuse_then_unfuse_restores_the_weights(tmp_path):
    source = _pipe()
    _add_random_lora(source.transformer, "style")
    _save(source.transformer, "style", tmp_path)
    pipe = _pipe()
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    original, with_lora = _base_weights(pipe.transformer), _forward(pipe.transformer)

    pipe.fuse_lora(lora_scale=1.0)
    assert pipe.num_fused_loras == 1
    fused = _base_weights(pipe.transformer)
    assert max((fused[n] - original[n]).abs().max().item() for n in original) > 1e-4
    assert (_forward(pipe.transformer) - with_lora).abs().max() <= 1e-5  # merged layers skip the LoRA branch

    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    restored = _base_weights(pipe.transformer)
    assert max((restored[n] - original[n]).abs().max().item() for n in original) <= 1e-6
    assert (_forward(pipe.transformer) - with_lora).abs().max() <= 1e-6


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`", "ignore:Adapter one was active")
def test_two_adapters_combine_with_set_adapters(tmp_path):
    source = _pipe()
    _add_random_lora(source.transformer, "one", seed=1)
    _add_random_lora(source.transformer, "two", seed=2)
    _save(source.transformer, "one", tmp_path / "one")
    _save(source.transformer, "two", tmp_path / "two")

    pipe = _pipe()
    base = _forward(pipe.transformer)
    pipe.load_lora_weights(tmp_path / "one", adapter_name="one")
    pipe.load_lora_weights(tmp_path / "two", adapter_name="two")
    assert pipe.get_list_adapters() == {"transformer": ["one", "two"]}

    # each adapted layer adds w1 * delta_one + w2 * delta_two to its base output
    layer = pipe.transformer.get_submodule(TARGETS[0])
    assert isinstance(layer, BaseTunerLayer)
    x = torch.randn(5, layer.in_features)

    def delta(names, weights):
        pipe.set_adapters(names, weights)
        with torch.no_grad():
            return layer(x) - layer.base_layer(x)

    d_one, d_two = delta(["one"], [1.0]), delta(["two"], [1.0])
    combined = delta(["one", "two"], [0.7, -0.4])
    assert (combined - (0.7 * d_one - 0.4 * d_two)).abs().max() <= 1e-5
    both = _forward(pipe.transformer)
    pipe.set_adapters("one")
    assert (both - _forward(pipe.transformer)).abs().max() > 1e-5

    pipe.disable_lora()
    assert (_forward(pipe.transformer) - base).abs().max() <= 1e-6
    pipe.enable_lora()
    pipe.delete_adapters("one")
    assert pipe.get_list_adapters() == {"transformer": ["two"]}
    pipe.unload_lora_weights()
    assert (_forward(pipe.transformer) - base).abs().max() <= 1e-6


# ---- trainer -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A pixel-space pipeline whose 4x4 patches keep a 32x32, 9-frame clip at 576 tokens."""
    components = tiny_pipeline_components(with_vae=False)
    components["transformer"] = tiny_transformer(
        in_channels=3, patch_size=4, sample_size=8, trained_latent_frames=9, max_text_length=24
    )
    # no fps / aspect lines in the prompt, so that the tiny 24-token text window keeps the caption
    pipe = StarFlowVPipeline(**components, fps_conditioning=False, aspect_ratio_conditioning=False)
    path = tmp_path_factory.mktemp("tiny_model")
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "data"
    synthetic.write_dataset(str(path), num_train=32, num_test=8, size=32, num_frames=9)
    return str(path)


def _train_args(model_dir, data_dir, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", model_dir, "--data_dir", data_dir, "--output_dir", str(output_dir),
        "--height", "32", "--width", "32", "--num_frames", "9", "--fps", "16", "--rank", "4", "--report_to", "none",
        *extra,
    ]


def _error_of(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    return capsys.readouterr().err


def test_bad_inputs_fail_early_with_clear_errors(tiny_model_dir, shapes_dir, tmp_path, capsys):
    train_dir = os.path.join(shapes_dir, "train")
    assert "--rank must be > 0" in _error_of(_train_args(tiny_model_dir, train_dir, tmp_path, "--rank", "0"), capsys)
    for flag, value in (("--learning_rate", "nan"), ("--lora_alpha", "inf"), ("--max_grad_norm", "nan")):
        assert f"{flag} must be a finite number" in _error_of(_train_args(tiny_model_dir, train_dir, tmp_path, flag, value), capsys)
    err = _error_of(_train_args(tiny_model_dir, train_dir, tmp_path, "--validation_guidance_scale", "0.5"), capsys)
    assert "--validation_guidance_scale must be >= 1" in err
    missing = str(tmp_path / "no-such-model")
    assert "is not a directory" in _error_of(_train_args(missing, train_dir, tmp_path), capsys)
    (tmp_path / "empty").mkdir()
    assert "holds no videos" in _error_of(_train_args(tiny_model_dir, str(tmp_path / "empty"), tmp_path), capsys)

    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    shutil.copy(os.path.join(train_dir, "00000.mp4"), uncaptioned / "clip.mp4")
    assert "have no caption" in _error_of(_train_args(tiny_model_dir, str(uncaptioned), tmp_path), capsys)

    err = _error_of(_train_args(tiny_model_dir, train_dir, tmp_path, "--target_modules", "to_q", "qkv"), capsys)
    assert "'qkv'" in err and "to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2" in err
    err = _error_of(_train_args(tiny_model_dir, train_dir, tmp_path, "--lr_scheduler", "exotic"), capsys)
    assert "cosine" in err
    err = _error_of(_train_args(tiny_model_dir, train_dir, tmp_path, "--resume_from_checkpoint", str(tmp_path)), capsys)
    assert "checkpoint-<step>" in err

    transformer = StarFlowVPipeline.from_pretrained(tiny_model_dir).transformer
    with pytest.raises(ValueError, match=r"blocks\.9\.layers\.0\.attn\.to_q.*blocks\.0\.proj_in"):
        resolve_target_modules(transformer, ["blocks.9.layers.0.attn.to_q"], train_denoiser=False)
    default = resolve_target_modules(transformer, None, train_denoiser=False)
    assert len(default) == 2 * 6 and all(p.startswith(DEEP) for p in default)
    with_denoiser = resolve_target_modules(transformer, ["to_q"], train_denoiser=True)
    assert with_denoiser == sorted(
        [f"{DEEP}.0.attn.to_q", f"{DEEP}.1.attn.to_q", "denoiser.layers.0.attn.to_q", "denoiser.layers.1.attn.to_q"]
    )


def _heldout_bits_per_dim(model_dir, data_dir, lora_dir=None):
    pipe = StarFlowVPipeline.from_pretrained(model_dir)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    dataset = VideoCaptionDataset(os.path.join(data_dir, "test"), 32, 32, num_frames=9, fps=16)
    pixels = torch.stack([dataset[i]["pixels"] for i in range(len(dataset))])
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    generator = torch.Generator().manual_seed(1234)
    out = pipe.invert(latents=pixels, prompt=captions, noise_augment=True, generator=generator, fps=16)
    return out.bits_per_dim.mean().item()


@pytest.mark.slow
def test_thirty_lora_steps_lower_heldout_bits_per_dim(tiny_model_dir, shapes_dir, tmp_path):
    output_dir = tmp_path / "lora"
    lora_path = train(parse_args(_train_args(
        tiny_model_dir, os.path.join(shapes_dir, "train"), output_dir, "--max_train_steps", "30",
        "--train_batch_size", "2", "--learning_rate", "2e-3", "--checkpointing_steps", "1000", "--train_denoiser",
        "--validation_prompt", "a red circle moving left", "--validation_steps", "30",
    )))
    assert lora_path == str(output_dir / "pytorch_lora_weights.safetensors") and os.path.isfile(lora_path)
    assert os.listdir(output_dir / "validation") == ["step-000030.mp4"]
    assert read_video(str(output_dir / "validation" / "step-000030.mp4"), 9, None).shape == (9, 32, 32, 3)
    base = _heldout_bits_per_dim(tiny_model_dir, shapes_dir)
    tuned = _heldout_bits_per_dim(tiny_model_dir, shapes_dir, output_dir)
    print(f"\nheld-out bits/dim: base {base:.4f}, after 30 LoRA steps {tuned:.4f}")
    assert tuned < base


def _lora_tensors(directory):
    return StarFlowVPipeline.lora_state_dict(str(directory))


@pytest.mark.slow
def test_resume_is_exact(tiny_model_dir, shapes_dir, tmp_path):
    extra = [
        "--max_train_steps", "20", "--checkpointing_steps", "10", "--gradient_accumulation_steps", "2",
        "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3",
        "--caption_dropout", "0.3", "--drop_first_frame", "0.3", "--train_denoiser",
    ]
    data_dir = os.path.join(shapes_dir, "train")
    full = tmp_path / "full"
    train(parse_args(_train_args(tiny_model_dir, data_dir, full, *extra)))

    # a run that stopped after step 10 (and was killed while writing its next checkpoint)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-10", resumed / "checkpoint-10")
    (resumed / ".checkpoint-15.tmp").mkdir()
    train(parse_args(_train_args(tiny_model_dir, data_dir, resumed, *extra, "--resume_from_checkpoint", "latest")))

    assert not (resumed / ".checkpoint-15.tmp").exists()
    expected, actual = _lora_tensors(full), _lora_tensors(resumed)
    assert set(expected) == set(actual) and any(k.startswith("transformer.denoiser.") for k in expected)
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= 1e-6
    # and training did move the weights away from the step-10 state
    halfway = _lora_tensors(full / "checkpoint-10")
    assert max((expected[k] - halfway[k]).abs().max().item() for k in expected) > 1e-4


@pytest.mark.slow
def test_two_process_cpu_launch_saves_one_lora(tiny_model_dir, shapes_dir, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "starflow_diffusers.training.train_lora",
        *_train_args(tiny_model_dir, os.path.join(shapes_dir, "train"), output_dir, "--max_train_steps", "4",
                     "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--cache_latents"),
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = [os.path.relpath(os.path.join(root, f), output_dir) for root, _, files in os.walk(output_dir)
             for f in files if f.endswith(".safetensors")]
    assert sorted(saved) == ["checkpoint-4/pytorch_lora_weights.safetensors", "pytorch_lora_weights.safetensors"]
    assert _lora_tensors(output_dir)
