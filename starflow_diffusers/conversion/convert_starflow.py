# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Convert Apple's original STARFlow / STARFlow-V checkpoints (raw state dict + `arguments:` YAML)."""

import os
import pickle
import re
import warnings
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
import yaml

from ..models.transformer_starflow_v import StarFlowVTransformer


class ConversionError(ValueError):
    """The original checkpoint or config cannot be converted; the message says what is wrong."""


# YAML fields without which a model cannot be built.
REQUIRED_FIELDS = ("channel_size", "img_size", "patch_size", "channels", "blocks", "layers_per_block", "txt_size",
                   "noise_std")
# Architecture switches of the research code: the released models use exactly these values, the only
# ones this package implements.
SUPPORTED_SWITCHES = {
    "rope": 1,
    "sos": 1,
    "use_softplus": 1,
    "use_final_norm": 1,
    "cond_top_only": 1,
    "seq_order": "L2R",
    "adaln": 0,
    "nvp": 1,
}
# Buffers the research code registers but never reads.
DEPRECATED_KEY_PATTERNS = (
    re.compile(r"^var$"),
    re.compile(r"^blocks\.\d+\.attn_mask$"),
    re.compile(r"^feat_rope(_gen)?\.freqs_(cos|sin)$"),
)
# Text encoders of the releases, for building a model from a YAML alone (no checkpoint to read it from).
KNOWN_TEXT_WIDTHS = {"google/flan-t5-xl": 2048, "google/flan-t5-large": 1024, "google/flan-t5-base": 768}
# Latent frames per pixel frame group of the video VAE (Wan2.2: 4k+1 pixel frames -> k+1 latent frames).
VIDEO_TEMPORAL_FACTOR = 4


def load_original_config(config_path: str) -> Dict[str, Any]:
    """Read an original `arguments:` YAML into a flat dict."""
    if not os.path.isfile(config_path):
        raise ConversionError(f"config file not found: {config_path}")
    try:
        with open(config_path, "r", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConversionError(f"{config_path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("arguments"), list):
        raise ConversionError(f"{config_path} must have a top-level `arguments:` list (the original training format).")
    args: Dict[str, Any] = {}
    for item in raw["arguments"]:
        if not isinstance(item, dict):
            raise ConversionError(f"{config_path}: every `arguments` entry must be `- name: value`, got {item!r}.")
        args.update(item)
    return args


def _int_list(value) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in str(value).split())


def vae_spatial_factor(vae_name: Optional[str]) -> int:
    """Pixels per latent cell of the release's VAEs (a model without VAE works in pixel space)."""
    if not vae_name or str(vae_name).lower() == "none":
        return 1
    return 16 if "wan2.2" in str(vae_name).lower() else 8


def transformer_config_from_original(args: Mapping[str, Any], text_embed_dim: Optional[int] = None) -> Dict[str, Any]:
    """Translate original YAML arguments into `StarFlowVTransformer` config values.

    `text_embed_dim` comes from the checkpoint (its `proj_txt` weight); without it, the YAML's text encoder
    must be one of `KNOWN_TEXT_WIDTHS`.
    """
    missing = [name for name in REQUIRED_FIELDS if name not in args]
    if missing:
        raise ConversionError(f"the original config is missing required field(s): {', '.join(missing)}.")
    wrong = {k: args[k] for k, v in SUPPORTED_SWITCHES.items() if k in args and args[k] != v}
    absent = [k for k in ("rope", "sos", "use_softplus", "use_final_norm", "cond_top_only") if k not in args]
    if wrong or absent:
        details = [f"{k}={v!r} (supported: {SUPPORTED_SWITCHES[k]!r})" for k, v in wrong.items()]
        details += [f"{k} missing (supported: {SUPPORTED_SWITCHES[k]!r})" for k in absent]
        raise ConversionError("unsupported architecture settings: " + "; ".join(details))

    num_blocks = int(args["blocks"])
    layers = _int_list(args["layers_per_block"])
    if len(layers) == 1:
        layers = layers * num_blocks
    if len(layers) != num_blocks:
        raise ConversionError(f"layers_per_block has {len(layers)} entries for blocks={num_blocks}.")

    if text_embed_dim is None:
        text_embed_dim = args.get("txt_dim") or KNOWN_TEXT_WIDTHS.get(str(args.get("text")))
        if text_embed_dim is None:
            raise ConversionError(
                f"cannot infer the text width: the YAML's text encoder {args.get('text')!r} is not one of "
                f"{sorted(KNOWN_TEXT_WIDTHS)}; convert from a checkpoint or pass text_embed_dim."
            )
    elif args.get("txt_dim") not in (None, text_embed_dim):
        raise ConversionError(f"YAML txt_dim={args['txt_dim']} but the checkpoint's text projection is {text_embed_dim}.")

    temporal_causal = int(args.get("temporal_causal", 0))
    is_video = temporal_causal > 0
    patch_size = int(args["patch_size"])
    latent_size = int(args["img_size"]) // vae_spatial_factor(args.get("vae"))
    trained_frames = None
    if is_video and "vid_size" in args:
        pixel_frames = int(str(args["vid_size"]).split(":")[0])
        trained_frames = (pixel_frames - 1) // VIDEO_TEMPORAL_FACTOR + 1
    denoiser = bool(args.get("learnable_self_denoiser", 0))
    if denoiser and not is_video:
        raise ConversionError("a learned denoiser is only supported for video models (temporal_causal > 0).")

    return dict(
        in_channels=int(args["channel_size"]),
        patch_size=patch_size,
        num_layers_per_block=list(layers),
        shallow_width=int(args["channels"]),
        deep_width=int(args.get("top_block_channels") or args["channels"]),
        attention_head_dim=int(args.get("head_dim", 64)),
        text_embed_dim=int(text_embed_dim),
        max_text_length=int(args["txt_size"]),
        rope_base_size=int(args.get("pt_seq_len") or latent_size // patch_size),
        output_soft_clip=float(args.get("soft_clip", 0) or 0),
        is_video=is_video,
        shallow_blocks_per_frame=bool(args.get("shallow_block_local", 0)) and is_video,
        denoiser_num_layers=8 if denoiser else 0,
        denoiser_text_conditioned=bool(args.get("conditional_denoiser", 0)),
        denoiser_window=int(args["denoiser_window"]) if args.get("denoiser_window") else None,
        denoiser_lookahead=max(temporal_causal - 1, 0),
        noise_std=float(args["noise_std"]),
        trained_latent_frames=trained_frames,
        sample_size=latent_size // patch_size,
    )


def pipeline_config_from_original(args: Mapping[str, Any]) -> Dict[str, Any]:
    """Conditioning settings of the original YAML as pipeline config values (`register_to_config` fields).

    Video models get `StarFlowVPipeline` settings, image models `StarFlowPipeline` settings."""
    common = dict(
        noise_level_conditioning=bool(args.get("cond_noise_level", 0)),
        aspect_ratio_conditioning=bool(args.get("mix_aspect", 0)),
        base_frame_size=int(args["img_size"]),
        max_text_length=int(args["txt_size"]),
    )
    vae = str(args.get("vae") or "none")
    spatial = vae_spatial_factor(vae)  # written, so that the pipeline keeps its sizes when loaded without a VAE
    if int(args.get("temporal_causal", 0)) <= 0:
        return dict(common, vae_scale_factor=spatial)
    # the release writes the latent temporal scale after the VAE name: "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6"
    scale = float(vae.rsplit(":", 1)[1]) if ":" in vae else 1.0
    temporal = 1 if spatial == 1 else VIDEO_TEMPORAL_FACTOR
    return dict(
        common, fps_conditioning=bool(args.get("fps_cond", 0)), latent_temporal_scale=scale,
        vae_scale_factor_temporal=temporal, vae_scale_factor_spatial=spatial,
    )


def is_deprecated_key(key: str) -> bool:
    return any(p.match(key) for p in DEPRECATED_KEY_PATTERNS)


_LAYER_RENAMES = {
    "attention.norm": "norm1",
    "attention.proj": "attn.to_out.0",
    "mlp.norm": "norm2",
    "mlp.main.0": "ff.net.0.proj",
    "mlp.main.2": "ff.net.2",
}
_LAYER_KEY = re.compile(r"^attn_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _rename_inside_stack(rest: str) -> Optional[Iterable[Tuple[str, Optional[int]]]]:
    """Map a key inside a flow block / denoiser. Returns [(new key, qkv split index or None)] or None."""
    if rest in ("sos_embed",):
        return [(rest, None)]
    for old, new in (("proj_in", "proj_in"), ("proj_out", "proj_out"), ("proj_txt", "text_proj"), ("final_norm", "norm_out")):
        if rest in (f"{old}.weight", f"{old}.bias"):
            return [(f"{new}.{rest.rsplit('.', 1)[1]}", None)]
    match = _LAYER_KEY.match(rest)
    if match is None:
        return None
    layer, module, kind = match.groups()
    if module == "attention.qkv":
        return [(f"layers.{layer}.attn.to_{n}.{kind}", i) for i, n in enumerate("qkv")]
    if module in _LAYER_RENAMES:
        return [(f"layers.{layer}.{_LAYER_RENAMES[module]}.{kind}", None)]
    return None


def convert_state_dict(original: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename original keys to this package's names and split fused qkv. Tensors are sliced, not copied.

    Deprecated buffers are dropped; any other key that has no mapping is an error listing all of them.
    """
    converted: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in original.items():
        if is_deprecated_key(key):
            continue
        match = re.match(r"^(blocks\.\d+|learnable_self_denoiser)\.(.+)$", key)
        mapped = _rename_inside_stack(match.group(2)) if match else None
        if not mapped:
            unknown.append(key)
            continue
        prefix = match.group(1).replace("learnable_self_denoiser", "denoiser")
        for new_key, split in mapped:
            value = tensor
            if split is not None:
                if tensor.shape[0] % 3:
                    raise ConversionError(f"{key}: fused qkv has {tensor.shape[0]} rows, not divisible by 3.")
                value = tensor.chunk(3, dim=0)[split]
            converted[f"{prefix}.{new_key}"] = value
    if unknown:
        raise ConversionError(f"unknown key(s) in the original checkpoint: {', '.join(sorted(unknown))}")
    return converted


def check_against_model(converted: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every parameter present with its exact shape, nothing extra; errors list every offending key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(converted)
        if tuple(converted[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append("missing key(s): " + ", ".join(missing))
    if extra:
        problems.append("unexpected key(s): " + ", ".join(extra))
    if mismatched:
        problems.append("shape mismatch(es): " + "; ".join(mismatched))
    if problems:
        raise ConversionError("the checkpoint does not match its config: " + " | ".join(problems))


def _reason(error: BaseException) -> str:
    """The error's type and the first line of its message (a KeyError's message alone is just the key)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_original_state_dict(checkpoint_path: str, mmap: bool = True) -> Dict[str, torch.Tensor]:
    """Load an original `.pth` (weights-only unpickling, memory-mapped) or `.safetensors` state dict."""
    if not os.path.isfile(checkpoint_path):
        raise ConversionError(f"checkpoint file not found: {checkpoint_path}")
    if os.path.getsize(checkpoint_path) == 0:
        raise ConversionError(f"checkpoint file is empty: {checkpoint_path}")
    if checkpoint_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(checkpoint_path)
        except Exception as e:  # parsing untrusted bytes: whatever fails, the file is unreadable
            raise ConversionError(f"{checkpoint_path} is not a readable safetensors file: {_reason(e)}") from e
    try:
        with warnings.catch_warnings():
            # random bytes can pass for a pickle of an unknown protocol; the error that follows says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler reports objects it refuses as "Unsupported global"; anything else it
        # stumbles on (an unknown opcode) means the bytes are not a pickle at all.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused is None:
            detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))
            raise ConversionError(
                f"{checkpoint_path} is not a readable PyTorch checkpoint: weights-only unpickling failed "
                f"({detail.group(1) if detail else _reason(e)})"
            ) from e
        raise ConversionError(
            f"{checkpoint_path} holds objects other than tensors ({refused.group(1)}); only weights-only "
            "checkpoints are converted, arbitrary pickles are never executed."
        ) from e
    except Exception as e:  # the weights-only unpickler on corrupt bytes can raise anything (KeyError, ...)
        if mmap and "mmap" in str(e):
            return load_original_state_dict(checkpoint_path, mmap=False)
        raise ConversionError(f"{checkpoint_path} is not a readable PyTorch checkpoint: {_reason(e)}") from e
    for nested in ("model", "state_dict"):
        if isinstance(state, dict) and nested in state and isinstance(state[nested], dict):
            state = state[nested]
    if not isinstance(state, dict):
        raise ConversionError(f"{checkpoint_path} holds a {type(state).__name__}, not a state dict of tensors.")
    not_tensors = sorted(f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"{checkpoint_path} does not contain a state dict of tensors: {', '.join(not_tensors)}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def text_width_from_state_dict(state: Mapping[str, torch.Tensor], num_blocks: int) -> Optional[int]:
    weight = state.get(f"blocks.{num_blocks - 1}.proj_txt.weight")
    return None if weight is None else int(weight.shape[1])


def build_empty_model(config: Mapping[str, Any]) -> StarFlowVTransformer:
    """The model on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return StarFlowVTransformer(**config)


def load_and_convert_original(
    checkpoint_path: str, config_path: str
) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read an original checkpoint and YAML; return the `StarFlowVTransformer` config and the renamed state dict.

    The state dict is checked against a meta-device model of that config (every key and shape), and its
    tensors are still views of the memory-mapped checkpoint: nothing is copied yet.
    """
    args = load_original_config(config_path)
    state = load_original_state_dict(checkpoint_path)
    config = transformer_config_from_original(args, text_width_from_state_dict(state, int(args["blocks"])))
    converted = convert_state_dict(state)
    check_against_model(converted, build_empty_model(config))
    return config, converted


def convert_original_checkpoint(
    checkpoint_path: str, config_path: str, torch_dtype: Optional[torch.dtype] = None
) -> StarFlowVTransformer:
    """Build a `StarFlowVTransformer` holding an original checkpoint's weights.

    The checkpoint is memory-mapped and its tensors are assigned into a meta-initialised model, so peak
    memory stays near one copy of the weights.
    """
    config, converted = load_and_convert_original(checkpoint_path, config_path)
    model = build_empty_model(config)
    if torch_dtype is not None:
        converted = {k: v.to(torch_dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def _single_file_config(checkpoint_path: str, config: Optional[str]) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
    """(original YAML arguments or None, `StarFlowVTransformer` config) for `from_single_file`'s `config`: an
    original YAML, a diffusers transformer folder or its config.json, or None for a YAML beside the checkpoint
    with the same name."""
    if config is None:
        stem = os.path.splitext(checkpoint_path)[0]
        found = [stem + ext for ext in (".yaml", ".yml") if os.path.isfile(stem + ext)]
        if not found:
            raise ConversionError(
                f"`config` is needed for {checkpoint_path}: the original YAML, or a diffusers transformer folder "
                f"(no {os.path.basename(stem)}.yaml beside the checkpoint)."
            )
        config = found[0]
    if os.path.isdir(config) or str(config).endswith(".json"):
        folder = config if os.path.isdir(config) else os.path.dirname(os.path.abspath(config))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ConversionError(f"`config` {config!r} is neither an original YAML nor a folder with config.json.")
        values = StarFlowVTransformer.load_config(folder)
        return None, {k: v for k, v in values.items() if not k.startswith("_")}
    if not str(config).endswith((".yaml", ".yml")) or not os.path.isfile(config):
        raise ConversionError(f"`config` {config!r} must be an original .yaml file, a diffusers folder or a config.json.")
    return load_original_config(config), {}


def transformer_from_single_file(
    checkpoint_path: str, config: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None
) -> Tuple[StarFlowVTransformer, Optional[Dict[str, Any]]]:
    """`StarFlowVTransformer.from_single_file`: the model, and the original YAML arguments when it had them.

    The checkpoint (original keys, or this package's keys in a diffusers config's model) is unpickled
    weights-only and memory-mapped; its tensors go straight into a meta-initialised model."""
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ConversionError(f"`torch_dtype` must be a torch.dtype (e.g. torch.bfloat16), got {torch_dtype!r}.")
    args, model_config = _single_file_config(checkpoint_path, config)
    state = load_original_state_dict(checkpoint_path)
    if args is not None:
        model_config = transformer_config_from_original(args, text_width_from_state_dict(state, int(args["blocks"])))
    model = build_empty_model(model_config)
    own_keys = set(model.state_dict())
    converted = dict(state) if set(state) == own_keys else convert_state_dict(state)
    check_against_model(converted, model)
    if torch_dtype is not None:
        converted = {k: v.to(torch_dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval(), args


def default_scheduler_config(transformer_config: Mapping[str, Any]) -> Dict[str, Any]:
    """Scheduler settings consistent with the model: the released context (16 frames) where the trained
    window allows it, else one frame less than the window, so that long videos work as written."""
    from ..schedulers.scheduling_jacobi_flow import JacobiFlowScheduler

    window = transformer_config.get("trained_latent_frames")
    context = JacobiFlowScheduler().config.context_frames
    return dict(context_frames=min(context, window - 1) if window and window > 1 else context)


def pipeline_from_single_file(pipeline_class, checkpoint_path: str, config: Optional[str], torch_dtype, components):
    """`from_single_file` of a STARFlow pipeline class: the transformer from the checkpoint, the pipeline
    config from the original YAML (when given), a scheduler consistent with the model, and `components`."""
    from ..schedulers.scheduling_jacobi_flow import JacobiFlowScheduler

    allowed = {"scheduler", "vae", "text_encoder", "tokenizer"}
    unknown = sorted(set(components) - allowed)
    if unknown:
        raise ConversionError(f"unknown argument(s) {', '.join(unknown)}; components are {', '.join(sorted(allowed))}.")
    from ..pipelines.pipeline_starflow_v import StarFlowVPipeline

    transformer, args = transformer_from_single_file(checkpoint_path, config, torch_dtype)
    wants_video = issubclass(pipeline_class, StarFlowVPipeline)
    if transformer.config.is_video != wants_video:
        kind = "a video" if transformer.config.is_video else "an image"
        raise ConversionError(
            f"{checkpoint_path} is {kind} model; load it with "
            f"{'StarFlowVPipeline' if transformer.config.is_video else 'StarFlowPipeline'}.from_single_file."
        )
    scheduler = components.pop("scheduler", None) or JacobiFlowScheduler(**default_scheduler_config(transformer.config))
    pipeline_config = pipeline_config_from_original(args) if args is not None else {}
    return pipeline_class(transformer=transformer, scheduler=scheduler, **components, **pipeline_config)
