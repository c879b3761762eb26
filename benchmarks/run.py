"""Run every benchmark, one process per comparison, and regenerate the tables of BENCHMARKS.md.

    python -m benchmarks.run [--quick] [--only model,data_prep] [--output benchmarks/results]

Comparisons, each one process (`python -m benchmarks.<script>`) measuring its subjects side by side:
- data_prep (bench_data_prep): prepare's MB/s with 1 and 2 workers against the raw SentencePiece ceiling;
- model (bench_model): training time per token vs sequence length (MemMamba, Mamba2, Transformer,
  transformers' Mamba2ForCausalLM), decode ms/token and cache bytes vs position (ours and
  transformers' Mamba2 and Llama with their caches), MemMamba's overhead over Mamba2;
- train (bench_train): training tokens/s and MFU of the quickstart config (DP=2, TP=2), and the real
  trainer (`deepspeed pretrain/main.py`) against bench_model's model-only step at 1k-16k tokens;
- kernels (bench_kernels): Triton kernels against the PyTorch reference (interpreter on CPU).

Each script writes <output>/<name>.json and .png. This runner then writes <output>/run.json
(status and seconds of each script, the targets with their measured values) and
<output>/tables.md, and replaces the text between the markers

    <!-- benchmarks.run:begin -->
    <!-- benchmarks.run:end -->

in BENCHMARKS.md (--markdown) with the same tables; without the markers BENCHMARKS.md is left
alone. A script that is missing or fails is reported and the others still run; the exit code is
then 1. --quick passes each script its quick mode (about 5 minutes in all on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, write_results
from fileio import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- benchmarks.run:begin -->", "<!-- benchmarks.run:end -->"


@dataclass(frozen=True)
class Comparison:
    name: str
    """Also the result file: <output>/<name>.json."""
    module: str
    quick_args: tuple[str, ...]


COMPARISONS = (
    Comparison("data_prep", "benchmarks.bench_data_prep", ("--repeats", "1")),
    Comparison("model", "benchmarks.bench_model", ("--quick",)),
    Comparison("train", "benchmarks.bench_train", ("--quick",)),
    Comparison("kernels", "benchmarks.bench_kernels", ("--quick",)),
)


def run_script(comparison: Comparison, quick: bool, output: Path) -> dict[str, Any]:
    """Run one benchmark script in its own process; {"status", "seconds", "load_average"[, "error"]}.

    The 1-minute load average before and after is recorded: other work on the machine slows
    every figure, and BENCHMARKS.md says so beside them."""
    if importlib.util.find_spec(comparison.module) is None:
        return {"status": "missing", "seconds": 0.0, "error": f"{comparison.module} does not exist yet"}
    command = [sys.executable, "-m", comparison.module, "--output", str(output),
               *(comparison.quick_args if quick else ())]
    print(f"[benchmarks.run] {' '.join(command[1:])}", flush=True)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    done = subprocess.run(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    status = {"seconds": round(time.perf_counter() - start, 1), "load_average": [load_before, os.getloadavg()[0]]}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(done.stderr[-3000:], file=sys.stderr)
        return {"status": "failed", **status, "error": f"exit {done.returncode}: {last}"}
    return {"status": "ok", **status}


# ---- tables: one function per result file ----

def _machine_line(result: dict[str, Any], status: dict[str, Any]) -> str:
    m = result.get("machine") or {}
    setup = result.get("setup") or {}
    parts = [m.get("cpu") or setup.get("cpu"), f"{m['cores']} cores" if "cores" in m else None,
             f"{m.get('torch_threads') or setup.get('threads')} torch threads",
             setup.get("allocator") or m.get("allocator"), m.get("cuda")]  # a script's own setup knows its workers
    if "load_average" in status:
        parts.append("1-minute load average {:.1f} before, {:.1f} after".format(*status["load_average"]))
    elif "load_average_at_end" in setup:
        parts.append(f"1-minute load average {setup['load_average_at_end'][0]:.1f} at the end")
    line = "Measured on: " + ", ".join(str(p) for p in parts if p) + "."
    return line if status["status"] == "ok" else line + " (not rerun this time: figures of an earlier run)"


def data_prep_table(result: dict[str, Any]) -> str:
    rows = ["| run | MB/s | tokens/s | seconds |", "|---|---:|---:|---:|"]
    rows += [f"| {name} | {r['MB_per_s']:.2f} | {r['tokens_per_s']:,} | {r['seconds']:.2f} |"
             for name, r in result["runs"].items()]
    corpus = result["corpus"]
    return (f"pg19-mini train: {corpus['books']} books, {corpus['megabytes']} MB, {corpus['tokens']:,} tokens "
            f"(vocab {corpus['vocab']}).\n\n" + "\n".join(rows))


def model_table(result: dict[str, Any]) -> str:
    train, decode = result["train"], result["decode"]
    lengths = sorted({r["seq_len"] for r in train})
    models = list(dict.fromkeys(r["model"] for r in train))
    cell = {(r["model"], r["seq_len"]): r for r in train}
    rows = ["| model | " + " | ".join(f"tokens/s @{n}" for n in lengths) + " | "
            + " | ".join(f"peak RSS GB @{n}" for n in lengths) + " |", "|---|" + "---:|" * (2 * len(lengths))]
    for model in models:
        rows.append(f"| {model} | " + " | ".join(f"{cell[model, n]['tokens_per_s']:,.0f}" for n in lengths) + " | "
                    + " | ".join(f"{cell[model, n]['peak_rss_gb']:.2f}" for n in lengths) + " |")
    positions = sorted({r["position"] for r in decode})
    decoded = list(dict.fromkeys(r["model"] for r in decode))
    step = {(r["model"], r["position"]): r for r in decode}
    drows = ["| model | " + " | ".join(f"ms/token @{p}" for p in positions) + " | "
             + " | ".join(f"cache bytes @{p}" for p in positions) + " |", "|---|" + "---:|" * (2 * len(positions))]
    for model in decoded:
        drows.append(f"| {model} | " + " | ".join(f"{step[model, p]['ms_per_token']:.2f}" for p in positions) + " | "
                     + " | ".join(f"{step[model, p]['cache_bytes']:,}" for p in positions) + " |")
    setup = result.get("setup", {})
    checks = ["| check (bench_model's own targets) | value |", "|---|---|"]
    checks += [f"| {name} | {json.dumps(value)} |" for name, value in result.get("targets", {}).items()]
    return (f"{setup.get('config', '')}; batch 1; {setup.get('loss', '')}; {setup.get('timing', '')}.\n\n"
            "Training step (forward + backward):\n\n" + "\n".join(rows)
            + "\n\nDecoding (one token per step, after a prefill to the position):\n\n" + "\n".join(drows)
            + "\n\n" + "\n".join(checks))


def train_table(result: dict[str, Any]) -> str:
    lengths = sorted({int(n) for run in result["runs"] for n in run["tokens_per_s"]})
    rows = ["| layout | " + " | ".join(f"tokens/s @{n}" for n in lengths) + " | MFU | start-up + shutdown s | loss |",
            "|---|" + "---:|" * (len(lengths) + 2) + "---|"]
    for run in result["runs"]:
        mfu = " / ".join(f"{run['mfu'][str(n)]:.1%}" for n in lengths if str(n) in run.get("mfu", {})) or "n/a"
        rows.append(f"| DP={run['dp']} TP={run['tp']} | "
                    + " | ".join(f"{run['tokens_per_s'].get(str(n), float('nan')):,.0f}" for n in lengths)
                    + f" | {mfu} | {run['startup_and_shutdown_seconds']:.1f} | {run['first_loss']:.3f} -> "
                      f"{run['last_loss']:.3f} |")
    dry = ["| config | parameters | GB per GPU | of which activations | world size |", "|---|---:|---:|---:|---:|"]
    dry += [f"| {name} | {d['parameters']:,} | {d['total_gb']:.2f} | {d['activations_gb']:.2f} | {d['world_size']} |"
            for name, d in result.get("dry_run", {}).items()]
    text = (f"`{result['config']}` through `{result['launcher']}`, {result['steps_per_length']} steps per "
            f"curriculum length (MFU per length, against the fp32 matmul peak measured at start-up).\n\n"
            + "\n".join(rows))
    vs = result.get("vs_model")
    if vs:
        alone = {(r["model"], r["seq_len"]): r for r in vs["model_only"]}
        table = ["| model | tokens | processes | trainer tokens/s | model-only tokens/s | ratio | MFU | "
                 "peak RSS GB (largest rank) | model-only peak RSS GB | optimizer state GB |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in vs["trainer"]:
            base = alone[r["model"], r["seq_len"]]
            table.append(f"| {r['model']} | {r['seq_len']} | {r['procs']} | {r['tokens_per_s']:,.0f} | "
                         f"{base['tokens_per_s']:,.0f} | {r['speed_vs_model_only']:.2f} | {r['mfu']:.1%} | "
                         f"{r['peak_rss_gb']:.2f} | {base['peak_rss_gb']:.2f} | {r['optimizer_state_gb']:.2f} |")
        text += ("\n\nThe real trainer (`deepspeed --num_gpus P pretrain/main.py`, ZeRO-3, fp32, fused loss, AdamW) "
                 "against bench_model's model-only step (forward + backward, `chunked_lm_loss`), d_model 256, "
                 "4 layers, vocab 32k, one sample per rank:\n\n" + "\n".join(table))
    return text + "\n\n`pretrain/main.py --dry-run` memory estimates of the paper-scale configs:\n\n" + "\n".join(dry)


def kernels_table(result: dict[str, Any]) -> str:
    rows = ["| op | implementation | tokens | tokens/s |", "|---|---|---:|---:|"]
    for op in ("scan", "memory_read"):
        rows += [f"| {op} | {r['impl']} | {r['seqlen']:,} | {r['tokens_per_s']:,} |"
                 for r in result.get(op, []) if "tokens_per_s" in r]
    return f"Mode: {result['mode']}. {result.get('note', '')}\n\n" + "\n".join(rows)


def generic_table(result: dict[str, Any]) -> str:
    """Top-level numbers of a result file this runner has no dedicated table for."""
    rows = ["| key | value |", "|---|---|"]
    rows += [f"| {k} | {v} |" for k, v in result.items() if isinstance(v, (int, float, str)) and k != "machine"]
    return "\n".join(rows)


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "data_prep": data_prep_table, "model": model_table, "train": train_table, "kernels": kernels_table,
}


# ---- targets ----

@dataclass
class Target:
    text: str
    measured: str
    met: bool | None
    """None when the figures it needs were not measured."""


def _ratio_target(text: str, value: float | None, limit: float, at_most: bool) -> Target:
    if value is None:
        return Target(text, "not measured", None)
    return Target(text, f"{value:.2f}x", value <= limit if at_most else value >= limit)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def targets(results: dict[str, dict[str, Any]]) -> list[Target]:
    """The issue's speed targets, each beside its measured value (at the lengths actually run:
    1k and 16k in full mode, shorter ones with --quick)."""
    model = results.get("model", {"decode": [], "train": []})
    decode = {(r["model"], r["position"]): r["ms_per_token"] for r in model["decode"]}
    train = {(r["model"], r["seq_len"]): r["ms_per_token"] for r in model["train"]}
    positions = sorted({p for _, p in decode}) or [1024, 16384]
    lengths = sorted({n for _, n in train}) or [1024, 16384]
    (p_lo, p_hi), (n_lo, n_hi) = (positions[0], positions[-1]), (lengths[0], lengths[-1])
    out = [
        _ratio_target(f"MemMamba decode latency at position {p_hi} <= 1.1x at {p_lo}",
                      _ratio(decode.get(("memmamba", p_hi)), decode.get(("memmamba", p_lo))), 1.1, at_most=True),
        _ratio_target(f"MemMamba decode at position {p_hi} >= 2x faster than the same-size Transformer with KV cache",
                      _ratio(decode.get(("transformer", p_hi)), decode.get(("memmamba", p_hi))), 2.0, at_most=False),
        _ratio_target(f"MemMamba training time per token at {n_hi} tokens <= 1.2x at {n_lo}",
                      _ratio(train.get(("memmamba", n_hi)), train.get(("memmamba", n_lo))), 1.2, at_most=True),
    ]
    data = results.get("data_prep")
    if data:
        mb = data["runs"]["prepare_2_workers"]["MB_per_s"]
        out.append(Target("data_prep with 2 workers >= 3.5 MB/s", f"{mb:.2f} MB/s", mb >= 3.5))
        fraction = data["prepare_2_workers_fraction_of_ceiling"]
        out.append(Target("data_prep with 2 workers >= 80% of the tokenizer ceiling", f"{fraction:.0%}",
                          fraction >= 0.8))
    return out


def markdown(results: dict[str, dict[str, Any]], status: dict[str, dict[str, Any]], quick: bool,
             output: Path) -> str:
    mark = {True: "yes", False: "**no**", None: "n/a"}
    lines = [f"_Generated by `python -m benchmarks.run{' --quick' if quick else ''}`"
             f"{' (quick mode: short lengths, few repeats)' if quick else ''}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}._", "", "### Targets", "",
             "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {t.text} | {t.measured} | {mark[t.met]} |" for t in targets(results)]
    for comparison in COMPARISONS:
        lines += ["", f"### {comparison.name} (`python -m {comparison.module}`)", ""]
        result = results.get(comparison.name)
        if result is None:
            lines.append(f"Not measured: {status[comparison.name].get('error', 'not run')}.")
            continue
        plot = os.path.relpath(output / f"{comparison.name}.png", ROOT)
        lines += [_machine_line(result, status[comparison.name]), "",
                  TABLES.get(comparison.name, generic_table)(result), "", f"Plot: `{plot}`."]
    return "\n".join(lines) + "\n"


def splice(path: Path, tables: str) -> bool:
    """Replace the text between the markers in ``path``; False (file untouched) without markers."""
    if not path.is_file():
        return False
    text = path.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(path, f"{head}{BEGIN}\n{tables}{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every script in its quick mode")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(c.name for c in COMPARISONS)}")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results directory (default: benchmarks/results)")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="file whose marked section receives the tables (default: BENCHMARKS.md)")
    args = parser.parse_args(argv)
    names = [c.name for c in COMPARISONS]
    chosen = names if args.only is None else args.only.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"error: --only: unknown comparison(s) {', '.join(unknown)}; expected any of {', '.join(names)}",
              file=sys.stderr)
        return 2

    args.output.mkdir(parents=True, exist_ok=True)
    status = {c.name: run_script(c, args.quick, args.output) if c.name in chosen else {"status": "skipped"}
              for c in COMPARISONS}
    # Comparisons left out by --only keep the figures of their last run, marked as such.
    results = {name: json.loads((args.output / f"{name}.json").read_text()) for name, s in status.items()
               if s["status"] == "ok" or (s["status"] == "skipped" and (args.output / f"{name}.json").is_file())}
    tables = markdown(results, status, args.quick, args.output)
    write_text_atomic(args.output / "tables.md", tables)
    write_results("run", {"quick": args.quick, "scripts": status,
                          "targets": [vars(t) for t in targets(results)]}, args.output)
    spliced = splice(args.markdown, tables)
    for name, s in status.items():
        print(f"[benchmarks.run] {name:10s} {s['status']:8s} {s.get('seconds', 0):7.1f} s  {s.get('error', '')}")
    where = args.markdown if spliced else f"{args.output / 'tables.md'} ({args.markdown} has no {BEGIN} markers)"
    print(f"[benchmarks.run] tables written to {where}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
