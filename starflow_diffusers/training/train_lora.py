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
stopped. Every random draw of a sample (noise, VAE sample, caption drop) is seeded from (--seed, step,
position in the global batch) and the first-frame drop from (--seed, step), so a resumed run reproduces an
uninterrupted one, and the number of processes does not change the draws.
"""

import argparse
import json
import logging
import math
import os
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from .._imports import quiet_third_party_import


if TYPE_CHECKING:
    import torch


logger = logging.getLogger("starflow_diffusers.train_lora")

# Linear layers of every transformer layer that a LoRA can adapt (attention and MLP projections).
LAYER_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
REPORT_TO_CHOICES = ("auto", "tensorboard", "wandb", "none")
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
    optim.add_argument(
        "--lr_scheduler", default="constant", help="a diffusers.optimization schedule: constant, linear, cosine, ..."
    )
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


VIDEO_PIPELINES = ("StarFlowVPipeline", "StarFlowVImageToVideoPipeline", "StarFlowVVideoToVideoPipeline")


def read_pipeline_folder(model_dir: str, program: str) -> Tuple[dict, dict]:
    """`model_index.json` and `transformer/config.json` of the saved STARFlow-V pipeline folder the trainer
    `program` was given as --pretrained_model_name_or_path, without torch."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"--pretrained_model_name_or_path {model_dir!r} is not a directory (a saved StarFlowVPipeline).")
    index = _read_json(os.path.join(model_dir, "model_index.json"))
    if index.get("_class_name") not in VIDEO_PIPELINES:
        raise ValueError(
            f"--pretrained_model_name_or_path holds a {index.get('_class_name')!r}; {program} trains "
            "STARFlow-V pipelines (StarFlowVPipeline)."
        )
    return index, _read_json(os.path.join(model_dir, "transformer", "config.json"))


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model weights, so that a bad run fails in seconds."""
    for name in ("learning_rate", "lora_alpha", "max_grad_norm", "adam_weight_decay", "caption_dropout",
                 "drop_first_frame", "validation_guidance_scale"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value}.")
    if args.validation_guidance_scale < 1:
        raise ValueError(f"--validation_guidance_scale must be >= 1 (1 disables guidance), got {args.validation_guidance_scale}.")
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
    index, transformer_config = read_pipeline_folder(model_dir, "starflow-train-lora")
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
        from .loop import checkpoint_step

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
    import torch

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


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    train(args)


def train(args: argparse.Namespace) -> str:
    """Run training; returns the path of the saved LoRA file."""
    import torch

    with quiet_third_party_import():
        import diffusers
        import transformers
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from diffusers.utils import export_to_video
        from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

        from ..pipelines.pipeline_starflow_v import StarFlowVPipeline
        from ..pipelines.inputs import closest_trained_aspect_ratio
        from .data import EpochShuffleSampler, VideoCaptionDataset, cache_dataset, collate_clips
        from .distributed import (
            check_fsdp_version,
            configure_deepspeed,
            deepspeed_step_settings,
            fsdp_version,
            gather_tensors,
            gathered,
            main_process_pipeline,
            restores_model_itself,
            trainable_parameter_groups,
            whole_weights_loading,
        )
        from .loop import (
            METRICS_FILE,
            FlowStepSettings,
            latent_encoder,
            latent_model_inputs,
            remove_incomplete_checkpoints,
            resume_from_checkpoint,
            run_training_loop,
            save_checkpoint,
        )
        from .objective import StarFlowTrainingModule

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
    check_fsdp_version(fsdp_version(accelerator))
    configure_deepspeed(accelerator, args.max_grad_norm)

    # ---- model -------------------------------------------------------------------------------------------
    with whole_weights_loading(accelerator):
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
    # the LoRA's random A matrices come from --seed, the same on every process and in every run
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        transformer.add_adapter(
            LoraConfig(r=args.rank, lora_alpha=lora_alpha, init_lora_weights=True, target_modules=targets),
            adapter_name=ADAPTER_NAME,
        )
    cast_training_params(transformer, dtype=torch.float32)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    training_module = StarFlowTrainingModule(transformer)
    flow_params, denoiser_params = trainable_parameter_groups(transformer)

    # ---- data --------------------------------------------------------------------------------------------
    dataset = VideoCaptionDataset(args.data_dir, height, width, num_frames, fps=args.fps)
    logger.info(f"{len(dataset)} clips in {args.data_dir} ({dataset.num_skipped} skipped)")
    if args.cache_latents:
        dataset = cache_dataset(
            dataset, latent_encoder(pipe, device, weight_dtype), accelerator.process_index, accelerator.num_processes, gather_object,
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
    flow_params, denoiser_params = trainable_parameter_groups(transformer)  # FSDP2 replaced them by shards

    def lora_state() -> Dict[str, torch.Tensor]:
        """The LoRA's whole tensors (collective when sharded: FSDP2 shards, ZeRO-3 partitions)."""
        with gathered(accelerator, [p for p in transformer.parameters() if p.requires_grad]):
            return gather_tensors(get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME))

    def save_lora(directory: str) -> str:
        StarFlowVPipeline.save_lora_weights(
            directory, lora_state(), is_main_process=accelerator.is_main_process,
            transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER_NAME].to_dict(),
        )
        return os.path.join(directory, "pytorch_lora_weights.safetensors")

    # accelerate checkpoints hold the LoRA in the diffusers format and, without FSDP or DeepSpeed, not the frozen
    # weights; under those accelerate also writes the whole module's own state, which it reloads itself
    def save_model_hook(models, weights, output_dir):
        for _ in range(len(weights)):
            weights.pop()
        save_lora(output_dir)

    def load_model_hook(models, input_dir):
        if restores_model_itself(accelerator):
            return
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

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_incomplete_checkpoints(args.output_dir)
        if report_to != "none":
            accelerator.init_trackers("starflow-lora", config={k: str(v) for k, v in vars(args).items()})
    global_step = resume_from_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint, logger)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"LoRA rank {args.rank}, alpha {lora_alpha} on {len(targets)} modules "
        f"({sum(p.numel() for p in flow_params + denoiser_params):,} parameters); {args.max_train_steps} steps of "
        f"{total_batch} clips of {num_frames}x{height}x{width}"
    )

    def run_validation(step: int, validation_pipe) -> None:
        transformer.eval()
        generator = torch.Generator(device=device).manual_seed(args.seed)
        with accelerator.autocast():
            video = validation_pipe(
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

    def on_update(step: int, logs: Dict[str, float]) -> None:
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, logger)
        if args.validation_prompt and step % args.validation_steps == 0:
            validation_pipe = main_process_pipeline(accelerator, training_module, pipe, device)
            if accelerator.is_main_process:
                run_validation(step, validation_pipe)
            del validation_pipe
            accelerator.wait_for_everyone()

    settings = FlowStepSettings(
        noise_std=noise_std,
        noise_level_conditioning=pipe.config.noise_level_conditioning,
        fps=args.fps,
        aspect_ratio=aspect_ratio,
        caption_dropout=args.caption_dropout,
        drop_first_frame=args.drop_first_frame,
        train_denoiser=args.train_denoiser,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        **deepspeed_step_settings(accelerator),
    )
    transformer.train()
    global_step = run_training_loop(
        accelerator, training_module, pipe, dataloader, optimizer, lr_scheduler, [flow_params, denoiser_params],
        settings, latent_model_inputs(pipe, device, weight_dtype), args.max_train_steps, args.seed, global_step, on_update,
        metrics_path=os.path.join(args.output_dir, args.logging_dir, METRICS_FILE),
    )

    accelerator.wait_for_everyone()
    lora_path = save_lora(args.output_dir)
    final_validation = args.validation_prompt and global_step % args.validation_steps
    validation_pipe = main_process_pipeline(accelerator, training_module, pipe, device) if final_validation else None
    if accelerator.is_main_process:
        logger.info(f"Saved the LoRA to {lora_path}")
        if final_validation:
            run_validation(global_step, validation_pipe)
        if isinstance(dataset, VideoCaptionDataset) and dataset.num_skipped:
            logger.warning(f"{dataset.num_skipped} file(s) were skipped: {sorted(dataset.skipped)[:5]}")
    accelerator.end_training()
    return lora_path


if __name__ == "__main__":
    sys.exit(main())
