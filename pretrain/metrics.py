"""Rank-0 run logging: TensorBoard scalars, `metrics.jsonl`, a console line, a tqdm bar, and
optionally Weights & Biases (`logging.wandb`).

`metrics.jsonl` holds one JSON object per logged step (at least step, tokens, loss, lr, seq_len,
grad_norm, tokens_per_s) and one per validation (`{"step", "tokens", "valid/loss@<len>"...}`).
On resume, records after the resumed step (written by the interrupted run past its last
checkpoint) are dropped, and TensorBoard purges them the same way, so both show one trajectory.

W&B gets the TensorBoard scalars under the same tags and the resolved config. Its run id is kept
in `<run_dir>/wandb_run_id`, so a resumed run continues the same W&B run (W&B ignores steps it has
already seen: after a resume it keeps the interrupted attempt's values for those steps).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import secrets
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fileio import write_text_atomic

from .config import WandbConfig

# TensorBoard tag of each metrics.jsonl key that is plotted.
SCALARS = {
    "loss": "train/loss", "lr": "train/lr", "seq_len": "train/seq_len", "tokens": "train/tokens_seen",
    "tokens_per_s": "perf/tokens_per_s", "step_time_s": "perf/step_time_s", "grad_norm": "train/grad_norm",
    "skipped_steps": "train/skipped_steps", "memory_gb": "perf/memory_gb",
    "tflops_per_device": "perf/tflops_per_device", "mfu": "perf/mfu",
}


def machine() -> dict[str, Any]:
    """What a figure or an evaluation was measured on: CPU, cores, memory, allocator, torch threads."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    preload = os.environ.get("LD_PRELOAD", "")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1),
            "allocator": "jemalloc" if "jemalloc" in preload else "glibc malloc",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def memory_gb() -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, else the resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Writes only on rank 0 (`enabled`); every method is a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int, total_tokens: int, tokens_seen: int,
                 progress_bar: bool, wandb: WandbConfig | None = None, run_config: dict[str, Any] | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self.wandb = _start_wandb(run_dir, wandb, run_config) if wandb is not None and wandb.project else None
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = run_dir / "metrics.jsonl"
        _truncate_after(self.jsonl, resume_step)
        # Events after the resumed step (or all, for a fresh start) belong to an interrupted attempt: hide them.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        self.bar = tqdm(total=total_tokens, initial=tokens_seen, unit="tok", unit_scale=True, dynamic_ncols=True,
                        disable=None if progress_bar else True, desc="train")  # None: only on a terminal

    def advance(self, tokens: int, loss: float) -> None:
        if self.enabled:
            self.bar.update(tokens)
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def log(self, record: dict[str, Any]) -> None:
        """One training or validation record: JSONL line, TensorBoard scalars, console line."""
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {}
        for key, value in record.items():
            tag = SCALARS.get(key) or (key if key.startswith(("valid/", "data/")) else None)
            if tag is not None and value is not None:
                self.writer.add_scalar(tag, value, step)
                scalars[tag] = value
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        self.print(_console_line(record))

    def print(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()


def _start_wandb(run_dir: Path, cfg: WandbConfig, run_config: dict[str, Any] | None):
    import wandb  # only here: with logging.wandb.project null it is never imported

    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # W&B's id format
    write_text_atomic(id_file, run_id + "\n")
    return wandb.init(project=cfg.project, mode=cfg.mode, dir=str(run_dir), id=run_id, resume="allow",
                      name=run_dir.name, config=run_config)


def _console_line(record: dict[str, Any]) -> str:
    if "loss" not in record:
        values = " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("valid/"))
        return f"step {record['step']:>6} | {values}"
    return (f"step {record['step']:>6} | tokens {record['tokens']:>11,} | seq {record['seq_len']:>5} | "
            f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
            f"{record['tokens_per_s']:,.0f} tok/s | {record['tflops_per_device']:.3g} TFLOP/s | "
            f"MFU {record['mfu']:.1%} | skipped {record['skipped_steps']}")


def _truncate_after(path: Path, step: int) -> None:
    """Drop records with step > `step` (all of them for a fresh run)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
