"""benchmarks/memory_lookup.py: its samples, the premise that only the memory can carry a far value
past the cut, and one tiny end-to-end run."""

import json

import torch

from benchmarks.memory_lookup import (LAST_CHUNK_START, MARKER, QUERY, QUERY_AT, OracleSelection, check, lookup_batch,
                                      main, model_config, query_position)
from model import build_model
from pretrain.evaluate import zero_memory_output

from ..model.conftest import make_memory_matter


def test_samples_hold_marker_value_and_query():
    ids, value, position = lookup_batch(64, 100, torch.Generator().manual_seed(0))
    rows = torch.arange(64)
    assert ids.shape == (64, QUERY_AT + 1)
    assert torch.equal(ids[rows, position - 1], torch.full((64,), MARKER))
    assert value.shape == (64, 1) and torch.equal(ids[rows, position], value[:, 0])
    assert bool((ids[:, QUERY_AT] == QUERY).all()) and bool((position <= 100).all())
    assert torch.equal(lookup_batch(64, 100, torch.Generator().manual_seed(0))[0], ids)


def test_a_value_of_several_tokens_is_answered_in_order_from_the_query():
    ids, value, position = lookup_batch(8, 100, torch.Generator().manual_seed(0), value_tokens=5)
    query = query_position(5)
    assert value.shape == (8, 5) and query == QUERY_AT - 4
    for row in range(8):
        start = position[row].item()
        assert ids[row, start - 1] == MARKER and torch.equal(ids[row, start:start + 5], value[row])
        assert ids[row, query] == QUERY and torch.equal(ids[row, query + 1:], value[row, :4])  # teacher-forced


def test_past_the_cut_only_the_memory_carries_the_value():
    cut = 32
    model = build_model(model_config()).train()
    model.backbone.mixer_segment = cut
    make_memory_matter(model)
    ids, _, position = lookup_batch(1, 10, torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, position] = 10 + (ids[0, position] - 9) % 10  # another value
    assert position.item() < LAST_CHUNK_START - cut
    with torch.no_grad():
        assert (model(ids)[0, QUERY_AT] - model(other)[0, QUERY_AT]).abs().max() > 1e-4
        zero_memory_output(model)
        torch.testing.assert_close(model(ids)[0, QUERY_AT], model(other)[0, QUERY_AT], rtol=0, atol=0)


def test_oracle_selection_puts_every_value_token_in_every_pool():
    model = build_model(model_config("concat", notes_per_chunk=4, pool_size=32)).train()
    model.backbone.mixer_segment = 32
    held_out = lookup_batch(32, 160, torch.Generator().manual_seed(0), value_tokens=3)
    assert min(check(model, *held_out, 32)[2]) < 1.0  # the untrained scorer misses some
    assert check(model, *held_out, 32, OracleSelection(model))[2] == [1.0] * 4


def test_tiny_run_writes_results_and_plot(tmp_path):
    assert main(["--steps", "2", "--check-every", "1", "--pooling", "none", "--noise", "0,0.5", "--held-out", "16",
                 "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "memory_lookup.json").read_text())
    assert [(row["pooling"], row["note_selection_noise"]) for row in results["rows"]] == [("none", 0.0), ("none", 0.5)]
    for row in results["rows"]:
        assert [point["step"] for point in row["curve"]] == [1, 2]
        assert 0 <= row["accuracy_memory_zeroed"] <= 1
        assert len(row["value_in_pool"]) == 4 and all(0 <= v <= 1 for v in row["value_in_pool"])
    assert (tmp_path / "memory_lookup.png").stat().st_size > 0


def test_tiny_run_of_a_three_token_value(tmp_path):
    assert main(["--steps", "1", "--check-every", "1", "--pooling", "none", "--noise", "0", "--held-out", "16",
                 "--value-tokens", "3", "--notes-per-chunk", "4", "--pool-size", "12", "--tau1", "0", "--oracle-selection",
                 "--tag", "oracle", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "memory_lookup_3tokens_oracle.json").read_text())
    assert results["settings"]["value_tokens"] == 3 and results["settings"]["pool_size"] == 12
    assert results["settings"]["tau1"] == 0 and results["settings"]["oracle_selection"]
    row, = results["rows"]
    assert len(row["accuracy_by_token"]) == 3 and 0 <= row["whole_values"] <= min(row["accuracy_by_token"])
    assert abs(row["accuracy"] - sum(row["accuracy_by_token"]) / 3) < 1e-9
    assert row["value_in_pool"] == [1.0] * 4
    assert (tmp_path / "memory_lookup_3tokens_oracle.png").stat().st_size > 0
