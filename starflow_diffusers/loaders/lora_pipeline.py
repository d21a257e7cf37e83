# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""LoRA loading and saving for the STARFlow pipelines, in the diffusers LoRA format.

A STARFlow LoRA only adapts the `transformer` (the flow, and optionally its learned denoiser). Files are
`pytorch_lora_weights.safetensors` (or `.bin` with `safe_serialization=False`, read back with weights-only
unpickling) with PEFT keys prefixed `transformer.` and, when given, the adapter's `LoraConfig` in the
safetensors header, so that a LoRA trained with `lora_alpha != rank` reloads at the right scale.
Activation, weighting, fusing and removal of adapters (`set_adapters`, `fuse_lora`, `disable_lora`, ...)
come from diffusers' `LoraBaseMixin`.
"""

import json
import os
import tempfile
from typing import Callable, Dict, Optional, Union

import safetensors.torch
import torch

from diffusers.loaders.lora_base import (
    LORA_ADAPTER_METADATA_KEY,
    LORA_WEIGHT_NAME,
    LORA_WEIGHT_NAME_SAFE,
    LoraBaseMixin,
    _fetch_state_dict,
    _pack_dict_with_prefix,
)
from diffusers.utils import USE_PEFT_BACKEND, logging


logger = logging.get_logger(__name__)

TRANSFORMER_NAME = "transformer"


class StarFlowVLoraLoaderMixin(LoraBaseMixin):
    r"""
    Load and save LoRA layers of [`StarFlowVTransformer`] on [`StarFlowVPipeline`], its image-to-video and
    video-to-video variants, and [`StarFlowPipeline`].
    """

    _lora_loadable_modules = [TRANSFORMER_NAME]
    transformer_name = TRANSFORMER_NAME

    @classmethod
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]],
        **kwargs,
    ):
        r"""
        Read a LoRA state dict (and, with `return_lora_metadata=True`, its adapter metadata).

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`): a folder holding
                `pytorch_lora_weights.safetensors` (or `weight_name`), a Hub repository id, or a state dict.
            weight_name (`str`, *optional*): the file name inside the folder.
            subfolder, cache_dir, force_download, proxies, local_files_only, token, revision: as for
                `from_pretrained`.
            return_lora_metadata (`bool`): also return the adapter metadata (`None` when absent).
            use_safetensors (`bool`, *optional*): as in diffusers: None reads `.safetensors` when there is one
                and falls back to `pytorch_lora_weights.bin`; False reads the `.bin`.

        A `.bin` file is read with weights-only unpickling (diffusers' `load_state_dict`): a pickle that needs
        anything but tensors is refused.
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        use_safetensors = kwargs.pop("use_safetensors", None)
        weight_name = kwargs.pop("weight_name", None)
        if weight_name is not None and not weight_name.endswith((".safetensors", ".bin")):
            raise ValueError(f"`weight_name` must be a .safetensors or .bin file, got {weight_name!r}.")

        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=weight_name,
            use_safetensors=use_safetensors is not False,
            local_files_only=kwargs.pop("local_files_only", None),
            cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False),
            proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None),
            revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None),
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            allow_pickle=use_safetensors is not True,
        )
        if any("dora_scale" in key for key in state_dict):
            logger.warning("DoRA checkpoints are not supported; the `dora_scale` entries are ignored.")
            state_dict = {k: v for k, v in state_dict.items() if "dora_scale" not in k}
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: Union[str, os.PathLike, Dict[str, torch.Tensor]],
        adapter_name: Optional[str] = None,
        hotswap: bool = False,
        **kwargs,
    ):
        r"""
        Load a LoRA into `self.transformer` as the adapter `adapter_name` (default: a new "default_N" name).

        Accepts what [`~StarFlowVLoraLoaderMixin.lora_state_dict`] accepts, plus `low_cpu_mem_usage`.
        Combine several adapters afterwards with `set_adapters([...], [w1, w2])`.
        """
        if not USE_PEFT_BACKEND:
            raise ValueError("PEFT backend is required for `load_lora_weights`; install `peft`.")
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not state_dict or not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every parameter name must contain 'lora'.")
        broken = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise ValueError(f"Invalid LoRA checkpoint: {len(broken)} tensor(s) hold NaN or infinity, e.g. {broken[0]}.")
        self.load_lora_into_transformer(
            state_dict,
            transformer=self.transformer,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict: Dict[str, torch.Tensor],
        transformer,
        adapter_name: Optional[str] = None,
        _pipeline=None,
        low_cpu_mem_usage: bool = False,
        hotswap: bool = False,
        metadata: Optional[dict] = None,
    ):
        """Inject the `transformer.`-prefixed entries of `state_dict` into `transformer` as a PEFT adapter."""
        transformer.load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
            prefix=cls.transformer_name,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: Union[str, os.PathLike],
        transformer_lora_layers: Dict[str, Union[torch.nn.Module, torch.Tensor]] = None,
        is_main_process: bool = True,
        weight_name: Optional[str] = None,
        save_function: Optional[Callable] = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: Optional[dict] = None,
    ):
        r"""
        Write the LoRA into `save_directory` as diffusers does, atomically (a temporary file, then a rename):
        `pytorch_lora_weights.safetensors`, or `pytorch_lora_weights.bin` with `safe_serialization=False`.

        Args:
            transformer_lora_layers (`dict` or `torch.nn.Module`): the adapter's weights, e.g.
                `peft.get_peft_model_state_dict(transformer, adapter_name=...)`.
            is_main_process (`bool`): only the main process writes (distributed training).
            weight_name (`str`, *optional*): the file name.
            save_function (`Callable`, *optional*): `save_function(state_dict, path)` replaces the writer.
            safe_serialization (`bool`): safetensors (default) or a pickled `.bin`.
            transformer_lora_adapter_metadata (`dict`, *optional*): the adapter's config,
                `transformer.peft_config[adapter_name].to_dict()`, stored in the safetensors header. Without
                it a reload infers the rank from the weights and takes `lora_alpha` = rank (diffusers'
                rule), which is a different scale for a LoRA trained with another alpha (a warning says so).
        """
        if not transformer_lora_layers:
            raise ValueError("`transformer_lora_layers` is empty: there is no LoRA to save.")
        if not is_main_process:
            return
        weight_name = weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME)
        suffix = ".safetensors" if safe_serialization else ".bin"
        if not weight_name.endswith(suffix):
            raise ValueError(f"`weight_name` must end with {suffix} (safe_serialization={safe_serialization}), got {weight_name!r}.")
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` {save_directory} is a file, not a directory.")
        if transformer_lora_adapter_metadata is None:
            logger.warning(
                "No `transformer_lora_adapter_metadata`: a reload will take lora_alpha = rank. Pass "
                "`transformer.peft_config[adapter_name].to_dict()` to keep the adapter's own alpha."
            )

        state_dict = cls.pack_weights(transformer_lora_layers, cls.transformer_name)
        state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
        header = {"format": "pt"}
        if transformer_lora_adapter_metadata and safe_serialization:
            adapter_metadata = {
                key: sorted(value) if isinstance(value, set) else value
                for key, value in _pack_dict_with_prefix(transformer_lora_adapter_metadata, cls.transformer_name).items()
            }
            header[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata, indent=2, sort_keys=True)
        if save_function is None:
            if safe_serialization:
                def save_function(weights, filename):
                    safetensors.torch.save_file(weights, filename, metadata=header)
            else:
                save_function = torch.save

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, weight_name)
        # write next to the target, then rename: a reader never sees a half-written file
        fd, tmp_path = tempfile.mkstemp(dir=save_directory, prefix=f".{weight_name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_function(state_dict, tmp_path)
            os.chmod(tmp_path, 0o644)  # mkstemp makes it private; a saved LoRA is an ordinary file
            os.replace(tmp_path, path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise
        logger.info(f"LoRA weights saved in {path}")

    def fuse_lora(
        self,
        components=(TRANSFORMER_NAME,),
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names=None,
        **kwargs,
    ):
        r"""
        Merge the active (or `adapter_names`) LoRA layers into the transformer's weights, scaled by
        `lora_scale`; `unfuse_lora` restores the original weights.
        """
        super().fuse_lora(
            components=list(components), lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs
        )

    def unfuse_lora(self, components=(TRANSFORMER_NAME,), **kwargs):
        r"""Undo [`~StarFlowVLoraLoaderMixin.fuse_lora`]."""
        super().unfuse_lora(components=list(components), **kwargs)
