"""Video-to-video (edit and prefix modes), inversion and likelihood on the STARFlow-V pipelines."""

import numpy as np
import PIL.Image
import pytest
import torch

from starflow_diffusers import JacobiFlowScheduler, StarFlowVPipeline, StarFlowVVideoToVideoPipeline
from starflow_diffusers.testing_utils import tiny_pipeline_components


@pytest.fixture(scope="module")
def pipe():
    components = tiny_pipeline_components()
    components["scheduler"] = JacobiFlowScheduler(block_size=4, threshold=1e-8, max_iterations=64, context_frames=1)
    pipe = StarFlowVVideoToVideoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(count=5, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def test_edit_at_zero_strength_returns_the_source(pipe):
    source = pipe.encode_video(_frames(), 32, 32, generator=torch.Generator().manual_seed(0))
    source = source + pipe.noise_std * torch.randn(source.shape, generator=torch.Generator().manual_seed(1))
    out = pipe(video_latents=source, prompt="a dog", strength=0.0, guidance_scale=1.0, denoise="none",
               output_type="latent", generator=torch.Generator().manual_seed(2)).frames
    assert out.shape == source.shape
    assert (out - source).abs().max() <= 1e-4


def test_edit_strength_moves_away_from_the_source(pipe):
    source = pipe.encode_video(_frames(), 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(video_latents=source, prompt="a dog", guidance_scale=1.0, denoise="none", output_type="latent")
    weak = pipe(strength=0.2, generator=torch.Generator().manual_seed(3), **kwargs).frames
    strong = pipe(strength=0.9, generator=torch.Generator().manual_seed(3), **kwargs).frames
    assert (weak - source).abs().mean() < (strong - source).abs().mean()


def test_edit_from_pixels_and_prefix_mode(pipe):
    out = pipe(_frames(), prompt="a cat", source_prompt="a dog", strength=0.5, height=32, width=32,
               generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, 5, 32, 32, 3) and np.isfinite(out).all()
    prefix = pipe(_frames(), prompt="a cat", mode="prefix", height=32, width=32, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).frames
    # source frames as causal context, followed by as many generated frames
    assert prefix.shape[2] == 4
    assert pipe.scheduler.chunks[0].start == 2 * 2 * 2


def test_invalid_frame_counts_are_trimmed_and_empty_videos_rejected(pipe, caplog):
    out = pipe(_frames(7), prompt="a cat", strength=0.3, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0)).frames
    assert out.shape[2] == 2  # 7 frames -> the first 5 (4k+1) -> 2 latent frames
    with pytest.raises(ValueError, match="video"):
        pipe([], prompt="a cat")
    with pytest.raises(ValueError, match="video"):
        pipe("/nonexistent/clip.mp4", prompt="a cat")
    with pytest.raises(ValueError, match="mode"):
        pipe(_frames(), prompt="a cat", mode="remix")
    with pytest.raises(ValueError, match="strength"):
        pipe(_frames(), prompt="a cat", strength=1.5)


def test_invert_is_exact_and_likelihood_is_consistent():
    components = tiny_pipeline_components()
    components["scheduler"] = JacobiFlowScheduler(mode="sequential", context_frames=1)
    pipe = StarFlowVPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    inversion = pipe.invert(_frames(), "a dog", height=32, width=32, generator=torch.Generator().manual_seed(0))
    embeds, _ = pipe.encode_prompt("a dog", None, False, 1, None, None, 16, "1:1", None, "cpu")
    back = pipe(prompt_embeds=embeds, latents=inversion.noise, guidance_scale=1.0, denoise="none",
                output_type="latent").frames
    assert (back - inversion.latents).abs().max() <= 1e-4
    output = pipe.transformer(inversion.latents, embeds)
    expected_bits = pipe.transformer.bits_per_dim(output)
    torch.testing.assert_close(pipe.log_likelihood(latents=inversion.latents, prompt="a dog"), expected_bits)
    torch.testing.assert_close(inversion.bits_per_dim, expected_bits)
    with pytest.raises(ValueError, match="exactly one"):
        pipe.invert(prompt="a dog")


def test_edit_at_full_strength_ignores_the_source(pipe):
    first = pipe.encode_video(_frames(seed=0), 32, 32, generator=torch.Generator().manual_seed(0))
    second = pipe.encode_video(_frames(seed=1), 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt="a dog", strength=1.0, guidance_scale=1.0, denoise="none", output_type="latent")
    a = pipe(video_latents=first, generator=torch.Generator().manual_seed(5), **kwargs).frames
    b = pipe(video_latents=second, generator=torch.Generator().manual_seed(5), **kwargs).frames
    assert not torch.allclose(first, second)
    torch.testing.assert_close(a, b)


def test_unreadable_video_file_is_rejected(pipe, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 64)
    with pytest.raises(ValueError, match="video"):
        pipe(str(broken), prompt="a cat")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image_to_video", "video_to_video"])
def test_output_types_and_save_load_round_trip(kind, tmp_path):
    import PIL.Image as Image

    from starflow_diffusers import StarFlowVImageToVideoPipeline

    cls = StarFlowVImageToVideoPipeline if kind == "image_to_video" else StarFlowVVideoToVideoPipeline
    pipe = cls(**tiny_pipeline_components())
    pipe.set_progress_bar_config(disable=True)
    source = _frames()[0] if kind == "image_to_video" else _frames()
    kwargs = dict(prompt="a dog", height=32, width=32, generator=None)
    if kind == "image_to_video":
        kwargs["num_frames"] = 9

    def run(p, output_type):
        kwargs["generator"] = torch.Generator().manual_seed(0)
        return p(source, output_type=output_type, **kwargs).frames

    video = run(pipe, "np")
    assert video.ndim == 5 and video.shape[-1] == 3 and 0 <= video.min() and video.max() <= 1
    pil = run(pipe, "pil")
    assert isinstance(pil[0][0], Image.Image) and len(pil[0]) == video.shape[1]
    latents = run(pipe, "latent")
    assert latents.shape[1] == 48
    pipe.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(reloaded, "np"), video)
