# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Full training of STARFlow-V (`starflow-train`): a pixel-space model from scratch, or every weight of a saved
pipeline (e.g. a converted checkpoint) fine-tuned on captioned videos.

    starflow-train --config configs/shapes_32px.yaml --output_dir runs/shapes
    accelerate launch -m starflow_diffusers.training.train --config ... --output_dir ...   # GPUs
    accelerate launch --config_file fsdp2.yaml -m starflow_diffusers.training.train \
        --pretrained_model_name_or_path starflow-v-7b-diffusers --data_dir clips/ --output_dir my-starflow-v

Fine-tuning (`--pretrained_model_name_or_path`) takes the model, text encoder, VAE, pipeline and scheduler
from the folder; an optional config holds only `data` and `training`, whose defaults follow the original
recipe (`FINETUNE_TRAINING_DEFAULTS`, docs/training.md). The clips are encoded through the VAE once.

Everything comes from one config file (YAML or JSON, see `configs/`), in sections:

* `model`: `StarFlowVTransformer` arguments. `in_channels` is 3 and `text_embed_dim` the text encoder's
  width; `trained_latent_frames` defaults to `data.num_frames`.
* `text_encoder`: a T5 encoder built from scratch (`d_model`, `d_kv`, `d_ff`, `num_layers`, `num_heads`,
  `seed`) and frozen, with a word-level tokenizer over `vocabulary` (default: every word the captions can
  hold, plus the prompt template's words). Nothing is downloaded.
* `pipeline`, `scheduler`: `StarFlowVPipeline` and `JacobiFlowScheduler` configuration of the saved folder.
* `data`: `synthetic` (arguments of `SyntheticClipDataset`: the moving-shapes world, rendered on the fly)
  or `data_dir` (a captioned folder, as for `starflow-train-lora`), and the clip `height`, `width`,
  `num_frames`, `fps`.
* `training`: optimisation, checkpoints and validation (see `TRAINING_DEFAULTS`).

Why pixel space: the model has no VAE (`vae=None`, 3 channels, frames in [-1, 1]). At small frame sizes a
video VAE's 16x spatial and 4x temporal compression would leave a 2x2-cell, few-frame latent, and its
weights alone would exceed a tiny model's size budget; patchifying pixels (`model.patch_size`) gives the
flow short token sequences instead, with exact likelihoods of the pixels themselves.

The objective and the loop are those of `starflow-train-lora` (`training.objective`, `training.loop`): the
flow's NLL on noise-augmented clips and, for a model with a learned denoiser, flow-score matching of the
denoiser. Checkpoints (`<output_dir>/checkpoint-<step>`) hold the transformer, optimizer, scheduler and
RNG states, renamed into place once complete; `--resume_from_checkpoint latest` continues exactly. The
result is a complete `StarFlowVPipeline` folder in `<output_dir>` (its `model_index.json` is moved in
last, so a folder with one is complete), loadable with `StarFlowVPipeline.from_pretrained(output_dir)`.
"""

import argparse
import inspect
import typing
import json
import logging
import math
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .._imports import quiet_third_party_import


if TYPE_CHECKING:
    import torch


logger = logging.getLogger("starflow_diffusers.train")

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
REPORT_TO_CHOICES = ("auto", "tensorboard", "wandb", "none")
SAVE_DTYPES = ("float32", "float16", "bfloat16")  # names of torch dtypes
SECTIONS = ("model", "text_encoder", "pipeline", "scheduler", "data", "training")

TEXT_ENCODER_DEFAULTS: Dict[str, Any] = {
    "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_heads": 2, "seed": 0, "vocabulary": None,
}
DATA_DEFAULTS: Dict[str, Any] = {
    "synthetic": None, "data_dir": None, "height": 32, "width": 32, "num_frames": 17, "fps": 16,
    "dataloader_num_workers": 0,
}
TRAINING_DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "max_train_steps": 1000,
    "train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-4,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 100,
    "adam_weight_decay": 1e-4,
    "max_grad_norm": 1.0,
    "caption_dropout": 0.1,
    "drop_first_frame": 0.0,
    "train_denoiser": True,
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": 2,
    "save_dtype": "float32",
    "validation_prompts": [],
    "validation_steps": 500,
    "validation_guidance_scale": 3.0,
    "report_to": "auto",
    "adam_betas": [0.9, 0.95],
    "denoiser_learning_rate": None,  # None: learning_rate
    "denoiser_adam_betas": None,  # None: adam_betas
    "min_learning_rate": 0.0,  # the floor of a cosine schedule (lr_scheduler: cosine)
    "skip_large_gradients_after": None,  # updates after which one with a gradient norm > max_grad_norm is skipped
}
# Fine-tuning a converted checkpoint (--pretrained_model_name_or_path): the original STARFlow-V recipe (its
# train.py and 7B config) where it is known: flow lr 5e-5 cosine to 1e-6, the denoiser in its own parameter
# group at 1e-4 with AdamW's default betas, clipping at 1 with updates skipped above it after 100 steps,
# caption drop 0.1, first-frame drop 0.25, bf16, gradient checkpointing. Warmup and batch size are ours.
FINETUNE_TRAINING_DEFAULTS: Dict[str, Any] = {
    **TRAINING_DEFAULTS,
    "max_train_steps": 1000,
    "train_batch_size": 1,
    "learning_rate": 5e-5,
    "min_learning_rate": 1e-6,
    "denoiser_learning_rate": 1e-4,
    "denoiser_adam_betas": [0.9, 0.999],
    "lr_warmup_steps": 100,
    "caption_dropout": 0.1,
    "drop_first_frame": 0.25,
    "skip_large_gradients_after": 100,
    "mixed_precision": "bf16",
    "gradient_checkpointing": True,
    "save_dtype": "bfloat16",
    "validation_guidance_scale": 4.5,
}
FINETUNE_DATA_DEFAULTS: Dict[str, Any] = {
    "data_dir": None, "synthetic": None, "height": None, "width": None, "num_frames": None, "fps": 16,
    "dataloader_num_workers": 0,
    "cache_latents": None,  # None: true for a data folder, false for the synthetic world
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="starflow-train",
        description="Train a pixel-space STARFlow-V pipeline from scratch from a config file, or fine-tune every "
        "weight of a saved pipeline on captioned videos (run with `accelerate launch` for GPUs).",
    )
    parser.add_argument(
        "--config", default=None,
        help="a YAML or JSON training config (see configs/); required unless --pretrained_model_name_or_path",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path", default=None,
        help="fine-tune this StarFlowVPipeline folder (e.g. a converted checkpoint) instead of training from scratch",
    )
    parser.add_argument("--data_dir", default=None, help="captioned videos to fine-tune on (sets data.data_dir)")
    parser.add_argument("--output_dir", required=True, help="pipeline folder to write, with checkpoints and logs")
    parser.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-<step> folder')
    parser.add_argument("--max_train_steps", type=int, default=None, help="override training.max_train_steps")
    parser.add_argument("--mixed_precision", default=None, choices=MIXED_PRECISION_CHOICES, help="override training.mixed_precision")
    parser.add_argument("--report_to", default=None, choices=REPORT_TO_CHOICES, help="override training.report_to")
    return parser


# ---- configuration ---------------------------------------------------------------------------------------------


def load_config(path: str) -> Dict[str, Any]:
    """Read a YAML or JSON config file into a dict of sections."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r} is not a file.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as e:
        raise ValueError(f"--config {path!r} could not be parsed: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of sections ({', '.join(SECTIONS)}).")
    return config


def _section(
    config: Dict[str, Any], name: str, defaults: Optional[Dict[str, Any]], allowed: Sequence[str] = (), path: str = ""
) -> Dict[str, Any]:
    """`config[name]` with `defaults` filled in; keys outside `defaults` and `allowed` are errors."""
    path = path or name
    section = config.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"Config section `{path}` must be a mapping, got {type(section).__name__}.")
    known = set(defaults or {}) | set(allowed)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"Unknown config key(s) {', '.join(f'`{path}.{k}`' for k in unknown)}; allowed: {', '.join(sorted(known))}.")
    return {**(defaults or {}), **section}


def _init_arguments(cls) -> List[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "args", "kwargs")]


def resolve_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Check every section and fill in defaults and derived values; raises `ValueError` naming the key."""
    from ..models.transformer_starflow_v import StarFlowVTransformer
    from ..pipelines.pipeline_starflow_v import StarFlowVPipeline
    from ..pipelines.inputs import closest_trained_aspect_ratio
    from ..schedulers.scheduling_jacobi_flow import JacobiFlowScheduler

    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ValueError(f"Unknown config section(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SECTIONS)}.")
    if not config.get("model"):
        # every model argument has the released 7B's default: a config without them would build that
        raise ValueError(
            "Config section `model` is required (at least the sizes: `num_layers_per_block`, `shallow_width`, "
            "`deep_width`, ...); without it starflow-train would build the full 7B STARFlow-V."
        )
    text = _section(config, "text_encoder", TEXT_ENCODER_DEFAULTS)
    data = _section(config, "data", DATA_DEFAULTS)
    training = _section(config, "training", TRAINING_DEFAULTS)
    model = _section(config, "model", None, _init_arguments(StarFlowVTransformer))
    _check_types("model", model, StarFlowVTransformer)
    pipeline_args = [n for n in _init_arguments(StarFlowVPipeline) if n not in ("transformer", "scheduler", "tokenizer", "text_encoder", "vae")]
    pipeline = _section(config, "pipeline", None, pipeline_args)
    scheduler = _section(config, "scheduler", None, _init_arguments(JacobiFlowScheduler))

    for name in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        _check_positive_int(f"text_encoder.{name}", text[name])
    if text["vocabulary"] is not None and (
        not isinstance(text["vocabulary"], list) or not all(isinstance(w, str) and w for w in text["vocabulary"])
    ):
        raise ValueError("`text_encoder.vocabulary` must be a list of words.")

    if (data["synthetic"] is None) == (data["data_dir"] is None):
        raise ValueError("Config section `data` needs exactly one of `synthetic` (a mapping) or `data_dir` (a folder).")
    for name in ("height", "width", "num_frames", "fps"):
        _check_positive_int(f"data.{name}", data[name])
    if data["synthetic"] is not None:
        _resolve_synthetic(data)
    elif not os.path.isdir(data["data_dir"]):
        raise ValueError(f"`data.data_dir` {data['data_dir']!r} is not a directory.")

    if model.setdefault("in_channels", 3) != 3:
        raise ValueError(f"`model.in_channels` must be 3: starflow-train trains pixel-space models, got {model['in_channels']}.")
    if model.setdefault("text_embed_dim", text["d_model"]) != text["d_model"]:
        raise ValueError(f"`model.text_embed_dim` ({model['text_embed_dim']}) must equal `text_encoder.d_model` ({text['d_model']}).")
    model.setdefault("is_video", True)
    if not model["is_video"]:
        raise ValueError("`model.is_video` must be true: starflow-train trains video models.")
    model.setdefault("trained_latent_frames", data["num_frames"])
    patch = model.get("patch_size", 1)
    for name in ("height", "width"):
        if data[name] % patch:
            raise ValueError(f"`data.{name}` ({data[name]}) must be a multiple of `model.patch_size` ({patch}).")
    base = int(round(math.sqrt(data["height"] * data["width"])))
    model.setdefault("sample_size", base // patch)
    pipeline.setdefault("base_frame_size", base)
    pipeline.setdefault("default_aspect_ratio", closest_trained_aspect_ratio(data["width"], data["height"]))

    denoiser_layers = model.get("denoiser_num_layers", inspect.signature(StarFlowVTransformer).parameters["denoiser_num_layers"].default)
    _check_training(training, denoiser_layers)
    _check_types("scheduler", scheduler, JacobiFlowScheduler)
    # the constructors' own checks (divisibility, head size, solver settings), with nothing allocated
    import torch

    with torch.device("meta"):
        StarFlowVTransformer(**model)
    JacobiFlowScheduler(**scheduler)
    return {"model": model, "text_encoder": text, "pipeline": pipeline, "scheduler": scheduler, "data": data, "training": training}


def resolve_finetune_config(config: Dict[str, Any], pretrained_dir: str) -> Dict[str, Any]:
    """Check a fine-tuning config (sections `data` and `training` only: the model, text encoder, VAE,
    pipeline and scheduler come from `pretrained_dir`), filling in the recipe's defaults and the model's
    trained clip size; raises `ValueError` naming the key. Reads only the folder's JSON files."""
    from .train_lora import read_pipeline_folder

    from_model = sorted(set(config) & {"model", "text_encoder", "pipeline", "scheduler"})
    if from_model:
        raise ValueError(
            f"Config section(s) {', '.join(from_model)} come from --pretrained_model_name_or_path when "
            "fine-tuning; allowed: data, training."
        )
    unknown = sorted(set(config) - {"data", "training"})
    if unknown:
        raise ValueError(f"Unknown config section(s) {', '.join(map(repr, unknown))}; allowed: data, training.")
    index, model = read_pipeline_folder(pretrained_dir, "starflow-train")
    if not model.get("is_video", True):
        raise ValueError("--pretrained_model_name_or_path holds an image model (is_video=False); starflow-train trains video models.")

    data = _section(config, "data", FINETUNE_DATA_DEFAULTS)
    user_training = config.get("training") or {}
    training = _section(config, "training", FINETUNE_TRAINING_DEFAULTS)
    denoiser_layers = model.get("denoiser_num_layers", 0)
    if "train_denoiser" not in user_training:
        training["train_denoiser"] = bool(denoiser_layers)
    _check_training(training, denoiser_layers)

    if data["synthetic"] is not None and data["data_dir"] is not None:
        raise ValueError("Config section `data` needs one of `synthetic` (a mapping) or `data_dir` (a folder), not both.")
    if data["synthetic"] is None and (data["data_dir"] is None or not os.path.isdir(data["data_dir"])):
        raise ValueError(
            f"Fine-tuning needs `data.data_dir` (or --data_dir), a folder of captioned videos, or `data.synthetic`; "
            f"got {data['data_dir']!r}."
        )
    temporal = index.get("vae_scale_factor_temporal") or 1
    spatial = (index.get("vae_scale_factor_spatial") or 1) * model.get("patch_size", 1)
    base = index.get("base_frame_size") or model.get("sample_size", 1) * spatial
    data["height"] = data["height"] or base
    data["width"] = data["width"] or base
    data["num_frames"] = data["num_frames"] or ((model.get("trained_latent_frames") or 1) - 1) * temporal + 1
    for name in ("height", "width", "num_frames", "fps"):
        _check_positive_int(f"data.{name}", data[name])
    for name in ("height", "width"):
        if data[name] % spatial:
            raise ValueError(f"`data.{name}` must be a multiple of {spatial} for this model, got {data[name]}.")
    if (data["num_frames"] - 1) % temporal:
        raise ValueError(f"`data.num_frames` must be {temporal}k+1 for this model's VAE, got {data['num_frames']}.")
    if data["cache_latents"] is None:
        data["cache_latents"] = data["synthetic"] is None  # synthetic clips are rendered on the fly instead
    if not isinstance(data["cache_latents"], bool):
        raise ValueError(f"`data.cache_latents` must be true or false, got {data['cache_latents']!r}.")
    if data["synthetic"] is not None:
        _resolve_synthetic(data)
    return {"pretrained_model_name_or_path": pretrained_dir, "data": data, "training": training}


SYNTHETIC_DEFAULTS: Dict[str, Any] = {"num_clips": 10000, "seed": 0, "max_objects": 2, "two_object_fraction": None}


def _resolve_synthetic(data: Dict[str, Any]) -> None:
    """Check and fill in `data.synthetic` (the moving-shapes world rendered on the fly) in place."""
    from .synthetic import check_two_object_fraction

    synthetic = _section(data, "synthetic", SYNTHETIC_DEFAULTS, path="data.synthetic")
    _check_positive_int("data.synthetic.num_clips", synthetic["num_clips"])
    if synthetic["max_objects"] not in (1, 2):
        raise ValueError(f"`data.synthetic.max_objects` must be 1 or 2, got {synthetic['max_objects']!r}.")
    if synthetic["two_object_fraction"] is not None:
        check_two_object_fraction(synthetic["two_object_fraction"], synthetic["max_objects"], "data.synthetic.two_object_fraction")
    if data["height"] != data["width"]:
        raise ValueError(f"The synthetic world has square frames: `data.height` ({data['height']}) != `data.width` ({data['width']}).")
    data["synthetic"] = synthetic


def _check_training(training: Dict[str, Any], denoiser_layers: int) -> None:
    """The `training` section's values, in either mode; raises `ValueError` naming the key."""
    from .train_lora import lr_scheduler_choices

    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"):
        _check_positive_int(f"training.{name}", training[name])
    for name in ("lr_warmup_steps", "adam_weight_decay", "max_grad_norm"):
        if not isinstance(training[name], (int, float)) or training[name] < 0:
            raise ValueError(f"`training.{name}` must be a number >= 0, got {training[name]!r}.")
    if not isinstance(training["learning_rate"], (int, float)) or training["learning_rate"] <= 0:
        raise ValueError(f"`training.learning_rate` must be > 0, got {training['learning_rate']!r}.")
    for name in ("caption_dropout", "drop_first_frame"):
        if not isinstance(training[name], (int, float)) or not 0 <= training[name] <= 1:
            raise ValueError(f"`training.{name}` must be in [0, 1], got {training[name]!r}.")
    if training["checkpoints_total_limit"] is not None:
        _check_positive_int("training.checkpoints_total_limit", training["checkpoints_total_limit"])
    if training["lr_scheduler"] not in lr_scheduler_choices():
        raise ValueError(f"`training.lr_scheduler` {training['lr_scheduler']!r} is unknown; choose one of {', '.join(lr_scheduler_choices())}.")
    for name, choices in (("mixed_precision", MIXED_PRECISION_CHOICES), ("save_dtype", SAVE_DTYPES), ("report_to", REPORT_TO_CHOICES)):
        if training[name] not in choices:
            raise ValueError(f"`training.{name}` must be one of {', '.join(choices)}, got {training[name]!r}.")
    if training["train_denoiser"] and not denoiser_layers:
        raise ValueError("`training.train_denoiser` needs a learned denoiser (`model.denoiser_num_layers` > 0).")
    if not isinstance(training["validation_prompts"], list) or not all(isinstance(p, str) for p in training["validation_prompts"]):
        raise ValueError("`training.validation_prompts` must be a list of strings.")
    rate = training["denoiser_learning_rate"]
    if rate is not None and (not isinstance(rate, (int, float)) or rate <= 0):
        raise ValueError(f"`training.denoiser_learning_rate` must be > 0 (or null: learning_rate), got {rate!r}.")
    if not isinstance(training["min_learning_rate"], (int, float)) or not 0 <= training["min_learning_rate"] < training["learning_rate"]:
        raise ValueError(f"`training.min_learning_rate` must be in [0, learning_rate), got {training['min_learning_rate']!r}.")
    if training["min_learning_rate"] > 0 and training["lr_scheduler"] != "cosine":
        raise ValueError("`training.min_learning_rate` is the floor of the cosine schedule: set `training.lr_scheduler: cosine` or 0.")
    for name in ("adam_betas", "denoiser_adam_betas"):
        betas = training[name]
        if betas is None and name == "denoiser_adam_betas":
            continue
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ValueError(f"`training.{name}` must be two numbers in [0, 1), got {betas!r}.")
    after = training["skip_large_gradients_after"]
    if after is not None:
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ValueError(f"`training.skip_large_gradients_after` must be an integer >= 0 or null, got {after!r}.")
        if training["max_grad_norm"] <= 0:
            raise ValueError("`training.skip_large_gradients_after` skips updates whose gradient norm exceeds `training.max_grad_norm`: set it > 0.")


def _check_types(section: str, values: Dict[str, Any], cls) -> None:
    """Each value has the type of the constructor argument's default (ints for sizes, lists of ints for
    per-block layer counts, numbers, booleans); a ValueError names the key otherwise."""
    parameters = inspect.signature(cls.__init__).parameters
    for name, value in values.items():
        if name not in parameters:
            continue
        default, annotation = parameters[name].default, parameters[name].annotation
        if default is inspect.Parameter.empty or (value is None and type(None) in typing.get_args(annotation)):
            continue
        key = f"`{section}.{name}`"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}.")
        elif isinstance(default, int) or (default is None and isinstance(value, (int, str, float))):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} must be an integer, got {value!r}.")
        elif isinstance(default, float):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value!r}.")
        elif isinstance(default, (tuple, list)):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{key} must be a list of integers, got {value!r}.")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}.")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def parse_args(argv: Optional[Sequence[str]] = None):
    """Command-line arguments and the resolved config (overrides applied); exits with a usage error on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.config is None and args.pretrained_model_name_or_path is None:
            raise ValueError("--config is required (or --pretrained_model_name_or_path, to fine-tune a saved pipeline).")
        config = load_config(args.config) if args.config else {}
        for name in ("max_train_steps", "mixed_precision", "report_to"):
            if getattr(args, name) is not None:
                config.setdefault("training", {})[name] = getattr(args, name)
        if args.data_dir is not None:
            config.setdefault("data", {})["data_dir"] = args.data_dir
        if args.pretrained_model_name_or_path is not None:
            config = resolve_finetune_config(config, args.pretrained_model_name_or_path)
        elif "pretrained_model_name_or_path" in config:
            config = resolve_finetune_config(config, config.pop("pretrained_model_name_or_path"))
        else:
            config = resolve_config(config)
        if args.resume_from_checkpoint not in (None, "latest"):
            from .loop import checkpoint_step

            if not os.path.isdir(args.resume_from_checkpoint):
                raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is neither 'latest' nor a folder.")
            checkpoint_step(args.resume_from_checkpoint)
        if config["data"]["data_dir"] is not None:
            from .data import scan_data_dir

            scan_data_dir(config["data"]["data_dir"])  # empty folder, missing captions
    except ValueError as e:
        parser.error(str(e))
    return args, config


# ---- components ---------------------------------------------------------------------------------------------


def caption_vocabulary(config: Dict[str, Any]) -> List[str]:
    """The tokenizer's words: `text_encoder.vocabulary`, or every word the training captions can hold."""
    if config["text_encoder"]["vocabulary"] is not None:
        words = list(config["text_encoder"]["vocabulary"])
    elif config["data"]["synthetic"] is not None:
        from .synthetic import VOCABULARY

        words = list(VOCABULARY)
    else:
        from .data import scan_data_dir

        words = sorted({word.lower() for item in scan_data_dir(config["data"]["data_dir"]) for word in item.caption.split()})
    from ..pipelines.prompt_template import TEMPLATE_WORDS

    return words + [w for w in TEMPLATE_WORDS if w not in words]


def build_pipeline(config: Dict[str, Any]):
    """The pipeline to train: the saved one of a fine-tuning config, or a fresh `StarFlowVPipeline` (new
    transformer, frozen text encoder, no VAE) from a resolved config."""
    import torch

    if "pretrained_model_name_or_path" in config:
        from ..pipelines.pipeline_starflow_v import StarFlowVPipeline

        return StarFlowVPipeline.from_pretrained(config["pretrained_model_name_or_path"])

    from ..models.transformer_starflow_v import StarFlowVTransformer
    from ..pipelines.pipeline_starflow_v import StarFlowVPipeline
    from ..schedulers.scheduling_jacobi_flow import JacobiFlowScheduler
    from .text import t5_encoder_from_scratch, word_level_tokenizer

    text = config["text_encoder"]
    tokenizer = word_level_tokenizer(caption_vocabulary(config))
    text_encoder = t5_encoder_from_scratch(
        len(tokenizer), d_model=text["d_model"], d_kv=text["d_kv"], d_ff=text["d_ff"], num_layers=text["num_layers"],
        num_heads=text["num_heads"], seed=text["seed"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["training"]["seed"])
        transformer = StarFlowVTransformer(**config["model"])
    return StarFlowVPipeline(
        transformer=transformer, scheduler=JacobiFlowScheduler(**config["scheduler"]), tokenizer=tokenizer,
        text_encoder=text_encoder, vae=None, **config["pipeline"],
    )


def build_dataset(config: Dict[str, Any]):
    data = config["data"]
    if data.get("synthetic") is not None:
        from .synthetic import SyntheticClipDataset

        synthetic = data["synthetic"]
        return SyntheticClipDataset(
            synthetic["num_clips"], "train", data["height"], data["num_frames"], synthetic["seed"], synthetic["max_objects"],
            synthetic["two_object_fraction"],
        )
    from .data import VideoCaptionDataset

    return VideoCaptionDataset(data["data_dir"], data["height"], data["width"], data["num_frames"], fps=data["fps"])


def save_pipeline(pipe, output_dir: str, dtype: "torch.dtype") -> None:
    """`pipe.save_pretrained` into a hidden staging folder, then move each part into `output_dir`,
    `model_index.json` last: a folder with a `model_index.json` is a complete pipeline."""
    transformer = pipe.transformer
    original_dtype = transformer.dtype
    staging = os.path.join(output_dir, ".pipeline.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    if dtype != original_dtype:
        transformer.to(dtype)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
    finally:
        if dtype != original_dtype:
            transformer.to(original_dtype)
    index = os.path.join(output_dir, "model_index.json")
    if os.path.exists(index):
        os.remove(index)
    for name in sorted(os.listdir(staging)):
        if name == "model_index.json":
            continue
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.replace(os.path.join(staging, "model_index.json"), index)
    os.rmdir(staging)


def learning_rate_schedule(optimizer, training: Dict[str, Any], num_processes: int):
    """The `training.lr_scheduler` schedule; a cosine with `min_learning_rate` > 0 decays each parameter group
    from its own learning rate to that floor after a linear warmup (the original's CosineLRSchedule). The
    prepared scheduler steps once per process and update, hence the step counts x num_processes."""
    import torch
    from diffusers.optimization import get_scheduler

    warmup, total = training["lr_warmup_steps"] * num_processes, training["max_train_steps"] * num_processes
    floor = training["min_learning_rate"]
    if floor <= 0:
        return get_scheduler(training["lr_scheduler"], optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)

    def cosine_to_floor(peak: float):
        def factor(step: int) -> float:
            if step < warmup:
                return step / max(1, warmup)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return (floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))) / peak

        return factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [cosine_to_floor(g["lr"]) for g in optimizer.param_groups])


# ---- training -------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, config = parse_args(argv)
    train(config, args.output_dir, args.resume_from_checkpoint)


def train(config: Dict[str, Any], output_dir: str, resume_from_checkpoint: Optional[str] = None) -> str:
    """Train from a resolved config (`resolve_config`); returns `output_dir`, a complete pipeline folder."""
    import torch

    with quiet_third_party_import():
        import diffusers
        import transformers
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object, set_seed
        from diffusers.utils import export_to_video

        from ..models.transformer_starflow_v import StarFlowVTransformer
        from .data import EpochShuffleSampler, VideoCaptionDataset, cache_dataset, collate_clips
        from .distributed import (
            check_fsdp_version,
            configure_deepspeed,
            deepspeed_step_settings,
            fsdp_version,
            main_process_pipeline,
            restores_model_itself,
            trainable_parameter_groups,
            uses_deepspeed,
            whole_weights_loading,
        )
        from .loop import METRICS_FILE, FlowStepSettings, latent_encoder, latent_model_inputs, remove_incomplete_checkpoints, resume_from_checkpoint as resume, run_training_loop, save_checkpoint
        from .objective import StarFlowTrainingModule

    training = config["training"]
    report_to = training["report_to"]
    if report_to == "auto":
        from accelerate.utils import is_tensorboard_available

        report_to = "tensorboard" if is_tensorboard_available() else "none"
    accelerator = Accelerator(
        gradient_accumulation_steps=training["gradient_accumulation_steps"],
        mixed_precision=training["mixed_precision"],
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, "logs")),
        # the denoiser is unused in the flow's pass and the flow in the denoiser's
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=training["train_denoiser"])],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logger.setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    device = accelerator.device
    check_fsdp_version(fsdp_version(accelerator))
    configure_deepspeed(accelerator, training["max_grad_norm"])
    set_seed(training["seed"])

    # ---- model and data ------------------------------------------------------------------------------------
    finetuning = "pretrained_model_name_or_path" in config
    if uses_deepspeed(accelerator) and training["skip_large_gradients_after"] is not None:
        raise ValueError(
            "`training.skip_large_gradients_after` cannot work under DeepSpeed (its engine clips and steps inside "
            "backward): set it to null."
        )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    with whole_weights_loading(accelerator):
        pipe = build_pipeline(config)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    pipe.to(device)
    for frozen in (pipe.text_encoder, pipe.vae):
        if frozen is not None:
            frozen.requires_grad_(False)
            if finetuning:  # the trained transformer keeps float32 master weights
                frozen.to(dtype=weight_dtype)
    if training["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    training_module = StarFlowTrainingModule(transformer)
    if not training["train_denoiser"]:
        for name, param in transformer.named_parameters():
            if name.startswith("denoiser."):
                param.requires_grad_(False)
    flow_params, denoiser_params = trainable_parameter_groups(transformer)

    data = config["data"]
    dataset = build_dataset(config)
    if isinstance(dataset, VideoCaptionDataset):
        logger.info(f"{len(dataset)} clips in {data['data_dir']} ({dataset.num_skipped} skipped)")
    if data.get("cache_latents"):
        dataset = cache_dataset(
            dataset, latent_encoder(pipe, device, weight_dtype), accelerator.process_index, accelerator.num_processes,
            gather_object, progress=accelerator.is_local_main_process,
        )
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=training["train_batch_size"], sampler=EpochShuffleSampler(len(dataset), seed=training["seed"]),
        collate_fn=collate_clips, num_workers=data["dataloader_num_workers"], drop_last=False,
    )

    # ---- optimisation ---------------------------------------------------------------------------------------
    # the denoiser has its own parameter group (learning rate, betas, schedule): Adam's update is per
    # parameter, so this is the original's separate denoiser optimizer, in one accelerate/DeepSpeed optimizer
    betas = tuple(training["adam_betas"])
    groups = [{"params": flow_params, "lr": training["learning_rate"], "betas": betas}]
    if denoiser_params:
        groups.append({
            "params": denoiser_params, "lr": training["denoiser_learning_rate"] or training["learning_rate"],
            "betas": tuple(training["denoiser_adam_betas"] or betas),
        })
    optimizer = torch.optim.AdamW(groups, lr=training["learning_rate"], weight_decay=training["adam_weight_decay"])
    lr_scheduler = learning_rate_schedule(optimizer, training, accelerator.num_processes)
    training_module, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        training_module, optimizer, dataloader, lr_scheduler
    )
    flow_params, denoiser_params = trainable_parameter_groups(transformer)  # FSDP2 replaced them by shards

    # checkpoints hold the transformer as a diffusers model folder (loadable on its own) plus accelerate's
    # states; under FSDP2 and DeepSpeed accelerate also writes the module's own state, which it reloads itself
    def save_model_hook(models, weights, checkpoint_dir):
        for _ in range(len(weights)):
            weights.pop()
        saved = main_process_pipeline(accelerator, training_module, pipe)  # on the CPU when sharded
        if accelerator.is_main_process:
            saved.transformer.save_pretrained(os.path.join(checkpoint_dir, "transformer"), safe_serialization=True)

    def load_model_hook(models, checkpoint_dir):
        if restores_model_itself(accelerator):
            return
        models.clear()
        saved = StarFlowVTransformer.from_pretrained(os.path.join(checkpoint_dir, "transformer"))
        transformer.load_state_dict(saved.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        remove_incomplete_checkpoints(output_dir)
        with open(os.path.join(output_dir, ".train_config.json.tmp"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        os.replace(os.path.join(output_dir, ".train_config.json.tmp"), os.path.join(output_dir, "train_config.json"))
        if report_to != "none":
            accelerator.init_trackers("starflow-train", config={k: json.dumps(v) for k, v in config.items()})
    global_step = resume(accelerator, output_dir, resume_from_checkpoint, logger)

    frames, height, width = data["num_frames"], data["height"], data["width"]
    total_batch = training["train_batch_size"] * accelerator.num_processes * training["gradient_accumulation_steps"]
    logger.info(
        f"Training a {sum(p.numel() for p in transformer.parameters()):,}-parameter StarFlowVTransformer for "
        f"{training['max_train_steps']} steps of {total_batch} clips of {frames}x{height}x{width} on {device}"
    )

    def run_validation(step: int, validation_pipe) -> None:
        transformer.eval()
        folder = os.path.join(output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        for index, prompt in enumerate(training["validation_prompts"]):
            generator = torch.Generator(device=device).manual_seed(training["seed"] + index)
            with accelerator.autocast():
                video = validation_pipe(
                    prompt, height=height, width=width, num_frames=frames, fps=data["fps"],
                    guidance_scale=training["validation_guidance_scale"], generator=generator,
                ).frames[0]
            name = f"step-{step:06d}-{index}.mp4"
            export_to_video(list(video), os.path.join(folder, "." + name), fps=data["fps"])
            os.replace(os.path.join(folder, "." + name), os.path.join(folder, name))
        transformer.train()
        logger.info(f"Validation videos in {folder}")

    def on_update(step: int, logs: Dict[str, float]) -> None:
        if step % training["checkpointing_steps"] == 0 or step == training["max_train_steps"]:
            save_checkpoint(accelerator, output_dir, step, training["checkpoints_total_limit"], logger)
        if training["validation_prompts"] and step % training["validation_steps"] == 0:
            validation_pipe = main_process_pipeline(accelerator, training_module, pipe, device)
            if accelerator.is_main_process:
                run_validation(step, validation_pipe)
            del validation_pipe
            accelerator.wait_for_everyone()

    settings = FlowStepSettings(
        noise_std=float(transformer.config.noise_std),
        noise_level_conditioning=pipe.config.noise_level_conditioning,
        fps=data["fps"],
        aspect_ratio=pipe.config.default_aspect_ratio,
        caption_dropout=training["caption_dropout"],
        drop_first_frame=training["drop_first_frame"],
        train_denoiser=training["train_denoiser"],
        gradient_accumulation_steps=training["gradient_accumulation_steps"],
        max_grad_norm=training["max_grad_norm"],
        **deepspeed_step_settings(accelerator),
        skip_large_gradients_after=training["skip_large_gradients_after"],
    )
    run_training_loop(
        accelerator, training_module, pipe, dataloader, optimizer, lr_scheduler, [flow_params, denoiser_params],
        settings, latent_model_inputs(pipe, device, weight_dtype), training["max_train_steps"], training["seed"],
        global_step, on_update, metrics_path=os.path.join(output_dir, "logs", METRICS_FILE),
    )

    accelerator.wait_for_everyone()
    final_pipe = main_process_pipeline(accelerator, training_module, pipe)
    if accelerator.is_main_process:
        final_pipe.transformer.eval()
        save_pipeline(final_pipe, output_dir, getattr(torch, training["save_dtype"]))
        logger.info(f"Saved the pipeline to {output_dir}")
        if isinstance(dataset, VideoCaptionDataset) and dataset.num_skipped:
            logger.warning(f"{dataset.num_skipped} file(s) were skipped: {sorted(dataset.skipped)[:5]}")
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    sys.exit(main())
