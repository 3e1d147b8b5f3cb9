"""Everything that depends on the machine we run on lives here: accelerator choice, distributed
discovery and start-up, and the CPU compatibility layer for megatron-core."""
from megatron_ext.platform.accelerator import accelerator_name, device, has_gpu  # noqa: F401
from megatron_ext.platform.distributed import DistEnv, discover, init_distributed  # noqa: F401
