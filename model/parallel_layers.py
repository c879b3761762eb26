"""megatron-core tensor-parallel layers as drop-in replacements for nn.Linear / nn.Embedding.

Used by ``model/parallel.py`` (imported lazily there: importing megatron-core takes seconds).
megatron's linears return ``(output, bias)`` and add an ``_extra_state`` entry to state dicts for
Transformer Engine. These subclasses return the output tensor alone and keep exactly the state-dict
keys of the module they replace, so a TP model's keys equal the TP=1 model's (checkpoints, HF
export and ``shard_state_dict``/``merge_state_dicts`` all rely on that).
"""

import torch
import torch.nn as nn
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def cpu_friendly_config(tp_size: int, params_dtype: torch.dtype) -> ModelParallelConfig:
    """Weights allocated on CPU and left uninitialised (parallelize copies the full model's slices
    into them); no fused CUDA gradient accumulation, so the same layers run on gloo and NCCL."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size, params_dtype=params_dtype, use_cpu_initialization=True,
        perform_initialization=False, gradient_accumulation_fusion=False,
    )


def _unused_init(weight: torch.Tensor) -> None:
    """megatron requires an init_method; perform_initialization=False never calls it."""


class _PlainLinear:
    """Mixin: forward returns a tensor; state dict holds ``weight`` only, like nn.Linear."""

    # Restore nn.Module's defaults so torch writes and expects no `_extra_state` key.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        # megatron registers a load pre-hook that inserts `_extra_state` into every loaded state
        # dict, which strict loading would then report as unexpected.
        self._load_state_dict_pre_hooks.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = super().forward(x)
        return output


class ColumnParallel(_PlainLinear, ColumnParallelLinear):
    """Output features split across ranks; the output stays split (gather_output=False)."""

    def __init__(self, in_features: int, out_features: int, config: ModelParallelConfig, tp_group):
        super().__init__(in_features, out_features, config=config, init_method=_unused_init, bias=False,
                         gather_output=False, tp_group=tp_group)
        self._drop_extra_state_hook()


class RowParallel(_PlainLinear, RowParallelLinear):
    """Input features split across ranks (the input is already split); the output is all-reduced."""

    def __init__(self, in_features: int, out_features: int, config: ModelParallelConfig, tp_group):
        super().__init__(in_features, out_features, config=config, init_method=_unused_init, bias=False,
                         input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        self._drop_extra_state_hook()


class VocabParallel(VocabParallelEmbedding):
    """Embedding rows split across ranks; out-of-shard ids give zeros and the output is all-reduced."""

    def __init__(self, num_embeddings: int, embedding_dim: int, config: ModelParallelConfig, tp_group):
        super().__init__(num_embeddings, embedding_dim, init_method=_unused_init, config=config, tp_group=tp_group)
