"""Shared test fixtures: paths, a CLI runner, and small prepared datasets built with the real CLIs.

On a machine without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be
set before triton is first imported, hence here). In CI (CI=true) a skipped test fails the run
unless it is marked `gpu`: nothing is skipped silently there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
PG19_MINI = REPO_ROOT.parent / "shared" / "data" / "pg19-mini"


def run_cli(*args: str | Path, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None,
            cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run `python -m <args>` with this interpreter from the repo root; fail loudly with its output."""
    result = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"`python -m {' '.join(map(str, args))}` exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def pg19_mini() -> Path:
    if not (PG19_MINI / "metadata.csv").is_file():
        raise FileNotFoundError(f"{PG19_MINI}: the PG19-layout sample is expected beside the checkout (shared/data/pg19-mini)")
    return PG19_MINI


@pytest.fixture(scope="session")
def pg19_tokenizer(pg19_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPE tokenizer (vocab 4000) trained on pg19-mini/train with the real CLI."""
    out = tmp_path_factory.mktemp("pg19_tokenizer")
    run_cli("tokenizer.train", "--input", f"pg19:{pg19_mini}", "--vocab-size", "4000", "--output", out)
    return out


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer (vocab 512) and prepared shards of a small synthetic corpus (40 docs of ~1.5k words).

    Returns {"tokenizer": dir, "data": dir}. Built once per session with the real CLIs.
    """
    root = tmp_path_factory.mktemp("synthetic")
    source = "synthetic:docs=40,seed=7,words=1500"
    run_cli("tokenizer.train", "--input", source, "--vocab-size", "512", "--output", root / "tokenizer")
    run_cli("data_prep.prepare", "--source", source, "--tokenizer", root / "tokenizer", "--output", root / "data")
    return {"tokenizer": root / "tokenizer", "data": root / "data"}


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_cli


_bad_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "gpu" not in report.keywords:
        _bad_skips.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") == "true" and _bad_skips:
        print(f"\nCI forbids skips outside @pytest.mark.gpu; skipped: {', '.join(_bad_skips)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
