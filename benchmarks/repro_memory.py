"""Passkey retrieval far beyond the training length: MemMamba against Mamba2 and a Transformer (issue 13).

    python -m benchmarks.repro_memory [--quick] [--output outputs/repro_memory]
                                      [--results benchmarks/results/repro_memory] [--config configs/repro_memory.yaml]

1. A tokenizer (vocab 512) and shards of the retrieval-dense `needles` corpus (data_prep/needles.py:
   a passkey and key -> value facts at distances spanning the training length, varied filler,
   the questions at the end) and of the `copies` drills (data_prep/copies.py), made with the
   project's CLIs; skipped when present.
2. Two chained training runs per row of RUNS through the real trainer (`python pretrain/main.py`,
   DeepSpeed ZeRO-3, one process): a warm-up on the copies drills at a constant learning rate
   (without it the small models never told digits apart: README, issue 13), then the needles
   corpus from the warm-up's weights (`--init-from`). Every row has the same two budgets and the
   same training length; MemMamba, Mamba2 and the Transformer are sized to within 15% of each
   other's parameters (checked before training). The ablations change one memory setting each.
   A stage that reached its budget is not retrained; an interrupted one resumes.
3. Passkey retrieval (pretrain/eval/passkey.py, the prompt of Mohtashami & Jaggi, unchanged) of
   every run at 1x, 4x, 16x and 64x the training length, at 5 depths and 20 trials per cell,
   with 95% intervals; the Transformer only up to TRANSFORMER_MAX_LENGTH (its attention time
   grows with the square of the length). Needle recall (pretrain/eval/recall.py) of every run on the
   validation documents of the training corpus: whether a model retrieves at all, in
   distribution, apart from whether it extrapolates. The row `memmamba-memory-zeroed` is the
   trained MemMamba with its memory output zeroed (pretrain.evaluate.zero_memory_output): what
   the backbone alone retrieves.
4. RESULTS/results.json ({"train_seq_len", "runs": {name: {"arch", "parameters", "tokens",
   "passkey", "recall"}}, ...}), passkey.png (one heatmap per run), recall.png and summary.md
   (the README's table).

--quick trains for a few seconds per run at a short length and evaluates a tiny grid: it checks
the plumbing end to end (CI runs it); its numbers mean nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.common import finished, prepare_data, prepare_shards, reproduction_args, tokens_trained, train
from fileio import write_json_atomic, write_text_atomic
from pretrain.config import RunConfig, load_config
from pretrain.eval import TaskSettings
from pretrain.eval.report import write_plots
from pretrain.evaluate import evaluate, load_model
from pretrain.metrics import machine

SOURCE = "needles:docs={docs},seed=1234,words=40,facts=1"
WARMUP_SOURCE = "copies:docs={docs},seed=1234,lines=20"
WARMUP_TOKENS = 409_600
"""The warm-up stage's budget: the copies' validation loss stopped falling after about 0.4M tokens."""
WARMUP = ["optimizer.decay=constant", "optimizer.warmup_tokens=50000"]
"""`--set` overrides of the warm-up stage on top of each run's own (the needles stage decays as configured)."""
SIZE_TOLERANCE = 0.15
TRANSFORMER_MAX_LENGTH = 4096
"""The Transformer's longest passkey prompt: its attention costs about 5 s per 16k prompt here,
100 prompts more than all other evaluations together (its cache would allow 16k)."""
RUNS = {
    "memmamba": [],
    "mamba2": ["model.arch=mamba2", "model.n_layers=6"],
    "transformer": ["model.arch=transformer", "model.transformer.ffn_hidden=128"],
    "memmamba-fifo": ["model.memory.eviction=fifo"],
    "memmamba-pool-mean": ["model.memory.pooling=mean"],
    "memmamba-pool-none": ["model.memory.pooling=none"],
    "memmamba-no-cross-layer": ["model.memory.cross_layer_every=0"],
}
"""Run name -> `--set` overrides on top of the config. Mamba2 gets 6 layers and the Transformer a
128-wide MLP so that the three architectures have about MemMamba's parameter count."""
ZEROED = "memmamba-memory-zeroed"


def parameter_counts(config: Path, overrides: list[str]) -> dict[str, int]:
    """Parameters of every run's model, built on the meta device (nothing is allocated)."""
    import torch

    from model import build_model

    counts = {}
    for name, run_overrides in RUNS.items():
        cfg = load_config(RunConfig, config, overrides + run_overrides)
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build_model(cfg.model).parameters())
    return counts


def check_sizes(counts: dict[str, int]) -> None:
    reference = counts["memmamba"]
    for name in ("mamba2", "transformer"):
        if abs(counts[name] / reference - 1) > SIZE_TOLERANCE:
            raise SystemExit(f"repro_memory: {name} has {counts[name]:,} parameters, more than "
                             f"{SIZE_TOLERANCE:.0%} away from memmamba's {reference:,}: fix RUNS")


def settings_for(name: str, quick: bool, train_len: int) -> TaskSettings:
    multiples = [1, 4] if quick else [1, 4, 16, 64]
    lengths = [train_len * m for m in multiples]
    if name == "transformer":
        lengths = [n for n in lengths if n <= TRANSFORMER_MAX_LENGTH]
    if quick:
        return TaskSettings(tasks=["passkey", "recall"], lengths=lengths, passkey_depths=[0.0, 1.0], passkey_trials=2,
                            recall_documents=4)
    return TaskSettings(tasks=["passkey", "recall"], lengths=lengths, passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
                        passkey_trials=20, recall_documents=100)


def _percent(value: float, interval: list[float] | None) -> str:
    """"12% [8%, 17%]", or the value alone without an interval."""
    return f"{value:.0%}" + (f" [{interval[0]:.0%}, {interval[1]:.0%}]" if interval else "")


def summary(results: dict) -> str:
    lengths = sorted({int(n) for run in results["runs"].values() for n in run["passkey"]["mean"]})
    header = ("| run | arch | parameters | tokens | recall (in distribution) | "
              + " | ".join(f"passkey@{n}" for n in lengths) + " |")
    rows = [header, "|---|---|---:|---:|---:|" + "---:|" * len(lengths)]
    for name, run in results["runs"].items():
        cells = [_percent(run["recall"]["accuracy"], run["recall"]["interval"])]
        for n in lengths:
            mean = run["passkey"]["mean"].get(str(n))
            cells.append("n/a" if mean is None else _percent(mean, run["passkey"].get("mean_interval", {}).get(str(n))))
        rows.append(f"| {name} | {run['arch']} | {run['parameters']:,} | {run['tokens']:,} | " + " | ".join(cells) + " |")
    m = results["machine"]
    first = next(iter(results["runs"].values()))
    trials, recall_docs = first["passkey"]["trials"], first["recall"]["documents"]
    return (f"## Passkey retrieval beyond the training length ({'quick' if results['quick'] else 'full'})\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['allocator']}, torch {m['torch']}. "
            f"Training length {results['train_seq_len']} tokens; tokens: a warm-up on `{results['warmup_source']}`, "
            f"then `{results['source']}`; "
            f"passkey: accuracy over {trials} trials per (length, depth), mean over depths, Wilson 95% interval; "
            f"recall: answers of {recall_docs} validation documents of that corpus recalled (Wilson 95%). "
            f"n/a: not evaluated (the Transformer stops at {TRANSFORMER_MAX_LENGTH} tokens). "
            f"Command: `python -m benchmarks.repro_memory{' --quick' if results['quick'] else ''}` "
            f"({results['seconds_total'] / 60:.0f} min).\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = reproduction_args("repro_memory", __doc__, "results.json, summary.md and passkey.png",
                             "seconds of training per run, a tiny grid", argv)
    start = time.perf_counter()

    docs, copies_docs = (100, 50) if args.quick else (16000, 2000)
    tokenizer, data = prepare_data(args.output, SOURCE.format(docs=docs))
    copies = prepare_shards(WARMUP_SOURCE.format(docs=copies_docs), tokenizer, args.output / "copies")
    warmup_tokens = 4096 if args.quick else WARMUP_TOKENS
    quick = (["train.max_tokens=16384", "curriculum.stages=[{tokens: 0, seq_len: 256}]", "optimizer.warmup_tokens=1024",
              "eval.every_steps=1000", "eval.seq_lens=[256]", "eval.samples=2"] if args.quick else [])
    stages = {"warmup": [f"data.tokenizer={tokenizer}", f"data.path={copies}", *WARMUP, *quick,
                         f"train.max_tokens={warmup_tokens}"],
              "needles": [f"data.tokenizer={tokenizer}", f"data.path={data}", *quick]}
    counts = parameter_counts(args.config, stages["needles"])
    check_sizes(counts)
    cfg = load_config(RunConfig, args.config, stages["needles"])
    train_len = max(stage.seq_len for stage in cfg.curriculum.stages)
    budgets = {"warmup": warmup_tokens, "needles": cfg.train.max_tokens}

    results = {"quick": args.quick, "source": SOURCE.format(docs=docs),
               "warmup_source": WARMUP_SOURCE.format(docs=copies_docs), "train_seq_len": train_len,
               "machine": machine(), "runs": {}}
    for name, overrides in [*RUNS.items(), (ZEROED, None)]:
        run_root = args.output / "runs" / (name if overrides is not None else "memmamba")
        for stage, previous in (("warmup", None), ("needles", run_root / "warmup")):
            if overrides is not None and not finished(run_root / stage, budgets[stage]):
                train(args.config, run_root / stage, stages[stage] + overrides, init_from=previous)
        run_dir = run_root / "needles"
        loaded = load_model(run_dir)
        settings = settings_for(name, args.quick, train_len)
        out = evaluate(loaded, settings, str(data), "validation", run_dir / "eval" / name, zero_memory=overrides is None)
        arch = load_config(RunConfig, args.config, stages["needles"] + (overrides or [])).model.arch
        results["runs"][name] = {"arch": arch, "parameters": counts[name if overrides is not None else "memmamba"],
                                 "tokens": tokens_trained(run_root / "warmup") + tokens_trained(run_dir),
                                 "overrides": overrides, "passkey": out["tasks"]["passkey"],
                                 "recall": out["tasks"]["recall"]}
        print(f"repro_memory: {name}: recall {out['tasks']['recall']['accuracy']:.0%}, "
              f"passkey mean by length {out['tasks']['passkey']['mean']}", flush=True)
    results["seconds_total"] = round(time.perf_counter() - start, 1)

    write_json_atomic(args.results / "results.json", results)
    write_plots({name: {task: run[task] for task in ("passkey", "recall")} for name, run in results["runs"].items()},
                args.results)
    write_text_atomic(args.results / "summary.md", summary(results))
    print((args.results / "summary.md").read_text())
    print(f"repro_memory: done in {results['seconds_total'] / 60:.1f} min; results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
