"""The MemMamba memory: exact Mamba2 start, learning signal, gradients, pool semantics."""

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.config import POOLINGS
from model.documents import ChunkLayout
from model.memory import ChunkPools, MemoryBlock, memory_read

from .conftest import CHUNK, make_memory_matter, make_mixer_matter, tiny_config


def test_fresh_memmamba_equals_its_mamba2_backbone():
    memmamba = build_model(tiny_config("memmamba")).eval()
    make_mixer_matter(memmamba)
    mamba2 = build_model(tiny_config("mamba2")).eval()
    result = mamba2.load_state_dict(memmamba.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(".memory." in key for key in result.unexpected_keys)
    ids = torch.randint(0, 61, (2, 5 * CHUNK))
    with torch.no_grad():
        assert torch.equal(memmamba(ids), mamba2(ids))


def recall_batch(batch: int, seqlen: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Long-range task: a key token at position 1 must be predicted at the last position."""
    ids = torch.randint(3, vocab, (batch, seqlen))
    ids[:, 0] = 1  # "remember the next token"
    ids[:, -2] = 2  # "now recall it"
    targets = torch.full_like(ids, -100)
    targets[:, -2] = ids[:, 1]
    return ids, targets


def test_one_optimizer_step_opens_the_memory_path():
    model = build_model(tiny_config("memmamba"))
    memory_params = {n: p for n, p in model.named_parameters() if ".memory." in n}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, targets = recall_batch(4, 6 * CHUNK, 61)

    def loss_step():
        optimizer.zero_grad()
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).backward()

    loss_step()
    fusion = [n for n in memory_params if n.endswith(("token_out.weight", "layer_out.weight"))]
    assert len(fusion) == 4 + 2  # F_tok in every layer, F_lay in the cross-layer layers 1 and 3
    for name in fusion:
        assert memory_params[name].grad.abs().max() > 0, name
    optimizer.step()

    layer = model.backbone.layers[0]
    with torch.no_grad():
        y = layer.mixer(layer.norm(model.backbone.embeddings(ids)))
        fused, _ = layer.memory(y, [])
    assert fused[:, CHUNK:].abs().max() > 0

    # Now the rest of the memory (scorer, summary, attention) learns too.
    loss_step()
    for part in ("note_score.weight", "summary.weight", "token_attn.q_proj.weight", "token_attn.kv_proj.weight",
                 "state_score.weight"):
        assert memory_params[f"backbone.layers.0.memory.{part}"].grad.abs().max() > 0, part


def test_memory_read_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    b, nc, c, m, h, d = 1, 3, 2, 4, 2, 3
    q, k, v = (torch.randn(b, nc, n, h, d, generator=gen, dtype=torch.float64, requires_grad=True)
               for n in (c, m, m))
    valid = torch.tensor([[[False] * 4, [True, False, True, False], [True] * 4]])  # empty, partial, full
    assert torch.autograd.gradcheck(lambda *t: memory_read(*t, valid), (q, k, v))
    out = memory_read(q, k, v, valid)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))


def test_memory_read_matches_dense_attention():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 5, 2, 4, generator=gen)
    k, v = (torch.randn(2, 1, 6, 2, 4, generator=gen) for _ in range(2))
    valid = torch.tensor([[True, True, False, True, False, True], [False, True, True, True, True, True]]).view(2, 1, 6)
    # softmax(q k^T / sqrt(d)) v over the valid slots, written out: (b, nc, c, m, h) scores.
    scores = torch.einsum("bjchd,bjmhd->bjcmh", q, k) / 2.0
    probs = scores.masked_fill(~valid[:, :, None, :, None], -torch.inf).softmax(dim=3)
    ref = torch.einsum("bjcmh,bjmhd->bjchd", probs, v)
    torch.testing.assert_close(memory_read(q, k, v, valid), ref)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_memory_block_gradcheck_float64(pooling):
    cfg = tiny_config("memmamba", pooling=pooling, pool_size=3).memory
    block = MemoryBlock(8, cfg, chunk_size=4, norm_eps=1e-5, cross_layer=False).double()
    make_memory_matter(block)
    y = torch.randn(1, 14, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: block(t, [])[0], (y,))


def naive_visible_pool(scores: torch.Tensor, chunk: int, k: int, pool_size: int, tau1: float, eviction: str):
    """Per chunk j, the set of positions in the pool it reads, by direct simulation of §4."""
    pool, visible = [], []
    for start in range(0, len(scores), chunk):
        visible.append(set(pool))
        ranked = sorted(range(start, start + chunk), key=lambda t: (-scores[t], -t))[:k]
        pool += [t for t in ranked if scores[t] > tau1]
        key = (lambda t: t) if eviction == "fifo" else (lambda t: (scores[t], t))
        pool = sorted(pool, key=key)[-pool_size:]
    return visible


@pytest.mark.parametrize("eviction", ["fifo", "priority"])
@pytest.mark.parametrize("tau1", [0.0, 0.5])
def test_pool_contents_follow_the_definition(eviction, tau1):
    chunk, k, pool_size, nchunks = 6, 2, 5, 7
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(nchunks * chunk, generator=gen)
    positions = torch.arange(nchunks * chunk)
    picked = torch.stack([torch.topk(row, k).indices.sort().values for row in scores.view(nchunks, chunk)])
    picked = picked + torch.arange(nchunks).unsqueeze(1) * chunk  # (nc, k) positions
    notes = torch.randn(1, nchunks, k, 3)
    pools = ChunkPools.build(notes, scores[picked][None], positions[picked][None], scores[picked][None] > tau1,
                             pool_size, eviction)
    expected = naive_visible_pool(scores.tolist(), chunk, k, pool_size, tau1, eviction)
    for j in range(nchunks):
        slots, valid = pools.slots[0, j], pools.slot_valid[0, j]
        got = set(pools.positions[0, slots[valid]].tolist())
        assert got == expected[j], (j, got, expected[j])
    if eviction == "fifo" and tau1 == 0.0:  # every note qualifies: the pool spans pool_size / k chunks back
        for j in range(3, nchunks):
            assert set(picked[j - 2:j].flatten().tolist()) <= expected[j] <= set(picked[j - 3:j].flatten().tolist())
            assert len(expected[j]) == pool_size


def test_return_hidden_states_are_the_layer_outputs():
    model = build_model(tiny_config("memmamba")).eval()
    make_memory_matter(model)
    ids = torch.randint(0, 61, (1, 3 * CHUNK))
    with torch.no_grad():
        logits, hidden = model(ids, return_hidden_states=True)
        x, pools = model.backbone.embeddings(ids), []
        seq_idx = model.document_ids(ids)  # random ids may hold EODs
        layout = ChunkLayout.build(ids.shape[1], CHUNK, seq_idx)
        for layer, h in zip(model.backbone.layers, hidden):
            x, layer_pools = layer(x, pools, seq_idx, layout)
            pools.append(layer_pools)
            assert torch.equal(x, h)
        assert torch.equal(model.lm_head(model.backbone.norm_f(x)), logits)
    assert len(hidden) == model.config.n_layers and hidden[0].shape == (1, 3 * CHUNK, 32)
