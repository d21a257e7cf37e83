"""Converted original checkpoints compute what the original code computed (../shared/parity)."""

import pytest
import torch
import torch.nn.functional as F

from parity_utils import FORWARD_TOL, converted_model, fixture, max_err, to_diffusers_layout

FIXTURES = ["video_tiny", "image_tiny"]


def _noisy_input(tensors, model):
    return to_diffusers_layout(tensors["x_clean"] + model.config.noise_std * tensors["eps"])


@pytest.mark.parametrize("name", FIXTURES)
def test_forward_z_and_block_logdets(name):
    tensors, _ = fixture(name)
    model = converted_model(name)
    with torch.no_grad():
        out = model(_noisy_input(tensors, model), tensors["y"])
    assert max_err(to_diffusers_layout(out.sample), tensors["fwd_z"]) <= FORWARD_TOL
    assert len(out.block_logdets) == len(model.blocks)
    for i, logdet in enumerate(out.block_logdets):
        expected = tensors[f"fwd_logdets.{i}"].flatten(1).sum(1)
        assert max_err(logdet, expected) <= FORWARD_TOL, f"block {i}"
    assert max_err(out.logdet, sum(t.flatten(1).sum(1) for k, t in tensors.items() if k.startswith("fwd_logdets"))) <= FORWARD_TOL
    assert max_err(model.nll_loss(out), tensors["fwd_loss"][0]) <= FORWARD_TOL


@pytest.mark.parametrize("name", FIXTURES)
def test_weighted_training_loss_and_input_gradient(name):
    tensors, _ = fixture(name)
    model = converted_model(name)
    sigma = model.config.noise_std
    x = _noisy_input(tensors, model).requires_grad_(True)
    out = model(x, tensors["y"])
    loss = model.nll_loss(out, weights=torch.full((x.shape[0],), sigma / 0.3))
    (grad,) = torch.autograd.grad(loss, x)
    assert max_err(loss, tensors["train_loss_weighted"][0]) <= FORWARD_TOL
    assert max_err(to_diffusers_layout(grad), tensors["train_x_grad"]) <= FORWARD_TOL


def test_learned_denoiser_output_and_loss():
    tensors, _ = fixture("video_tiny")
    model = converted_model("video_tiny")
    sigma = model.config.noise_std
    x = _noisy_input(tensors, model).requires_grad_(True)
    loss = model.nll_loss(model(x, tensors["y"]), weights=torch.full((x.shape[0],), sigma / 0.3))
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        prediction = model.denoise(x, tensors["y"])
    assert max_err(to_diffusers_layout(prediction), tensors["denoiser_out"]) <= FORWARD_TOL
    # flow-score-matching target: grad of the weighted loss * numel * sigma (spec section 3)
    target = grad * x.numel() * sigma
    assert max_err(to_diffusers_layout(target), tensors["denoiser_score_target"]) <= FORWARD_TOL
    assert max_err(F.mse_loss(prediction, target), tensors["denoiser_loss"][0]) <= FORWARD_TOL
