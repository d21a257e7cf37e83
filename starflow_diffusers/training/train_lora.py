# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""LoRA fine-tuning of STARFlow-V on a folder of captioned videos (`starflow-train-lora`).

    accelerate launch -m starflow_diffusers.training.train_lora \\
        --pretrained_model_name_or_path path/to/starflow-v --data_dir clips/ --output_dir my-lora \\
        --height 480 --width 848 --num_frames 81 --rank 32 --max_train_steps 2000

The flow is trained by maximum likelihood on noise-augmented latents (`training.objective`); with
`--train_denoiser` a second LoRA on the learned denoiser is fitted to the flow's score (flow-score
matching). The result is `<output_dir>/pytorch_lora_weights.safetensors`, for `pipe.load_lora_weights`.
Checkpoints (`<output_dir>/checkpoint-<step>`) hold the LoRA, optimizer, scheduler and RNG states and are
renamed into place only once complete; `--resume_from_checkpoint latest` continues exactly where a run
stopped. Every random draw of a step (noise, VAE sample, caption and frame drops) is seeded from
(--seed, step, process), so a resumed run reproduces an uninterrupted one.
"""

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


logger = logging.getLogger("starflow_diffusers.train_lora")

# Linear layers of every transformer layer that a LoRA can adapt (attention and MLP projections).
LAYER_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
REPORT_TO_CHOICES = ("auto", "tensorboard", "wandb", "none")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_NAME = "default"


def lr_scheduler_choices() -> List[str]:
    from diffusers.optimization import SchedulerType

    return [s.value for s in SchedulerType]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starflow-train-lora",
        description="LoRA fine-tuning of a STARFlow-V pipeline on captioned videos (run with `accelerate launch`).",
    )
    model = parser.add_argument_group("model and data")
    model.add_argument("--pretrained_model_name_or_path", required=True, help="a StarFlowVPipeline folder")
    model.add_argument(
        "--data_dir", required=True,
        help="videos (or images, as 1-frame clips) with captions in metadata.jsonl or sidecar .txt files",
    )
    model.add_argument("--height", type=int, default=None, help="pixels; default: the model's trained square size")
    model.add_argument("--width", type=int, default=None, help="pixels; default: the model's trained square size")
    model.add_argument("--num_frames", type=int, default=None, help="pixel frames per clip; default: the trained length")
    model.add_argument("--fps", type=int, default=16, help="frames are sampled at this rate; named in the prompt")
    model.add_argument("--dataloader_num_workers", type=int, default=0)

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=16)
    lora.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale numerator; default: --rank")
    lora.add_argument(
        "--target_modules", nargs="+", default=None,
        help=f"projections to adapt, among {', '.join(LAYER_PROJECTIONS)} (applied to every layer of the deep "
        "block, and of the denoiser with --train_denoiser), or full Linear module paths such as "
        "blocks.5.layers.0.attn.to_q; default: all of them in the deep block",
    )
    lora.add_argument(
        "--train_denoiser", action="store_true",
        help="also fit a LoRA on the learned denoiser with the flow-score-matching loss",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--lr_scheduler", default="constant", help=f"one of {', '.join(lr_scheduler_choices())}")
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--max_train_steps", type=int, default=1000)
    optim.add_argument("--train_batch_size", type=int, default=1, help="per process")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--gradient_checkpointing", action="store_true")
    optim.add_argument(
        "--mixed_precision", default=None, choices=MIXED_PRECISION_CHOICES,
        help="default: the accelerate config's; the frozen weights are kept in this dtype, the LoRA in float32",
    )
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-4)
    optim.add_argument("--caption_dropout", type=float, default=0.1, help="probability of an empty caption")
    optim.add_argument(
        "--drop_first_frame", type=float, default=0.0,
        help='probability of training a batch without its first latent frame, captions prefixed "(extend) "',
    )

    ckpt = parser.add_argument_group("checkpoints and validation")
    ckpt.add_argument("--output_dir", default="starflow-lora")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500)
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None)
    ckpt.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    ckpt.add_argument("--validation_prompt", default=None, help="generate an mp4 from this prompt while training")
    ckpt.add_argument("--validation_steps", type=int, default=500)
    ckpt.add_argument("--validation_guidance_scale", type=float, default=4.5)
    ckpt.add_argument("--cache_latents", action="store_true", help="encode the dataset through the VAE once")
    ckpt.add_argument("--report_to", default="auto", choices=REPORT_TO_CHOICES, help="auto: tensorboard when installed")
    ckpt.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: --pretrained_model_name_or_path is not a complete pipeline folder.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model weights, so that a bad run fails in seconds."""
    positive = ("rank", "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                "validation_steps", "fps")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}.")
    for name in ("height", "width", "num_frames", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}.")
    for name in ("lr_warmup_steps", "dataloader_num_workers", "max_grad_norm", "adam_weight_decay"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise ValueError(f"--lora_alpha must be > 0, got {args.lora_alpha}.")
    for name in ("caption_dropout", "drop_first_frame"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(args, name)}.")
    if args.lr_scheduler not in lr_scheduler_choices():
        raise ValueError(f"--lr_scheduler {args.lr_scheduler!r} is unknown; choose one of {', '.join(lr_scheduler_choices())}.")
    if args.target_modules is not None:
        # full module paths are checked against the model once it is loaded
        unknown = [n for n in args.target_modules if n not in LAYER_PROJECTIONS and not n.startswith(("blocks.", "denoiser."))]
        if unknown:
            raise ValueError(_unknown_target_message(unknown))

    model_dir = args.pretrained_model_name_or_path
    if not os.path.isdir(model_dir):
        raise ValueError(f"--pretrained_model_name_or_path {model_dir!r} is not a directory (a saved StarFlowVPipeline).")
    index = _read_json(os.path.join(model_dir, "model_index.json"))
    if index.get("_class_name") not in ("StarFlowVPipeline", "StarFlowVImageToVideoPipeline", "StarFlowVVideoToVideoPipeline"):
        raise ValueError(
            f"--pretrained_model_name_or_path holds a {index.get('_class_name')!r}; starflow-train-lora trains "
            "STARFlow-V pipelines (StarFlowVPipeline)."
        )
    transformer_config = _read_json(os.path.join(model_dir, "transformer", "config.json"))
    if args.train_denoiser and not transformer_config.get("denoiser_num_layers"):
        raise ValueError("--train_denoiser needs a model with a learned denoiser (denoiser_num_layers > 0).")
    vae_entry = index.get("vae")
    if args.num_frames is not None and vae_entry and vae_entry[0] is not None:
        temporal = _read_json(os.path.join(model_dir, "vae", "config.json")).get("scale_factor_temporal", 1)
        if (args.num_frames - 1) % temporal:
            raise ValueError(f"--num_frames must be {temporal}k+1 with this VAE, got {args.num_frames}.")

    if args.resume_from_checkpoint not in (None, "latest"):
        if not os.path.isdir(args.resume_from_checkpoint):
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is neither 'latest' nor a folder.")
        checkpoint_step(args.resume_from_checkpoint)

    from .data import scan_data_dir

    scan_data_dir(args.data_dir)  # empty folder, missing captions


def _unknown_target_message(unknown: Sequence[str], valid_paths: Sequence[str] = ()) -> str:
    example = f" (e.g. {', '.join(valid_paths[:3])}, ...)" if valid_paths else ""
    return (
        f"Unknown --target_modules {', '.join(map(repr, unknown))}. Valid names: {', '.join(LAYER_PROJECTIONS)}, "
        f"or the full path of a Linear module of the transformer{example}."
    )


def resolve_target_modules(transformer, names: Optional[Sequence[str]], train_denoiser: bool) -> List[str]:
    """Full module paths of the Linear layers to adapt: the projections `names` of every layer of the deep
    block (and of the denoiser with `train_denoiser`); names containing a block path are used as given."""
    linear_paths = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    names = list(names) if names else list(LAYER_PROJECTIONS)
    stacks = [f"blocks.{len(transformer.blocks) - 1}"] + (["denoiser"] if train_denoiser else [])
    targets, unknown = [], []
    for name in names:
        if name in LAYER_PROJECTIONS:
            targets += [p for p in linear_paths if p.split(".layers.")[0] in stacks and p.endswith(f".{name}")
                        and ".layers." in p]
        elif name in linear_paths:
            targets.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(_unknown_target_message(unknown, linear_paths))
    return sorted(set(targets))


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


def step_generator(seed: int, micro_step: int, process_index: int, device) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, micro step, process)."""
    state = np.random.SeedSequence([seed, micro_step, process_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2**63 - 1))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    train(args)


def train(args: argparse.Namespace) -> str:
    """Run training; returns the path of the saved LoRA file."""
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import export_to_video
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    from ..pipelines.pipeline_starflow_v import StarFlowVPipeline
    from ..pipelines.starflow_sampling import closest_trained_aspect_ratio
    from .data import EpochShuffleSampler, VideoCaptionDataset, cache_dataset, collate_clips
    from .objective import (
        StarFlowTrainingModule,
        add_training_noise,
        denoiser_loss,
        drop_captions,
        drop_first_frame,
        flow_nll_loss,
        flow_score_target,
    )

    report_to = args.report_to
    if report_to == "auto":
        from accelerate.utils import is_tensorboard_available

        report_to = "tensorboard" if is_tensorboard_available() else "none"
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # the denoiser's LoRA is unused in the flow's pass and the flow's in the denoiser's
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.train_denoiser)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- model -------------------------------------------------------------------------------------------
    pipe = StarFlowVPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    transformer, vae, text_encoder = pipe.transformer, pipe.vae, pipe.text_encoder
    if not transformer.config.is_video:
        raise ValueError("starflow-train-lora trains video models; this transformer has is_video=False.")
    for module in (transformer, vae, text_encoder):
        if module is not None:
            module.requires_grad_(False)
            module.to(device)
            if weight_dtype != torch.float32:
                module.to(dtype=weight_dtype)
    height, width = args.height or pipe.default_base_frame_size, args.width or pipe.default_base_frame_size
    for name, size in (("height", height), ("width", width)):
        if size % pipe.spatial_multiple:
            raise ValueError(f"--{name} must be a multiple of {pipe.spatial_multiple} for this model, got {size}.")
    temporal = pipe.vae_scale_factor_temporal
    num_frames = args.num_frames or ((transformer.config.trained_latent_frames or 1) - 1) * temporal + 1
    aspect_ratio = closest_trained_aspect_ratio(width, height)
    noise_std = float(transformer.config.noise_std)

    targets = resolve_target_modules(transformer, args.target_modules, args.train_denoiser)
    lora_alpha = args.lora_alpha if args.lora_alpha is not None else args.rank
    transformer.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=lora_alpha, init_lora_weights=True, target_modules=targets),
        adapter_name=ADAPTER_NAME,
    )
    cast_training_params(transformer, dtype=torch.float32)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    training_module = StarFlowTrainingModule(transformer)
    flow_params = [p for n, p in transformer.named_parameters() if p.requires_grad and not n.startswith("denoiser.")]
    denoiser_params = [p for n, p in transformer.named_parameters() if p.requires_grad and n.startswith("denoiser.")]

    # ---- data --------------------------------------------------------------------------------------------
    dataset = VideoCaptionDataset(args.data_dir, height, width, num_frames, fps=args.fps)
    logger.info(f"{len(dataset)} clips in {args.data_dir} ({dataset.num_skipped} skipped)")
    if args.cache_latents:
        def encode(pixels):
            if vae is None:
                return {"pixels": pixels[0]}
            posterior = vae.encode(pixels.to(device, weight_dtype)).latent_dist
            return {"latent_parameters": posterior.parameters[0].float()}

        dataset = cache_dataset(
            dataset, encode, accelerator.process_index, accelerator.num_processes, gather_object,
            progress=accelerator.is_local_main_process,
        )
    sampler = EpochShuffleSampler(len(dataset), seed=args.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate_clips,
        num_workers=args.dataloader_num_workers, drop_last=False,
    )

    # ---- optimisation ------------------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(
        [{"params": flow_params}] + ([{"params": denoiser_params}] if denoiser_params else []),
        lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=args.adam_weight_decay,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    training_module, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        training_module, optimizer, dataloader, lr_scheduler
    )

    def lora_state(model) -> Dict[str, torch.Tensor]:
        return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)

    def save_lora(directory: str) -> str:
        StarFlowVPipeline.save_lora_weights(
            directory, lora_state(transformer), transformer.peft_config[ADAPTER_NAME].to_dict(),
            is_main_process=accelerator.is_main_process,
        )
        return os.path.join(directory, "pytorch_lora_weights.safetensors")

    # accelerate checkpoints hold only the LoRA (in the diffusers format), not the frozen weights
    def save_model_hook(models, weights, output_dir):
        for _ in range(len(weights)):
            weights.pop()
        save_lora(output_dir)

    def load_model_hook(models, input_dir):
        models.clear()
        state = StarFlowVPipeline.lora_state_dict(input_dir)
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"The checkpoint's LoRA does not match this run's targets: unexpected keys {unexpected[:5]}.")
        cast_training_params(transformer, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        # leftovers of a run killed mid-save are incomplete by construction
        for name in os.listdir(args.output_dir):
            if name.startswith(".checkpoint-") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)
        if report_to != "none":
            accelerator.init_trackers("starflow-lora", config={k: str(v) for k, v in vars(args).items()})

    global_step = 0
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            checkpoints = list_checkpoints(args.output_dir)
            path = checkpoints[-1] if checkpoints else None
        if path is None:
            logger.info(f"No checkpoint in {args.output_dir}; starting a new run.")
        else:
            global_step = checkpoint_step(path)
            logger.info(f"Resuming from {path} (step {global_step})")
            accelerator.load_state(path)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"LoRA rank {args.rank}, alpha {lora_alpha} on {len(targets)} modules "
        f"({sum(p.numel() for p in flow_params + denoiser_params):,} parameters); {args.max_train_steps} steps of "
        f"{total_batch} clips of {num_frames}x{height}x{width}"
    )

    def run_validation(step: int) -> None:
        transformer.eval()
        generator = torch.Generator(device=device).manual_seed(args.seed)
        with accelerator.autocast():
            video = pipe(
                args.validation_prompt, height=height, width=width, num_frames=num_frames, fps=args.fps,
                guidance_scale=args.validation_guidance_scale, generator=generator, output_type="np",
            ).frames[0]
        transformer.train()
        folder = os.path.join(args.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{step:06d}.mp4")
        tmp_path = os.path.join(folder, f".step-{step:06d}.tmp.mp4")
        export_to_video(list(video), tmp_path, fps=args.fps)
        os.replace(tmp_path, path)
        logger.info(f"Validation video: {path}")

    def save_checkpoint(step: int) -> None:
        final = os.path.join(args.output_dir, f"checkpoint-{step}")
        staging = os.path.join(args.output_dir, f".checkpoint-{step}.tmp")
        accelerator.save_state(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staging, final)
            if args.checkpoints_total_limit is not None:
                for old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                    shutil.rmtree(old)
            logger.info(f"Saved {final}")
        accelerator.wait_for_everyone()

    def model_inputs(batch, generator) -> torch.Tensor:
        """Model-space latents of a batch (VAE sample drawn with the step's generator)."""
        if "latent_parameters" in batch:
            posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(device))
            return pipe.normalize_latents(posterior.sample(generator=generator).float())
        pixels = batch["pixels"].to(device)
        if vae is None:
            return pixels
        latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample(generator=generator)
        return pipe.normalize_latents(latents.float())

    transformer.train()
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    progress = tqdm(
        total=args.max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    window = {"loss": [], "bits_per_dim": [], "denoiser_loss": []}
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(dataloader, skip_batches)
        for batch_index, batch in enumerate(batches, start=skip_batches if epoch == first_epoch else 0):
            generator = step_generator(args.seed, epoch * len(dataloader) + batch_index, accelerator.process_index, device)
            with accelerator.accumulate(training_module):
                with torch.no_grad():
                    latents = model_inputs(batch, generator)
                    latents, captions = drop_first_frame(latents, batch["caption"], args.drop_first_frame, generator)
                    captions = drop_captions(captions, args.caption_dropout, generator)
                    prompt_embeds, _ = pipe.encode_prompt(
                        captions, do_classifier_free_guidance=False, fps=args.fps, aspect_ratio=aspect_ratio,
                        device=device,
                    )
                    noisy = add_training_noise(latents, noise_std, generator)
                noisy.requires_grad_(args.train_denoiser)
                with accelerator.autocast():
                    flow = flow_nll_loss(
                        training_module, noisy, prompt_embeds, noise_std, pipe.config.noise_level_conditioning
                    )
                accelerator.backward(flow.loss)
                window["loss"].append(flow.loss.detach())
                window["bits_per_dim"].append(flow.bits_per_dim.mean())
                if args.train_denoiser:
                    # accelerate divided the loss by the accumulation steps and, in fp16, scaled it
                    grad_scale = 1.0 / args.gradient_accumulation_steps
                    if accelerator.scaler is not None:
                        grad_scale *= accelerator.scaler.get_scale()
                    target = flow_score_target(noisy.grad, noise_std, grad_scale)
                    with accelerator.autocast():
                        prediction = training_module(noisy.detach(), prompt_embeds, denoise=True)
                    loss_denoiser = denoiser_loss(prediction, target)
                    accelerator.backward(loss_denoiser)
                    window["denoiser_loss"].append(loss_denoiser.detach())
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    # clipped separately: the two losses live on different scales
                    for params in (flow_params, denoiser_params):
                        if params:
                            accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = {k: accelerator.reduce(torch.stack(v).mean(), "mean").item() for k, v in window.items() if v}
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            window = {k: [] for k in window}
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", bpd=f"{logs['bits_per_dim']:.4f}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(global_step)
            if args.validation_prompt and global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    run_validation(global_step)
                accelerator.wait_for_everyone()
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    lora_path = save_lora(args.output_dir)
    if accelerator.is_main_process:
        logger.info(f"Saved the LoRA to {lora_path}")
        if args.validation_prompt and global_step % args.validation_steps:
            run_validation(global_step)
        if isinstance(dataset, VideoCaptionDataset) and dataset.num_skipped:
            logger.warning(f"{dataset.num_skipped} file(s) were skipped: {sorted(dataset.skipped)[:5]}")
    accelerator.end_training()
    return lora_path


if __name__ == "__main__":
    sys.exit(main())
