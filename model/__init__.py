"""MemMamba network: configs, pure-PyTorch reference models and decoding caches.

``build_model(cfg)`` is the one constructor used by training, export and evaluation.
"""

import torch.nn as nn

from .config import Mamba2Config, MemoryConfig, ModelConfig, TransformerConfig
from .decode import cache_nbytes
from .memmamba import MemMambaForCausalLM
from .ssd import ssd_chunked


def build_model(cfg: ModelConfig) -> nn.Module:
    """Validate ``cfg`` and build its model (float32, CPU, random init)."""
    cfg.validate()
    if cfg.arch == "transformer":
        from .transformer import LlamaForCausalLM

        return LlamaForCausalLM(cfg)
    return MemMambaForCausalLM(cfg)


__all__ = [
    "Mamba2Config", "MemoryConfig", "ModelConfig", "TransformerConfig", "build_model", "cache_nbytes", "ssd_chunked",
]
