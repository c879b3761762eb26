"""Helpers shared by the benchmark scripts: result files (with `pretrain.metrics.machine`) and runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fileio import write_json_atomic
from pretrain.metrics import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, results: dict[str, Any], output: Path = RESULTS) -> Path:
    """Write `<output>/<name>.json` (atomically) with the machine description first."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{name}.json"
    write_json_atomic(path, {"machine": machine(), **results})
    return path


def python_module(*args: str | Path, threads: int | None = None, log: Path | None = None) -> None:
    """`python -m ...` from the repository root; stops the reproduction if it fails. ``threads`` sets
    its OMP_NUM_THREADS; with ``log`` its output is appended to that file instead of ours."""
    command = [sys.executable, *map(str, args)]
    print("$", " ".join(command[1:]) + (f" >> {log}" if log else ""), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    if log is None:
        returncode = subprocess.run(command, cwd=ROOT, env=env).returncode
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            returncode = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        raise SystemExit(f"{Path(sys.argv[0]).stem}: `{' '.join(command[1:])}` failed"
                         + (f" (its output: {log})" if log else ""))


def tokens_trained(run_dir: Path) -> int:
    """Tokens seen by the run's newest complete checkpoint (0 without one)."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return 0
    return json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "meta.json").read_text())["tokens_seen"]


def finished(run_dir: Path, max_tokens: int) -> bool:
    """Whether the run's newest complete checkpoint has seen ``max_tokens`` (then it is not retrained)."""
    return tokens_trained(run_dir) >= max_tokens


def train(config: Path, run_dir: Path, overrides: list[str], init_from: Path | None = None,
          threads: int | None = None, log: Path | None = None) -> None:
    """One training run through the real trainer (`python pretrain/main.py`: DeepSpeed, one process),
    resumed when interrupted; a fresh one starts from ``init_from``'s weights when given.
    ``threads`` and ``log``: as for `python_module`."""
    python_module("pretrain/main.py", "--config", config, "--run-dir", run_dir, "--resume", "auto",
                  *(["--init-from", init_from] if init_from else []), *[arg for o in overrides for arg in ("--set", o)],
                  threads=threads, log=log)


def prepare_data(output: Path, source: str) -> tuple[Path, Path]:
    """A 512-token tokenizer and shards of ``source`` under OUTPUT, made with the project's CLIs
    (the tokenizer is kept when present; prepare skips complete shards)."""
    tokenizer = output / "tokenizer"
    if not (tokenizer / "tokenizer_config.json").is_file():
        python_module("-m", "tokenizer.train", "--input", source, "--vocab-size", "512", "--output", tokenizer)
    return tokenizer, prepare_shards(source, tokenizer, output / "data")


def prepare_shards(source: str, tokenizer: Path, output: Path) -> Path:
    """Shards of ``source`` in OUTPUT (`data_prep.prepare`, which skips complete shards)."""
    python_module("-m", "data_prep.prepare", "--source", source, "--tokenizer", tokenizer, "--output", output)
    return output


def reproduction_args(name: str, doc: str, results_help: str, quick_help: str,
                      argv: list[str] | None, parallel_runs: bool = False) -> argparse.Namespace:
    """The flags every reproduction driver takes: --config, --output, --results, --quick, and
    --jobs for a driver whose runs can train side by side (``parallel_runs``).
    OUTPUT comes back resolved and RESULTS exists."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / f"{name}.yaml")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / name)
    parser.add_argument("--results", type=Path, default=RESULTS / name,
                        help=f"where {results_help} go (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if parallel_runs:
        parser.add_argument("--jobs", type=int, default=2,
                            help="training runs side by side, each with cores / JOBS threads (default: %(default)s)")
    args = parser.parse_args(argv)
    if parallel_runs and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    args.output = args.output.resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    return args
