"""The one mapping between our ModelConfig and Hugging Face configs (Mamba2, Llama, MemMamba).

Parameter names need no table: ours already are HF's (``backbone.layers.{i}.mixer.in_proj.weight``
of ``Mamba2ForCausalLM``, ``model.layers.{i}.self_attn.q_proj.weight`` of ``LlamaForCausalLM``,
plus ``backbone.layers.{i}.memory.*`` for MemMamba), with the same packing (in_proj rows
[z, x, B, C, dt]). The only key rule is the tied head: HF files omit ``lm_head.weight`` when
``tie_word_embeddings`` is set (`hf_state_dict` / `our_state_dict`).

Config fields are mapped by ``CONFIG_FIELDS``: per HF model type, pairs of (our dotted
ModelConfig field, HF dotted config field). `hf_config_fields` reads the table left to right,
`model_config_fields` right to left, so the two directions cannot drift apart. ``FIXED`` lists
HF fields whose value our network hard-codes (importing a config with another value is an
error naming the field); ``num_heads`` / ``head_dim`` are derived and checked.

Standard library only: this file travels with exported MemMamba models (the remote-code
configuration imports it).
"""

from __future__ import annotations

import math
from typing import Any

_COMMON = (
    ("vocab_size", "vocab_size"),
    ("d_model", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("tie_embeddings", "tie_word_embeddings"),
)
_MAMBA2 = _COMMON + (
    ("norm_eps", "layer_norm_epsilon"),
    ("mamba.d_state", "state_size"),
    ("mamba.headdim", "head_dim"),
    ("mamba.expand", "expand"),
    ("mamba.ngroups", "n_groups"),
    ("mamba.d_conv", "conv_kernel"),
    ("mamba.chunk_size", "chunk_size"),
)
CONFIG_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "mamba2": _MAMBA2,
    # The MemoryConfig dict (field names unchanged) and the document reset, which only our remote code
    # implements (native Mamba2 and Llama do not reset on packed input).
    "memmamba": _MAMBA2 + (("memory", "memory"), ("reset_at_eod", "reset_at_eod"), ("eod_token_id", "eod_token_id")),
    "llama": _COMMON + (
        ("norm_eps", "rms_norm_eps"),
        ("transformer.n_heads", "num_attention_heads"),
        ("transformer.n_kv_heads", "num_key_value_heads"),
        ("transformer.ffn_hidden", "intermediate_size"),
        ("transformer.max_seq_len", "max_position_embeddings"),
        ("transformer.rope_theta", "rope_parameters.rope_theta"),
    ),
}
"""(our field, HF field) pairs per HF model type; dots walk into nested dicts."""

_MAMBA2_FIXED = {"use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True,
                 "time_step_limit": [0.0, math.inf]}
FIXED: dict[str, dict[str, Any]] = {
    "mamba2": _MAMBA2_FIXED,
    "memmamba": _MAMBA2_FIXED,
    "llama": {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "rope_parameters.rope_type": "default"},
}
"""HF fields with the only value our network implements."""

ARCH_OF_MODEL_TYPE = {"mamba2": "mamba2", "memmamba": "memmamba", "llama": "transformer"}

EMBEDDING_KEY = {"mamba2": "backbone.embeddings.weight", "memmamba": "backbone.embeddings.weight",
                 "llama": "model.embed_tokens.weight"}
"""The input embedding a tied LM head shares its weight with."""


def hf_model_type(model: dict[str, Any]) -> str:
    """HF model type of a nested ModelConfig dict: native mamba2 when the memory is off."""
    if model["arch"] == "transformer":
        return "llama"
    memory_on = model["arch"] == "memmamba" and model["memory"]["enabled"]
    return "memmamba" if memory_on else "mamba2"


def hf_config_fields(model: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Nested ModelConfig dict (``dataclasses.asdict``) -> (HF model type, HF config fields)."""
    model_type = hf_model_type(model)
    hf: dict[str, Any] = {}
    for ours, theirs in CONFIG_FIELDS[model_type]:
        _set(hf, theirs, _get(model, ours))
    for field, value in FIXED[model_type].items():
        _set(hf, field, value)
    hf.update(_derived(model_type, model))
    return model_type, hf


def model_config_fields(model_type: str, hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """HF config dict -> nested ModelConfig dict (only the fields the table names; the rest keep defaults).

    Raises ValueError naming ``source`` and the HF field when the model type is unknown, a mapped
    field is missing, or a fixed/derived field has a value our network does not implement.
    """
    if model_type not in CONFIG_FIELDS:
        raise ValueError(f"{source}: unknown model_type {model_type!r}, expected one of "
                         f"{', '.join(CONFIG_FIELDS)}")
    model: dict[str, Any] = {"arch": ARCH_OF_MODEL_TYPE[model_type]}
    for ours, theirs in CONFIG_FIELDS[model_type]:
        value = _get(hf, theirs)
        if value is None:
            raise ValueError(f"{source}: missing field {theirs!r} (needed for model.{ours})")
        _set(model, ours, value)
    for field, expected in FIXED[model_type].items():
        value = _get(hf, field)
        if value is not None and _normal(value) != _normal(expected):
            raise ValueError(f"{source}: {field} = {value!r} is not supported (our {model_type} implements "
                             f"{expected!r} only)")
    if model_type == "memmamba":
        model["memory"] = {**model["memory"], "enabled": True}
    try:
        derived = _derived(model_type, model)
    except (TypeError, ZeroDivisionError):
        derived = {}  # malformed sizes: ModelConfig.validate names them
    for field, expected in derived.items():
        if hf.get(field) is not None and hf[field] != expected:
            raise ValueError(f"{source}: {field} = {hf[field]!r} does not match the other fields (expected {expected})")
    return model


def hf_state_dict(state: dict[str, Any], tie_embeddings: bool) -> dict[str, Any]:
    """Our state dict -> the tensors an HF file holds (the tied head is implied, not stored)."""
    return {k: v for k, v in state.items() if not (tie_embeddings and k == "lm_head.weight")}


def our_state_dict(hf: dict[str, Any], model_type: str, tie_embeddings: bool) -> dict[str, Any]:
    """Tensors of an HF file -> our state dict (the tied head restored from the embedding)."""
    state = dict(hf)
    if tie_embeddings:
        state["lm_head.weight"] = state[EMBEDDING_KEY[model_type]]
    return state


def _derived(model_type: str, model: dict[str, Any]) -> dict[str, Any]:
    """HF fields computed from others: Mamba2's head count, Llama's head width."""
    if model_type == "llama":
        return {"head_dim": model["d_model"] // model["transformer"]["n_heads"]}
    return {"num_heads": model["mamba"]["expand"] * model["d_model"] // model["mamba"]["headdim"]}


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
