"""pretrain/flops.py: the FLOP formula against FlopCounterMode on the reference model, and the peak.

FlopCounterMode counts the aten matmul ops the real model runs (batch 1, CPU, the PyTorch
reference path, forward only). Two things it cannot see are handled here, openly:

- It has no formula for ``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel every CPU
  SDPA call lands in (the Transformer's attention and the memory's pool reads), and silently
  counts those calls as 0. ``_cpu_sdpa_flop`` registers one from the call's shapes: q k^T and p v
  over every key, or, with ``is_causal``, over the L(L+1)/2 visible pairs (torch's own GPU SDPA
  formulas ignore the causal mask and count the full square).
- The depthwise conv runs as elementwise ``addcmul`` taps (model/mamba2.py), not a convolution op.
  ``_multiply_add_flop`` counts each tap's multiply-adds, and only the ones inside the conv modules
  are kept (other addcmuls, like the scan's D skip, are elementwise work the formula leaves out).
"""

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from model import build_model
from model.config import Mamba2Config, MemoryConfig, ModelConfig, TransformerConfig
import pretrain.flops as flops_module
from pretrain.flops import FlopCount, mfu, model_flops_per_token, peak_flops_per_second


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None,
                   **kwargs) -> int:
    if not is_causal:
        return sdpa_flop_count(query_shape, key_shape, value_shape)
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[2], value_shape[3]
    pairs = sum(min(t + 1, keys) for t in range(queries))  # SDPA's causal mask is aligned top-left
    return 2 * batch * heads * pairs * (head_dim + value_dim)


def _multiply_add_flop(self_shape, tensor1_shape, tensor2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(torch.broadcast_shapes(self_shape, tensor1_shape, tensor2_shape))


aten = torch.ops.aten
CUSTOM_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
                aten.addcmul: _multiply_add_flop, aten.addcmul_: _multiply_add_flop}


def counted_flops(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """FLOPs of one forward pass of build_model(cfg) over one random seq_len sample, by module name
    ("Global" for the whole model): matmuls, SDPA and the conv taps (addcmul only inside ``.conv1d``)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(cfg.eod_token_id + 1, cfg.vocab_size, (1, seq_len))  # no EOD: one document
    mode = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with mode:
        model(ids)
    multiply_adds = (aten.addcmul, aten.addcmul_)
    counts = {name: sum(n for op, n in ops.items() if op not in multiply_adds or name.endswith(".conv1d"))
              for name, ops in mode.get_flop_counts().items()}
    counts["Global"] += module_flops(counts, ".conv1d")
    return counts


def module_flops(counts: dict[str, int], suffix: str) -> int:
    """Sum over the modules whose name ends with ``suffix`` (e.g. every layer's ``.mixer.in_proj``)."""
    return sum(v for name, v in counts.items() if name.endswith(suffix))


MAMBA_A = Mamba2Config(d_state=16, headdim=16, expand=2, ngroups=1, d_conv=4, chunk_size=32)
MAMBA_B = Mamba2Config(d_state=32, headdim=24, expand=2, ngroups=2, d_conv=3, chunk_size=16)
# tau1 = 0: every candidate qualifies, so the pools really fill up (4 and 5 chunks of notes).
MEMORY_A = MemoryConfig(pool_size=8, notes_per_chunk=2, summary_dim=32, heads=4, cross_layer_every=2, tau1=0.0)
MEMORY_B = MemoryConfig(pool_size=12, notes_per_chunk=3, summary_dim=48, heads=3, cross_layer_every=3,
                        pooling="mean", tau1=0.0)
CONFIGS = [  # (id, config, seq_len): small vocabularies, so that the LM head does not hide the other terms
    ("memmamba-a", ModelConfig(arch="memmamba", vocab_size=256, d_model=64, n_layers=4, mamba=MAMBA_A,
                               memory=MEMORY_A), 128),
    ("memmamba-b", ModelConfig(arch="memmamba", vocab_size=320, d_model=96, n_layers=3, tie_embeddings=False,
                               mamba=MAMBA_B, memory=MEMORY_B), 80),
    ("mamba2-a", ModelConfig(arch="mamba2", vocab_size=256, d_model=64, n_layers=2, mamba=MAMBA_A), 128),
    # 72 tokens: a ragged last chunk, computed whole (padding factor 80 / 72).
    ("mamba2-b", ModelConfig(arch="mamba2", vocab_size=320, d_model=96, n_layers=2, mamba=MAMBA_B), 72),
    ("transformer-a", ModelConfig(arch="transformer", vocab_size=256, d_model=64, n_layers=2,
                                  transformer=TransformerConfig(n_heads=4, n_kv_heads=4, ffn_hidden=128)), 128),
    ("transformer-b", ModelConfig(arch="transformer", vocab_size=320, d_model=96, n_layers=2, tie_embeddings=False,
                                  transformer=TransformerConfig(n_heads=6, n_kv_heads=2, ffn_hidden=160)), 256),
    # concat notes: W_n reads pool_window outputs side by side
    ("memmamba-concat", ModelConfig(arch="memmamba", vocab_size=256, d_model=64, n_layers=2, mamba=MAMBA_A,
                                    memory=dataclasses.replace(MEMORY_A, pooling="concat")), 128),
]


@pytest.mark.parametrize("cfg, seq_len", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_formula_matches_flop_counter(cfg: ModelConfig, seq_len: int):
    flops = model_flops_per_token(cfg, seq_len)
    counts = counted_flops(cfg, seq_len)
    formula = flops.forward * seq_len
    # The acceptance criterion (issue 15): within 10%.
    assert abs(formula / counts["Global"] - 1) < 0.10, (formula, counts["Global"], flops.terms())

    # In fact every term is exact, except the conv's first d_conv - 1 tokens (taps before the start
    # are skipped, not multiplied by zero). Each term is big enough to matter, and each group of
    # terms equals the count of its modules.
    assert all(v / flops.forward > 0.003 for v in flops.terms().values()), flops.terms()
    expected = {(".lm_head",): flops.lm_head}
    if cfg.arch == "transformer":
        expected |= {(".self_attn",): flops.attn_proj + flops.attention, (".mlp",): flops.mlp}
    else:
        expected |= {(".mixer.in_proj",): flops.in_proj, (".mixer.out_proj",): flops.out_proj,
                     (".mixer",): flops.in_proj + flops.ssd + flops.out_proj}
    if cfg.memory_enabled:
        expected |= {(".memory",): flops.memory_write + flops.memory_read + flops.memory_cross_layer + flops.memory_out,
                     (".note_score", ".state_score", ".summary", ".token_attn.kv_proj"): flops.memory_write,
                     (".token_out", ".layer_out"): flops.memory_out}
    for suffixes, per_token in expected.items():
        got = sum(module_flops(counts, suffix) for suffix in suffixes)
        assert got == pytest.approx(per_token * seq_len, rel=1e-9), suffixes
    conv = module_flops(counts, ".conv1d")
    assert conv == pytest.approx(flops.conv1d * seq_len, rel=cfg.mamba.d_conv / seq_len)
    assert counts["Global"] - conv == pytest.approx((flops.forward - flops.conv1d) * seq_len, rel=1e-9)


def test_components():
    cfg = CONFIGS[0][1]
    flops = model_flops_per_token(cfg, 128)
    d, inner, m = cfg.d_model, cfg.d_inner, cfg.mamba
    assert flops.lm_head == 2 * d * cfg.vocab_size
    assert flops.conv1d == cfg.n_layers * 2 * m.d_conv * (inner + 2 * m.ngroups * m.d_state)
    assert flops.train == 3 * flops.forward
    assert flops.forward == pytest.approx(sum(flops.terms().values()))
    assert set(flops.terms()) >= {"ssd_scores", "ssd_diagonal", "ssd_chunk_state", "ssd_state_output",
                                  "memory_write", "memory_read", "memory_cross_layer", "memory_out"}
    # Per token the scan depends on the length only through whole chunks; attention grows with it.
    assert model_flops_per_token(cfg, 4096).ssd == flops.ssd
    assert model_flops_per_token(cfg, 100).ssd == pytest.approx(flops.ssd * 128 / 100)
    transformer = CONFIGS[4][1]
    short, long = model_flops_per_token(transformer, 128), model_flops_per_token(transformer, 1024)
    assert long.attention / short.attention == pytest.approx(1025 / 129)
    assert long.mlp == short.mlp
    # The memory off is Mamba2 exactly.
    assert model_flops_per_token(ModelConfig(arch="mamba2", mamba=m), 128) == model_flops_per_token(
        ModelConfig(arch="memmamba", mamba=m, memory=MemoryConfig(enabled=False)), 128)
    assert isinstance(flops, FlopCount)
    with pytest.raises(ValueError, match="seq_len"):
        model_flops_per_token(cfg, 0)


def test_peak_configured_wins():
    assert peak_flops_per_second(torch.device("cpu"), 123.5) == (123.5e12, "configured: 123.5 TFLOP/s")
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive"):
            peak_flops_per_second(torch.device("cpu"), bad)


def test_peak_measured_on_cpu():
    peak, source = peak_flops_per_second(torch.device("cpu"), None)
    assert math.isfinite(peak) and peak > 0
    assert source.startswith("measured: fp32")
    assert peak_flops_per_second(torch.device("cpu"), None) == (peak, source)  # measured once per process


def test_mfu():
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert mfu(2000.0, 6e9, 1e13, devices=2) == pytest.approx(0.6)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10", 125), ("NVIDIA L4", 121),
    ("NVIDIA L40S", 362), ("NVIDIA GeForce RTX 4090", 165.2),
])
def test_peak_cuda_table(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = peak_flops_per_second(torch.device("cuda", 0), None)
    assert peak == tflops * 1e12
    assert source == f"table: {name} bf16 dense peak {tflops:g} TFLOP/s"


def test_peak_unknown_cuda_device_is_measured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    calls = []
    monkeypatch.setattr(flops_module, "_measured_matmul_flops", lambda *args: calls.append(args) or 5e13)
    peak, source = peak_flops_per_second(torch.device("cuda", 0), None)
    assert (peak, calls[0][:2]) == (5e13, ("cuda:0", torch.bfloat16))
    assert source.startswith("measured: NVIDIA A10G is not in the peak table; bf16")
