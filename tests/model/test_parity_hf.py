"""With the memory off our Mamba2 equals transformers' Mamba2ForCausalLM; the Transformer baseline
equals LlamaForCausalLM. Weights are copied by name with strict key checks."""

import pytest
import torch
import transformers

from model import ModelConfig, build_model

from .conftest import make_mixer_matter, tiny_config


def hf_mamba2(cfg: ModelConfig) -> transformers.Mamba2ForCausalLM:
    m = cfg.mamba
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        layer_norm_epsilon=cfg.norm_eps, state_size=m.d_state, head_dim=m.headdim, expand=m.expand,
        num_heads=cfg.n_mamba_heads, n_groups=m.ngroups, conv_kernel=m.d_conv, chunk_size=m.chunk_size,
        use_bias=False, use_conv_bias=True, residual_in_fp32=True, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )).eval()


def hf_llama(cfg: ModelConfig) -> transformers.LlamaForCausalLM:
    t = cfg.transformer
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        intermediate_size=t.ffn_hidden, num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        max_position_embeddings=t.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )).eval()


def load_strict(hf_model: torch.nn.Module, state_dict: dict) -> None:
    result = hf_model.load_state_dict(state_dict, strict=False)
    assert not result.unexpected_keys and not result.missing_keys, result


@pytest.mark.parametrize("arch", ["mamba2", "memmamba-disabled"])
def test_mamba2_equals_hf(arch):
    cfg = tiny_config("mamba2") if arch == "mamba2" else tiny_config("memmamba", enabled=False)
    ours = build_model(cfg).eval()
    make_mixer_matter(ours)
    hf = hf_mamba2(cfg)
    load_strict(hf, ours.state_dict())
    ids = torch.randint(3, cfg.vocab_size, (2, 3 * cfg.mamba.chunk_size + 5))  # one document (no EOD), ragged end
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids), hf(ids).logits
    assert (ours_logits - hf_logits).abs().max() <= 1e-4


def test_parity_catches_wrong_in_proj_split():
    """Negative control: loading in_proj with z and x swapped must break the comparison."""
    cfg = tiny_config("mamba2")
    ours = build_model(cfg).eval()
    make_mixer_matter(ours)
    hf = hf_mamba2(cfg)
    state = ours.state_dict()
    d_inner = cfg.d_inner
    for key in [k for k in state if k.endswith("in_proj.weight")]:
        w = state[key]
        state[key] = torch.cat([w[d_inner:2 * d_inner], w[:d_inner], w[2 * d_inner:]])  # [x, z, ...]
    load_strict(hf, state)
    ids = torch.randint(0, cfg.vocab_size, (2, 2 * cfg.mamba.chunk_size))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() > 1e-2


def test_transformer_equals_hf_llama():
    cfg = tiny_config("transformer")
    ours = build_model(cfg).eval()
    make_mixer_matter(ours)
    hf = hf_llama(cfg)
    load_strict(hf, ours.state_dict())
    ids = torch.randint(3, cfg.vocab_size, (2, 40))  # one document: HF Llama does not reset at EOD
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4
    # Negative control: a different RoPE base must be visible.
    cfg.transformer.rope_theta = 10000.0
    other = build_model(cfg).eval()
    other.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (other(ids) - hf(ids).logits).abs().max() > 1e-2
