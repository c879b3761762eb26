"""chunked_lm_loss equals F.cross_entropy over full logits, in value and gradients."""

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
    with torch.no_grad():  # the evaluation path computes no softmax
        torch.testing.assert_close(chunked_lm_loss(hidden, weight, targets, chunk_tokens=5), ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_final_hidden_feeds_the_head():
    for arch in ("memmamba", "transformer"):
        model = build_model(tiny_config(arch)).eval()
        ids = torch.randint(0, 61, (1, 20))
        with torch.no_grad():
            torch.testing.assert_close(model.lm_head(model.final_hidden(ids)), model(ids), rtol=0, atol=0)
