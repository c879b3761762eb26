"""Helpers shared by the benchmark scripts: machine description and result files."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from data_prep.manifest import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What a figure was measured on: CPU, cores, memory, allocator, torch threads."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    preload = os.environ.get("LD_PRELOAD", "")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1),
            "allocator": "jemalloc" if "jemalloc" in preload else "glibc malloc",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_results(name: str, results: dict[str, Any], output: Path = RESULTS) -> Path:
    """Write `<output>/<name>.json` (atomically) with the machine description first."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{name}.json"
    write_json_atomic(path, {"machine": machine(), **results})
    return path
