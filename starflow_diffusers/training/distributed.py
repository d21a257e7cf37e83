# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""What the trainers need to run sharded (FSDP2 or DeepSpeed through accelerate) as well as on one process or
with DDP.

Under FSDP2 every parameter of the prepared module is a `DTensor` shard, replaced at `prepare`: parameter
lists must be taken after it, and anything that reads whole weights (saving, validation) needs them
gathered first. The gathers here are collective: every process calls them, in the same order.
"""

import contextlib
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple


if TYPE_CHECKING:
    import torch


FSDP1_UNSUPPORTED = (
    "starflow trainers support FSDP2 only (`fsdp_version: 2` in the accelerate config). FSDP1 flattens each "
    "wrapped unit into one tensor of a single dtype, so it cannot hold frozen half-precision weights next to "
    "float32 LoRA parameters, and its flat shards make the per-group gradient clipping (flow and denoiser) "
    "wrong. Use FSDP2, DDP or DeepSpeed."
)


def fsdp_version(accelerator) -> Optional[int]:
    """1 or 2 when the accelerator shards with FSDP, else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)


def check_fsdp_version(version: Optional[int]) -> None:
    """Refuse FSDP1 before any weight is loaded."""
    if version == 1:
        raise ValueError(FSDP1_UNSUPPORTED)


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator, max_grad_norm: float) -> None:
    """Under DeepSpeed, check and complete its config before any weight is loaded.

    The engine clips (one norm over all parameters) with its config's `gradient_clipping`, which accelerate
    sets to 1.0 when it is "auto". So "auto" (or no value) becomes `max_grad_norm`, and a value that differs
    from it is refused, naming both: the trainer's setting would otherwise be ignored. Under ZeRO-3, the
    gathering of whole weights for saving is turned on."""
    if not uses_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    if plugin.zero_stage == 3:
        # checkpoints, validation and the saved pipeline read whole weights
        zero = config.setdefault("zero_optimization", {})
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise ValueError(
                "Under ZeRO-3 the trainers save and sample whole weights: set "
                "`stage3_gather_16bit_weights_on_model_save: true` (`zero3_save_16bit_model: true`) in the "
                "DeepSpeed config."
            )
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    clipping = config.get("gradient_clipping", "auto")
    if clipping in ("auto", None):
        config["gradient_clipping"] = max_grad_norm
    elif float(clipping) != max_grad_norm:
        raise ValueError(
            f"The DeepSpeed config's `gradient_clipping` ({clipping}) differs from `max_grad_norm` "
            f"({max_grad_norm}); DeepSpeed clips inside its engine with its own value. Set them equal, or "
            "`gradient_clipping: auto`."
        )


@contextlib.contextmanager
def whole_weights_loading(accelerator):
    """A context to load the pipeline in. Under a DeepSpeed ZeRO-3 config, transformers' `from_pretrained`
    creates models already partitioned (`deepspeed.zero.Init`), which would leave the frozen text encoder,
    which runs outside the engine, without its weights; the engine partitions the transformer itself at
    `prepare`. accelerate's `zero3_init_context_manager(enable=False)` keeps the config transformers reads
    (accelerate 1.15), so the context removes that config and restores it on exit."""
    if not uses_deepspeed(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def zero_stage(accelerator) -> Optional[int]:
    """DeepSpeed's ZeRO stage, or None without DeepSpeed."""
    return accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else None


def deepspeed_step_settings(accelerator) -> Dict[str, bool]:
    """The `FlowStepSettings` fields the engine decides: under DeepSpeed one backward per micro-batch
    (`single_backward`), and under ZeRO-3 the denoiser's score from a flow pass of its own
    (`separate_score_pass`)."""
    return {"single_backward": uses_deepspeed(accelerator), "separate_score_pass": zero_stage(accelerator) == 3}


def is_sharded(accelerator) -> bool:
    """Whether each process holds only part of every parameter: FSDP2, or DeepSpeed ZeRO-3."""
    return fsdp_version(accelerator) == 2 or zero_stage(accelerator) == 3


def restores_model_itself(accelerator) -> bool:
    """Whether `accelerator.load_state` reloads the module's weights itself (FSDP2's shards, DeepSpeed's
    engine checkpoint), so that a trainer's load hook must leave them alone."""
    return fsdp_version(accelerator) == 2 or uses_deepspeed(accelerator)


def gathered(accelerator, params: List["torch.nn.Parameter"]):
    """A context in which ZeRO-3-partitioned `params` hold their whole values (collective: every process
    enters it); nothing to do otherwise (FSDP2's DTensors are gathered by `full_tensor`)."""
    if zero_stage(accelerator) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_tensor(tensor: "torch.Tensor") -> "torch.Tensor":
    """The whole tensor of a `DTensor` shard (collective), or the tensor itself."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_tensors(state: Dict[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
    """Whole, detached CPU copies of `state`'s tensors, gathered one by one (collective under FSDP2): cheap
    for a LoRA, whose tensors are small, without gathering the frozen weights."""
    return {name: full_tensor(value).detach().cpu().clone() for name, value in state.items()}


def trainable_parameter_groups(transformer) -> Tuple[List["torch.nn.Parameter"], List["torch.nn.Parameter"]]:
    """The trainable parameters of the flow and of the learned denoiser, clipped and stepped as two groups.
    Call it again after `accelerator.prepare`: FSDP2 replaces every parameter by its shard."""
    flow, denoiser = [], []
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            (denoiser if name.startswith("denoiser.") else flow).append(param)
    return flow, denoiser


def unsharded_copy(model, state: Dict[str, "torch.Tensor"]):
    """A plain (unsharded) copy of `model` holding its gathered `state`, with the same LoRA adapters. Built on
    the meta device, so the only memory it takes is `state`'s."""
    import torch

    with torch.device("meta"):
        copy = type(model).from_config(model.config)
        for name, config in getattr(model, "peft_config", {}).items():
            copy.add_adapter(config, adapter_name=name)
    copy.load_state_dict(state, assign=True, strict=True)
    copy.requires_grad_(False)
    return copy.eval()


def main_process_pipeline(accelerator, training_module, pipe, device=None):
    """What the main process samples and saves with: `pipe` itself, or when sharded (FSDP2, ZeRO-3) a pipeline
    sharing `pipe`'s other components around an unsharded copy of the transformer gathered from
    `training_module` (a `StarFlowTrainingModule`), on `device` (default: the CPU). Collective when sharded:
    every process calls it, and all but the main one get None. It never samples on a shard."""
    if not is_sharded(accelerator):
        return pipe
    state = accelerator.get_state_dict(training_module)  # whole tensors, on the main process only
    if not accelerator.is_main_process:
        return None
    copy = unsharded_copy(pipe.transformer, {name.removeprefix("transformer."): value for name, value in state.items()})
    return type(pipe).from_pipe(pipe, transformer=copy if device is None else copy.to(device))
