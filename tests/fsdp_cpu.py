"""Runs a script (sft.py, grpo.py) under accelerate's FSDP plugin on CPU ranks - for tests only.

    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ... torchrun --nproc_per_node 2 tests/fsdp_cpu.py grpo.py <flags>

accelerate 1.15 enables FSDP only for accelerator devices: a CPU run (ACCELERATE_USE_CPU=true)
becomes MULTI_CPU and the FSDP request is silently dropped (prepare() returns DDP), and without
that variable each rank runs alone. Here the process state is made on the CPU with gloo first,
then labelled MULTI_GPU, the type whose branch turns an FSDP request into FSDP; the device stays
the CPU. Nothing else is changed: the script runs as `accelerate launch` would start it."""
import os
import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

state = PartialState(cpu=True)  # gloo process group over the torchrun ranks, device cpu
assert state.distributed_type == DistributedType.MULTI_CPU and state.num_processes > 1, "start it with torchrun"
state.distributed_type = DistributedType.MULTI_GPU  # lets AcceleratorState take the FSDP branch
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
