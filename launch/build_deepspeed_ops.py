"""Build DeepSpeed's CPU communication op from a process the `deepspeed` launcher started
(launch/setup_env.sh runs it once, into the cache the launcher tests use)."""

from deepspeed.accelerator import get_accelerator

get_accelerator().create_op_builder("ShareMemCommBuilder").load()
