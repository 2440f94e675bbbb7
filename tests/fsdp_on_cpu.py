"""`tuneoff` under Accelerate's FSDP on CPU processes (gloo), for tests: run with torchrun and the
environment `accelerate launch --use_fsdp --fsdp_version 2` sets.

Accelerate takes its FSDP path only on accelerators; on CPU it falls back to DDP. This lets its
FSDP state stand as it does on GPUs (plugin and mixed precision set), so the real path runs:
Accelerate's `fsdp2_prepare_model`, torch's `fully_shard` over gloo, and tuneoff's gathering of
shards to save and resume. Only the device differs from a GPU run."""

import sys

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from tuneoff.cli import main

    args = sys.argv[1:]
    sys.exit(main(args[2:] if args[:2] == ["-m", "tuneoff"] else args))  # as compare's launcher
