"""The fused LM loss (model/loss.py) equals F.cross_entropy over full logits, in value and gradients.

TP=2 is tested in tests/parallel/test_tp_parity.py (the same function, vocab-parallel)."""

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.loss import chunked_lm_loss

from .conftest import tiny_config


def test_chunked_loss_equals_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 13, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 13), generator=gen)
    targets[0, :3] = -100
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref * 3.0, (hidden, weight))
    loss = chunked_lm_loss(hidden, weight, targets, chunk_tokens=5)
    grads = torch.autograd.grad(loss * 3.0, (hidden, weight))
    torch.testing.assert_close(loss, ref)
    with torch.no_grad():  # the evaluation path keeps no gradients
        torch.testing.assert_close(chunked_lm_loss(hidden, weight, targets, chunk_tokens=5), ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["memmamba", "mamba2", "transformer"])
def test_model_loss_equals_full_logits_loss(arch: str, tied: bool):
    """model(ids, targets=...) (what the trainer runs) == cross entropy of model(ids), with every
    parameter's gradient, over several loss slices."""
    cfg = tiny_config(arch)
    cfg.tie_embeddings = tied
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # zero-initialised projections would leave the memory's gradients at zero
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.lm_head.chunk_tokens = 7  # 3 slices of 20 tokens, the last one short
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    params = list(model.parameters())
    ref = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    ref_grads = torch.autograd.grad(ref, params)
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        assert want.abs().max() > 0, f"{name}: zero reference gradient"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_loss_under_bf16_autocast_matches_autocast_logits():
    """bf16 training runs the head's matmuls in bf16 (as autocast would) and reduces in float32."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 40, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (3, 40), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.T
        ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss = chunked_lm_loss(hidden, weight, targets, chunk_tokens=32)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_final_hidden_feeds_the_head():
    for arch in ("memmamba", "transformer"):
        model = build_model(tiny_config(arch)).eval()
        ids = torch.randint(0, 61, (1, 20))
        with torch.no_grad():
            torch.testing.assert_close(model.lm_head(model.final_hidden(ids)), model(ids), rtol=0, atol=0)
