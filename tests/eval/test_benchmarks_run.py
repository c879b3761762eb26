"""benchmarks/run.py: targets are computed from the measured rows, and only the marked part of
BENCHMARKS.md is rewritten."""

from pathlib import Path

from benchmarks.run import BEGIN, END, markdown, splice, targets


def model_result(memmamba_decode: tuple[float, float], transformer_decode: float, train_ms: tuple[float, float]):
    decode = [dict(model="memmamba", position=p, ms_per_token=ms, cache_bytes=1000)
              for p, ms in zip((1024, 16384), memmamba_decode)]
    decode.append(dict(model="transformer", position=16384, ms_per_token=transformer_decode, cache_bytes=9000))
    decode.append(dict(model="transformer", position=1024, ms_per_token=1.0, cache_bytes=500))
    train = [dict(model="memmamba", seq_len=n, ms_per_token=ms, tokens_per_s=1e3 / ms, peak_rss_gb=1.0)
             for n, ms in zip((1024, 16384), train_ms)]
    return {"decode": decode, "train": train, "setup": {"threads": 2}, "targets": {"flat": True}}


def test_targets_from_measured_rows():
    met = targets({"model": model_result((2.0, 2.1), transformer_decode=6.0, train_ms=(1.0, 1.1))})
    assert [(t.measured, t.met) for t in met] == [("1.05x", True), ("2.86x", True), ("1.10x", True)]
    assert "position 16384" in met[0].text and "16384 tokens <= 1.2x at 1024" in met[2].text
    missed = targets({"model": model_result((2.0, 3.0), transformer_decode=5.0, train_ms=(1.0, 2.0))})
    assert [t.met for t in missed] == [False, False, False]
    assert [t.met for t in targets({})] == [None, None, None]


def test_markdown_lists_every_comparison_and_splices_between_markers(tmp_path: Path):
    status = {"data_prep": {"status": "missing", "error": "benchmarks.bench_data_prep does not exist yet"},
              "model": {"status": "ok", "load_average": [0.5, 0.7]}, "train": {"status": "skipped"},
              "kernels": {"status": "failed", "error": "exit 1: boom"}}
    tables = markdown({"model": model_result((2.0, 2.1), 6.0, (1.0, 1.1))}, status, False, tmp_path)
    assert "| memmamba | 2.00 | 2.10 | 1,000 | 1,000 |" in tables
    assert "load average 0.5 before, 0.7 after" in tables
    assert "Not measured: exit 1: boom." in tables and "Not measured: not run." in tables

    page = tmp_path / "BENCHMARKS.md"
    page.write_text(f"# Benchmarks\nintro\n{BEGIN}\nold tables\n{END}\nfooter\n")
    assert splice(page, tables)
    assert page.read_text() == f"# Benchmarks\nintro\n{BEGIN}\n{tables}{END}\nfooter\n"
    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("no markers\n")
    assert not splice(unmarked, tables) and unmarked.read_text() == "no markers\n"
