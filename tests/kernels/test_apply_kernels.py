"""apply_kernels switches a real MemMamba between the Triton kernels and the torch references."""

import pytest
import torch

from model import ModelConfig, build_model
from model.config import Mamba2Config, MemoryConfig
from model.kernels import apply_kernels
from model.kernels.memory import memory_read_triton
from model.kernels.ssd import ssd_chunked_triton
from model.memory import memory_read
from model.ssd import ssd_chunked


def _tiny_memmamba(device: torch.device) -> torch.nn.Module:
    """2 layers (the second reads the first's pool too), 4 heads in 2 groups, chunk 16, every note kept."""
    cfg = ModelConfig(
        arch="memmamba", vocab_size=64, d_model=16, n_layers=2,
        mamba=Mamba2Config(d_state=8, headdim=8, expand=2, ngroups=2, chunk_size=16),
        memory=MemoryConfig(pool_size=6, notes_per_chunk=3, summary_dim=16, heads=2, tau1=0.0, cross_layer_every=2),
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # the fusion projections start at zero; make the memory actually matter
        for layer in model.backbone.layers:
            for out in (layer.memory.token_out, layer.memory.layer_out):
                if out is not None:
                    out.weight.normal_(std=0.3)
    return model.to(device)


def _logits_and_grads(model, tokens):
    model.zero_grad()
    logits = model(tokens)
    (logits.square().mean()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_triton_path_equals_torch_path_end_to_end(device):
    model = _tiny_memmamba(device)
    tokens = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0)).to(device)  # ragged chunk
    assert apply_kernels(model, "torch") == "torch"
    logits_ref, grads_ref = _logits_and_grads(model, tokens)
    assert apply_kernels(model, "triton") == "triton"
    assert model.backbone.layers[1].mixer.ssd_fn is ssd_chunked_triton
    assert model.backbone.layers[1].memory.read_fn is memory_read_triton
    logits, grads = _logits_and_grads(model, tokens)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    memory_grads = [name for name in grads if ".memory." in name and grads_ref[name].abs().max() > 0]
    assert any("layer_attn" in name for name in memory_grads), "the cross-layer read must be exercised"
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-6, msg=name)


def test_auto_and_torch_choices():
    model = _tiny_memmamba(torch.device("cpu"))
    apply_kernels(model, "triton")
    assert apply_kernels(model, "auto") == "torch"  # parameters on CPU
    assert model.backbone.layers[0].mixer.ssd_fn is ssd_chunked
    assert model.backbone.layers[0].memory.read_fn is memory_read
    if torch.cuda.is_available():
        assert apply_kernels(model.cuda(), "auto") == "triton"


def test_bad_backend_choices_are_rejected(monkeypatch):
    model = _tiny_memmamba(torch.device("cpu"))
    with pytest.raises(ValueError, match="expected one of auto, triton, torch"):
        apply_kernels(model, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs the model on CUDA"):
        apply_kernels(model, "triton")
