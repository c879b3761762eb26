"""Hugging Face config of MemMamba (remote code, shipped inside every exported MemMamba directory).

The fields are ``Mamba2Config``'s, with the same names and meanings (hidden_size, state_size,
head_dim, n_groups, conv_kernel, chunk_size, num_heads, ...), plus ``memory``: a dict of
``MemoryConfig`` fields (pool_size, notes_per_chunk, tau1, ...; see memory.py for their
definitions). The field correspondence is the table in mapping.py.

This file only works inside an exported directory, where the reference files (config.py, ...)
sit beside it: `python -m pretrain.export` assembles that directory.
"""

from dataclasses import asdict

from transformers import PreTrainedConfig

from .config import Mamba2Config, MemoryConfig, ModelConfig
from .mapping import hf_config_fields, model_config_fields


class MemMambaConfig(PreTrainedConfig):
    model_type = "memmamba"

    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        # Defaults for the mapped fields come from ModelConfig itself, through the mapping table.
        _, defaults = hf_config_fields(asdict(ModelConfig(arch="memmamba")))
        super().__post_init__(**{**defaults, **kwargs})
        self.model_config()  # a bad config.json fails here, naming the field

    def model_config(self) -> ModelConfig:
        """The reference network's config (validated)."""
        fields = model_config_fields(self.model_type, self.to_dict())
        cfg = ModelConfig(**{**fields, "mamba": Mamba2Config(**fields["mamba"]),
                             "memory": MemoryConfig(**fields["memory"])})
        cfg.validate()
        return cfg
