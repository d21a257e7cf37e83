"""Run a module under accelerate's FSDP code paths on CPU processes (gloo), for the distributed-training tests.

accelerate (1.15) turns an FSDP plugin on only for accelerator devices: on CPU processes its state falls back
to plain multi-CPU data parallelism, although torch's FSDP2 runs on gloo. This launcher keeps the plugin
(every time the shared state is initialised) so that accelerate's own FSDP2 prepare, gradient clipping,
state-dict gathering and sharded checkpointing run here as they do on GPUs. Nothing else is changed.

    ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true FSDP_VERSION=2 \\
        python -m torch.distributed.run --nproc_per_node 2 tests/launch_fsdp_on_cpu.py -m <module> <args>
"""

import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType


_initialise = AcceleratorState.__init__


def _initialise_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _initialise(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    fsdp_plugin = fsdp_plugin or self.__dict__.get("fsdp_plugin")
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: launch_fsdp_on_cpu.py -m <module> [arguments]")
    AcceleratorState.__init__ = _initialise_keeping_fsdp
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
