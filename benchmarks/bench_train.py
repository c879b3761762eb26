"""The real trainer's speed and memory: the quickstart config, bench_model's models beside
bench_model's own model-only step, and the --dry-run memory estimates.

    python -m benchmarks.bench_train [--quick] [--output benchmarks/results] [--work DIR]

1. quickstart.
Trains configs/quickstart.yaml on a freshly prepared synthetic corpus through the real launcher
(`deepspeed --num_gpus 2 pretrain/main.py`), once as DP=2/TP=1 and once as DP=1/TP=2, with the
curriculum compressed so that each run spends the same number of steps at 256, 512 and 1024
tokens (2,048 tokens per step throughout). tokens/s per length = tokens / summed step time of the
steps at that length (the first step of a run, which includes warm-up, is left out); start-up
(imports, process groups, DeepSpeed initialisation) is reported separately.
Also records the `--dry-run` parameter count and per-GPU memory estimate of the paper-scale
configs on 8 GPUs.

2. the trainer against the model alone (issue 15). Path measured: ``deepspeed --num_gpus P pretrain/main.py`` (the DeepSpeed launcher, ZeRO-3, fp32 on
CPU, the fused LM loss, AdamW, the data loader: what users run), for bench_model's MemMamba and
Mamba2 (d_model 256, 4 layers, vocab 32k, SSD chunk 256, model.* defaults otherwise) at 1k, 4k
and 16k tokens per sample, one sample per rank per step, with 1 and 2 processes on the same cores
(2 ranks get 1 torch thread each). Data: a 32k tokenizer and shards of the PG19-layout sample
(../shared/data/pg19-mini), made with the project's CLIs under --work; books are long, so a
sample rarely holds an EOD (the reset's cost is measured by bench_documents).

Per run: tokens/s of the best step after the first (the trainer's own ``step_time_s`` in
metrics.jsonl: forward, backward and optimizer step, summed over ranks), rank 0's peak RSS (the
trainer's ``memory_gb``) and the largest peak RSS of any process of the launch
(``RUSAGE_CHILDREN``). The model-only row is bench_model's ``train_worker`` (forward + backward
with ``chunked_lm_loss``, no optimizer) with the same model, 2 threads, in its own process.

Targets (issue 15): the trainer's tokens/s >= 0.9x the model-only step's at every length, and
peak RSS <= 1.3x the model-only peak plus the optimizer state. The optimizer state is what
ZeRO-3 keeps per parameter beyond the model's own weights and gradients: fp32 Adam moments (8 B)
and the fp32 master partition (4 B), divided over the data-parallel ranks.
Writes <output>/train.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.bench_model import THREADS, bench_config, run_worker
from benchmarks.common import RESULTS, ROOT, python_module, write_results
from data_prep.prepare import prepare
from data_prep.train_tokenizer import train_on_source as train_tokenizer
from pretrain.config import RunConfig, load_config
from pretrain.estimate import estimate

PAPER_CONFIGS = ("memmamba_130m_pg19", "mamba2_130m_pg19", "transformer_130m_pg19")
LENGTHS = (256, 512, 1024)
STEP_TOKENS = 2048  # quickstart: 8 x 256 = 4 x 512 = 2 x 1024
MODELS = ("memmamba", "mamba2")
SOURCE = f"pg19:{ROOT.parent / 'shared' / 'data' / 'pg19-mini'}"
VOCAB = 32000
OPTIMIZER_BYTES_PER_PARAMETER = 12  # fp32 Adam exp_avg + exp_avg_sq + ZeRO's fp32 master partition
FULL = dict(seq_lens=(1024, 4096, 16384), procs=(1, 2), steps=4)
QUICK = dict(seq_lens=(256, 512), procs=(1, 2), steps=2)


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
    mfu = defaultdict(list)
    for record in steps[1:]:
        mfu[record["seq_len"]].append(record["mfu"])
    return {"tp": tp, "dp": 2 // tp, "steps": len(steps), "wall_seconds": round(wall, 1),
            "mfu": {str(n): round(sum(v) / len(v), 4) for n, v in mfu.items()},
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
                     "activations_gb": round(e.activations_gb, 2), "loss_gb": round(e.loss_gb, 2),
                     "micro_batch_tokens": e.micro_batch_tokens}
    return out


def prepare_bench_data(work: Path) -> tuple[Path, Path]:
    """The 32k tokenizer and the shards (kept between runs)."""
    tokenizer, data = work / "tokenizer", work / "data"
    if not (tokenizer / "tokenizer_config.json").is_file():
        python_module("-m", "tokenizer.train", "--input", SOURCE, "--vocab-size", str(VOCAB), "--output", tokenizer)
    python_module("-m", "data_prep.prepare", "--source", SOURCE, "--tokenizer", tokenizer, "--output", data)
    return tokenizer, data


def run_config(name: str, seq_len: int, procs: int, steps: int, tokenizer: Path, data: Path,
               activation_checkpointing: bool = False) -> dict:
    """The run's YAML content: bench_model's model, one sample per rank per step, no evaluation
    or checkpoint during the timed steps (bench_activation also turns block recompute on)."""
    return {
        "model": asdict(bench_config(name)),
        "data": {"path": str(data), "tokenizer": str(tokenizer)},
        "train": {"max_tokens": steps * seq_len * procs, "global_batch_size": procs, "micro_batch_size": 1},
        "curriculum": {"stages": [{"tokens": 0, "seq_len": seq_len}]},
        "deepspeed": {"zero_stage": 3, "precision": "fp32", "activation_checkpointing": activation_checkpointing},
        "checkpoint": {"every_steps": 10**9, "keep_last": 1},
        "logging": {"every_steps": 1, "progress_bar": False},
        "eval": {"every_steps": 0, "seq_lens": [256], "samples": 2},
    }


def trainer_worker(name: str, seq_len: int, procs: int, steps: int, tokenizer: str, data: str, run_dir: str,
                   activation_checkpointing: bool = False) -> dict:
    """One launch of the real trainer; its figures from metrics.jsonl and the OS."""
    import yaml

    run = Path(run_dir)
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time
    run.mkdir(parents=True)
    config = run / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(name, seq_len, procs, steps, Path(tokenizer), Path(data),
                                                activation_checkpointing)))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, THREADS // procs))}
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(procs), "--master_port",
               str(free_port()), "pretrain/main.py",
               "--config", str(config), "--run-dir", str(run / "run"), "--resume", "none"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_seen = [r for r in records if "step_time_s" in r]
    timed = steps_seen[1:] or steps_seen  # the first step warms up
    best = min(timed, key=lambda r: r["step_time_s"])
    return dict(model=name, seq_len=seq_len, procs=procs, path="trainer",
                tokens_per_s=seq_len * procs / best["step_time_s"], mfu=best["mfu"],
                tflops_per_device=best["tflops_per_device"], step_seconds=[r["step_time_s"] for r in steps_seen],
                rank0_peak_rss_gb=max(r["memory_gb"] for r in steps_seen),
                peak_rss_gb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)


def parameters(name: str) -> int:
    import torch

    from model import build_model

    with torch.device("meta"):
        model = build_model(bench_config(name))
    return sum(p.numel() for p in model.parameters())


def summarize(model_rows: list[dict], trainer_rows: list[dict]) -> dict:
    """The issue's targets on the measured numbers (1 process against the model-only step; 2
    processes share the same 2 cores, so their ratio is reported, not targeted)."""
    alone = {(r["model"], r["seq_len"]): r for r in model_rows}
    state_bytes = {name: parameters(name) * OPTIMIZER_BYTES_PER_PARAMETER for name in MODELS}
    summary: dict = {}
    for row in trainer_rows:
        base = alone[row["model"], row["seq_len"]]
        state_gb = state_bytes[row["model"]] / row["procs"] / 2**30
        row["speed_vs_model_only"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["optimizer_state_gb"] = state_gb
        row["rss_budget_gb"] = 1.3 * base["peak_rss_gb"] + state_gb
        key = f"{row['model']}@{row['seq_len']}x{row['procs']}"
        summary[key] = {"speed_vs_model_only": round(row["speed_vs_model_only"], 3),
                        "peak_rss_gb": round(row["peak_rss_gb"], 3), "rss_budget_gb": round(row["rss_budget_gb"], 3)}
    single = [r for r in trainer_rows if r["procs"] == 1]
    summary["trainer_speed>=0.9x_model_only(1 process)"] = all(r["speed_vs_model_only"] >= 0.9 for r in single)
    summary["peak_rss<=1.3x_model_only+optimizer_state"] = all(r["peak_rss_gb"] <= r["rss_budget_gb"]
                                                               for r in trainer_rows)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 quickstart steps per length instead of 8; "
                        "trainer vs model only at 256 and 512 tokens, 2 steps")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for train.json and train.png")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_train",
                        help="the 32k tokenizer, its shards and the runs of part 2 (default: %(default)s)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(trainer_worker(**json.loads(args.worker))))
        return
    from tqdm import tqdm

    steps_per_length = 3 if args.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = "synthetic:docs=40,seed=7,words=1500"
        train_tokenizer(source, 512, tmp / "tokenizer")
        prepare(source, tmp / "tokenizer", tmp / "data", workers=2)
        runs = [run_quickstart(tmp / "data", tmp / f"tp{tp}", tp, steps_per_length) for tp in (1, 2)]

    plan = QUICK if args.quick else FULL
    work = args.work.resolve()
    tokenizer, data = prepare_bench_data(work)
    model_tasks = [dict(kind="train", name=n, seq_len=s, steps=plan["steps"] - 1) for n in MODELS
                   for s in plan["seq_lens"]]
    trainer_tasks = [dict(name=n, seq_len=s, procs=p, steps=plan["steps"], tokenizer=str(tokenizer), data=str(data),
                          run_dir=str(work / "runs" / f"{n}-{s}-{p}")) for n in MODELS for s in plan["seq_lens"]
                     for p in plan["procs"]]
    model_rows = [run_worker(task) for task in tqdm(model_tasks, desc="model only")]
    trainer_rows = [run_worker(task, "benchmarks.bench_train") for task in tqdm(trainer_tasks, desc="trainer")]

    results: dict[str, Any] = {"config": "configs/quickstart.yaml",
                               "launcher": "deepspeed --num_gpus 2 (CPU, gloo, ZeRO-3)",
                               "steps_per_length": steps_per_length, "runs": runs,
                               "dry_run": dry_runs(world_size=8),
                               "vs_model": {"setup": {**plan, "models": MODELS, "vocab": VOCAB, "source": "pg19-mini",
                                                      "optimizer_state": f"{OPTIMIZER_BYTES_PER_PARAMETER} B per "
                                                      "parameter / data-parallel ranks (fp32 Adam moments and "
                                                      "ZeRO's fp32 master partition)"},
                                            "model_only": model_rows, "trainer": trainer_rows}}
    results["vs_model"]["summary"] = summarize(model_rows, trainer_rows)
    path = write_results("train", results, args.output)
    plot(results, args.output / "train.png")
    for run in runs:
        speeds = ", ".join(f"{n}: {v:,.0f}" for n, v in run["tokens_per_s"].items())
        print(f"dp={run['dp']} tp={run['tp']}: tokens/s by seq_len {speeds}; start-up+shutdown "
              f"{run['startup_and_shutdown_seconds']} s; loss {run['first_loss']} -> {run['last_loss']}")
    for name, e in results["dry_run"].items():
        print(f"dry run {name}: {e['parameters']:,} parameters, {e['total_gb']} GB per GPU on 8 GPUs")
    print(json.dumps(results["vs_model"]["summary"], indent=2))
    print(f"wrote {path}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.38
    for i, run in enumerate(results["runs"]):
        xs = [j + (i - 0.5) * width for j in range(len(LENGTHS))]
        left.bar(xs, [run["tokens_per_s"][str(n)] for n in LENGTHS], width, label=f"DP={run['dp']}, TP={run['tp']}")
    left.set_xticks(range(len(LENGTHS)), [str(n) for n in LENGTHS])
    left.set_xlabel("sequence length")
    left.set_ylabel("training tokens/s (2 CPU processes)")
    left.set_title("quickstart, ZeRO-3")
    left.legend()
    vs = results["vs_model"]
    for name in MODELS:
        rows = [r for r in vs["model_only"] if r["model"] == name]
        line, = middle.plot([r["seq_len"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o",
                            linestyle="--", label=f"{name} model only (fwd+bwd)")
        for procs, style in zip(sorted({r["procs"] for r in vs["trainer"]}), ("-", ":")):
            rows = [r for r in vs["trainer"] if r["model"] == name and r["procs"] == procs]
            middle.plot([r["seq_len"] for r in rows], [r["tokens_per_s"] for r in rows], marker="s", linestyle=style,
                        color=line.get_color(), label=f"{name} trainer, {procs} process{'es' if procs > 1 else ''}")
    middle.set_xscale("log", base=2)
    middle.set_xlabel("tokens per sample")
    middle.set_ylabel("training tokens/s")
    middle.set_title("deepspeed pretrain/main.py vs bench_model's step (d_model 256, vocab 32k)", fontsize=9)
    middle.legend(fontsize=7)
    names = list(results["dry_run"])
    bottom = [0.0] * len(names)
    for part in ("model_states_gb", "gathered_weights_gb", "activations_gb", "loss_gb"):
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
