"""The training objective (against the original code's parity numbers), the synthetic dataset and the
captioned video folder dataset."""

import json

import cv2
import pytest
import torch

from parity_utils import FORWARD_TOL, converted_model, fixture, max_err, to_diffusers_layout
from starflow_diffusers.training import synthetic
from starflow_diffusers.training.data import (
    VideoCaptionDataset,
    collate_clips,
    frame_indices,
    resize_center_crop,
    scan_data_dir,
)
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


class _CountingAccelerator:
    """What `train_micro_batch` uses of an `Accelerator`, counting backward calls."""

    device, scaler = torch.device("cpu"), None

    def __init__(self):
        self.backward_calls = 0

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        self.backward_calls += 1
        loss.backward()


@pytest.mark.parametrize("separate_score_pass", [False, True])
def test_a_single_backward_gives_the_same_gradients_in_one_call(separate_score_pass):
    """DeepSpeed steps at every boundary backward: with the denoiser trained, `single_backward` makes one
    backward per micro-batch, with the same gradients as the flow's and the denoiser's separate ones, whether
    the score comes through the step's graph or from a pass of its own (ZeRO-3)."""
    from starflow_diffusers.testing_utils import tiny_pipeline
    from starflow_diffusers.training.loop import FlowStepSettings, train_micro_batch

    pipe = tiny_pipeline(with_vae=False)
    module = StarFlowTrainingModule(pipe.transformer)
    latents = torch.randn(2, 3, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    grads, calls, losses = {}, {}, {}
    for single in (False, True):
        pipe.transformer.zero_grad(set_to_none=True)
        accelerator = _CountingAccelerator()
        settings = FlowStepSettings(
            noise_std=pipe.transformer.config.noise_std, noise_level_conditioning=True, fps=16, aspect_ratio="1:1",
            train_denoiser=True, single_backward=single, separate_score_pass=single and separate_score_pass,
        )
        metrics = train_micro_batch(
            accelerator, module, pipe, latents, ["a red circle", "a dog"], settings,
            [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], torch.Generator().manual_seed(3),
        )
        grads[single] = {n: p.grad.clone() for n, p in pipe.transformer.named_parameters() if p.grad is not None}
        calls[single], losses[single] = accelerator.backward_calls, metrics
    assert calls == {False: 2, True: 1}
    assert grads[True].keys() == grads[False].keys()
    assert any(n.startswith("denoiser.") for n in grads[True]) and any(n.startswith("blocks.") for n in grads[True])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name in ("loss", "denoiser_loss"):
        torch.testing.assert_close(losses[True][name], losses[False][name], rtol=1e-6, atol=0)


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


# ---- synthetic dataset ----------------------------------------------------------------------------------------

def _colour_centroid(frame, colour):
    mask = (abs(frame.astype(int) - colour).sum(-1) < 60)
    ys, xs = mask.nonzero()
    return xs.mean(), ys.mean(), mask.sum()


def test_synthetic_clips_are_deterministic_and_move_as_captioned():
    clips = synthetic.generate_clips(12, "train", size=32, num_frames=9, seed=3)
    again = synthetic.generate_clips(4, "train", size=32, num_frames=9, seed=3, start_index=8)
    for a, b in zip(clips[8:], again):
        assert a.caption == b.caption and (a.frames == b.frames).all()
    assert synthetic.generate_clips(1, seed=4)[0].caption != clips[0].caption or not (
        synthetic.generate_clips(1, seed=4)[0].frames == clips[0].frames
    ).all()
    for clip in clips:
        assert clip.frames.shape == (9, 32, 32, 3) and clip.frames.dtype == "uint8"
        assert clip.caption.startswith(("a ", "an "))
        for obj in clip.spec.objects:
            assert f"{obj.colour} {obj.shape} moving {obj.direction}" in clip.caption
            colour = synthetic.COLOURS[obj.colour]
            x0, y0, n0 = _colour_centroid(clip.frames[0], colour)
            x1, y1, n1 = _colour_centroid(clip.frames[-1], colour)
            assert n0 > 10 and n1 > 10, "the object is visible in the first and last frames"
            dx, dy = synthetic.DIRECTIONS[obj.direction]
            assert (x1 - x0) * dx + (y1 - y0) * dy > 2, clip.caption


def test_synthetic_test_split_holds_only_unseen_colour_shape_pairs():
    held_out = set(synthetic.held_out_pairs())
    assert {shape for _, shape in held_out} == set(synthetic.SHAPES)
    train = {(o.colour, o.shape) for c in synthetic.generate_clips(200, "train") for o in c.spec.objects}
    test = {(o.colour, o.shape) for c in synthetic.generate_clips(50, "test") for o in c.spec.objects}
    assert test <= held_out and not (train & held_out)
    assert {colour for colour, _ in train} == set(synthetic.COLOURS)
    with pytest.raises(ValueError, match="split"):
        synthetic.generate_clips(1, "validation")


def test_write_dataset_and_read_it_back_exactly(tmp_path):
    out = tmp_path / "shapes"
    synthetic.main([str(out), "--num_train", "3", "--num_test", "2", "--num_frames", "9"])
    lines = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == ["00000.mp4", "00001.mp4", "00002.mp4"]
    clips = synthetic.generate_clips(3, "train", num_frames=9)
    assert [line["text"] for line in lines] == [clip.caption for clip in clips]
    dataset = VideoCaptionDataset(str(out / "train"), 32, 32, num_frames=9, fps=16)
    item = dataset[1]
    assert item["caption"] == clips[1].caption and item["pixels"].shape == (3, 9, 32, 32)
    decoded = (item["pixels"].permute(1, 2, 3, 0) + 1) * 127.5
    assert (decoded - torch.from_numpy(clips[1].frames).float()).abs().max() <= 2.0, "lossless mp4"
    assert len(VideoCaptionDataset(str(out / "test"), 32, 32, num_frames=9)) == 2
    with pytest.raises(ValueError, match="not empty"):
        synthetic.write_dataset(str(out), 1, 1)


# ---- data folder -----------------------------------------------------------------------------------------------


def test_fps_sampling_and_center_crop():
    assert frame_indices(4, 32.0, 16) == [0, 2, 4, 6]
    assert frame_indices(3, 24.0, None) == [0, 1, 2]
    frame = torch.arange(40 * 80 * 3, dtype=torch.uint8).reshape(40, 80, 3).numpy()
    assert resize_center_crop(frame, 20, 20).shape == (20, 20, 3)
    wide = resize_center_crop(frame, 40, 40)
    assert (wide == frame[:, 20:60]).all(), "no resize needed: a pure centre crop"


def _write_clip(path, num_frames, fps=16, size=32):
    synthetic.write_video(str(path), synthetic.generate_clips(1, num_frames=num_frames, size=size)[0].frames, fps)


def test_corrupt_and_short_videos_are_skipped_and_counted(tmp_path):
    _write_clip(tmp_path / "good.mp4", 9)
    _write_clip(tmp_path / "short.mp4", 3)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")

    cv2.imwrite(str(tmp_path / "still.png"), (torch.rand(40, 50, 3) * 255).byte().numpy())
    for name in ("good", "short", "corrupt", "still"):
        (tmp_path / f"{name}.txt").write_text(f"caption of {name}\n")
    dataset = VideoCaptionDataset(str(tmp_path), 32, 32, num_frames=9, fps=16)
    assert dataset.num_skipped == 2 and {p.split("/")[-1] for p in dataset.skipped} == {"short.mp4", "corrupt.mp4"}
    items = {dataset[i]["caption"]: dataset[i]["pixels"].shape for i in range(len(dataset))}
    assert items == {"caption of good": (3, 9, 32, 32), "caption of still": (3, 1, 32, 32)}
    with pytest.raises(ValueError, match="different shapes"):
        collate_clips([dataset[0], dataset[1]])

    # a file that breaks after the scan is skipped at load time, not raised mid-epoch
    (tmp_path / "good.mp4").write_bytes(b"garbage")
    assert dataset[0]["caption"] == "caption of still" and dataset.num_skipped == 3


def test_captions_from_metadata_and_missing_captions(tmp_path):
    _write_clip(tmp_path / "a.mp4", 9)
    (tmp_path / "sub").mkdir()
    _write_clip(tmp_path / "sub" / "b.mp4", 9)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.mp4", "caption": "from metadata"}) + "\n")
    with pytest.raises(ValueError, match=r"1 file\(s\).*sub/b.mp4"):
        scan_data_dir(str(tmp_path))
    (tmp_path / "sub" / "b.txt").write_text("from sidecar")
    assert [m.caption for m in scan_data_dir(str(tmp_path))] == ["from metadata", "from sidecar"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        scan_data_dir(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a directory"):
        scan_data_dir(str(tmp_path / "missing"))


def test_two_object_fraction_weights_the_scenes_and_leaves_the_default_draws_alone():
    default = synthetic.generate_clips(200, "train", size=32, num_frames=3, seed=5)
    assert [c.caption for c in default] == [c.caption for c in synthetic.generate_clips(200, "train", 32, 3, 5, 2, 0, None)]
    counts = {f: sum(len(c.spec.objects) == 2 for c in synthetic.generate_clips(400, "train", 32, 3, 5, 2, 0, f)) for f in (0.0, 0.9, 1.0)}
    assert counts[0.0] == 0 and counts[1.0] == 400 and 330 < counts[0.9] < 390
    assert 60 < sum(len(c.spec.objects) == 2 for c in default) < 140  # uniform over 1 and 2
    with pytest.raises(ValueError, match="needs `max_objects` 2"):
        synthetic.generate_clips(2, "train", 32, 3, 5, max_objects=1, two_object_fraction=0.5)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        synthetic.SyntheticClipDataset(4, two_object_fraction=1.5)  # at construction, before any clip
