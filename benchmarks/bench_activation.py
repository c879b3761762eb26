"""What activation checkpointing (`deepspeed.activation_checkpointing`) buys at long lengths (issue 15).

    python -m benchmarks.bench_activation [--quick] [--output benchmarks/results] [--work DIR]

Path measured: the real trainer, ``deepspeed --num_gpus 1 pretrain/main.py``, exactly as
bench_train's trainer rows (bench_model's MemMamba and Mamba2: d_model 256, 4 layers, vocab 32k,
SSD chunk 256; ZeRO-3, fp32 on CPU, the fused LM loss, AdamW, one sample per step, 2 threads),
once with `deepspeed.activation_checkpointing` off and once on, at 4k and 16k tokens per sample.
On, every block (mixer and memory) is recomputed in the backward pass
(`pretrain.trainer.enable_activation_checkpointing`), so what a block keeps for backward is only
its input.

Per run: the best step time after the first (``step_time_s`` of metrics.jsonl), rank 0's peak RSS
(the trainer's ``memory_gb``) and the largest peak RSS of any process of the launch. RSS includes
the weights, the gradients, the optimizer state and the allocator's cache, not only activations.

Target (issue 15): at 16k, >= 40% lower peak RSS for <= 35% more step time.
Writes <output>/activation.json and .png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.bench_model import run_worker
from benchmarks.bench_train import MODELS, prepare_bench_data
from benchmarks.common import RESULTS, ROOT, write_results

FULL = dict(seq_lens=(4096, 16384), steps=4)
QUICK = dict(seq_lens=(256, 512), steps=2)
TARGET_MEMORY_SAVING, TARGET_TIME_COST = 0.40, 0.35


def compare(rows: list[dict]) -> dict[str, Any]:
    """Per model and length, checkpointing on against off: the peak-RSS saving and the step-time
    cost, and the issue's target at the longest length."""
    by_key = {(r["model"], r["seq_len"], r["activation_checkpointing"]): r for r in rows}
    longest = max(r["seq_len"] for r in rows)
    out: dict[str, Any] = {}
    for (name, seq_len, on), row in sorted(by_key.items()):
        if not on:
            continue
        off = by_key[name, seq_len, False]
        saving = 1 - row["peak_rss_gb"] / off["peak_rss_gb"]
        cost = off["tokens_per_s"] / row["tokens_per_s"] - 1
        entry = {"peak_rss_saving": round(saving, 3), "step_time_cost": round(cost, 3),
                 "peak_rss_gb_off_on": [round(off["peak_rss_gb"], 3), round(row["peak_rss_gb"], 3)],
                 "tokens_per_s_off_on": [round(off["tokens_per_s"], 1), round(row["tokens_per_s"], 1)]}
        if seq_len == longest:
            entry["target_met"] = saving >= TARGET_MEMORY_SAVING and cost <= TARGET_TIME_COST
        out[f"{name}@{seq_len}"] = entry
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_activation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 and 512 tokens, 2 steps per run")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for activation.json and .png")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_train",
                        help="the 32k tokenizer and shards (shared with bench_train) and the runs "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    plan = QUICK if args.quick else FULL
    work = args.work.resolve()
    tokenizer, data = prepare_bench_data(work)
    tasks = [dict(name=name, seq_len=seq_len, procs=1, steps=plan["steps"], tokenizer=str(tokenizer),
                  data=str(data), activation_checkpointing=on,
                  run_dir=str(work / "runs" / f"activation-{name}-{seq_len}-{'on' if on else 'off'}"))
             for name in MODELS for seq_len in plan["seq_lens"] for on in (False, True)]
    rows = []
    for task in tqdm(tasks, desc="activation checkpointing"):
        row = run_worker(task, "benchmarks.bench_train")
        rows.append({**row, "activation_checkpointing": task["activation_checkpointing"]})
    results = {"launcher": "deepspeed --num_gpus 1 (CPU, gloo, ZeRO-3, fp32)", "setup": {**plan, "models": MODELS},
               "rows": rows, "summary": compare(rows)}
    path = write_results("activation", results, args.output)
    plot(results, args.output / "activation.png")
    print(json.dumps(results["summary"], indent=2))
    print(f"wrote {path}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = results["rows"]
    for name in MODELS:
        for on, style in ((False, "-"), (True, "--")):
            picked = sorted((r for r in rows if r["model"] == name and r["activation_checkpointing"] == on),
                            key=lambda r: r["seq_len"])
            label = f"{name}, checkpointing {'on' if on else 'off'}"
            xs = [r["seq_len"] for r in picked]
            memory.plot(xs, [r["peak_rss_gb"] for r in picked], style, marker="o", label=label)
            speed.plot(xs, [r["tokens_per_s"] for r in picked], style, marker="o", label=label)
    for axis, ylabel in ((memory, "peak RSS of the launch (GB)"), (speed, "training tokens/s (best step)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens per sample")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7)
    fig.suptitle("deepspeed --num_gpus 1 pretrain/main.py, activation checkpointing off vs on (CPU, fp32)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
