"""benchmarks/bench_activation.py: the saving, the cost and the issue's target come from the measured rows."""

import pytest

from benchmarks.bench_activation import compare


def row(seq_len: int, on: bool, rss: float, tokens_per_s: float) -> dict:
    return dict(model="memmamba", seq_len=seq_len, activation_checkpointing=on, peak_rss_gb=rss,
                tokens_per_s=tokens_per_s)


def test_saving_and_cost_per_length_and_target_at_the_longest():
    rows = [row(4096, False, 2.0, 1000.0), row(4096, True, 1.5, 800.0),
            row(16384, False, 8.0, 900.0), row(16384, True, 4.0, 720.0)]
    summary = compare(rows)
    assert summary["memmamba@4096"]["peak_rss_saving"] == pytest.approx(0.25)
    assert summary["memmamba@4096"]["step_time_cost"] == pytest.approx(0.25)
    assert "target_met" not in summary["memmamba@4096"]
    assert summary["memmamba@16384"]["peak_rss_saving"] == pytest.approx(0.5)
    assert summary["memmamba@16384"]["target_met"] is True


@pytest.mark.parametrize("rss_on, tokens_per_s_on", [(5.0, 720.0), (4.0, 600.0)])
def test_target_missed_on_too_little_saving_or_too_much_cost(rss_on: float, tokens_per_s_on: float):
    rows = [row(16384, False, 8.0, 900.0), row(16384, True, rss_on, tokens_per_s_on)]
    assert compare(rows)["memmamba@16384"]["target_met"] is False
