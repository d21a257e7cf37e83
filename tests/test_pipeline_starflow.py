"""StarFlowPipeline (text-to-image): parity with the original image sampler, end to end with a tiny T5 and
SD-style VAE, likelihoods, and argument checks."""

import numpy as np
import PIL.Image
import pytest
import torch

from parity_utils import FORWARD_TOL, JACOBI_TOL, converted_model, fixture, max_err
from starflow_diffusers import JacobiFlowScheduler, StarFlowPipeline
from starflow_diffusers.testing_utils import tiny_image_pipeline_components, tiny_transformer

# ---- parity with ../shared/parity/image_tiny ------------------------------------------------------------

# (fixture key, scheduler mode, guided, denoise, tolerance)
PARITY_CASES = [
    ("rev_seq_nocfg", "sequential", False, "none", FORWARD_TOL),
    ("rev_seq_cfg", "sequential", True, "none", FORWARD_TOL),
    ("rev_jacobi_nocfg", "jacobi", False, "none", JACOBI_TOL),
    ("rev_jacobi_cfg", "jacobi", True, "none", JACOBI_TOL),
    ("self_denoised_rev_seq_cfg", "sequential", True, "score", FORWARD_TOL),
]


@pytest.mark.parametrize("key, mode, guided, denoise, tol", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_image_sampling_parity(key, mode, guided, denoise, tol):
    tensors, settings = fixture("image_tiny")
    jacobi = settings["jacobi_kwargs"]
    scheduler = JacobiFlowScheduler(
        mode=mode, block_size=jacobi["jacobi_block_size"], threshold=jacobi["jacobi_th"],
        max_iterations=jacobi["jacobi_max_iter"], convergence="batch",  # the original's rule (the fixtures')
    )
    pipe = StarFlowPipeline(transformer=converted_model("image_tiny"), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    noise = tensors["sample_noise"]
    out = pipe(
        prompt_embeds=tensors["y"],
        negative_prompt_embeds=tensors["y_null"] if guided else None,
        latents=noise,
        guidance_scale=1.0 + settings["cfg_scale"] if guided else 1.0,
        denoise=denoise,
        output_type="latent",
    ).images
    assert out.shape == noise.shape
    assert max_err(out, tensors[key]) <= tol


# ---- end to end with tiny components ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    pipe = StarFlowPipeline(**tiny_image_pipeline_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _seed(seed=0):
    return torch.Generator().manual_seed(seed)


def test_text_to_pil_images(pipe):
    assert pipe.vae_scale_factor == 2 and pipe.spatial_multiple == 2 and pipe.default_base_frame_size == 8
    images = pipe("a red circle", guidance_scale=2.0, generator=_seed()).images
    assert len(images) == 1 and isinstance(images[0], PIL.Image.Image) and images[0].size == (8, 8)
    wide = pipe("a red circle", height=8, width=12, guidance_scale=1.0, output_type="np", generator=_seed()).images
    assert wide.shape == (1, 8, 12, 3) and 0 <= wide.min() and wide.max() <= 1


def test_output_types_and_rounding(pipe):
    kwargs = dict(prompt="a cat", guidance_scale=1.0, denoise="none")
    latents = pipe(**kwargs, height=9, width=11, output_type="latent", generator=_seed()).images
    assert latents.shape == (1, 4, 4, 5)  # 9x11 rounded down to 8x10 pixels, 2x VAE
    pt = pipe(**kwargs, latents=torch.randn(1, 4, 4, 4, generator=_seed()), output_type="pt").images
    assert pt.shape == (1, 3, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    # "latent" returns the model-space latents that the VAE decodes after dividing by scaling_factor
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    np_image = pipe(**kwargs, height=9, width=11, output_type="np", generator=_seed()).images
    expected = pipe.image_processor.postprocess(decoded, output_type="np")
    assert np.abs(np_image - expected).max() < 1e-5


def test_num_images_per_prompt_and_callback(pipe):
    seen = []

    def callback(p, index, start, tensors):
        seen.append(tensors["latents"].shape)
        return {"latents": tensors["latents"]}

    out = pipe(
        ["a dog", "a cat"], num_images_per_prompt=2, guidance_scale=1.5, output_type="latent", generator=_seed(),
        callback_on_step_end=callback,
    ).images
    assert out.shape == (4, 4, 4, 4) and torch.isfinite(out).all()
    assert seen and all(s == (4, 4, 4, 4) for s in seen)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = StarFlowPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert dict(loaded.config)["default_aspect_ratio"] == "1:1" and not loaded.config.aspect_ratio_conditioning
    run = lambda p: p("a blue square", guidance_scale=2.0, output_type="np", generator=_seed(3)).images
    np.testing.assert_array_equal(run(pipe), run(loaded))


def test_prompt_template_has_no_fps_line(pipe):
    assert pipe.apply_prompt_template(["a cat", ""], "16:9") == ["a cat", ""]
    flagged = StarFlowPipeline(
        **tiny_image_pipeline_components(), aspect_ratio_conditioning=True, noise_level_conditioning=True
    )
    assert flagged.apply_prompt_template(["a cat"], "3:2") == ["Noise Level 300:\na cat\n in a 3:2 aspect ratio.\n"]


def test_pixel_space_model_without_vae():
    components = tiny_image_pipeline_components(with_vae=False)
    components.update(vae=None, tokenizer=None, text_encoder=None)
    pipe = StarFlowPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, pipe.text_length, 16, generator=_seed())
    images = pipe(prompt_embeds=embeds, guidance_scale=1.0, height=4, width=4, generator=_seed()).images
    assert images[0].size == (4, 4)


# ---- likelihood ---------------------------------------------------------------------------------------------


def test_log_likelihood_of_latents_is_the_transformers_bits_per_dim(pipe):
    latents = torch.randn(2, 4, 4, 4, generator=_seed(1))
    embeds = torch.randn(2, pipe.text_length, 16, generator=_seed(2))
    bits = pipe.log_likelihood(latents=latents, prompt_embeds=embeds)
    with torch.no_grad():
        expected = pipe.transformer.bits_per_dim(pipe.transformer(latents, embeds))
    assert bits.shape == (2,) and bits.dtype == torch.float32
    torch.testing.assert_close(bits, expected, rtol=0, atol=1e-6)
    # one prompt is shared by the batch
    shared = pipe.log_likelihood(latents=latents, prompt_embeds=embeds[:1])
    assert shared[0] == bits[0] and shared[1] != bits[1]


def test_log_likelihood_of_images_encodes_scales_and_noise_augments(pipe):
    images = [PIL.Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)) for i in range(2)]
    bits = pipe.log_likelihood(images, prompt="a cat", generator=_seed(5))
    assert bits.shape == (2,) and torch.isfinite(bits).all()
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(images)
        clean = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        noisy = clean + pipe.transformer.config.noise_std * torch.randn(clean.shape, generator=_seed(5))
        text, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)
        expected = pipe.transformer.bits_per_dim(pipe.transformer(noisy, text.expand(2, -1, -1)))
    torch.testing.assert_close(bits, expected, rtol=0, atol=1e-5)
    # the same generator seed gives the same augmentation noise
    assert torch.equal(bits, pipe.log_likelihood(images, prompt="a cat", generator=_seed(5)))


def test_log_likelihood_errors(pipe):
    with pytest.raises(ValueError, match="exactly one of `image`"):
        pipe.log_likelihood()
    with pytest.raises(ValueError, match="`latents` must be"):
        pipe.log_likelihood(latents=torch.zeros(1, 4, 1, 4, 4))
    with pytest.raises(ValueError, match="prompts for 3 images"):
        pipe.log_likelihood(latents=torch.zeros(3, 4, 4, 4), prompt=["a", "b"])


# ---- argument checks ------------------------------------------------------------------------------------------

BAD_CALLS = [
    (dict(prompt=[]), "`prompt` is an empty list"),
    (dict(prompt="a", prompt_embeds=torch.zeros(1, 16, 16)), "either `prompt` or `prompt_embeds`"),
    (dict(), "Provide either `prompt` or `prompt_embeds`"),
    (dict(prompt_embeds=torch.zeros(1, 5, 16)), "`prompt_embeds` must be"),
    (dict(prompt="a", negative_prompt_embeds=torch.zeros(1, 16, 8)), "`negative_prompt_embeds` must be"),
    (dict(prompt="a", latents=torch.zeros(1, 4, 1, 4, 4)), "`latents` must be"),
    (dict(prompt="a", latents=torch.zeros(1, 3, 4, 4)), "`latents` must be"),
    (dict(prompt="a", denoise="blur"), "`denoise` must be one of"),
    (dict(prompt="a", denoise="learned"), "no learned denoiser"),
    (dict(prompt="a", output_type="video"), "`output_type` must be one of"),
    (dict(prompt="a", height=0), "`height` must be a positive integer"),
    (dict(prompt="a", width=-8), "`width` must be a positive integer"),
    (dict(prompt="a", height=1), "`height`=1 is smaller than one latent cell"),
    (dict(prompt="a", guidance_scale=0.5), "`guidance_scale` must be a finite number >= 1"),
    (dict(prompt="a", num_images_per_prompt=0), "`num_images_per_prompt` must be a positive integer"),
    (dict(prompt="a", aspect_ratio="wide"), "`aspect_ratio` must look like"),
    (dict(prompt="a", callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(prompt="a", generator=[_seed(), _seed()]), "`generator` is a list of 2"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CALLS, ids=[m.split()[0].strip("`") + str(i) for i, (_, m) in enumerate(BAD_CALLS)])
def test_bad_inputs_raise(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pipe(**kwargs)


def test_video_transformer_is_rejected():
    pipe = StarFlowPipeline(transformer=tiny_transformer(in_channels=4), scheduler=JacobiFlowScheduler())
    with pytest.raises(ValueError, match="video model; use `StarFlowVPipeline`"):
        pipe(prompt_embeds=torch.zeros(1, 16, 16), output_type="latent")


def test_latent_rgb_check_without_vae():
    components = tiny_image_pipeline_components()
    components["vae"] = None
    pipe = StarFlowPipeline(**components)
    with pytest.raises(ValueError, match="decodes with the VAE, and this pipeline has none"):
        pipe("a cat", output_type="pil")


def test_encode_image_reads_uint8_arrays_as_0_to_255(pipe):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = pipe.encode_image(PIL.Image.fromarray(pixels))
    torch.testing.assert_close(pipe.encode_image(pixels), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pipe.encode_image(pixels / 255.0), expected, rtol=0, atol=1e-6)
