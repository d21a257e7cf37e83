"""What a diffusers user expects of every STARFlow pipeline, checked through the public API (as diffusers'
own pipeline test mixins do): a batched call gives the clips of single calls with the default scheduler."""

import pytest
import torch

from starflow_diffusers import (
    BUNDLED_MODEL,
    JacobiFlowScheduler,
    StarFlowPipeline,
    StarFlowVImageToVideoPipeline,
    StarFlowVPipeline,
    StarFlowVVideoToVideoPipeline,
)
from starflow_diffusers.testing_utils import tiny_image_pipeline_components, tiny_pipeline_components


PROMPTS = ["a red circle moving left", "a blue square on the beach"]
# A loose threshold makes sequences of a batch converge at different iterations in a tiny model, which is
# where a batch can couple them (by ~0.2 here with the original's batch-wide rule, or when a converged
# sequence is not replayed exactly); the convergence rule is the default's.
LOOSE = dict(threshold=0.1, block_size=4)


def _pipeline(pipeline_class, image=False):
    components = tiny_image_pipeline_components(with_vae=False) if image else tiny_pipeline_components(with_vae=False)
    components["scheduler"] = JacobiFlowScheduler.from_config(components["scheduler"].config, **LOOSE)
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _video_inputs(name, batch):
    """Per-sample conditioning inputs of each video pipeline, (B, ...) model-space latents."""
    noise = torch.randn(batch, 3, 3, 2, 2, generator=torch.Generator().manual_seed(7))
    if name == "i2v":
        return dict(image_latents=noise[:, :, :1])
    if name == "v2v":
        return dict(video_latents=noise, strength=0.5)
    return {}


@pytest.mark.parametrize("name, pipeline_class", [
    ("t2v", StarFlowVPipeline), ("i2v", StarFlowVImageToVideoPipeline), ("v2v", StarFlowVVideoToVideoPipeline),
])
def test_a_batched_video_call_equals_single_calls(name, pipeline_class):
    pipe = _pipeline(pipeline_class)
    kwargs = dict(height=2, width=2, guidance_scale=2.0, output_type="latent")
    if name != "v2v":
        kwargs["num_frames"] = 3
    inputs = _video_inputs(name, 2)
    batched = pipe(prompt=PROMPTS, generator=_generators([1, 2]), **inputs, **kwargs).frames
    singles = [
        pipe(prompt=prompt, generator=_generators([seed])[0], **{k: v[i : i + 1] if torch.is_tensor(v) else v
                                                           for k, v in inputs.items()}, **kwargs).frames
        for i, (prompt, seed) in enumerate(zip(PROMPTS, [1, 2]))
    ]
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=1e-5)


def test_a_batched_image_call_equals_single_calls():
    pipe = _pipeline(StarFlowPipeline, image=True)
    kwargs = dict(height=4, width=4, guidance_scale=2.0, output_type="latent")
    batched = pipe(PROMPTS, generator=_generators([1, 2]), **kwargs).images
    singles = [pipe(p, generator=_generators([s])[0], **kwargs).images for p, s in zip(PROMPTS, [1, 2])]
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=1e-5)


def test_the_original_batch_rule_is_an_explicit_setting_and_couples_the_batch():
    pipe = _pipeline(StarFlowVPipeline)
    pipe.scheduler = JacobiFlowScheduler.from_config(pipe.scheduler.config, convergence="batch")
    kwargs = dict(height=2, width=2, num_frames=3, guidance_scale=2.0, output_type="latent")
    batched = pipe(PROMPTS, generator=_generators([1, 2]), **kwargs).frames
    singles = [pipe(p, generator=_generators([s])[0], **kwargs).frames for p, s in zip(PROMPTS, [1, 2])]
    assert (batched - torch.cat(singles)).abs().max() > 1e-4


@pytest.mark.slow
def test_the_bundled_model_gives_the_same_clip_in_a_batch():
    pipe = StarFlowVPipeline.from_pretrained(BUNDLED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=5, guidance_scale=3.0, output_type="pt")
    prompts = ["a red circle moving right", "a white square moving up and a cyan triangle moving left"]
    batched = pipe(prompts, generator=_generators([0, 1]), **kwargs).frames
    alone = pipe(prompts[0], generator=_generators([0])[0], **kwargs).frames
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-4)


# ---- a pipeline's meaning does not depend on which components are loaded ---------------------------------


@pytest.fixture(scope="module")
def saved_latent_pipeline(tmp_path_factory):
    """A tiny latent (Wan-VAE) pipeline with every template line on, saved as a folder."""
    pipe = StarFlowVPipeline(**tiny_pipeline_components(), aspect_ratio_conditioning=True)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder)
    return pipe, folder


def test_encode_prompt_of_a_text_only_pipeline_loaded_from_a_folder(saved_latent_pipeline):
    """The template's noise level, padding length and sizes are in the pipeline's config: a pipeline loaded
    with only its tokenizer and text encoder encodes exactly as the whole pipeline (and as its `__call__`)."""
    pipe, folder = saved_latent_pipeline
    assert pipe.config.noise_level_conditioning and pipe.config.fps_conditioning
    text_only = StarFlowVPipeline.from_pretrained(folder, transformer=None, vae=None)
    assert text_only.transformer is None and text_only.config.noise_level == pipe.transformer.config.noise_std
    assert text_only.apply_prompt_template(["a dog"], 16, "1:1") == pipe.apply_prompt_template(["a dog"], 16, "1:1")
    for (got, expected) in zip(text_only.encode_prompt("a red circle", "blurry"), pipe.encode_prompt("a red circle", "blurry")):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_latent_model_loaded_without_its_vae_keeps_its_sizes(saved_latent_pipeline, tmp_path):
    pipe, folder = saved_latent_pipeline
    vae = pipe.vae.config
    without_vae = StarFlowVPipeline.from_pretrained(folder, vae=None)
    without_vae.set_progress_bar_config(disable=True)
    factors = (without_vae.vae_scale_factor_temporal, without_vae.vae_scale_factor_spatial)
    assert factors == (vae.scale_factor_temporal, vae.scale_factor_spatial) != (1, 1)
    # the same call means the same latent video
    kwargs = dict(prompt="a red circle", height=32, width=32, num_frames=5, guidance_scale=2.0, output_type="latent")
    expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    got = without_vae(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert got.shape == expected.shape == (1, 48, 2, 2, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_type='np'.*VAE"):
        without_vae(**{**kwargs, "output_type": "np"})
    # saved again without the VAE and reloaded: still the same sizes
    without_vae.save_pretrained(tmp_path)
    again = StarFlowVPipeline.from_pretrained(tmp_path)
    assert again.vae is None
    assert (again.vae_scale_factor_temporal, again.vae_scale_factor_spatial) == factors


def test_a_latent_model_without_a_vae_or_configured_factors_falls_back_to_wan22():
    components = tiny_pipeline_components()
    components["vae"] = None
    pipe = StarFlowVPipeline(**components)
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 16)
    assert (StarFlowVPipeline(**tiny_pipeline_components(with_vae=False)).vae_scale_factor_spatial) == 1
    image = tiny_image_pipeline_components()
    image["vae"] = None
    assert StarFlowPipeline(**image).vae_scale_factor == 8


# ---- the prompt template has one owner --------------------------------------------------------------------


def test_template_words_cover_every_line_of_the_template():
    from starflow_diffusers.pipelines.prompt_template import (
        EXTEND_CAPTION_PREFIX,
        TEMPLATE_WORDS,
        V2V_CAPTION_PREFIX,
        format_prompt,
    )
    from starflow_diffusers.testing_utils import TINY_VOCABULARY
    from starflow_diffusers.training.text import word_level_tokenizer

    tokenizer = word_level_tokenizer(TEMPLATE_WORDS)
    texts = [
        format_prompt(EXTEND_CAPTION_PREFIX + V2V_CAPTION_PREFIX, fps=16, noise_level=0.5, aspect_ratio="16:9"),
        format_prompt("", fps=0),
    ]
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text).input_ids, text
    assert set(TEMPLATE_WORDS) <= set(TINY_VOCABULARY)


def test_the_pipelines_use_the_shared_template(saved_latent_pipeline):
    from starflow_diffusers.pipelines.prompt_template import format_prompt

    pipe, _ = saved_latent_pipeline
    expected = format_prompt("a dog", fps=8, noise_level=pipe.transformer.config.noise_std, aspect_ratio="4:5")
    assert pipe.apply_prompt_template(["a dog"], 8, "4:5") == [expected]
    image = StarFlowPipeline(**tiny_image_pipeline_components(), noise_level_conditioning=True, aspect_ratio_conditioning=True)
    assert image.apply_prompt_template(["a dog"], "1:1") == [format_prompt("a dog", noise_level=0.3, aspect_ratio="1:1")]


# ---- docstrings like diffusers' ----------------------------------------------------------------------------


def _example_code(pipeline_class) -> str:
    doc = pipeline_class.__call__.__doc__
    assert "Returns:" in doc and "```py" in doc, pipeline_class.__name__
    block = doc.split("```py", 1)[1].split("```", 1)[0]
    lines = [line.strip() for line in block.splitlines() if line.strip().startswith((">>>", "..."))]
    return "\n".join(line[4:] for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("pipeline_class", [StarFlowVPipeline, StarFlowVImageToVideoPipeline, StarFlowVVideoToVideoPipeline])
def test_the_call_example_runs_with_the_bundled_model(pipeline_class, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_example_code(pipeline_class), f"<{pipeline_class.__name__} example>", "exec"), {})
    videos = list(tmp_path.glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0


def test_the_image_example_is_valid_python():
    # it needs the converted 3B model, which cannot be downloaded here
    compile(_example_code(StarFlowPipeline), "<StarFlowPipeline example>", "exec")


@pytest.mark.parametrize("pipeline_class, name, value", [
    (StarFlowVPipeline, "noise_level", float("nan")),
    (StarFlowVPipeline, "noise_level", -0.1),
    (StarFlowVPipeline, "max_text_length", 0),
    (StarFlowVPipeline, "vae_scale_factor_spatial", 0),
    (StarFlowVPipeline, "vae_scale_factor_temporal", 2.5),
    (StarFlowVPipeline, "base_frame_size", -32),
    (StarFlowPipeline, "vae_scale_factor", "8"),
    (StarFlowPipeline, "noise_level", float("inf")),
])
def test_bad_pipeline_config_values_name_the_argument(pipeline_class, name, value):
    components = tiny_image_pipeline_components() if pipeline_class is StarFlowPipeline else tiny_pipeline_components()
    components["vae"] = None
    with pytest.raises(ValueError, match=f"`{name}`"):
        pipeline_class(**components, **{name: value})


@pytest.mark.parametrize("source_class, target_class, image", [
    (StarFlowVPipeline, StarFlowVImageToVideoPipeline, False),
    (StarFlowVImageToVideoPipeline, StarFlowVVideoToVideoPipeline, False),
    (StarFlowPipeline, StarFlowPipeline, True),
])
def test_from_pipe_keeps_every_component(source_class, target_class, image):
    """`from_pipe` switches a model component over only when it matches the new pipeline's type hints: the
    VAE was dropped before the signature named its class."""
    components = tiny_image_pipeline_components() if image else tiny_pipeline_components()
    source = source_class(**components)
    target = target_class.from_pipe(source)
    for name, component in source.components.items():
        assert getattr(target, name) is component, name
    assert target.vae is not None and target.config == source.config


def test_default_denoise_is_what_auto_means(monkeypatch):
    """The pipeline config's `default_denoise` resolves `denoise="auto"` (the bundled model's is "score")."""
    pipe = _pipeline(StarFlowVPipeline)
    assert pipe.config.default_denoise == "auto" and pipe._start_call(1.0, None, "auto") == "learned"
    for default in ("score", "none", "learned"):
        pipe.register_to_config(default_denoise=default)
        assert pipe._start_call(1.0, None, "auto") == default
        assert pipe._start_call(1.0, None, "none") == "none"  # an explicit mode wins
    bundled = StarFlowVPipeline.from_pretrained(BUNDLED_MODEL)
    assert bundled.config.default_denoise == "score" and bundled._start_call(3.0, None, "auto") == "score"
    image = _pipeline(StarFlowPipeline, image=True)
    assert image._start_call(1.0, None, "auto") == "score"
    with pytest.raises(ValueError, match="needs a model with a learned denoiser"):
        StarFlowPipeline(**tiny_image_pipeline_components(with_vae=False), default_denoise="learned")
    with pytest.raises(ValueError, match="`default_denoise` must be one of"):
        StarFlowVPipeline(**tiny_pipeline_components(with_vae=False), default_denoise="tweedie")
