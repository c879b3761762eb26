"""`train.mixer_segment_tokens` (MemMambaModel.mixer_segment): in training the mixers' state starts
afresh every N tokens of a document while the memory spans it; evaluation never cuts the state."""

import pytest
import torch

from model.documents import segment_ids
from pretrain.config import RunConfig, load_config

from ..conftest import REPO_ROOT
from .conftest import CHUNK
from .test_documents import build

SEGMENT = 2 * CHUNK


def test_segment_ids_start_at_documents_and_every_segment():
    seq_idx = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    assert segment_ids(seq_idx, 1, 8, 2).tolist() == [[0, 0, 1, 1, 2, 3, 3, 4]]
    assert segment_ids(None, 2, 5, 3).tolist() == [[0, 0, 0, 1, 1]] * 2


@pytest.mark.parametrize("name", ["mamba2", "memmamba-priority"])
def test_training_cuts_the_mixer_state_and_evaluation_does_not(name):
    model = build(name)
    ids = torch.randint(3, 61, (2, 3 * SEGMENT), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, :SEGMENT] = torch.randint(3, 61, (2, SEGMENT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids)
        model.backbone.mixer_segment = SEGMENT
        assert torch.equal(model(ids), whole)  # eval mode: unchanged
        model.train()
        cut, cut_changed = model(ids), model(changed)
    later = (cut[:, SEGMENT:] - cut_changed[:, SEGMENT:]).abs().max()
    if name == "mamba2":  # no memory: nothing before a segment reaches it
        assert later == 0
    else:  # the memory still carries the first segment's notes across
        assert later > 1e-3
    assert (cut[:, SEGMENT:] - whole[:, SEGMENT:]).abs().max() > 1e-3  # the cut did change the state


def test_config_rejects_it_for_the_transformer():
    cfg = load_config(RunConfig, REPO_ROOT / "configs/repro_memory.yaml",
                      ["model.arch=transformer", "train.mixer_segment_tokens=64"])
    with pytest.raises(ValueError, match="train.mixer_segment_tokens: cuts the Mamba2 mixers' state"):
        cfg.validate()
