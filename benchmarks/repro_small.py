"""Small-scale reproduction on CPU: MemMamba against Mamba2, and what the length curriculum buys.

    python -m benchmarks.repro_small [--quick] [--output outputs/repro_small] [--results benchmarks/results/repro_small]
                                     [--config configs/repro_small.yaml]

1. A tokenizer (vocab 512) and shards of the synthetic long-range corpus (data_prep/synthetic.py:
   facts and a passkey stated early and asked for thousands of tokens later), made with the
   project's CLIs; skipped when present.
2. Three training runs of configs/repro_small.yaml with the same token budget and the same tokens
   per step, one `python pretrain/main.py` process each, one after another:
   memmamba (curriculum 256 -> 512 -> 1024), mamba2 (the same network with the memory off, same
   curriculum) and memmamba-no-curriculum (1024 tokens from the first step). A run that already
   reached its budget is not retrained.
3. Evaluation of each final checkpoint (pretrain/evaluate.py): perplexity at 1024/2048/4096 (up
   to 4x the training length), passkey at 512/1024/2048, memory fidelity up to distance 2048.
4. RESULTS/repro.json (every number), validation.png (validation loss at 1024 tokens against
   training wall time and against tokens), ppl.png, passkey.png, fidelity.png (the models side by
   side) and summary.md (the tables the README shows). Data and runs stay under OUTPUT.

Wall time is the sum of the logged per-step times (logging.every_steps = 1): training only,
without start-up and validation. The machine's 1-minute load average before and after each run is
recorded beside it: other work on the machine stretches wall time, not tokens. --quick uses a tenth of the tokens and a smaller evaluation: it
checks the whole path in a few minutes; its figures mean nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import finished, prepare_data, reproduction_args, train
from fileio import write_json_atomic, write_text_atomic
from pretrain.config import RunConfig, load_config
from pretrain.eval import TaskSettings
from pretrain.eval.report import markdown_tables, write_plots
from pretrain.evaluate import evaluate, load_model
from pretrain.metrics import machine

SOURCE = "synthetic:docs={docs},seed=1234,words=3000"
FULL_LENGTH = 1024
RUNS = {
    "memmamba": [],
    "mamba2": ["model.arch=mamba2"],
    "memmamba-no-curriculum": [f"curriculum.stages=[{{tokens: 0, seq_len: {FULL_LENGTH}}}]",
                               "train.global_batch_size=4", "train.micro_batch_size=4"],
}
"""Run name -> `--set` overrides on top of the config (16 x 256 = 4 x 1024 tokens per step)."""


def scaled_overrides(cfg: RunConfig, scale: float) -> list[str]:
    """Overrides shrinking the token budget, curriculum stages, warm-up and eval interval by ``scale``."""
    stages = ", ".join(f"{{tokens: {int(s.tokens * scale)}, seq_len: {s.seq_len}}}" for s in cfg.curriculum.stages)
    return [f"train.max_tokens={int(cfg.train.max_tokens * scale)}", f"curriculum.stages=[{stages}]",
            f"optimizer.warmup_tokens={int(cfg.optimizer.warmup_tokens * scale)}",
            f"eval.every_steps={max(1, int(cfg.eval.every_steps * scale))}"]


def validation_curve(run_dir: Path) -> dict[str, list[float]]:
    """Validation loss at the full length against cumulative training seconds and tokens."""
    step_seconds, curve = {}, {"wall_s": [], "tokens": [], "loss": []}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "step_time_s" in record:
            step_seconds[record["step"]] = record["step_time_s"]
        key = f"valid/loss@{FULL_LENGTH}"
        if key in record:
            curve["wall_s"].append(sum(t for s, t in step_seconds.items() if s <= record["step"]))
            curve["tokens"].append(record["tokens"])
            curve["loss"].append(record[key])
    curve["train_s"] = sum(step_seconds.values())
    return curve


def plot_validation(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in curves.items():
        axes[0].plot(curve["wall_s"], curve["loss"], marker=".", label=label)
        axes[1].plot(curve["tokens"], curve["loss"], marker=".", label=label)
    for ax, xlabel in zip(axes, ("training wall time (s, 2 CPU cores)", "tokens seen")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"validation loss at {FULL_LENGTH} tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("small-scale reproduction: validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(results: dict) -> str:
    rows = ["| run | parameters | tokens | training time (s) | tokens/s | load average before, after "
            "| final validation loss @1024 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, run in results["runs"].items():
        curve = run["validation"]
        rows.append(f"| {name} | {run['parameters']:,} | {curve['tokens'][-1]:,} | {curve['train_s']:.0f} | "
                    f"{curve['tokens'][-1] / curve['train_s']:,.0f} | "
                    f"{run['load_average'][0]:.1f}, {run['load_average'][1]:.1f} | {curve['loss'][-1]:.4f} |")
    m = results["machine"]
    return (f"## Small-scale reproduction ({'quick' if results['quick'] else 'full'})\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['allocator']}, torch {m['torch']}; "
            f"one training process at a time. Corpus: `{results['source']}`. "
            f"Command: `python -m benchmarks.repro_small{' --quick' if results['quick'] else ''}`.\n\n"
            + "\n".join(rows) + "\n\n"
            + markdown_tables({name: run["eval"]["tasks"] for name, run in results["runs"].items()}))


def main(argv: list[str] | None = None) -> int:
    args = reproduction_args("repro_small", __doc__, "repro.json, summary.md and the plots",
                             "a tenth of the tokens, smaller evaluation", argv)
    start = time.perf_counter()

    docs = 40 if args.quick else 200
    tokenizer, data = prepare_data(args.output, SOURCE.format(docs=docs))
    base = [f"data.path={data}", f"data.tokenizer={tokenizer}"]
    cfg = load_config(RunConfig, args.config)
    scale = 0.1 if args.quick else 1.0
    if args.quick:
        base += scaled_overrides(cfg, scale)
    settings = TaskSettings(lengths=[1024, 2048, 4096], ppl_samples=8, passkey_lengths=[512, 1024, 2048],
                            passkey_trials=4, fidelity_distances=[2**k for k in range(12)], fidelity_d_stars=[256, 2048],
                            fidelity_samples=4)
    if args.quick:
        settings = TaskSettings(lengths=[1024, 2048], ppl_samples=2, passkey_lengths=[512, 1024],
                                passkey_depths=[0.0, 1.0], passkey_trials=2,
                                fidelity_distances=[1, 4, 16, 64, 256, 1024], fidelity_d_stars=[256, 1024], fidelity_samples=2)

    results = {"quick": args.quick, "source": SOURCE.format(docs=docs), "machine": machine(), "runs": {}}
    for name, overrides in RUNS.items():
        run_dir = args.output / "runs" / name
        if not finished(run_dir, int(cfg.train.max_tokens * scale)):
            load = [os.getloadavg()[0]]
            train(args.config, run_dir, base + overrides)
            write_json_atomic(run_dir / "load_average.json", [*load, os.getloadavg()[0]])
        load = json.loads((run_dir / "load_average.json").read_text())  # of the training, not of this rerun
        loaded = load_model(run_dir)
        evaluation = evaluate(loaded, settings, str(data), "validation", run_dir / "eval" / f"global_step{loaded.step}")
        parameters = sum(p.numel() for p in loaded.model.parameters())
        results["runs"][name] = {"overrides": overrides, "parameters": parameters, "load_average": load,
                                 "validation": validation_curve(run_dir), "eval": evaluation}
    results["seconds_total"] = round(time.perf_counter() - start, 1)

    write_json_atomic(args.results / "repro.json", results)
    plot_validation({name: run["validation"] for name, run in results["runs"].items()}, args.results / "validation.png")
    write_plots({name: run["eval"]["tasks"] for name, run in results["runs"].items()}, args.results)
    write_text_atomic(args.results / "summary.md", summary(results))
    print((args.results / "summary.md").read_text())
    print(f"repro_small: done in {results['seconds_total']:.0f} s; results in {args.results}, runs in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
