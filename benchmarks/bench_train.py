"""Training throughput of the quickstart config (2 CPU processes, ZeRO-3) and the --dry-run memory estimates.

    python -m benchmarks.bench_train [--quick] [--output benchmarks/results]

Trains configs/quickstart.yaml on a freshly prepared synthetic corpus through the real launcher
(`deepspeed --num_gpus 2 pretrain/main.py`), once as DP=2/TP=1 and once as DP=1/TP=2, with the
curriculum compressed so that each run spends the same number of steps at 256, 512 and 1024
tokens (2,048 tokens per step throughout). tokens/s per length = tokens / summed step time of the
steps at that length (the first step of a run, which includes warm-up, is left out); start-up
(imports, process groups, DeepSpeed initialisation) is reported separately.
Also records the `--dry-run` parameter count and per-GPU memory estimate of the paper-scale
configs on 8 GPUs. Writes benchmarks/results/train.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, write_results
from data_prep.prepare import prepare
from pretrain.config import RunConfig, load_config
from pretrain.estimate import estimate
from tokenizer.train import train as train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ("memmamba_130m_pg19", "mamba2_130m_pg19", "transformer_130m_pg19")
LENGTHS = (256, 512, 1024)
STEP_TOKENS = 2048  # quickstart: 8 x 256 = 4 x 512 = 2 x 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_quickstart(data: Path, run_dir: Path, tp: int, steps_per_length: int) -> dict[str, Any]:
    """One training run; returns tokens/s per sequence length and the start-up seconds."""
    stages = ", ".join(f"{{tokens: {i * steps_per_length * STEP_TOKENS}, seq_len: {n}}}"
                       for i, n in enumerate(LENGTHS))
    overrides = [f"data.path={data}", f"curriculum.stages=[{stages}]", f"parallel.tp={tp}",
                 "logging.every_steps=1", "logging.progress_bar=false", "eval.every_steps=0", "eval.seq_lens=[256]",
                 "checkpoint.every_steps=100000"]
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(ROOT / "pretrain" / "main.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
               "--run-dir", str(run_dir), "--max-steps", str(steps_per_length * len(LENGTHS))]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"training (tp={tp}) exited {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    seconds, tokens = defaultdict(float), defaultdict(int)
    for record in steps[1:]:
        seconds[record["seq_len"]] += record["step_time_s"]
        tokens[record["seq_len"]] += STEP_TOKENS
    training = sum(r["step_time_s"] for r in steps)
    return {"tp": tp, "dp": 2 // tp, "steps": len(steps), "wall_seconds": round(wall, 1),
            "startup_and_shutdown_seconds": round(wall - training, 1),
            "tokens_per_s": {str(n): round(tokens[n] / seconds[n], 1) for n in LENGTHS},
            "first_loss": round(steps[0]["loss"], 4), "last_loss": round(steps[-1]["loss"], 4)}


def dry_runs(world_size: int) -> dict[str, Any]:
    out = {}
    for name in PAPER_CONFIGS:
        e = estimate(load_config(RunConfig, ROOT / "configs" / f"{name}.yaml"), world_size)
        out[name] = {"world_size": world_size, "parameters": e.parameters, "total_gb": round(e.total_gb, 2),
                     "model_states_gb": round(e.model_states_gb, 2),
                     "gathered_weights_gb": round(e.gathered_weights_gb, 2),
                     "activations_gb": round(e.activations_gb, 2), "logits_gb": round(e.logits_gb, 2),
                     "micro_batch_tokens": e.micro_batch_tokens}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 steps per length instead of 8")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    steps_per_length = 3 if args.quick else 8

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = "synthetic:docs=40,seed=7,words=1500"
        train_tokenizer(source, 512, tmp / "tokenizer")
        prepare(source, tmp / "tokenizer", tmp / "data", workers=2)
        runs = [run_quickstart(tmp / "data", tmp / f"tp{tp}", tp, steps_per_length) for tp in (1, 2)]
    results: dict[str, Any] = {"config": "configs/quickstart.yaml",
                               "launcher": "deepspeed --num_gpus 2 (CPU, gloo, ZeRO-3)",
                               "steps_per_length": steps_per_length, "runs": runs,
                               "dry_run": dry_runs(world_size=8)}
    for run in runs:  # flat keys for the generic table of benchmarks.run
        for n, value in run["tokens_per_s"].items():
            results[f"dp{run['dp']}_tp{run['tp']}_tokens_per_s_at_{n}"] = value
    for name, e in results["dry_run"].items():
        results[f"dry_run_{name}_gb_per_gpu_on_8"] = e["total_gb"]
    path = write_results("train", results, args.output)
    plot(results, args.output / "train.png")
    for run in runs:
        speeds = ", ".join(f"{n}: {v:,.0f}" for n, v in run["tokens_per_s"].items())
        print(f"dp={run['dp']} tp={run['tp']}: tokens/s by seq_len {speeds}; start-up+shutdown "
              f"{run['startup_and_shutdown_seconds']} s; loss {run['first_loss']} -> {run['last_loss']}")
    for name, e in results["dry_run"].items():
        print(f"dry run {name}: {e['parameters']:,} parameters, {e['total_gb']} GB per GPU on 8 GPUs")
    print(f"wrote {path}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for i, run in enumerate(results["runs"]):
        xs = [j + (i - 0.5) * width for j in range(len(LENGTHS))]
        left.bar(xs, [run["tokens_per_s"][str(n)] for n in LENGTHS], width, label=f"DP={run['dp']}, TP={run['tp']}")
    left.set_xticks(range(len(LENGTHS)), [str(n) for n in LENGTHS])
    left.set_xlabel("sequence length")
    left.set_ylabel("training tokens/s (2 CPU processes)")
    left.set_title("quickstart, ZeRO-3")
    left.legend()
    names = list(results["dry_run"])
    bottom = [0.0] * len(names)
    for part in ("model_states_gb", "gathered_weights_gb", "activations_gb", "logits_gb"):
        values = [results["dry_run"][n][part] for n in names]
        right.bar(range(len(names)), values, bottom=bottom, label=part.removesuffix("_gb").replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_xticks(range(len(names)), [n.removesuffix("_130m_pg19") for n in names])
    right.set_ylabel("GB per GPU (estimate)")
    right.set_title("--dry-run, 8 GPUs, 8k tokens")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
