"""Process-group setup: torch.distributed, megatron-core tensor parallelism, DeepSpeed's `mpu`, seeding.

megatron-core is imported only for tensor parallelism (tp > 1): at tp = 1 the data-parallel group is
the world, and the import would cost memory (0.05 GB of a 1-process trainer's peak RSS) and start-up time.

Works under every launcher that sets the usual variables (`deepspeed`, `torchrun`, `srun` with
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT exported, see launch_scripts/slurm) and as a
plain `python pretrain/main.py` (one process). On a machine without CUDA the backend is gloo.

Layout: tensor-parallel groups are consecutive ranks (megatron-core's default), data parallel
is the rest: dp = world_size / tp.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch


def world_size_from_env() -> int:
    """The world size the launcher announced (1 without a launcher); known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self):
        """This rank's data-parallel process group (the world without tensor parallelism)."""
        if self.tp == 1:
            return torch.distributed.group.WORLD
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    def deepspeed_mpu(self) -> "MegatronMPU | None":
        """The `mpu` for deepspeed.initialize: megatron-core's groups under tensor parallelism, else
        None (DeepSpeed's own data-parallel group, the world)."""
        return MegatronMPU() if self.tp > 1 else None


def init_distributed(tp: int) -> DistEnv:
    """Create the process groups (gloo on CPU, nccl on CUDA) and, for tp > 1, megatron-core's parallel state."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python pretrain/main.py`: a one-process world
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the ranks of this node
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
        # DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce for its inference engine
        # when it starts (minutes on a small machine, and again whenever another process compiled it
        # with other flags); training communicates through gloo, so mark the op unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if tp == 1:
        return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, tp=1, tp_rank=0,
                       dp=world_size, dp_rank=rank, device=device)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return DistEnv(
        rank=rank, world_size=world_size, local_rank=local_rank,
        tp=tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp=parallel_state.get_data_parallel_world_size(), dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int, tp: int) -> None:
    """Same seed on every rank, so replicated weights start equal and TP shards are slices of one init.

    Under tensor parallelism on CUDA megatron-core's RNG tracker is seeded too (its tensor-parallel
    regions draw from it); on CPU megatron's layers initialise from the default generator
    (use_cpu_initialization).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if tp > 1 and torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


class MegatronMPU:
    """The `mpu` object DeepSpeed expects, answered from megatron-core's parallel_state.

    megatron-core names the tensor-parallel group `tensor_model_parallel`, DeepSpeed asks for
    `model_parallel`; without pipeline parallelism the two are the same group.
    """

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()
