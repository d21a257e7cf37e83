# Copyright 2025 The starflow-diffusers authors. Licensed under the Apache License, Version 2.0.
"""What the trainers need to run sharded (FSDP2 through accelerate) as well as on one process or with DDP.

Under FSDP2 every parameter of the prepared module is a `DTensor` shard, replaced at `prepare`: parameter
lists must be taken after it, and anything that reads whole weights (saving, validation) needs them
gathered first. The gathers here are collective: every process calls them, in the same order.
"""

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


def is_sharded(accelerator) -> bool:
    return fsdp_version(accelerator) == 2


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
    """What the main process samples and saves with: `pipe` itself, or under FSDP2 a pipeline sharing `pipe`'s
    other components around an unsharded copy of the transformer gathered from `training_module` (a
    `StarFlowTrainingModule`), on `device` (default: the CPU). Collective under FSDP2: every process calls
    it, and all but the main one get None. It never samples on a shard."""
    if not is_sharded(accelerator):
        return pipe
    state = accelerator.get_state_dict(training_module)  # whole tensors, on the main process only
    if not accelerator.is_main_process:
        return None
    copy = unsharded_copy(pipe.transformer, {name.removeprefix("transformer."): value for name, value in state.items()})
    return type(pipe).from_pipe(pipe, transformer=copy if device is None else copy.to(device))
