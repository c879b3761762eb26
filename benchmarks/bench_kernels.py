"""Throughput of the Triton kernels against the pure-PyTorch references (and mamba-ssm when present).

    python -m benchmarks.bench_kernels [--quick] [--repeats 5] [--output benchmarks/results]

Measures forward + backward tokens/s of
* the SSD scan: ssd_chunked_triton vs model.ssd.ssd_chunked vs mamba_ssm's
  mamba_chunk_scan_combined (if it imports), at a Mamba2-130M-like layer: 24 heads x 64 head dim,
  d_state 128, 1 group, chunk 256, bf16 inputs;
* the memory read: memory_read_triton vs model.memory.memory_read, 4 heads x 16 dims, pool of
  50 notes, chunk 256, bf16;
at 2k / 8k / 32k tokens (batch 1) on CUDA (best of --repeats, after a warm-up call).

Without CUDA the kernels run in Triton's interpreter at one small shape, which measures Python
overhead, not kernel speed; the JSON says so ("mode": "interpreter"). --quick keeps only the
shortest length (CUDA) or a smaller shape (CPU) and one repeat.
Writes benchmarks/results/kernels.json and kernels.png.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated (imported)

from benchmarks.common import RESULTS, write_results  # noqa: E402
from model.kernels.memory import memory_read_triton  # noqa: E402
from model.kernels.ssd import ssd_chunked_triton  # noqa: E402
from model.memory import memory_read  # noqa: E402
from model.ssd import ssd_chunked  # noqa: E402

SCAN_SHAPE = dict(heads=24, headdim=64, groups=1, dstate=128, chunk=256)
READ_SHAPE = dict(heads=4, headdim=16, slots=50, chunk=256)
SMALL_SCAN_SHAPE = dict(heads=4, headdim=16, groups=1, dstate=16, chunk=64)  # interpreter
SMALL_READ_SHAPE = dict(heads=2, headdim=16, slots=20, chunk=64)


def _mamba_ssm_scan() -> Callable | None:
    """mamba_ssm's scan adapted to our signature, or None when the GPU extra is absent."""
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None

    def scan(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state,
                                         return_final_states=True)

    return scan


def _scan_inputs(seqlen: int, shape: dict, device: torch.device) -> dict[str, torch.Tensor]:
    h, p, g, n = shape["heads"], shape["headdim"], shape["groups"], shape["dstate"]
    gen = torch.Generator().manual_seed(0)
    tensors = dict(
        x=torch.randn(1, seqlen, h, p, generator=gen).bfloat16(),
        dt=torch.rand(1, seqlen, h, generator=gen) * 0.1 + 0.001,
        A=-torch.rand(h, generator=gen) * 8 - 1,
        B=torch.randn(1, seqlen, g, n, generator=gen).bfloat16(),
        C=torch.randn(1, seqlen, g, n, generator=gen).bfloat16(),
        D=torch.ones(h),
    )
    return {k: v.to(device).requires_grad_() for k, v in tensors.items()}


def _read_inputs(seqlen: int, shape: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    nchunks, h, d, m, c = seqlen // shape["chunk"], shape["heads"], shape["headdim"], shape["slots"], shape["chunk"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, nchunks, rows, h, d, generator=gen).bfloat16().to(device).requires_grad_()
               for rows in (c, m, m))
    valid = (torch.arange(m) < m - 3).expand(1, nchunks, m).to(device)  # a few empty slots, like a filling pool
    return q, k, v, valid


def _seconds(step: Callable[[], None], repeats: int) -> float:
    """Best wall time of ``step`` over ``repeats`` calls after one warm-up (compiles, autotunes)."""
    step()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def _scan_step(scan: Callable, inputs: dict, chunk: int) -> Callable[[], None]:
    def step():
        y, final = scan(**inputs, chunk_size=chunk)
        (y.float().sum() + final.float().sum()).backward()
    return step


def _read_step(read: Callable, inputs: tuple) -> Callable[[], None]:
    def step():
        read(*inputs).float().sum().backward()
    return step


def _measure(name: str, step: Callable[[], None], seqlen: int, repeats: int) -> dict:
    try:
        seconds = _seconds(step, repeats)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"impl": name, "seqlen": seqlen, "error": "out of memory"}
    return {"impl": name, "seqlen": seqlen, "seconds": round(seconds, 6), "tokens_per_s": round(seqlen / seconds)}


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, op in zip(axes, ("scan", "memory_read")):
        rows = [r for r in results[op] if "tokens_per_s" in r]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            points = [(r["seqlen"], r["tokens_per_s"]) for r in rows if r["impl"] == impl]
            ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens, batch 1)")
        ax.set_ylabel("tokens/s, forward + backward")
        ax.set_title(f"{op} ({results['mode']})")
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shortest length / smaller shape, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    if on_cuda:
        mode, scan_shape, read_shape = "cuda", SCAN_SHAPE, READ_SHAPE
        lengths = [2048] if args.quick else [2048, 8192, 32768]
    else:
        mode, scan_shape, read_shape = "interpreter", SMALL_SCAN_SHAPE, SMALL_READ_SHAPE
        lengths = [128] if args.quick else [256]
    scans = {"triton": ssd_chunked_triton, "torch": ssd_chunked}
    if (mamba_scan := _mamba_ssm_scan()) is not None:
        scans["mamba_ssm"] = mamba_scan

    results = {
        "mode": mode,
        "note": ("Triton kernels compiled for CUDA" if on_cuda else
                 "no CUDA: Triton kernels ran in TRITON_INTERPRET=1 on CPU; their times measure the "
                 "interpreter's Python overhead, not kernel speed; torch rows are the CPU reference"),
        "scan_shape": {**scan_shape, "dtype": "bfloat16 x/B/C, float32 dt/A/D", "batch": 1},
        "read_shape": {**read_shape, "dtype": "bfloat16", "batch": 1},
        "mamba_ssm": "mamba_ssm" in scans,
        "repeats": repeats,
        "scan": [],
        "memory_read": [],
    }
    for seqlen in lengths:
        for name, scan in scans.items():
            inputs = _scan_inputs(seqlen, scan_shape, device)
            row = _measure(name, _scan_step(scan, inputs, scan_shape["chunk"]), seqlen, repeats)
            results["scan"].append(row)
            print("scan", row, flush=True)
        for name, read in {"triton": memory_read_triton, "torch": memory_read}.items():
            row = _measure(name, _read_step(read, _read_inputs(seqlen, read_shape, device)), seqlen, repeats)
            results["memory_read"].append(row)
            print("memory_read", row, flush=True)

    path = write_results("kernels", results, args.output)
    _plot(results, args.output / "kernels.png")
    print(f"wrote {path} and {args.output / 'kernels.png'}")


if __name__ == "__main__":
    main()
