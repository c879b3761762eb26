"""The cost of the document reset (model.reset_at_eod): training and decode steps with and without it.

    python -m benchmarks.bench_documents [--quick] [--output benchmarks/results]

Same models, workers and timing as ``benchmarks.bench_model`` (d_model 256, 4 layers, vocab 32k, SSD
chunk 256, 2 threads, one measurement per subprocess, jemalloc when present): the model's forward +
backward with ``chunked_lm_loss`` (not the DeepSpeed trainer step) and ``step`` decoding. Both
settings read the same ids: packed documents of 1,000 tokens (an EOD every 1,000 tokens: 1 to 16
boundaries per sequence, denser than PG19's books or the synthetic corpus's 4k-token documents,
so the mask's work is at its worst) and, for decoding, a prompt of packed documents and one EOD in
each timed run. "off" runs the same ids with ``reset_at_eod: false`` (documents see each other: what
the model computed before the reset existed). MemMamba and Mamba2 at 1k, 4k and 16k; the
Transformer at 1k and 4k only (its document mask is a dense (L, L) boolean per row).
Writes <output>/documents.json and <output>/documents.png.
"""

import argparse
from pathlib import Path

from benchmarks.bench_model import JEMALLOC, THREADS, run_worker
from benchmarks.common import RESULTS, write_results

DOC_LENGTH = 1000
FULL = dict(lengths={"memmamba": (1024, 4096, 16384), "mamba2": (1024, 4096, 16384), "transformer": (1024, 4096)},
            train_steps=3, decode_steps=256, decode_repeats=3)
QUICK = dict(lengths={"memmamba": (1024,)}, train_steps=1, decode_steps=8, decode_repeats=1)
TARGET = 1.05
"""Issue 14: the reset may cost at most 5% per step."""


def overheads(rows: list[dict], key: str, length_key: str) -> dict[str, dict[str, float]]:
    """{model: {length: time with the reset / time without}} for one kind of measurement."""
    times = {(r["model"], r[length_key], r["reset_at_eod"]): r[key] for r in rows}
    out: dict[str, dict[str, float]] = {}
    for model, length, reset in times:
        if reset:
            out.setdefault(model, {})[str(length)] = times[model, length, True] / times[model, length, False]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, title in zip(axes, ("train", "decode"), ("training step", "decode step")):
        for model, ratios in result["summary"][f"{kind}_reset/off"].items():
            lengths = sorted(int(n) for n in ratios)
            ax.plot(lengths, [ratios[str(n)] for n in lengths], marker="o", label=model)
        ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1, label="target (+5%)")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length" if kind == "train" else "decode position")
        ax.set_ylabel("time with reset / without")
        ax.set_title(f"{title}: documents of {DOC_LENGTH} tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"d_model 256, 4 layers, {THREADS} threads, allocator: {result['setup']['allocator']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MemMamba at 1k tokens, few steps (smoke test)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for documents.json and documents.png")
    args = parser.parse_args(argv)

    import os

    from tqdm import tqdm

    plan = QUICK if args.quick else FULL
    tasks = []
    for model, lengths in plan["lengths"].items():
        for length in lengths:
            for reset in (False, True):  # side by side: the pair runs back to back
                common = dict(name=model, doc_length=DOC_LENGTH, reset_at_eod=reset)
                tasks.append(dict(kind="train", seq_len=length, steps=plan["train_steps"], **common))
                tasks.append(dict(kind="decode", position=length, steps=plan["decode_steps"],
                                  repeats=plan["decode_repeats"], **common))
    train, decode = [], []
    for task in tqdm(tasks, desc="bench_documents"):
        (train if task["kind"] == "train" else decode).append(run_worker(task))
    train_ratio, decode_ratio = overheads(train, "ms_per_token", "seq_len"), overheads(decode, "ms_per_token", "position")
    worst = max(v for ratios in (train_ratio, decode_ratio) for r in ratios.values() for v in r.values())
    result = {
        "setup": {"doc_length": DOC_LENGTH, "threads": THREADS, "quick": args.quick,
                  "allocator": f"jemalloc (LD_PRELOAD={JEMALLOC})" if os.path.exists(JEMALLOC) else "glibc malloc",
                  "path": "model forward + backward with chunked_lm_loss (not the DeepSpeed step); model.step"},
        "train": train, "decode": decode,
        "summary": {"train_reset/off": train_ratio, "decode_reset/off": decode_ratio,
                    "worst_reset/off": worst, f"worst<={TARGET}": worst <= TARGET},
    }
    path = write_results("documents", result, args.output)
    plot(result, args.output / "documents.png")
    print(f"wrote {path} and {args.output / 'documents.png'}; worst ratio {worst:.3f} (target <= {TARGET})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
