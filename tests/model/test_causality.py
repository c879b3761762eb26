"""Changing token t never changes logits before t, for all three models, with the pool full."""

import pytest
import torch

from model import build_model

from .conftest import CHUNK, make_memory_matter, make_mixer_matter, tiny_config

SEQLEN = 6 * CHUNK  # the 5-note pool (2 notes per chunk) is full from the third chunk on


@pytest.mark.parametrize("arch", ["memmamba", "mamba2", "transformer"])
def test_changing_a_token_only_changes_later_logits(arch):
    model = build_model(tiny_config(arch)).eval()
    make_mixer_matter(model)
    make_memory_matter(model)
    ids = torch.randint(0, model.config.vocab_size, (1, SEQLEN))
    with torch.no_grad():
        base = model(ids)
        # first token, a chunk's first and last token, mid-chunk late in the sequence, the last token
        for t in (0, 2 * CHUNK, 3 * CHUNK - 1, 4 * CHUNK + 3, SEQLEN - 1):
            changed = ids.clone()
            changed[0, t] = (ids[0, t] + 1) % model.config.vocab_size
            logits = model(changed)
            assert torch.equal(logits[:, :t], base[:, :t]), f"position {t} leaked into earlier logits"
            assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-3


@pytest.mark.parametrize("eviction", ["priority", "fifo"])
def test_notes_of_a_chunk_reach_only_later_chunks(eviction):
    """The memory output of chunk j depends on chunk j-1's tokens only through the pool: zeroing the
    fusion weights removes exactly the influence that crosses chunk boundaries via notes."""
    model = build_model(tiny_config("memmamba", eviction=eviction)).eval()
    make_mixer_matter(model)
    make_memory_matter(model)
    ids = torch.randint(0, model.config.vocab_size, (1, SEQLEN))
    with torch.no_grad():
        layer0 = model.backbone.layers[0]
        y = layer0.mixer(layer0.norm(model.backbone.embeddings(ids)))
        fused, pools = layer0.memory(y, [])
    assert torch.equal(fused[:, :CHUNK], torch.zeros_like(fused[:, :CHUNK]))  # empty pool in chunk 0
    assert fused[:, CHUNK:].abs().amax(dim=-1).min() > 0  # every later token reads something
    visible_positions = pools.positions.gather(1, pools.slots[:, 1:-1].flatten(1)).view(1, -1, 5)
    chunk_of_reader = torch.arange(1, SEQLEN // CHUNK).view(1, -1, 1)
    valid = pools.slot_valid[:, 1:-1]
    assert (visible_positions[valid] // CHUNK < chunk_of_reader.expand_as(valid)[valid]).all()
