"""Passkey retrieval far beyond the training length: MemMamba against Mamba2 and a Transformer (issue 13).

    python -m benchmarks.repro_memory [--quick] [--jobs 2] [--output outputs/repro_memory]
                                      [--results benchmarks/results/repro_memory] [--config configs/repro_memory.yaml]

1. A tokenizer (vocab 512) and shards of the retrieval-dense `needles` corpus (data_prep/needles.py:
   a passkey and key -> value facts at distances spanning the training length, varied filler,
   the questions at the end) and of the `copies` drills (data_prep/copies.py), made with the
   project's CLIs; skipped when present.
2. Three chained training runs (STAGES) per row of RUNS through the real trainer (`python
   pretrain/main.py`, DeepSpeed ZeRO-3, one process each), every one from the previous one's
   weights (`--init-from`): a warm-up on the copies drills at a constant learning rate (without it
   the small models never told digits apart: README, issue 13), then two passes over the needles
   corpus, each with a fresh warm-up and cosine decay (the recipe of docs/memory_research.md E13:
   the memory's reads started in the second pass). Every row has the same budgets and training
   length; MemMamba, Mamba2 and the Transformer are sized to within 15% of each other's parameters
   (checked before training). The ablations change one memory setting each. JOBS rows train side
   by side. A stage that reached its budget is not retrained, after a check that it was trained
   with the config this run would use; an interrupted one resumes.
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

--quick trains for a few seconds per stage and evaluates a tiny grid: it checks the plumbing end
to end (CI runs it); its numbers mean nothing.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from benchmarks.common import finished, prepare_data, prepare_shards, reproduction_args, tokens_trained, train
from fileio import write_json_atomic, write_text_atomic
from pretrain.checkpoint import model_differences
from pretrain.config import RunConfig, load_config, to_dict
from pretrain.eval import TaskSettings
from pretrain.eval.report import write_plots
from pretrain.evaluate import evaluate, load_model
from pretrain.metrics import machine

SOURCE = "needles:docs={docs},seed=1234,words=40,facts=1"
WARMUP_SOURCE = "copies:docs={docs},seed=1234,lines=20"
STAGES = {
    "copies": ["optimizer.decay=constant", "optimizer.warmup_tokens=50000"],
    "needles": [],
    "needles2": ["train.seed=99"],
}
"""Stage name -> its `--set` overrides on top of each run's own. The warm-up runs at a constant
learning rate. The second needles pass walks the first one's sample order again: the order comes from
data.seed, and after --init-from train.seed draws nothing (a needles stage from the same weights logs
bitwise the same losses under another train.seed, docs/memory_research.md E16). Its train.seed=99 is
kept so that the committed stages still match."""
WARMUP_TOKENS = 1_200_000
"""The warm-up's budget (the needles stages take the config's train.max_tokens each)."""
QUICK_TOKENS = {"copies": 4096, "needles": 8192, "needles2": 8192}
SIZE_TOLERANCE = 0.15
TRANSFORMER_MAX_LENGTH = 4096
"""The Transformer's longest passkey prompt: its attention costs about 5 s per 16k prompt here,
100 prompts more than all other evaluations together (its cache would allow 16k)."""
RUNS = {
    "memmamba": [],
    "mamba2": ["model.arch=mamba2", "model.n_layers=7"],
    "transformer": ["model.arch=transformer", "model.transformer.ffn_hidden=192"],
    "memmamba-fifo": ["model.memory.eviction=fifo"],
    "memmamba-pool-max": ["model.memory.pooling=max"],
    "memmamba-pool-mean": ["model.memory.pooling=mean"],
    "memmamba-pool-none": ["model.memory.pooling=none"],
    "memmamba-no-cross-layer": ["model.memory.cross_layer_every=0"],
}
"""Run name -> `--set` overrides on top of the config. Mamba2 gets 7 layers and the Transformer a
192-wide MLP so that the three architectures have about MemMamba's parameter count."""
ZEROED = "memmamba-memory-zeroed"
WEIGHT_SECTIONS = ("data", "train", "curriculum", "optimizer", "parallel", "deepspeed")
"""The config sections besides the model that decide a run's weights: a reused stage must match them."""


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
    stages = results["stages"]
    reused = sorted(name for name, run in results["runs"].items() if run["overrides"] is not None and not run["trained_here"])
    reused = (f"; the stages of {', '.join(reused)} were trained before this invocation and reused, their configs checked"
              if reused else "")
    return (f"## Passkey retrieval beyond the training length ({'quick' if results['quick'] else 'full'})\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['allocator']}, torch {m['torch']}. "
            f"Training length {results['train_seq_len']} tokens; tokens: a warm-up of {stages['copies']['tokens']:,} on "
            f"`{results['warmup_source']}`, then two passes of {stages['needles']['tokens']:,} on `{results['source']}`; "
            f"passkey: accuracy over {trials} trials per (length, depth), mean over depths, Wilson 95% interval; "
            f"recall: answers of {recall_docs} validation documents of that corpus recalled (Wilson 95%). "
            f"n/a: not evaluated (the Transformer stops at {TRANSFORMER_MAX_LENGTH} tokens). "
            f"Command: `python -m benchmarks.repro_memory{' --quick' if results['quick'] else ''}` "
            f"({results['seconds_total'] / 60:.0f} min, {results['seconds_training'] / 60:.0f} of them training{reused}).\n\n"
            + "\n".join(rows) + "\n")


def check_reused(run_dir: Path, overrides: list[str], config: Path) -> None:
    """Stop if the finished stage in RUN_DIR was trained with another config than this run's
    (model fields its architecture does not use aside): its weights would not be this run's."""
    saved = to_dict(load_config(RunConfig, run_dir / "config.yaml"))
    ours = to_dict(load_config(RunConfig, config, overrides))
    differences = [f"model.{key}" for key, _, _ in model_differences(saved["model"], ours["model"])]
    differences += [f"{section}.{key}" for section in WEIGHT_SECTIONS for key, value in ours[section].items()
                    if saved[section].get(key) != value]
    if differences:
        raise SystemExit(f"repro_memory: {run_dir} was trained with other values of {', '.join(differences)}: "
                         "delete that run directory to retrain it")


def train_row(config: Path, run_root: Path, stages: dict[str, tuple[int, list[str]]], threads: int) -> list[str]:
    """Train (or resume, or reuse) the row's stages (name -> budget, `--set` list) in order, each
    from the previous one's weights; the trainer's output goes to RUN_ROOT/train.log. Returns the
    stages it trained."""
    trained, previous = [], None
    for stage, (budget, overrides) in stages.items():
        run_dir = run_root / stage
        if finished(run_dir, budget):
            check_reused(run_dir, overrides, config)
        else:
            train(config, run_dir, overrides, init_from=previous, threads=threads, log=run_root / "train.log")
            trained.append(stage)
        previous = run_dir
    return trained


def main(argv: list[str] | None = None) -> int:
    args = reproduction_args("repro_memory", __doc__, "results.json, summary.md and passkey.png",
                             "seconds of training per stage, a tiny grid", argv, parallel_runs=True)
    start = time.perf_counter()

    docs, copies_docs = (100, 50) if args.quick else (16000, 2000)
    tokenizer, data = prepare_data(args.output, SOURCE.format(docs=docs))
    copies = prepare_shards(WARMUP_SOURCE.format(docs=copies_docs), tokenizer, args.output / "copies")
    quick = (["eval.every_steps=1000", "eval.seq_lens=[256]", "eval.samples=2", "optimizer.warmup_tokens=1024"]
             if args.quick else [])
    needles = [f"data.tokenizer={tokenizer}", f"data.path={data}", *quick]
    counts = parameter_counts(args.config, needles)
    check_sizes(counts)
    cfg = load_config(RunConfig, args.config, needles)
    train_len = max(stage.seq_len for stage in cfg.curriculum.stages)
    budgets = QUICK_TOKENS if args.quick else {"copies": WARMUP_TOKENS, "needles": cfg.train.max_tokens,
                                               "needles2": cfg.train.max_tokens}

    def row_stages(run: list[str]) -> dict[str, tuple[int, list[str]]]:
        """Each stage's budget and full `--set` list for a row: data, the row's changes, the stage's."""
        return {stage: (budgets[stage], [f"data.tokenizer={tokenizer}", f"data.path={copies if stage == 'copies' else data}",
                                         *run, *extra, *quick, f"train.max_tokens={budgets[stage]}"])
                for stage, extra in STAGES.items()}

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"repro_memory: training {len(RUNS)} rows x {len(STAGES)} stages, {args.jobs} side by side "
          f"with {threads} thread(s) each; logs in {args.output / 'runs'}/<row>/train.log", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        jobs = {name: pool.submit(train_row, args.config, args.output / "runs" / name, row_stages(run), threads)
                for name, run in RUNS.items()}
        wait(jobs.values(), return_when=FIRST_EXCEPTION)
        failed = [job.exception() for job in jobs.values() if job.done() and job.exception()]
        if failed:
            pool.shutdown(cancel_futures=True)  # rows not started stay so; those under way finish their stage
            raise failed[0]
        trained_here = {name: job.result() for name, job in jobs.items()}
    seconds_training = time.perf_counter() - start

    results = {"quick": args.quick, "source": SOURCE.format(docs=docs),
               "warmup_source": WARMUP_SOURCE.format(docs=copies_docs), "train_seq_len": train_len,
               "stages": {stage: {"tokens": budgets[stage], "overrides": extra} for stage, extra in STAGES.items()},
               "machine": machine(), "runs": {}}
    for name, overrides in [*RUNS.items(), (ZEROED, None)]:
        trained_as = name if overrides is not None else "memmamba"
        run_root = args.output / "runs" / trained_as
        run_dir = run_root / list(STAGES)[-1]
        loaded = load_model(run_dir)
        settings = settings_for(name, args.quick, train_len)
        out = evaluate(loaded, settings, str(data), "validation", run_dir / "eval" / name, zero_memory=overrides is None)
        arch = load_config(RunConfig, args.config, needles + (overrides or [])).model.arch
        results["runs"][name] = {"arch": arch, "parameters": counts[trained_as],
                                 "tokens": sum(tokens_trained(run_root / stage) for stage in STAGES),
                                 "overrides": overrides, "trained_here": trained_here[trained_as],
                                 "passkey": out["tasks"]["passkey"], "recall": out["tasks"]["recall"]}
        print(f"repro_memory: {name}: recall {out['tasks']['recall']['accuracy']:.0%}, "
              f"passkey mean by length {out['tasks']['passkey']['mean']}", flush=True)
    results["seconds_training"] = round(seconds_training, 1)
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
