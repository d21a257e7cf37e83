"""Run a module under accelerate's FSDP or DeepSpeed code paths on CPU processes (gloo), for the
distributed-training tests.

accelerate (1.15) turns an FSDP or DeepSpeed plugin on only for accelerator devices: on CPU processes its
state falls back to plain multi-CPU data parallelism, although torch's FSDP2 runs on gloo and so does
DeepSpeed's CPU accelerator. This launcher keeps the plugin (every time the shared state is initialised), as
accelerate does on GPUs, so that accelerate's own FSDP2 or DeepSpeed prepare, clipping, state-dict gathering
and checkpointing run here. Nothing else is changed.

    ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true FSDP_VERSION=2 \\
        python -m torch.distributed.run --nproc_per_node 2 tests/launch_on_cpu.py -m <module> <args>
    ACCELERATE_USE_CPU=true ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=2 \\
        python -m torch.distributed.run --nproc_per_node 2 tests/launch_on_cpu.py -m <module> <args>
"""

import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType


_initialise = AcceleratorState.__init__


def _initialise_keeping_plugins(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
    _initialise(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    fsdp_plugin = fsdp_plugin or self.__dict__.get("fsdp_plugin")
    deepspeed_plugin = deepspeed_plugin or self.__dict__.get("deepspeed_plugins")
    if fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None:
        # what accelerate's state does for DeepSpeed on accelerators: the DeepSpeed config holds the precision
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
        self._mixed_precision = "no"


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: launch_on_cpu.py -m <module> [arguments]")
    AcceleratorState.__init__ = _initialise_keeping_plugins
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
