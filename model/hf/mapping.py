"""The one mapping between our ModelConfig and Hugging Face configs (Mamba2, Llama, MemMamba).

Parameter names need no table: ours already are HF's (``backbone.layers.{i}.mixer.in_proj.weight``
of ``Mamba2ForCausalLM``, ``model.layers.{i}.self_attn.q_proj.weight`` of ``LlamaForCausalLM``,
plus ``backbone.layers.{i}.memory.*`` for MemMamba), with the same packing (in_proj rows
[z, x, B, C, dt]). The only key rule is the tied head: HF files omit ``lm_head.weight`` when
``tie_word_embeddings`` is set (`hf_state_dict` / `our_state_dict`).

Each HF model type is one ``HFFormat`` record in ``FORMATS``: our arch, the HF class, the config
fields as pairs of (our dotted ModelConfig field, HF dotted config field), the fixed and derived
fields, the embedding key, the cache argument and the model card's description. `hf_config_fields`
reads the pairs left to right, `model_config_fields` right to left, so the two directions cannot
drift apart. ``fixed`` lists HF fields whose value our network hard-codes (importing a config with
another value is an error naming the field); ``num_heads`` / ``head_dim`` are derived and checked.
A new HF format is one record here (and, if it is not native to transformers, its remote code).

Standard library only: this file travels with exported MemMamba models (the remote-code
configuration imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

_COMMON = (
    ("vocab_size", "vocab_size"),
    ("d_model", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("tie_embeddings", "tie_word_embeddings"),
)
_MAMBA2_FIELDS = _COMMON + (
    ("norm_eps", "layer_norm_epsilon"),
    ("mamba.d_state", "state_size"),
    ("mamba.headdim", "head_dim"),
    ("mamba.expand", "expand"),
    ("mamba.ngroups", "n_groups"),
    ("mamba.d_conv", "conv_kernel"),
    ("mamba.chunk_size", "chunk_size"),
)
_MAMBA2_FIXED = {"use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True,
                 "time_step_limit": [0.0, math.inf]}


def _mamba2_heads(model: dict[str, Any]) -> dict[str, Any]:
    return {"num_heads": model["mamba"]["expand"] * model["d_model"] // model["mamba"]["headdim"]}


def _llama_head_dim(model: dict[str, Any]) -> dict[str, Any]:
    return {"head_dim": model["d_model"] // model["transformer"]["n_heads"]}


@dataclass(frozen=True)
class HFFormat:
    """One Hugging Face model type as we read and write it: the export, the import, the remote code,
    the benchmarks and the tests all take its facts from here."""

    model_type: str
    arch: str
    """Our ``model.arch`` for it."""
    architecture: str
    """The class named in config.json's ``architectures``."""
    fields: tuple[tuple[str, str], ...]
    """(our dotted ModelConfig field, HF dotted config field) pairs; dots walk into nested dicts."""
    fixed: dict[str, Any]
    """HF fields with the only value our network implements."""
    derived: Callable[[dict[str, Any]], dict[str, Any]]
    """HF fields computed from the others (checked on import)."""
    embedding_key: str
    """The input embedding a tied LM head shares its weight with."""
    cache_argument: str
    """The forward argument (and output field) that carries the decoding cache."""
    description: str
    """What it is, in the model card's words."""
    native_config: str | None = None
    """transformers' config class of a native format; None: our remote code, loaded through ``auto_map``."""
    auto_map: dict[str, str] = field(default_factory=dict)
    """config.json's ``auto_map`` of a remote-code format."""

    @property
    def remote_code(self) -> bool:
        """Loaded through our modeling files (``trust_remote_code``), not a class transformers ships."""
        return self.native_config is None


FORMATS: dict[str, HFFormat] = {f.model_type: f for f in (
    HFFormat("mamba2", "mamba2", "Mamba2ForCausalLM", _MAMBA2_FIELDS, _MAMBA2_FIXED, _mamba2_heads,
             "backbone.embeddings.weight", "cache_params", "Mamba2", native_config="Mamba2Config"),
    # The MemoryConfig dict (field names unchanged) and the document reset, which only our remote code
    # implements (native Mamba2 and Llama do not reset on packed input).
    HFFormat("memmamba", "memmamba", "MemMambaForCausalLM",
             _MAMBA2_FIELDS + (("memory", "memory"), ("reset_at_eod", "reset_at_eod"), ("eod_token_id", "eod_token_id")),
             _MAMBA2_FIXED, _mamba2_heads, "backbone.embeddings.weight", "past_key_values",
             "MemMamba (arXiv 2510.03279): Mamba2 blocks with a note-pool memory",
             auto_map={"AutoConfig": "configuration_memmamba.MemMambaConfig",
                       "AutoModelForCausalLM": "modeling_memmamba.MemMambaForCausalLM"}),
    HFFormat("llama", "transformer", "LlamaForCausalLM",
             _COMMON + (
                 ("norm_eps", "rms_norm_eps"),
                 ("transformer.n_heads", "num_attention_heads"),
                 ("transformer.n_kv_heads", "num_key_value_heads"),
                 ("transformer.ffn_hidden", "intermediate_size"),
                 ("transformer.max_seq_len", "max_position_embeddings"),
                 ("transformer.rope_theta", "rope_parameters.rope_theta"),
             ),
             {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "rope_parameters.rope_type": "default"},
             _llama_head_dim, "model.embed_tokens.weight", "past_key_values", "Llama-style Transformer baseline",
             native_config="LlamaConfig"),
)}
"""Every HF model type we export and import, by model type."""


def hf_format(model: dict[str, Any]) -> HFFormat:
    """The HF format of a nested ModelConfig dict: native mamba2 when the memory is off."""
    if model["arch"] == "transformer":
        return FORMATS["llama"]
    memory_on = model["arch"] == "memmamba" and model["memory"]["enabled"]
    return FORMATS["memmamba" if memory_on else "mamba2"]


def hf_config_fields(model: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Nested ModelConfig dict (``dataclasses.asdict``) -> (HF model type, HF config fields)."""
    fmt = hf_format(model)
    hf: dict[str, Any] = {}
    for ours, theirs in fmt.fields:
        _set(hf, theirs, _get(model, ours))
    for name, value in fmt.fixed.items():
        _set(hf, name, value)
    hf.update(fmt.derived(model))
    return fmt.model_type, hf


def model_config_fields(model_type: str, hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """HF config dict -> nested ModelConfig dict (only the fields the table names; the rest keep defaults).

    Raises ValueError naming ``source`` and the HF field when the model type is unknown, a mapped
    field is missing, or a fixed/derived field has a value our network does not implement.
    """
    if model_type not in FORMATS:
        raise ValueError(f"{source}: unknown model_type {model_type!r}, expected one of "
                         f"{', '.join(FORMATS)}")
    fmt = FORMATS[model_type]
    model: dict[str, Any] = {"arch": fmt.arch}
    for ours, theirs in fmt.fields:
        value = _get(hf, theirs)
        if value is None:
            raise ValueError(f"{source}: missing field {theirs!r} (needed for model.{ours})")
        _set(model, ours, value)
    for name, expected in fmt.fixed.items():
        value = _get(hf, name)
        if value is not None and _normal(value) != _normal(expected):
            raise ValueError(f"{source}: {name} = {value!r} is not supported (our {model_type} implements "
                             f"{expected!r} only)")
    if model_type == "memmamba":
        model["memory"] = {**model["memory"], "enabled": True}
    try:
        derived = fmt.derived(model)
    except (TypeError, ZeroDivisionError):
        derived = {}  # malformed sizes: ModelConfig.validate names them
    for name, expected in derived.items():
        if hf.get(name) is not None and hf[name] != expected:
            raise ValueError(f"{source}: {name} = {hf[name]!r} does not match the other fields (expected {expected})")
    return model


def hf_state_dict(state: dict[str, Any], tie_embeddings: bool) -> dict[str, Any]:
    """Our state dict -> the tensors an HF file holds (the tied head is implied, not stored)."""
    return {k: v for k, v in state.items() if not (tie_embeddings and k == "lm_head.weight")}


def our_state_dict(hf: dict[str, Any], model_type: str, tie_embeddings: bool) -> dict[str, Any]:
    """Tensors of an HF file -> our state dict (the tied head restored from the embedding)."""
    state = dict(hf)
    if tie_embeddings:
        state["lm_head.weight"] = state[FORMATS[model_type].embedding_key]
    return state


def _normal(value: Any) -> Any:
    """Lists and tuples of numbers compare as lists of floats (JSON has no tuples, 0 == 0.0)."""
    if isinstance(value, (list, tuple)):
        return [float(v) if isinstance(v, (int, float)) else v for v in value]
    return value


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value
