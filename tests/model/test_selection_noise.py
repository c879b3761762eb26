"""`train.note_selection_noise` (MemoryBlock.selection_noise): in training, noise on the scores that
pick and keep notes changes which tokens become notes, never a note's value; evaluation adds none."""

import pytest
import torch

from pretrain.config import RunConfig, load_config
from pretrain.evaluate import captured_pools

from ..conftest import REPO_ROOT
from .conftest import CHUNK
from .test_documents import build


def pools_of(model: torch.nn.Module, ids: torch.Tensor) -> list:
    """Each layer's ChunkPools of a forward over ids."""
    with captured_pools(model) as captured, torch.no_grad():
        model(ids)
    return [pools for _, _, pools in captured]


def set_noise(model: torch.nn.Module, std: float) -> None:
    for layer in model.backbone.layers:
        layer.memory.selection_noise = std


def test_evaluation_adds_no_noise():
    model = build("memmamba-priority")
    ids = torch.randint(3, 61, (2, 6 * CHUNK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(ids)
        set_noise(model, 1.0)
        assert torch.equal(model(ids), clean)


def test_noise_changes_which_tokens_become_notes_not_their_values():
    model = build("memmamba-priority")
    ids = torch.randint(3, 61, (2, 6 * CHUNK), generator=torch.Generator().manual_seed(0))
    model.train()
    clean = pools_of(model, ids)
    set_noise(model, 1.0)
    noisy = pools_of(model, ids)
    explored = 0
    # The first layer only: later layers' mixer outputs depend on what the earlier pools held.
    for before, after in zip(clean[:1], noisy[:1]):
        for row in range(ids.shape[0]):
            picked = {p: n for p, n, ok in zip(before.positions[row].tolist(), before.notes[row], before.valid[row]) if ok}
            for position, note, ok in zip(after.positions[row].tolist(), after.notes[row], after.valid[row]):
                if not ok:
                    continue
                if position in picked:  # the same token's note: scaled by its clean score, as without noise
                    torch.testing.assert_close(note, picked[position], rtol=0, atol=0)
                else:
                    explored += 1
    assert explored > 0


@pytest.mark.parametrize("changes, message", [
    (["train.note_selection_noise=-0.1"], "train.note_selection_noise: must be >= 0"),
    (["model.arch=mamba2", "train.note_selection_noise=0.3"], "train.note_selection_noise: perturbs the memory's"),
])
def test_config_rejects_bad_values(changes, message):
    cfg = load_config(RunConfig, REPO_ROOT / "configs/repro_memory.yaml", changes)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
