"""MemMamba network: configs, pure-PyTorch reference models, decoding caches (see README.md).

``build_model(cfg)`` is the one constructor used by training, export and evaluation.
"""

import torch.nn as nn

from .config import Mamba2Config, MemoryConfig, ModelConfig, TransformerConfig
from .decode import cache_nbytes
from .loss import chunked_lm_loss
from .memmamba import MemMambaForCausalLM
from .ssd import ssd_chunked
from .transformer import LlamaForCausalLM


def build_model(cfg: ModelConfig) -> nn.Module:
    """Validate ``cfg`` and build its model (float32, CPU, random init)."""
    cfg.validate()
    if cfg.arch == "transformer":
        return LlamaForCausalLM(cfg)
    return MemMambaForCausalLM(cfg)


__all__ = [
    "LlamaForCausalLM", "Mamba2Config", "MemMambaForCausalLM", "MemoryConfig", "ModelConfig", "TransformerConfig",
    "build_model", "cache_nbytes", "chunked_lm_loss", "ssd_chunked",
]
