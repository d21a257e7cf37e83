# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Write converted weights as diffusers model folders, one shard in memory at a time, never half-written.

`staged_output_directory` gives a fresh directory next to the target and moves it into place only once
everything in it is complete; `write_transformer_folder` fills a (sub)folder with `config.json` and sharded
safetensors. A full pipeline folder is several such writes inside one staged directory.
"""

import contextlib
import json
import os
import re
import shutil
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from diffusers.utils.constants import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

from . import DEFAULT_MAX_SHARD_SIZE, TORCH_DTYPE_NAMES
from .convert_starflow import (
    ConversionError,
    build_empty_model,
    check_against_model,
    default_scheduler_config,
    load_and_convert_original,
    load_original_config,
    pipeline_config_from_original,
)


DTYPES = {name: getattr(torch, torch_name) for name, torch_name in TORCH_DTYPE_NAMES.items()}
# Decimal units, as in `ModelMixin.save_pretrained(max_shard_size=...)`.
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*$", re.IGNORECASE)


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "64KB" or "1000" (decimal units)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE_PATTERN.match(str(size))
        if match is None:
            raise ConversionError(
                f"max_shard_size must be a number of bytes or a size with a unit (B, KB, MB, GB, TB), e.g. "
                f"'5GB'; got {size!r}."
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ConversionError(f"max_shard_size must be positive, got {size!r}.")
    return value


def _output_nbytes(tensor: torch.Tensor, torch_dtype: torch.dtype) -> int:
    itemsize = torch_dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * itemsize


def plan_shards(
    tensors: Mapping[str, torch.Tensor], torch_dtype: torch.dtype, max_shard_bytes: int
) -> List[List[str]]:
    """Group keys, in order, into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: List[List[str]] = [[]]
    shard_bytes = 0
    for key, tensor in tensors.items():
        nbytes = _output_nbytes(tensor, torch_dtype)
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += nbytes
    return shards


def shard_file_names(num_shards: int) -> List[str]:
    """diffusers' names: one file, or `diffusion_pytorch_model-0000i-of-0000n.safetensors`."""
    if num_shards == 1:
        return [SAFETENSORS_WEIGHTS_NAME]
    stem = SAFETENSORS_WEIGHTS_NAME.removesuffix(".safetensors")
    return [f"{stem}-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]


def save_shard(tensors: Dict[str, torch.Tensor], path: str) -> None:
    save_file(tensors, path, metadata={"format": "pt"})
    # safetensors creates its files private (0600); give them the usual permissions, like config.json
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_transformer_folder(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    directory: str,
    torch_dtype: torch.dtype = torch.float32,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> Dict[str, Any]:
    """Write `config.json` and the weights of a `StarFlowVTransformer` into `directory` (created if needed).

    `state_dict` is in this package's names (see `convert_state_dict`); its tensors may be views of a
    memory-mapped checkpoint. Only one shard's tensors are materialised at a time, so the memory on top of
    the (reclaimable) mapped checkpoint is at most one shard. Returns a summary: files, tensors, bytes.
    """
    max_shard_bytes = parse_size(max_shard_size)
    model = build_empty_model(config)
    check_against_model(state_dict, model)
    # model order keeps each layer's tensors together in one shard where possible
    ordered = {key: state_dict[key] for key in model.state_dict()}
    shards = plan_shards(ordered, torch_dtype, max_shard_bytes)
    names = shard_file_names(len(shards))

    os.makedirs(directory, exist_ok=True)
    weight_map = {}
    total_size = 0
    for keys, name in zip(tqdm(shards, desc="writing shards", unit="shard", disable=None), names):
        # `.to` is a no-op for tensors already in the target dtype: those are written straight from the
        # mapped checkpoint. Views of one tensor (the split qkv) do not overlap, which safetensors accepts.
        shard = {}
        for key in keys:
            tensor = ordered[key]
            shard[key] = (tensor.to(torch_dtype) if tensor.is_floating_point() else tensor).contiguous()
        save_shard(shard, os.path.join(directory, name))
        total_size += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(keys, name))
        del shard

    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.save_config(directory)
    return {"files": names, "num_tensors": len(ordered), "total_size": total_size}


# Every folder the converter writes holds this file; `--overwrite` replaces only such folders.
MARKER_NAME = ".starflow-conversion.json"
# What a conversion writes at the top of its folder (anything else there is the user's).
_WRITTEN_NAMES = re.compile(
    rf"^({re.escape(MARKER_NAME)}|config\.json|model_index\.json|diffusion_pytorch_model.*\.safetensors(\.index\.json)?"
    r"|transformer|scheduler|vae|text_encoder|tokenizer)$"
)
_STAGING_PATTERN = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-[0-9a-f]{8}(?P<old>\.old)?$")


def _is_within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_output_directory(output_dir: str, overwrite: bool = False, inputs: Sequence[str] = ()) -> None:
    """Refuse an output path that is a file, holds any of the `inputs`, or is a non-empty folder; with
    `overwrite`, a non-empty folder is accepted only if a previous conversion wrote it (its marker file) and
    it holds nothing else."""
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise ConversionError(f"output path {output_dir} exists and is not a directory.")
    for path in inputs:
        if path and _is_within(path, output_dir):
            raise ConversionError(
                f"output directory {output_dir} contains the input {path}; write the conversion to a new folder."
            )
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    if not overwrite:
        raise ConversionError(
            f"output directory {output_dir} already exists and is not empty; pass --overwrite to replace a "
            f"folder an earlier conversion wrote."
        )
    if not os.path.isfile(os.path.join(output_dir, MARKER_NAME)):
        raise ConversionError(
            f"output directory {output_dir} was not written by starflow-convert (it has no {MARKER_NAME}); "
            f"--overwrite only replaces an earlier conversion's folder."
        )
    foreign = sorted(name for name in os.listdir(output_dir) if not _WRITTEN_NAMES.match(name))
    if foreign:
        raise ConversionError(
            f"output directory {output_dir} holds files a conversion does not write ({', '.join(foreign[:5])}); "
            f"move them away or choose another --output."
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(output_dir: str) -> List[str]:
    """Remove the staging folders of conversions into `output_dir` whose process is gone (killed runs).

    Only folders named like ours, holding our marker, of a process that no longer runs are touched. A
    moved-aside previous output (`.old`) goes back into place if the new one never arrived."""
    parent, name = os.path.split(os.path.abspath(output_dir))
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in sorted(os.listdir(parent)):
        match = _STAGING_PATTERN.match(entry)
        path = os.path.join(parent, entry)
        if (
            match is None or match.group("name") != name or not os.path.isdir(path)
            or not os.path.isfile(os.path.join(path, MARKER_NAME)) or _process_alive(int(match.group("pid")))
        ):
            continue
        if match.group("old") and not os.path.lexists(output_dir):
            os.rename(path, output_dir)
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _write_marker(directory: str, inputs: Sequence[str]) -> None:
    with open(os.path.join(directory, MARKER_NAME), "w", encoding="utf-8") as f:
        json.dump({"written_by": "starflow-convert", "inputs": [os.path.abspath(p) for p in inputs if p]}, f)
        f.write("\n")


@contextlib.contextmanager
def staged_output_directory(output_dir: str, overwrite: bool = False, inputs: Sequence[str] = ()) -> Iterator[str]:
    """Yield an empty staging directory beside `output_dir`; on success it replaces `output_dir`.

    Staging on the same filesystem makes the final step a rename. An existing output (checked by
    `check_output_directory`) is moved aside, the new one moved in, and only then the old one deleted. On
    any error or interrupt the staging directory is removed and an existing output is left as it was; a
    killed run's leftovers are cleaned up by the next run (`clean_stale_staging`).
    """
    output_dir = os.path.abspath(output_dir)
    clean_stale_staging(output_dir)
    check_output_directory(output_dir, overwrite, inputs)
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    try:
        _write_marker(staging, inputs)
        yield staging
        check_output_directory(output_dir, overwrite, inputs)
        _move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: str, output_dir: str) -> None:
    if not os.path.isdir(output_dir):
        os.rename(staging, output_dir)
        return
    old = f"{staging}.old"
    os.rename(output_dir, old)
    try:
        os.rename(staging, output_dir)
    except BaseException:
        os.rename(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def convert_checkpoint_to_folder(
    checkpoint_path: str,
    config_path: str,
    output_dir: str,
    torch_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> Dict[str, Any]:
    """Convert an original checkpoint + YAML into a folder loadable by `StarFlowVTransformer.from_pretrained`.

    Everything is validated (arguments, output directory, checkpoint keys and shapes) before anything is
    written. Returns the summary of `write_transformer_folder`.
    """
    parse_size(max_shard_size)
    inputs = (checkpoint_path, config_path)
    check_output_directory(output_dir, overwrite, inputs)
    config, state_dict = load_and_convert_original(checkpoint_path, config_path)
    with staged_output_directory(output_dir, overwrite, inputs) as staging:
        return write_transformer_folder(state_dict, config, staging, torch_dtype, max_shard_size)


def _component_directory(path: str, flag: str, subfolder: str) -> str:
    """A component folder, or a pipeline folder holding it in `subfolder` (e.g. a diffusers Wan repo)."""
    if not os.path.isdir(path):
        raise ConversionError(f"{flag} {path}: not a directory.")
    nested = os.path.join(path, subfolder)
    return nested if os.path.isdir(nested) else path


def load_pipeline_components(
    config: Mapping[str, Any],
    vae_path: Optional[str] = None,
    text_encoder_path: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    torch_dtype: torch.dtype = torch.float32,
) -> Dict[str, Any]:
    """Load the optional VAE, text encoder and tokenizer, and check that they fit the transformer config."""
    components: Dict[str, Any] = {"vae": None, "text_encoder": None, "tokenizer": None}
    if vae_path is not None:
        from diffusers import AutoencoderKL, AutoencoderKLWan

        vae_class = AutoencoderKLWan if config["is_video"] else AutoencoderKL
        try:
            vae = vae_class.from_pretrained(_component_directory(vae_path, "--vae", "vae"))
        except (OSError, ValueError, EnvironmentError) as e:
            raise ConversionError(f"--vae {vae_path}: cannot load a {vae_class.__name__}: {e}") from e
        channels = vae.config.z_dim if config["is_video"] else vae.config.latent_channels
        if channels != config["in_channels"]:
            raise ConversionError(
                f"--vae {vae_path} has {channels} latent channels; the checkpoint expects {config['in_channels']}."
            )
        components["vae"] = vae
    if text_encoder_path is not None:
        from transformers import T5EncoderModel

        try:
            encoder = T5EncoderModel.from_pretrained(_component_directory(text_encoder_path, "--text-encoder", "text_encoder"))
        except (OSError, ValueError, EnvironmentError) as e:
            raise ConversionError(f"--text-encoder {text_encoder_path}: cannot load a T5 encoder: {e}") from e
        if encoder.config.d_model != config["text_embed_dim"]:
            raise ConversionError(
                f"--text-encoder {text_encoder_path} outputs {encoder.config.d_model} dims; the checkpoint's text "
                f"projection expects {config['text_embed_dim']}."
            )
        components["text_encoder"] = encoder.to(torch_dtype)
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        try:
            components["tokenizer"] = AutoTokenizer.from_pretrained(_component_directory(tokenizer_path, "--tokenizer", "tokenizer"))
        except (OSError, ValueError, EnvironmentError) as e:
            raise ConversionError(f"--tokenizer {tokenizer_path}: cannot load a tokenizer: {e}") from e
    if (components["text_encoder"] is None) != (components["tokenizer"] is None):
        raise ConversionError("pass --text-encoder and --tokenizer together (prompts need both).")
    return components


def convert_checkpoint_to_pipeline_folder(
    checkpoint_path: str,
    config_path: str,
    output_dir: str,
    vae_path: Optional[str] = None,
    text_encoder_path: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    torch_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> Dict[str, Any]:
    """Convert into a pipeline folder (`StarFlowVPipeline` for video models, `StarFlowPipeline` for image
    models): model_index.json with the original conditioning settings, transformer/, scheduler/ and the given
    vae/, text_encoder/, tokenizer/. The transformer is never materialised: its weights stream to disk."""
    from ..pipelines import StarFlowPipeline, StarFlowVPipeline
    from ..schedulers import JacobiFlowScheduler

    parse_size(max_shard_size)
    inputs = (checkpoint_path, config_path, vae_path, text_encoder_path, tokenizer_path)
    check_output_directory(output_dir, overwrite, inputs)
    config, state_dict = load_and_convert_original(checkpoint_path, config_path)
    pipeline_config = pipeline_config_from_original(load_original_config(config_path))
    components = load_pipeline_components(config, vae_path, text_encoder_path, tokenizer_path, torch_dtype)
    pipeline_class = StarFlowVPipeline if config["is_video"] else StarFlowPipeline
    scheduler = JacobiFlowScheduler(**default_scheduler_config(config))
    # a meta-device transformer: the pipeline object only serves to write model_index.json
    pipeline = pipeline_class(transformer=build_empty_model(config), scheduler=scheduler, **components, **pipeline_config)
    with staged_output_directory(output_dir, overwrite, inputs) as staging:
        pipeline.save_config(staging)
        scheduler.save_pretrained(os.path.join(staging, "scheduler"))
        for name, component in components.items():
            if component is not None:
                component.save_pretrained(os.path.join(staging, name))
        summary = write_transformer_folder(state_dict, config, os.path.join(staging, "transformer"), torch_dtype, max_shard_size)
    return dict(summary, pipeline=pipeline_class.__name__, components=[k for k, v in components.items() if v is not None])
