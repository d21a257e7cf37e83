"""Bad input is refused early and by name (issue 17): non-finite numbers, pixel arrays of the wrong layout or
range, broken LoRA files, and a solve that diverges.

Every case asserts the exception type and that the message names the argument; `no_network` makes any
transformer evaluation fail the test, so an error raised only after the solve started would not pass."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from starflow_diffusers import (
    StarFlowPipeline,
    StarFlowVImageToVideoPipeline,
    StarFlowVTransformer,
    StarFlowVVideoToVideoPipeline,
)
from starflow_diffusers.pipelines.starflow_sampling import FlowSolveDivergedError
from starflow_diffusers.testing_utils import tiny_image_pipeline_components, tiny_pipeline, tiny_pipeline_components

NAN, INF = float("nan"), float("inf")
PROMPT = "a red circle moving left"
SIZE = dict(height=2, width=2)


@pytest.fixture
def no_network(monkeypatch):
    """Any transformer evaluation fails the test: the error must come before the solve."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the transformer ran before the bad input was refused")

    monkeypatch.setattr(StarFlowVTransformer, "forward", forbidden)


@pytest.fixture(scope="module")
def t2v():
    return tiny_pipeline(with_vae=False)


@pytest.fixture(scope="module")
def i2v():
    pipe = StarFlowVImageToVideoPipeline(**tiny_pipeline_components(with_vae=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def v2v():
    pipe = StarFlowVVideoToVideoPipeline(**tiny_pipeline_components(with_vae=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def t2i():
    pipe = StarFlowPipeline(**tiny_image_pipeline_components(with_vae=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _with(tensor: torch.Tensor, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = value
    return tensor


# ---- non-finite numbers ----------------------------------------------------------------------------------------

GUIDANCE = [NAN, INF, -INF, True]


@pytest.mark.parametrize("guidance_scale", GUIDANCE, ids=["nan", "inf", "-inf", "bool"])
@pytest.mark.parametrize("pipeline", ["t2v", "i2v", "v2v", "t2i"])
def test_non_finite_guidance_is_refused(request, no_network, pipeline, guidance_scale):
    pipe = request.getfixturevalue(pipeline)
    inputs = {
        "t2v": dict(prompt=PROMPT, num_frames=3, **SIZE),
        "i2v": dict(image=np.zeros((2, 2, 3), np.float32), prompt=PROMPT, num_frames=3, **SIZE),
        "v2v": dict(video=np.zeros((3, 2, 2, 3), np.float32), prompt=PROMPT, **SIZE),
        "t2i": dict(prompt=PROMPT, height=8, width=8),
    }[pipeline]
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number"):
        pipe(guidance_scale=guidance_scale, **inputs)


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("argument", ["latents", "prompt_embeds", "negative_prompt_embeds"])
def test_non_finite_tensors_are_refused_before_the_solve(t2v, no_network, argument, value):
    latents = torch.randn(1, 3, 3, 2, 2)
    embeds = torch.randn(1, 16, 16)
    kwargs = dict(latents=latents, prompt_embeds=embeds, negative_prompt_embeds=embeds, guidance_scale=3.0)
    kwargs[argument] = _with(kwargs[argument], value)
    with pytest.raises(ValueError, match=f"`{argument}` holds NaN or infinite values"):
        t2v(num_frames=3, **SIZE, **kwargs)


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("argument", ["image_latents", "video_latents"])
def test_non_finite_context_latents_are_refused(i2v, no_network, argument, value):
    context = _with(torch.randn(1, 3, 1, 2, 2), value)
    with pytest.raises(ValueError, match=f"`{argument}` holds NaN or infinite values"):
        i2v(prompt=PROMPT, num_frames=3, **SIZE, **{argument: context})


def test_non_finite_video_latents_are_refused_by_video_to_video(v2v, no_network):
    with pytest.raises(ValueError, match="`video_latents` holds NaN"):
        v2v(video_latents=_with(torch.randn(1, 3, 3, 2, 2), NAN), prompt=PROMPT, **SIZE)


@pytest.mark.parametrize("argument", ["latents", "prompt_embeds"])
def test_likelihood_of_non_finite_inputs_is_refused(t2v, t2i, no_network, argument):
    video_kwargs = dict(latents=torch.randn(1, 3, 3, 2, 2), prompt_embeds=torch.randn(1, 16, 16))
    video_kwargs[argument] = _with(video_kwargs[argument], NAN)
    with pytest.raises(ValueError, match=f"`{argument}` holds NaN"):
        t2v.log_likelihood(**video_kwargs)
    image_kwargs = dict(latents=torch.randn(1, 3, 8, 8), prompt_embeds=torch.randn(1, 16, 16))
    image_kwargs[argument] = _with(image_kwargs[argument], NAN)
    with pytest.raises(ValueError, match=f"`{argument}` holds NaN"):
        t2i.log_likelihood(**image_kwargs)


@pytest.mark.parametrize("scale", [NAN, INF, "1.0"], ids=["nan", "inf", "str"])
def test_non_finite_lora_scale_is_refused(t2v, no_network, scale):
    with pytest.raises(ValueError, match=r"`attention_kwargs\['scale'\]`"):
        t2v(PROMPT, num_frames=3, **SIZE, attention_kwargs={"scale": scale})


def test_lora_file_with_nan_is_refused(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_pipeline(with_vae=False)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False))
    layers = get_peft_model_state_dict(pipe.transformer)
    metadata = pipe.transformer.peft_config["default"].to_dict()
    pipe.save_lora_weights(tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    saved = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(saved), framework="pt") as f:
        state, file_metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    state[next(iter(state))].view(-1)[0] = NAN
    save_file(state, str(tmp_path / "broken.safetensors"), metadata=file_metadata)
    # the intact file loads; the broken copy does not
    tiny_pipeline(with_vae=False).load_lora_weights(tmp_path)
    fresh = tiny_pipeline(with_vae=False)
    with pytest.raises(ValueError, match="hold NaN or infinity"):
        fresh.load_lora_weights(tmp_path, weight_name="broken.safetensors")
    assert not getattr(fresh.transformer, "peft_config", None)  # nothing was loaded


# ---- pixel arrays ----------------------------------------------------------------------------------------------

BAD_IMAGES = [
    (np.zeros((2, 2), np.float32), "channels-last RGB"),  # grayscale
    (np.zeros((2, 2, 1), np.float32), "channels-last RGB"),
    (np.zeros((3, 2, 2), np.float32), "channels-last RGB"),  # channels-first np
    (np.zeros((2, 2, 5), np.float32), "channels-last RGB"),
    (np.full((2, 2, 3), 255.0, np.float32), r"finite values in \[0, 1\]"),  # 0..255 floats
    (np.full((2, 2, 3), NAN, np.float32), r"finite values in \[0, 1\]"),
    (np.full((2, 2, 3), -0.5, np.float32), r"finite values in \[0, 1\]"),
    (torch.zeros(2, 2, 3), "channels-first RGB"),  # channels-last tensor
    (torch.zeros(5, 2, 2), "channels-first RGB"),
    (torch.full((3, 2, 2), 255.0), r"finite values in \[0, 1\] or \[-1, 1\]"),
    (torch.full((3, 2, 2), NAN), r"finite values in \[0, 1\] or \[-1, 1\]"),
]


@pytest.mark.parametrize("image, message", BAD_IMAGES, ids=[f"image{i}" for i in range(len(BAD_IMAGES))])
def test_image_to_video_refuses_bad_pixels(i2v, no_network, image, message):
    with pytest.raises(ValueError, match=f"`image` .*{message}"):
        i2v(image=image, prompt=PROMPT, num_frames=3, **SIZE)


BAD_VIDEOS = [
    (np.zeros((3, 2, 2), np.float32), "channels-last RGB"),  # frames without channels
    (np.zeros((3, 3, 2, 2), np.float32), "channels-last RGB"),  # channels-first frames
    (np.full((3, 2, 2, 3), 200.0, np.float32), r"finite values in \[0, 1\]"),
    (np.full((3, 2, 2, 3), INF, np.float32), r"finite values in \[0, 1\]"),
    (torch.full((3, 3, 2, 2), 2.0), r"finite values in \[0, 1\] or \[-1, 1\]"),
]


@pytest.mark.parametrize("video, message", BAD_VIDEOS, ids=[f"video{i}" for i in range(len(BAD_VIDEOS))])
def test_video_inputs_refuse_bad_pixels(i2v, v2v, t2v, no_network, video, message):
    with pytest.raises(ValueError, match=f"`video` .*{message}"):
        v2v(video=video, prompt=PROMPT, **SIZE)
    with pytest.raises(ValueError, match=f"`video` .*{message}"):
        i2v(video=video, prompt=PROMPT, num_frames=5, **SIZE)
    with pytest.raises(ValueError, match=f"`video` .*{message}"):
        t2v.log_likelihood(video, PROMPT, **SIZE)


@pytest.mark.parametrize("image, message", BAD_IMAGES[:7], ids=[f"image{i}" for i in range(7)])
def test_image_likelihood_refuses_bad_pixels(t2i, no_network, image, message):
    with pytest.raises(ValueError, match=f"`image` .*{message}"):
        t2i.log_likelihood(image=image, prompt=PROMPT, height=8, width=8)


def test_integer_pixels_and_unit_floats_are_accepted(i2v):
    """The accepted forms give the same conditioning: uint8 0-255 and float 0-1 arrays, and tensors."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 2, 3), dtype=np.uint8)

    def first_frame(image):
        return i2v(image=image, prompt=PROMPT, num_frames=3, **SIZE, output_type="latent",
                   generator=torch.Generator().manual_seed(0), denoise="none").frames

    reference = first_frame(pixels)
    assert torch.isfinite(reference).all()
    torch.testing.assert_close(first_frame(pixels.astype(np.float32) / 255), reference)
    torch.testing.assert_close(first_frame(torch.from_numpy(pixels).permute(2, 0, 1)), reference)


# ---- sizes in the likelihood paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("height", [0, -4, 2.5, "8", True])
def test_likelihood_sizes_are_checked_like_call(t2v, t2i, no_network, height):
    with pytest.raises(ValueError, match="`height` must be a positive integer"):
        t2v.log_likelihood(np.zeros((3, 2, 2, 3), np.float32), PROMPT, height=height, width=2)
    with pytest.raises(ValueError, match="`height` must be a positive integer"):
        t2i.log_likelihood(image=np.zeros((8, 8, 3), np.float32), prompt=PROMPT, height=height, width=8)


def test_likelihood_rounds_sizes_off_the_grid_like_call(t2v):
    """A size that is not a multiple of the latent grid is rounded down with a warning (as `__call__`
    does), not an internal shape error. The tiny pipeline's grid is 1 pixel, so a VAE pipeline is used."""
    pipe = tiny_pipeline(with_vae=True)
    video = np.zeros((5, 40, 40, 3), np.float32)
    generator = torch.Generator().manual_seed(0)
    rounded = pipe.log_likelihood(video, PROMPT, height=33, width=40, generator=generator)
    exact = pipe.log_likelihood(video, PROMPT, height=32, width=40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rounded, exact)


def test_image_likelihood_of_an_empty_list(t2i, no_network):
    with pytest.raises(ValueError, match="`image` is an empty list"):
        t2i.log_likelihood(image=[], prompt=PROMPT)


# ---- a diverging solve -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["jacobi", "adaptive", "sequential"])
def test_a_diverging_solve_raises_at_the_first_bad_chunk(monkeypatch, mode):
    """A block that starts producing NaN (e.g. a broken fine-tune) stops the solve at that chunk with an
    error naming the block, instead of a NaN video after the full solve."""
    pipe = tiny_pipeline(with_vae=False, scheduler_kwargs=dict(mode=mode))
    evaluate, calls = StarFlowVTransformer.evaluate_block, []

    def diverging(model, block_index, inputs, *args, **kwargs):
        out = evaluate(model, block_index, inputs, *args, **kwargs)
        if inputs is not None:
            calls.append(block_index)
            if len(calls) == 3:
                shift, scale = out
                return torch.full_like(shift, NAN), scale
        return out

    monkeypatch.setattr(StarFlowVTransformer, "evaluate_block", diverging)
    with pytest.raises(FlowSolveDivergedError, match="solve of the deep block produced non-finite values") as info:
        pipe(PROMPT, num_frames=3, **SIZE, guidance_scale=3.0, output_type="latent")
    assert len(calls) == 3  # stopped right there, not after the remaining iterations and chunks
    assert isinstance(info.value, FloatingPointError) and "mode='sequential'" in str(info.value)


# ---- video files -----------------------------------------------------------------------------------------------


def test_an_image_file_is_not_taken_as_a_video(t2v, v2v, tmp_path, no_network):
    import PIL.Image

    path = tmp_path / "frame.png"
    PIL.Image.new("RGB", (2, 2)).save(path)
    with pytest.raises(ValueError, match="`video` .*frame.png' is an image file"):
        t2v.log_likelihood(str(path), PROMPT)
    with pytest.raises(ValueError, match="is an image file"):
        v2v(video=str(path), prompt=PROMPT)


def test_an_unreadable_video_gives_a_one_line_error(t2v, tmp_path, no_network):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(ValueError, match="`video` .*broken.mp4' could not be read as a video") as info:
        t2v.log_likelihood(str(path), PROMPT)
    assert "\n" not in str(info.value)
