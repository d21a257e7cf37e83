"""The training objective (against the original code's parity numbers), the synthetic dataset, the data
loader and the LoRA trainer's argument checks."""

import json

import pytest
import torch

from parity_utils import FORWARD_TOL, converted_model, fixture, max_err, to_diffusers_layout
from starflow_diffusers.training.objective import (
    StarFlowTrainingModule,
    add_training_noise,
    denoiser_loss,
    drop_captions,
    drop_first_frame,
    flow_nll_loss,
    flow_score_target,
    nll_loss_weight,
)


# ---- objective ---------------------------------------------------------------------------------------------


def _parity_step(name, noise_level_conditioning=True, grad_scale=1.0):
    tensors, _ = fixture(name)
    model = converted_model(name)
    sigma = model.config.noise_std
    clean, eps = to_diffusers_layout(tensors["x_clean"]), to_diffusers_layout(tensors["eps"])
    noisy = add_training_noise(clean, sigma, noise=eps).requires_grad_(True)
    out = flow_nll_loss(StarFlowTrainingModule(model), noisy, tensors["y"], sigma, noise_level_conditioning)
    (out.loss * grad_scale).backward()
    model.zero_grad(set_to_none=True)  # the converted model is shared with other tests
    return tensors, model, noisy, out


@pytest.mark.parametrize("name", ["video_tiny", "image_tiny"])
def test_weighted_nll_and_bits_per_dim_match_the_original(name):
    tensors, model, noisy, out = _parity_step(name)
    assert max_err(out.loss, tensors["train_loss_weighted"][0]) <= FORWARD_TOL
    assert max_err(to_diffusers_layout(noisy.grad), tensors["train_x_grad"]) <= FORWARD_TOL
    # unweighted: the model's plain loss; bits/dim is that plus the Gaussian constant, in bits
    assert max_err(out.nll.mean(), tensors["fwd_loss"][0]) <= FORWARD_TOL
    expected_bits = (out.nll + 0.5 * torch.log(torch.tensor(2 * torch.pi))) / torch.log(torch.tensor(2.0))
    assert max_err(out.bits_per_dim, expected_bits) <= 1e-6


def test_unconditioned_models_are_not_weighted():
    tensors, model, noisy, out = _parity_step("image_tiny", noise_level_conditioning=False)
    assert nll_loss_weight(0.3, False) is None and nll_loss_weight(0.5, True) == pytest.approx(0.5 / 0.3)
    assert max_err(out.loss, tensors["fwd_loss"][0]) <= FORWARD_TOL


@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
def test_score_target_and_denoiser_loss_match_the_original(grad_scale):
    # a scaled backward (gradient accumulation, fp16 loss scaling) gives the same target once divided out
    tensors, model, noisy, out = _parity_step("video_tiny", grad_scale=grad_scale)
    target = flow_score_target(noisy.grad, model.config.noise_std, grad_scale=grad_scale)
    assert max_err(to_diffusers_layout(target), tensors["denoiser_score_target"]) <= FORWARD_TOL
    prediction = StarFlowTrainingModule(model)(noisy.detach(), tensors["y"], denoise=True)
    loss = denoiser_loss(prediction, target)
    assert max_err(loss, tensors["denoiser_loss"][0]) <= FORWARD_TOL


def test_denoiser_loss_sends_no_gradient_into_the_flow():
    tensors, model, noisy, out = _parity_step("video_tiny")
    target = flow_score_target(noisy.grad, model.config.noise_std)
    denoiser_loss(StarFlowTrainingModule(model)(noisy.detach(), tensors["y"], denoise=True), target).backward()
    flow_grads = [p.grad for n, p in model.named_parameters() if not n.startswith("denoiser.")]
    assert all(g is None for g in flow_grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoiser.parameters())
    model.zero_grad(set_to_none=True)


def test_score_target_needs_the_input_gradient():
    with pytest.raises(ValueError, match="require grad"):
        flow_score_target(None, 0.5)


def test_add_training_noise_is_seeded_and_scaled():
    latents = torch.zeros(2, 3, 2, 4, 4)
    a = add_training_noise(latents, 0.5, torch.Generator().manual_seed(1))
    b = add_training_noise(latents, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(0.5, rel=0.3)
    with pytest.raises(ValueError, match="shape"):
        add_training_noise(latents, 0.5, noise=torch.zeros(1))


def test_caption_dropout_keeps_or_empties_captions():
    captions = [f"caption {i}" for i in range(200)]
    dropped = drop_captions(captions, 0.3, torch.Generator().manual_seed(0))
    assert all(d in ("", c) for d, c in zip(dropped, captions))
    assert 30 < dropped.count("") < 90
    assert drop_captions(captions, 0.0) == captions
    assert drop_captions(captions, 1.0) == [""] * 200
    with pytest.raises(ValueError, match="caption dropout"):
        drop_captions(captions, 1.5)


def test_first_frame_drop_prefixes_extend():
    latents = torch.randn(2, 3, 4, 2, 2)
    kept, captions = drop_first_frame(latents, ["a", "b"], 0.0)
    assert kept is latents and captions == ["a", "b"]
    dropped, captions = drop_first_frame(latents, ["a", "b"], 1.0)
    assert torch.equal(dropped, latents[:, :, 1:]) and captions == ["(extend) a", "(extend) b"]
    one_frame, captions = drop_first_frame(latents[:, :, :1], ["a", "b"], 1.0)
    assert one_frame.shape[2] == 1 and captions == ["a", "b"]
    with pytest.raises(ValueError, match="first-frame drop"):
        drop_first_frame(latents, ["a", "b"], -0.1)
