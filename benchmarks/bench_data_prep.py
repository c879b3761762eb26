"""Data-prep throughput on pg19-mini against the raw SentencePiece ceiling.

    python -m benchmarks.bench_data_prep [--pg19 ../shared/data/pg19-mini] [--repeats 3]

Measures, in one process (interpreter start-up excluded, best of `--repeats`):
* ceiling: the tokenizer alone encoding the same ~10k-character pieces prepare uses,
  SentencePiece's own 2 threads (`encode(pieces, num_threads=2)`), text already in memory;
* whole-book encoding on one thread (why prepare cuts books into pieces);
* `data_prep.prepare` (reading files, tokenizing, writing shards + sha256 manifest) with 1 and 2
  workers.
Writes benchmarks/results/data_prep.json and .png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, write_results
from data_prep.prepare import prepare
from data_prep.train_tokenizer import train_on_source as train
from tokenizer import piece_boundaries

DEFAULT_PG19 = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg19-mini"


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg19", type=Path, default=DEFAULT_PG19)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tok = train(f"pg19:{args.pg19}", 8000, Path(tmp) / "tok")
        books = sorted((args.pg19 / "train").glob("*.txt"))
        texts = [b.read_text(encoding="utf-8") for b in books]
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        pieces = []
        for text in texts:
            ends = piece_boundaries(text)
            pieces += [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        tokens = sum(map(len, tok.encode_batch(pieces)))
        results = {"corpus": {"books": len(books), "megabytes": round(megabytes, 2), "tokens": tokens, "vocab": 8000}}
        timings = {
            "ceiling_pieces_2_threads": best_of(args.repeats, lambda: tok.encode_batch(pieces, num_threads=2)),
            "whole_books_1_thread": best_of(1, lambda: [tok.encode(t) for t in texts]),
        }
        fresh_outputs = (Path(tmp) / f"out{i}" for i in range(1000))  # a resumed prepare would skip the work
        for workers in (1, 2):
            timings[f"prepare_{workers}_workers"] = best_of(args.repeats, lambda: prepare(
                f"pg19:{args.pg19}", Path(tmp) / "tok", next(fresh_outputs), ["train"], workers=workers))
        results["runs"] = {name: {"seconds": round(s, 3), "MB_per_s": round(megabytes / s, 2),
                                  "tokens_per_s": round(tokens / s)} for name, s in timings.items()}
        ceiling = results["runs"]["ceiling_pieces_2_threads"]["MB_per_s"]
        results["prepare_2_workers_fraction_of_ceiling"] = round(results["runs"]["prepare_2_workers"]["MB_per_s"] / ceiling, 3)
    path = write_results("data_prep", results, args.output)
    plot(results, args.output / "data_prep.png")
    for name, run in results["runs"].items():
        print(f"{name:28s} {run['MB_per_s']:6.2f} MB/s {run['tokens_per_s']:>10,} tokens/s")
    print(f"prepare (2 workers) / ceiling: {results['prepare_2_workers_fraction_of_ceiling']:.0%}; wrote {path}")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["runs"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names, [results["runs"][n]["MB_per_s"] for n in names], color=["gray", "silver", "tab:blue", "tab:blue"])
    ax.set_xlabel("MB of text per second (higher is better)")
    ax.set_title(f"data_prep on pg19-mini/train ({results['corpus']['megabytes']} MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
