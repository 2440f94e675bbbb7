"""`tuneoff` under Accelerate's DeepSpeed on CPU processes (gloo), for tests: run with torchrun and
the environment `accelerate launch --use_deepspeed --zero_stage N` sets.

Accelerate initializes DeepSpeed's processes only on accelerators; on CPU it leaves a DeepSpeed
state with one process. This gives it the gloo backend it would give plain CPU processes, so the
real path runs: Accelerate's `_prepare_deepspeed`, DeepSpeed's engine and ZeRO optimizer on its
CPU accelerator, and tuneoff's saving and resuming. Only the device differs from a GPU run."""

import os
import sys

import accelerate.state
from accelerate.utils import DistributedType

_prepare_backend = accelerate.state.PartialState._prepare_backend


def _gloo_for_deepspeed(self, cpu: bool = False, sagemaker_dp=False, backend=None):
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not cpu:
        return "gloo", DistributedType.MULTI_CPU
    return _prepare_backend(self, cpu, sagemaker_dp, backend)


def _not_cpu(init, position: int):
    # tuneoff asks for CPU processes on CPU, which makes Accelerate skip DeepSpeed altogether.
    def __init__(self, *args, **kwargs) -> None:
        if len(args) > position:  # AcceleratorState passes it to PartialState by position
            args = (*args[:position], False, *args[position + 1 :])
        else:
            kwargs["cpu"] = False
        init(self, *args, **kwargs)

    return __init__


accelerate.state.PartialState._prepare_backend = _gloo_for_deepspeed
accelerate.state.PartialState.__init__ = _not_cpu(accelerate.state.PartialState.__init__, 0)
accelerate.state.AcceleratorState.__init__ = _not_cpu(accelerate.state.AcceleratorState.__init__, 1)

if __name__ == "__main__":
    from tuneoff.cli import main

    args = sys.argv[1:]
    sys.exit(main(args[2:] if args[:2] == ["-m", "tuneoff"] else args))  # as compare's launcher
