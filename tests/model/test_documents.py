"""Packed documents: with reset_at_eod, a document after an EOD is computed as if it stood alone.

Every architecture, in the parallel forward, in step-by-step decoding (rows crossing their boundaries
at different steps) and in prefill + steps; gradients do not cross a boundary. Document A is long
enough to fill the 5-note pool (3 chunks of 2 notes) and spans several chunks; the boundary lies
inside a chunk in one row and on a chunk edge in the other.
"""

import dataclasses

import pytest
import torch

from model import build_model
from model.documents import ChunkLayout, document_ids

from .conftest import CHUNK, make_memory_matter, make_mixer_matter, tiny_config

EOD = 2
A_LENGTHS = (4 * CHUNK + 3, 4 * CHUNK)  # A with its EOD: B starts inside chunk 4 / on its edge
B_LENGTH = 3 * CHUNK + 5
# The float order of the packed computation differs (other chunk splits of the conv and the scan,
# masked attention): measured differences are below 2e-6, and 1.1e-5 with concat notes, whose W_n sums
# four times as many terms (in float64 the same comparison agrees to 2e-14).
TOLERANCE = 2e-5

MODELS = {
    "memmamba-priority": dict(arch="memmamba"),
    "memmamba-fifo-mean": dict(arch="memmamba", eviction="fifo", pooling="mean"),
    "memmamba-concat": dict(arch="memmamba", pooling="concat"),
    "memmamba-tau0": dict(arch="memmamba", pooling="none", tau1=0.0, cross_layer_every=1),
    "mamba2": dict(arch="mamba2"),
    "transformer": dict(arch="transformer"),
}


def build(name: str, **changes) -> torch.nn.Module:
    model = build_model(dataclasses.replace(tiny_config(**MODELS[name]), **changes)).eval()
    make_mixer_matter(model)
    make_memory_matter(model)
    return model


def packed_rows(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, L) rows [A_r, EOD, B_r] of equal length, and (2, B_LENGTH) B_0 alone / B_1's first B_LENGTH tokens."""
    total = max(A_LENGTHS) + B_LENGTH
    ids = torch.randint(EOD + 1, 61, (2, total), generator=gen)  # no EOD but the ones placed
    for row, a in enumerate(A_LENGTHS):
        ids[row, a - 1] = EOD
    return ids, torch.stack([ids[row, a:a + B_LENGTH] for row, a in enumerate(A_LENGTHS)])


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_document_equals_it_alone(name):
    model = build(name)
    ids, b_alone = packed_rows(torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed, alone = model(ids), model(b_alone)
        without_reset = build(name, reset_at_eod=False)(ids)
    for row, a in enumerate(A_LENGTHS):
        diff = (packed[row, a:a + B_LENGTH] - alone[row]).abs().max()
        assert diff <= TOLERANCE, (row, diff)
        # A's own logits are those of A alone, and without the reset B does read A.
        assert (packed[row, :a] - model(ids[row:row + 1, :a])[0]).abs().max() <= TOLERANCE
        assert (without_reset[row, a:a + B_LENGTH] - alone[row]).abs().max() > 1e-3
    assert alone.abs().max() > 0.1


@pytest.mark.parametrize("name", list(MODELS))
def test_decoding_through_boundaries_equals_the_parallel_forward(name):
    """Rows cross their boundaries at different steps; a second EOD follows in row 0."""
    model = build(name)
    ids, _ = packed_rows(torch.Generator().manual_seed(2))
    ids[0, A_LENGTHS[0] + CHUNK + 1] = EOD
    with torch.no_grad():
        parallel = model(ids)
    for rows in (slice(0, 2), slice(0, 1)):  # rows with their own document starts; one row alone
        batch = ids[rows]
        cache = model.allocate_cache(batch.shape[0])
        stepped = torch.stack([model.step(batch[:, t], cache) for t in range(ids.shape[1])], dim=1)
        assert (stepped - parallel[rows]).abs().max() <= TOLERANCE
    for split in (A_LENGTHS[1] - 1, A_LENGTHS[1], A_LENGTHS[0] + 2):  # before an EOD, right after, inside B
        cache = model.allocate_cache(2)
        prefill = model.prefill(ids[:, :split], cache)
        steps = [model.step(ids[:, t], cache) for t in range(split, ids.shape[1])]
        assert (torch.cat([prefill, torch.stack(steps, dim=1)], dim=1) - parallel).abs().max() <= TOLERANCE, split


@pytest.mark.parametrize("name", list(MODELS))
def test_no_gradient_crosses_a_boundary(name):
    model = build(name).train()
    ids, _ = packed_rows(torch.Generator().manual_seed(3))
    embedding = model.get_submodule("model.embed_tokens" if name == "transformer" else "backbone.embeddings")
    captured = {}
    handle = embedding.register_forward_hook(lambda module, args, out: captured.setdefault("x", out))
    logits = model(ids)
    handle.remove()
    embedded = captured["x"]
    embedded.retain_grad()
    loss = sum(logits[row, a:].float().logsumexp(-1).sum() for row, a in enumerate(A_LENGTHS))  # B only
    loss.backward()
    for row, a in enumerate(A_LENGTHS):
        assert torch.equal(embedded.grad[row, :a], torch.zeros_like(embedded.grad[row, :a])), row
        assert embedded.grad[row, a:].abs().max() > 0


def test_document_ids_and_layout():
    ids = torch.tensor([[5, 2, 7, 7, 7, 2, 2, 9, 2],
                        [5, 5, 5, 5, 5, 5, 5, 5, 2]])
    seq_idx = document_ids(ids, EOD)
    assert seq_idx.tolist() == [[0, 0, 1, 1, 1, 1, 2, 3, 3], [0] * 9]  # an EOD ends its document
    assert document_ids(ids[1:], EOD) is None  # an EOD only at the end: no boundary
    layout = ChunkLayout.build(9, 4, seq_idx)
    # Row 0: documents of 2, 4, 1, 2 tokens on chunks 0, 1, 2, 3; row 1: one document on chunks 0-2.
    assert layout.index.tolist() == [[0, 1, 4, 5, 6, 7, 8, 12, 13], list(range(9))]
    assert layout.length == 16
    assert layout.doc_start.tolist() == [[False, True, True, True], [False] * 4]
    assert layout.doc_offset.tolist() == [12, 0] and layout.doc_length.tolist() == [2, 9]
    x = torch.arange(18.0).view(2, 9, 1)
    assert torch.equal(layout.gather(layout.scatter(x, -1.0)), x)
