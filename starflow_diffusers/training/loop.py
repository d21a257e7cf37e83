# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The accelerate training loop shared by `starflow-train` (full training) and `starflow-train-lora`.

`run_training_loop` runs epochs of micro-batches until `max_train_steps` optimizer updates: each micro-batch
applies the shared objective (`training.objective`: first-frame and caption drops, noise augmentation,
flow NLL and, optionally, the denoiser's flow-score matching), gradients are clipped per parameter group
and the trainer's `on_update(step, logs)` saves checkpoints and runs validation.

Every random draw of a sample (VAE sample, caption drop, training noise) comes from a generator of
(seed, micro step, position in the global batch), and the batch-wide first-frame drop from one of (seed,
micro step): a run gives the same draws whatever the number of processes it is split over, and, as
checkpoints record the update count, a resumed run reproduces an uninterrupted one.
"""

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .distributed import full_tensor, uses_deepspeed
from .objective import (
    add_training_noise,
    denoiser_loss,
    drop_captions,
    drop_first_frame,
    flow_nll_loss,
    flow_score_target,
)


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# One JSON line per optimizer update ({"step": ..., "loss": ..., ...}) in the trainers' logging folder, written
# whatever tracker is used. A resumed run appends: a step logged twice keeps its last line.
METRICS_FILE = "metrics.jsonl"


@dataclass
class FlowStepSettings:
    """What one micro-batch of the objective needs besides the data.

    Args:
        noise_std (`float`): the model's training noise level sigma.
        noise_level_conditioning (`bool`): the pipeline states sigma in its prompts (weights the NLL).
        fps (`int`), aspect_ratio (`str`): the values the prompt template states.
        caption_dropout (`float`), drop_first_frame (`float`): augmentation probabilities.
        train_denoiser (`bool`): also fit the learned denoiser to the flow's score.
        gradient_accumulation_steps (`int`): micro-batches per optimizer update.
        max_grad_norm (`float`): per-group gradient clipping; 0 disables it.
        skip_large_gradients_after (`int`, *optional*): after this many updates, an update where a group's
            gradient norm (before clipping) exceeds `max_grad_norm` is skipped (its gradients are dropped; the
            learning-rate schedule still advances), as the original trains with `grad_skip`. None: never.
        single_backward (`bool`): with `train_denoiser`, one forward and one backward of the summed flow and
            denoiser losses per micro-batch; the flow's input gradient (the score) is taken inside the forward
            (`StarFlowTrainingModule`). DeepSpeed needs it: its engine steps at every backward of an
            accumulation boundary (two backward calls would make two optimizer steps per update), and it hooks
            each forward's outputs (a gradient taken through them would run its reduction). It costs one more
            backward through the flow; the trainers turn it on under DeepSpeed only.
        separate_score_pass (`bool`): with `single_backward`, the score comes from a flow pass of its own
            (one more flow forward per step); DeepSpeed ZeRO-3 needs it (`StarFlowTrainingModule`).
    """

    noise_std: float
    noise_level_conditioning: bool
    fps: int
    aspect_ratio: str
    caption_dropout: float = 0.1
    drop_first_frame: float = 0.0
    train_denoiser: bool = False
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    single_backward: bool = False
    separate_score_pass: bool = False
    skip_large_gradients_after: Optional[int] = None


def _seeded_generator(entropy: Sequence[int], device) -> torch.Generator:
    state = np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2**63 - 1))


def batch_generator(seed: int, micro_step: int, device) -> torch.Generator:
    """The generator of a micro-batch's batch-wide draws, the same on every process."""
    return _seeded_generator([seed, micro_step, 0], device)


def sample_generators(seed: int, micro_step: int, first_position: int, count: int, device) -> List[torch.Generator]:
    """One generator per sample, from its position in the global micro-batch (process index x local batch
    size + index): one process with a batch of 4 draws what two processes with batches of 2 draw."""
    return [_seeded_generator([seed, micro_step, 1, first_position + i], device) for i in range(count)]


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoint folders, oldest first (incomplete ones are hidden `.checkpoint-N.tmp` folders)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(d))]
    return [os.path.join(output_dir, d) for _, d in sorted(found)]


def checkpoint_step(path: str) -> int:
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"--resume_from_checkpoint {path!r} is not a checkpoint-<step> folder.")
    return int(match.group(1))


def remove_incomplete_checkpoints(output_dir: str) -> None:
    """Leftovers of a run killed mid-save are incomplete by construction."""
    for name in os.listdir(output_dir):
        if name.startswith(".checkpoint-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: Optional[int], logger: logging.Logger) -> None:
    """`accelerator.save_state` into a hidden folder, renamed to `checkpoint-<step>` once complete."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    staging = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()


def resume_from_checkpoint(accelerator, output_dir: str, checkpoint: Optional[str], logger: logging.Logger) -> int:
    """Load `checkpoint` ("latest" or a folder) into the accelerator; returns the update count to resume at."""
    if not checkpoint:
        return 0
    path = checkpoint
    if path == "latest":
        checkpoints = list_checkpoints(output_dir)
        path = checkpoints[-1] if checkpoints else None
    if path is None:
        logger.info(f"No checkpoint in {output_dir}; starting a new run.")
        return 0
    step = checkpoint_step(path)
    logger.info(f"Resuming from {path} (step {step})")
    accelerator.load_state(path)
    return step


def train_micro_batch(
    accelerator,
    training_module: torch.nn.Module,
    pipe,
    latents: torch.Tensor,
    captions: Sequence[str],
    settings: FlowStepSettings,
    generators: Sequence[torch.Generator],
    shared_generator: torch.Generator,
) -> Dict[str, torch.Tensor]:
    """Forward and backward of the objective on one micro-batch of model-space latents; returns the detached
    flow loss, mean bits/dim and (with `train_denoiser`) the denoiser loss.

    Args:
        generators: one per sample (`sample_generators`): its caption drop and training noise.
        shared_generator: the batch-wide first-frame drop (`batch_generator`).
    """
    with torch.no_grad():
        latents, captions = drop_first_frame(latents, captions, settings.drop_first_frame, shared_generator)
        captions = drop_captions(captions, settings.caption_dropout, generators)
        prompt_embeds, _ = pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, fps=settings.fps, aspect_ratio=settings.aspect_ratio,
            device=accelerator.device,
        )
        prompt_embeds = prompt_embeds.to(pipe.transformer.dtype)  # (encode_prompt keeps the text encoder's)
        noisy = add_training_noise(latents, settings.noise_std, generators)
    noisy.requires_grad_(settings.train_denoiser)
    one_step = settings.train_denoiser and settings.single_backward
    with accelerator.autocast():
        flow = flow_nll_loss(
            training_module, noisy, prompt_embeds, settings.noise_std, settings.noise_level_conditioning,
            with_denoiser=one_step, separate_score_pass=settings.separate_score_pass,
        )
    metrics = {"loss": flow.loss.detach(), "bits_per_dim": flow.bits_per_dim.mean()}
    if one_step:
        loss_denoiser = denoiser_loss(flow.denoiser_prediction, flow.denoiser_target)
        # the two losses reach disjoint parameters: the summed backward gives each its own gradients
        accelerator.backward(flow.loss + loss_denoiser)
        metrics["denoiser_loss"] = loss_denoiser.detach()
        return metrics
    accelerator.backward(flow.loss)
    if settings.train_denoiser:
        # accelerate divided the loss by the accumulation steps and, in fp16, scaled it
        grad_scale = 1.0 / settings.gradient_accumulation_steps
        if accelerator.scaler is not None:
            grad_scale *= accelerator.scaler.get_scale()
        target = flow_score_target(noisy.grad, settings.noise_std, grad_scale)
        with accelerator.autocast():
            prediction = training_module(noisy.detach(), prompt_embeds, denoise=True)
        loss_denoiser = denoiser_loss(prediction, target)
        accelerator.backward(loss_denoiser)
        metrics["denoiser_loss"] = loss_denoiser.detach()
    return metrics


def run_training_loop(
    accelerator,
    training_module: torch.nn.Module,
    pipe,
    dataloader,
    optimizer,
    lr_scheduler,
    param_groups: Sequence[Sequence[torch.nn.Parameter]],
    settings: FlowStepSettings,
    model_inputs: Callable[[dict, List[torch.Generator]], torch.Tensor],
    max_train_steps: int,
    seed: int,
    global_step: int = 0,
    on_update: Optional[Callable[[int, Dict[str, float]], None]] = None,
    metrics_path: Optional[str] = None,
) -> int:
    """Train from update `global_step` to `max_train_steps`; returns the final update count.

    Args:
        dataloader: an accelerate-prepared loader whose sampler has `set_epoch` (`EpochShuffleSampler`).
        param_groups: parameters clipped together (the flow's and the denoiser's losses have their own scales);
            under DeepSpeed its engine clips them all together, and `grad_norm` is that one norm.
        model_inputs: a batch and its per-sample generators -> model-space latents (B, C, T, H, W).
        on_update: called after every optimizer update with the step and its logged values.
        metrics_path: where the main process appends each update's logged values (`METRICS_FILE`).
    """
    from tqdm.auto import tqdm

    deepspeed = uses_deepspeed(accelerator)

    updates_per_epoch = -(-len(dataloader) // settings.gradient_accumulation_steps)
    num_epochs = -(-max_train_steps // updates_per_epoch)
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * settings.gradient_accumulation_steps
    progress = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    window: Dict[str, List[torch.Tensor]] = {}
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch_index, batch in enumerate(batches, start=skip_batches if epoch == first_epoch else 0):
            micro_step, size = epoch * len(dataloader) + batch_index, len(batch["caption"])
            generators = sample_generators(seed, micro_step, accelerator.process_index * size, size, accelerator.device)
            with accelerator.accumulate(training_module):
                with torch.no_grad():
                    latents = model_inputs(batch, generators)
                metrics = train_micro_batch(
                    accelerator, training_module, pipe, latents, batch["caption"], settings, generators,
                    batch_generator(seed, micro_step, accelerator.device),
                )
                for name, value in metrics.items():
                    window.setdefault(name, []).append(value)
                norms = []
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    # DeepSpeed's engine has clipped one norm over all parameters (`configure_deepspeed`)
                    # and returns it; the other engines clip each group here
                    groups = [[p for params in param_groups for p in params]] if deepspeed else param_groups
                    norms = [
                        accelerator.clip_grad_norm_(params, settings.max_grad_norm) if params else None
                        for params in groups
                    ]
                    norms = [None if n is None else float(full_tensor(n)) for n in norms]
                skipped = (
                    settings.skip_large_gradients_after is not None
                    and global_step >= settings.skip_large_gradients_after
                    and any(n is not None and n > settings.max_grad_norm for n in norms)
                )
                if skipped:
                    optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients alone
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = {k: accelerator.reduce(torch.stack(v).mean(), "mean").item() for k, v in window.items()}
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            for name, norm in zip(("grad_norm", "denoiser_grad_norm"), norms):
                if norm is not None:
                    logs[name] = norm
            if settings.skip_large_gradients_after is not None:
                logs["skipped_update"] = float(skipped)
            window = {}
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", bpd=f"{logs['bits_per_dim']:.4f}")
            accelerator.log(logs, step=global_step)
            if metrics_path is not None and accelerator.is_main_process:
                os.makedirs(os.path.dirname(metrics_path), exist_ok=True)
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": global_step, **logs}) + "\n")
            if on_update is not None:
                on_update(global_step, logs)
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()
    return global_step


def latent_encoder(pipe, device, dtype) -> Callable[[torch.Tensor], Dict[str, torch.Tensor]]:
    """For `data.cache_dataset`: a clip's VAE posterior parameters (a pixel-space model keeps its pixels)."""

    def encode(pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        if pipe.vae is None:
            return {"pixels": pixels[0]}
        posterior = pipe.vae.encode(pixels.to(device, dtype)).latent_dist
        return {"latent_parameters": posterior.parameters[0].float()}

    return encode


def latent_model_inputs(pipe, device, dtype) -> Callable[[dict, Sequence[torch.Generator]], torch.Tensor]:
    """`run_training_loop`'s `model_inputs` for a pipeline with or without a VAE: cached posterior
    parameters or pixels -> normalised latents, each VAE sample drawn with its sample's generator."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    def model_inputs(batch: dict, generators: Sequence[torch.Generator]) -> torch.Tensor:
        if "latent_parameters" in batch:
            posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(device))
            return pipe.normalize_latents(posterior.sample(generator=list(generators)).float())
        pixels = batch["pixels"].to(device)
        if pipe.vae is None:
            return pixels
        latents = pipe.vae.encode(pixels.to(dtype)).latent_dist.sample(generator=list(generators))
        return pipe.normalize_latents(latents.float())

    return model_inputs
