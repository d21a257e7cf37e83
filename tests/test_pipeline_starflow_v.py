"""StarFlowVPipeline: the contract diffusers' pipeline tests check, on tiny in-memory components.

32x32 frames and 5 pixel frames (2 latent frames of 2x2 latents, 4 tokens each) keep every call well under a
second on CPU; comparisons that do not need pixels use `output_type="latent"` to skip the VAE.
"""

import logging
import math

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from starflow_diffusers import JacobiFlowScheduler, StarFlowVPipeline
from starflow_diffusers.models.transformer_starflow_v import DENOISER_STEP, StarFlowFlowBlock
from starflow_diffusers.testing_utils import tiny_pipeline, tiny_pipeline_components, tiny_transformer

PIPELINE_LOGGER = "starflow_diffusers"  # the pipeline modules log under the package
SIZE = dict(height=32, width=32, num_frames=5)
LATENT_SHAPE = (48, 2, 2, 2)  # (C, T_lat, H/16, W/16)


@pytest.fixture
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def shared_components():
    """Components shared by tests that only build pipelines around them (argument checks, templates)."""
    return tiny_pipeline_components()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def noise(batch=1, latent_frames=2, seed=0):
    return torch.randn(batch, 48, latent_frames, 2, 2, generator=gen(seed))


def run(pipe, prompt="a red circle moving left", **kwargs):
    kwargs = {**SIZE, **kwargs}
    if "latents" not in kwargs:
        kwargs.setdefault("generator", gen(0))
    return pipe(prompt, **kwargs).frames


def max_diff(a, b):
    return float((torch.as_tensor(np.asarray(a)) - torch.as_tensor(np.asarray(b))).abs().max())


# ---- outputs -----------------------------------------------------------------------------------------------


def test_output_types():
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode="sequential"))  # batch-consistent to float precision
    video = run(pipe, ["a red circle", "a blue square"])
    assert isinstance(video, np.ndarray) and video.dtype in (np.float32, np.float64)
    assert video.shape == (2, 5, 32, 32, 3)
    assert np.isfinite(video).all() and video.min() >= 0 and video.max() <= 1
    assert video.std() > 0

    latents = run(pipe, ["a red circle", "a blue square"], output_type="latent")
    assert isinstance(latents, torch.Tensor) and latents.shape == (2, *LATENT_SHAPE)
    # the latent output is what the VAE decodes into the pixel output
    with torch.no_grad():
        decoded = pipe.decode_latents(latents, "np")
    assert max_diff(decoded, video) < 1e-5

    # batch of one with the same generator: the first video (the noise is drawn for the whole batch)
    noise0 = torch.randn(2, *LATENT_SHAPE, generator=gen(0))[:1]
    pt = run(pipe, "a red circle", latents=noise0, output_type="pt")
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 5, 3, 32, 32)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), video[:1], atol=1e-5)

    pil = run(pipe, "a red circle", latents=noise0, output_type="pil")
    assert isinstance(pil, list) and len(pil) == 1 and isinstance(pil[0], list) and len(pil[0]) == 5
    assert all(isinstance(f, PIL.Image.Image) and f.size == (32, 32) and f.mode == "RGB" for f in pil[0])
    pil_array = np.stack([np.asarray(f) for f in pil[0]]).astype(np.float64)
    assert np.abs(pil_array - video[0] * 255).max() <= 1.0


def test_return_dict_false_and_determinism(pipe):
    out = pipe("a red circle", generator=gen(3), output_type="latent", **SIZE)
    assert out.frames.shape == (1, *LATENT_SHAPE)
    tup = pipe("a red circle", generator=gen(3), output_type="latent", return_dict=False, **SIZE)
    assert isinstance(tup, tuple) and len(tup) == 1
    assert torch.equal(tup[0], out.frames)
    again = pipe("a red circle", generator=gen(3), output_type="latent", **SIZE).frames
    assert torch.equal(again, out.frames)
    other = pipe("a red circle", generator=gen(4), output_type="latent", **SIZE).frames
    assert max_diff(other, out.frames) > 1e-2
    # given latents are the noise the generator would draw
    same = pipe("a red circle", latents=torch.randn(1, *LATENT_SHAPE, generator=gen(3)), output_type="latent").frames
    torch.testing.assert_close(same, out.frames, rtol=0, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    pipe = tiny_pipeline(
        scheduler_kwargs=dict(mode="sequential"),
        fps_conditioning=False,
        noise_level_conditioning=True,
        aspect_ratio_conditioning=False,
        default_aspect_ratio="1:1",
        base_frame_size=32,
        latent_temporal_scale=0.5,
        max_text_length=12,
    )
    expected = pipe("a red circle", generator=gen(1), num_frames=5).frames
    assert expected.shape == (1, 5, 32, 32, 3)  # default size from "1:1" and base 32
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "model_index.json").is_file()
    loaded = StarFlowVPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for key, value in dict(
        fps_conditioning=False, noise_level_conditioning=True, aspect_ratio_conditioning=False,
        default_aspect_ratio="1:1", base_frame_size=32, latent_temporal_scale=0.5, max_text_length=12,
    ).items():
        assert loaded.config[key] == value, key
    assert isinstance(loaded.scheduler, JacobiFlowScheduler) and loaded.scheduler.config.mode == "sequential"
    assert loaded.transformer.config.trained_latent_frames == pipe.transformer.config.trained_latent_frames
    out = loaded("a red circle", generator=gen(1), num_frames=5).frames
    np.testing.assert_array_equal(out, expected)


def test_components(pipe):
    assert set(pipe.components) == {"transformer", "scheduler", "tokenizer", "text_encoder", "vae"}
    rebuilt = StarFlowVPipeline(**pipe.components)
    assert rebuilt.transformer is pipe.transformer and rebuilt.vae is pipe.vae


# ---- batching --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sequential", "jacobi"])
def test_batch_consistency(mode):
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode=mode))
    latents = noise(batch=2, seed=7)
    prompts = ["a red circle moving left", "a blue square on the beach"]
    batched = pipe(prompts, latents=latents, output_type="latent").frames
    singles = torch.cat(
        [pipe(p, latents=latents[i : i + 1], output_type="latent").frames for i, p in enumerate(prompts)]
    )
    if mode == "sequential":
        atol = 1e-5
    else:
        # each chunk stops once its batch-averaged relative residual is below the threshold
        atol = math.sqrt(pipe.scheduler.config.threshold) * float(singles.abs().max())
    torch.testing.assert_close(batched, singles, rtol=0, atol=atol)
    assert max_diff(batched[0], batched[1]) > 1e-2


def test_batch_consistency_pixels():
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode="sequential"))
    latents = noise(batch=2, seed=8)
    prompts = ["a red circle", "a dog running at sunset"]
    batched = pipe(prompts, latents=latents).frames
    singles = np.concatenate([pipe(p, latents=latents[i : i + 1]).frames for i, p in enumerate(prompts)])
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-5)


def test_num_videos_per_prompt_and_generator_list(pipe):
    prompts = ["a red circle", "a blue square"]
    generators = [gen(10 + k) for k in range(4)]
    out = pipe(prompts, num_videos_per_prompt=2, generator=generators, output_type="latent", **SIZE).frames
    assert out.shape == (4, *LATENT_SHAPE)
    # video k belongs to prompt k // 2 and uses generator k
    for k in range(4):
        single = pipe(prompts[k // 2], generator=gen(10 + k), output_type="latent", **SIZE).frames
        torch.testing.assert_close(out[k : k + 1], single, rtol=0, atol=1e-4)
    assert max_diff(out[0], out[1]) > 1e-2
    with pytest.raises(ValueError, match="generator"):
        pipe(prompts, num_videos_per_prompt=2, generator=generators[:3], output_type="latent", **SIZE)


# ---- guidance --------------------------------------------------------------------------------------------------


def test_classifier_free_guidance(pipe, monkeypatch):
    texts = []
    encode = pipe._encode_text
    monkeypatch.setattr(pipe, "_encode_text", lambda t, *a, **k: texts.append(list(t)) or encode(t, *a, **k))
    latents = noise(seed=2)
    off = pipe("a red circle", latents=latents, guidance_scale=1.0, output_type="latent").frames
    assert pipe.guidance_scale == 1.0 and pipe.do_classifier_free_guidance is False
    assert len(texts) == 1  # no negative prompt encoded without guidance
    on = pipe("a red circle", latents=latents, guidance_scale=4.5, output_type="latent").frames
    assert pipe.guidance_scale == 4.5 and pipe.do_classifier_free_guidance is True
    assert len(texts) == 3
    assert max_diff(on, off) > 1e-3
    negative = pipe(
        "a red circle", negative_prompt="a dog", latents=latents, guidance_scale=4.5, output_type="latent"
    ).frames
    assert max_diff(negative, on) > 1e-4


# ---- callbacks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, expected_chunks", [("sequential", 8), ("jacobi", 2)])
def test_callback_called_per_chunk(mode, expected_chunks):
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode=mode))
    calls = []

    def callback(p, index, timestep, kwargs):
        assert p is pipe
        calls.append((index, int(timestep), p.num_timesteps, tuple(kwargs["latents"].shape), p.guidance_scale))
        return {}

    pipe("a red circle", generator=gen(0), output_type="latent", callback_on_step_end=callback, **SIZE)
    assert pipe.num_timesteps == expected_chunks == len(calls)
    assert [c[0] for c in calls] == list(range(expected_chunks))
    assert [c[1] for c in calls] == [c.start for c in pipe.scheduler.chunks]
    assert all(c[2] == expected_chunks for c in calls)
    assert all(c[3] == (1, *LATENT_SHAPE) for c in calls)
    assert all(c[4] == 4.5 for c in calls)


def deep_block_forward(pipe, latents, prompt_embeds):
    """The deep block alone, data -> noise, on a fresh sequence ([text, sos, frames...], positions from 0)."""
    tr = pipe.transformer
    tokens = tr.patchify(latents)
    b, t, hp, wp, d = tokens.shape
    rotary = tr.rotary_embedding(t, hp, wp, prompt_embeds.shape[1])
    with torch.no_grad():
        z, _ = tr.deep_block(tokens.reshape(b, t, hp * wp, d), rotary, prompt_embeds)
    return tr.unpatchify(z.view(b, t, hp, wp, d))


def test_callback_latents_are_the_deep_block_state():
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode="sequential"))
    latents = noise(seed=3)
    prompt_embeds = torch.randn(1, 16, 16, generator=gen(4))
    seen = {}

    def callback(p, index, timestep, kwargs):
        seen[index] = kwargs["latents"].clone()
        return {}

    pipe(prompt_embeds=prompt_embeds, latents=latents, guidance_scale=1.0, denoise="none",
         output_type="latent", callback_on_step_end=callback)
    final = seen[pipe.num_timesteps - 1]
    # the deep block maps its solved input back to the noise (data -> noise, computed independently here)
    torch.testing.assert_close(deep_block_forward(pipe, final, prompt_embeds), latents, rtol=0, atol=1e-4)
    # after the first chunk only the first token (in the deep block's order) has moved away from the noise
    changed = (seen[0] != latents).flatten(3).any(1)  # (B, T, H*W) token positions
    assert int(changed.sum()) == 1


def test_callback_can_modify_latents(pipe):
    base = run(pipe, output_type="latent")

    def callback(p, index, timestep, kwargs):
        if index == 0:
            return {"latents": kwargs["latents"] * 0.5}
        return {}

    modified = run(pipe, output_type="latent", callback_on_step_end=callback)
    assert max_diff(modified, base) > 1e-3

    # a callback returning the latents unchanged changes nothing
    identity = run(pipe, output_type="latent", callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"]})
    torch.testing.assert_close(identity, base, rtol=0, atol=1e-6)


def test_callback_can_change_guidance_scale(pipe):
    base = run(pipe, output_type="latent", guidance_scale=4.5)
    lower = run(pipe, output_type="latent", guidance_scale=2.0)
    scales = []

    def callback(p, index, timestep, kwargs):
        scales.append(p.guidance_scale)
        p._guidance_scale = 2.0
        return {}

    switched = run(pipe, output_type="latent", guidance_scale=4.5, callback_on_step_end=callback)
    assert scales == [4.5, 2.0]
    assert max_diff(switched, base) > 1e-4
    assert max_diff(switched, lower) > 1e-4


def test_callback_can_switch_guidance_off(pipe):
    # regression: the [cond; uncond] batch reached scheduler.step with weight 0 and failed to broadcast
    base = run(pipe, output_type="latent", guidance_scale=4.5)

    def callback(p, index, timestep, kwargs):
        p._guidance_scale = 1.0
        return {}

    switched = run(pipe, output_type="latent", guidance_scale=4.5, callback_on_step_end=callback)
    assert switched.shape == base.shape and torch.isfinite(switched).all()
    assert max_diff(switched, base) > 1e-4


def test_callback_interrupt(pipe):
    pipe.scheduler = JacobiFlowScheduler.from_config(pipe.scheduler.config, mode="sequential")
    full = run(pipe, output_type="latent")
    calls = []

    def callback(p, index, timestep, kwargs):
        calls.append(index)
        if index == 2:
            p._interrupt = True
        return {}

    stopped = run(pipe, output_type="latent", callback_on_step_end=callback)
    assert calls == [0, 1, 2] and pipe.num_timesteps == 8
    assert pipe.interrupt is True
    assert stopped.shape == full.shape
    assert max_diff(stopped, full) > 1e-3
    # the flag is reset by the next call
    run(pipe, output_type="latent", callback_on_step_end=lambda p, i, t, k: calls.append(i) or {})
    assert len(calls) == 3 + 8 and pipe.interrupt is False


class HalveLatents(PipelineCallback):
    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.steps = getattr(self, "steps", []) + [step_index]
        if step_index == 0:
            callback_kwargs["latents"] = callback_kwargs["latents"] * 0.5
        return callback_kwargs


class RecordEmbeds(PipelineCallback):
    tensor_inputs = ["prompt_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.shapes = getattr(self, "shapes", []) + [tuple(callback_kwargs["prompt_embeds"].shape)]
        return callback_kwargs


def test_pipeline_callback_subclass(pipe):
    def halve(p, index, timestep, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if index == 0 else {}

    expected = run(pipe, output_type="latent", callback_on_step_end=halve)
    callback = HalveLatents()
    out = run(pipe, output_type="latent", callback_on_step_end=callback)
    assert callback.steps == list(range(pipe.num_timesteps))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)

    record = RecordEmbeds()
    multi = MultiPipelineCallbacks([HalveLatents(), record])
    out = run(pipe, output_type="latent", callback_on_step_end=multi)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert record.shapes == [(1, 16, 16)] * pipe.num_timesteps


def test_unknown_callback_tensor_input_raises(pipe):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(pipe, callback_on_step_end=lambda p, i, t, k: {}, callback_on_step_end_tensor_inputs=["noise"])


# ---- dtype -----------------------------------------------------------------------------------------------------


def test_bfloat16(pipe, monkeypatch):
    caches = []
    init_cache = StarFlowFlowBlock.init_cache

    def recording_init_cache(self, *args, **kwargs):
        cache = init_cache(self, *args, **kwargs)
        caches.append((self, cache))
        return cache

    monkeypatch.setattr(StarFlowFlowBlock, "init_cache", recording_init_cache)
    pipe.to(torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    video = run(pipe)
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()
    assert [block for block, _ in caches].count(pipe.transformer.deep_block) == 1
    assert len(caches) == len(pipe.transformer.blocks)
    buffers = [t for _, cache in caches for t in cache.layer_keys + cache.layer_values]
    assert len(buffers) > 0 and all(t.dtype == torch.bfloat16 for t in buffers)


# ---- prompts and embeddings ------------------------------------------------------------------------------------


def spec_template(text, fps, sigma, aspect, fps_cond=True, noise_cond=True, aspect_cond=True):
    """Spec section 6, steps 1-3 in order."""
    if fps_cond:
        text = "A video with " + str(fps) + " fps:\n" + text + "\n" if fps > 0 else "An image:\n" + text + "\n"
    if noise_cond:
        text = "Noise Level " + str(int(sigma * 1000)) + ":\n" + text
    if aspect_cond:
        text = text + "\n in a " + aspect + " aspect ratio.\n"
    return text


def test_prompt_embeds_path_reproduces_prompt_path(pipe):
    latents = noise(seed=5)
    prompt = "a corgi running on the beach"
    from_prompt = pipe(prompt, negative_prompt="a cat", latents=latents, fps=8, output_type="latent").frames
    # 32x32 frames: the closest trained aspect ratio is 1:1
    with torch.no_grad():  # as in __call__ (the T5 kernels differ by ~1e-6 with autograd on)
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompt, negative_prompt="a cat", do_classifier_free_guidance=True, fps=8, aspect_ratio="1:1"
        )
    assert prompt_embeds.shape == negative_embeds.shape == (1, 16, 16)
    from_embeds = pipe(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, latents=latents, output_type="latent"
    ).frames
    torch.testing.assert_close(from_embeds, from_prompt, rtol=0, atol=1e-6)
    # without negative embeddings the negative is "" through the same template (fps and aspect of the call)
    default_negative = pipe(prompt, latents=latents, fps=8, output_type="latent").frames
    from_embeds = pipe(prompt_embeds=prompt_embeds, latents=latents, fps=8, output_type="latent").frames
    torch.testing.assert_close(from_embeds, default_negative, rtol=0, atol=1e-6)
    assert max_diff(default_negative, from_prompt) > 1e-4
    # the template is part of the encoding: another fps gives other embeddings
    with torch.no_grad():
        other, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, fps=24, aspect_ratio="1:1")
    assert max_diff(other, prompt_embeds) > 1e-4
    # embeddings are zero on padding positions (masked); the templated prompt needs more than 16 tokens
    with torch.no_grad():
        long_embeds, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, fps=8, aspect_ratio="1:1", max_sequence_length=40
        )
    tokens = pipe.tokenizer(pipe.apply_prompt_template([prompt], 8, "1:1"), padding="max_length", max_length=40)
    mask = torch.tensor(tokens.attention_mask)[..., None]
    assert long_embeds.shape == (1, 40, 16) and 16 < int(mask.sum()) < 40
    assert torch.equal(long_embeds * (1 - mask), torch.zeros_like(long_embeds))
    assert (long_embeds * mask).abs().sum(-1)[mask[..., 0].bool()].min() > 0
    # num_videos_per_prompt repeats the embeddings
    with torch.no_grad():
        repeated, repeated_negative = pipe.encode_prompt(
            prompt, negative_prompt="a cat", num_videos_per_prompt=3, fps=8, aspect_ratio="1:1"
        )
    assert torch.equal(repeated, prompt_embeds.repeat(3, 1, 1))
    assert torch.equal(repeated_negative, negative_embeds.repeat(3, 1, 1))


def test_prompt_template_applies_to_negative_prompt(pipe, monkeypatch):
    texts = []
    encode = pipe._encode_text
    monkeypatch.setattr(pipe, "_encode_text", lambda t, *a, **k: texts.append(list(t)) or encode(t, *a, **k))
    # 48x32 frames: closest trained ratio 3:2; sigma of the tiny model: 0.5
    pipe("a red circle", fps=8, height=32, width=48, num_frames=5, output_type="latent", generator=gen(0))
    sigma = pipe.transformer.config.noise_std
    assert texts == [[spec_template("a red circle", 8, sigma, "3:2")], [spec_template("", 8, sigma, "3:2")]]
    assert texts[1][0] == "Noise Level 500:\nA video with 8 fps:\n\n\n in a 3:2 aspect ratio.\n"
    texts.clear()
    pipe(["a dog", "a cat"], negative_prompt=["blue", "red"], aspect_ratio="16:9", output_type="latent", **SIZE)
    assert texts == [
        [spec_template("a dog", 16, sigma, "16:9"), spec_template("a cat", 16, sigma, "16:9")],
        [spec_template("blue", 16, sigma, "16:9"), spec_template("red", 16, sigma, "16:9")],
    ]


@pytest.mark.parametrize(
    "flags", [(True, True, True), (False, True, True), (True, False, False), (False, False, False)]
)
@pytest.mark.parametrize("fps", [16, 0])
def test_apply_prompt_template_flags(shared_components, flags, fps):
    fps_cond, noise_cond, aspect_cond = flags
    pipe = StarFlowVPipeline(
        **shared_components,
        fps_conditioning=fps_cond, noise_level_conditioning=noise_cond, aspect_ratio_conditioning=aspect_cond,
    )
    sigma = pipe.transformer.config.noise_std
    out = pipe.apply_prompt_template(["a cat", ""], fps, "9:16")
    assert out == [spec_template(t, fps, sigma, "9:16", *flags) for t in ["a cat", ""]]


# ---- denoising -------------------------------------------------------------------------------------------------


def test_denoise_modes():
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode="sequential"))
    latents = noise(seed=6)
    prompt_embeds = torch.randn(1, 16, 16, generator=gen(6))
    outs = {
        mode: pipe(prompt_embeds=prompt_embeds, latents=latents, guidance_scale=1.0, denoise=mode,
                   output_type="latent").frames
        for mode in ("none", "learned", "score", "auto")
    }
    assert all(torch.isfinite(o).all() and o.shape == latents.shape for o in outs.values())
    tr = pipe.transformer
    # learned: x - 0.3 * denoiser(x, text), over the whole (short) video
    with torch.no_grad():
        expected_learned = outs["none"] - DENOISER_STEP * tr.denoise(outs["none"], prompt_embeds)
    torch.testing.assert_close(outs["learned"], expected_learned, rtol=0, atol=1e-5)
    assert max_diff(outs["learned"], outs["none"]) > 1e-3
    # score: one step x - sigma^2 * numel * grad(loss)
    x = outs["none"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tr.nll_loss(tr(x, prompt_embeds)), x)
    expected_score = outs["none"] - tr.config.noise_std**2 * x.numel() * grad
    torch.testing.assert_close(outs["score"], expected_score, rtol=0, atol=1e-4)
    assert max_diff(outs["score"], outs["none"]) > 1e-3
    # auto picks the learned denoiser when there is one
    torch.testing.assert_close(outs["auto"], outs["learned"], rtol=0, atol=0)


def test_denoise_without_learned_denoiser():
    pipe = tiny_pipeline(transformer=tiny_transformer(denoiser_num_layers=0))
    assert not pipe.transformer.has_denoiser
    with pytest.raises(ValueError, match="learned"):
        run(pipe, denoise="learned", output_type="latent")
    auto = run(pipe, denoise="auto", output_type="latent")
    score = run(pipe, denoise="score", output_type="latent")
    none = run(pipe, denoise="none", output_type="latent")
    torch.testing.assert_close(auto, score, rtol=0, atol=0)
    assert max_diff(score, none) > 1e-3


# ---- long videos -----------------------------------------------------------------------------------------------


def test_long_video_sliding_window():
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode="sequential"))
    assert pipe.transformer.config.trained_latent_frames == 2
    latents = noise(latent_frames=4, seed=9)
    video = pipe("a red circle moving left", generator=gen(9), num_frames=13, height=32, width=32).frames
    assert video.shape == (1, 13, 32, 32, 3) and np.isfinite(video).all()
    contexts = [c.context for c in pipe.scheduler.chunks if c.context is not None]
    assert pipe.scheduler.window_frames == 2 and contexts == [(4, 8), (8, 12)]
    assert pipe.scheduler.chunks[-1].end == 4 * 4
    # causal in time: the first window is the short video generated from the same noise
    long_latents = pipe("a red circle moving left", latents=latents, denoise="none", output_type="latent").frames
    short = pipe("a red circle moving left", latents=latents[:, :, :2], denoise="none", output_type="latent").frames
    assert long_latents.shape == latents.shape
    assert max_diff(long_latents[:, :, 2:], long_latents[:, :, :2]) > 1e-2
    torch.testing.assert_close(long_latents[:, :, :2], short, rtol=0, atol=1e-5)


def test_long_video_windows_invert_the_deep_block():
    """Spec section 5: each later window re-encodes the last `context_frames` solved frames with a fresh SOS and
    positions from 0, then solves the next frames; check every window with the deep block's own forward pass."""
    pipe = tiny_pipeline(scheduler_kwargs=dict(mode="sequential"))
    latents = noise(latent_frames=4, seed=11)
    prompt_embeds = torch.randn(1, 16, 16, generator=gen(11))
    seen = {}

    def callback(p, index, timestep, kwargs):
        seen["state"] = kwargs["latents"].clone()
        return {}

    pipe(prompt_embeds=prompt_embeds, latents=latents, guidance_scale=1.0, denoise="none", output_type="latent",
         callback_on_step_end=callback)
    window, context = 2, pipe.scheduler.config.context_frames
    assert pipe.scheduler.window_frames == window and context == 1
    state = seen["state"]
    # first window: frames [0, 2) from scratch
    z = deep_block_forward(pipe, state[:, :, :window], prompt_embeds)
    torch.testing.assert_close(z, latents[:, :, :window], rtol=0, atol=1e-4)
    # later windows: frame f is solved after the context frame f - 1 only
    for f in range(window, 4):
        z = deep_block_forward(pipe, state[:, :, f - context : f + 1], prompt_embeds)
        torch.testing.assert_close(z[:, :, context:], latents[:, :, f : f + 1], rtol=0, atol=1e-4)
    # whereas the full-length forward pass (no window) does not invert frames after the first window
    z = deep_block_forward(pipe, state, prompt_embeds)
    assert max_diff(z[:, :, window:], latents[:, :, window:]) > 1e-3


# ---- sizes -----------------------------------------------------------------------------------------------------


def test_sizes_are_rounded_with_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger=PIPELINE_LOGGER):
        latents = pipe(
            "a red circle", height=40, width=50, num_frames=7, generator=gen(0), denoise="none", output_type="latent"
        ).frames
    messages = " ".join(r.getMessage() for r in caplog.records if r.name.startswith(PIPELINE_LOGGER))
    assert "num_frames" in messages and "height" in messages and "width" in messages
    assert "32x48" in messages
    assert latents.shape == (1, 48, 2, 2, 3)  # 5 frames of 32x48 pixels
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=PIPELINE_LOGGER):
        latents = pipe(
            "a red circle", height=32, width=64, num_frames=9, generator=gen(0), denoise="none", output_type="latent"
        ).frames
    assert not [r for r in caplog.records if r.name.startswith(PIPELINE_LOGGER)]
    assert latents.shape == (1, 48, 3, 2, 4)


def spec_frame_size(aspect, base, multiple=16):
    w, h = (float(v) for v in aspect.split(":"))
    r = w / h
    return round(math.sqrt(base**2 / r) / multiple) * multiple, round(math.sqrt(base**2 * r) / multiple) * multiple


@pytest.mark.parametrize(
    "default_aspect_ratio, base_frame_size, call_aspect_ratio",
    [("16:9", None, None), ("1:2", 32, None), ("1:1", 48, None), ("1:1", 48, "2:1")],
)
def test_default_size(default_aspect_ratio, base_frame_size, call_aspect_ratio):
    pipe = tiny_pipeline(default_aspect_ratio=default_aspect_ratio, base_frame_size=base_frame_size)
    base = base_frame_size or pipe.transformer.config.sample_size * 16
    h, w = spec_frame_size(call_aspect_ratio or default_aspect_ratio, base)
    latents = pipe(
        "a red circle", aspect_ratio=call_aspect_ratio, generator=gen(0), denoise="none", output_type="latent"
    ).frames
    # default num_frames: the trained clip length (2 latent frames)
    assert latents.shape == (1, 48, 2, h // 16, w // 16)


# ---- bad inputs ------------------------------------------------------------------------------------------------


BAD_INPUTS = [
    ("empty_prompt_list", dict(prompt=[]), "prompt"),
    ("prompt_and_embeds", dict(prompt_embeds=torch.zeros(1, 16, 16)), "prompt_embeds"),
    ("neither", dict(prompt=None), "prompt"),
    ("embeds_2d", dict(prompt=None, prompt_embeds=torch.zeros(16, 16)), "prompt_embeds"),
    ("embeds_dim", dict(prompt=None, prompt_embeds=torch.zeros(1, 16, 8)), "prompt_embeds"),
    (
        "negative_embeds_shape",
        dict(prompt=None, prompt_embeds=torch.zeros(1, 16, 16), negative_prompt_embeds=torch.zeros(1, 12, 16)),
        "negative_prompt_embeds",
    ),
    (
        "negative_embeds_batch",
        dict(prompt=None, prompt_embeds=torch.zeros(1, 16, 16), negative_prompt_embeds=torch.zeros(2, 16, 16)),
        "negative_prompt_embeds",
    ),
    ("embeds_length", dict(prompt=None, prompt_embeds=torch.zeros(1, 12, 16)), "prompt_embeds"),
    ("negative_prompt_count", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt"),
    ("latents_channels", dict(latents=torch.zeros(1, 16, 2, 2, 2)), "latents"),
    ("latents_ndim", dict(latents=torch.zeros(1, 48, 2, 2)), "latents"),
    ("latents_size", dict(latents=torch.zeros(1, 48, 2, 4, 4), height=32, width=32), "latents"),
    ("latents_batch", dict(latents=torch.zeros(3, 48, 2, 2, 2)), "latents"),
    ("denoise", dict(denoise="gaussian"), "denoise"),
    ("output_type", dict(output_type="mp4"), "output_type"),
    ("height_zero", dict(height=0), "height"),
    ("width_negative", dict(width=-32), "width"),
    ("num_frames_zero", dict(num_frames=0), "num_frames"),
    ("height_below_cell", dict(height=8), "height"),
    ("width_below_cell", dict(width=15), "width"),
    ("guidance_below_one", dict(guidance_scale=0.5), "guidance_scale"),
    ("num_videos_zero", dict(num_videos_per_prompt=0), "num_videos_per_prompt"),
    ("aspect_ratio_word", dict(aspect_ratio="wide", height=None, width=None), "aspect_ratio"),
    ("aspect_ratio_zero", dict(aspect_ratio="16:0"), "aspect_ratio"),
]


@pytest.mark.parametrize("kwargs, name", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise(shared_components, kwargs, name):
    pipe = StarFlowVPipeline(**shared_components)
    kwargs = {"prompt": "a red circle", **SIZE, "output_type": "latent", **kwargs}
    with pytest.raises(ValueError, match=f"`{name}`"):
        pipe(**kwargs)


def test_bad_default_aspect_ratio_raises(shared_components):
    with pytest.raises(ValueError, match="aspect_ratio"):
        StarFlowVPipeline(**shared_components, default_aspect_ratio="square")


# ---- encode_prompt on its own (issue 18) ---------------------------------------------------------------------


def test_encode_prompt_runs_on_a_text_only_pipeline():
    """Embeddings can be cached with only the tokenizer and text encoder loaded; they come in the text
    encoder's dtype."""
    components = tiny_pipeline_components(with_vae=False)
    full = StarFlowVPipeline(**components)
    text_only = StarFlowVPipeline(
        transformer=None, scheduler=None, tokenizer=components["tokenizer"], text_encoder=components["text_encoder"],
        noise_level_conditioning=False, max_text_length=16, default_aspect_ratio="1:1",
    )
    full.register_to_config(noise_level_conditioning=False)
    embeds, negative = text_only.encode_prompt("a red circle moving left", aspect_ratio="1:1")
    expected, expected_negative = full.encode_prompt("a red circle moving left", aspect_ratio="1:1")
    assert embeds.dtype == components["text_encoder"].dtype
    # without a transformer the default ratio is the trained one closest to the configured default
    default, _ = text_only.encode_prompt("a red circle moving left")
    torch.testing.assert_close(default, embeds, rtol=0, atol=0)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    torch.testing.assert_close(negative, expected_negative, rtol=0, atol=0)


def test_cached_embeddings_reproduce_the_prompt_call():
    """`encode_prompt`'s defaults give exactly the conditioning of `__call__` at the default size (its aspect
    ratio line included), so a video from cached embeddings equals the one from the prompt."""
    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.to(torch.bfloat16)  # the embeddings stay in the text encoder's dtype; the solve casts
    latents = torch.randn(1, 3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    common = dict(latents=latents, guidance_scale=3.0, output_type="latent")
    from_prompt = pipe("a red circle moving left", **common).frames
    embeds, negative = pipe.encode_prompt("a red circle moving left")
    assert embeds.dtype == torch.float32
    from_embeds = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **common).frames
    torch.testing.assert_close(from_embeds, from_prompt, rtol=0, atol=0)
