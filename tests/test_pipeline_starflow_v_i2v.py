"""Image-to-video: parity with the original's i2v sample, and the end-to-end path from a PIL image."""

import numpy as np
import PIL.Image
import pytest
import torch

from parity_utils import JACOBI_TOL, converted_model, fixture, max_err, to_diffusers_layout
from starflow_diffusers import JacobiFlowScheduler, StarFlowVImageToVideoPipeline
from starflow_diffusers.testing_utils import tiny_pipeline_components


def test_image_to_video_parity_with_original():
    tensors, settings = fixture("video_tiny")
    jacobi = settings["jacobi_kwargs"]
    scheduler = JacobiFlowScheduler(
        block_size=jacobi["jacobi_block_size"], threshold=jacobi["jacobi_th"], max_iterations=jacobi["jacobi_max_iter"],
        convergence="batch",  # the original's rule, with which the fixture was made
    )
    pipe = StarFlowVImageToVideoPipeline(transformer=converted_model("video_tiny"), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    context = to_diffusers_layout(tensors["i2v_context"])
    out = pipe(
        image_latents=context,
        prompt_embeds=tensors["y"],
        negative_prompt_embeds=tensors["y_null"],
        latents=to_diffusers_layout(tensors["sample_noise"]),
        guidance_scale=1.0 + settings["cfg_scale"],
        denoise="none",
        output_type="latent",
    ).frames
    assert max_err(to_diffusers_layout(out), tensors["i2v_jacobi_cfg"]) <= JACOBI_TOL
    # the first frame comes back as the (noisy) conditioning latent, up to solver tolerance
    assert max_err(out[:, :, :1], context) <= 1e-2
    # the deep solve started after the context frame
    assert pipe.scheduler.chunks[0].start == context.shape[3] * context.shape[4]


@pytest.fixture(scope="module")
def pipe():
    pipe = StarFlowVImageToVideoPipeline(**tiny_pipeline_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(height=48, width=64):
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_image_to_video_from_pil_image(pipe):
    out = pipe(_image(), "a red circle moving left", height=32, width=32, num_frames=9,
               generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, 9, 32, 32, 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    again = pipe(_image(), "a red circle moving left", height=32, width=32, num_frames=9,
                 generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_array_equal(out, again)


def test_uint8_arrays_and_tensors_are_read_as_0_to_255(pipe):
    """opencv/imageio frames are uint8: they must encode like the same PIL image, not as [0, 1] floats."""
    pixels = np.asarray(_image(32, 32))

    def encode(image):  # the VAE posterior is sampled: the same seed for every call
        return pipe.encode_video([image], 32, 32, generator=torch.Generator().manual_seed(0))

    expected = encode(_image(32, 32))
    for image in (pixels, torch.from_numpy(pixels.copy()).permute(2, 0, 1), pixels / 255.0):  # tensors are (C, H, W)
        torch.testing.assert_close(encode(image), expected, rtol=0, atol=1e-6)


def test_the_conditioning_image_changes_the_video(pipe):
    kwargs = dict(prompt="a dog", height=32, width=32, num_frames=9, output_type="latent")
    a = pipe(_image(), generator=torch.Generator().manual_seed(0), **kwargs).frames
    b = pipe(PIL.Image.new("RGB", (64, 48), "white"), generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert not torch.allclose(a, b)


def test_extend_caption_prefix_changes_the_conditioning(pipe):
    kwargs = dict(prompt="a dog", height=32, width=32, num_frames=9, output_type="latent")
    a = pipe(_image(), generator=torch.Generator().manual_seed(0), **kwargs).frames
    b = pipe(_image(), generator=torch.Generator().manual_seed(0), extend_caption_prefix=True, **kwargs).frames
    assert not torch.allclose(a, b)


def test_bad_conditioning_inputs(pipe):
    with pytest.raises(ValueError, match="exactly one of `image`"):
        pipe(prompt="a dog", height=32, width=32, num_frames=9)
    with pytest.raises(ValueError, match="image_latents"):
        pipe(image_latents=torch.zeros(1, 48, 2, 2, 2), prompt="a dog", height=32, width=32, num_frames=9)
    with pytest.raises(ValueError, match="num_frames"):
        pipe(_image(), prompt="a dog", height=32, width=32, num_frames=1)
    with pytest.raises(ValueError, match="image"):
        pipe(image=12, prompt="a dog", height=32, width=32, num_frames=9)
