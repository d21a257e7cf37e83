"""diffusers' memory and speed tools on the tiny pipeline: offloading (model, sequential, group), layerwise
casting to fp8, quantized loading, attention backends, fused projections, torch.compile, and the per-layer
KV cache.

On a CPU every device is the same one, so "the output is unchanged" alone cannot show that a hook ran. Each
test also shows the tool at work: weights on the `meta` device (sequential offload), weights that exist only
on disk until onloaded (group offload), counted hook and backend calls, and every weight use happening
inside the hooked forward."""

import copy

import pytest
import torch

from diffusers.hooks import apply_layerwise_casting
from diffusers.hooks import group_offloading
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

from starflow_diffusers import StarFlowVTransformer
from starflow_diffusers.models.transformer_starflow_v import (
    FrameBand,
    StarFlowAttention,
    StarFlowFlowBlock,
    StarFlowKVCache,
    denoiser_attention_mask,
    frame_band_attention,
)
from starflow_diffusers.testing_utils import tiny_pipeline, tiny_transformer


PROMPT = "a red circle moving left"


def sample(pipe, **kwargs):
    kwargs = dict(dict(height=2, width=2, num_frames=3, guidance_scale=3.0, output_type="latent"), **kwargs)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).frames


@pytest.fixture(scope="module")
def reference():
    """The plain pipeline's samples (3 frames in two windows, guidance, learned denoiser)."""
    return sample(tiny_pipeline(with_vae=False))


class WeightUses:
    """Counts calls of the transformer's parameterised leaf modules, inside and outside its own forward."""

    def __init__(self, transformer: torch.nn.Module):
        self.depth = self.inside = self.outside = 0
        transformer.register_forward_pre_hook(lambda *_: self._enter())
        transformer.register_forward_hook(lambda *_: self._leave())
        for module in transformer.modules():
            if list(module.parameters(recurse=False)):
                module.register_forward_pre_hook(lambda *_: self._use())

    def _enter(self):
        self.depth += 1

    def _leave(self):
        self.depth -= 1

    def _use(self):
        if self.depth > 0:
            self.inside += 1
        else:
            self.outside += 1


# ---- offloading --------------------------------------------------------------------------------------------


def test_model_cpu_offload_hook_sees_every_network_evaluation(reference):
    pipe = tiny_pipeline(with_vae=False)
    pipe.enable_model_cpu_offload(device="cpu")
    hook = pipe.transformer._hf_hook
    calls = []
    pre_forward = hook.pre_forward
    hook.pre_forward = lambda module, *args, **kwargs: calls.append(1) or pre_forward(module, *args, **kwargs)
    uses = WeightUses(pipe.transformer)
    out = sample(pipe)
    assert torch.equal(out, reference)
    # the offload hook ran, and no layer of the transformer ran outside the forward it wraps
    assert len(calls) > 10 and uses.inside > 0 and uses.outside == 0


def test_model_cpu_offload_of_the_image_pipeline():
    """The text-to-image pipeline shares the solve: its offload hook also sees every evaluation (the image
    model's score step and likelihood included)."""
    from starflow_diffusers import StarFlowPipeline
    from starflow_diffusers.testing_utils import tiny_image_pipeline_components

    def images(pipe):
        return pipe(PROMPT, height=8, width=8, guidance_scale=3.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    plain = StarFlowPipeline(**tiny_image_pipeline_components())
    plain.set_progress_bar_config(disable=True)
    pipe = StarFlowPipeline(**tiny_image_pipeline_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    uses = WeightUses(pipe.transformer)
    assert torch.equal(images(pipe), images(plain))
    assert uses.inside > 0 and uses.outside == 0


def test_sequential_offload_weights_live_on_meta_between_calls(reference):
    from accelerate import cpu_offload

    pipe = tiny_pipeline(with_vae=False)
    cpu_offload(pipe.transformer, execution_device="cpu")
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}
    # a weight read outside its module's forward (e.g. an SOS vector) would be a meta tensor here
    assert torch.equal(sample(pipe), reference)
    assert torch.equal(sample(pipe, denoise="score"), sample(tiny_pipeline(with_vae=False), denoise="score"))


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level", "block_level_denoiser_blocks"])
@pytest.mark.parametrize("to_disk", [False, True])
def test_group_offloading_onloads_every_group_it_uses(reference, offload_type, to_disk, tmp_path, monkeypatch):
    onloads = []
    onload = group_offloading.ModuleGroup.onload_
    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", lambda group: onloads.append(group) or onload(group))
    pipe = tiny_pipeline(with_vae=False)
    kwargs = dict(onload_device=torch.device("cpu"), offload_type=offload_type.replace("_denoiser_blocks", ""))
    if offload_type.startswith("block_level"):
        kwargs["num_blocks_per_group"] = 1
    if offload_type == "block_level_denoiser_blocks":
        # the denoiser's layers as groups too, so that a solve step does not onload the whole denoiser
        kwargs["block_modules"] = ["denoiser"]
    if to_disk:
        # weights are read back from safetensors files at onload: a group used without its hook computes with
        # stale or freed storage
        kwargs["offload_to_disk_path"] = str(tmp_path)
    pipe.transformer.enable_group_offload(**kwargs)
    assert torch.equal(sample(pipe), reference)
    onloaded = {id(module) for group in onloads for module in group.modules}
    if offload_type.startswith("block_level"):
        assert all(id(block) in onloaded for block in pipe.transformer.blocks)
    else:
        assert id(pipe.transformer.deep_block.proj_in) in onloaded and id(pipe.transformer.denoiser.proj_in) in onloaded


def test_pipeline_group_offload(reference):
    pipe = tiny_pipeline(with_vae=False)
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    assert torch.equal(sample(pipe), reference)


# ---- layerwise casting -------------------------------------------------------------------------------------


def _rounded_through(model: torch.nn.Module, cast: torch.nn.Module, storage_dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` whose layers that layerwise casting stores in `storage_dtype` in `cast` hold weights
    rounded through it: the same numbers the casting hooks compute with."""
    hooked = [
        name for name, module in cast.named_modules()
        if getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook.get_hook("layerwise_casting")
    ]
    assert hooked
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name in hooked:
            for param in rounded.get_submodule(name).parameters(recurse=False):
                param.copy_(param.to(storage_dtype).to(param.dtype))
    return rounded


@pytest.mark.parametrize("storage_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_layerwise_casting_to_fp8_computes_with_the_rounded_weights(storage_dtype, compute_dtype, monkeypatch):
    """fp8 storage changes the numbers only by the fp8 rounding of the weights: the result equals the model
    whose weights were rounded the same way, for sampling (deep and shallow blocks, learned denoiser), the
    score step and the likelihood. The KV caches are in the compute dtype."""
    caches = []
    init_cache = StarFlowFlowBlock.init_cache
    monkeypatch.setattr(StarFlowFlowBlock, "init_cache", lambda *a: caches.append(init_cache(*a)) or caches[-1])

    cast, rounded = tiny_pipeline(with_vae=False), tiny_pipeline(with_vae=False)
    cast.transformer.to(compute_dtype)
    rounded.transformer.to(compute_dtype)
    cast.transformer.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype)
    rounded.transformer = _rounded_through(rounded.transformer, cast.transformer, storage_dtype)
    linear = cast.transformer.deep_block.layers[0].attn.to_q
    assert linear.weight.dtype == storage_dtype and cast.transformer.dtype == compute_dtype
    # norms and SOS vectors are not layers diffusers casts: they keep the model dtype
    assert cast.transformer.deep_block.norm_out.weight.dtype == compute_dtype
    assert cast.transformer.deep_block.layers[0].norm1.weight.dtype == compute_dtype
    assert cast.transformer.deep_block.sos_embed.dtype == compute_dtype
    # the affine output projections are skipped (`_skip_layerwise_casting_patterns`)
    assert all(block.proj_out.weight.dtype == compute_dtype for block in cast.transformer.blocks)
    atol = 1e-6 if compute_dtype == torch.float32 else 1e-2
    for denoise in ("learned", "score"):
        caches.clear()
        out = sample(cast, denoise=denoise)
        cast_caches = list(caches)
        expected = sample(rounded, denoise=denoise)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    buffers = [t for cache in cast_caches for t in cache.layer_keys if t is not None]
    assert buffers and all(t.dtype == compute_dtype for t in buffers)
    x, text = torch.randn(2, 3, 3, 2, 2), torch.randn(2, 16, 16)
    with torch.no_grad():
        ours = cast.transformer(x.to(compute_dtype), text.to(compute_dtype))
        theirs = rounded.transformer(x.to(compute_dtype), text.to(compute_dtype))
    torch.testing.assert_close(ours.logdet, theirs.logdet, rtol=0, atol=1e-4 if compute_dtype == torch.float32 else 0.5)
    assert torch.isfinite(ours.logdet).all()
    # and the rounding is what changed the result: the full-precision model differs by more than that
    with torch.no_grad():
        full = tiny_pipeline(with_vae=False).transformer.to(compute_dtype)(x.to(compute_dtype), text.to(compute_dtype))
    assert (ours.logdet - full.logdet).abs().max() > 10 * (ours.logdet - theirs.logdet).abs().max()


# ---- quantization ------------------------------------------------------------------------------------------


def test_torchao_int8_quantized_transformer_loads_samples_and_scores(tmp_path):
    """`from_pretrained(..., quantization_config=TorchAoConfig(...))` (int8 weight-only, a backend that runs on
    CPU): the quantized model samples and scores like the float model holding its dequantized weights."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    plain = tiny_pipeline(with_vae=False)
    plain.transformer.save_pretrained(tmp_path)
    quantized = StarFlowVTransformer.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.float32
    )
    weight = quantized.deep_block.layers[0].attn.to_q.weight
    assert "Int8" in type(weight).__name__  # torchao's quantized tensor, not a float parameter
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, torch.nn.Linear):
                plain.transformer.get_submodule(name).weight.copy_(module.weight.dequantize())
    pipe = tiny_pipeline(with_vae=False, transformer=quantized)
    out = sample(pipe)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, sample(plain), rtol=0, atol=1e-4)
    video = torch.rand(1, 3, 3, 2, 2)
    bits = [
        p.log_likelihood(video, PROMPT, height=2, width=2, generator=torch.Generator().manual_seed(1)) for p in (pipe, plain)
    ]
    assert torch.isfinite(bits[0]).all()
    torch.testing.assert_close(bits[0], bits[1], rtol=0, atol=1e-4)


def test_pipeline_quantization_config_quantizes_the_transformer(tmp_path):
    """Pipeline-level `quantization_config` with `quant_mapping` (the `quant_backend=` form fails with
    transformers 5.24: its TorchAoConfig signature differs from diffusers')."""
    from diffusers import TorchAoConfig
    from diffusers.quantizers import PipelineQuantizationConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from starflow_diffusers import StarFlowVPipeline

    tiny_pipeline(with_vae=False).save_pretrained(tmp_path)
    config = PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())})
    pipe = StarFlowVPipeline.from_pretrained(tmp_path, quantization_config=config)
    pipe.set_progress_bar_config(disable=True)
    assert "Int8" in type(pipe.transformer.deep_block.layers[0].attn.to_q.weight).__name__
    assert torch.isfinite(sample(pipe)).all()


# ---- attention ---------------------------------------------------------------------------------------------


def _counting_backend(monkeypatch, name: AttentionBackendName, implementation=None):
    calls = []
    original = _AttentionBackendRegistry._backends[name]
    implementation = implementation or original

    def counted(**kwargs):
        calls.append(kwargs)
        return implementation(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counted)
    return calls


def test_set_attention_backend_is_honoured(reference, monkeypatch):
    # diffusers' `set_attention_backend` also sets the process-wide active backend, which
    # `reset_attention_backend` does not restore: restored here for the other tests
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    calls = _counting_backend(monkeypatch, AttentionBackendName._NATIVE_MATH)
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.set_attention_backend("_native_math")
    try:
        out = sample(pipe)
    finally:
        pipe.transformer.reset_attention_backend()
    assert len(calls) > 50
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_attention_backend_context_manager_is_honoured(reference, monkeypatch):
    calls = _counting_backend(monkeypatch, AttentionBackendName._NATIVE_MATH)
    pipe = tiny_pipeline(with_vae=False)
    with attention_backend("_native_math"):
        out = sample(pipe)
    assert len(calls) > 50
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def _lower_right_causal_sdpa(query, key, value, attn_mask=None, is_causal=False, **_):
    """A CPU stand-in with flash-attn's semantics: (B, S, H, E) tensors, `is_causal` aligned to the last key,
    no masks."""
    from torch.nn.attention.bias import causal_lower_right

    assert attn_mask is None, "flash-attn backends take no mask"
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    mask = causal_lower_right(q.shape[2], k.shape[2]) if is_causal else None
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def test_flash_backends_get_chunks_after_the_cache_as_plain_causal_calls(reference, monkeypatch):
    """A Jacobi chunk after its cached prefix is causal with a lower-right offset: flash-attn backends get it
    as `is_causal=True` with no dense mask (the stand-in asserts that)."""
    calls = _counting_backend(monkeypatch, AttentionBackendName.FLASH, _lower_right_causal_sdpa)
    pipe = tiny_pipeline(with_vae=False)
    for module in pipe.transformer.modules():
        if isinstance(module, StarFlowAttention):
            module.processor._attention_backend = AttentionBackendName.FLASH
    out = sample(pipe)
    assert any(c["is_causal"] and c["query"].shape[1] not in (1, c["key"].shape[1]) for c in calls)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_attention_mixin_and_fused_projections(reference):
    pipe = tiny_pipeline(with_vae=False)
    transformer = pipe.transformer
    attention_modules = [m for m in transformer.modules() if isinstance(m, StarFlowAttention)]
    assert len(transformer.attn_processors) == len(attention_modules)
    transformer.set_attn_processor(type(attention_modules[0].processor)())
    transformer.fuse_qkv_projections()
    assert all(m.fused_projections and hasattr(m, "to_qkv") for m in attention_modules)
    torch.testing.assert_close(sample(pipe), reference, rtol=0, atol=1e-5)
    transformer.unfuse_qkv_projections()
    assert not any(m.fused_projections or hasattr(m, "to_qkv") for m in attention_modules)


# ---- the denoiser's banded attention -----------------------------------------------------------------------


@pytest.mark.parametrize("text_length", [0, 4])
@pytest.mark.parametrize("frames", [1, 3, 6])
@pytest.mark.parametrize("window,lookahead", [(1, 0), (1, 1), (2, 1), (3, 0), (10**9, 1)])
def test_frame_band_attention_matches_the_dense_mask(text_length, frames, window, lookahead):
    per_frame = 5
    n = text_length + frames * per_frame
    g = torch.Generator().manual_seed(frames * 10 + window % 7)
    query, key, value = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    widths = []

    def attend(q, k, v):
        widths.append(k.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    band = FrameBand(text_length, per_frame, window, lookahead)
    out = frame_band_attention(query, key, value, band, attend).transpose(1, 2)
    mask = denoiser_attention_mask(text_length, frames, per_frame, window, lookahead)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)
    # no call sees more than the text and one band of frames: memory linear in the number of frames
    assert max(widths) <= text_length + min(frames, window + 1) * per_frame


def test_denoiser_builds_no_dense_mask(monkeypatch):
    import starflow_diffusers.models.transformer_starflow_v as module

    model = tiny_transformer(in_channels=3)
    x, text = torch.randn(1, 3, 4, 2, 2), torch.randn(1, 16, 16)
    with torch.no_grad():
        out = model.denoise(x, text)
    monkeypatch.setattr(module, "denoiser_attention_mask", None)  # a dense-mask path would now fail
    with torch.no_grad():
        assert torch.equal(model.denoise(x, text), out)


# ---- torch.compile -----------------------------------------------------------------------------------------


def test_compiled_transformer_does_not_recompile():
    """`torch.compile(transformer)`: a second call does not recompile, nor (with `dynamic=True`) do other
    sizes. (torch itself specialises sizes 0 and 1 and merges equal sizes of the first call: the sizes here avoid
    both.)"""
    model = tiny_transformer(in_channels=3)
    with torch.no_grad():
        for dynamic, shapes in ((False, [(2, 3, 4, 5, 6)] * 2), (True, [(2, 3, 4, 5, 6), (3, 3, 2, 6, 4), (4, 3, 5, 2, 3)])):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager", dynamic=dynamic)
            for index, shape in enumerate(shapes):
                x, text = torch.randn(shape), torch.randn(shape[0], 16, 16)
                with torch._dynamo.config.patch(error_on_recompile=index > 0):
                    out = compiled(x, text)
                torch.testing.assert_close(out.logdet, model(x, text).logdet, rtol=0, atol=1e-4)
    torch._dynamo.reset()


def test_repeated_blocks_are_declared():
    model = tiny_transformer(in_channels=3)
    names = {type(m).__name__ for m in model.modules()}
    assert set(StarFlowVTransformer._repeated_blocks) <= names
    assert set(StarFlowVTransformer._no_split_modules) <= names


# ---- per-layer KV cache ------------------------------------------------------------------------------------


def test_kv_cache_layers_are_allocated_where_and_as_they_are_written():
    cache = StarFlowKVCache(num_layers=2, batch_size=1, num_heads=2, max_length=8, head_dim=4)
    hidden = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    first = cache.layer(0, hidden)
    second = cache.layer(1, hidden, torch.device("meta"))
    assert first.keys.dtype == torch.bfloat16 and first.keys.device.type == "cpu"
    assert second.keys.device.type == "meta" and second.values.shape == (1, 2, 8, 4)
    assert cache.layer(0, hidden.float()).keys is first.keys  # allocated once


def test_a_model_dispatched_layer_by_layer_samples(reference, monkeypatch):
    """A model dispatched over devices (`device_map`) has accelerate hooks on its layers, each with its
    execution device; each layer's cache is allocated on that device. A CPU has one device, and accelerate's
    `dispatch_model` adds no hooks for a one-device map, so the test attaches the hooks it would add."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    pipe = tiny_pipeline(with_vae=False)
    layers = [m for m in pipe.transformer.modules() if type(m).__name__ == "StarFlowTransformerLayer"]
    for layer in layers:
        add_hook_to_module(layer, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
    devices = []
    layer_cache = StarFlowKVCache.layer
    monkeypatch.setattr(
        StarFlowKVCache, "layer", lambda cache, i, h, device=None: devices.append(device) or layer_cache(cache, i, h, device)
    )
    # (the hooks' input copies change memory layouts, hence float rounding)
    torch.testing.assert_close(sample(pipe), reference, rtol=0, atol=1e-5)
    assert devices and all(device == torch.device("cpu") for device in devices)
